"""Backfills from the Dagster UI (issue #12, item 5): NYSE-session partitions, a clear failure for a
session whose feed folder is missing, and several sessions' runs serialised on the warehouse by
the shipped instance configs — the embedded SQLite instance (rebal_pipeline/instance/
local_dagster.yaml) and the production one (dagster.yaml, Postgres).

The backfill test runs what a deployment runs: `dagster-daemon run -w workspace.yaml` in its own
process (backfill daemon, run queue, run launcher, code server, one process per run), and the
backfill is launched with the UI's own GraphQL mutation (`launchPartitionBackfill`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import pytest
from dagster import (
    DagsterEventType, DagsterInstance, DagsterRunStatus, PartitionKeyRange, RunsFilter, SkipReason, build_schedule_context, materialize,
    partition_loading_context,
)
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.op_concurrency_limits_counter import compute_run_op_concurrency_info_for_snapshot
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.snap import snapshot_from_execution_plan
from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget, create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.instance.config import PoolGranularity
from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION
from dagster_graphql.test.utils import execute_dagster_graphql

from rebal_pipeline import settings
from rebal_pipeline.core.market_calendar import nyse
from rebal_pipeline.defs.approvals.jobs import execute_rebalance
from rebal_pipeline.defs.drift.schedules import daily_drift_at_market_close
from rebal_pipeline.defs.feed.assets import assets as feed_assets
from rebal_pipeline.definitions import defs
from rebal_pipeline.drill import LOCAL_INSTANCE_YAML
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import ensure_warehouse_pool, WAREHOUSE_POOL
from rebal_pipeline_tests.feedkit import FeedBuilder
from rebal_pipeline_tests.postgres import PG, scratch_database

NEW_YORK = ZoneInfo("America/New_York")
SATURDAY, THANKSGIVING, GOOD_FRIDAY = date(2026, 11, 21), date(2026, 11, 26), date(2026, 4, 3)
# Thursday, Friday and the Monday after: a range over a weekend.
SESSIONS = [date(2026, 11, 19), date(2026, 11, 20), date(2026, 11, 23)]
BACKFILL_TIMEOUT_S = 480


# ---------------------------------------------------------------------------------------------
# Partitions: NYSE sessions only
# ---------------------------------------------------------------------------------------------


def has_partition(key: str, at: datetime) -> bool:
    with partition_loading_context(effective_dt=at):
        return daily_partitions.has_partition_key(key)


def test_daily_partitions_are_exactly_the_nyse_sessions():
    keys = daily_partitions.get_partition_keys(current_time=datetime(2026, 12, 1, 17, 0, tzinfo=NEW_YORK))
    for not_a_session in (SATURDAY, THANKSGIVING, GOOD_FRIDAY, date(2025, 1, 9)):  # 2025-01-09: national mourning
        assert not_a_session.isoformat() not in keys
        assert not has_partition(not_a_session.isoformat(), datetime(2026, 12, 1, 17, tzinfo=NEW_YORK))
    for session in ("2026-11-20", "2026-11-27", "2021-01-04"):  # 11-27: early close, still a session
        assert session in keys
    sessions = nyse().sessions_in_range("2021-01-01", "2026-12-01")
    assert keys == [s.date().isoformat() for s in sessions]  # every session, nothing else, as YYYY-MM-DD
    # A session's partition exists once its close has passed (the schedule asks at 16:30).
    before_close = daily_partitions.get_partition_keys(current_time=datetime(2026, 11, 20, 15, 0, tzinfo=NEW_YORK))
    assert before_close[-1] == "2026-11-19"
    weekend = daily_partitions.get_partition_keys(current_time=datetime(2026, 11, 22, 12, 0, tzinfo=NEW_YORK))
    assert weekend[-1] == "2026-11-20"


def test_a_backfill_range_over_a_weekend_holds_only_its_sessions():
    assert daily_partitions.get_partition_keys_in_range(PartitionKeyRange("2026-11-19", "2026-11-23")) == \
        [d.isoformat() for d in SESSIONS]


@pytest.mark.parametrize("at, expected", [
    (datetime(2026, 11, 20, 16, 30, tzinfo=NEW_YORK), "2026-11-20"),
    (datetime(2026, 11, 27, 16, 30, tzinfo=NEW_YORK), "2026-11-27"),  # early close (13:00)
    (datetime(2026, 11, 26, 16, 30, tzinfo=NEW_YORK), None),  # Thanksgiving
])
def test_the_market_close_schedule_asks_for_that_sessions_partition(at, expected):
    context = build_schedule_context(scheduled_execution_time=at, repository_def=defs.get_repository_def())
    result = daily_drift_at_market_close.evaluate_tick(context)
    if expected is None:
        assert result.skip_message == "2026-11-26 is not an NYSE trading session"
        assert not isinstance(result, SkipReason) and not result.run_requests
        return
    [request] = result.run_requests
    assert request.partition_key == expected
    assert has_partition(expected, at)


# ---------------------------------------------------------------------------------------------
# A session without its feed folder
# ---------------------------------------------------------------------------------------------


def test_a_session_with_no_feed_folder_fails_naming_the_folder(workspace, dagster_instance):
    result = materialize(feed_assets, partition_key="2026-11-23", resources=workspace.resources(),
                         instance=dagster_instance, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    folder = workspace.feed_root / "2026-11-23"
    message = failure.step_failure_data.user_failure_data.description
    assert message.startswith(f"no feed folder for the 2026-11-23 session: {folder} does not exist")
    # Failed at once: no retry can make the folder appear.
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


# ---------------------------------------------------------------------------------------------
# Which steps hold the warehouse pool
# ---------------------------------------------------------------------------------------------


def test_every_step_that_opens_the_warehouse_is_in_the_pool():
    """Every asset and op that requires the `warehouse` resource is in the pool, so the run queue
    holds back any run that opens the warehouse — except the mailer's read-only contact lookups
    (defs/comms), which may run side by side and retry through the outbox."""
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        assets_def = graph.get(key).assets_def
        if "warehouse" in assets_def.required_resource_keys:
            for op_def in assets_def.node_def.iterate_op_defs():
                assert op_def.pool == WAREHOUSE_POOL, key
    read_only = {"deliver_advisor_alert", "deliver_execution_messages", "deliver_notification"}
    for job_def in defs.resolve_all_job_defs():
        for op_def in job_def.graph.iterate_op_defs():
            if "warehouse" in op_def.required_resource_keys and op_def.name not in read_only:
                assert op_def.pool == WAREHOUSE_POOL, (job_def.name, op_def.name)
    # The approval run as the run queue sees it: held back while a daily run has the pool.
    plan = create_execution_plan(execute_rebalance, run_config={
        "ops": {"approval_gate": {"config": {"decision_id": "d"}}}})
    info = compute_run_op_concurrency_info_for_snapshot(
        snapshot_from_execution_plan(plan, execute_rebalance.get_job_snapshot_id()))
    assert info.all_pools == {WAREHOUSE_POOL}


@pytest.mark.parametrize("yaml_path", [settings.REPO_ROOT / "dagster.yaml", LOCAL_INSTANCE_YAML],
                         ids=["production", "embedded"])
def test_both_shipped_instance_configs_serialise_the_pool_per_run(yaml_path, tmp_path, monkeypatch):
    import yaml

    config = yaml.safe_load(yaml_path.read_text())
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"] == {"granularity": "run", "default_limit": 1}
    if yaml_path == LOCAL_INSTANCE_YAML:
        shutil.copyfile(yaml_path, tmp_path / "dagster.yaml")
        with DagsterInstance.from_config(str(tmp_path)) as instance:
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            pools = instance.get_concurrency_config().pool_config
            assert pools.pool_granularity == PoolGranularity.RUN and pools.default_pool_limit == 1


# ---------------------------------------------------------------------------------------------
# A backfill of three sessions launched as the UI launches it, run by dagster-daemon
# ---------------------------------------------------------------------------------------------


def write_small_book(feed_root: Path, day: date) -> None:
    """Two accounts of one household, drifted a little differently each day."""
    b = FeedBuilder(as_of=day)
    b.household("HH-1")
    b.account("ACC-1")
    b.account("ACC-2")
    shift = SESSIONS.index(day) * 5
    b.position("ACC-1", "VTI", 70 + shift)
    b.position("ACC-1", "BND", 60)
    b.position("ACC-2", "VTI", 40)
    b.position("ACC-2", "BND", 90 - shift)
    b.write(feed_root)


def launch_backfill_as_the_ui_does(instance: DagsterInstance, partition_keys: list[str]) -> str:
    """The UI's "Materialize all → backfill" over the chosen partitions: the launchPartitionBackfill
    mutation, against the same code location (workspace.yaml's module)."""
    target = InProcessTestWorkspaceLoadTarget(InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="rebal_pipeline.definitions", working_directory=str(settings.REPO_ROOT)),
        location_name="rebal"))
    keys = sorted(defs.resolve_asset_graph().materializable_asset_keys)
    with create_test_daemon_workspace_context(target, instance) as workspace:
        result = execute_dagster_graphql(workspace.create_request_context(), LAUNCH_PARTITION_BACKFILL_MUTATION, {
            "backfillParams": {"partitionNames": partition_keys,
                               "assetSelection": [{"path": k.path} for k in keys]}})
    assert result.errors is None, result.errors
    launched = result.data["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def wait_for_backfill(instance: DagsterInstance, backfill_id: str, daemon: subprocess.Popen, log: Path):
    done = {BulkActionStatus.COMPLETED_SUCCESS, BulkActionStatus.COMPLETED_FAILED, BulkActionStatus.FAILED,
            BulkActionStatus.CANCELED, BulkActionStatus.COMPLETED}
    deadline = time.monotonic() + BACKFILL_TIMEOUT_S
    while True:  # waiting for the daemon (the test's clock), not retrying anything
        backfill = instance.get_backfill(backfill_id)
        if backfill.status in done:
            return backfill
        if daemon.poll() is not None:
            pytest.fail(f"dagster-daemon exited ({daemon.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            runs = [(r.tags.get("dagster/partition"), r.status.value) for r in
                    instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))]
            pytest.fail(f"backfill still {backfill.status} after {BACKFILL_TIMEOUT_S}s; runs {runs}\n"
                        f"{log.read_text()[-4000:]}")
        time.sleep(1)


