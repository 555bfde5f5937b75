"""Publishing the day's recommendations to the advisor: the packages and the hand-over.

`build_packages` assembles one package per recommendation from the warehouse with a handful of
whole-day queries (no query per recommendation). `publish_recommendations` hands them to the
workflow store in one transaction: users who left are deactivated (their open recommendations go
to today's advisor of record), orders that today's positions show filled release their accounts
(ledger L3), then `lifecycle.publish_day` writes each package as `pending`, superseding
yesterday's open one for the same account/household and closing those back inside their bands.
The `pending_recommendations` asset (defs/workflow/assets.py) calls it; the lifecycle rules live
in workflow/lifecycle.py, the order ledger in workflow/ledger.py.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import date, datetime

from sqlalchemy import Connection

from rebal_pipeline.workflow import ledger, lifecycle
from rebal_pipeline.workflow.package import (
    PackageBand, PackageHolding, PackageRestriction, PackageTrade, RecommendationPackage, TradeRules,
    positions_fingerprint,
)

# Who each recommendation is for: its accounts, advisor, tier, urgency and delivery. Harvests
# are account-scope, routed like the account, and not urgent (medium, within 48h).
RECOMMENDATIONS = """
with recs as (select * from trade_recommendations where as_of = $as_of),
scanned as (select * from int_scanned_accounts where as_of = $as_of),
alerts as (select * from drift_alerts where as_of = $as_of and status = 'alert')
select r.recommendation_id, r.scope, r.scope_id, r.kind, r.model_version, r.inside_bands, r.unresolved,
       r.policy_version, r.compliance_review,
       coalesce(a.advisor_id, s.advisor_id, hs.advisor_id) as advisor_id,
       coalesce(s.household_id, r.scope_id) as household_id,
       coalesce(a.tier, s.tier, hs.tier) as tier,
       case when r.kind = 'harvest' then 'medium' else a.urgency end as urgency,
       case when r.kind = 'harvest' then 'within_48h' else a.delivery end as delivery,
       coalesce(a.discretionary, s.discretionary, false) as discretionary,
       sm.trade_value, sm.st_gain + sm.lt_gain as realized_gain,
       to_json(sm) as tax
from recs r
left join alerts a on a.scope = r.scope and a.scope_id = r.scope_id and r.kind = 'rebalance'
left join scanned s on r.scope = 'account' and s.account_id = r.scope_id
left join (select household_id, any_value(advisor_id order by account_id) as advisor_id, any_value(tier) as tier
           from scanned group by all) hs on r.scope = 'household' and hs.household_id = r.scope_id
left join recommendation_summary sm on sm.recommendation_id = r.recommendation_id and sm.as_of = $as_of
order by r.recommendation_id
"""

# The accounts of each recommendation: the account itself, or the household's tradeable members.
# The accounts of each recommendation: its own account, or the members of its household. Written
# as a union of plain equi-joins: a left join with `r.scope = 'household'` in its condition made
# DuckDB compare every recommendation with every scanned account (99 s at 1M accounts; 1.3 s now).
MEMBERS = """
with recs as (
    select recommendation_id, scope, scope_id from trade_recommendations where as_of = $as_of
),
household_members as (
    select r.recommendation_id, s.account_id
    from recs r
    join int_scanned_accounts s on s.household_id = r.scope_id
    where r.scope = 'household' and s.as_of = $as_of and s.aggregate_rebalancing and not s.suspended
)
select recommendation_id, scope_id as account_id from recs where scope <> 'household'
union all
select recommendation_id, account_id from household_members
union all
select recommendation_id, scope_id from recs
where scope = 'household' and recommendation_id not in (select recommendation_id from household_members)
"""

# Each trade and holding carries the security master's `fractional` and `security_type` (issue 12):
# a modification is validated like a proposal, in whole shares where the security trades whole.
TRADES = """select t.recommendation_id, t.account_id, t.symbol, t.asset_class, t.side, t.quantity, t.est_price,
                   t.est_value, t.reason, t.replaces_symbol, coalesce(t.wash_sale_disallowed, 0) as wash_sale_disallowed,
                   s.fractional, s.security_type
            from trade_proposals t
            left join stg_feed_securities s on s.symbol = t.symbol and s.as_of = $as_of
            where t.as_of = $as_of order by t.recommendation_id, t.account_id, t.side, t.symbol"""

HOLDINGS = """select h.account_id, h.symbol, h.asset_class, h.quantity::double as quantity, h.price::double as price,
                     h.market_value, s.fractional, s.security_type
              from holdings h
              left join stg_feed_securities s on s.symbol = h.symbol and s.as_of = $as_of
              where h.as_of = $as_of and h.account_id in (select account_id from ({members}))
              order by h.account_id, h.symbol"""

# Today's positions of the accounts with open orders (ledger fills: workflow/ledger.py L3).
OPEN_ORDER_POSITIONS = """select account_id, symbol, sum(quantity)::double from holdings
                          where as_of = $as_of and list_contains($accounts, account_id) group by all"""

RESTRICTIONS = """select account_id, kind, value from stg_feed_restrictions
                  where as_of = $as_of and account_id in (select account_id from ({members}))"""

BANDS = """select scope, scope_id, asset_class, target_weight, band, current_weight, drift
           from drift where as_of = $as_of order by scope, scope_id, asset_class"""

# Scopes scanned today that need nothing: their open recommendations are closed.
INSIDE = """
select 'account:' || account_id || ':rebalance' from int_scanned_accounts
where as_of = $as_of and not aggregate_rebalancing
  and account_id not in (select scope_id from drift_alerts where as_of = $as_of and scope = 'account')
