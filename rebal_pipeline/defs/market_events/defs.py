"""Market-event batch scans in Dagster: the `market_event_scan` job and the `market_events`
sensor, for definitions.py to assemble. What they do is rebal_pipeline/market_events/.

    market_events (sensor, every policy `market_events.poll_seconds`, default 60 s)
        The day's newest intraday prices file (<feed_root>/intraday/<day>/prices_<HHMMSS>.csv) not
        looked at yet: when the policy's reference basket moved by at least its threshold since the
        day's latest event (before the first: since the last session's closes), a scan,
        run_key market_event:prices:<SHA-256 of the file>. A file the sensor cannot read is handed
        to a run too, which archives it and fails naming the file, line and column. And every
        recorded event whose scan has not published (an operator's declaration, a crashed scan):
        run_key market_event:<event_id>. Cursor: the last file looked at (informational for
        events, which the store holds). STOPPED on a new instance, like every other automation.
    market_event_scan (job)
        scan_market_event    archive and read the file, record the event once in the day's batch
                             (or find it absorbed), value every account at the event's prices in
                             shadows and publish, members added to the batch, in one transaction
        report_market_event  the batch's severity-sorted report as it stands after the event (HTML,
                             CSV; SHA-256 in the audit chain) and each advisor's part by email, once.
The batch's release (its approved trades as block orders) is the `market_event_batches` sensor's
(defs/approvals/sensors.py), because it launches execute_rebalance.
"""


import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from dagster import (
    Config, DefaultSensorStatus, Failure, In, MetadataValue, OpExecutionContext, Out, Output, RunRequest,
    SensorEvaluationContext, SensorResult, job, op, sensor,
)
from pydantic import Field

from rebal_pipeline import settings
from rebal_pipeline.core.clock import run_time, utc, utc_now
from rebal_pipeline.core.market_calendar import is_session, latest_closed_session
from rebal_pipeline.execution.submit import trading_day
from rebal_pipeline.market_events import batches, prices, scan, scanning
from rebal_pipeline.resources import (
    WAREHOUSE_POOL, AdvisorOverrides, ApprovalClockResource, CrmResource, DriftPolicySource, EmailResource,
    FeedLocation, LinksResource, Warehouse, WorkflowStoreResource, comms_settings, settings_of,
)
from rebal_pipeline.workflow import lifecycle

EVENT_TAG = "rebal/market_event"
BATCH_TAG = "rebal/market_batch"
PRICES_TAG = "rebal/prices_sha256"
RUN_KEY_PREFIX = "market_event:"


class MarketEventConfig(Config):
    prices_file: str = Field(default="", description="The intraday prices file, relative to the feed root "
                                                     "(intraday/<day>/prices_<HHMMSS>.csv); the sensor sets it")
    event_id: str = Field(default="", description="A recorded event to scan (an operator's declaration)")
    now: str = Field(default="", description="ISO-8601 time the scan publishes at; empty: the wall clock")


@op(out=Out(dict, description="The event and what its scan published (event_id empty: absorbed)."),
    description="Record the market event once in the day's batch, value every account at its prices and publish "
                "the alerts as the batch's recommendations.",
    pool=WAREHOUSE_POOL)
