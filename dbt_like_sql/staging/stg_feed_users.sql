-- Advisors, compliance officers, trading desk and operations staff (users.csv), typed.
select
    as_of,
    _line,
    user_id,
    name,
    email,
    role,
    nullif(team_of, '') as team_of
from {{ source('users') }}
where as_of = $as_of and _type_ok
