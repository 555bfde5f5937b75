"""The daily run hands its recommendations to the advisor: one package per recommendation,
written to the workflow store as `pending` (routed to the advisor of record, urgency from the
tier), superseding yesterday's open one for the same account/household without restarting its
escalation clock, and closing those back inside their bands (`resolved_by_market`).

Thin shell: the packages and their queries are workflow/publishing.py; the lifecycle rules live
in rebal_pipeline/workflow/lifecycle.py.
"""

from datetime import date

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, asset

from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import (
    WAREHOUSE_POOL, ApprovalClockResource, DriftPolicySource, Warehouse, WorkflowStoreResource, settings_of,
)
from rebal_pipeline.workflow import lifecycle, publishing


@asset(
    partitions_def=daily_partitions,
    group_name="approvals",
    # configuration_changes first: a new policy version, IPS or model change is on the record
    # before any recommendation made under it.
    deps=[*(AssetKey(name) for name in publishing.INPUTS), AssetKey("configuration_changes")],
    kinds={"sqlalchemy"},
    pool=WAREHOUSE_POOL,
)
def pending_recommendations(context: AssetExecutionContext, warehouse: Warehouse,
                            workflow_store: WorkflowStoreResource, drift_policy_source: DriftPolicySource,
                            approval_clock: ApprovalClockResource):
    """The day's recommendations in the workflow store, waiting for the advisor's decision."""
    as_of = date.fromisoformat(context.partition_key)
    drift_policy = drift_policy_source.load()
    # The reminder / escalation hours the escalation sensor uses too (the approval_clock resource).
    policy = lifecycle.lifecycle_policy(drift_policy, settings_of(approval_clock))
    with warehouse.connect() as con:
        with workflow_store.open() as store, store.begin() as conn:
            today, result = publishing.publish_recommendations(
                con, conn, as_of, publishing.trade_rules_of(drift_policy), policy, utc_now())
    context.log.info(f"published {result.created} recommendations ({result.superseded} superseded, "
                     f"{result.resolved} resolved by the market, {result.auto_approved} auto-approved)")
    return MaterializeResult(metadata={
        "recommendations_today": today, "created": result.created, "already_published": result.unchanged,
        "superseded": result.superseded, "resolved_by_market": result.resolved,
        "auto_approved_micro_trades": result.auto_approved,
        # Issue 12: an older day's run publishes history; open orders hold an account.
        "historical": result.historical, "held_for_open_orders": result.held,
        "auto_approvals_voided": result.voided,
    })


assets = [pending_recommendations]