def scan_market_event(context: OpExecutionContext, config: MarketEventConfig, workflow_store: WorkflowStoreResource,
                      warehouse: Warehouse, feed: FeedLocation, drift_policy_source: DriftPolicySource,
                      advisor_overrides: AdvisorOverrides, approval_clock: ApprovalClockResource):
    if bool(config.prices_file) == bool(config.event_id):
        raise Failure(description="give exactly one of prices_file and event_id", allow_retries=False)
    now = run_time(config.now)
    policy = drift_policy_source.load()
    rule = policy.market_events
    feed_root, archive_root = Path(feed.feed_root), Path(feed.archive_root)
    try:
        with workflow_store.open() as store:
            if config.prices_file:
                received = scanning.receive_snapshot(feed_root, archive_root, config.prices_file)
                context.instance.add_run_tags(context.run_id, {PRICES_TAG: received.snapshot.sha256})
                if received.rejects_file is not None:
                    context.log.warning(f"{len(received.snapshot.rejects)} rows of {received.snapshot.shown_as} "
                                        f"quarantined: {received.rejects_file}")
                with scan.attached(warehouse.database) as con:
                    as_of = scan.newest_session(con, latest_closed_session(received.snapshot.priced_at))
                    if as_of is None:
                        raise scan.ScanError("the warehouse has no scanned session: run the daily scan first")
                    closes = scanning.session_closes(con, as_of)
                with store.begin() as conn:
                    event = scanning.record_snapshot(conn, received, rule, now, closes, as_of)
                if event is None:
                    context.instance.add_run_tags(context.run_id, {EVENT_TAG: "absorbed"})
                    context.log.info(f"{received.snapshot.shown_as}: moved less than the threshold since the day's "
                                     "latest event (absorbed by it): no new event")
                    yield Output({"event_id": ""}, metadata={"absorbed": True})
                    return
            else:
                with store.begin() as conn:
                    event = batches.event(conn, batches.check_event_id(config.event_id))
                if event is None:
                    raise Failure(description=f"no market event {config.event_id}", allow_retries=False)
            context.instance.add_run_tags(context.run_id, {EVENT_TAG: event.event_id, BATCH_TAG: event.batch_id})
            outcome = scanning.scan_event(
                store, warehouse.database, settings.sql_dir(), event, policy=policy,
                overrides_for=advisor_overrides.wash_sale_overrides,
                lifecycle_policy=lifecycle.lifecycle_policy(policy, settings_of(approval_clock)),
                archive_root=archive_root, now=now, run_id=context.run_id)
    except (prices.PricesFileError, scanning.EventError, batches.BatchError) as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    except scan.ScanError as exc:
        raise Failure(description=f"the market event could not be scanned: {exc}") from None
    published = outcome.published
    context.log.info(f"market event {outcome.event_id} (batch {outcome.batch_id}): "
                     + (f"{len(outcome.joined)} recommendations joined the batch" if outcome.scanned_by_this_run
                        else "scanned by an earlier run; nothing published again"))
    yield Output(
        {"event_id": outcome.event_id, "batch_id": outcome.batch_id, "now": now.isoformat()},
        metadata={
            "event_id": outcome.event_id, "batch_id": outcome.batch_id, "session_valued": str(outcome.session_as_of),
            "move": f"{event.move:+.2%}" if event.move is not None else "declared without prices",
            "scanned_by_this_run": outcome.scanned_by_this_run, "joined_batch": len(outcome.joined),
            **{k: v for k, v in outcome.counts.items()},
            **({"created": published.created, "superseded": published.superseded,
                "already_published": published.unchanged, "auto_approved": published.auto_approved}
               if published else {}),
        })


@op(ins={"scanned": In(dict)}, out=Out(dict),
    description="Write the batch's severity-sorted report after the event (HTML, CSV, SHA-256 in the audit chain) "
                "and email each advisor their part, once.")
def report_market_event(context: OpExecutionContext, scanned: dict, workflow_store: WorkflowStoreResource,
                        email: EmailResource, crm: CrmResource, links: LinksResource,
                        approval_clock: ApprovalClockResource, drift_policy_source: DriftPolicySource):
    from rebal_pipeline.market_events import report

    if not scanned.get("event_id"):
        yield Output({}, metadata={"report": "none (absorbed)"})
        return
    comms = comms_settings(email, crm, links, approval_clock, drift_policy_source)
    # The scan's time: the report says what the batch held then, identical on a re-run.
    now = utc(datetime.fromisoformat(scanned["now"]))
    with workflow_store.open() as store:
        with store.begin() as conn:
            written = report.write_batch_report(conn, settings.current().outbox_root(), scanned["batch_id"],
                                                scanned["event_id"], now)
            queued = report.email_advisors(conn, scanned["batch_id"], scanned["event_id"], now,
                                           portal_url=comms.public_url)
        # Sent from this run, once each (wf_messages), as the supervisory report is; a failed send is
        # sent by re-executing the run.
        sent = report.send_event_emails(store, scanned["event_id"], now, comms=comms)
    unsent = [d.message_key for d in sent if d.status not in ("sent", "already_sent")]
    for delivery in sent:
        context.log.info(f"market-event email {delivery.message_key}: {delivery.status}")
    if unsent:
        raise Failure(description=f"report written; emails not sent yet: {', '.join(unsent)}; re-execute this run "
                                  "once the relay is fixed")
    yield Output({"html": str(written.html_path), "csv": str(written.csv_path)}, metadata={
        "html": MetadataValue.path(str(written.html_path)), "csv": MetadataValue.path(str(written.csv_path)),
        "sha256": MetadataValue.json(written.sha256), "written_by_this_run": written.written,
        "emails_queued_by_this_run": queued,
        "emails": MetadataValue.json([{"key": d.message_key, "status": d.status} for d in sent])})



