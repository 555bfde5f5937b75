-- Each scanned account's asset-class targets: its own IPS targets when it has them, otherwise
-- its model's security weights rolled up to asset classes.
with
accounts as (
    select s.account_id, a.model_id
    from {{ ref('int_scanned_accounts') }} s
    join {{ ref('stg_feed_accounts') }} a on a.account_id = s.account_id and a.as_of = $as_of
    where s.as_of = $as_of
),
ips as (
    select scope_id as account_id, asset_class, target_weight
    from {{ ref('stg_feed_ips_targets') }}
    where as_of = $as_of and scope = 'account'
),
model_classes as (
    select m.model_id, s.asset_class, sum(m.weight) as target_weight
    from {{ ref('stg_feed_models') }} m
    join {{ ref('stg_feed_securities') }} s on s.symbol = m.symbol and s.as_of = $as_of
    where m.as_of = $as_of
    group by all
)
select $as_of::date as as_of, a.account_id, ips.asset_class,
       ips.target_weight::double as target_weight, 'account_ips' as target_source
from accounts a join ips using (account_id)
union all
select $as_of::date, a.account_id, mc.asset_class, mc.target_weight::double, 'model:' || a.model_id
from accounts a join model_classes mc using (model_id)
where a.account_id not in (select account_id from ips)