union all
select distinct 'household:' || household_id || ':rebalance' from int_scanned_accounts
where as_of = $as_of and aggregate_rebalancing
  and household_id not in (select scope_id from drift_alerts where as_of = $as_of and scope = 'household')
union all
select 'account:' || account_id || ':harvest' from int_scanned_accounts
where as_of = $as_of and account_id not in (select scope_id from trade_recommendations
                                             where as_of = $as_of and kind = 'harvest')
"""

USERS = ("select user_id, name, email, role, team_of, team_alerts from stg_feed_users where as_of = $as_of "
         "order by user_id")

# The advisor of record of each scope in today's feed (accounts.csv advisor_id, else the
# household's), for the scopes whose open recommendations lost their advisor (issue 12: people
# come and go). Households as in RECOMMENDATIONS: the advisor of their first scanned account.
ADVISORS_OF_RECORD = """
select 'account' as scope, account_id as scope_id, advisor_id from int_scanned_accounts
where as_of = $as_of and list_contains($accounts, account_id)
union all
select 'household', household_id, any_value(advisor_id order by account_id) from int_scanned_accounts
where as_of = $as_of and list_contains($households, household_id)
group by household_id
"""


def advisors_of_record(con, as_of: date, scopes: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(scope, scope_id) → advisor of record today, for these scopes only (one query)."""
    accounts = sorted({i for s, i in scopes if s == "account"})
    households = sorted({i for s, i in scopes if s == "household"})
    rows = con.execute(ADVISORS_OF_RECORD, {"as_of": as_of, "accounts": accounts, "households": households}).fetchall()
    return {(scope, scope_id): advisor for scope, scope_id, advisor in rows if advisor}

INPUTS = ("trade_recommendations", "trade_proposals", "recommendation_summary", "drift_alerts", "drift", "holdings",
          "int_scanned_accounts", "stg_feed_restrictions", "stg_feed_users", "stg_feed_securities")


