"""The warehouse: the drift policy table and one Dagster asset per SQL model in dbt_like_sql/.

Lineage in the UI comes straight from each model's {{ ref() }} / {{ source() }} calls.
`feed_data_quality_alert` tells operations, once a day, what the feed's data-quality models found
(rejected rows, accounts held out, unknown accounts, reconciliation breaks).
"""


from datetime import date, datetime, timezone

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from rebal_pipeline import settings
from rebal_pipeline.core.sql_models import SqlModel, landing_table, load_project, materialize_model, replace_partition
from rebal_pipeline.defs.drift.checks import TABLE_CHECKS
from rebal_pipeline.partitions import daily_partitions
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
        pool=WAREHOUSE_POOL,
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


DATA_QUALITY_ALERT = "feed_data_quality"
# How many masked account numbers and reasons the operations email lists (the warehouse has all).
ALERT_EXAMPLES = 20

DATA_QUALITY_COUNTS = """
select
    (select count(*) from rejects where as_of = $as_of) as rejected_rows,
    (select count(*) from data_quality_alerts where as_of = $as_of) as accounts_held_out,
    (select count(*) from data_quality_alerts where as_of = $as_of and not account_known) as unknown_accounts,
    (select count(*) from reconciliation_alerts where as_of = $as_of) as reconciliation_breaks,
    (select count(distinct account_id) from reconciliation_alerts where as_of = $as_of) as accounts_not_reconciled
"""
DATA_QUALITY_REASONS = """
select file || ': ' || regexp_replace(reason, ' \\(without it: .*\\)$', '') || ' (' || count(*)::varchar || ')'
from rejects where as_of = $as_of
group by file, regexp_replace(reason, ' \\(without it: .*\\)$', '')
order by count(*) desc, 1 limit $limit
"""
DATA_QUALITY_ACCOUNTS = """
select account_id from data_quality_alerts where as_of = $as_of order by account_id limit $limit
"""


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
    params = {"as_of": as_of}
    with warehouse.connect() as con:
        row = con.execute(DATA_QUALITY_COUNTS, params).fetchone()
        counts = dict(zip([d[0] for d in con.description], (int(v) for v in row)))
        reasons = [r[0] for r in con.execute(DATA_QUALITY_REASONS, {**params, "limit": ALERT_EXAMPLES}).fetchall()]
        held = [r[0] for r in con.execute(DATA_QUALITY_ACCOUNTS, {**params, "limit": ALERT_EXAMPLES}).fetchall()]
        named = [r[0] for r in con.execute(
            "select distinct account_id from rejects where as_of = $as_of and account_id is not null", params).fetchall()]
    if not any(counts.values()):
        return MaterializeResult(metadata={**counts, "operations_alert": "none needed"})
    from rebal_pipeline.core.pii import mask_account, masker
    from rebal_pipeline.workflow.operations_alerts import raise_operations_alert

    summary = (f"Feed of {as_of.isoformat()}: {counts['rejected_rows']} rejected row(s), "
               f"{counts['accounts_held_out']} account(s) held out of today's recommendations "
               f"({counts['unknown_accounts']} not in accounts.csv), "
               f"{counts['reconciliation_breaks']} reconciliation break(s)")
    mask = masker([*named, *held])  # reasons may name an account ("targets for account …")
    details = {**counts, "commonest_reasons": [mask(r) for r in reasons], "held_out_accounts": [mask_account(a) for a in held]}
    key = f"{DATA_QUALITY_ALERT}:{as_of.isoformat()}"
    with workflow_store.open() as store, store.begin() as conn:
        raised = raise_operations_alert(conn, key=key, alert=DATA_QUALITY_ALERT, summary=summary, details=details,
                                        now=datetime.now(timezone.utc), as_of=as_of)
    context.log.info(f"{summary} ({'operations alert recorded' if raised else 'operations alert already recorded'})")
    return MaterializeResult(metadata={**counts, "operations_alert": key if raised else f"{key} (already recorded)"})


assets = [drift_policy, *build_sql_assets(), feed_data_quality_alert]
