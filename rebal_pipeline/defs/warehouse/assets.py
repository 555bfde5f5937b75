"""The warehouse: the drift policy table and one Dagster asset per SQL model in dbt_like_sql/.

Lineage in the UI comes straight from each model's {{ ref() }} / {{ source() }} calls.
`feed_data_quality_alert` tells operations, once a day, what the feed's data-quality models found
(rejected rows, accounts held out, unknown accounts, reconciliation breaks).
"""


from datetime import date

from dagster import (AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, TableColumn, TableSchema,
                     asset)

from rebal_pipeline import settings
from rebal_pipeline.core import feed_data_quality
from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.core.sql_models import (SqlModel, column_meanings, landing_table, load_project, materialize_model,
                                            replace_partition, table_columns)
from rebal_pipeline.defs.warehouse.checks import check_specs, run_checks
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline.resources import WAREHOUSE_POOL, DriftPolicySource, Warehouse, WorkflowStoreResource

LAYER_GROUPS = {"staging": "staging", "intermediate": "intermediate", "marts": "marts"}


@asset(partitions_def=daily_partitions, group_name="policy", pool=WAREHOUSE_POOL)
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

    @asset(
        name=model.name,
        deps=deps,
        partitions_def=daily_partitions,
        group_name=LAYER_GROUPS[model.layer],
        description=model.description or None,
        check_specs=check_specs(model.name),
        metadata={"sql_path": MetadataValue.path(str(model.path.relative_to(settings.REPO_ROOT)))
                  if model.path.is_relative_to(settings.REPO_ROOT) else str(model.path)},
        kinds={"duckdb", "sql"},
        pool=WAREHOUSE_POOL,
    )
    def _model_asset(context: AssetExecutionContext, warehouse: Warehouse):
        as_of = date.fromisoformat(context.partition_key)
        with warehouse.connect() as con:
            rows = materialize_model(con, model, as_of)
            results = run_checks(con, model.name, as_of)
            columns = table_columns(con, model.name)
        meanings = column_meanings(model.path.parent.parent)
        schema = TableSchema(columns=[TableColumn(name, data_type, description=meanings.of(model.name, name))
                                      for name, data_type in columns.items()])
        return MaterializeResult(metadata={"rows": rows, "dagster/column_schema": schema}, check_results=results)

    return _model_asset


def build_sql_assets():
    return [build_model_asset(m) for m in load_project(settings.sql_dir()).values()]


@asset(
    partitions_def=daily_partitions,
    group_name="marts",
    deps=[AssetKey("data_quality_alerts"), AssetKey("rejects"), AssetKey("reconciliation_alerts")],
    pool=WAREHOUSE_POOL,
    kinds={"sqlalchemy"},
)
def feed_data_quality_alert(context: AssetExecutionContext, warehouse: Warehouse,
                            workflow_store: WorkflowStoreResource):
    """One operations alert per day the feed had rejected rows, held-out accounts or
    reconciliation breaks: the counts, the commonest reasons and the (masked) accounts held out,
    recorded in the workflow store (workflow/operations_alerts.py) and emailed to operations by
    the operations_alerts sensor through the outbox, exactly once. A clean day records nothing."""
    as_of = date.fromisoformat(context.partition_key)
    with warehouse.connect() as con:
        day = feed_data_quality.summarize(con, as_of)
    if day.clean:
        return MaterializeResult(metadata={**day.counts, "operations_alert": "none needed"})
    with workflow_store.open() as store, store.begin() as conn:
        raised = raise_operations_alert(conn, key=day.key, alert=feed_data_quality.DATA_QUALITY_ALERT,
                                        summary=day.summary, details=day.details, now=utc_now(), as_of=as_of)
    context.log.info(f"{day.summary} ({'operations alert recorded' if raised else 'operations alert already recorded'})")
    return MaterializeResult(metadata={**day.counts, "operations_alert": day.key if raised else f"{day.key} (already recorded)"})


assets = [drift_policy, *build_sql_assets(), feed_data_quality_alert]