def build_packages(con, as_of: date, trade_rules: TradeRules | None = None) -> list[dict]:
    """Every recommendation of the day with its package, ready for lifecycle.publish_day.
    trade_rules: the policy's trade sizing in force (recorded in each package: a modification
    is validated against the rules the proposal was sized by)."""
    params = {"as_of": as_of}
    members_sql = MEMBERS
    rows = con.execute(RECOMMENDATIONS, params).fetchall()
    columns = [d[0] for d in con.description]
    members: dict[str, list[str]] = defaultdict(list)
    for rec_id, account in con.execute(members_sql, params).fetchall():
        members[rec_id].append(account)
    trades: dict[str, list[PackageTrade]] = defaultdict(list)
    for row in con.execute(TRADES, params).fetchall():
        rec_id, *values = row
        trades[rec_id].append(PackageTrade(**dict(zip(
            ("account_id", "symbol", "asset_class", "side", "quantity", "est_price", "est_value", "reason",
             "replaces_symbol", "wash_sale_disallowed", "fractional", "security_type"), values))))
    holdings: dict[str, list[PackageHolding]] = defaultdict(list)
    for account, symbol, asset_class, quantity, price, value, fractional, security_type in con.execute(
            HOLDINGS.format(members=members_sql), params).fetchall():
        holdings[account].append(PackageHolding(account_id=account, symbol=symbol, asset_class=asset_class,
                                                quantity=quantity, price=price, market_value=value,
                                                fractional=fractional, security_type=security_type))
    restrictions: dict[str, list[PackageRestriction]] = defaultdict(list)
    for account, kind, value in con.execute(RESTRICTIONS.format(members=members_sql), params).fetchall():
        restrictions[account].append(PackageRestriction(account_id=account, kind=kind, value=value))
    bands: dict[tuple[str, str], list[PackageBand]] = defaultdict(list)
    for scope, scope_id, asset_class, target, band, current, drift in con.execute(BANDS, params).fetchall():
        bands[(scope, scope_id)].append(PackageBand(asset_class=asset_class, target_weight=target, band=band,
                                                    current_weight=current, drift=drift))
    out = []
    for row in rows:
        rec = dict(zip(columns, row))
        accounts = sorted(set(members[rec["recommendation_id"]]))
        held = [h for a in accounts for h in holdings[a]]
        package = RecommendationPackage(
            recommendation_id=rec["recommendation_id"], as_of=as_of, scope=rec["scope"], scope_id=rec["scope_id"],
            kind=rec["kind"], advisor_id=rec["advisor_id"], household_id=rec["household_id"], account_ids=accounts,
            tier=rec["tier"], urgency=rec["urgency"], delivery=rec["delivery"],
            discretionary=bool(rec["discretionary"]), policy_version=rec["policy_version"],
            model_version=rec["model_version"], trades=trades[rec["recommendation_id"]], holdings=held,
            restrictions=[r for a in accounts for r in restrictions[a]],
            bands=bands[(rec["scope"], rec["scope_id"])],
            tax=json.loads(rec["tax"]) if rec["tax"] else {},
            inside_bands=rec["inside_bands"], unresolved=rec["unresolved"],
            positions_fingerprint=positions_fingerprint([(h.account_id, h.symbol, h.quantity) for h in held]),
            trade_rules=trade_rules,
        )
        out.append({
            "recommendation_id": rec["recommendation_id"], "scope": rec["scope"], "scope_id": rec["scope_id"],
            "kind": rec["kind"], "household_id": rec["household_id"], "advisor_id": rec["advisor_id"],
            "tier": rec["tier"], "urgency": rec["urgency"], "delivery": rec["delivery"],
            "discretionary": bool(rec["discretionary"]), "trade_value": float(rec["trade_value"] or 0),
            "realized_gain": float(rec["realized_gain"] or 0), "policy_version": rec["policy_version"],
            # ERISA-barred classes held: routed to compliance at publication (authority.initial_status).
            "compliance_review": rec["compliance_review"],
            "positions_fingerprint": package.positions_fingerprint, "package": package.model_dump(mode="json"),
        })
    return out


def trade_rules_of(drift_policy) -> TradeRules:
    """The policy's trade sizing in force, as recorded in each package."""
    sizing = drift_policy.trade_sizing
    return TradeRules(min_trade_value=float(sizing.min_trade_value), min_trade_pct=float(sizing.min_trade_pct),
                      cash_buffer=float(sizing.default_cash_buffer), fractional_decimals=sizing.fractional_decimals)


def publish_recommendations(con, conn: Connection, as_of: date, trade_rules: TradeRules,
                            policy: lifecycle.LifecyclePolicy, now: datetime) -> tuple[int, lifecycle.PublishResult]:
    """Publish the day `as_of` of the warehouse `con` into the store transaction `conn`: returns
    how many recommendations the day has and what `lifecycle.publish_day` did."""
    recs = build_packages(con, as_of, trade_rules)
    users = [dict(zip(("user_id", "name", "email", "role", "team_of", "team_alerts"), r))
             for r in con.execute(USERS, {"as_of": as_of}).fetchall()]
    inside = {r[0] for r in con.execute(INSIDE, {"as_of": as_of}).fetchall()}
    # Users who left are deactivated; their open recommendations go to today's advisor of record.
    # (The warehouse stays open for the few scopes that need it; one store transaction.)
    lifecycle.sync_users(conn, users, now, advisors_of_record=lambda scopes: advisors_of_record(con, as_of, scopes))
    # Orders of earlier days that today's positions show filled release their accounts
    # before the day is published (an older day's positions fill nothing: ledger L3).
    waiting = sorted(ledger.accounts_with_open_orders(conn))
    if waiting:
        positions = {(a, sym): q for a, sym, q in con.execute(
            OPEN_ORDER_POSITIONS, {"as_of": as_of, "accounts": waiting}).fetchall()}
        held = sorted({a for a, _ in positions})
        ledger.record_fills(conn, as_of, positions, held, now)
    return len(recs), lifecycle.publish_day(conn, as_of, recs, inside, now, policy)
