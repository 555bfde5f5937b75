-- Account restrictions (restrictions.csv): no-buy, no-sell, ERISA class bans, minimum cash.
select
    as_of,
    _line,
    account_id,
    kind,
    value
from {{ source('restrictions') }}
where as_of = $as_of and _type_ok
