"""Execution safety (issue 12): no sequence of decisions, re-runs, corrected feeds or backfills
places a wrong or duplicate order. Each scenario the issue saw, end to end through the approval
API (FastAPI TestClient over create_app), the decision sensor, `execute_rebalance` (in process,
real DuckDB warehouse) and the CLI, on SQLite and on Postgres (CI=true).

The book (hand-made, numbers worked out by hand in each test):
  ACC-1 (advisor ADV-1, non-discretionary, Schwab): 46 VTI at $100 (ETF, whole shares),
        60 BND at $50 (ETF), $500 cash; min_cash_weight 5% → floor 5% × $8,100 = $405.
  ACC-2 (advisor ADV-1, Schwab): 200 VTI, 100 BND, $5,000 cash (the modification checks).
  ACC-3 (advisor ADV-1, discretionary, Fidelity): 46 VTI, 60 BND, $500 cash (micro-trades).
Its packages and people (the firm's USERS and the trading DESK) come from rebal_pipeline_tests/factories.py.
"""

from __future__ import annotations

import json
import secrets
from datetime import date, datetime, timedelta, timezone

import pytest
from dagster import build_sensor_context, instance_for_test
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rebal_pipeline import cli
from rebal_pipeline.approval_api.app import create_app
from rebal_pipeline.defs.approvals import jobs
from rebal_pipeline.defs.approvals.jobs import execute_rebalance
from rebal_pipeline.defs.approvals.sensors import approval_decisions
from rebal_pipeline.comms.waiting import executed_decisions
from rebal_pipeline.execution import submit
from rebal_pipeline.resources import Warehouse, WorkflowStoreResource
from rebal_pipeline.settings import RebalSettings, load_settings
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.package import (
    PackageBand, PackageRestriction, PackageTrade, RecommendationPackage, TradeRules,
)
from rebal_pipeline.workflow.schema import (
    audit_events, decisions, ledger_orders, order_sets, recommendations, submissions,
)
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals import conftest
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture)
from rebal_pipeline_tests.approvals.test_gate import run_resources
from rebal_pipeline_tests.factories import DESK, USERS

AS_OF = date(2026, 11, 20)  # Friday
NEXT = date(2026, 11, 23)  # Monday
AFTER = date(2026, 11, 24)
PUBLISHED_AT = datetime(2026, 11, 20, 21, 30, tzinfo=timezone.utc)
SECRET = b"execution-safety-test-secret-of-32+bytes"
PEOPLE = [*USERS, DESK]
SECURITIES = {  # symbol: asset class, security type, fractional, price, cusip
    "VTI": ("equity", "etf", False, 100.0, "922908769"),
    "BND": ("fixed_income", "etf", False, 50.0, "921937827"),
    "SWVXX": ("cash", "money_market", True, 1.0, "808515605"),
    "CASH": ("cash", "cash", False, 1.0, None),
}
ACCOUNTS = {"ACC-1": ("schwab", False), "ACC-2": ("schwab", False), "ACC-3": ("fidelity", True)}
BOOK = {"ACC-1": {"VTI": 46, "BND": 60, "SWVXX": 0, "CASH": 500},
        "ACC-2": {"VTI": 200, "BND": 100, "CASH": 5000},
        "ACC-3": {"VTI": 46, "BND": 60, "CASH": 500}}


# ---------------------------------------------------------------------------------------------
# The book
# ---------------------------------------------------------------------------------------------


def trade(account, symbol, side, quantity, price=None, reason="rebalance") -> PackageTrade:
    asset_class, kind, fractional, default_price, _ = SECURITIES[symbol]
    return factories.trade(account, symbol, asset_class, side, quantity, price or default_price, reason,
                           fractional=fractional, security_type=kind)