@job(description="An out-of-cycle scan of every account for one market event (launched by the market_events "
                 "sensor or `rebal market-event`): its alerts join the day's batch, whose report goes to the "
                 "advisors.",
     tags={"rebal/workflow": "market_event"})
def market_event_scan():
    report_market_event(scan_market_event())


Clock = Callable[[], datetime]


def scan_request(*, prices_file: str = "", sha256: str = "", event_id: str = "") -> RunRequest:
    config = {"prices_file": prices_file} if prices_file else {"event_id": event_id}
    return RunRequest(
        run_key=f"{RUN_KEY_PREFIX}prices:{sha256}" if prices_file else f"{RUN_KEY_PREFIX}{event_id}",
        job_name=market_event_scan.name, run_config={"ops": {"scan_market_event": {"config": config}}},
        tags={PRICES_TAG: sha256} if prices_file else {EVENT_TAG: event_id})


def evaluate(store, feed_root: Path, rule, now: datetime, seen: str) -> tuple[list[RunRequest], str, str]:
    """One tick: (run requests, the new cursor's file, why nothing when nothing)."""
    now = utc(now)
    requests: list[RunRequest] = []
    why = ""
    day = trading_day(now)
    newest = prices.snapshots(feed_root, day)[-1:] if is_session(day) else []
    if not newest:
        why = f"no intraday prices for {day.isoformat()}"
    else:
        path = newest[0]
        relative = path.relative_to(feed_root).as_posix()
        if relative == seen:
            why = f"{relative}: looked at already"
        else:
            seen = relative
            try:
                snapshot = prices.read_snapshot(path, feed_root=feed_root)
            except prices.PricesFileError:
                # The run archives it and fails naming what is wrong: nothing is lost or hidden.
                requests.append(scan_request(prices_file=relative,
                                             sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
                snapshot = None
            if snapshot is not None:
                basket = prices.basket_of(rule)
                with store.begin() as conn:
                    reference = batches.latest_basket_prices(conn, day)
                if reference is None:
                    try:
                        reference = prices.read_session_closes(feed_root, latest_closed_session(now))
                    except prices.PricesFileError as exc:
                        reference, why = None, f"no reference to measure {relative} against: {exc}"
                move = prices.basket_move(basket, reference, snapshot.prices) if reference else None
                if prices.exceeds(move, rule.threshold):
                    requests.append(scan_request(prices_file=relative, sha256=snapshot.sha256))
                elif not why:
                    why = (f"{relative}: the reference basket moved {move:+.2%}, under the "
                           f"{rule.threshold:.1%} threshold" if move is not None
                           else f"{relative}: the reference basket is not fully priced")
    with store.begin() as conn:
        pending = batches.unscanned_events(conn)
    requests += [scan_request(event_id=e.event_id) for e in pending]
    return requests, seen, why


def build_market_events_sensor(clock: Clock = utc_now, minimum_interval_seconds: int = 60,
                               name: str = "market_events"):
    @sensor(name=name, job=market_event_scan, minimum_interval_seconds=minimum_interval_seconds,
            default_status=DefaultSensorStatus.STOPPED,
            description="Watches the day's intraday prices: a move of the policy's reference basket of at least "
                        "its threshold since the last scan (or an operator's declaration) launches a scan of every "
                        "account whose alerts join the day's batch.")
    def _market_events(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource, feed: FeedLocation,
                       drift_policy_source: DriftPolicySource):
        state = json.loads(context.cursor) if context.cursor else {}
        rule = drift_policy_source.load().market_events
        with workflow_store.open() as store:
            requests, seen, why = evaluate(store, Path(feed.feed_root), rule, clock(), state.get("seen", ""))
        cursor = json.dumps({"seen": seen})
        if not requests:
            return SensorResult(skip_reason=why or "nothing to scan", cursor=cursor)
        return SensorResult(run_requests=requests, cursor=cursor)

    return _market_events


def build_sensors(rebal_settings=None) -> list:
    """[the market_events sensor] at the poll interval of the policy of `rebal_settings`."""
    from rebal_pipeline.core.policy import load_policy

    current = rebal_settings if rebal_settings is not None else settings.current()
    rule = load_policy(current.policy_file()).market_events
    return [build_market_events_sensor(minimum_interval_seconds=rule.poll_seconds)]


jobs = [market_event_scan]
