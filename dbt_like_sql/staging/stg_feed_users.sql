-- Advisors, compliance officers, trading desk and operations staff (users.csv), typed.
select
    as_of,
    _line,
    user_id,
    name,
    email,
    role,
    nullif(team_of, '') as team_of,
    -- On an advisor's row: their team (team_of) receives copies of their alerts (empty: not set).
    case team_alerts when 'true' then true when 'false' then false end as team_alerts
from {{ source('users') }}
where as_of = $as_of and _type_ok
