"""The approval sensors, ticked by Dagster's own sensor daemon in this process (so run keys are
deduplicated exactly as in a deployment) with an injected clock, and their runs executed in process.

User-visible outcomes: the runs on the instance (one per decision / notification key), the
notifications recorded in the workflow store, the outbox files for the mailer, the audit chain.
"""

import json
import logging
import os
from datetime import datetime, timedelta, timezone

import pytest
from dagster import (
    DagsterInstance, Definitions, EnvVar, build_sensor_context, in_process_executor, instance_for_test,
)
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.dagster_run import DagsterRun, RunsFilter
from dagster._core.storage.tags import SENSOR_NAME_TAG
from dagster._core.test_utils import (
    InProcessTestWorkspaceLoadTarget, create_test_daemon_workspace_context, freeze_time, load_remote_repo,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.sensor import execute_sensor_iteration
from sqlalchemy import insert, select

from rebal_pipeline import settings
from rebal_pipeline.defs.approvals import defs as approval_defs
from rebal_pipeline.defs.approvals.jobs import execute_rebalance, notify_recommendation
from rebal_pipeline.defs.approvals.sensors import build_approval_decisions_sensor, build_approval_escalations_sensor
from rebal_pipeline.resources import Warehouse, WorkflowStoreResource, resources_for
from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow import audit, lifecycle, outbox
from rebal_pipeline.workflow.approval_watch import DecisionCursor, advance_cursor
from rebal_pipeline.workflow.package import TradeChange, apply_modification
from rebal_pipeline.workflow.schema import audit_events, decisions, notifications, recommendations
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, USERS, package, publish

ADVISOR = USERS[0]
STORE_URL_VAR = "REBAL_TEST_APPROVALS_STORE_URL"
WAREHOUSE_VAR = "REBAL_TEST_APPROVALS_WAREHOUSE"

# The clock both sensors read: the test sets it before each tick.
CLOCK: dict[str, datetime] = {}

# The code location the in-process daemon loads (this module, by name): the approval jobs and
# sensors with the injected clock. Loaded by module name, it reads the store and the warehouse
# from two test variables (set by the `daemon` fixture); the sensors' other resources are the
# settings' defaults (the shipped drift policy's approval clock). Runs get the fixture's
# deployment settings (`SensorDaemon.execute`).
daemon_definitions = Definitions(
    jobs=[execute_rebalance, notify_recommendation],
    sensors=[build_approval_decisions_sensor(clock=lambda: CLOCK["now"]),
             build_approval_escalations_sensor(clock=lambda: CLOCK["now"])],
    resources={**resources_for(load_settings({})),
               "workflow_store": WorkflowStoreResource(url=EnvVar(STORE_URL_VAR)),
               "warehouse": Warehouse(database=EnvVar(WAREHOUSE_VAR))},
    executor=in_process_executor,
)


class SensorDaemon:
    """Dagster's sensor daemon, one tick at a time (dagster._daemon.sensor, as `dagster-daemon`
    runs it): it evaluates the started sensors, skips run keys it already launched for a sensor,
    and submits new runs to the instance's queue. Queued runs are executed by `execute`, as the
    run worker would."""

    def __init__(self, instance: DagsterInstance, workspace, deployment: dict[str, str]):
        self.instance, self.workspace = instance, workspace
        self.settings = deployment  # the REBAL_* variables of the deployment its runs see
        self.repo = load_remote_repo(workspace, "__repository__")
        self._wall = datetime.now(timezone.utc)

    def start(self, sensor_name: str) -> None:
        self.instance.start_sensor(self.repo.get_sensor(sensor_name))

    def tick(self, at: datetime, sensor_name: str):
        """One daemon iteration with the sensors' clock at `at`; the sensor's newest tick."""
        CLOCK["now"] = at
        self._wall += timedelta(hours=1)  # past any minimum interval
        with freeze_time(self._wall):
            list(execute_sensor_iteration(self.workspace, logging.getLogger("test_sensor_daemon"), None, None))
        sensor = self.repo.get_sensor(sensor_name)
        return self.instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id, limit=1)[0]

    def runs(self, sensor_name: str) -> list[DagsterRun]:
        return sorted(self.instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: sensor_name})),
                      key=lambda r: r.tags["dagster/run_key"])

    def execute(self, run: DagsterRun):
        resources = resources_for(load_settings(self.settings))
        definitions = Definitions(jobs=[execute_rebalance, notify_recommendation], resources=resources,
                                  executor=in_process_executor)
        job = definitions.resolve_job_def(run.job_name)
        return job.execute_in_process(run_config=run.run_config, instance=self.instance)


