-- Every account not scanned for recommendations today, with why: suspended (its own reason),
-- held out for data quality (the rejected rows), or nothing to rebalance (no market value).
with accounts as (select * from {{ ref('stg_feed_accounts') }} where as_of = $as_of)
select $as_of::date as as_of, s.account_id, s.household_id, s.advisor_id,
       'suspended' as reason_kind, coalesce(s.suspended_reason, 'no reason given') as reason
from {{ ref('int_scanned_accounts') }} s
where s.as_of = $as_of and s.suspended
union all
select $as_of::date, s.account_id, s.household_id, s.advisor_id,
       'no_market_value', 'account has no market value to rebalance'
from {{ ref('int_scanned_accounts') }} s
where s.as_of = $as_of and not s.suspended and s.market_value <= 0
union all
select $as_of::date, h.account_id, a.household_id, null, 'data_quality', h.reasons
from {{ ref('int_held_accounts') }} h
left join accounts a using (account_id)
where h.as_of = $as_of