def make_package(rec_id, account, trades, kind="rebalance", as_of=AS_OF, discretionary=False,
                 prices=None) -> RecommendationPackage:
    prices = {s: v[3] for s, v in SECURITIES.items()} | (prices or {})
    holdings = [factories.holding(account, s, SECURITIES[s][0], q, prices[s], fractional=SECURITIES[s][2],
                                  security_type=SECURITIES[s][1])
                for s, q in BOOK[account].items()]
    return factories.make_package(
        recommendation_id=rec_id, as_of=as_of, scope_id=account, kind=kind, household_id=f"HH-{account}",
        tier="standard", urgency="medium", delivery="within_48h", discretionary=discretionary, trades=trades,
        holdings=holdings,
        restrictions=[PackageRestriction(account_id=account, kind="min_cash_weight", value="0.05")],
        bands=[PackageBand(asset_class="equity", target_weight=0.5, band=0.05, current_weight=0.57, drift=0.07)],
        inside_bands=True, trade_rules=TradeRules())


def publish(store, *packages, as_of=AS_OF, now=PUBLISHED_AT, realized_gain=100.0, inside=()):
    """conftest.publish with the trading desk in users.csv too."""
    return conftest.publish(store, *packages, as_of=as_of, now=now, realized_gain=realized_gain, inside=inside,
                            users=PEOPLE)


@pytest.fixture
def home(tmp_path, monkeypatch):
    # The approval run's ops write their outbox files under REBAL_HOME, read when they run.
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "rebal_home"))
    for name in (submit.AUTO_SUBMIT_ENV, submit.TRADING_DESK_ENV):
        monkeypatch.delenv(name, raising=False)
    clock = {"now": datetime(2026, 11, 23, 14, 35, tzinfo=timezone.utc)}
    monkeypatch.setattr(jobs, "utc_now", lambda: clock["now"])
    return clock


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    """Holdings of AS_OF for the book, and the feed's securities and accounts (reference data)."""
    warehouse = Warehouse(database=str(tmp_path / "warehouse.duckdb"))
    with warehouse.connect() as con:
        con.execute("create table holdings (as_of date, household_id varchar, account_id varchar, symbol varchar, "
                    "asset_class varchar, quantity double, price double, market_value double)")
        con.execute("create table stg_feed_securities (as_of date, _line integer, symbol varchar, cusip varchar, "
                    "description varchar, asset_class varchar, security_type varchar, wash_group varchar, "
                    "tlh_substitute varchar, fractional boolean)")
        con.execute("create table stg_feed_accounts (as_of date, _line integer, account_id varchar, "
                    "household_id varchar, custodian varchar, discretionary boolean, advisor_override_id varchar)")
        con.executemany("insert into stg_feed_securities values (?, 1, ?, ?, '', ?, ?, '', '', ?)", [
            [AS_OF, s, v[4], v[0], v[1], v[2]] for s, v in SECURITIES.items() if s != "CASH"])
        con.executemany("insert into stg_feed_accounts values (?, 1, ?, ?, ?, ?, null)", [
            [AS_OF, a, f"HH-{a}", custodian, disc] for a, (custodian, disc) in ACCOUNTS.items()])
    for account, positions in BOOK.items():
        holdings(warehouse, AS_OF, account, positions)
    return warehouse


def holdings(warehouse: Warehouse, day: date, account: str, positions: dict[str, float]) -> None:
    with warehouse.connect() as con:
        con.execute("delete from holdings where as_of = ? and account_id = ?", [day, account])
        con.executemany("insert into holdings values (?, ?, ?, ?, ?, ?, ?, ?)", [
            [day, f"HH-{account}", account, s, SECURITIES[s][0], q, SECURITIES[s][3], q * SECURITIES[s][3]]
            for s, q in positions.items()])


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


@pytest.fixture
def api(store):
    tokens = {}
    with store.begin() as conn:
        lifecycle.sync_users(conn, PEOPLE, PUBLISHED_AT)
        for user in PEOPLE:
            tokens[user["user_id"]] = secrets.token_urlsafe(24)
            lifecycle.issue_api_token(conn, user["user_id"], tokens[user["user_id"]], PUBLISHED_AT)
    app = create_app(store, SECRET, clock=lambda: PUBLISHED_AT + timedelta(hours=2))
    client = TestClient(app)
    client.tokens = tokens
    client.store = store
    return client


