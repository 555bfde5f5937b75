"""Custodian connections in Dagster: files pulled and turned into the canonical feed, the daily
scan launched for their date, and late files raised to operations.

feed_deadlines (every 10 min): after each connection's `expected_by` time on NYSE session days,
    a connection whose canonical folder for the last closed session is missing or incomplete gets
    one operations alert (workflow store notification `feed_late:<connection>:<date>` + audit
    event). Recording it here, in the sensor, is deliberate: it is the detection itself, unique
    per key, and there is nothing else to run — the daily scan must not run on older data.
"""

from datetime import datetime, timezone
from typing import Callable

from dagster import SensorEvaluationContext, SkipReason, sensor

from rebal_pipeline import settings
from rebal_pipeline.connections.config import load_connections
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
sensors = [feed_deadlines]
