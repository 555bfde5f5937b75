"""The approval gate: execute_rebalance re-verifies a decision against the workflow store and today's
holdings in a DuckDB warehouse, records its verdict once, and prepares the approved trades once."""

import json
from datetime import date, timedelta

import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test
from sqlalchemy import delete, insert, select

from rebal_pipeline.defs.approvals.jobs import GATE_VERDICT_TAG, execute_rebalance
from rebal_pipeline import settings
from rebal_pipeline.defs.approvals.sensors import approval_decisions
from rebal_pipeline.resources import (
    AuditResource, ExecutionResource, FeedLocation, FixSessionResource, Warehouse, WorkflowStoreResource,
)
from rebal_pipeline.settings import RebalSettings, load_settings
from rebal_pipeline.workflow import audit, lifecycle, outbox
from rebal_pipeline.workflow.package import TradeChange, apply_modification
from rebal_pipeline.workflow.schema import advisor_team, audit_events, decisions, recommendations
from rebal_pipeline_tests.approvals.conftest import AS_OF, PUBLISHED_AT, USERS, package, publish


def approved_trades_path(decision_id: str):
    return outbox.approved_trades_path(settings.outbox_root(), decision_id)

ADVISOR, OTHER_ADVISOR, COMPLIANCE = USERS[0], USERS[1], USERS[2]
NEXT_SESSION = date(2026, 11, 23)  # Monday after the Friday AS_OF
# ACC-1 as the package was built from it: 70 VTI at $100, 60 BND at $50, no cash.
POSITIONS = {"VTI": 70, "BND": 60, "CASH": 0}
PRICES = {"VTI": 100.0, "BND": 50.0, "CASH": 1.0}


@pytest.fixture
def outbox_home(tmp_path, monkeypatch):
    home = tmp_path / "rebal_home"
    # The approval run's ops write their outbox files under REBAL_HOME, read when they run.
    monkeypatch.setenv("REBAL_HOME", str(home))
    return home


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    """A small DuckDB warehouse whose holdings hold ACC-1's positions of AS_OF."""
    wh = Warehouse(database=str(tmp_path / "warehouse.duckdb"))
    with wh.connect() as con:
        con.execute("create table holdings (as_of date, household_id varchar, account_id varchar, symbol varchar, "
                    "asset_class varchar, quantity double, price double, market_value double)")
    write_holdings(wh, AS_OF, POSITIONS)
    return wh


def write_holdings(wh: Warehouse, day: date, positions: dict[str, float], account_id: str = "ACC-1") -> None:
    classes = {"VTI": "equity", "BND": "fixed_income", "CASH": "cash"}
    with wh.connect() as con:
        con.execute("delete from holdings where as_of = ? and account_id = ?", [day, account_id])
        con.executemany("insert into holdings values (?, 'HH-1', ?, ?, ?, ?, ?, ?)", [
            [day, account_id, symbol, classes[symbol], qty, PRICES[symbol], qty * PRICES[symbol]]
            for symbol, qty in positions.items()])


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def run_resources(store, wh: Warehouse, rebal_settings: RebalSettings | None = None) -> dict:
    """execute_rebalance's resources: the test's store and warehouse; the archive under the
    REBAL_HOME `outbox_home` set and the tests' audit key (the ones the store's events are signed
    with); execution settings (auto-submit, the desk) from `rebal_settings` (default: none set)."""
    here = settings.current()
    return {"workflow_store": WorkflowStoreResource(url=store.url), "warehouse": wh,
            "fix_session": FixSessionResource(),
            "execution": ExecutionResource.from_settings(rebal_settings or load_settings({})),
            "feed": FeedLocation(feed_root=str(here.feed_root()), archive_root=str(here.archive_root())),
            "audit": AuditResource.from_settings(here)}


def run_gate(store, wh: Warehouse, instance: DagsterInstance, decision_id: str,
             rebal_settings: RebalSettings | None = None):
    """execute_rebalance for the decision (resources: `run_resources`)."""
    return execute_rebalance.execute_in_process(
        run_config={"ops": {"approval_gate": {"config": {"decision_id": decision_id}}}},
        instance=instance,
        resources=run_resources(store, wh, rebal_settings),
        raise_on_error=False,
    )


def decide(store, recommendation_id, user, action, hours_after_publishing=2, **kwargs):
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, recommendation_id, user, action,
                                       PUBLISHED_AT + timedelta(hours=hours_after_publishing), **kwargs)
    return decision


def decision_row(store, decision_id) -> dict:
    with store.begin() as conn:
        return dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one())


def status_of(store, recommendation_id) -> str:
    with store.begin() as conn:
        return conn.execute(select(recommendations.c.status)
                            .where(recommendations.c.recommendation_id == recommendation_id)).scalar_one()


def audit_kinds(store) -> list[str]:
    with store.begin() as conn:
        return [r.kind for r in conn.execute(select(audit_events.c.kind).order_by(audit_events.c.seq))]


def audit_intact(store) -> audit.Verification:
    with store.begin() as conn:
        return audit.verify(conn)


