-- Every row-level problem of the day's feed in one place: values of the wrong type (found
-- while landing), duplicate keys, and rule violations. The value shown is always the text
-- exactly as written in the file (rule checks work on typed values, so it is looked up again
-- in the landing table by file and line).
with
rule_violations as (
    select * from {{ ref('int_feed_rule_violations') }} where as_of = $as_of
),
raw_rows as (
    {% for f in feed_files %}
    {% if not loop.first %}union all{% endif %}
    select {{ literal(f.filename) }} as file, _line as line,
           to_json(struct_pack({% for c in f.column_names %}{{ quote(c) }} := {{ quote(c) }}{% if not loop.last %}, {% endif %}{% endfor %})) as raw
    from {{ source(f.name) }}
    where as_of = $as_of
      and _line in (select line from rule_violations where file = {{ literal(f.filename) }})
    {% endfor %}
),
all_problems as (
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
    select v.as_of, v.file, v.line, v."column",
           coalesce(json_extract_string(r.raw, '$."' || v."column" || '"'), v.value) as value,
           v.reason, v.account_id, v.household_id, v.model_id, v.symbol, v.scope, v.scope_id
    from rule_violations v
    left join raw_rows r using (file, line)
)
-- `value` stays exactly as written; the ids that say whom a problem affects are the ids they
-- resolve to without leading/trailing whitespace ('ACC-1 ' affects account ACC-1: it is held
-- out rather than scanned without the rejected row).
select as_of, file, line, "column", value, reason,
       {% for c in reference_columns %}nullif(regexp_replace({{ quote(c) }}, '^\s+|\s+$', '', 'g'), '') as {{ quote(c) }}{% if not loop.last %}, {% endif %}{% endfor %}
from all_problems
