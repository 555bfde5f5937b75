"""Where rebal keeps its files. Everything is under one project-local folder by default.

REBAL_HOME (default: <repo>/.rebal) holds the embedded set-up the drill uses:
  feeds/<as_of>/*.csv      the canonical feed (the sandbox writes here; a firm may drop files)
  archive/sha256/..        raw feed files, content-addressed, write-once
  warehouse.duckdb         the DuckDB warehouse
  dagster_home/            DAGSTER_HOME for the embedded SQLite Dagster instance
  workflow.sqlite          the workflow store (recommendations, decisions, audit chain)
  overrides/               advisors' documented overrides of the tax engine
Each can be moved on its own with the env vars below (production points them elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def rebal_home() -> Path:
    return Path(os.environ.get("REBAL_HOME", REPO_ROOT / ".rebal")).resolve()


def feed_root() -> Path:
    return Path(os.environ.get("REBAL_FEED_ROOT", rebal_home() / "feeds"))


def archive_root() -> Path:
    return Path(os.environ.get("REBAL_ARCHIVE_ROOT", rebal_home() / "archive"))


def warehouse_path() -> Path:
    return Path(os.environ.get("REBAL_WAREHOUSE", rebal_home() / "warehouse.duckdb"))


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", rebal_home() / "dagster_home"))


def sql_dir() -> Path:
    return Path(os.environ.get("REBAL_SQL_DIR", REPO_ROOT / "dbt_like_sql"))


def policy_file() -> Path | None:
    value = os.environ.get("REBAL_DRIFT_POLICY")
    return Path(value) if value else None


def wash_sale_overrides_path() -> Path:
    """Advisors' documented "keep this buy although it washes a loss" decisions (append-only CSV)."""
    return Path(os.environ.get("REBAL_WASH_SALE_OVERRIDES", rebal_home() / "overrides" / "wash_sale_overrides.csv"))


def workflow_db_url() -> str:
    """The workflow store: REBAL_WORKFLOW_DB_URL (e.g. postgresql+psycopg2://user@host/db), else an
    embedded SQLite file. A URL may carry a password: it is never logged."""
    return os.environ.get("REBAL_WORKFLOW_DB_URL") or f"sqlite:///{rebal_home() / 'workflow.sqlite'}"