def gate_metadata(result) -> dict:
    output = next(e for e in result.all_node_events
                  if e.is_successful_output and e.step_output_data.output_name == "verdict")
    return {k: v.value for k, v in output.step_output_data.metadata.items()}


def test_gate_passes_a_fresh_approval_and_writes_the_outbox_file_once(store, warehouse, instance, outbox_home):
    publish(store, package())
    decision = decide(store, "REC-1", ADVISOR, "approve", reason="back to the 60/40 model")

    first = run_gate(store, warehouse, instance, decision["decision_id"])
    assert first.success
    assert gate_metadata(first)["verdict"] == "passed"
    assert instance.get_run_by_id(first.run_id).tags[GATE_VERDICT_TAG] == "passed"
    path = approved_trades_path(decision["decision_id"])
    assert path == outbox_home / "outbox" / "approved" / f"{decision['decision_id']}.json"
    handoff = json.loads(path.read_text())
    assert handoff["format"] == "rebal.approved_trades/1"
    assert (handoff["decision_id"], handoff["decided_by"], handoff["recommendation"]["account_ids"]) == (
        decision["decision_id"], "ADV-1", ["ACC-1"])
    assert [(t["side"], t["symbol"], t["quantity"]) for t in handoff["trades"]] == [
        ("sell", "VTI", 10), ("buy", "BND", 20)]
    assert handoff["prepared_by_run"] == first.run_id
    stored = decision_row(store, decision["decision_id"])
    assert stored["gate_verdict"] == "passed"
    assert "fit the positions of 2026-11-20" in stored["gate_reason"]

    # The same decision run again (a re-execution, or the sensor's run key reused by hand): the
    # recorded verdict stands and the hand-off file is neither rewritten nor duplicated.
    second = run_gate(store, warehouse, instance, decision["decision_id"])
    assert second.success and gate_metadata(second)["recorded_by_this_run"] is False
    assert json.loads(path.read_text())["prepared_by_run"] == first.run_id
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert audit_kinds(store).count("gate_passed") == 1
    assert status_of(store, "REC-1") == "approved"
    assert audit_intact(store).ok


def test_gate_refuses_a_stale_approval_and_records_why(store, warehouse, instance, outbox_home):
    publish(store, package())
    decision = decide(store, "REC-1", ADVISOR, "approve")
    # Monday's holdings: 5 VTI were sold at the custodian in the meantime; the approval sells 10.
    write_holdings(warehouse, NEXT_SESSION, {"VTI": 5, "BND": 60, "CASH": 6500})

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success  # a refusal is an outcome, not an error
    assert gate_metadata(result)["verdict"] == "refused"
    assert instance.get_run_by_id(result.run_id).tags[GATE_VERDICT_TAG] == "refused"
    assert result.output_for_node("approval_gate", "verdict")["verdict"] == "refused"
    prepare = [e for e in result.all_node_events if e.node_name == "prepare_approved_trades"]
    assert [e.event_type_value for e in prepare] == ["STEP_SKIPPED"]
    stored = decision_row(store, decision["decision_id"])
    assert stored["gate_verdict"] == "refused"
    assert stored["gate_reason"] == "ACC-1 sell VTI 10: only 5 held (no overselling)"
    # Issue 12: a refusal hands the recommendation back to its advisor (never stuck), with the reason.
    assert status_of(store, "REC-1") == "pending"
    assert audit_kinds(store)[-1] == "gate_refused"
    with store.begin() as conn:
        event = conn.execute(select(audit_events).where(audit_events.c.kind == "gate_refused")).mappings().one()
    assert json.loads(event["payload"]) == {"decision_id": decision["decision_id"], "reason": stored["gate_reason"],
                                            "returned_to": "pending"}
    assert not (outbox_home / "outbox" / "approved").exists()
    assert audit_intact(store).ok


def test_gate_refuses_an_approval_whose_recommendation_a_later_scan_superseded(store, warehouse, instance, outbox_home):
    publish(store, package("REC-1"))
    decision = decide(store, "REC-1", ADVISOR, "approve")
    # Monday's scan finds ACC-1 still out of its band (nothing was executed yet) and recommends again.
    write_holdings(warehouse, NEXT_SESSION, POSITIONS)
    publish(store, package("REC-2"), as_of=NEXT_SESSION, now=PUBLISHED_AT + timedelta(days=3))

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success and gate_metadata(result)["verdict"] == "refused"
    reason = decision_row(store, decision["decision_id"])["gate_reason"]
    assert reason == ("a later scan (2026-11-23) produced recommendation REC-2 for account:ACC-1:rebalance: "
                      "the approved trades are out of date")
    assert status_of(store, "REC-1") == "superseded"  # issue 12: REC-2 is the one to decide now
    assert status_of(store, "REC-2") == "pending"  # the new recommendation waits for its own decision
    assert not (outbox_home / "outbox" / "approved").exists()
    assert audit_intact(store).ok


