"""NYSE trading sessions, from exchange_calendars (holidays and early closes maintained
upstream, works offline) rather than a hand-kept holiday list."""

from __future__ import annotations

from datetime import UTC, date, datetime
from functools import cache

import exchange_calendars as xcals
import pandas as pd


@cache
def nyse():
    return xcals.get_calendar("XNYS")


def is_session(day: date) -> bool:
    return bool(nyse().is_session(pd.Timestamp(day)))


def latest_session(on_or_before: date) -> date:
    """The last NYSE session on or before the given day."""
    day = pd.Timestamp(on_or_before)
    if nyse().is_session(day):
        return on_or_before
    return nyse().date_to_session(day, direction="previous").date()


def latest_closed_session(now: datetime | None = None) -> date:
    """The last NYSE session whose close has passed (the default as-of date): before today's
    close (16:00 New York, 13:00 on early-close days) that is the previous session."""
    now = pd.Timestamp(now or datetime.now(UTC))
    if now.tzinfo is None:
        now = now.tz_localize(UTC)
    session = latest_session(now.tz_convert("America/New_York").date())
    if nyse().session_close(pd.Timestamp(session)) > now:
        session = nyse().previous_session(pd.Timestamp(session)).date()
    return session
