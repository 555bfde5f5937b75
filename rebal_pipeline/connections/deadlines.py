"""Late or missing custodian files: an operations alert, never a run on yesterday's data.

Each connection promises the files of the last closed NYSE session by its `expected_by` time
(New York) on the next session day. Past that time, a connection whose canonical feed folder for
that date is missing or incomplete gets one operations alert (per connection and date, exactly
once: the notification key is unique in the workflow store) with an audit event. The daily scan
itself never falls back to an older folder: landing fails naming the missing file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection as DbConnection
from sqlalchemy import and_, insert, select
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.connections.config import Connection
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.market_calendar import is_session, latest_closed_session
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import notifications, users

NEW_YORK = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class LateFeed:
    connection: str
    as_of: date
    missing: list[str]  # canonical files not there (all of them when the folder is missing)

    @property
    def notification_key(self) -> str:
        return f"feed_late:{self.connection}:{self.as_of.isoformat()}"

    def describe(self) -> str:
        what = "no feed folder" if len(self.missing) == len(FEED_FILES) else f"missing {', '.join(self.missing)}"
        return f"{self.connection}: the files for {self.as_of} are late ({what})"


def expected_as_of(now: datetime) -> date:
    """The as-of date whose files are due: the last NYSE session closed before now."""
    return latest_closed_session(now)


def late_feeds(connections: list[Connection], feed_root: Path, now: datetime) -> list[LateFeed]:
    """Connections past their deadline today whose canonical folder is not complete."""
    local = now.astimezone(NEW_YORK)
    if not is_session(local.date()):
        return []  # files are expected on session days only
    as_of = expected_as_of(now)
    late = []
    for connection in connections:
        if local.time() < connection.expected_by:
            continue
        folder = feed_root / as_of.isoformat()
        missing = sorted(spec.filename for spec in FEED_FILES.values()
                         if not spec.optional_file and not (folder / spec.filename).exists())
        if missing:
            late.append(LateFeed(connection.name, as_of, missing))
    return late


def record_late_feed(conn: DbConnection, late: LateFeed, now: datetime) -> bool:
    """The operations alert, once per connection and date (False: already recorded)."""
    now = now.astimezone(timezone.utc)
    recipient = conn.execute(select(users.c.user_id).where(and_(users.c.role == "operations", users.c.active))
                             .order_by(users.c.user_id).limit(1)).scalar()
    try:
        with conn.begin_nested():
            conn.execute(insert(notifications).values(
                notification_key=late.notification_key, kind="feed_late", recommendation_id=None,
                recipient_id=recipient or "operations", created_at=now,
                payload=audit.canonical_json({"connection": late.connection, "as_of": late.as_of,
                                              "missing": late.missing})))
    except IntegrityError:
        return False
    audit.append(conn, late.notification_key, "feed_late", "rebal:feed_deadline", now, late.connection,
                 {"as_of": late.as_of, "missing": late.missing, "recipient": recipient})
    return True