def test_gate_checks_the_quantities_of_a_modify_decision(store, warehouse, instance, outbox_home):
    publish(store, package())
    pkg = package()
    check = apply_modification(pkg, [TradeChange(account_id="ACC-1", symbol="VTI", side="sell", quantity=5),
                                     TradeChange(account_id="ACC-1", symbol="BND", side="buy", quantity=10)])
    assert not check.errors
    decision = decide(store, "REC-1", ADVISOR, "modify", reason="sell half now",
                      payload={"trades": [t.model_dump(mode="json") for t in check.trades]})
    # Today only 7 VTI are held: the package's sell of 10 would not fit, the advisor's 5 does.
    write_holdings(warehouse, NEXT_SESSION, {"VTI": 7, "BND": 60, "CASH": 6300})

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success and gate_metadata(result)["verdict"] == "passed"
    handoff = json.loads(approved_trades_path(decision["decision_id"]).read_text())
    assert handoff["action"] == "modify"
    assert sorted((t["side"], t["symbol"], t["quantity"]) for t in handoff["trades"]) == [
        ("buy", "BND", 10), ("sell", "VTI", 5)]
    assert "positions of 2026-11-23" in decision_row(store, decision["decision_id"])["gate_reason"]


def test_gate_refuses_an_approval_by_a_team_member_since_removed_from_the_team(store, warehouse, instance, outbox_home):
    publish(store, package())
    with store.begin() as conn:
        conn.execute(insert(advisor_team).values(advisor_id="ADV-1", member_user_id="ADV-2"))
    decision = decide(store, "REC-1", OTHER_ADVISOR, "approve")
    with store.begin() as conn:
        conn.execute(delete(advisor_team).where(advisor_team.c.member_user_id == "ADV-2"))

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success and gate_metadata(result)["verdict"] == "refused"
    assert decision_row(store, decision["decision_id"])["gate_reason"] == (
        "the decider ADV-2 is neither the advisor of record (ADV-1) nor on their team")
    assert status_of(store, "REC-1") == "pending"  # issue 12: back to its advisor


def test_gate_passes_compliance_approving_an_escalated_recommendation(store, warehouse, instance, outbox_home):
    publish(store, package())
    decide(store, "REC-1", ADVISOR, "escalate", reason="client disputes the model")
    decision = decide(store, "REC-1", COMPLIANCE, "approve", hours_after_publishing=5, reason="model confirmed")

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success and gate_metadata(result)["verdict"] == "passed"
    assert json.loads(approved_trades_path(decision["decision_id"]).read_text())["decided_by"] == "CCO-1"


def test_gate_passes_a_discretionary_micro_trade_approved_by_policy(store, warehouse, instance, outbox_home):
    result_of_publish = publish(store, package(discretionary=True), realized_gain=0.0)
    assert result_of_publish.auto_approved == 1
    with store.begin() as conn:
        decision = conn.execute(select(decisions).where(decisions.c.action == "auto_approve")).mappings().one()

    result = run_gate(store, warehouse, instance, decision["decision_id"])

    assert result.success and gate_metadata(result)["verdict"] == "passed"
    handoff = json.loads(approved_trades_path(decision["decision_id"]).read_text())
    assert handoff["decided_by"] == "policy:discretionary-micro-trade/1" and handoff["decided_via"] == "policy"


def test_gate_run_fails_without_a_verdict_when_the_warehouse_has_no_holdings(store, tmp_path, instance, outbox_home):
    publish(store, package())
    decision = decide(store, "REC-1", ADVISOR, "approve")
    empty = Warehouse(database=str(tmp_path / "empty.duckdb"))

    result = run_gate(store, empty, instance, decision["decision_id"])

    # Not a refusal: nothing is recorded, the recommendation stays approved, a re-run checks again.
    assert not result.success
    failure = next(e for e in result.all_node_events if e.is_failure)
    assert "the warehouse has no holdings table" in failure.step_failure_data.error.message
    assert decision_row(store, decision["decision_id"])["gate_verdict"] is None
    assert status_of(store, "REC-1") == "approved"
    assert "gate_refused" not in audit_kinds(store)


def test_an_approval_found_by_the_decision_sensor_passes_the_gate(store, warehouse, instance, outbox_home):
    publish(store, package())
    decision = decide(store, "REC-1", ADVISOR, "approve")
    with build_sensor_context(instance=instance, resources={"workflow_store": WorkflowStoreResource(url=store.url)}
                              ) as context:
        tick = approval_decisions.evaluate_tick(context)
    [request] = tick.run_requests
    assert request.run_key == f"decision:{decision['decision_id']}"
    assert request.tags["rebal/recommendation"] == "REC-1"

    result = execute_rebalance.execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags,
        resources=run_resources(store, warehouse))

    assert result.success and gate_metadata(result)["verdict"] == "passed"
    assert approved_trades_path(decision["decision_id"]).exists()
    # The gate has spoken: the next tick requests nothing for it, whatever the cursor.
    with build_sensor_context(instance=instance, resources={"workflow_store": WorkflowStoreResource(url=store.url)}
                              ) as context:
        assert approval_decisions.evaluate_tick(context).run_requests == []
