"""One recommendation's whole life, through the real pieces: published by the daily run's
lifecycle, listed and decided through the approval API (uvicorn + httpx), chased by the
escalation sensor at 24h and 48h (Dagster's sensor daemon, injected clock), approved by
compliance, launched by the decision sensor exactly once, passed by the approval gate against
the warehouse's holdings, handed to ticketing, and every step on an intact audit chain.
On SQLite and on Postgres."""

import json
from datetime import timedelta

import httpx
from sqlalchemy import select

from rebal_pipeline import settings
from rebal_pipeline.approval_api.app import create_app
from rebal_pipeline.approval_api.testing import running_server
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events, recommendations
from rebal_pipeline_tests.approvals.conftest import AS_OF, PUBLISHED_AT, package, publish
from rebal_pipeline_tests.approvals.test_gate import write_holdings
from rebal_pipeline_tests.approvals.test_sensors import CLOCK, daemon  # noqa: F401 (fixture)
from rebal_pipeline.resources import Warehouse

SECRET = b"an-end-to-end-test-secret-of-32+bytes!"


def test_pending_reminded_escalated_approved_by_compliance_gated_and_handed_to_ticketing(store, daemon):
    # The daily run's output: one pending recommendation, and today's holdings in the warehouse.
    publish(store, package("REC-1"))
    wh = Warehouse(database=daemon.settings["REBAL_WAREHOUSE"])  # the warehouse the daemon's runs read
    with wh.connect() as con:
        con.execute("create table holdings (as_of date, household_id varchar, account_id varchar, symbol varchar, "
                    "asset_class varchar, quantity double, price double, market_value double)")
    write_holdings(wh, AS_OF, {"VTI": 70, "BND": 60, "CASH": 0})
    with store.begin() as conn:
        lifecycle.issue_api_token(conn, "ADV-1", "advisor-token", PUBLISHED_AT)
        lifecycle.issue_api_token(conn, "CCO-1", "compliance-token", PUBLISHED_AT)
    advisor = {"Authorization": "Bearer advisor-token"}
    compliance = {"Authorization": "Bearer compliance-token"}
    CLOCK["now"] = PUBLISHED_AT
    app = create_app(store, SECRET, clock=lambda: CLOCK["now"])

    with running_server(app) as base, httpx.Client(base_url=base, timeout=10) as api:
        mine = api.get("/recommendations", params={"status": "pending"}, headers=advisor).json()
        assert [r["recommendation_id"] for r in mine["items"]] == ["REC-1"]

        # Nobody decides for a day: the advisor is reminded, once.
        daemon.start("approval_escalations")
        daemon.start("approval_decisions")
        daemon.tick(PUBLISHED_AT + timedelta(hours=24), "approval_escalations")
        daemon.tick(PUBLISHED_AT + timedelta(hours=25), "approval_escalations")
        [reminder] = daemon.runs("approval_escalations")
        assert daemon.execute(reminder).success

        # Two days: escalated to the compliance officer, once.
        daemon.tick(PUBLISHED_AT + timedelta(hours=48), "approval_escalations")
        escalation = [r for r in daemon.runs("approval_escalations") if r.tags["rebal/notification"] == "escalation"]
        assert len(escalation) == 1 and daemon.execute(escalation[0]).success
        CLOCK["now"] = PUBLISHED_AT + timedelta(hours=49)
        assert api.get("/recommendations", params={"status": "pending"}, headers=advisor).json()["items"] == []
        queue = api.get("/recommendations", params={"status": "pending"}, headers=compliance).json()
        assert [r["recommendation_id"] for r in queue["items"]] == ["REC-1"]

        # Compliance approves; the same click again changes nothing.
        body = {"action": "approve", "reason": "reviewed: trades match the IPS"}
        first = api.post("/recommendations/REC-1/decisions", json=body, headers=compliance)
        again = api.post("/recommendations/REC-1/decisions", json=body, headers=compliance)
        assert (first.status_code, again.status_code) == (201, 200)
        decision_id = first.json()["decision"]["decision_id"]

    # The decision sensor launches exactly one execute_rebalance run, however often it ticks.
    daemon.tick(PUBLISHED_AT + timedelta(hours=49), "approval_decisions")
    daemon.tick(PUBLISHED_AT + timedelta(hours=50), "approval_decisions")
    [run] = daemon.runs("approval_decisions")
    assert run.tags["dagster/run_key"] == f"decision:{decision_id}"
    assert daemon.execute(run).success

    handed_over = json.loads((settings.rebal_home() / "outbox" / "approved" / f"{decision_id}.json").read_text())
    assert [(t["side"], t["symbol"], t["quantity"]) for t in handed_over["trades"]] == [
        ("sell", "VTI", 10.0), ("buy", "BND", 20.0)]
    with store.begin() as conn:
        status = conn.execute(select(recommendations.c.status)).scalar_one()
        kinds = [r.kind for r in conn.execute(select(audit_events.c.kind).order_by(audit_events.c.seq))]
        chain = audit.verify(conn)
    assert status == "approved"
    assert [k for k in kinds if not k.startswith("user")] == [
        "recommendation_alerted", "api_token_issued", "api_token_issued", "recommendation_reminder",
        # Issue 12: the gate's pass opens the account's order set (the ledger) in the same transaction.
        "recommendation_escalation", "decision_approve", "order_set_opened", "gate_passed"]
    assert chain.ok
