-- Model portfolios at security level (models.csv), typed.
select
    as_of,
    _line,
    model_id,
    symbol,
    cast(weight as decimal(18, 8)) as weight
from {{ source('models') }}
where as_of = $as_of and _type_ok
