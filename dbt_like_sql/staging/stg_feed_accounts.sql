-- Client accounts (accounts.csv), typed. advisor_id is the optional per-account override.
select
    as_of,
    _line,
    account_id,
    household_id,
    client_name,
    client_email,
    custodian,
    account_type,
    discretionary = 'true' as discretionary,
    tax_sensitive = 'true' as tax_sensitive,
    suspended = 'true' as suspended,
    suspended_reason,
    model_id,
    advisor_id as advisor_override_id,
    -- empty = the policy's default lot relief method
    nullif(lot_relief_method, '') as lot_relief_method
from {{ source('accounts') }}
where as_of = $as_of and _type_ok
