"""The approval sensors: they decide, runs act (docs/architecture.md, "Hand-offs").

approval_decisions (every 30 s)
    Decisions that may execute (approve, modify, auto_approve) whose gate verdict is still empty →
    RunRequest(run_key="decision:<decision_id>", job=execute_rebalance). Dagster launches a run
    key once per sensor, so a decision seen by two ticks still runs once.

    Cursor: `approval_watch.DecisionCursor` (workflow/approval_watch.py: the floor below which
    every decision_seq has been seen, and why it waits below a hole for up to `hole_patience`,
    default 1 h: no store transaction lasts that long). While the floor waits, decisions above it
    are requested again at each tick while their verdict is empty: Dagster skips those run keys.

market_event_batches (every 60 s)
    A market-event batch whose release time has come (the latest event + the policy's
    release_after_minutes) and that holds approved decisions → RunRequest(run_key=
    "market_batch_release:<batch>-r<n>", job=execute_rebalance, release_id): the run claims the
    release once (market_events/batches.py E6), gates each decision and blocks their orders per
    custodian and symbol. Decisions made after a release go in the next one, at the next tick.

approval_escalations (every 5 min)
    `lifecycle.due_notifications` (24h reminder to the advisor, 48h escalation to compliance;
    deferred ones after their date; not weekly-batch ones) and `lifecycle.weekly_digest_due` (one
    digest per advisor per ISO week for base-tier recommendations) → RunRequest(run_key=<the
    notification key>, job=notify_recommendation). Digests already recorded are not requested
    again. The run records the notification exactly once (`record_notification`, unique key)
    and writes the mailer's outbox file. Cursor: the time of the last evaluation (informational).

    Hours: `lifecycle.lifecycle_policy` (the approval section of the drift policy that the
    `drift_policy_source` resource names, overridden by the `approval_clock` resource's
    REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS; resources_for builds both from the settings the
    code location loaded with), or a `policy` given to the factory.

The clock seam: both sensors are built by factories taking `clock` (a function returning an aware
datetime; default: the wall clock in UTC). Production uses the module-level sensors built with
the wall clock; tests build their own, e.g. `build_approval_escalations_sensor(clock=lambda: t)`,
and the time they evaluate at travels to the run in its config (`due_at`), so a notification is
recorded as of the tick that found it due. There is deliberately no environment variable that
moves the production clock.
"""


import json
from datetime import datetime, timedelta
from typing import Callable

from dagster import RunRequest, SensorEvaluationContext, SensorResult, sensor

from rebal_pipeline.core.clock import utc, utc_now
from rebal_pipeline.defs.approvals.jobs import NotificationConfig, execute_rebalance, notify_recommendation
from rebal_pipeline.resources import ApprovalClockResource, DriftPolicySource, WorkflowStoreResource, settings_of
from rebal_pipeline.market_events import batches
from rebal_pipeline.workflow import approval_watch, lifecycle

Clock = Callable[[], datetime]

DECISION_RUN_KEY_PREFIX = "decision:"
RECOMMENDATION_TAG = "rebal/recommendation"


# ---------------------------------------------------------------------------------------------
# approval_decisions
# ---------------------------------------------------------------------------------------------


def decision_run_request(decision_id: str, recommendation_id: str, action: str) -> RunRequest:
    return RunRequest(
        run_key=f"{DECISION_RUN_KEY_PREFIX}{decision_id}",
        job_name=execute_rebalance.name,
        run_config={"ops": {"approval_gate": {"config": {"decision_id": decision_id}}}},
        tags={RECOMMENDATION_TAG: recommendation_id, "rebal/decision": decision_id, "rebal/action": action},
    )


