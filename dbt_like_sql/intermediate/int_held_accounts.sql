-- Accounts held out of today's recommendations because of a data-quality problem: never
-- silently dropped, always with the reason. A problem reaches an account directly (its own
-- rows), through a household, model or symbol it depends on, or through an aggregated
-- household (which is rebalanced as one, so one bad account holds out all of it). Ids are the
-- ones the problem resolves to (int_feed_problems trims whitespace: 'ACC-1 ' holds out ACC-1).
with
problems as (select * from {{ ref('int_feed_problems') }} where as_of = $as_of),
accounts as (select * from {{ ref('stg_feed_accounts') }} where as_of = $as_of),
households as (select * from {{ ref('stg_feed_households') }} where as_of = $as_of),
positions as (select * from {{ ref('stg_feed_positions') }} where as_of = $as_of),
models as (select * from {{ ref('stg_feed_models') }} where as_of = $as_of),
problem_text as (
    select *, file || ' line ' || line::varchar || ' ' || "column" || ': ' || reason as detail
    from problems
),
direct as (
    select account_id, detail from problem_text where account_id is not null
    union all
    select scope_id, detail from problem_text where scope = 'account'
    union all
    select a.account_id, p.detail
    from problem_text p join accounts a on a.household_id = p.household_id
    where p.file = 'households.csv'
    union all
    select a.account_id, p.detail
    from problem_text p join accounts a on a.household_id = p.scope_id
    where p.scope = 'household'
    union all
    select a.account_id, p.detail
    from problem_text p join accounts a on a.model_id = p.model_id
    where p.file = 'models.csv'
    union all
    select pos.account_id, p.detail
    from problem_text p join positions pos on pos.symbol = p.symbol
    where p.file in ('securities.csv', 'prices.csv')
    union all
    -- ... and the accounts whose model would buy it (sized on a bad price, a trade would be absurd)
    select a.account_id, p.detail
    from problem_text p
    join models m on m.symbol = p.symbol
    join accounts a on a.model_id = m.model_id
    where p.file in ('securities.csv', 'prices.csv')
),
held as (
    select account_id, count(*) as problem_count,
           string_agg(distinct detail, '; ' order by detail) as reasons
    from direct group by all
),
aggregated_siblings as (
    select sibling.account_id, 0 as problem_count,
           'aggregated household ' || a.household_id || ' has held account ' || h.account_id as reasons
    from held h
    join accounts a on a.account_id = h.account_id
    join households hh on hh.household_id = a.household_id and hh.aggregate_rebalancing
    join accounts sibling on sibling.household_id = a.household_id and sibling.account_id <> a.account_id
)
select $as_of::date as as_of, account_id,
       sum(problem_count)::bigint as problem_count,
       string_agg(reasons, '; ' order by reasons) as reasons
from (select * from held union all select * from aggregated_siblings)
group by all
