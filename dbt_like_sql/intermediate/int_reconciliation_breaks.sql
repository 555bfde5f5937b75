-- Position reconciliation breaks: for each account/symbol, today's quantity against the quantity
-- of the previous as-of date (the latest earlier partition of stg_feed_positions), explained by
-- today's feed's transactions dated after that date and up to today (buy, reinvest, transfer_in
-- add; sell, transfer_out subtract). A change the transactions do not explain, beyond 1e-6
-- shares, is a break. No previous partition (first day): no rows. Not reconciled: CASH amounts (the
-- feed has no cash ledger: dividends, fees, interest and deposits are not transactions; only a cash
-- position that vanishes without any transaction is a break, below), accounts not
-- in both days' accounts.csv (opened or closed), and account/symbols whose positions or
-- transactions rows were rejected (they already have a data-quality alert).
with
previous_day as (
    select max(as_of) as previous_as_of
    from {{ ref('stg_feed_positions') }}
    where as_of < $as_of
),
today_positions as (
    select account_id, symbol, sum(quantity) as quantity
    from {{ ref('stg_feed_positions') }}
    where as_of = $as_of and symbol <> 'CASH'
    group by all
),
previous_positions as (
    select p.account_id, p.symbol, sum(p.quantity) as quantity
    from {{ ref('stg_feed_positions') }} p
    join previous_day d on p.as_of = d.previous_as_of
    where p.symbol <> 'CASH'
    group by all
),
transactions as (
    select
        t.account_id,
        t.symbol,
        sum(case
            when t.transaction_type in ('buy', 'reinvest', 'transfer_in') then t.quantity
            when t.transaction_type in ('sell', 'transfer_out') then -t.quantity
            else 0
        end) as explained_change,
        count(*) as transaction_count
    from {{ ref('stg_feed_transactions') }} t
    join previous_day d on t.trade_date > d.previous_as_of
    where t.as_of = $as_of and t.trade_date <= $as_of and t.symbol <> 'CASH'
    group by all
),
accounts_both_days as (
    select account_id from {{ ref('stg_feed_accounts') }} where as_of = $as_of
    intersect
    select a.account_id
    from {{ ref('stg_feed_accounts') }} a
    join previous_day d on a.as_of = d.previous_as_of
),
rejected as (
    -- a null symbol (e.g. an unreadable symbol cell) excludes the whole account
    select p.account_id, p.symbol
    from {{ ref('int_feed_problems') }} p
    where p.as_of = $as_of and p.file in ('positions.csv', 'transactions.csv') and p.account_id is not null
    union
    select p.account_id, p.symbol
    from {{ ref('int_feed_problems') }} p
    join previous_day d on p.as_of = d.previous_as_of
    where p.file = 'positions.csv' and p.account_id is not null
),
account_symbols as (
    select account_id, symbol from today_positions
    union
    select account_id, symbol from previous_positions
    union
    select account_id, symbol from transactions
),
reconciled as (
    select
        k.account_id,
        k.symbol,
        d.previous_as_of,
        pp.quantity is not null as held_before,
        tp.quantity is not null as held_now,
        coalesce(pp.quantity, 0) as previous_quantity,
        coalesce(tp.quantity, 0) as quantity,
        coalesce(t.explained_change, 0) as explained_change,
        coalesce(t.transaction_count, 0) as transaction_count
    from account_symbols k
    cross join previous_day d
    left join today_positions tp using (account_id, symbol)
    left join previous_positions pp using (account_id, symbol)
    left join transactions t using (account_id, symbol)
    where d.previous_as_of is not null
      and k.account_id in (select account_id from accounts_both_days)
      and not exists (
          select 1 from rejected r
          where r.account_id = k.account_id and (r.symbol is null or r.symbol = k.symbol)
      )
),
-- Cash is not reconciled by amount (see above), but a cash position that was there on the
-- previous day and is gone today, in an account with no transaction at all since then, is a
-- break: a missing CASH row would otherwise scan the account as fully invested.
vanished_cash as (
    select p.account_id, 'CASH' as symbol, d.previous_as_of, sum(p.quantity) as previous_quantity
    from {{ ref('stg_feed_positions') }} p
    join previous_day d on p.as_of = d.previous_as_of
    where p.symbol = 'CASH'
    group by all
    having sum(p.quantity) <> 0
),
cash_breaks as (
    select v.*
    from vanished_cash v
    where v.account_id in (select account_id from accounts_both_days)
      and v.account_id not in (
          select account_id from {{ ref('stg_feed_positions') }} where as_of = $as_of and symbol = 'CASH')
      and v.account_id not in (
          select t.account_id from {{ ref('stg_feed_transactions') }} t join previous_day d on t.trade_date > d.previous_as_of
          where t.as_of = $as_of and t.trade_date <= $as_of)
      and not exists (
          select 1 from rejected r
          where r.account_id = v.account_id and (r.symbol is null or r.symbol = 'CASH')
      )
)
select
    $as_of::date as as_of,
    account_id,
    symbol,
    previous_as_of,
    held_before,
    held_now,
    previous_quantity,
    quantity,
    explained_change,
    transaction_count,
    quantity - previous_quantity - explained_change as unexplained_change
from reconciled
where abs(quantity - previous_quantity - explained_change) > 0.000001
union all
select $as_of::date, account_id, symbol, previous_as_of, true, false, previous_quantity, 0, 0, 0, -previous_quantity
from cash_breaks
