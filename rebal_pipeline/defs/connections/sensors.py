"""Custodian connections in Dagster: files pulled and turned into the canonical feed, the daily
scan launched for their date, and late files raised to operations.

custodian_files (every 5 min): for each SFTP connection, the remote files not yet in its ledger
    → RunRequest(job pull_custodian_files, run_key = connection + a hash of those files' names,
    sizes and times): the run pulls them (connections/sftp.py), archives them, translates every
    complete date into the connection's part and assembles the day (connections/ingest.py).

custodian_api_pulls (every 5 min): for each OAuth API connection whose part of the last closed
    session is not in yet, from its `available_from` time (New York, the next morning) →
    RunRequest(job pull_custodian_files, as_of, run_key = api:<connection>:<as_of>:<slot>), one
    slot per `retry_minutes`: a failed pull (custodian down) is tried again in the next slot, never
    twice in one. A pull that finds the refresh token expired raises one operations alert
    (`reauthorization_needed:<connection>:<as_of>`, emailed by the comms sensors) and fails its run;
    the sensor then waits until the token file changes (an operator authorized rebal again:
    `rebal connections authorize`) instead of failing every slot.

feed_arrivals (every 2 min): a complete canonical folder <feed_root>/<as_of>/ that is new or
    changed (hash of its files' names, sizes and times) → RunRequest(daily_drift_scan, partition
    as_of, run_key = feed:<as_of>:<hash>). Works for every way a feed arrives (SFTP, API, drop
    folder). Re-running a day is idempotent downstream (same recommendation ids, no duplicates).

feed_deadlines (every 10 min): after each connection's `expected_by` time on NYSE session days,
    a connection whose canonical folder for the last closed session is missing or incomplete gets
    one operations alert (workflow store notification `feed_late:<connection>:<date>` + audit
    event). Recording it here, in the sensor, is deliberate: it is the detection itself, unique
    per key, and there is nothing else to run — the daily scan must not run on older data.
"""

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import hashlib
import json

from dagster import (Config, Failure, OpExecutionContext, RunRequest, SensorEvaluationContext, SkipReason, job, op,
                     sensor)
from sqlalchemy import select

from rebal_pipeline import settings
from rebal_pipeline.connections.config import Connection, inbound_dir, load_connections
from rebal_pipeline.connections.deadlines import NEW_YORK, expected_as_of, late_feeds, record_late_feed
from rebal_pipeline.connections.ingest import Delivery, part_is_complete, pull_and_convert, pull_from_api, sftp_source
from rebal_pipeline.connections.oauth_api import ReauthorizationNeeded
from rebal_pipeline.connections.sftp import list_remote, load_ledger
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.comms.jobs import run_time, utc_now
from rebal_pipeline.defs.drift.schedules import daily_drift_scan
from rebal_pipeline.resources import WorkflowStoreResource
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline.workflow.schema import notifications

Clock = Callable[[], datetime]


