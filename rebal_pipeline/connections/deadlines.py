"""Late or missing custodian files: an operations alert, never a run on yesterday's data.

Each connection promises the files of the last closed NYSE session by its `expected_by` time
(New York) on the next session day. Past that time, a connection whose delivery for that date is
missing or incomplete (late_feeds says what counts) gets one operations alert (per connection and date, exactly
once: the notification key is unique in the workflow store) with an audit event, emailed to the
operations team by the comms sensors (workflow/operations_alerts.py). The daily scan itself
never falls back to an older folder: landing fails naming the missing file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection as DbConnection

from rebal_pipeline.connections.config import Connection, part_dir
from rebal_pipeline.connections.dialects import CUSTODIAN_FILES
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.market_calendar import is_session, latest_closed_session
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert

NEW_YORK = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class LateFeed:
    connection: str
    as_of: date
    missing: list[str]  # canonical files not there
    nothing_arrived: bool = False  # not one of the expected files is there

    @property
    def notification_key(self) -> str:
        return f"feed_late:{self.connection}:{self.as_of.isoformat()}"

    def describe(self) -> str:
        what = "nothing delivered" if self.nothing_arrived else f"missing {', '.join(self.missing)}"
        return f"{self.connection}: the files for {self.as_of} are late ({what})"


def expected_as_of(now: datetime) -> date:
    """The as-of date whose files are due: the last NYSE session closed before now."""
    return latest_closed_session(now)


def _missing(folder: Path, filenames: list[str]) -> list[str]:
    return [name for name in filenames if not (folder / name).is_file()]


def late_feeds(connections: list[Connection], feed_root: Path, now: datetime) -> list[LateFeed]:
    """Connections past their deadline today whose delivery for the due date is not complete.

    A custodian connection (SFTP, API) is late when its own part of the day is not in: another
    custodian's files do not excuse it, and its own are not held against it while the day's feed
    waits for someone else (that one is late). A part that is in but cannot be assembled fails its
    pull run, naming the reason. A drop folder is late when the canonical folder is incomplete."""
    local = now.astimezone(NEW_YORK)
    if not is_session(local.date()):
        return []  # files are expected on session days only
    as_of = expected_as_of(now)
    feed_files = sorted(spec.filename for spec in FEED_FILES.values() if not spec.optional_file)
    part_files = sorted(FEED_FILES[name].filename for name in CUSTODIAN_FILES)
    late = []
    for connection in connections:
        if local.time() < connection.expected_by:
            continue
        if connection.kind == "drop_folder":
            expected, missing = feed_files, _missing(feed_root / as_of.isoformat(), feed_files)
        else:
            expected, missing = part_files, _missing(part_dir(connection, as_of), part_files)
        if missing:
            late.append(LateFeed(connection.name, as_of, missing, nothing_arrived=len(missing) == len(expected)))
    return late


def record_late_feed(conn: DbConnection, late: LateFeed, now: datetime) -> bool:
    """The operations alert, once per connection and date (False: already recorded)."""
    return raise_operations_alert(
        conn, key=late.notification_key, alert="feed_late", summary=late.describe(),
        details={"missing": late.missing}, now=now, connection=late.connection, as_of=late.as_of)
