"""Opening and migrating the workflow store.

    store = WorkflowStore.from_env()      # REBAL_WORKFLOW_DB_URL, else SQLite under REBAL_HOME
    store.migrate()                        # alembic upgrade head (idempotent)
    with store.begin() as conn: ...        # one transaction

SQLite: foreign keys on, WAL journal (the API and the daemon read while a run writes), and
BEGIN IMMEDIATE so that two writers serialise instead of failing half-way. Postgres: the audit
chain takes a transaction-scoped advisory lock (audit.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event

from rebal_pipeline import settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class WorkflowStore:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = _engine(url)

    @classmethod
    def from_env(cls) -> "WorkflowStore":
        return cls(settings.workflow_db_url())

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            # Client names and emails: created 0600 in a 0700 folder (SQLite gives its -wal and
            # -shm files the database file's permissions).
            from rebal_pipeline.core.private_files import private_file
            private_file(path)
        # hide_parameters: an error message never carries bound values (reasons, names) into a log.
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # Let SQLAlchemy, not pysqlite, decide when a transaction starts (so BEGIN IMMEDIATE works).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("pragma foreign_keys = on")
            cursor.execute("pragma journal_mode = wal")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("begin immediate")

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)
