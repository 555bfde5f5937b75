-- A version id for each model portfolio: a hash of its security weights. When models.csv
-- changes a weight or adds a security, the version changes, so every linked account's
-- recommendation is regenerated and records the model version it was built from.
select
    $as_of::date as as_of,
    model_id,
    count(*) as securities,
    substr(sha256(string_agg(symbol || '=' || weight::varchar, ';' order by symbol)), 1, 16) as model_version
from {{ ref('stg_feed_models') }}
where as_of = $as_of
group by model_id
