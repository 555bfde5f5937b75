-- Targets of households rebalanced as one (aggregate_rebalancing): the household's own IPS
-- targets when given, otherwise the market-value-weighted blend of its accounts' targets.
-- Suspended accounts cannot be traded, so they take no part in the household's rebalance.
with
members as (
    select * from {{ ref('int_scanned_accounts') }}
    where as_of = $as_of and aggregate_rebalancing and not suspended
),
household_ips as (
    select scope_id as household_id, asset_class, target_weight::double as target_weight
    from {{ ref('stg_feed_ips_targets') }}
    where as_of = $as_of and scope = 'household'
),
member_value as (
    select household_id, sum(market_value) as total from members group by all
),
blended as (
    select m.household_id, t.asset_class,
           sum(t.target_weight * m.market_value::double) / nullif(any_value(v.total)::double, 0) as target_weight
    from members m
    join {{ ref('int_account_targets') }} t on t.account_id = m.account_id and t.as_of = $as_of
    join member_value v using (household_id)
    group by all
)
select $as_of::date as as_of, household_id, asset_class, target_weight, 'household_ips' as target_source
from household_ips
where household_id in (select household_id from members)
union all
select $as_of::date, household_id, asset_class, target_weight, 'blend_of_account_targets'
from blended
where household_id not in (select household_id from household_ips)
  and target_weight is not null
