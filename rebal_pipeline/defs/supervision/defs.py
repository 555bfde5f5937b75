"""The supervisory review report in Dagster: the `supervisory_report` job and its schedule, for
definitions.py to assemble. What the report says and how it is sent is rebal_pipeline/supervision/.

    supervisory_report            one run = one period's report: HTML, PDF and CSV written under
                                  <REBAL_HOME>/outbox/supervision/<from>_<to>/, their SHA-256s
                                  recorded in the audit chain (once), emailed to every active
                                  compliance user through the outbox (once each). Op config: from /
                                  to (YYYY-MM-DD; empty: the last complete period of the policy's
                                  frequency before the run), now, email.
    supervisory_report_schedule   the policy's `supervision.frequency` (weekly: Mondays 07:00 New
                                  York for the Monday-to-Sunday week just ended; monthly: the 1st;
                                  quarterly: 1 Jan/Apr/Jul/Oct), run_key supervisory_report:<from>:<to>.
                                  STOPPED on a new instance, like every other automation.

Resources: `workflow_store`, `feed` (the archive holding the audit anchors), `advisor_overrides`
(the wash-sale override file), `drift_policy_source`, and what the email is sent with: `email`,
`crm`, `links`, `approval_clock` (resources.comms_settings).
"""

from datetime import date
from pathlib import Path

from dagster import (
    Config, DefaultScheduleStatus, Failure, MetadataValue, OpExecutionContext, Output, RunRequest,
    ScheduleEvaluationContext, job, op, schedule,
)
from pydantic import Field

from rebal_pipeline.core.clock import run_time
from rebal_pipeline.resources import (
    AdvisorOverrides, ApprovalClockResource, CrmResource, DriftPolicySource, EmailResource, FeedLocation,
    LinksResource, WorkflowStoreResource, comms_settings,
)
from rebal_pipeline.supervision.report import FIRM_TIMEZONE, Period, period_ending_before

SCHEDULE_NAME = "supervisory_report_schedule"
# 07:00 New York on the first day after the period: every day of it is over, the daily runs of its
# last session are long done, and the report is in the compliance officer's inbox in the morning.
CRONS = {"weekly": "0 7 * * 1", "monthly": "0 7 1 * *", "quarterly": "0 7 1 1,4,7,10 *"}


class SupervisoryReportConfig(Config):
    date_from: str = Field(default="", description="First day of the period, YYYY-MM-DD (empty: the last "
                                                   "complete period of the policy's frequency before `now`)")
    date_to: str = Field(default="", description="Last day of the period, YYYY-MM-DD (inclusive)")
    now: str = Field(default="", description="ISO-8601 time of the schedule tick; empty: the wall clock")
    email: bool = Field(default=True, description="Email the report to every active compliance user")
    scheduled: bool = Field(default=False, description="Set by the schedule: the report names the policy's frequency")


def _period(config: SupervisoryReportConfig, frequency: str, now) -> Period:
    if bool(config.date_from) != bool(config.date_to):
        raise Failure(description="give both date_from and date_to, or neither (the last complete period)",
                      allow_retries=False)
    if config.date_from:
        try:
            return Period(date.fromisoformat(config.date_from), date.fromisoformat(config.date_to))
        except ValueError as error:
            raise Failure(description=f"the period is not usable: {error}", allow_retries=False) from None
    return period_ending_before(frequency, now.astimezone(FIRM_TIMEZONE).date())


@op(description="Write the period's supervisory review report (HTML, PDF, CSV), record its SHA-256s in the audit "
                "chain once and email it to every active compliance user once.")
