"""NYSE trading sessions, from exchange_calendars (holidays and early closes maintained
upstream, works offline) rather than a hand-kept holiday list."""

from __future__ import annotations

from datetime import date
from functools import cache

import exchange_calendars as xcals
import pandas as pd


@cache
def nyse():
    return xcals.get_calendar("XNYS")


def is_session(day: date) -> bool:
    return bool(nyse().is_session(pd.Timestamp(day)))


def latest_session(on_or_before: date) -> date:
    """The last NYSE session on or before the given day (for a default as-of date)."""
    day = pd.Timestamp(on_or_before)
    if nyse().is_session(day):
        return on_or_before
    return nyse().date_to_session(day, direction="previous").date()
