-- Client households (households.csv), typed: advisor of record and tax rates.
select
    as_of,
    _line,
    household_id,
    name as household_name,
    advisor_id,
    aggregate_rebalancing = 'true' as aggregate_rebalancing,
    cast(federal_ordinary_rate as decimal(18, 8)) as federal_ordinary_rate,
    cast(federal_ltcg_rate as decimal(18, 8)) as federal_ltcg_rate,
    cast(state_rate as decimal(18, 8)) as state_rate,
    nullif(confirmation_style, '') as confirmation_style
from {{ source('households') }}
where as_of = $as_of and _type_ok
