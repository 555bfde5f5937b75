-- Recent transactions (transactions.csv), typed: the wash-sale look-back window.
select
    as_of,
    _line,
    account_id,
    symbol,
    cast(trade_date as date) as trade_date,
    type as transaction_type,
    cast(quantity as decimal(18, 8)) as quantity,
    cast(price as decimal(18, 8)) as price,
    -- sells: basis and acquisition date of the shares sold (for the wash-sale check)
    cast(nullif(cost_basis, '') as decimal(18, 8)) as cost_basis,
    cast(nullif(acquired_date, '') as date) as acquired_date
from {{ source('transactions') }}
where as_of = $as_of and _type_ok
