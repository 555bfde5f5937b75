"""The daily drift scan: every NYSE session at market close, nothing on holidays/weekends."""


from dagster import (
    AssetSelection,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from rebal_pipeline.core.market_calendar import is_session
from rebal_pipeline.partitions import daily_partitions

daily_drift_scan = define_asset_job(
    "daily_drift_scan",
    selection=AssetSelection.all(),
    partitions_def=daily_partitions,
    description="Land the day's feed and compute holdings, drift and drift alerts.",
)


# 16:30 New York time: after the 16:00 close (and after 13:00 early closes), once closing
# prices are final. Weekdays only in cron; the NYSE calendar drops holidays.
@schedule(
    job=daily_drift_scan,
    cron_schedule="30 16 * * 1-5",
    execution_timezone="America/New_York",
)
def daily_drift_at_market_close(context: ScheduleEvaluationContext):
    day = context.scheduled_execution_time.date()
    if not is_session(day):
        return SkipReason(f"{day.isoformat()} is not an NYSE trading session")
    return RunRequest(run_key=f"daily_drift_scan:{day.isoformat()}", partition_key=day.isoformat())
