"""The comms sensors: they find what is owed a message; the runs send it, once (docs/architecture.md, "Hand-offs").

advisor_alerts (every 30 s)
    Pending recommendations published within `max_age` (default 3 days: an older one is past its
    reminder and escalation already) that have no alert row in wf_messages, except weekly-batch
    (base-tier) ones, which the weekly digest covers → RunRequest(run_key="alert:<recommendation_id>",
    job=send_advisor_alert). No cursor: the filter is the state (once the run has inserted the
    alert's row the recommendation is not listed again; until then Dagster skips the run key).

mailer_outbox (every 30 s)
    Reminders, escalations and weekly digests recorded by the approval runs (wf_notifications,
    committed with the recommendation's state change) within `max_age` (default 3 days) with no
    row in wf_messages → RunRequest(run_key=<notification_key>, job=send_notification). No
    cursor: the filter is the state, as for operations_alerts. The workflow store is the hand-off
    (issue #12): the copy the approval run writes under outbox/notifications/ is for people and
    is not read, so a missing, partial or left-over file changes nothing.

operations_alerts (every 30 s)
    Operations alerts (wf_notifications kind operations_alert, recorded by
    workflow/operations_alerts.py: late custodian files, a connection to re-authorize, …) recorded
    within `max_age` (default 3 days: an older one is stale news, left to the audit trail) with no
    row in wf_messages → RunRequest(run_key=<notification_key>, job=send_notification), which
    emails the operations team. No cursor: the filter is the state, as for advisor_alerts.

executed_recommendations (every 30 s)
    Decisions whose orders all left: `done` and `submitted`, or staged and confirmed `executed` by
    the trading desk (`rebal orders-executed`), the last completed within `lookback`
    (default 7 days), with no client confirmation row yet → RunRequest(run_key=
    "executed:<decision_id>", job=communicate_execution).

outbound_retries (every 60 s)
    wf_messages rows due again (`retry` whose next_attempt_at has come; `pending` whose lease ran
    out: the sender died mid-send) → the job that sends them, one run per subject (recommendation,
    notification, decision), run_key "retry:<subject>:<digest of the rows' keys and attempts>":
    each new attempt gets a new run key, two ticks before the run starts ask for the same one. A
    CRM note left `retry` by an outage is re-attempted here, never blocking anything else.

Every sensor is built by a factory taking `clock` (tests inject one; production uses the wall
clock). The tick's time travels to the run in its config (`now`), as in the approval sensors.
"""


import hashlib
from datetime import datetime, timedelta
from typing import Callable

from dagster import RunRequest, SensorEvaluationContext, SensorResult, sensor

from rebal_pipeline.comms import outbound
from rebal_pipeline.comms.delivery import OPERATIONS_ALERT
from rebal_pipeline.comms.waiting import (
    executed_decisions, notifications_waiting_for_email, operations_alerts_waiting_for_email,
    recommendations_waiting_for_alert,
)
from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.defs.comms.jobs import communicate_execution, retry_target, send_advisor_alert, send_notification
from rebal_pipeline.resources import WorkflowStoreResource

Clock = Callable[[], datetime]

RECOMMENDATION_TAG = "rebal/recommendation"
MESSAGE_TAG = "rebal/message"


# ---------------------------------------------------------------------------------------------
# advisor_alerts
# ---------------------------------------------------------------------------------------------


def alert_run_request(recommendation_id: str, now: datetime, urgency: str | None = None,
                      rerouted_to: str | None = None) -> RunRequest:
    # A recommendation re-routed to a new advisor (its advisor left) is alerted again: a run key
    # of its own, alert:<recommendation>:<new advisor> (Dagster would skip alert:<recommendation>).
    return RunRequest(
        run_key=f"alert:{recommendation_id}" + (f":{rerouted_to}" if rerouted_to else ""),
        job_name=send_advisor_alert.name,
        run_config={"ops": {"deliver_advisor_alert": {"config": {"recommendation_id": recommendation_id,
                                                                  "now": now.isoformat()}}}},
        tags={RECOMMENDATION_TAG: recommendation_id, MESSAGE_TAG: "alert", "rebal/urgency": urgency or ""},
    )