def decide(api, user, rec_id, **body):
    return api.post(f"/recommendations/{rec_id}/decisions", json=body,
                    headers={"Authorization": f"Bearer {api.tokens[user]}"})


def detail(api, user, rec_id) -> dict:
    response = api.get(f"/recommendations/{rec_id}", headers={"Authorization": f"Bearer {api.tokens[user]}"})
    assert response.status_code == 200, response.text
    return response.json()


def run(store, warehouse, instance, decision_id, rebal_settings: RebalSettings | None = None):
    """execute_rebalance for the decision; its execution settings from `rebal_settings` (default: none set)."""
    result = execute_rebalance.execute_in_process(
        run_config={"ops": {"approval_gate": {"config": {"decision_id": decision_id}}}}, instance=instance,
        resources=run_resources(store, warehouse, rebal_settings),
        raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result.output_for_node("approval_gate", "verdict")


def sensor_runs(store, instance):
    with build_sensor_context(instance=instance,
                              resources={"workflow_store": WorkflowStoreResource(url=store.url)}) as context:
        return approval_decisions.evaluate_tick(context).run_requests


def status(store, rec_id) -> str:
    with store.begin() as conn:
        return conn.execute(select(recommendations.c.status).where(
            recommendations.c.recommendation_id == rec_id)).scalar_one()


def staged_sells(store, account, symbol) -> float:
    with store.begin() as conn:
        return float(conn.execute(select(func.coalesce(func.sum(submissions.c.quantity), 0)).where(
            submissions.c.account_id == account, submissions.c.symbol == symbol, submissions.c.side == "sell",
            submissions.c.status.in_(("pending", "done", "executed")))).scalar())


def order_set_count(store, account, as_of=AS_OF) -> int:
    with store.begin() as conn:
        return conn.execute(select(func.count()).select_from(order_sets).where(
            order_sets.c.account_id == account, order_sets.c.as_of == as_of)).scalar()


def audit_ok(store) -> bool:
    with store.begin() as conn:
        verified = audit.verify(conn)
    assert verified.ok, str(verified)
    return True


def events(store, kind) -> list[dict]:
    with store.begin() as conn:
        return [json.loads(r.payload) | {"subject": r.subject_id} for r in conn.execute(
            select(audit_events.c.payload, audit_events.c.subject_id).where(audit_events.c.kind == kind)
            .order_by(audit_events.c.seq))]


# ---------------------------------------------------------------------------------------------
# 1. One account, one ledger
# ---------------------------------------------------------------------------------------------

HARVEST = [trade("ACC-1", "VTI", "sell", 40, reason="harvest"), trade("ACC-1", "BND", "buy", 80)]
REBALANCE = [trade("ACC-1", "VTI", "sell", 10), trade("ACC-1", "BND", "buy", 18)]
MODIFIED = [{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 33},
            {"account_id": "ACC-1", "symbol": "BND", "side": "buy", "quantity": 66}]


def test_harvest_approved_then_rebalance_modified_never_oversell(store, api, wh, instance, home):
    publish(store, make_package("H-1", "ACC-1", HARVEST, kind="harvest"), make_package("R-1", "ACC-1", REBALANCE))
    approved = decide(api, "ADV-1", "H-1", action="approve", reason="harvest the VTI loss")
    assert approved.status_code == 201
    [request] = sensor_runs(store, instance)  # the decision sensor launches the harvest's run
    assert run(store, wh, instance, request.run_config["ops"]["approval_gate"]["config"]["decision_id"]
               )["verdict"] == "passed"
    assert staged_sells(store, "ACC-1", "VTI") == 40

    # The rebalance modified to sell 33 VTI: alone it fits (46 held); with the harvest's 40 open it
    # does not: 46 - 40 = 6 left. Refused at the API, nothing recorded.
    refused = decide(api, "ADV-1", "R-1", action="modify", trades=MODIFIED, reason="sell more")
    assert refused.status_code == 422
    assert "ACC-1 sell VTI 33: only 6 held after 40 in open orders (no overselling)" in refused.json()["detail"]["errors"]
    assert status(store, "R-1") == "pending"
    assert staged_sells(store, "ACC-1", "VTI") == 40
    assert audit_ok(store)


def test_two_decisions_that_each_pass_alone_never_both_pass_the_gate(store, api, wh, instance, home):
    publish(store, make_package("H-1", "ACC-1", HARVEST, kind="harvest"), make_package("R-1", "ACC-1", REBALANCE))
    # Both decided before either reached the gate (the situation the issue saw): each fits alone.
    modified = decide(api, "ADV-1", "R-1", action="modify", trades=MODIFIED, reason="sell more")
    approved = decide(api, "ADV-1", "H-1", action="approve", reason="harvest")
    assert (modified.status_code, approved.status_code) == (201, 201)
    requests = sensor_runs(store, instance)
    assert len(requests) == 2
    verdicts = [run(store, wh, instance, r.run_config["ops"]["approval_gate"]["config"]["decision_id"])
                for r in requests]

    assert [v["verdict"] for v in verdicts] == ["passed", "refused"]
    # The second is checked against the holdings net of the first's 33 open sells: 46 - 33 = 13.
    assert "ACC-1 sell VTI 40: only 13 held after 33 in open orders (no overselling)" in verdicts[1]["reason"]
    assert "ACC-1: already has orders for 2026-11-20" in verdicts[1]["reason"]
    assert staged_sells(store, "ACC-1", "VTI") == 33 <= 46
    assert order_set_count(store, "ACC-1") == 1
    # The refused harvest is back with its advisor, the reason on its detail.
    assert status(store, "H-1") == "pending"
    assert "only 13 held" in detail(api, "ADV-1", "H-1")["last_gate_refusal"]["reason"]
    assert audit_ok(store)


# ---------------------------------------------------------------------------------------------
# 2. A modification is validated exactly like a proposal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, expected", [
    # $500 + $1,000 (10 VTI) - $1,400 (28 BND) = $100 cash = 1.2% of $8,100, under the 5% floor ($405).
    ([{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 10},
      {"account_id": "ACC-1", "symbol": "BND", "side": "buy", "quantity": 28}],
     "ACC-1: the trades leave $100.00 cash (1.2%), below the floor of $405.00 (5.0%: the account's "
     "min_cash_weight restriction)"),
    ([{"account_id": "ACC-1", "symbol": "CASH", "side": "sell", "quantity": 100}],
     "ACC-1 sell CASH 100: cash is not traded, it follows from the trades (no CASH lines)"),
    ([{"account_id": "ACC-1", "symbol": "SWVXX", "side": "buy", "quantity": 200}],
     "ACC-1 buy SWVXX 200: a money-market fund holds the account's cash, which follows from the trades "
     "(no money-market lines)"),
    ([{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 21.37}],
     "ACC-1 sell VTI 21.37: VTI trades in whole shares only (whole shares)"),
    ([{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 1e-9}],
     "ACC-1 sell VTI 0.000000001: $0.00 is below the minimum trade of $100.00 (minimum trade; 0 drops the line)"),
    # 1 BND is $50: under max($100, 0.1% × $8,100 = $8.10) = $100.
    ([{"account_id": "ACC-1", "symbol": "BND", "side": "buy", "quantity": 1}],
     "ACC-1 buy BND 1: $50.00 is below the minimum trade of $100.00 (minimum trade; 0 drops the line)"),
])
def test_a_modification_breaking_a_sizing_rule_is_refused_naming_the_line_and_the_rule(store, api, lines, expected):
    publish(store, make_package("R-1", "ACC-1", REBALANCE))
    refused = decide(api, "ADV-1", "R-1", action="modify", trades=lines, reason="changed")
    assert refused.status_code == 422, refused.text
    assert expected in refused.json()["detail"]["errors"], refused.json()
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar() == 0  # nothing recorded
    assert status(store, "R-1") == "pending"


