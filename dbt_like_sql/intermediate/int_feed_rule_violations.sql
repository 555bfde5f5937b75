-- Row-level rule violations across the feed (docs/feed_contract.md): negative quantities, unknown
-- symbols and accounts, prices <= 0, lots not summing to positions, targets not summing to 1.
-- Each names the file, line, column and reason; int_feed_problems restores the value exactly
-- as written in the file; int_held_accounts maps them to accounts.
with
accounts as (select * from {{ ref('stg_feed_accounts') }} where as_of = $as_of),
households as (select * from {{ ref('stg_feed_households') }} where as_of = $as_of),
users as (select * from {{ ref('stg_feed_users') }} where as_of = $as_of),
securities as (select * from {{ ref('stg_feed_securities') }} where as_of = $as_of),
prices as (select * from {{ ref('stg_feed_prices') }} where as_of = $as_of),
positions as (select * from {{ ref('stg_feed_positions') }} where as_of = $as_of),
lots as (select * from {{ ref('stg_feed_lots') }} where as_of = $as_of),
models as (select * from {{ ref('stg_feed_models') }} where as_of = $as_of),
ips_targets as (select * from {{ ref('stg_feed_ips_targets') }} where as_of = $as_of),
restrictions as (select * from {{ ref('stg_feed_restrictions') }} where as_of = $as_of),
transactions as (select * from {{ ref('stg_feed_transactions') }} where as_of = $as_of),

lot_totals as (
    select account_id, symbol, sum(quantity) as lot_quantity, count(*) as lot_count
    from lots group by all
),

