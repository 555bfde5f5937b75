-- Accounts with a tax-loss-harvesting opportunity: a lot (part) in a taxable account whose loss
-- over its wash-adjusted basis is at least the policy's threshold. One rule with tlh_candidates
-- (core/tax_lots.harvest_candidates): the same parts (rebal's basis ledger, basis_adjustments,
-- applied), loss = basis − quantity × close unrounded, loss / basis ≥ threshold − tolerance
-- (a lot down exactly 10% counts), loss ≥ tlh_min_loss; both read the policy's figures.
with
policy as (
    select any_value(tlh_loss_threshold) as tlh_loss_threshold,
           any_value(tlh_loss_tolerance) as tlh_loss_tolerance,
           any_value(tlh_min_loss) as tlh_min_loss
    from {{ ref('drift_policy') }} where as_of = $as_of
),
lots as (
    select account_id, symbol, lot_id, quantity::double as quantity, cost_basis::double as cost_basis
    from {{ ref('stg_feed_lots') }} where as_of = $as_of
),
-- Replacement shares rebal's ledger raises (IRC §1091(d)); custodian-adjusted lots are as reported.
replacement_parts as (
    select account_id, lot_id, lot_part, held_quantity, basis_added_held
    from {{ ref('basis_adjustments') }}
    where as_of = $as_of and applied_to_lot
),
replaced as (
    select account_id, lot_id, sum(held_quantity) as held_quantity from replacement_parts group by all
),
parts as (
    select l.account_id, l.symbol, l.lot_id,
           l.quantity - coalesce(r.held_quantity, 0) as quantity,
           l.cost_basis * (l.quantity - coalesce(r.held_quantity, 0)) / l.quantity as cost_basis
    from lots l left join replaced r using (account_id, lot_id)
    union all
    select l.account_id, l.symbol, l.lot_id,
           p.held_quantity as quantity,
           l.cost_basis * p.held_quantity / l.quantity + p.basis_added_held as cost_basis
    from replacement_parts p join lots l using (account_id, lot_id)
),
valued as (
    select parts.*, parts.cost_basis - parts.quantity * p.close::double as loss
    from parts
    join {{ ref('stg_feed_prices') }} p on p.symbol = parts.symbol and p.as_of = $as_of
    where parts.quantity > 1e-9 and parts.cost_basis > 0
)
select
    $as_of::date as as_of,
    v.account_id,
    count(*) as harvestable_lots,
    sum(v.loss) as harvestable_loss
from valued v
join {{ ref('holdings') }} h
  on h.account_id = v.account_id and h.symbol = v.symbol and h.as_of = $as_of
cross join policy
where h.account_type = 'taxable'
  and v.loss > 0
  and v.loss / v.cost_basis >= policy.tlh_loss_threshold - policy.tlh_loss_tolerance
  and v.loss >= policy.tlh_min_loss
group by all