def write_supervisory_report(context: OpExecutionContext, config: SupervisoryReportConfig,
                             workflow_store: WorkflowStoreResource, feed: FeedLocation,
                             advisor_overrides: AdvisorOverrides, email: EmailResource, crm: CrmResource,
                             links: LinksResource, approval_clock: ApprovalClockResource,
                             drift_policy_source: DriftPolicySource):
    from rebal_pipeline import settings
    from rebal_pipeline.supervision.deliver import default_folder, produce, report_rules
    from rebal_pipeline.workflow import audit

    comms = comms_settings(email, crm, links, approval_clock, drift_policy_source)
    rules = report_rules(drift_policy_source.load(), comms.settings)
    now = run_time(config.now)
    period = _period(config, rules.frequency, now)
    scheduled = config.scheduled or not config.date_from
    with workflow_store.open() as store:
        with store.begin() as conn:
            anchors = audit.anchor_dir(conn, feed.archive_root)
        produced = produce(store, period, out_dir=default_folder(settings.current(), period), now=now,
                           review_window_hours=rules.review_window_hours, micro_trade_limit=rules.micro_trade_limit,
                           frequency=rules.frequency if scheduled else None, anchors=anchors,
                           wash_sale_overrides=Path(advisor_overrides.wash_sale_file),
                           comms=comms if config.email else None)
    report = produced.report
    deliveries = [{"key": d.message_key, "status": d.status, "error": d.error} for d in produced.deliveries]
    metadata = {
        "period": f"{period.start} to {period.end}", "recommendations": len(report.recommendations),
        "decisions": len(report.decisions), "exceptions": len(report.exceptions),
        "audit_chain_verified": report.chain.verified, "audit_event": produced.recorded.event_id,
        "sha256": MetadataValue.json(produced.sha256),
        "files": MetadataValue.json({fmt: str(path) for fmt, path in produced.files.items()}),
        "emails": MetadataValue.json(deliveries),
    }
    for item in deliveries:
        (context.log.info if item["status"] in ("sent", "already_sent") else context.log.warning)(
            f"supervisory report email {item['key']}: {item['status']}" + (f" ({item['error']})" if item["error"] else ""))
    if not report.chain.verified:
        raise Failure(description=f"the report was written, but the audit chain does not verify: {report.chain.problem}",
                      metadata=metadata, allow_retries=False)
    unsent = [d["key"] for d in deliveries if d["status"] not in ("sent", "already_sent")]
    if unsent:
        # The outbox keeps them (sent ones are never sent again): re-executing this run retries them.
        raise Failure(description=f"not sent yet: {', '.join(unsent)}; re-execute this run once the relay is fixed",
                      metadata=metadata)
    if config.email and not deliveries:
        raise Failure(description="no active compliance user to email (users.csv role compliance)", metadata=metadata,
                      allow_retries=False)
    yield Output(produced.sha256, metadata=metadata)


@job(description="The supervisory review report of one period for compliance (launched by "
                 "supervisory_report_schedule, run_key supervisory_report:<from>:<to>, or by hand with from/to).",
     tags={"rebal/workflow": "supervision"})
def supervisory_report():
    write_supervisory_report()


def build_schedule(frequency: str):
    """The schedule of the policy's frequency (weekly | monthly | quarterly)."""
    if frequency not in CRONS:
        raise ValueError(f"supervision.frequency must be one of {', '.join(CRONS)}, not {frequency!r}")

    @schedule(name=SCHEDULE_NAME, job=supervisory_report, cron_schedule=CRONS[frequency],
              execution_timezone="America/New_York", default_status=DefaultScheduleStatus.STOPPED,
              description=f"The {frequency} supervisory review report of the period just ended (policy "
                          "supervision.frequency).")
    def supervisory_report_schedule(context: ScheduleEvaluationContext):
        tick = context.scheduled_execution_time
        period = period_ending_before(frequency, tick.astimezone(FIRM_TIMEZONE).date())
        return RunRequest(run_key=f"supervisory_report:{period.key}", run_config={"ops": {"write_supervisory_report": {
            "config": {"date_from": period.start.isoformat(), "date_to": period.end.isoformat(),
                       "now": tick.isoformat(), "scheduled": True}}}})

    return supervisory_report_schedule


def build_schedules(rebal_settings=None) -> list:
    """[the schedule] for the drift policy of `rebal_settings` (default: the process environment's)."""
    from rebal_pipeline import settings
    from rebal_pipeline.core.policy import load_policy

    current = rebal_settings if rebal_settings is not None else settings.current()
    return [build_schedule(load_policy(current.policy_file()).supervision.frequency)]


jobs = [supervisory_report]
schedules = build_schedules()