violations as (
    -- positions.csv ---------------------------------------------------------------------
    select 'positions.csv' as file, _line as line, 'quantity' as "column", quantity::varchar as value,
        'negative quantity' as reason, account_id, null as household_id, null as model_id, symbol,
        null as scope, null as scope_id
    from positions where quantity < 0
    union all
    select 'positions.csv', _line, 'account_id', account_id, 'unknown account_id (not in accounts.csv)',
        account_id, null, null, symbol, null, null
    from positions anti join accounts using (account_id)
    union all
    select 'positions.csv', _line, 'symbol', symbol, 'unknown symbol (not in securities.csv)',
        account_id, null, null, symbol, null, null
    from positions anti join securities using (symbol)
    union all
    select 'positions.csv', p._line, 'symbol', p.symbol, 'no close price for symbol in prices.csv',
        p.account_id, null, null, p.symbol, null, null
    from positions p semi join securities s on s.symbol = p.symbol
    anti join prices pr on pr.symbol = p.symbol
    union all
    -- Lots reconcile to positions: lots of one account/symbol sum to the position.
    -- Cash (security_type cash) is dollars and has no lots.
    select 'positions.csv', p._line, 'quantity', p.quantity::varchar,
        case when t.lot_quantity is null then 'no lots for this position in lots.csv'
             else 'lots sum to ' || t.lot_quantity::double::varchar || ' (' || t.lot_count::varchar
                  || case when t.lot_count = 1 then ' lot' else ' lots' end
                  || ') but the position is ' || p.quantity::double::varchar end,
        p.account_id, null, null, p.symbol, null, null
    from positions p
    join securities s on s.symbol = p.symbol and s.security_type <> 'cash'
    left join lot_totals t on t.account_id = p.account_id and t.symbol = p.symbol
    where t.lot_quantity is null or t.lot_quantity <> p.quantity
    union all
    -- lots.csv --------------------------------------------------------------------------
    select 'lots.csv', _line, 'quantity', quantity::varchar, 'lot quantity must be greater than 0',
        account_id, null, null, symbol, null, null
    from lots where quantity <= 0
    union all
    select 'lots.csv', _line, 'cost_basis', cost_basis::varchar, 'negative cost basis',
        account_id, null, null, symbol, null, null
    from lots where cost_basis < 0
    union all
    select 'lots.csv', _line, 'open_date', open_date::varchar, 'lot opened after the as-of date',
        account_id, null, null, symbol, null, null
    from lots where open_date > $as_of
    union all
    select 'lots.csv', l._line, 'symbol', l.symbol, 'lot for a symbol the account holds no position in',
        l.account_id, null, null, l.symbol, null, null
    from lots l anti join positions p on p.account_id = l.account_id and p.symbol = l.symbol
    union all
    -- prices.csv ------------------------------------------------------------------------
    select 'prices.csv', _line, 'close', close::varchar, 'price must be greater than 0',
        null, null, null, symbol, null, null
    from prices where close <= 0
    union all
    select 'prices.csv', pr._line, 'close', pr.close::varchar, 'cash must have price 1',
        null, null, null, pr.symbol, null, null
    from prices pr join securities s on s.symbol = pr.symbol and s.security_type = 'cash'
    where pr.close <> 1
    union all
    -- households.csv --------------------------------------------------------------------
    select 'households.csv', h._line, 'advisor_id', h.advisor_id, 'advisor_id is not a user with role advisor',
        null, h.household_id, null, null, null, null
    from households h anti join users u on u.user_id = h.advisor_id and u.role = 'advisor'
    union all
    select 'households.csv', _line, 'federal_ordinary_rate', federal_ordinary_rate::varchar,
        'tax rate must be a fraction between 0 and 1', null, household_id, null, null, null, null
    from households where federal_ordinary_rate not between 0 and 1
    union all
    select 'households.csv', _line, 'federal_ltcg_rate', federal_ltcg_rate::varchar,
        'tax rate must be a fraction between 0 and 1', null, household_id, null, null, null, null
    from households where federal_ltcg_rate not between 0 and 1
    union all
    select 'households.csv', _line, 'state_rate', state_rate::varchar,
        'tax rate must be a fraction between 0 and 1', null, household_id, null, null, null, null
    from households where state_rate not between 0 and 1
    union all
    -- accounts.csv ----------------------------------------------------------------------
    select 'accounts.csv', a._line, 'household_id', a.household_id, 'unknown household_id (not in households.csv)',
        a.account_id, null, null, null, null, null
    from accounts a anti join households h using (household_id)
    union all
    select 'accounts.csv', a._line, 'model_id', a.model_id, 'unknown model_id (not in models.csv)',
        a.account_id, null, null, null, null, null
    from accounts a
    where a.model_id is not null and a.model_id not in (select model_id from models)
    union all
    select 'accounts.csv', a._line, 'model_id', '', 'no model_id and no account-scope IPS target',
        a.account_id, null, null, null, null, null
    from accounts a
    where a.model_id is null
      and a.account_id not in (select scope_id from ips_targets where scope = 'account')
    union all
    select 'accounts.csv', a._line, 'advisor_id', a.advisor_override_id, 'advisor_id is not a user with role advisor',
        a.account_id, null, null, null, null, null
    from accounts a
    where a.advisor_override_id is not null
      and a.advisor_override_id not in (select user_id from users where role = 'advisor')
    union all
    select 'accounts.csv', _line, 'suspended_reason', '', 'suspended account without a suspended_reason',
        account_id, null, null, null, null, null
    from accounts where suspended and coalesce(suspended_reason, '') = ''
    union all
    -- models.csv ------------------------------------------------------------------------
    select 'models.csv', _line, 'weight', weight::varchar, 'weight must be between 0 and 1',
        null, null, model_id, symbol, null, null
    from models where weight not between 0 and 1
    union all
    select 'models.csv', m._line, 'symbol', m.symbol, 'unknown symbol (not in securities.csv)',
        null, null, m.model_id, m.symbol, null, null
    from models m anti join securities s using (symbol)
    union all
    select 'models.csv', m._line, 'weight', m.weight::varchar,
        'model ' || m.model_id || ' weights sum to ' || t.total::double::varchar || ', not 1',
        null, null, m.model_id, m.symbol, null, null
    from models m
    join (select model_id, sum(weight) as total from models group by all having sum(weight) <> 1) t
      using (model_id)
    union all
    -- ips_targets.csv -------------------------------------------------------------------
    select 'ips_targets.csv', _line, 'target_weight', target_weight::varchar, 'target weight must be between 0 and 1',
        null, null, null, null, scope, scope_id
    from ips_targets where target_weight not between 0 and 1
    union all
    select 'ips_targets.csv', i._line, 'target_weight', i.target_weight::varchar,
        'targets for ' || i.scope || ' ' || i.scope_id || ' sum to ' || t.total::double::varchar || ', not 1',
        null, null, null, null, i.scope, i.scope_id
    from ips_targets i
    join (select scope, scope_id, sum(target_weight) as total from ips_targets group by all
          having sum(target_weight) <> 1) t using (scope, scope_id)
    union all
    select 'ips_targets.csv', i._line, 'scope_id', i.scope_id, 'unknown ' || i.scope || ' (scope_id not in the feed)',
        null, null, null, null, i.scope, i.scope_id
    from ips_targets i
    where (i.scope = 'account' and i.scope_id not in (select account_id from accounts))
       or (i.scope = 'household' and i.scope_id not in (select household_id from households))
    union all
    -- restrictions.csv ------------------------------------------------------------------
    select 'restrictions.csv', r._line, 'account_id', r.account_id, 'unknown account_id (not in accounts.csv)',
        r.account_id, null, null, null, null, null
    from restrictions r anti join accounts a using (account_id)
    union all
    select 'restrictions.csv', _line, 'value', value, 'no_asset_class needs an asset class (equity, fixed_income, alternatives, cash)',
        account_id, null, null, null, null, null
    from restrictions where kind = 'no_asset_class' and value not in ('equity', 'fixed_income', 'alternatives', 'cash')
    union all
    select 'restrictions.csv', _line, 'value', value, 'min_cash_weight needs a fraction between 0 and 1',
        account_id, null, null, null, null, null
    from restrictions
    where kind = 'min_cash_weight'
      and coalesce(try_cast(value as decimal(18, 8)) between 0 and 1, false) = false
    union all
    select 'restrictions.csv', r._line, 'value', r.value, 'unknown symbol (not in securities.csv)',
        r.account_id, null, null, null, null, null
    from restrictions r
    where r.kind in ('no_buy_symbol', 'no_sell_symbol') and r.value not in (select symbol from securities)
    union all
    -- transactions.csv ------------------------------------------------------------------
    select 'transactions.csv', _line, 'quantity', quantity::varchar,
        'negative quantity (the type says buy or sell)', account_id, null, null, symbol, null, null
    from transactions where quantity < 0
    union all
    select 'transactions.csv', _line, 'price', price::varchar, 'price must be greater than 0 for a buy, sell or reinvest',
        account_id, null, null, symbol, null, null
    from transactions where price <= 0 and transaction_type in ('buy', 'sell', 'reinvest')
    union all
    select 'transactions.csv', t._line, 'symbol', t.symbol, 'unknown symbol (not in securities.csv)',
        t.account_id, null, null, t.symbol, null, null
    from transactions t anti join securities s using (symbol)
    union all
    select 'transactions.csv', _line, 'trade_date', trade_date::varchar, 'trade date after the as-of date',
        account_id, null, null, symbol, null, null
    from transactions where trade_date > $as_of
    union all
    select 'transactions.csv', _line, 'cost_basis', cost_basis::varchar, 'negative cost basis',
        account_id, null, null, symbol, null, null
    from transactions where cost_basis < 0
    union all
    select 'transactions.csv', _line, 'acquired_date', acquired_date::varchar,
        'shares acquired after the date they were sold', account_id, null, null, symbol, null, null
    from transactions where acquired_date > trade_date
    union all
    -- A transaction of an account the feed does not have: its wash-sale history would be lost
    -- without anyone knowing (it used to be ignored silently).
    select 'transactions.csv', t._line, 'account_id', t.account_id, 'unknown account_id (not in accounts.csv)',
        t.account_id, null, null, t.symbol, null, null
    from transactions t anti join accounts a using (account_id)
    union all
    -- Plausibility limits (docs/feed_contract.md, core/feed_contract.py PlausibilityLimits): values
    -- the decimal format admits but no real feed has. Rejected like any bad row, so the account is
    -- held out with the reason and the rest of the book is sized, taxed and published as usual.
    select 'positions.csv', _line, 'quantity', quantity::varchar,
        'quantity above the plausibility limit of {{ limits.max_quantity }}', account_id, null, null, symbol, null, null
    from positions where quantity > {{ limits.max_quantity }}
    union all
    select 'lots.csv', _line, 'quantity', quantity::varchar,
        'lot quantity above the plausibility limit of {{ limits.max_quantity }}', account_id, null, null, symbol, null, null
    from lots where quantity > {{ limits.max_quantity }}
    union all
    select 'lots.csv', _line, 'cost_basis', cost_basis::varchar,
        'cost basis above the plausibility limit of ${{ limits.max_cost_basis }}', account_id, null, null, symbol, null, null
    from lots where cost_basis > {{ limits.max_cost_basis }}
    union all
    select 'transactions.csv', _line, 'quantity', quantity::varchar,
        'quantity above the plausibility limit of {{ limits.max_quantity }}', account_id, null, null, symbol, null, null
    from transactions where quantity > {{ limits.max_quantity }}
    union all
    select 'transactions.csv', _line, 'price', price::varchar,
        'price above the plausibility limit of ${{ limits.max_price }}', account_id, null, null, symbol, null, null
    from transactions where price > {{ limits.max_price }}
    union all
    select 'transactions.csv', _line, 'quantity', quantity::varchar,
        'transaction value ' || printf('$%.2f', quantity::double * price::double)
            || ' above the plausibility limit of ${{ limits.max_account_value }}', account_id, null, null, symbol, null, null
    from transactions
    where quantity::double * price::double > {{ limits.max_account_value }}
      and quantity <= {{ limits.max_quantity }} and price <= {{ limits.max_price }}
    union all
    select 'transactions.csv', _line, 'cost_basis', cost_basis::varchar,
        'cost basis above the plausibility limit of ${{ limits.max_cost_basis }}', account_id, null, null, symbol, null, null
    from transactions where cost_basis > {{ limits.max_cost_basis }}
    union all
    select 'prices.csv', _line, 'close', close::varchar,
        'price above the plausibility limit of ${{ limits.max_price }}', null, null, null, symbol, null, null
    from prices where close > {{ limits.max_price }}
    union all
    select 'prices.csv', pr._line, 'close', pr.close::varchar,
        'price below the plausibility limit of ${{ limits.min_price }} (rebal does not size trades in sub-penny prices)',
        null, null, null, pr.symbol, null, null
    from prices pr
    anti join (select symbol from securities where security_type = 'cash') c using (symbol)
    where pr.close > 0 and pr.close < {{ limits.min_price }}
    union all
    -- One account's market value, reported on its largest position.
    select 'positions.csv', line, 'quantity', quantity::varchar,
        'account market value ' || printf('$%.2f', account_value)
            || ' above the plausibility limit of ${{ limits.max_account_value }}',
        account_id, null, null, symbol, null, null
    from (
        select p._line as line, p.quantity, p.account_id, p.symbol,
               sum(p.quantity::double * pr.close::double) over (partition by p.account_id) as account_value,
               row_number() over (partition by p.account_id
                                  order by p.quantity::double * pr.close::double desc, p._line) as rank
        from positions p join prices pr using (symbol)
    )
    where rank = 1 and account_value > {{ limits.max_account_value }}
)

select $as_of::date as as_of, *
from violations
