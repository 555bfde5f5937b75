"""Every column of every SQL model says what it means, in the Dagster UI (dbt_like_sql/columns.yml)."""

from rebal_pipeline import settings
from rebal_pipeline.core.sql_models import load_project
from rebal_pipeline_tests.feedkit import FeedBuilder


def test_each_model_shows_its_columns_with_types_and_meanings(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 70); b.position("ACC-1", "BND", 60)
    b.write(workspace.feed_root)
    result = workspace.run_day(instance=dagster_instance)
    shown = {e.asset_key.to_user_string(): e.materialization.metadata.get("dagster/column_schema")
             for e in result.get_asset_materialization_events()}
    models = list(load_project(settings.sql_dir()))
    assert set(models) <= set(shown)
    undocumented = {}
    for model in models:
        schema = shown[model].value
        assert schema.columns, f"{model} shows no columns"
        assert all(c.type for c in schema.columns), model
        missing = [c.name for c in schema.columns if not c.description]
        if missing:
            undocumented[model] = missing
    assert undocumented == {}, f"columns without a meaning in dbt_like_sql/columns.yml: {undocumented}"
    drift = {c.name: c for c in shown["drift"].value.columns}
    assert drift["drift"].description == "Current weight minus target weight of the asset class."
    assert drift["market_value"].description.startswith("Market value of the asset class")
