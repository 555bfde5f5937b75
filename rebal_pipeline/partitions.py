"""The daily as-of partitioning shared by every warehouse asset."""

from dagster import DailyPartitionsDefinition

# One partition per calendar day in New York time. end_offset=1 makes today's partition
# available at today's close (the schedule runs after 16:00 ET); non-sessions are simply
# never scheduled (see defs/drift/schedules.py).
daily_partitions = DailyPartitionsDefinition(
    start_date="2021-01-01", timezone="America/New_York", end_offset=1
)
