-- Cost-basis lots (lots.csv), typed. cost_basis is the lot's total dollars.
select
    as_of,
    _line,
    account_id,
    symbol,
    lot_id,
    cast(open_date as date) as open_date,
    cast(quantity as decimal(18, 8)) as quantity,
    cast(cost_basis as decimal(18, 8)) as cost_basis,
    -- true: the custodian already added a disallowed wash-sale loss to this basis
    coalesce(wash_sale_adjusted = 'true', false) as wash_sale_adjusted
from {{ source('lots') }}
where as_of = $as_of and _type_ok