@pytest.fixture
def daemon(store, tmp_path, monkeypatch):
    # The daemon loads daemon_definitions by module name: it reads the store and the warehouse
    # from these variables; the runs' outbox copies go under REBAL_HOME (the ops read it there).
    monkeypatch.setenv(STORE_URL_VAR, store.url)
    monkeypatch.setenv(WAREHOUSE_VAR, str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "rebal_home"))
    # The store's events are signed with the tests' audit key (conftest.py): the runs anchor with it.
    deployment = {"REBAL_HOME": str(tmp_path / "rebal_home"), "REBAL_WORKFLOW_DB_URL": store.url,
                  "REBAL_WAREHOUSE": str(tmp_path / "warehouse.duckdb"),
                  "REBAL_AUDIT_KEY": os.environ["REBAL_AUDIT_KEY"]}
    with instance_for_test() as instance:
        target = InProcessTestWorkspaceLoadTarget(InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name=__name__, attribute="daemon_definitions",
                                 working_directory=str(settings.REPO_ROOT)),
            location_name="approvals_test"))
        with create_test_daemon_workspace_context(target, instance) as workspace:
            yield SensorDaemon(instance, workspace, deployment)


def outcome_of(result) -> str:
    [output] = [e for e in result.all_node_events if e.is_successful_output]
    return output.step_output_data.metadata["outcome"].value


def recorded_notifications(store) -> list[tuple[str, str]]:
    with store.begin() as conn:
        return [(r.kind, r.recipient_id) for r in conn.execute(
            select(notifications.c.kind, notifications.c.recipient_id).order_by(notifications.c.created_at,
                                                                                 notifications.c.recipient_id))]


def outbox_notifications() -> list[dict]:
    folder = settings.rebal_home() / "outbox" / "notifications"
    if not folder.exists():
        return []
    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda d: d["recorded_at"])


def audit_kinds(store) -> list[str]:
    with store.begin() as conn:
        return [r.kind for r in conn.execute(select(audit_events.c.kind).order_by(audit_events.c.seq))]


def audit_ok(store) -> bool:
    with store.begin() as conn:
        return audit.verify(conn).ok


# ---------------------------------------------------------------------------------------------
# Reminders and escalations
# ---------------------------------------------------------------------------------------------


def test_pending_recommendation_gets_one_reminder_at_24h_and_one_escalation_to_compliance_at_48h(store, daemon):
    publish(store, package())
    daemon.start("approval_escalations")
    at = PUBLISHED_AT

    assert daemon.tick(at + timedelta(hours=23, minutes=59), "approval_escalations").status == TickStatus.SKIPPED
    assert daemon.runs("approval_escalations") == []

    # 24h: one reminder run, however many times the sensor ticks before it runs.
    daemon.tick(at + timedelta(hours=24), "approval_escalations")
    again = daemon.tick(at + timedelta(hours=24, minutes=5), "approval_escalations")
    [reminder] = daemon.runs("approval_escalations")
    key = "reminder:account:ACC-1:rebalance:2026-11-20T21:30:00+00:00"
    assert reminder.tags["dagster/run_key"] == key and reminder.tags["rebal/recommendation"] == "REC-1"
    assert again.status == TickStatus.SKIPPED and again.run_keys == [key] and again.run_ids == []

    # The run executed twice (a retry, a re-execution): one reminder recorded, one email in the outbox.
    assert [outcome_of(daemon.execute(reminder)) for _ in range(2)] == ["recorded", "already recorded"]
    assert recorded_notifications(store) == [("reminder", "ADV-1")]
    [email] = outbox_notifications()
    assert email["format"] == "rebal.notification/1" and email["notification_key"] == key
    assert (email["kind"], email["recipient"]["user_id"], email["recipient"]["email"]) == (
        "reminder", "ADV-1", "dana@example-ria.com")
    assert email["recommendation"]["recommendation_id"] == "REC-1"
    assert email["recorded_at"] == "2026-11-21T21:30:00+00:00"

    for hours in (30, 47.99):
        assert daemon.tick(at + timedelta(hours=hours), "approval_escalations").status == TickStatus.SKIPPED
    assert len(daemon.runs("approval_escalations")) == 1

    # 48h: one escalation to the compliance officer.
    daemon.tick(at + timedelta(hours=48), "approval_escalations")
    daemon.tick(at + timedelta(hours=48, minutes=5), "approval_escalations")
    runs = daemon.runs("approval_escalations")
    assert [r.tags["rebal/notification"] for r in runs] == ["escalation", "reminder"]
    assert [outcome_of(daemon.execute(runs[0])) for _ in range(2)] == ["recorded", "already recorded"]
    assert recorded_notifications(store) == [("reminder", "ADV-1"), ("escalation", "CCO-1")]
    with store.begin() as conn:
        rec = conn.execute(select(recommendations)).mappings().one()
    assert (rec["status"], rec["escalated_to"]) == ("escalated", "CCO-1")
    assert [e["recipient"]["user_id"] for e in outbox_notifications()] == ["ADV-1", "CCO-1"]
    assert daemon.tick(at + timedelta(hours=72), "approval_escalations").status == TickStatus.SKIPPED
    assert len(daemon.runs("approval_escalations")) == 2
    assert audit_kinds(store).count("recommendation_reminder") == 1
    assert audit_kinds(store).count("recommendation_escalation") == 1
    assert audit_ok(store)


