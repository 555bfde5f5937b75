-- Drift by asset class: current weight minus target weight, at account scope for every
-- scanned account and at household scope for households rebalanced as one.
-- A class breaches when |drift| exceeds its band (strictly: exactly at the band is inside).
-- Bands come from the versioned drift policy: the tier's band, or the tighter tax-sensitive
-- band; with a relative band configured, also |drift| > relative_band × target.
with
policy as (select * from {{ ref('drift_policy') }} where as_of = $as_of),
scanned as (select * from {{ ref('int_scanned_accounts') }} where as_of = $as_of and market_value > 0),
holdings as (select * from {{ ref('holdings') }} where as_of = $as_of),

account_scope as (
    select 'account' as scope, account_id as scope_id, household_id, tier, tax_sensitive,
           market_value as scope_market_value, account_id
    from scanned
),
household_scope as (
    select 'household' as scope, household_id as scope_id, household_id, any_value(tier) as tier,
           bool_or(tax_sensitive) as tax_sensitive, sum(market_value) as scope_market_value,
           null as account_id
    from scanned
    where aggregate_rebalancing and not suspended
    group by household_id
    having household_id in (select household_id from {{ ref('int_household_targets') }} where as_of = $as_of)
),
scopes as (select * from account_scope union all select * from household_scope),

class_value as (
    select 'account' as scope, account_id as scope_id, asset_class, sum(market_value) as market_value
    from holdings where account_id in (select account_id from scanned) group by all
    union all
    select 'household', h.household_id, h.asset_class, sum(h.market_value)
    from holdings h
    join scanned s on s.account_id = h.account_id and s.aggregate_rebalancing and not s.suspended
    group by all
),
targets as (
    select 'account' as scope, account_id as scope_id, asset_class, target_weight, target_source
    from {{ ref('int_account_targets') }} where as_of = $as_of
    union all
    select 'household', household_id, asset_class, target_weight, target_source
    from {{ ref('int_household_targets') }} where as_of = $as_of
),
classes as (
    select scope, scope_id, asset_class from class_value
    union
    select scope, scope_id, asset_class from targets
),
weights as (
    select
        sc.scope, sc.scope_id, sc.household_id, c.asset_class, sc.tier, sc.tax_sensitive,
        sc.scope_market_value,
        coalesce(cv.market_value, 0) as market_value,
        coalesce(cv.market_value, 0)::double / sc.scope_market_value::double as current_weight,
        coalesce(t.target_weight, 0) as target_weight,
        max(t.target_source) over (partition by sc.scope, sc.scope_id) as target_source
    from scopes sc
    join classes c on c.scope = sc.scope and c.scope_id = sc.scope_id
    left join class_value cv on cv.scope = c.scope and cv.scope_id = c.scope_id and cv.asset_class = c.asset_class
    left join targets t on t.scope = c.scope and t.scope_id = c.scope_id and t.asset_class = c.asset_class
),
banded as (
    select
        w.*,
        w.current_weight - w.target_weight as drift,
        case
            when w.tax_sensitive then ts.band
            when tier.relative_band is not null and w.target_weight > 0
                then least(tier.band, tier.relative_band * w.target_weight)
            else tier.band
        end as band,
        tier.policy_version
    from weights w
    join policy tier on tier.rule = w.tier
    join policy ts on ts.rule = 'tax_sensitive'
)
select
    $as_of::date as as_of,
    scope, scope_id, household_id, asset_class,
    market_value, scope_market_value,
    current_weight, target_weight, drift, band,
    -- Exactly at the band is inside; the 1e-9 absorbs binary floating point (0.65 - 0.6).
    abs(drift) - band > 1e-9 as breached,
    tier, tax_sensitive, target_source, policy_version
from banded