def step_failures(instance: DagsterInstance, run_id: str) -> list[str]:
    """What failed in a run, as the UI's run page shows it (for the assertion message)."""
    events = instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE})
    out = []
    for e in events:
        data = e.dagster_event.event_specific_data
        error = getattr(data, "error", None)
        text = error.to_string() if error is not None else str(data)
        out.append(f"{e.dagster_event.step_key}: {text[-2500:]}")
    return out


@pytest.fixture(params=["embedded", pytest.param("production", marks=pytest.mark.postgres)])
def shipped_instance(request, tmp_path):
    """DAGSTER_HOME with the shipped config: the embedded SQLite one, or the Postgres one on a
    scratch database. Yields (home, environment for the daemon)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home)}
    if request.param == "embedded":
        shutil.copyfile(LOCAL_INSTANCE_YAML, home / "dagster.yaml")
        yield home, env
        return
    with scratch_database() as db_name:
        shutil.copyfile(settings.REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        env |= {"DAGSTER_PG_HOST": PG["host"], "DAGSTER_PG_PORT": str(PG["port"]), "DAGSTER_PG_DB": db_name,
                "DAGSTER_PG_USERNAME": PG["user"], "DAGSTER_PG_PASSWORD": PG["password"]}
        yield home, env


def test_a_three_session_backfill_from_the_ui_completes_one_run_at_a_time(shipped_instance, tmp_path, monkeypatch):
    home, instance_env = shipped_instance
    rebal_home = tmp_path / "rebal_home"
    for day in SESSIONS:
        write_small_book(rebal_home / "feeds", day)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REBAL_", "DAGSTER_")) or k in ("REBAL_AUDIT_KEY", "REBAL_SANDBOX")}
    env |= instance_env | {"REBAL_HOME": str(rebal_home), "PYTHONUNBUFFERED": "1"}
    if not env.get("REBAL_AUDIT_KEY"):
        env["REBAL_AUDIT_KEY"] = "a-backfill-test-audit-key-of-at-least-32-bytes"
    for key, value in instance_env.items():  # the Dagster instance's dagster.yaml reads them from the environment
        monkeypatch.setenv(key, value)

    log = tmp_path / "daemon.log"
    with DagsterInstance.from_config(str(home)) as instance, open(log, "w") as log_file:
        # The set-up every rebal instance gets (the drill, `rebal instance init`).
        assert ensure_warehouse_pool(instance)
        backfill_id = launch_backfill_as_the_ui_does(instance, [d.isoformat() for d in SESSIONS])
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(settings.REPO_ROOT / "workspace.yaml")],
            cwd=settings.REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            backfill = wait_for_backfill(instance, backfill_id, daemon, log)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)  # the daemon, its code server and run workers
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()

        records = sorted(instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id})),
                         key=lambda r: r.start_time or 0)
        outcome = {r.dagster_run.tags["dagster/partition"]: r.dagster_run.status for r in records}
        if backfill.status != BulkActionStatus.COMPLETED_SUCCESS:
            pytest.fail(f"backfill {backfill.status}: {outcome}\n" + "\n".join(
                f for r in records for f in step_failures(instance, r.dagster_run.run_id)))
        assert outcome == {d.isoformat(): DagsterRunStatus.SUCCESS for d in SESSIONS}
        # One after another: each run started after the one before had finished.
        for earlier, later in zip(records, records[1:]):
            assert later.start_time >= earlier.end_time, (earlier.dagster_run.run_id, later.dagster_run.run_id)
        assert "DagsterExecutionStepExecutionError" not in log.read_text()

    with duckdb.connect(str(rebal_home / "warehouse.duckdb"), read_only=True) as con:
        days = con.execute("select as_of, count(*) from holdings group by as_of order by as_of").fetchall()
    assert days == [(d, 4) for d in SESSIONS]  # two accounts × two funds, each session
