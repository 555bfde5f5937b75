-- Every row-level problem of the day's feed in one place: values of the wrong type (found
-- while landing), duplicate keys, and rule violations.
select as_of, file, line, "column", value, reason,
       account_id, household_id, model_id, symbol, scope, scope_id
from {{ ref('feed_type_errors') }}
where as_of = $as_of
union all
select as_of, file, line, "column", value, reason,
       account_id, household_id, model_id, symbol, scope, scope_id
from {{ ref('int_feed_duplicate_keys') }}
where as_of = $as_of
union all
select as_of, file, line, "column", value, reason,
       account_id, household_id, model_id, symbol, scope, scope_id
from {{ ref('int_feed_rule_violations') }}
where as_of = $as_of