def build_advisor_alerts_sensor(clock: Clock = utc_now, max_age: timedelta = timedelta(days=3), batch: int = 500,
                                name: str = "advisor_alerts", minimum_interval_seconds: int = 30):
    @sensor(name=name, job=send_advisor_alert, minimum_interval_seconds=minimum_interval_seconds,
            description="Alerts the advisor (email + CRM task) once per new pending recommendation that is not "
                        "weekly-batch. run_key = alert:<recommendation_id>.")
    def _advisor_alerts(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            waiting = recommendations_waiting_for_alert(conn, now, now - max_age, batch)
        requests = [alert_run_request(r["recommendation_id"], now, r["urgency"],
                                      r["advisor_id"] if r.get("rerouted_at") else None) for r in waiting]
        if not requests:
            return SensorResult(skip_reason=f"no recommendation waiting for its alert at {now.isoformat()}")
        return SensorResult(run_requests=requests)

    return _advisor_alerts


# ---------------------------------------------------------------------------------------------
# mailer_outbox
# ---------------------------------------------------------------------------------------------


def notification_run_request(notification_key: str, kind: str, now: datetime) -> RunRequest:
    return RunRequest(
        run_key=notification_key,
        job_name=send_notification.name,
        run_config={"ops": {"deliver_notification": {"config": {"notification_key": notification_key,
                                                                 "now": now.isoformat()}}}},
        tags={MESSAGE_TAG: kind},
    )


def build_mailer_outbox_sensor(clock: Clock = utc_now, max_age: timedelta = timedelta(days=3), batch: int = 500,
                               name: str = "mailer_outbox", minimum_interval_seconds: int = 30):
    @sensor(name=name, job=send_notification, minimum_interval_seconds=minimum_interval_seconds,
            description="Emails each reminder, escalation and weekly digest recorded in the workflow store "
                        "(wf_notifications), once. run_key = the notification key.")
    def _mailer_outbox(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            waiting = notifications_waiting_for_email(conn, now, now - max_age, batch)
        # Once the run has inserted the message's wf_messages row it is not listed again; until
        # then Dagster skips the run key, so two ticks never launch two runs.
        requests = [notification_run_request(r["notification_key"], r["kind"], now) for r in waiting]
        if not requests:
            return SensorResult(skip_reason=f"no reminder, escalation or digest waiting to be emailed at "
                                            f"{now.isoformat()}")
        return SensorResult(run_requests=requests)

    return _mailer_outbox


# ---------------------------------------------------------------------------------------------
# operations_alerts
# ---------------------------------------------------------------------------------------------


def build_operations_alerts_sensor(clock: Clock = utc_now, max_age: timedelta = timedelta(days=3), batch: int = 500,
                                   name: str = "operations_alerts", minimum_interval_seconds: int = 30):
    @sensor(name=name, job=send_notification, minimum_interval_seconds=minimum_interval_seconds,
            description="Emails each operations alert (late custodian files, a connection to re-authorize, …) to "
                        "the operations team, once. run_key = the notification key.")
    def _operations_alerts(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            waiting = operations_alerts_waiting_for_email(conn, now, now - max_age, batch)
        # Once the run has inserted the alert's wf_messages row it is not listed again; until
        # then Dagster skips the run key, so two ticks never launch two runs.
        requests = [notification_run_request(r["notification_key"], OPERATIONS_ALERT, now) for r in waiting]
        if not requests:
            return SensorResult(skip_reason=f"no operations alert waiting to be emailed at {now.isoformat()}")
        return SensorResult(run_requests=requests)

    return _operations_alerts


# ---------------------------------------------------------------------------------------------
# executed_recommendations
# ---------------------------------------------------------------------------------------------


def execution_run_request(decision_id: str, recommendation_id: str, now: datetime) -> RunRequest:
    return RunRequest(
        run_key=f"executed:{decision_id}",
        job_name=communicate_execution.name,
        run_config={"ops": {"deliver_execution_messages": {"config": {"decision_id": decision_id,
                                                                       "now": now.isoformat()}}}},
        tags={RECOMMENDATION_TAG: recommendation_id, "rebal/decision": decision_id, MESSAGE_TAG: "confirmation"},
    )


def build_executed_recommendations_sensor(clock: Clock = utc_now, lookback: timedelta = timedelta(days=7),
                                          batch: int = 500, name: str = "executed_recommendations",
                                          minimum_interval_seconds: int = 30):
    @sensor(name=name, job=communicate_execution, minimum_interval_seconds=minimum_interval_seconds,
            description="Once a decision's orders are all done: the client confirmation and the CRM note, once. "
                        "run_key = executed:<decision_id>.")
    def _executed_recommendations(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            executed = executed_decisions(conn, now - lookback, batch)
        requests = [execution_run_request(r["decision_id"], r["recommendation_id"], now) for r in executed]
        if not requests:
            return SensorResult(skip_reason="no executed decision waiting for its client confirmation")
        return SensorResult(run_requests=requests)

    return _executed_recommendations


# ---------------------------------------------------------------------------------------------
# outbound_retries
# ---------------------------------------------------------------------------------------------


def retry_run_requests(rows: list[dict], now: datetime) -> list[RunRequest]:
    jobs = {j.name: j for j in (send_advisor_alert, send_notification, communicate_execution)}
    grouped: dict[tuple[str, str], dict] = {}
    for row in rows:
        target = retry_target(row)
        if target is None:
            continue
        job_name, subject, ops = target
        entry = grouped.setdefault((job_name, subject), {"ops": ops, "rows": []})
        entry["rows"].append(row)
    requests = []
    for (job_name, subject), entry in sorted(grouped.items()):
        attempts = "\n".join(sorted(f"{r['message_key']}#{r['attempts']}" for r in entry["rows"]))
        digest = hashlib.sha256(attempts.encode()).hexdigest()[:12]
        op_name, config = next(iter(entry["ops"].items()))
        requests.append(RunRequest(
            run_key=f"retry:{subject}:{digest}",
            job_name=jobs[job_name].name,
            run_config={"ops": {op_name: {"config": {**config, "now": now.isoformat()}}}},
            tags={MESSAGE_TAG: ",".join(sorted({r["kind"] for r in entry["rows"]})), "rebal/retry": "true",
                  **({RECOMMENDATION_TAG: entry["rows"][0]["recommendation_id"]}
                     if entry["rows"][0]["recommendation_id"] else {})},
        ))
    return requests


def build_outbound_retries_sensor(clock: Clock = utc_now, batch: int = 500, name: str = "outbound_retries",
                                  minimum_interval_seconds: int = 60):
    @sensor(name=name, jobs=[send_advisor_alert, send_notification, communicate_execution],
            minimum_interval_seconds=minimum_interval_seconds,
            description="Re-attempts emails and CRM calls whose retry time has come (a peer was down), through the "
                        "job that sends them. run_key = retry:<subject>:<attempts digest>.")
    def _outbound_retries(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = _utc(clock())
        with workflow_store.open() as store, store.begin() as conn:
            rows = outbound.due(conn, now, batch)
        requests = retry_run_requests(rows, now)
        if not requests:
            return SensorResult(skip_reason=f"no message due for a retry at {now.isoformat()}")
        return SensorResult(run_requests=requests)

    return _outbound_retries


advisor_alerts = build_advisor_alerts_sensor()
mailer_outbox = build_mailer_outbox_sensor()
operations_alerts = build_operations_alerts_sensor()
executed_recommendations = build_executed_recommendations_sensor()
outbound_retries = build_outbound_retries_sensor()
