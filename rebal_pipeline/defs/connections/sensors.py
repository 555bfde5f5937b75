"""Custodian connections in Dagster: files pulled and turned into the canonical feed, the daily
scan launched for their date, and late files raised to operations.

custodian_files (every 5 min): for each SFTP connection, the remote files not yet in its ledger
    → RunRequest(job pull_custodian_files, run_key = connection + a hash of those files' names,
    sizes and times): the run pulls them (connections/sftp.py), archives them and translates
    every complete date into the canonical feed (connections/ingest.py).

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

from datetime import date, datetime, timezone
from typing import Callable

import hashlib
import json

from dagster import Config, OpExecutionContext, RunRequest, SensorEvaluationContext, SkipReason, job, op, sensor

from rebal_pipeline import settings
from rebal_pipeline.connections.config import inbound_dir, load_connections
from rebal_pipeline.connections.ingest import pull_and_convert, sftp_source
from rebal_pipeline.connections.sftp import list_remote, load_ledger
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.drift.schedules import daily_drift_scan
from rebal_pipeline.connections.deadlines import late_feeds, record_late_feed
from rebal_pipeline.resources import WorkflowStoreResource

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


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


@op(description="Pull a connection's new files, archive them, translate complete dates into the canonical feed.")
def pull_connection(context: OpExecutionContext, config: PullConfig):
    [connection] = [c for c in load_connections().connections if c.name == config.connection]
    deliveries = pull_and_convert(connection, settings.feed_root())
    for delivery in deliveries:
        context.log.info(f"{connection.name}: {delivery.as_of} translated into {delivery.feed_dir} "
                         f"({len(delivery.raw_files)} raw files archived)")
    context.add_output_metadata({"dates_translated": [d.as_of.isoformat() for d in deliveries]})
    return [d.as_of.isoformat() for d in deliveries]


@job(description="Pull a custodian connection's files and translate them into the canonical feed.")
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
sensors = [feed_deadlines, custodian_files, feed_arrivals]
