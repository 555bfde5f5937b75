-- One alert per account (or aggregated household) with at least one asset class outside its
-- band, routed to the advisor of record with urgency from the policy. Households rebalanced
-- as one are alerted at household scope only. Suspended accounts are not alerted: their
-- breach is kept here with status 'skipped' and the reason, so nothing disappears silently.
with
policy as (select * from {{ ref('drift_policy') }} where as_of = $as_of),
drift as (select * from {{ ref('drift') }} where as_of = $as_of),
scanned as (select * from {{ ref('int_scanned_accounts') }} where as_of = $as_of),
alert_scopes as (
    select 'account' as scope, account_id as scope_id, household_id, advisor_id,
           suspended, suspended_reason, discretionary
    from scanned where not aggregate_rebalancing
    union all
    select 'household', household_id, household_id, any_value(advisor_id order by account_id),
           false, null, bool_and(discretionary)
    from scanned where aggregate_rebalancing and not suspended
    group by household_id
),
breaches as (
    select scope, scope_id,
           any_value(tier) as tier,
           any_value(tax_sensitive) as tax_sensitive,
           any_value(policy_version) as policy_version,
           any_value(scope_market_value) as market_value,
           max(abs(drift)) as max_abs_drift,
           max(band) filter (where breached) as band,
           string_agg(asset_class || ' ' || case when drift > 0 then '+' else '' end
                      || round(drift * 100, 1)::varchar || '%', ', ' order by abs(drift) desc, asset_class)
               filter (where breached) as breached_classes,
           count(*) filter (where breached) as breached_class_count
    from drift group by scope, scope_id
    having bool_or(breached)
)
select
    $as_of::date as as_of,
    md5(concat_ws('|', $as_of::varchar, b.scope, b.scope_id, b.policy_version)) as alert_id,
    b.scope, b.scope_id, s.household_id, s.advisor_id,
    b.tier, b.band,
    case when b.tax_sensitive then ts.urgency else tier.urgency end as urgency,
    case when b.tax_sensitive then ts.delivery else tier.delivery end as delivery,
    b.max_abs_drift, b.breached_classes, b.breached_class_count, b.market_value,
    b.tax_sensitive,
    b.tax_sensitive and coalesce(tlh.harvestable_lots, 0) > 0 as tlh_flag,
    s.suspended,
    s.discretionary,
    case when s.suspended then 'skipped' else 'alert' end as status,
    case when s.suspended then 'suspended: ' || coalesce(s.suspended_reason, 'no reason given') end as skip_reason,
    b.policy_version
from breaches b
join alert_scopes s on s.scope = b.scope and s.scope_id = b.scope_id
join policy tier on tier.rule = b.tier
join policy ts on ts.rule = 'tax_sensitive'
left join (
    -- a household is harvestable when any of its accounts is
    select account_id as scope_id, 'account' as scope, harvestable_lots
    from {{ ref('int_tlh_flags') }} where as_of = $as_of
    union all
    select a.household_id, 'household', sum(t.harvestable_lots)
    from {{ ref('int_tlh_flags') }} t join scanned a using (account_id)
    where t.as_of = $as_of group by all
) tlh on tlh.scope = b.scope and tlh.scope_id = b.scope_id