def test_deferred_recommendation_is_not_reminded_before_its_date_and_is_after(store, daemon):
    publish(store, package())
    with store.begin() as conn:
        lifecycle.decide(conn, "REC-1", ADVISOR, "defer", PUBLISHED_AT + timedelta(hours=1),
                         reason="client travelling", payload={"deferred_until": PUBLISHED_AT + timedelta(hours=36)})
    daemon.start("approval_escalations")

    for hours in (24, 30, 35.99):
        assert daemon.tick(PUBLISHED_AT + timedelta(hours=hours), "approval_escalations").status == TickStatus.SKIPPED
    assert daemon.runs("approval_escalations") == []

    daemon.tick(PUBLISHED_AT + timedelta(hours=36), "approval_escalations")
    [run] = daemon.runs("approval_escalations")
    assert run.tags["rebal/notification"] == "reminder"
    assert outcome_of(daemon.execute(run)) == "recorded"
    assert recorded_notifications(store) == [("reminder", "ADV-1")]


def test_weekly_batch_recommendations_get_one_digest_per_advisor_per_week_and_no_reminders(store, daemon):
    publish(store, package("REC-1", account_id="ACC-1", delivery="weekly_batch"),
            package("REC-2", account_id="ACC-2", delivery="weekly_batch"),
            package("REC-3", account_id="ACC-3", advisor_id="ADV-2", delivery="weekly_batch"))
    daemon.start("approval_escalations")

    # Friday 2026-11-20 (ISO week 47): one digest per advisor.
    daemon.tick(PUBLISHED_AT + timedelta(minutes=30), "approval_escalations")
    week_47 = daemon.runs("approval_escalations")
    assert [r.tags["dagster/run_key"] for r in week_47] == ["weekly_digest:ADV-1:2026-W47",
                                                             "weekly_digest:ADV-2:2026-W47"]
    assert [outcome_of(daemon.execute(r)) for r in week_47] == ["recorded", "recorded"]
    # Saturday and Sunday, past 24h and 48h: nothing more that week, and never a reminder.
    for hours in (24, 48):
        assert daemon.tick(PUBLISHED_AT + timedelta(hours=hours), "approval_escalations").status == TickStatus.SKIPPED
    assert len(daemon.runs("approval_escalations")) == 2

    # Monday 2026-11-23 (week 48): the still-pending ones again, one digest per advisor.
    daemon.tick(PUBLISHED_AT + timedelta(hours=72), "approval_escalations")
    runs = daemon.runs("approval_escalations")
    assert [r.tags["dagster/run_key"] for r in runs] == [
        "weekly_digest:ADV-1:2026-W47", "weekly_digest:ADV-1:2026-W48",
        "weekly_digest:ADV-2:2026-W47", "weekly_digest:ADV-2:2026-W48"]
    assert {r.tags["rebal/notification"] for r in runs} == {"weekly_digest"}
    assert recorded_notifications(store) == [("weekly_digest", "ADV-1"), ("weekly_digest", "ADV-2")]
    digest = next(d for d in outbox_notifications() if d["recipient"]["user_id"] == "ADV-1")
    assert [r["recommendation_id"] for r in digest["recommendations"]] == ["REC-1", "REC-2"]


