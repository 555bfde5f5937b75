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


class Warehouse(ConfigurableResource):
    """The DuckDB warehouse file. Only Dagster runs write it (one writer process at a time)."""

    database: str
    # DuckDB's own cap (it spills to disk beyond it); keeps a 1M-account day within ~6 GB.
    memory_limit: str = "4GB"

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(self.database, config={"memory_limit": self.memory_limit})
        try:
            yield con
        finally:
            con.close()


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
