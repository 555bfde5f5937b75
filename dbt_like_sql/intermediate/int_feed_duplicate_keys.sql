-- Rows whose key appears more than once in their feed file. Which copy is right cannot be
-- known, so every copy is rejected and the account is held out (never "keep the first").
{% for f in feed_files if f.key %}
{% if not loop.first %}union all{% endif %}
select
    as_of,
    {{ literal(f.filename) }} as file,
    _line as line,
    {{ literal(f.key | join(',')) }} as "column",
    concat_ws('|', {% for k in f.key %}{{ quote(k) }}{% if not loop.last %}, {% endif %}{% endfor %}) as value,
    'duplicate key: ' || (count(*) over (partition by {% for k in f.key %}{{ quote(k) }}{% if not loop.last %}, {% endif %}{% endfor %}))::varchar
        || ' rows share it' as reason,
    {% for c in reference_columns %}{% if c in f.column_names %}{{ quote(c) }}{% else %}null::varchar{% endif %} as {{ quote(c) }}{% if not loop.last %}, {% endif %}{% endfor %}
from {{ source(f.name) }}
where as_of = $as_of
qualify count(*) over (partition by {% for k in f.key %}{{ quote(k) }}{% if not loop.last %}, {% endif %}{% endfor %}) > 1
{% endfor %}