def test_an_escalation_decided_before_its_run_does_not_escalate(store, daemon):
    publish(store, package())
    daemon.start("approval_escalations")
    daemon.tick(PUBLISHED_AT + timedelta(hours=48), "approval_escalations")
    [run] = daemon.runs("approval_escalations")
    with store.begin() as conn:  # the advisor approves while the escalation run waits in the queue
        lifecycle.decide(conn, "REC-1", ADVISOR, "approve", PUBLISHED_AT + timedelta(hours=48, minutes=1))

    assert outcome_of(daemon.execute(run)) == "no longer due: the recommendation is approved"
    with store.begin() as conn:
        assert conn.execute(select(recommendations.c.status)).scalar_one() == "approved"
    assert recorded_notifications(store) == []
    assert outbox_notifications() == []


def test_reminder_and_escalation_hours_come_from_the_environment(store):
    # The deployment's REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS, as resources_for hands them
    # to the sensor.
    chosen = resources_for(load_settings({"REBAL_WORKFLOW_DB_URL": store.url, "REBAL_REMINDER_HOURS": "4",
                                          "REBAL_ESCALATION_HOURS": "8"}))
    publish(store, package())
    kinds = {}
    with instance_for_test() as instance:
        for hours in (3.9, 4, 8):
            sensor = build_approval_escalations_sensor(clock=lambda h=hours: PUBLISHED_AT + timedelta(hours=h))
            with build_sensor_context(instance=instance, resources={
                    name: chosen[name] for name in ("workflow_store", "approval_clock", "drift_policy_source")
            }) as context:
                kinds[hours] = [r.tags["rebal/notification"] for r in sensor.evaluate_tick(context).run_requests]
    assert kinds == {3.9: [], 4: ["reminder"], 8: ["escalation"]}

    inverted = load_settings({"REBAL_REMINDER_HOURS": "48", "REBAL_ESCALATION_HOURS": "24"})
    with pytest.raises(ValueError, match="must come before the escalation"):
        lifecycle.lifecycle_policy(rebal_settings=inverted)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


def test_decision_sensor_launches_one_run_per_decision_when_ticked_twice(store, daemon):
    publish(store, package("REC-1", account_id="ACC-1"), package("REC-2", account_id="ACC-2"),
            package("REC-3", account_id="ACC-3"))
    modified = apply_modification(package("REC-2", account_id="ACC-2"), [
        TradeChange(account_id="ACC-2", symbol="VTI", side="sell", quantity=5)]).trades
    with store.begin() as conn:
        now = PUBLISHED_AT + timedelta(hours=2)
        approved, _ = lifecycle.decide(conn, "REC-1", ADVISOR, "approve", now)
        modify, _ = lifecycle.decide(conn, "REC-2", ADVISOR, "modify", now,
                                     payload={"trades": [t.model_dump(mode="json") for t in modified]})
        lifecycle.decide(conn, "REC-3", ADVISOR, "defer", now, reason="client call on Monday")
    daemon.start("approval_decisions")

    first = daemon.tick(PUBLISHED_AT + timedelta(hours=2, minutes=1), "approval_decisions")
    second = daemon.tick(PUBLISHED_AT + timedelta(hours=2, minutes=2), "approval_decisions")

    runs = daemon.runs("approval_decisions")
    assert {r.tags["dagster/run_key"]: r.tags["rebal/recommendation"] for r in runs} == {
        f"decision:{approved['decision_id']}": "REC-1", f"decision:{modify['decision_id']}": "REC-2"}
    assert {r.job_name for r in runs} == {"execute_rebalance"}
    assert len(first.run_ids) == 2 and second.status == TickStatus.SKIPPED
    cursor = DecisionCursor.parse(second.cursor)
    assert (cursor.floor, cursor.high, cursor.hole_from) == (3, 3, None)

    # The sensor itself, ticked with its own cursor, requests nothing new either.
    sensor = build_approval_decisions_sensor()
    with build_sensor_context(instance=daemon.instance, cursor=None,
                              resources={"workflow_store": WorkflowStoreResource(url=store.url)}) as context:
        tick = sensor.evaluate_tick(context)
    with build_sensor_context(instance=daemon.instance, cursor=tick.cursor,
                              resources={"workflow_store": WorkflowStoreResource(url=store.url)}) as context:
        assert len(tick.run_requests) == 2 and sensor.evaluate_tick(context).run_requests == []


def _raw_approval(conn, recommendation_id: str, decision_id: str) -> int:
    """An approval row as the API's transaction inserts it (before its audit event and commit)."""
    return conn.execute(insert(decisions).values(
        decision_id=decision_id, recommendation_id=recommendation_id, action="approve", actor_id="ADV-1", via="api",
        payload="{}", created_at=PUBLISHED_AT + timedelta(hours=2)).returning(decisions.c.decision_seq)).scalar_one()


