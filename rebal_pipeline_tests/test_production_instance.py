"""The production dagster.yaml: Dagster's own storage in PostgreSQL, connection from env."""

import shutil

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from rebal_pipeline import settings
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder
from rebal_pipeline_tests.postgres import PG, scratch_database


@pytest.mark.postgres
def test_daily_scan_materialises_on_a_postgres_backed_instance_and_the_run_reads_back(
    tmp_path, workspace, monkeypatch
):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1")
    b.position("ACC-1", "VTI", 70); b.position("ACC-1", "BND", 60)
    b.write(workspace.feed_root)

    with scratch_database() as db_name:
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copyfile(settings.REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        for key, value in {
            "DAGSTER_PG_HOST": PG["host"], "DAGSTER_PG_PORT": str(PG["port"]),
            "DAGSTER_PG_DB": db_name, "DAGSTER_PG_USERNAME": PG["user"],
            "DAGSTER_PG_PASSWORD": PG["password"],
        }.items():
            monkeypatch.setenv(key, value)

        with DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            result = workspace.run_day(instance=instance)
            assert result.success
            run_id = result.run_id

        # A new instance on the same database sees the run and its materialisations.
        with DagsterInstance.from_config(str(home)) as instance:
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.SUCCESS
            assert run.tags["dagster/partition"] == AS_OF.isoformat()
            from dagster import AssetKey

            event = instance.get_latest_materialization_event(AssetKey("drift_alerts"))
            assert event is not None and event.run_id == run_id
            assert event.asset_materialization.partition == AS_OF.isoformat()
    assert workspace.table("drift_alerts").height == 1
