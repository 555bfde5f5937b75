-- Accounts with a tax-loss-harvesting opportunity: a lot in a taxable account whose market
-- value is down by at least the policy's threshold from its cost basis.
with
policy as (
    select any_value(tlh_loss_threshold) as tlh_loss_threshold
    from {{ ref('drift_policy') }} where as_of = $as_of
)
select
    $as_of::date as as_of,
    l.account_id,
    count(*) as harvestable_lots,
    sum(l.cost_basis::double - l.quantity::double * p.close::double) as harvestable_loss
from {{ ref('stg_feed_lots') }} l
join {{ ref('holdings') }} h
  on h.account_id = l.account_id and h.symbol = l.symbol and h.as_of = $as_of
join {{ ref('stg_feed_prices') }} p on p.symbol = l.symbol and p.as_of = $as_of
cross join policy
where l.as_of = $as_of
  and h.account_type = 'taxable'
  and l.cost_basis > 0
  and (l.cost_basis::double - l.quantity::double * p.close::double) / l.cost_basis::double >= policy.tlh_loss_threshold
group by all