def test_decision_sensor_does_not_lose_a_decision_that_commits_after_a_later_one(store, daemon):
    if store.dialect != "postgresql":
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): its decisions commit in sequence order")
    publish(store, package("REC-1", account_id="ACC-1"), package("REC-2", account_id="ACC-2"))
    daemon.start("approval_decisions")
    with store.engine.connect() as slow:
        slow_transaction = slow.begin()
        early = _raw_approval(slow, "REC-1", "d-early")  # takes its number first, commits last
        with store.begin() as conn:
            late = _raw_approval(conn, "REC-2", "d-late")
        assert early < late

        first = daemon.tick(PUBLISHED_AT + timedelta(hours=3), "approval_decisions")
        assert [r.tags["dagster/run_key"] for r in daemon.runs("approval_decisions")] == ["decision:d-late"]
        assert DecisionCursor.parse(first.cursor).floor < early
        slow_transaction.commit()

    second = daemon.tick(PUBLISHED_AT + timedelta(hours=3, minutes=1), "approval_decisions")
    assert [r.tags["dagster/run_key"] for r in daemon.runs("approval_decisions")] == [
        "decision:d-early", "decision:d-late"]
    # The later decision was requested again while the floor waited: Dagster skipped its run key.
    assert sorted(second.run_keys) == ["decision:d-early", "decision:d-late"] and len(second.run_ids) == 1
    assert DecisionCursor.parse(second.cursor).floor == late


def test_decision_sensor_steps_over_a_rolled_back_decision_after_an_hour(store):
    if store.dialect != "postgresql":
        pytest.skip("a rolled-back insert consumes a sequence number on Postgres only")
    publish(store, package("REC-1", account_id="ACC-1"), package("REC-2", account_id="ACC-2"))
    with store.engine.connect() as failed:
        with failed.begin() as transaction:
            lost = _raw_approval(failed, "REC-1", "d-rolled-back")
            transaction.rollback()
    with store.begin() as conn:
        kept = _raw_approval(conn, "REC-2", "d-kept")
    start = PUBLISHED_AT + timedelta(hours=3)
    cursor, requested = None, []
    with instance_for_test() as instance:
        for minutes in (0, 30, 61):
            sensor = build_approval_decisions_sensor(clock=lambda m=minutes: start + timedelta(minutes=m))
            with build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"workflow_store": WorkflowStoreResource(url=store.url)}) as context:
                tick = sensor.evaluate_tick(context)
            cursor = tick.cursor
            requested.append([r.run_key for r in tick.run_requests])
            if minutes == 30:
                assert DecisionCursor.parse(cursor).floor == lost - 1  # still waiting for the hole
    assert requested == [["decision:d-kept"]] * 3
    assert DecisionCursor.parse(cursor) == DecisionCursor(floor=kept, high=kept)


def test_the_decision_cursor_waits_at_a_hole_and_steps_over_it_after_the_patience():
    t0 = datetime(2026, 11, 20, 22, 0, tzinfo=timezone.utc)
    patience = timedelta(hours=1)
    waiting = advance_cursor(DecisionCursor(), [1, 2, 4, 5], t0, patience)
    assert waiting == DecisionCursor(floor=2, high=5, hole_from=3, hole_since=t0.isoformat())
    # 3 commits late: the floor moves over everything seen.
    assert advance_cursor(waiting, [3, 4, 5], t0 + timedelta(minutes=5), patience) == DecisionCursor(floor=5, high=5)
    # 3 never comes: the floor waits for the patience, then steps over it.
    assert advance_cursor(waiting, [4, 5], t0 + timedelta(minutes=59), patience).floor == 2
    assert advance_cursor(waiting, [4, 5], t0 + timedelta(hours=1), patience) == DecisionCursor(floor=5, high=5)
    assert DecisionCursor.parse("7") == DecisionCursor(floor=7, high=7)


def test_approval_definitions_load_with_the_local_resources(tmp_path):
    local = load_settings({"REBAL_HOME": str(tmp_path)})
    repo = Definitions(jobs=approval_defs.jobs, sensors=approval_defs.sensors,
                       resources=resources_for(local)).get_repository_def()
    assert set(repo.job_names) >= {"execute_rebalance", "notify_recommendation"}
    sensors = {s.name: s for s in repo.sensor_defs}
    assert sensors["approval_decisions"].minimum_interval_seconds == 30
    assert sensors["approval_escalations"].minimum_interval_seconds == 300
    assert outbox.notification_path(local.outbox_root(), "reminder:x").parent == tmp_path / "outbox" / "notifications"
