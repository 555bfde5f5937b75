-- IPS asset-class targets per account or household (ips_targets.csv), typed.
select
    as_of,
    _line,
    scope,
    scope_id,
    asset_class,
    cast(target_weight as decimal(18, 8)) as target_weight
from {{ source('ips_targets') }}
where as_of = $as_of and _type_ok
