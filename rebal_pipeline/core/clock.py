"""rebal's one clock: moments in UTC.

`utc` makes a moment read back from the workflow store aware: SQLite hands
`DateTime(timezone=True)` back naive, and the store writes UTC, so a naive moment read back is
UTC. `utc_now` is the wall clock every default reads (sensors and jobs take an injected clock or
the run's configured time first, so tests choose the time)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def run_time(configured: str) -> datetime:
    """A run's clock: the sensor tick's time carried in the run config as ISO text (so a message
    or a pull is recorded as of the tick that found it due, and tests choose the time), else the
    wall clock."""
    return utc(datetime.fromisoformat(configured)) if configured else utc_now()
