-- Recent transactions (transactions.csv), typed: the wash-sale look-back window.
select
    as_of,
    _line,
    account_id,
    symbol,
    cast(trade_date as date) as trade_date,
    type as transaction_type,
    cast(quantity as decimal(18, 8)) as quantity,
    cast(price as decimal(18, 8)) as price
from {{ source('transactions') }}
where as_of = $as_of and _type_ok
