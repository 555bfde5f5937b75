"""Custodian connections in Dagster: files pulled and turned into the canonical feed, the daily
scan launched for their date, and late files raised to operations. The decisions are in
connections/arrivals.py and connections/deadlines.py; the pull itself is defs/connections/jobs.py
(connections/pull.py).

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
    The scan is targeted by name: it is defined with the drift schedule (defs/drift/schedules.py)
    and both are in the one Definitions (definitions.py).

feed_deadlines (every 10 min): after each connection's `expected_by` time on NYSE session days,
    a connection whose canonical folder for the last closed session is missing or incomplete gets
    one operations alert (workflow store notification `feed_late:<connection>:<date>` + audit
    event). Recording it here, in the sensor, is deliberate: it is the detection itself, unique
    per key, and there is nothing else to run — the daily scan must not run on older data.
"""

from datetime import datetime
from typing import Callable

import json

from dagster import RunRequest, SensorEvaluationContext, SkipReason, sensor

from rebal_pipeline import settings
from rebal_pipeline.connections import arrivals
from rebal_pipeline.connections.config import connections_file, load_connections
from rebal_pipeline.connections.deadlines import late_feeds, record_late_feed
from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.defs.connections.jobs import jobs, pull_custodian_files
from rebal_pipeline.resources import WorkflowStoreResource

Clock = Callable[[], datetime]


def build_feed_deadlines_sensor(clock: Clock = utc_now):
    @sensor(name="feed_deadlines", minimum_interval_seconds=600,
            description="Late or missing custodian files → one operations alert per connection and date.")
    def feed_deadlines(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = clock()
        current = settings.current()
        late = late_feeds(load_connections(connections_file(current)).connections, current.feed_root(), now)
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


@sensor(name="custodian_files", minimum_interval_seconds=300, job=pull_custodian_files,
        description="New files on a custodian's SFTP server → pull_custodian_files.")
def custodian_files(context: SensorEvaluationContext):
    due, quiet = arrivals.sftp_pulls_due(load_connections(connections_file(settings.current())).connections)
    requests = [RunRequest(run_key=f"pull:{pull.connection.name}:{pull.digest}",
                           run_config={"ops": {"pull_connection": {"config": {"connection": pull.connection.name}}}},
                           tags={"rebal/connection": pull.connection.name})
                for pull in due]
    return requests or SkipReason(f"no new files ({', '.join(quiet) or 'no SFTP connections'})")


def build_custodian_api_pulls_sensor(clock: Clock = utc_now):
    @sensor(name="custodian_api_pulls", minimum_interval_seconds=300, job=pull_custodian_files,
            description="An OAuth API connection's day not pulled yet, once published → pull_custodian_files.")
    def custodian_api_pulls(context: SensorEvaluationContext, workflow_store: WorkflowStoreResource):
        now = clock()
        connections = load_connections(connections_file(settings.current())).connections
        api_connections = [c for c in connections if c.kind == "oauth_api"]
        if not api_connections:
            return SkipReason("no OAuth API connections")
        with workflow_store.open() as store, store.begin() as conn:
            due, quiet = arrivals.api_pulls_due(conn, api_connections, now)
        requests = [RunRequest(
            run_key=f"api:{pull.connection.name}:{pull.as_of.isoformat()}:{pull.slot}",
            run_config={"ops": {"pull_connection": {"config": {
                "connection": pull.connection.name, "as_of": pull.as_of.isoformat(), "now": now.isoformat()}}}},
            tags={"rebal/connection": pull.connection.name, "rebal/as_of": pull.as_of.isoformat()})
            for pull in due]
        return requests or SkipReason("; ".join(quiet))

    return custodian_api_pulls


custodian_api_pulls = build_custodian_api_pulls_sensor()


@sensor(name="feed_arrivals", minimum_interval_seconds=120, job_name="daily_drift_scan",
        description="A new or changed complete canonical feed folder → the daily scan for its date.")
def feed_arrivals(context: SensorEvaluationContext):
    seen = json.loads(context.cursor) if context.cursor else {}
    changed = arrivals.changed_feed_folders(seen, arrivals.complete_feed_folders(settings.current().feed_root()))
    if not changed:
        return SkipReason("no new or changed feed folder")
    context.update_cursor(json.dumps({**seen, **changed}, sort_keys=True))
    return [RunRequest(run_key=f"feed:{as_of}:{digest}", partition_key=as_of) for as_of, digest in sorted(changed.items())]


sensors = [feed_deadlines, custodian_files, custodian_api_pulls, feed_arrivals]
# `jobs` (from jobs.py) is re-exported for definitions.py, which assembles this module's `jobs` and
# `sensors`; once it reads defs/connections/defs.py instead, this re-export can go.
__all__ = ["jobs", "sensors", "feed_deadlines", "custodian_files", "custodian_api_pulls", "feed_arrivals",
           "build_feed_deadlines_sensor", "build_custodian_api_pulls_sensor"]
