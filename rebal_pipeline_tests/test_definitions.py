"""The whole Definitions load, the lineage is real, and the schedule follows NYSE sessions."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from dagster import AssetKey, RunRequest, SkipReason, build_schedule_context

from rebal_pipeline.definitions import defs
from rebal_pipeline.defs.drift.schedules import daily_drift_at_market_close

NY = ZoneInfo("America/New_York")


def test_definitions_load_with_job_schedule_and_checks():
    repo = defs.get_repository_def()
    assert repo.has_job("daily_drift_scan")
    assert {s.name for s in repo.schedule_defs} == {"daily_drift_at_market_close", "supervisory_report_schedule"}
    checks = {k.name for k in defs.resolve_asset_graph().asset_check_keys}
    assert {"holdings_priced_nonnegative_and_reconciled", "weights_sum_to_one_per_scope"} <= checks


def test_lineage_runs_from_the_custodian_feed_to_drift_alerts():
    graph = defs.resolve_asset_graph()
    upstream = graph.get(AssetKey("drift_alerts")).parent_keys
    seen, frontier = set(), set(upstream)
    while frontier:
        key = frontier.pop()
        seen.add(key)
        frontier |= set(graph.get(key).parent_keys) - seen
    assert AssetKey("custodian_feed") in seen
    assert {AssetKey("holdings"), AssetKey("drift"), AssetKey("landing_positions"), AssetKey("drift_policy")} <= seen


@pytest.mark.parametrize(
    "day, runs",
    [
        (datetime(2026, 11, 25, 16, 30, tzinfo=NY), True),   # Wednesday before Thanksgiving
        (datetime(2026, 11, 26, 16, 30, tzinfo=NY), False),  # Thanksgiving: NYSE closed
        (datetime(2026, 11, 27, 16, 30, tzinfo=NY), True),   # early close (13:00) is still a session
        (datetime(2026, 12, 25, 16, 30, tzinfo=NY), False),  # Christmas
        (datetime(2027, 1, 18, 16, 30, tzinfo=NY), False),   # Martin Luther King Jr. Day
        (datetime(2026, 7, 3, 16, 30, tzinfo=NY), False),    # Independence Day observed (Friday)
    ],
)
def test_schedule_runs_on_nyse_sessions_only(day, runs):
    result = daily_drift_at_market_close(build_schedule_context(scheduled_execution_time=day))
    if runs:
        assert isinstance(result, RunRequest)
        assert result.partition_key == day.date().isoformat()
        assert result.run_key == f"daily_drift_scan:{day.date().isoformat()}"
    else:
        assert isinstance(result, SkipReason)
        assert "not an NYSE trading session" in result.skip_message


@pytest.mark.parametrize(
    "now, expected",
    [
        (datetime(2026, 11, 24, 10, 0, tzinfo=NY), "2026-11-23"),  # Tuesday morning: Monday's close
        (datetime(2026, 11, 24, 16, 5, tzinfo=NY), "2026-11-24"),  # after Tuesday's close
        (datetime(2026, 11, 26, 12, 0, tzinfo=NY), "2026-11-25"),  # Thanksgiving: Wednesday
        (datetime(2026, 11, 27, 13, 30, tzinfo=NY), "2026-11-27"),  # after the 13:00 early close
        (datetime(2026, 11, 29, 9, 0, tzinfo=NY), "2026-11-27"),   # Sunday: Friday
    ],
)
def test_default_as_of_is_the_latest_closed_nyse_session(now, expected):
    from rebal_pipeline.core.market_calendar import latest_closed_session

    assert latest_closed_session(now).isoformat() == expected


def test_a_malformed_variable_fails_the_code_location_load_naming_it(tmp_path):
    # The code location's load as Dagster does it: importing definitions.py in a fresh process.
    import os
    import subprocess
    import sys

    env = {**os.environ, "REBAL_HOME": str(tmp_path), "REBAL_LINK_TTL_HOURS": "abc"}
    done = subprocess.run([sys.executable, "-c", "import rebal_pipeline.definitions"],
                          env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "SettingsError: REBAL_LINK_TTL_HOURS='abc': " in done.stderr
