-- Visible data-quality alerts for operations and the advisor: one per account held out of
-- today's recommendations, with its advisor (when the account is known) and the reasons.
with
accounts as (select * from {{ ref('stg_feed_accounts') }} where as_of = $as_of),
households as (select * from {{ ref('stg_feed_households') }} where as_of = $as_of)
select
    $as_of::date as as_of,
    h.account_id,
    a.household_id,
    coalesce(a.advisor_override_id, hh.advisor_id) as advisor_id,
    a.account_id is not null as account_known,
    h.problem_count,
    h.reasons
from {{ ref('int_held_accounts') }} h
left join accounts a using (account_id)
left join households hh using (household_id)
where h.as_of = $as_of
