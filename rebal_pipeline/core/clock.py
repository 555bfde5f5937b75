"""One definition of a moment in UTC, for the workflow store's times.

SQLite hands `DateTime(timezone=True)` back naive; the store writes UTC, so a naive moment read
back is UTC."""

from __future__ import annotations

from datetime import datetime, timezone


def utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
