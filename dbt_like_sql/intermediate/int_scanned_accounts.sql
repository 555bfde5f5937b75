-- Every account scanned today (not held for data quality) with what drift needs to know:
-- advisor of record, household AUM and tier, suspension, tax sensitivity, aggregation.
-- The tier follows the household's total market value (the client relationship).
with
accounts as (
    select a.* from {{ ref('stg_feed_accounts') }} a
    anti join {{ ref('int_held_accounts') }} held
      on held.account_id = a.account_id and held.as_of = $as_of
    where a.as_of = $as_of
),
account_value as (
    select account_id, sum(market_value) as market_value
    from {{ ref('holdings') }} where as_of = $as_of group by all
),
households as (select * from {{ ref('stg_feed_households') }} where as_of = $as_of),
scanned as (
    select
        a.account_id,
        a.household_id,
        coalesce(a.advisor_override_id, h.advisor_id) as advisor_id,
        a.account_type,
        a.discretionary,
        a.tax_sensitive,
        a.suspended,
        a.suspended_reason,
        h.aggregate_rebalancing,
        coalesce(v.market_value, 0) as market_value
    from accounts a
    join households h using (household_id)
    left join account_value v using (account_id)
),
household_value as (
    select household_id, sum(market_value) as household_market_value from scanned group by all
),
tiers as (
    select * from {{ ref('drift_policy') }} where as_of = $as_of and rule <> 'tax_sensitive'
)
select
    $as_of::date as as_of,
    s.*,
    hv.household_market_value,
    t.rule as tier
from scanned s
join household_value hv using (household_id)
-- min_aum inclusive, max_aum exclusive: exactly $100,000 is standard, exactly $500,000 premium.
left join tiers t
  on hv.household_market_value >= t.min_aum
 and (t.max_aum is null or hv.household_market_value < t.max_aum)
