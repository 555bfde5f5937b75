-- Reconciliation alerts for operations and the advisor: one per position whose change since the
-- previous as-of date is not explained by the recorded transactions, with the numbers and the
-- reason in plain words. None on the first day (nothing to reconcile against).
{% macro num(x) %}(case when {{ x }} = 0 then '0' else rtrim(rtrim(({{ x }})::varchar, '0'), '.') end){% endmacro %}
{% macro signed(x) %}(case when {{ x }} > 0 then '+' else '' end || {{ num(x) }}){% endmacro %}
with
accounts as (select * from {{ ref('stg_feed_accounts') }} where as_of = $as_of),
households as (select * from {{ ref('stg_feed_households') }} where as_of = $as_of)
select
    $as_of::date as as_of,
    b.account_id,
    a.household_id,
    coalesce(a.advisor_override_id, hh.advisor_id) as advisor_id,
    b.symbol,
    b.previous_as_of,
    b.previous_quantity,
    b.quantity,
    b.explained_change,
    b.unexplained_change,
    b.transaction_count,
    case
        when b.symbol = 'CASH' then
            'Cash position disappeared: ' || b.account_id || ' held $' || {{ num('b.previous_quantity') }}
            || ' in cash on ' || strftime(b.previous_as_of, '%Y-%m-%d') || ' and has no CASH row on '
            || strftime($as_of::date, '%Y-%m-%d') || ', with no transaction recorded between the two dates; '
            || 'the account would be scanned as if it held no cash.'
        else
    case
        when b.held_before and not b.held_now then 'Position disappeared: '
        when not b.held_before and b.held_now then 'New position: '
        when not b.held_before and not b.held_now then 'Transactions without a position: '
        else 'Quantity changed: '
    end
    || b.symbol || ' in ' || b.account_id || ' went from ' || {{ num('b.previous_quantity') }}
    || ' shares on ' || strftime(b.previous_as_of, '%Y-%m-%d') || ' to ' || {{ num('b.quantity') }}
    || ' shares on ' || strftime($as_of::date, '%Y-%m-%d') || '; '
    || case
        when b.transaction_count = 0 then 'no transaction was recorded between the two dates'
        else 'the ' || b.transaction_count::varchar || ' transaction(s) recorded between the two dates explain '
             || {{ signed('b.explained_change') }} || ' shares'
    end
    || ', so ' || {{ signed('b.unexplained_change') }} || ' shares are unexplained.'
    end as reason
from {{ ref('int_reconciliation_breaks') }} b
left join accounts a using (account_id)
left join households hh using (household_id)
where b.as_of = $as_of
