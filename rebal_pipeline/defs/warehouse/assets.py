"""The warehouse: the drift policy table and one Dagster asset per SQL model in dbt_like_sql/.

Lineage in the UI comes straight from each model's {{ ref() }} / {{ source() }} calls.
"""


from datetime import date

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from rebal_pipeline import settings
from rebal_pipeline.core.sql_models import SqlModel, landing_table, load_project, materialize_model, replace_partition
from rebal_pipeline.defs.drift.checks import TABLE_CHECKS
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import DriftPolicySource, Warehouse

LAYER_GROUPS = {"staging": "staging", "intermediate": "intermediate", "marts": "marts"}


@asset(partitions_def=daily_partitions, group_name="policy")
def drift_policy(context: AssetExecutionContext, drift_policy_source: DriftPolicySource, warehouse: Warehouse):
    """The drift policy in force for the day (tiers, bands, urgency), with its version id."""
    as_of = date.fromisoformat(context.partition_key)
    policy = drift_policy_source.load()
    frame = policy.bands_frame().with_columns(as_of=as_of)
    with warehouse.connect() as con:
        replace_partition(con, "drift_policy", as_of, frame.to_arrow())
    return MaterializeResult(
        metadata={
            "policy_version": policy.version_id,
            "bands": MetadataValue.md(
                "\n".join(f"- {r['rule']}: ±{r['band']:.0%} {r['urgency']}" for r in frame.iter_rows(named=True))
            ),
        }
    )


def build_model_asset(model: SqlModel):
    deps = [AssetKey(r) for r in model.refs] + [AssetKey(landing_table(s)) for s in model.sources]
    checks = TABLE_CHECKS.get(model.name, [])

    @asset(
        name=model.name,
        deps=deps,
        partitions_def=daily_partitions,
        group_name=LAYER_GROUPS[model.layer],
        description=model.description or None,
        check_specs=[c.spec(model.name) for c in checks],
        metadata={"sql_path": MetadataValue.path(str(model.path.relative_to(settings.REPO_ROOT)))
                  if model.path.is_relative_to(settings.REPO_ROOT) else str(model.path)},
        kinds={"duckdb", "sql"},
    )
    def _model_asset(context: AssetExecutionContext, warehouse: Warehouse):
        as_of = date.fromisoformat(context.partition_key)
        with warehouse.connect() as con:
            rows = materialize_model(con, model, as_of)
            results = [c.run(con, model.name, as_of) for c in checks]
        return MaterializeResult(metadata={"rows": rows}, check_results=results)

    return _model_asset


def build_sql_assets():
    return [build_model_asset(m) for m in load_project(settings.sql_dir()).values()]


assets = [drift_policy, *build_sql_assets()]
