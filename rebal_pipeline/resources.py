"""Resources, configured in one place per environment (see definitions.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import duckdb
from dagster import ConfigurableResource

from rebal_pipeline import settings
from rebal_pipeline.core.policy import DriftPolicy, load_policy

if TYPE_CHECKING:
    import polars as pl

    from rebal_pipeline.workflow.store import WorkflowStore


# The Dagster concurrency pool of every step that opens the warehouse read-write: the daily
# scan's assets (feed, warehouse, trades, workflow) and the approval run's warehouse reads
# (`approval_gate`, `build_order_tickets`). dagster.yaml and instance/local_dagster.yaml limit
# it to one run at a time (`concurrency: pools: granularity: run, default_limit: 1`).
WAREHOUSE_POOL = "rebal_warehouse"


def ensure_warehouse_pool(instance) -> bool:
    """Give the instance the warehouse pool's limit (one run) now, not on first use. With only
    `concurrency: pools: default_limit` in dagster.yaml, Dagster 1.13.27's run queue creates the
    pool's limit in the same dequeue pass that first sees a run needing it, after it has already
    read the configured pools: on a fresh instance that first pass launches every queued run at
    once (seen with a 3-session backfill: all three opened the warehouse together and failed on
    its lock). The drill and `rebal instance init` call this; it is idempotent. Returns True when
    it set the limit."""
    storage = instance.event_log_storage
    if WAREHOUSE_POOL in storage.get_concurrency_keys():
        return False
    storage.set_concurrency_slots(WAREHOUSE_POOL, 1)
    return True


class Warehouse(ConfigurableResource):
    """The DuckDB warehouse file. DuckDB lets one process open a file read-write (then no other
    process may open it at all) or several processes read-only. Runs that open it read-write are
    serialised by Dagster, not by retrying on the lock: their steps are in the `WAREHOUSE_POOL`
    concurrency pool, which the shipped instance configs limit to one run at a time, and the
    run queue (QueuedRunCoordinator, run by dagster-daemon) starts a queued run only when the
    pool is free. So a backfill of many sessions runs them one after another, and the approval
    gate's read waits in the queue until the daily run is done, then sees a finished day.

    Why a run-level pool and not a read-only connection with a bounded wait, or a snapshot copy:
    DuckDB refuses a read-only open while a writer holds the file, so a reader would have to
    sleep and retry (which the issue rules out) or read a copy that is stale by construction and
    doubles the disk at 1M accounts. An op-level pool would let two runs interleave their steps,
    so the gate could read holdings half-way through a day's run; a run-level one cannot.

    `read_only=True` is for readers outside the pool (the mailer's client contacts): they may
    run side by side, and fail fast while a pooled run writes (their callers retry through the
    outbox, comms/outbound.py)."""

    database: str
    # DuckDB's own cap (it spills to disk beyond it); keeps a 1M-account day within ~6 GB.
    memory_limit: str = "4GB"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        from rebal_pipeline.core.private_files import make_private, private_dir

        created = not Path(self.database).exists()
        if not read_only:
            private_dir(Path(self.database).parent)
        con = duckdb.connect(self.database, read_only=read_only, config={"memory_limit": self.memory_limit})
        if created and not read_only:
            make_private(self.database)  # client names and emails: 0600 when rebal creates it
        try:
            yield con
        finally:
            con.close()
            if created and not read_only:
                make_private(self.database, f"{self.database}.wal")


class FeedLocation(ConfigurableResource):
    """Where the canonical feed arrives and where raw files are archived."""

    feed_root: str
    archive_root: str

    def feed_dir(self, as_of: str) -> Path:
        return Path(self.feed_root) / as_of


class DriftPolicySource(ConfigurableResource):
    """The versioned drift policy file (empty = the policy shipped with rebal)."""

    policy_file: str = ""

    def load(self) -> DriftPolicy:
        return load_policy(self.policy_file or None)


class AdvisorOverrides(ConfigurableResource):
    """Advisors' documented overrides of the tax engine (core/overrides.py)."""

    wash_sale_file: str

    def wash_sale_overrides(self, as_of) -> "pl.DataFrame":
        from rebal_pipeline.core.overrides import read_overrides

        return read_overrides(Path(self.wash_sale_file), as_of)


class WorkflowStoreResource(ConfigurableResource):
    """The workflow store (rebal_pipeline/workflow): recommendations, decisions, audit chain.
    The URL may carry a password; it is never logged."""

    url: str

    @contextmanager
    def open(self) -> Iterator["WorkflowStore"]:
        from rebal_pipeline.workflow.store import WorkflowStore

        store = WorkflowStore(self.url)
        try:
            store.migrate()
            yield store
        finally:
            store.dispose()


def local_resources() -> dict:
    policy = settings.policy_file()
    return {
        "warehouse": Warehouse(
            database=str(settings.warehouse_path()),
            memory_limit=os.environ.get("REBAL_DUCKDB_MEMORY_LIMIT", "4GB"),
        ),
        "feed": FeedLocation(
            feed_root=str(settings.feed_root()), archive_root=str(settings.archive_root())
        ),
        "drift_policy_source": DriftPolicySource(policy_file=str(policy) if policy else ""),
        "advisor_overrides": AdvisorOverrides(wash_sale_file=str(settings.wash_sale_overrides_path())),
        "workflow_store": WorkflowStoreResource(url=settings.workflow_db_url()),
    }
