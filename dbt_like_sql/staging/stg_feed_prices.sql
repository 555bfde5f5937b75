-- Closing prices of the as-of date (prices.csv), typed.
select
    as_of,
    _line,
    symbol,
    cast(close as decimal(18, 8)) as close
from {{ source('prices') }}
where as_of = $as_of and _type_ok
