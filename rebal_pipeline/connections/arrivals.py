"""When a custodian's data is there to pull, and when a day's canonical feed is there to scan.

The decisions behind the connection sensors (defs/connections/sensors.py), without Dagster:

- `sftp_pulls_due(connections)`: each SFTP connection with files on the server that are not in
  its ledger yet, with a digest of those files' names, sizes and times (the same new files = the
  same digest, so one pull per set of new files).
- `api_pulls_due(conn, api_connections, now)`: each OAuth API connection whose part of the last
  closed session is not in yet, once published (`api_pull_due`: `available_from`, New York time,
  the next calendar day), unless an operations alert says a person must authorize again and the
  token file has not changed since (`waiting_for_reauthorization`). Its retry slot is `now` in
  units of `retry_minutes`: one pull per slot, a failed pull is tried again in the next one.
- `complete_feed_folders(feed_root)`: every complete canonical folder <feed_root>/<as_of>/ with a
  digest of its files' names, sizes and times; `changed_feed_folders` keeps the new or changed ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Connection as DbConnection
from sqlalchemy import select

from rebal_pipeline.connections.config import Connection, inbound_dir
from rebal_pipeline.connections.deadlines import NEW_YORK, expected_as_of
from rebal_pipeline.connections.ingest import part_is_complete, sftp_source
from rebal_pipeline.connections.pull import reauthorization_key
from rebal_pipeline.connections.sftp import list_remote, load_ledger
from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.workflow.schema import notifications


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# SFTP connections
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SftpPull:
    connection: Connection
    digest: str  # of the new files' (name, size, mtime)


def new_remote_files(connection: Connection) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the files on the connection's server that its ledger does not hold."""
    known = {(f["name"], f["size"], f["mtime"]) for f in load_ledger(inbound_dir(connection) / "raw")}
    return sorted((f.name, f.size, f.mtime) for f in list_remote(sftp_source(connection))
                  if (f.name, f.size, f.mtime) not in known)


def sftp_pulls_due(connections: list[Connection]) -> tuple[list[SftpPull], list[str]]:
    """The SFTP connections with new files, and the names of those without."""
    due, quiet = [], []
    for connection in connections:
        if connection.kind != "sftp":
            continue
        new = new_remote_files(connection)
        if not new:
            quiet.append(connection.name)
            continue
        due.append(SftpPull(connection, _digest(new)))
    return due, quiet


# ---------------------------------------------------------------------------------------------
# OAuth API connections
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiPull:
    connection: Connection
    as_of: date
    slot: int  # now in units of the connection's retry_minutes


def api_pull_due(connection: Connection, now: datetime) -> date | None:
    """The as-of date an API connection should be pulled for now, or None (not published yet)."""
    as_of = expected_as_of(now)
    available = datetime.combine(as_of + timedelta(days=1), connection.oauth.available_from, tzinfo=NEW_YORK)
    return as_of if now >= available else None


def waiting_for_reauthorization(conn: DbConnection, connection: Connection, as_of: date) -> bool:
    """An alert says a person must authorize again, and the token file has not changed since."""
    raised_at = conn.execute(select(notifications.c.created_at).where(
        notifications.c.notification_key == reauthorization_key(connection.name, as_of))).scalar()
    if raised_at is None:
        return False
    token_file = Path(connection.oauth.token_file)
    if not token_file.exists():
        return True
    return datetime.fromtimestamp(token_file.stat().st_mtime, timezone.utc) <= utc(raised_at)


def api_pulls_due(conn: DbConnection, api_connections: list[Connection],
                  now: datetime) -> tuple[list[ApiPull], list[str]]:
    """The API connections to pull now, and for each of the others why not (one line each)."""
    due, quiet = [], []
    for connection in api_connections:
        as_of = api_pull_due(connection, now)
        if as_of is None:
            quiet.append(f"{connection.name}: not published yet")
        elif part_is_complete(connection, as_of):
            quiet.append(f"{connection.name}: {as_of} pulled")
        elif waiting_for_reauthorization(conn, connection, as_of):
            quiet.append(f"{connection.name}: waiting for re-authorization")
        else:
            slot = int(now.timestamp()) // (connection.oauth.retry_minutes * 60)
            due.append(ApiPull(connection, as_of, slot))
    return due, quiet


# ---------------------------------------------------------------------------------------------
# The canonical feed
# ---------------------------------------------------------------------------------------------
def complete_feed_folders(feed_root: Path) -> dict[str, str]:
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
        folders[folder.name] = _digest(stamp)
    return folders


def changed_feed_folders(seen: dict[str, str], current: dict[str, str]) -> dict[str, str]:
    """The folders of `current` that are new or whose digest differs from the one `seen`."""
    return {as_of: digest for as_of, digest in current.items() if seen.get(as_of) != digest}
