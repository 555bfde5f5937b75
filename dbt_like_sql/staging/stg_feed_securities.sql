-- The security master (securities.csv): asset class, type, wash-sale group, TLH substitute.
select
    as_of,
    _line,
    symbol,
    cusip,
    description,
    asset_class,
    security_type,
    wash_group,
    tlh_substitute,
    fractional = 'true' as fractional
from {{ source('securities') }}
where as_of = $as_of and _type_ok
