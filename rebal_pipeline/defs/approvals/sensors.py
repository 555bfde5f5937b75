"""The approval sensors: they decide, runs act (docs/architecture.md, "Hand-offs").

approval_decisions (every 30 s)
    Decisions that may execute (approve, modify, auto_approve) whose gate verdict is still empty →
    RunRequest(run_key="decision:<decision_id>", job=execute_rebalance). Dagster launches a run
    key once per sensor, so a decision seen by two ticks still runs once.

    Cursor: JSON {"floor", "high", "hole_from", "hole_since"}. `floor` is the highest decision_seq
    below which every sequence number has been seen; each tick reads the decisions above it.
    Postgres assigns sequence numbers at insert, not at commit, so decision 10 may commit after
    decision 11 (both API transactions wait for the audit chain's lock, in either order): a
    "high-water mark" cursor would step over 10 for ever. So the floor stops below a hole (a
    number not visible while a higher one is) until the hole fills; a hole that stays open longer
    than `hole_patience` (default 1 h: no store transaction lasts that long) was a rolled-back
    insert or a sequence jump after a server crash, and the floor steps over it. While the floor
    waits, decisions above it are requested again at each tick while their verdict is empty:
    Dagster skips those run keys. A plain integer cursor (the floor) is accepted too.

approval_escalations (every 5 min)
    `lifecycle.due_notifications` (24h reminder to the advisor, 48h escalation to compliance;
    deferred ones after their date; not weekly-batch ones) and `lifecycle.weekly_digest_due` (one
    digest per advisor per ISO week for base-tier recommendations) → RunRequest(run_key=<the
    notification key>, job=notify_recommendation). Digests already recorded are not requested
    again. The run records the notification exactly once (`record_notification`, unique key)
    and writes the mailer's outbox file. Cursor: the time of the last evaluation (informational).

    Hours: LifecyclePolicy, overridden by REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS (read at
    each tick in the code server's environment), or by a `policy` given to the factory.

The clock seam: both sensors are built by factories taking `clock` (a function returning an aware
datetime; default: the wall clock in UTC). Production uses the module-level sensors built with
the wall clock; tests build their own, e.g. `build_approval_escalations_sensor(clock=lambda: t)`,
and the time they evaluate at travels to the run in its config (`due_at`), so a notification is
recorded as of the tick that found it due. There is deliberately no environment variable that
moves the production clock.
"""


import json
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable

from dagster import RunRequest, SensorEvaluationContext, SensorResult, sensor
from sqlalchemy import select

from rebal_pipeline.defs.approvals.jobs import (
    EXECUTABLE, NotificationConfig, execute_rebalance, notify_recommendation, utc_now,
)
from rebal_pipeline.resources import WorkflowStoreResource
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.schema import decisions, notifications

Clock = Callable[[], datetime]

DECISION_RUN_KEY_PREFIX = "decision:"
RECOMMENDATION_TAG = "rebal/recommendation"


def _utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


# ---------------------------------------------------------------------------------------------
# approval_decisions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionCursor:
    floor: int = 0  # every decision_seq <= floor has been seen (and requested if executable)
    high: int = 0  # the highest decision_seq seen (for the UI)
    hole_from: int | None = None  # floor + 1, when it is not visible while a higher seq is
    hole_since: str | None = None  # when that hole was first seen (ISO-8601, the sensor's clock)

    @classmethod
    def parse(cls, raw: str | None) -> "DecisionCursor":
        if not raw:
            return cls()
        if raw.strip().isdigit():
            return cls(floor=int(raw), high=int(raw))
        return cls(**json.loads(raw))

    def dump(self) -> str:
        return json.dumps({"floor": self.floor, "high": self.high, "hole_from": self.hole_from,
                           "hole_since": self.hole_since}, sort_keys=True)


