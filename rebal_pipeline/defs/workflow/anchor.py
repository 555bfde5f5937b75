"""The compliance record of the daily run (issue 13).

  configuration_changes   the day's configuration (drift policy, IPS targets, model weights,
                          suspensions) compared with the last-seen snapshot in the workflow store:
                          one audit event per change (workflow/config_events.py)
  audit_anchor            after the day's recommendations are published: the audit chain is
                          verified and its head (seq, hash, count) written down outside the
                          database, in a write-once anchor file in the archive and in this
                          asset's metadata (workflow/audit.py). A chain that does not verify fails
                          the asset: nothing is anchored on top of a broken record.
  anchor_audit_chain      the same anchoring as an op, for jobs that append outside the daily
                          graph (execute_rebalance: add it after stage_or_submit_orders).
"""

from datetime import date, datetime, timezone

from dagster import (
    AssetExecutionContext, AssetKey, Failure, In, MaterializeResult, MetadataValue, Nothing, OpExecutionContext,
    asset, op,
)

from rebal_pipeline import settings
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import WAREHOUSE_POOL, DriftPolicySource, FeedLocation, Warehouse, WorkflowStoreResource
from rebal_pipeline.workflow import audit, config_events


@asset(
    partitions_def=daily_partitions,
    group_name="approvals",
    deps=[AssetKey(name) for name in (*config_events.INPUTS, "drift_policy")],
    kinds={"sqlalchemy"},
    pool=WAREHOUSE_POOL,  # reads the warehouse (issue #12: runs that open it are serialised)
)
def configuration_changes(context: AssetExecutionContext, warehouse: Warehouse,
                          workflow_store: WorkflowStoreResource, drift_policy_source: DriftPolicySource):
    """Policy, IPS, model and suspension changes since the last feed, each an audit event, once."""
    as_of = date.fromisoformat(context.partition_key)
    policy = config_events.policy_version(drift_policy_source.load(), drift_policy_source.policy_file or None)
    with warehouse.connect() as con:
        snapshot = config_events.read_snapshot(con, as_of, policy)
    with workflow_store.open() as store, store.begin() as conn:
        changes = config_events.record_configuration(conn, as_of, snapshot, datetime.now(timezone.utc))
    context.log.info(f"{changes.events} configuration changes recorded in the audit chain")
    return MaterializeResult(metadata={
        "configuration_events": changes.events, "policy_version": policy.version_id,
        **{f"{kind}_events": n for kind, n in sorted(changes.by_kind.items())},
        **{f"{kind}_scopes": len(scopes) for kind, scopes in sorted(snapshot.scopes.items())},
    })


def _anchor(workflow_store: WorkflowStoreResource, feed: FeedLocation) -> dict | None:
    with workflow_store.open() as store, store.begin() as conn:
        try:
            return audit.anchor(conn, datetime.now(timezone.utc), audit.anchor_dir(conn, feed.archive_root))
        except audit.AuditBroken as broken:
            raise Failure(description=f"the audit chain does not verify; nothing was anchored. {broken} "
                                      "(run `rebal audit verify`, find the cause before the next run)") from None


def _metadata(document: dict | None) -> dict:
    if document is None:
        return {"events": 0}
    return {"seq": document["seq"], "head_hash": document["hash"], "events": document["events"],
            "key_id": document["key_id"], "anchored_at": document["anchored_at"],
            "anchor_file": MetadataValue.path(document["file"])}


@asset(
    partitions_def=daily_partitions,
    group_name="approvals",
    deps=[AssetKey("pending_recommendations"), AssetKey("configuration_changes")],
    kinds={"sqlalchemy"},
)
def audit_anchor(context: AssetExecutionContext, workflow_store: WorkflowStoreResource, feed: FeedLocation):
    """The audit chain's head after the day's run, verified and written down outside the database."""
    document = _anchor(workflow_store, feed)
    if document:
        context.log.info(f"audit chain anchored at event {document['seq']} ({document['hash'][:16]}…)")
    return MaterializeResult(metadata=_metadata(document))


@op(ins={"after": In(Nothing)}, description="Verify the audit chain and anchor its head outside the database.")
def anchor_audit_chain(context: OpExecutionContext, workflow_store: WorkflowStoreResource) -> dict:
    # Jobs launched for one decision carry no feed resource: the archive is the deployment's
    # (REBAL_ARCHIVE_ROOT), the same folder the feed resource is built from (resources.py).
    document = _anchor(workflow_store, FeedLocation(feed_root=str(settings.feed_root()),
                                                    archive_root=str(settings.archive_root())))
    context.add_output_metadata(_metadata(document))
    return {k: v for k, v in (document or {}).items() if k != "signature"}


assets = [configuration_changes, audit_anchor]