def test_91_37_shares_of_an_etf_and_1e_9_shares_are_refused_and_whole_shares_pass(store, api):
    publish(store, make_package("R-2", "ACC-2", [trade("ACC-2", "VTI", "sell", 100), trade("ACC-2", "BND", "buy", 200)]))
    etf = decide(api, "ADV-1", "R-2", action="modify", reason="x",
                 trades=[{"account_id": "ACC-2", "symbol": "VTI", "side": "sell", "quantity": 91.37}])
    assert "ACC-2 sell VTI 91.37: VTI trades in whole shares only (whole shares)" in etf.json()["detail"]["errors"]
    tiny = decide(api, "ADV-1", "R-2", action="modify", reason="x",
                  trades=[{"account_id": "ACC-2", "symbol": "BND", "side": "buy", "quantity": 1e-9}])
    assert tiny.status_code == 422
    assert any(e.startswith("ACC-2 buy BND 0.000000001:") and "(whole shares)" in e
               for e in tiny.json()["detail"]["errors"])
    whole = decide(api, "ADV-1", "R-2", action="modify", reason="sell 91",
                   trades=[{"account_id": "ACC-2", "symbol": "VTI", "side": "sell", "quantity": 91}])
    assert whole.status_code == 201, whole.text


def test_a_gate_refusal_returns_the_recommendation_to_its_decider_with_the_reason(store, api, wh, instance, home):
    publish(store, make_package("R-1", "ACC-1", REBALANCE))
    first = decide(api, "ADV-1", "R-1", action="approve", reason="go")
    # Monday: the client sold 40 VTI at the custodian; the approval's sell of 10 no longer fits.
    holdings(wh, NEXT, "ACC-1", {"VTI": 6, "BND": 60, "CASH": 4500})
    verdict = run(store, wh, instance, first.json()["decision"]["decision_id"])

    assert verdict["verdict"] == "refused" and verdict["reason"] == "ACC-1 sell VTI 10: only 6 held (no overselling)"
    seen = detail(api, "ADV-1", "R-1")
    assert seen["status"] == "pending"
    assert seen["last_gate_refusal"]["reason"] == "ACC-1 sell VTI 10: only 6 held (no overselling)"
    [event] = events(store, "gate_refused")
    assert event["returned_to"] == "pending" and "only 6 held" in event["reason"]
    # The portal's review page says so too.
    token = api.app.state.issue_links("R-1", "ADV-1", actions=("review",))["review"]
    page = api.get(f"/links/{token}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "The approval gate refused the last approval of this recommendation, so no order was placed" in page.text
    assert "sell VTI 10: only 6 held (no overselling)" in page.text
    # Never stuck: the advisor decides again (a new decision, checked again by the gate).
    again = decide(api, "ADV-1", "R-1", action="approve", reason="go")
    assert again.status_code == 201 and again.json()["decision"]["decision_id"] != first.json()["decision"]["decision_id"]
    assert audit_ok(store)


# ---------------------------------------------------------------------------------------------
# 3. Re-runs and corrected feeds never trade twice
# ---------------------------------------------------------------------------------------------

MICRO = [trade("ACC-3", "VTI", "sell", 10), trade("ACC-3", "BND", "buy", 18)]  # $1,000 / $900: a micro-trade


def test_republishing_the_day_with_corrected_prices_after_submission_trades_once(store, wh, instance, home):
    auto_submit = load_settings({submit.AUTO_SUBMIT_ENV: "true"})
    result = publish(store, make_package("M-1", "ACC-3", MICRO, discretionary=True), realized_gain=0.0)
    assert result.auto_approved == 1
    [request] = sensor_runs(store, instance)
    assert run(store, wh, instance, request.run_config["ops"]["approval_gate"]["config"]["decision_id"],
               auto_submit)["verdict"] == "passed"
    assert status(store, "M-1") == "executed"  # every order submitted to the custodian drop

    # The custodian re-sends Friday with corrected prices: the day is re-published.
    corrected = make_package("M-1b", "ACC-3", [trade("ACC-3", "VTI", "sell", 10, price=101.0),
                                               trade("ACC-3", "BND", "buy", 18, price=50.5)],
                             discretionary=True, prices={"VTI": 101.0, "BND": 50.5})
    again = publish(store, corrected, realized_gain=0.0, now=PUBLISHED_AT + timedelta(hours=3))

    assert (again.held, again.auto_approved) == (1, 0)
    assert status(store, "M-1b") == "blocked_by_open_orders"
    [held] = events(store, "recommendation_held")
    assert held["reason"] == "open orders" and held["subject"] == "M-1b"
    assert sensor_runs(store, instance) == []  # nothing new to execute
    assert order_set_count(store, "ACC-3") == 1
    with store.begin() as conn:
        # One set of orders, and one client confirmation due, for the account and the day.
        assert conn.execute(select(func.count(func.distinct(submissions.c.decision_id)))
                            .where(submissions.c.account_id == "ACC-3")).scalar() == 1
        assert len(executed_decisions(conn, PUBLISHED_AT - timedelta(days=30), 100)) == 1
    assert audit_ok(store)


def test_an_auto_approval_not_yet_submitted_is_voided_when_the_day_is_republished(store, wh, instance, home):
    publish(store, make_package("M-1", "ACC-3", MICRO, discretionary=True), realized_gain=0.0)
    [stale] = sensor_runs(store, instance)
    corrected = make_package("M-1b", "ACC-3", [trade("ACC-3", "VTI", "sell", 10, price=101.0),
                                               trade("ACC-3", "BND", "buy", 18, price=50.5)],
                             discretionary=True, prices={"VTI": 101.0, "BND": 50.5})
    again = publish(store, corrected, realized_gain=0.0, now=PUBLISHED_AT + timedelta(hours=3))

    assert (again.voided, again.auto_approved) == (1, 1)
    assert status(store, "M-1") == "superseded" and status(store, "M-1b") == "auto_approved"
    [voided] = events(store, "auto_approval_voided")
    assert voided["superseded_by"] == "M-1b"
    # The stale run, if it was already queued, finds the auto-approval voided and places nothing.
    stale_id = stale.run_config["ops"]["approval_gate"]["config"]["decision_id"]
    assert run(store, wh, instance, stale_id)["verdict"] == "refused"
    [fresh] = sensor_runs(store, instance)
    assert run(store, wh, instance, fresh.run_config["ops"]["approval_gate"]["config"]["decision_id"]
               )["verdict"] == "passed"
    assert order_set_count(store, "ACC-3") == 1
    with store.begin() as conn:
        assert {r.recommendation_id for r in conn.execute(select(submissions.c.recommendation_id))} == {"M-1b"}
    assert audit_ok(store)


def test_the_store_refuses_a_second_order_set_for_an_account_and_day(store):
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    row = {"account_id": "ACC-1", "recommendation_id": "R", "as_of": AS_OF, "kind": "rebalance",
           "positions_as_of": AS_OF, "state": "cancelled", "opened_at": PUBLISHED_AT}
    with store.begin() as conn:
        conn.execute(insert(order_sets).values(decision_id="D1", **row))
    with pytest.raises(IntegrityError), store.begin() as conn:
        conn.execute(insert(order_sets).values(decision_id="D2", **row))


# ---------------------------------------------------------------------------------------------
# 4. History stays history
# ---------------------------------------------------------------------------------------------


def test_rerunning_an_older_day_publishes_history_and_leaves_the_newer_day_alone(store, api):
    publish(store, make_package("N-1", "ACC-1", REBALANCE, as_of=NEXT), as_of=NEXT,
            now=PUBLISHED_AT + timedelta(days=3))
    older = publish(store, make_package("O-1", "ACC-1", REBALANCE), as_of=AS_OF,
                    now=PUBLISHED_AT + timedelta(days=3, hours=1), inside={"account:ACC-1:rebalance"})

    assert (older.historical, older.created, older.superseded, older.resolved) == (1, 0, 0, 0)
    assert status(store, "O-1") == "historical" and status(store, "N-1") == "pending"
    [event] = events(store, "recommendation_historical")
    assert event["subject"] == "O-1" and "older than the newest day" in event["reason"]
    assert [e["subject"] for e in events(store, "recommendation_alerted")] == ["N-1"]  # no alert for history
    with store.begin() as conn:  # no reminder or escalation ever chases it
        due = lifecycle.due_notifications(conn, PUBLISHED_AT + timedelta(days=10))
    assert {d["recommendation_id"] for d in due} == {"N-1"}
    # Not decidable: nobody may approve what was history when published.
    assert decide(api, "ADV-1", "O-1", action="approve").status_code in (403, 409)
    assert audit_ok(store)


# ---------------------------------------------------------------------------------------------
# 9. The end of the story
# ---------------------------------------------------------------------------------------------


def test_orders_cancel_releases_the_account(store, api, wh, instance, home, monkeypatch, capsys):
    publish(store, make_package("R-1", "ACC-1", REBALANCE))
    decision_id = decide(api, "ADV-1", "R-1", action="approve", reason="go").json()["decision"]["decision_id"]
    assert run(store, wh, instance, decision_id)["verdict"] == "passed"
    assert status(store, "R-1") == "approved"  # staged: waiting for the desk

    # Monday: nothing filled yet (holdings unchanged): the new scan is held for the open orders.
    holdings(wh, NEXT, "ACC-1", BOOK["ACC-1"])
    assert publish(store, make_package("R-2", "ACC-1", REBALANCE, as_of=NEXT), as_of=NEXT,
                   now=PUBLISHED_AT + timedelta(days=3)).held == 1
    assert status(store, "R-2") == "blocked_by_open_orders"

    monkeypatch.setenv("REBAL_WORKFLOW_DB_URL", store.url)  # the environment is the CLI's interface
    # Only the desk (or operations) cancels.
    assert cli.main(["orders-cancel", "--decision", decision_id, "--by", "ADV-1", "--reason", "wrong"]) == 1
    assert "not an active trading-desk or operations user" in capsys.readouterr().err
    assert cli.main(["orders-cancel", "--decision", decision_id, "--by", "DESK-1",
                     "--reason", "client called: hold off"]) == 0
    assert "2 orders of decision" in capsys.readouterr().out
    assert status(store, "R-1") == "cancelled"
    with store.begin() as conn:
        assert {r.status for r in conn.execute(select(submissions.c.status))} == {"cancelled"}
        assert {r.state for r in conn.execute(select(ledger_orders.c.state))} == {"cancelled"}
    [cancelled] = events(store, "orders_cancelled")
    assert cancelled["reason"] == "client called: hold off"
    # Released: the next day's scan is routed to the advisor again.
    holdings(wh, AFTER, "ACC-1", BOOK["ACC-1"])
    assert publish(store, make_package("R-3", "ACC-1", REBALANCE, as_of=AFTER), as_of=AFTER,
                   now=PUBLISHED_AT + timedelta(days=4)).created == 1
    assert status(store, "R-3") == "pending"
    assert audit_ok(store)


def test_orders_seen_filled_release_the_account_and_the_desk_confirms_execution(store, api, wh, instance, home,
                                                                                monkeypatch):
    publish(store, make_package("R-1", "ACC-1", REBALANCE))
    decision_id = decide(api, "ADV-1", "R-1", action="approve", reason="go").json()["decision"]["decision_id"]
    assert run(store, wh, instance, decision_id)["verdict"] == "passed"
    monkeypatch.setenv("REBAL_WORKFLOW_DB_URL", store.url)  # the environment is the CLI's interface
    assert cli.main(["orders-executed", "--decision", decision_id, "--by", "DESK-1"]) == 0
    assert status(store, "R-1") == "executed"
    # Monday's holdings show both lines done: 46 - 10 = 36 VTI, 60 + 18 = 78 BND.
    from rebal_pipeline.workflow import ledger

    with store.begin() as conn:
        closed = ledger.record_fills(conn, NEXT, {("ACC-1", "VTI"): 36, ("ACC-1", "BND"): 78,
                                                  ("ACC-1", "CASH"): 600}, ["ACC-1"], PUBLISHED_AT + timedelta(days=3))
    assert closed == [(decision_id, "ACC-1")]
    assert publish(store, make_package("R-2", "ACC-1", REBALANCE, as_of=NEXT), as_of=NEXT,
                   now=PUBLISHED_AT + timedelta(days=3)).created == 1
    assert status(store, "R-2") == "pending"
    assert audit_ok(store)


def test_a_temp_file_left_by_a_killed_write_is_removed_and_never_an_order_file(tmp_path):
    drop = tmp_path / "submitted" / "schwab"
    drop.mkdir(parents=True)
    left = drop / ".x.csv.0123abcd.tmp"
    left.write_bytes(b"half an order file")
    folder_left = tmp_path / "staged" / ".D1.89ab.tmp"
    folder_left.mkdir(parents=True)
    (folder_left / "orders.fix").write_bytes(b"half")

    assert submit.deliver(tmp_path, submit.Destination(submit.SUBMITTED, "submitted/schwab/x.csv",
                                                       {"x.csv": b"whole"}, ("RB1",))) is True
    assert submit.deliver(tmp_path, submit.Destination(submit.STAGED, "staged/D1", {"orders.fix": b"fix"},
                                                       ("RB2",))) is True
    assert sorted(p.name for p in drop.iterdir()) == ["x.csv"]
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == ["D1"]


def test_two_gates_of_one_account_at_once_never_both_pass_on_one_view(store, api):
    """Two decisions of different days (so the one-set-per-day key does not decide it), each
    selling 30 of the 46 VTI: run at the same moment, the account's lock makes the second gate
    wait for the first and see its open orders."""
    import threading
    import time

    from rebal_pipeline.workflow import gate

    publish(store, make_package("R-1", "ACC-1", [trade("ACC-1", "VTI", "sell", 30), trade("ACC-1", "BND", "buy", 50)]))
    publish(store, make_package("H-2", "ACC-1", [trade("ACC-1", "VTI", "sell", 30, reason="harvest"),
                                                 trade("ACC-1", "BND", "buy", 50)], kind="harvest", as_of=NEXT),
            as_of=NEXT, now=PUBLISHED_AT + timedelta(days=3))
    ids = [decide(api, "ADV-1", rec, action="approve", reason="go").json()["decision"]["decision_id"]
           for rec in ("R-1", "H-2")]
    inside = threading.Event()

    def positions(_accounts):
        if not inside.is_set():
            inside.set()
            time.sleep(1.0)  # the first gate holds the lock while it reads the warehouse; the second reads at once
        return NEXT, {("ACC-1", s): q for s, q in BOOK["ACC-1"].items()}

    verdicts = {}

    def run_gate(decision_id):
        with store.begin() as conn:
            verdicts[decision_id] = gate.gate_decision(conn, decision_id, positions, PUBLISHED_AT + timedelta(days=3))

    first = threading.Thread(target=run_gate, args=(ids[0],))
    first.start()
    inside.wait(10)
    second = threading.Thread(target=run_gate, args=(ids[1],))
    second.start()
    first.join(60)
    second.join(60)

    assert verdicts[ids[0]].passed
    assert not verdicts[ids[1]].passed
    assert verdicts[ids[1]].reason == "ACC-1 sell VTI 30: only 16 held after 30 in open orders (no overselling)"
    assert audit_ok(store)