def advance_cursor(cursor: DecisionCursor, seen: list[int], now: datetime, hole_patience: timedelta) -> DecisionCursor:
    """Move the floor over the contiguous sequence numbers seen above it (sorted), stopping at the
    first hole unless that same hole has been open for `hole_patience`."""
    floor, hole_from, hole_since = cursor.floor, None, None
    for seq in seen:
        if seq <= floor:
            continue
        if seq == floor + 1:
            floor = seq
            continue
        if cursor.hole_from == floor + 1 and cursor.hole_since:
            if now - datetime.fromisoformat(cursor.hole_since) >= hole_patience:
                floor = seq  # rolled back, or skipped by the sequence: nothing will ever fill it
                continue
            hole_from, hole_since = cursor.hole_from, cursor.hole_since
        else:
            hole_from, hole_since = floor + 1, now.isoformat()
        break
    return DecisionCursor(floor=floor, high=max([cursor.high, *seen]), hole_from=hole_from, hole_since=hole_since)


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
        cursor = DecisionCursor.parse(context.cursor)
        with workflow_store.open() as store, store.begin() as conn:
            rows = conn.execute(
                select(decisions.c.decision_seq, decisions.c.decision_id, decisions.c.recommendation_id,
                       decisions.c.action, decisions.c.gate_verdict)
                .where(decisions.c.decision_seq > cursor.floor)
                .order_by(decisions.c.decision_seq).limit(batch)
            ).all()
        requests = [decision_run_request(r.decision_id, r.recommendation_id, r.action)
                    for r in rows if r.action in EXECUTABLE and r.gate_verdict is None]
        after = advance_cursor(cursor, [r.decision_seq for r in rows], _utc(clock()), hole_patience)
        if not requests:
            return SensorResult(skip_reason=f"no approval waiting for the gate above decision {cursor.floor}",
                                cursor=after.dump())
        return SensorResult(run_requests=requests, cursor=after.dump())

    return _approval_decisions


# ---------------------------------------------------------------------------------------------
# approval_escalations
# ---------------------------------------------------------------------------------------------


def policy_from_env(base: lifecycle.LifecyclePolicy | None = None) -> lifecycle.LifecyclePolicy:
    """LifecyclePolicy with REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS applied (base: the
    drift policy file's approval section)."""
    if base is None:
        return lifecycle.lifecycle_policy()
    hours = {}
    for variable, field in (("REBAL_REMINDER_HOURS", "reminder_hours"), ("REBAL_ESCALATION_HOURS", "escalation_hours")):
        raw = os.environ.get(variable, "").strip()
        if not raw:
            continue
        try:
            hours[field] = float(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is not a number of hours") from None
        if hours[field] <= 0:
            raise ValueError(f"{variable} must be positive, not {raw}")
    policy = replace(base, **hours)
    if policy.reminder_hours >= policy.escalation_hours:
        raise ValueError(f"the reminder ({policy.reminder_hours}h) must come before the escalation "
                         f"({policy.escalation_hours}h): check REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS")
    return policy


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
    def _approval_escalations(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        rules = policy or policy_from_env()
        with workflow_store.open() as store, store.begin() as conn:
            due = lifecycle.due_notifications(conn, now, rules)
            digests = lifecycle.weekly_digest_due(conn, now)
            # weekly_digest_due lists a digest all week long, sent or not: ask for the unsent ones only.
            keys = [d["notification_key"] for d in digests]
            sent = {r.notification_key for r in conn.execute(select(notifications.c.notification_key)
                                                             .where(notifications.c.notification_key.in_(keys)))}
        requests = [notification_run_request(NotificationConfig(
            kind=d["kind"], notification_key=d["notification_key"], due_at=now.isoformat(),
            recommendation_id=d["recommendation_id"]), {RECOMMENDATION_TAG: d["recommendation_id"]}) for d in due]
        requests += [notification_run_request(NotificationConfig(
            kind="weekly_digest", notification_key=d["notification_key"], due_at=now.isoformat(),
            advisor_id=d["advisor_id"], recommendation_ids=d["recommendation_ids"]), {"rebal/advisor": d["advisor_id"]})
            for d in digests if d["notification_key"] not in sent]
        cursor = json.dumps({"evaluated_at": now.isoformat(), "requested": len(requests)})
        if not requests:
            return SensorResult(skip_reason=f"nothing due at {now.isoformat()}", cursor=cursor)
        return SensorResult(run_requests=requests, cursor=cursor)

    return _approval_escalations


approval_decisions = build_approval_decisions_sensor()
approval_escalations = build_approval_escalations_sensor()
