"""The dbt-like runner: dependency order, identifiers only, and blocking checks."""

import shutil

import pytest
from graphlib import CycleError

from rebal_pipeline import settings
from rebal_pipeline.core.sql_models import contract_literal, load_project, quote_identifier
from rebal_pipeline_tests.feedkit import FeedBuilder


def test_models_are_ordered_after_everything_they_ref():
    models = list(load_project(settings.sql_dir()).values())
    position = {m.name: i for i, m in enumerate(models)}
    for model in models:
        for ref in model.refs:
            if ref in position:
                assert position[ref] < position[model.name], f"{model.name} runs before {ref}"
    assert {"holdings", "drift", "drift_alerts", "rejects"} <= set(position)


def test_a_ref_to_a_missing_model_is_refused(tmp_path):
    (tmp_path / "marts").mkdir()
    (tmp_path / "marts" / "broken.sql").write_text("select * from {{ ref('nowhere') }}")
    with pytest.raises(ValueError, match="unknown model"):
        load_project(tmp_path)


def test_a_cycle_is_refused(tmp_path):
    (tmp_path / "marts").mkdir()
    (tmp_path / "marts" / "a.sql").write_text("select * from {{ ref('b') }}")
    (tmp_path / "marts" / "b.sql").write_text("select * from {{ ref('a') }}")
    with pytest.raises(CycleError):
        load_project(tmp_path)


@pytest.mark.parametrize("name", ["holdings; drop table x", 'a"b', "Holdings", "1abc"])
def test_templates_render_only_safe_identifiers(name, tmp_path):
    with pytest.raises(ValueError):
        quote_identifier(name)
    with pytest.raises(ValueError):
        contract_literal("x'; drop table y; --")
    (tmp_path / "marts").mkdir()
    (tmp_path / "marts" / "evil.sql").write_text("select 1 as as_of from {{ ref(%r) }}" % name)
    with pytest.raises(ValueError):
        load_project(tmp_path)


def test_a_failed_blocking_check_stops_everything_downstream(tmp_path, workspace, dagster_instance, monkeypatch):
    # A holdings model that loses a price must not produce drift or alerts.
    sql_dir = tmp_path / "sql"
    shutil.copytree(settings.sql_dir(), sql_dir)
    holdings = sql_dir / "marts" / "holdings.sql"
    holdings.write_text(holdings.read_text().replace("pr.close as price,", "null::decimal(18, 8) as price,"))
    monkeypatch.setenv("REBAL_SQL_DIR", str(sql_dir))
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 70); b.position("ACC-1", "BND", 60)
    b.write(workspace.feed_root)
    result = workspace.run_day(instance=dagster_instance, raise_on_error=False)
    assert not result.success
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    failed = [c for c in checks if not c.passed]
    assert [c.check_name for c in failed] == ["holdings_priced_nonnegative_and_reconciled"]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "holdings" in materialized
    assert "drift" not in materialized and "drift_alerts" not in materialized


def test_python_written_tables_gain_new_columns_without_losing_old_partitions(tmp_path):
    from datetime import date

    import duckdb
    import polars as pl

    from rebal_pipeline.core.sql_models import replace_partition

    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    replace_partition(con, "recs", date(2026, 11, 19), pl.DataFrame({"as_of": [date(2026, 11, 19)], "a": [1]}).to_arrow())
    newer = pl.DataFrame({"as_of": [date(2026, 11, 20)], "a": [2], "b": ["new"]})
    replace_partition(con, "recs", date(2026, 11, 20), newer.to_arrow())
    rows = con.execute("select as_of, a, b from recs order by as_of").fetchall()
    assert rows == [(date(2026, 11, 19), 1, None), (date(2026, 11, 20), 2, "new")]
