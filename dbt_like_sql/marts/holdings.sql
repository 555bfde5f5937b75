-- What each account holds at the close of the as-of date, priced: one row per account and
-- symbol. Accounts held out for data quality are not here (see data_quality_alerts).
with
positions as (
    select p.* from {{ ref('stg_feed_positions') }} p
    anti join {{ ref('int_held_accounts') }} held
      on held.account_id = p.account_id and held.as_of = $as_of
    where p.as_of = $as_of
),
lot_totals as (
    select account_id, symbol, sum(quantity) as lot_quantity
    from {{ ref('stg_feed_lots') }} where as_of = $as_of group by all
)
select
    $as_of::date as as_of,
    a.household_id,
    p.account_id,
    a.account_type,
    p.symbol,
    s.asset_class,
    s.security_type,
    p.quantity,
    pr.close as price,
    -- Market value for drift is analytic (weights), so it is a double: exact DECIMAL(38)
    -- products cost ~10x more over a whole book. Exact cents are computed where money
    -- changes hands (tax lots, trade tickets), on far fewer rows.
    p.quantity::double * pr.close::double as market_value,
    -- Cash is dollars, not lots: it reconciles to itself.
    case when s.security_type = 'cash' then p.quantity else coalesce(t.lot_quantity, 0) end as lot_quantity
from positions p
join {{ ref('stg_feed_accounts') }} a on a.account_id = p.account_id and a.as_of = $as_of
join {{ ref('stg_feed_securities') }} s on s.symbol = p.symbol and s.as_of = $as_of
left join {{ ref('stg_feed_prices') }} pr on pr.symbol = p.symbol and pr.as_of = $as_of
left join lot_totals t on t.account_id = p.account_id and t.symbol = p.symbol