def build_feed_deadlines_sensor(clock: Clock = utc_now):
    @sensor(name="feed_deadlines", minimum_interval_seconds=600,
            description="Late or missing custodian files → one operations alert per connection and date.")
    def feed_deadlines(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = clock()
        late = late_feeds(load_connections().connections, settings.feed_root(), now)
        if not late:
            return SkipReason("every connection's files are in (or not due yet)")
        raised = []
        with workflow_store.open() as store, store.begin() as conn:
            for feed in late:
                if record_late_feed(conn, feed, now):
                    raised.append(feed.describe())
        for line in raised:
            context.log.warning(f"operations alert: {line}")
        return SkipReason("; ".join(raised) if raised else f"{len(late)} late feed(s) already alerted")

    return feed_deadlines


feed_deadlines = build_feed_deadlines_sensor()


class PullConfig(Config):
    connection: str
    as_of: str = ""  # the day to pull (API connections); SFTP pulls whatever is new
    now: str = ""    # the requesting tick's time (tests inject a clock); empty = now


def reauthorization_key(connection: str, as_of: date) -> str:
    return f"reauthorization_needed:{connection}:{as_of.isoformat()}"


def _describe(delivery: Delivery) -> str:
    return f"{delivery.connection}: {delivery.as_of} part in {delivery.part_dir}; {delivery.assembly.describe()}"


@op(description="Pull a connection's new files (SFTP) or the day's pages (OAuth API), archive the raw input, "
                "translate it into the connection's part and assemble the day's canonical feed.")
def pull_connection(context: OpExecutionContext, config: PullConfig, workflow_store: WorkflowStoreResource):
    connections = load_connections()
    matching = [c for c in connections.connections if c.name == config.connection]
    if not matching:
        raise Failure(description=f"no connection named {config.connection!r} in the connections file")
    [connection] = matching
    siblings = connections.custodian_connections
    if connection.kind == "oauth_api":
        as_of = date.fromisoformat(config.as_of) if config.as_of else expected_as_of(run_time(config.now))
        try:
            deliveries = [pull_from_api(connection, as_of, settings.feed_root(), siblings)]
        except ReauthorizationNeeded as needed:
            now = run_time(config.now)
            with workflow_store.open() as store, store.begin() as conn:
                raised = raise_operations_alert(
                    conn, key=reauthorization_key(connection.name, as_of), alert="reauthorization_needed",
                    summary=needed.alert_message, connection=connection.name, as_of=as_of, now=now,
                    details={"custodian": connection.custodian, "token_file": connection.oauth.token_file,
                             "what_to_do": f"rebal connections authorize {connection.name}"})
            context.log.error(f"{needed.alert_message} (operations alert {'raised' if raised else 'already raised'})")
            raise Failure(description=needed.alert_message) from None
    else:
        deliveries = pull_and_convert(connection, settings.feed_root(), siblings)
    for delivery in deliveries:
        context.log.info(_describe(delivery) + f" ({len(delivery.raw_files)} raw files archived)")
    if not deliveries:
        context.log.info(f"{connection.name}: nothing new to translate")
    context.add_output_metadata({
        "dates_pulled": [d.as_of.isoformat() for d in deliveries],
        "feeds_assembled": [d.as_of.isoformat() for d in deliveries if d.assembly.changed],
        "waiting_for": sorted({n for d in deliveries for n in d.assembly.waiting_for}),
    })
    return [d.as_of.isoformat() for d in deliveries]


@job(description="Pull a custodian connection's data and assemble the day's canonical feed.")
def pull_custodian_files():
    pull_connection()


@sensor(name="custodian_files", minimum_interval_seconds=300, job=pull_custodian_files,
        description="New files on a custodian's SFTP server → pull_custodian_files.")
def custodian_files(context: SensorEvaluationContext):
    requests, quiet = [], []
    for connection in load_connections().connections:
        if connection.kind != "sftp":
            continue
        known = {(f["name"], f["size"], f["mtime"]) for f in load_ledger(inbound_dir(connection) / "raw")}
        new = sorted((f.name, f.size, f.mtime) for f in list_remote(sftp_source(connection))
                     if (f.name, f.size, f.mtime) not in known)
        if not new:
            quiet.append(connection.name)
            continue
        digest = hashlib.sha256(json.dumps(new).encode()).hexdigest()[:16]
        requests.append(RunRequest(run_key=f"pull:{connection.name}:{digest}",
                                   run_config={"ops": {"pull_connection": {"config": {"connection": connection.name}}}},
                                   tags={"rebal/connection": connection.name}))
    return requests or SkipReason(f"no new files ({', '.join(quiet) or 'no SFTP connections'})")


def api_pull_due(connection: Connection, now: datetime) -> date | None:
    """The as-of date an API connection should be pulled for now, or None (not published yet)."""
    as_of = expected_as_of(now)
    available = datetime.combine(as_of + timedelta(days=1), connection.oauth.available_from, tzinfo=NEW_YORK)
    return as_of if now >= available else None


def _waiting_for_reauthorization(conn, connection: Connection, as_of: date) -> bool:
    """An alert says a person must authorize again, and the token file has not changed since."""
    raised_at = conn.execute(select(notifications.c.created_at).where(
        notifications.c.notification_key == reauthorization_key(connection.name, as_of))).scalar()
    if raised_at is None:
        return False
    raised_at = raised_at if raised_at.tzinfo else raised_at.replace(tzinfo=timezone.utc)
    token_file = Path(connection.oauth.token_file)
    if not token_file.exists():
        return True
    return datetime.fromtimestamp(token_file.stat().st_mtime, timezone.utc) <= raised_at


def build_custodian_api_pulls_sensor(clock: Clock = utc_now):
    @sensor(name="custodian_api_pulls", minimum_interval_seconds=300, job=pull_custodian_files,
            description="An OAuth API connection's day not pulled yet, once published → pull_custodian_files.")
    def custodian_api_pulls(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = clock()
        requests, quiet = [], []
        api_connections = [c for c in load_connections().connections if c.kind == "oauth_api"]
        if not api_connections:
            return SkipReason("no OAuth API connections")
        with workflow_store.open() as store, store.begin() as conn:
            for connection in api_connections:
                as_of = api_pull_due(connection, now)
                if as_of is None:
                    quiet.append(f"{connection.name}: not published yet")
                elif part_is_complete(connection, as_of):
                    quiet.append(f"{connection.name}: {as_of} pulled")
                elif _waiting_for_reauthorization(conn, connection, as_of):
                    quiet.append(f"{connection.name}: waiting for re-authorization")
                else:
                    slot = int(now.timestamp()) // (connection.oauth.retry_minutes * 60)
                    requests.append(RunRequest(
                        run_key=f"api:{connection.name}:{as_of.isoformat()}:{slot}",
                        run_config={"ops": {"pull_connection": {"config": {
                            "connection": connection.name, "as_of": as_of.isoformat(), "now": now.isoformat()}}}},
                        tags={"rebal/connection": connection.name, "rebal/as_of": as_of.isoformat()}))
        return requests or SkipReason("; ".join(quiet))

    return custodian_api_pulls


custodian_api_pulls = build_custodian_api_pulls_sensor()


def complete_feed_folders(feed_root) -> dict[str, str]:
    """as_of → a hash of the folder's files (names, sizes, times), for complete folders only."""
    folders = {}
    if not feed_root.exists():
        return folders
    required = [spec.filename for spec in FEED_FILES.values() if not spec.optional_file]
    for folder in sorted(p for p in feed_root.iterdir() if p.is_dir()):
        try:
            date.fromisoformat(folder.name)
        except ValueError:
            continue  # not an as-of folder
        files = [folder / name for name in required]
        if not all(f.is_file() for f in files):
            continue
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        folders[folder.name] = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return folders


@sensor(name="feed_arrivals", minimum_interval_seconds=120, job=daily_drift_scan,
        description="A new or changed complete canonical feed folder → the daily scan for its date.")
def feed_arrivals(context: SensorEvaluationContext):
    seen = json.loads(context.cursor) if context.cursor else {}
    current = complete_feed_folders(settings.feed_root())
    changed = {as_of: digest for as_of, digest in current.items() if seen.get(as_of) != digest}
    if not changed:
        return SkipReason("no new or changed feed folder")
    context.update_cursor(json.dumps({**seen, **changed}, sort_keys=True))
    return [RunRequest(run_key=f"feed:{as_of}:{digest}", partition_key=as_of) for as_of, digest in sorted(changed.items())]


jobs = [pull_custodian_files]
sensors = [feed_deadlines, custodian_files, custodian_api_pulls, feed_arrivals]
