"""Runs launched by the comms sensors: each sends what one subject owes, once (issue #6).

    send_advisor_alert     the advisor's alert for one pending recommendation, and its CRM task
    send_notification      one reminder, escalation, weekly digest or operations alert
    communicate_execution  after a decision's orders are all done: the client confirmation per
                           account and the CRM note

What each sends, the exactly-once keys and the retry rules are comms/delivery.py's; what they are
sent with (relay, links, CRM, approval clock) are the `email`, `links`, `crm`, `approval_clock`
and `drift_policy_source` resources (resources.py), one `CommsSettings` per run. A run fails only
for what nobody can retry (`CannotSend`) or for an unexpected error while sending (a bug), after
recording it; a peer that is down leaves the message `retry` for `outbound_retries`.
"""

from dagster import Config, Failure, MetadataValue, OpExecutionContext, Output, job, op
from pydantic import Field

from rebal_pipeline.comms import delivery
from rebal_pipeline.comms.delivery import CannotSend, NOTIFICATION_KINDS, Outcome
from rebal_pipeline.core.clock import run_time
from rebal_pipeline.resources import (
    ApprovalClockResource, CrmResource, DriftPolicySource, EmailResource, LinksResource, Warehouse,
    WorkflowStoreResource, comms_settings,
)


def _report(context: OpExecutionContext, what: str, outcomes: list[Outcome]):
    described = [delivery.describe(o) for o in outcomes]
    for item in described:
        line = f"{item['kind']} {item['key']}: {item['status']}"
        if item.get("error") and item["status"] in ("retry", "rejected"):
            line += f" ({item['error']})"
        (context.log.warning if item["status"] in ("retry", "rejected") else context.log.info)(line)
    broken = [delivery.key_for_people(o.message_key) for o in outcomes if o.unexpected]
    counts: dict[str, int] = {}
    for item in described:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    metadata = {"messages": MetadataValue.json(described), **{f"count_{k}": v for k, v in sorted(counts.items())}}
    if broken:
        # Recorded (retry) first; the run fails so that the unexpected error is seen and fixed.
        raise Failure(description=f"{what}: unexpected error while sending {', '.join(broken)}; they are queued "
                                  "for a retry (see the log)", metadata=metadata)
    return Output(described, metadata=metadata)


def _send(context: OpExecutionContext, what: str, send):
    try:
        outcomes = send()
    except CannotSend as exc:
        raise Failure(description=str(exc), allow_retries=exc.allow_retries) from None
    return _report(context, what, outcomes)


class AlertConfig(Config):
    recommendation_id: str = Field(description="wf_recommendations.recommendation_id (the sensor sets it)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="Send the advisor's alert for one pending recommendation (email with package, chart and signed "
                "links) and open the CRM task, each once.")
def deliver_advisor_alert(context: OpExecutionContext, config: AlertConfig, workflow_store: WorkflowStoreResource,
                          warehouse: Warehouse, email: EmailResource, crm: CrmResource, links: LinksResource,
                          approval_clock: ApprovalClockResource, drift_policy_source: DriftPolicySource):
    comms = comms_settings(email, crm, links, approval_clock, drift_policy_source)
    with workflow_store.open() as store:
        yield _send(context, f"alert for {config.recommendation_id}", lambda: delivery.send_alert(
            store, warehouse, config.recommendation_id, run_time(config.now), comms=comms))


@job(description="The advisor's alert for one recommendation (launched by the advisor_alerts sensor, run_key "
                 "alert:<recommendation_id>, and by outbound_retries).", tags={"rebal/workflow": "comms"})
def send_advisor_alert():
    deliver_advisor_alert()


class NotificationEmailConfig(Config):
    notification_key: str = Field(description="The notification's key (also the run key and the message key)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="Email one reminder, escalation or weekly digest recorded in the workflow store to its recipient, "
                "or one operations alert to the operations team, once.")
def deliver_notification(context: OpExecutionContext, config: NotificationEmailConfig,
                         workflow_store: WorkflowStoreResource, warehouse: Warehouse, email: EmailResource,
                         crm: CrmResource, links: LinksResource, approval_clock: ApprovalClockResource,
                         drift_policy_source: DriftPolicySource):
    comms = comms_settings(email, crm, links, approval_clock, drift_policy_source)
    with workflow_store.open() as store:
        yield _send(context, f"notification {config.notification_key}", lambda: delivery.send_notification_email(
            store, warehouse, config.notification_key, run_time(config.now), comms=comms))


@job(description="One reminder, escalation, weekly digest or operations alert email (launched by the mailer_outbox "
                 "and operations_alerts sensors, run_key = the notification key, and by outbound_retries).",
     tags={"rebal/workflow": "comms"})
def send_notification():
    deliver_notification()


class ExecutionConfig(Config):
    decision_id: str = Field(description="wf_decisions.decision_id whose orders are all done (the sensor sets it)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="After a decision's orders are all done: the client confirmation (once per account) and the CRM "
                "note (once). A CRM or SMTP outage leaves the message queued for a retry; it fails nothing.")
def deliver_execution_messages(context: OpExecutionContext, config: ExecutionConfig,
                               workflow_store: WorkflowStoreResource, warehouse: Warehouse, email: EmailResource,
                               crm: CrmResource, links: LinksResource, approval_clock: ApprovalClockResource,
                               drift_policy_source: DriftPolicySource):
    comms = comms_settings(email, crm, links, approval_clock, drift_policy_source)
    with workflow_store.open() as store:
        yield _send(context, f"execution of decision {config.decision_id}", lambda: delivery.send_execution_messages(
            store, warehouse, config.decision_id, run_time(config.now), comms=comms))


@job(description="Client confirmation and CRM note for one executed decision (launched by the "
                 "executed_recommendations sensor, run_key executed:<decision_id>, and by outbound_retries).",
     tags={"rebal/workflow": "comms"})
def communicate_execution():
    deliver_execution_messages()


def retry_target(row: dict) -> tuple[str, str, dict] | None:
    """(job name, subject, op config) that re-sends this wf_messages row (the outbound_retries
    sensor); None for a kind no job here sends."""
    kind, key = row["kind"], row["message_key"]
    if kind in ("alert", "crm_task") and row["recommendation_id"]:
        return (send_advisor_alert.name, f"alert:{row['recommendation_id']}",
                {"deliver_advisor_alert": {"recommendation_id": row["recommendation_id"]}})
    # Reminders, escalations, digests, operations alerts and market-event batch emails (their
    # first send is the scan run's: market_events/report.py).
    if kind in (*NOTIFICATION_KINDS, "market_event"):
        return send_notification.name, key, {"deliver_notification": {"notification_key": key}}
    if kind in ("confirmation", "crm_note"):
        decision_id = key.split(":")[1] if key.count(":") >= 1 else ""
        if decision_id:
            return (communicate_execution.name, f"executed:{decision_id}",
                    {"deliver_execution_messages": {"decision_id": decision_id}})
    return None
