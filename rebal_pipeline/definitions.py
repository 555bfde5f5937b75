"""The one place rebal's Dagster definitions are assembled. It only assembles."""

from dagster import Definitions, in_process_executor

from rebal_pipeline.defs.approvals import defs as approvals
from rebal_pipeline.defs.comms import defs as comms
from rebal_pipeline.defs.connections import sensors as connections
from rebal_pipeline.defs.drift.schedules import daily_drift_at_market_close, daily_drift_scan
from rebal_pipeline.defs.feed import assets as feed
from rebal_pipeline.defs.market_events import defs as market_events
from rebal_pipeline.defs.supervision import defs as supervision
from rebal_pipeline.defs.trades import assets as trades
from rebal_pipeline.defs.warehouse import assets as warehouse
from rebal_pipeline.defs.workflow import assets as workflow
from rebal_pipeline.defs.workflow import anchor as audit_record
from rebal_pipeline.resources import resources_for
from rebal_pipeline.settings import RebalSettings, load_settings


def build_definitions(rebal_settings: RebalSettings | None = None) -> Definitions:
    """Definitions with resources chosen from `rebal_settings` (default: the environment, read and
    validated once here, so a malformed REBAL_* variable fails the code location's load with a
    SettingsError naming it)."""
    if rebal_settings is None:
        rebal_settings = load_settings()
    return Definitions(
        assets=[*feed.assets, *warehouse.assets, *trades.assets, *workflow.assets, *audit_record.assets],
        jobs=[daily_drift_scan, *approvals.jobs, *comms.jobs, *connections.jobs, *supervision.jobs,
              *market_events.jobs],
        schedules=[daily_drift_at_market_close, *supervision.build_schedules(rebal_settings)],
        sensors=[*approvals.sensors, *comms.sensors, *connections.sensors,
                 *market_events.build_sensors(rebal_settings)],
        resources=resources_for(rebal_settings),
        # DuckDB allows one writing process at a time: run the steps of a run in one process.
        executor=in_process_executor,
    )


defs = build_definitions()
