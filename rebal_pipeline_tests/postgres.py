"""Access to the local PostgreSQL server for tests that need one.

In CI (CI=true) these tests are required: an unreachable server fails them. Elsewhere they
are skipped with a message saying how to run them.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest

PG = {
    "host": os.environ.get("REBAL_TEST_PG_HOST", "127.0.0.1"),
    "port": int(os.environ.get("REBAL_TEST_PG_PORT", "5432")),
    "user": os.environ.get("REBAL_TEST_PG_USER", "postgres"),
    "password": os.environ.get("REBAL_TEST_PG_PASSWORD", ""),
    "dbname": os.environ.get("REBAL_TEST_PG_DB", "test"),
}


def _connect(dbname: str | None = None):
    import psycopg2

    params = {**PG, "dbname": dbname or PG["dbname"], "connect_timeout": 5}
    return psycopg2.connect(**params)


def require_postgres() -> None:
    try:
        _connect().close()
    except Exception as exc:  # psycopg2.OperationalError and friends
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG['host']}:{PG['port']} is required in CI: {exc}")
        pytest.skip(
            f"PostgreSQL not reachable at {PG['host']}:{PG['port']} ({exc}); "
            "these tests run in CI (CI=true), or start the server to run them here"
        )


@contextmanager
def scratch_database():
    """A fresh, empty database on the server, dropped afterwards."""
    require_postgres()
    name = f"rebal_test_{uuid.uuid4().hex[:12]}"
    admin = _connect()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'create database "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (name,)
            )
            cur.execute(f'drop database if exists "{name}"')
        admin.close()
