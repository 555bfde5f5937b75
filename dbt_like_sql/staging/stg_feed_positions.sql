-- Positions per account and symbol (positions.csv), typed. CASH quantity is dollars.
select
    as_of,
    _line,
    account_id,
    symbol,
    cast(quantity as decimal(18, 8)) as quantity
from {{ source('positions') }}
where as_of = $as_of and _type_ok
