"""The daily as-of partitioning shared by every warehouse asset: one partition per NYSE session.

A `TimeWindowPartitionsDefinition` on the cron `0 16 * * 1-5` in New York time (a window opens at
each weekday's 16:00 close), with every weekday that is not an NYSE session (holidays and ad-hoc
closures, from exchange_calendars) excluded. So:
  - partition keys stay `YYYY-MM-DD`, the session's date (the window's start);
  - a Saturday, a Sunday or a holiday is not a partition at all: it cannot be picked in the UI,
    backfilled, or requested by the schedule (defs/drift/schedules.py still skips non-sessions);
  - a session's partition exists once its close has passed (end_offset=1: the window that opened
    at today's 16:00 is the last one), which is when the schedule asks for it (16:30). On a
    weekend the last partition is Friday's, not Monday's. On an early-close day (13:00) the
    partition appears at 16:00 all the same: the schedule runs at 16:30. After 16:00 on a
    holiday the next session is already listed (the excluded tick still closes the window
    before it); run early, it fails on its missing feed folder, naming it.

The holidays come from the calendar as it is loaded when the code location starts (its default
horizon reaches a year ahead), so a partition is never a holiday the calendar knows of.
"""

from __future__ import annotations

from datetime import date, datetime, time

import pandas as pd
from dagster import TimeWindowPartitionsDefinition

from rebal_pipeline.core.market_calendar import nyse

FIRST_SESSION_DAY = "2021-01-01"
TIMEZONE = "America/New_York"
# 16:00 New York, Monday to Friday: the regular close.
SESSION_CLOSE_CRON = "0 16 * * 1-5"
_CLOSE = time(16, 0)


def non_session_weekdays(start: date, end: date) -> list[date]:
    """Weekdays in [start, end] on which the NYSE does not trade (holidays, ad-hoc closures)."""
    calendar = nyse()
    first = max(pd.Timestamp(start), calendar.first_session)
    last = min(pd.Timestamp(end), calendar.last_session)
    weekdays = pd.bdate_range(first, last)
    sessions = calendar.sessions_in_range(first, last)
    return [d.date() for d in weekdays.difference(sessions)]


def nyse_session_partitions(start: str = FIRST_SESSION_DAY) -> TimeWindowPartitionsDefinition:
    calendar = nyse()
    holidays = non_session_weekdays(date.fromisoformat(start), calendar.last_session.date())
    return TimeWindowPartitionsDefinition(
        cron_schedule=SESSION_CLOSE_CRON,
        start=start,
        fmt="%Y-%m-%d",
        timezone=TIMEZONE,
        end_offset=1,
        # Each excluded tick is the holiday's 16:00 in New York (Dagster localises naive datetimes
        # to the definition's timezone).
        exclusions=[datetime.combine(day, _CLOSE) for day in holidays],
    )


daily_partitions = nyse_session_partitions()