def build_approval_decisions_sensor(clock: Clock = utc_now, hole_patience: timedelta = timedelta(hours=1),
                                    batch: int = 500, name: str = "approval_decisions",
                                    minimum_interval_seconds: int = 30):
    @sensor(
        name=name,
        job=execute_rebalance,
        minimum_interval_seconds=minimum_interval_seconds,
        description="Launches execute_rebalance once per approval decision (approve, modify, auto_approve) "
                    "not yet checked by the approval gate. run_key = decision:<decision_id>.",
    )
    def _approval_decisions(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        cursor = approval_watch.DecisionCursor.parse(context.cursor)
        with workflow_store.open() as store, store.begin() as conn:
            seen = approval_watch.decisions_above(conn, cursor, utc(clock()), hole_patience, batch)
        requests = [decision_run_request(r.decision_id, r.recommendation_id, r.action) for r in seen.waiting]
        if not requests:
            return SensorResult(skip_reason=f"no approval waiting for the gate above decision {cursor.floor}",
                                cursor=seen.cursor.dump())
        return SensorResult(run_requests=requests, cursor=seen.cursor.dump())

    return _approval_decisions


# ---------------------------------------------------------------------------------------------
# market_event_batches
# ---------------------------------------------------------------------------------------------

RELEASE_RUN_KEY_PREFIX = "market_batch_release:"


def release_run_request(release: batches.DueRelease) -> RunRequest:
    return RunRequest(
        run_key=f"{RELEASE_RUN_KEY_PREFIX}{release.release_id}",
        job_name=execute_rebalance.name,
        run_config={"ops": {"approval_gate": {"config": {"release_id": release.release_id}}}},
        tags={"rebal/release": release.release_id, "rebal/market_batch": release.batch_id},
    )


def build_market_event_batches_sensor(clock: Clock = utc_now, name: str = "market_event_batches",
                                      minimum_interval_seconds: int = 60):
    @sensor(
        name=name,
        job=execute_rebalance,
        minimum_interval_seconds=minimum_interval_seconds,
        description="Launches execute_rebalance once per release of a market-event batch (its approved trades as "
                    "block orders), when the release time has come. run_key = market_batch_release:<release id>.",
    )
    def _market_event_batches(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            due = batches.due_releases(conn, now)
        if not due:
            return SensorResult(skip_reason=f"no market-event batch due for release at {now.isoformat()}")
        return SensorResult(run_requests=[release_run_request(r) for r in due])

    return _market_event_batches


# ---------------------------------------------------------------------------------------------
# approval_escalations
# ---------------------------------------------------------------------------------------------


def notification_run_request(config: NotificationConfig, tags: dict[str, str]) -> RunRequest:
    return RunRequest(
        run_key=config.notification_key,
        job_name=notify_recommendation.name,
        run_config={"ops": {"record_and_post_notification": {"config": config.model_dump()}}},
        tags={"rebal/notification": config.kind, **tags},
    )


def build_approval_escalations_sensor(clock: Clock = utc_now, policy: lifecycle.LifecyclePolicy | None = None,
                                      name: str = "approval_escalations", minimum_interval_seconds: int = 300):
    @sensor(
        name=name,
        job=notify_recommendation,
        minimum_interval_seconds=minimum_interval_seconds,
        description="24h reminders, 48h escalations to compliance and weekly digests of base-tier "
                    "recommendations, once each. run_key = the notification key.",
    )
    def _approval_escalations(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource,
                              approval_clock: ApprovalClockResource, drift_policy_source: DriftPolicySource):
        now = utc(clock())
        rules = policy or lifecycle.lifecycle_policy(
            rebal_settings=settings_of(approval_clock, drift_policy_source=drift_policy_source))
        with workflow_store.open() as store, store.begin() as conn:
            due, digests = approval_watch.notifications_due(conn, now, rules)
        requests = [notification_run_request(NotificationConfig(
            kind=d["kind"], notification_key=d["notification_key"], due_at=now.isoformat(),
            recommendation_id=d["recommendation_id"]), {RECOMMENDATION_TAG: d["recommendation_id"]}) for d in due]
        requests += [notification_run_request(NotificationConfig(
            kind="weekly_digest", notification_key=d["notification_key"], due_at=now.isoformat(),
            advisor_id=d["advisor_id"], recommendation_ids=d["recommendation_ids"]), {"rebal/advisor": d["advisor_id"]})
            for d in digests]
        cursor = json.dumps({"evaluated_at": now.isoformat(), "requested": len(requests)})
        if not requests:
            return SensorResult(skip_reason=f"nothing due at {now.isoformat()}", cursor=cursor)
        return SensorResult(run_requests=requests, cursor=cursor)

    return _approval_escalations


approval_decisions = build_approval_decisions_sensor()
approval_escalations = build_approval_escalations_sensor()
market_event_batches = build_market_event_batches_sensor()
