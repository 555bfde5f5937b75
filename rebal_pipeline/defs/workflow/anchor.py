"""The compliance record of the daily run (issue 13).

  configuration_changes   the day's configuration (drift policy, IPS targets, model weights,
                          suspensions) compared with the last-seen snapshot in the workflow store:
                          one audit event per change (workflow/config_events.py)
  audit_anchor            after the day's recommendations are published: the audit chain is
                          verified and its head (seq, hash, count) written down outside the
                          database, in a write-once anchor file in the archive and in this
                          asset's metadata (workflow/audit.py). A chain that does not verify fails
                          the asset: nothing is anchored on top of a broken record.

The anchoring itself is workflow/anchoring.py; the same step as an op, for jobs that append
outside the daily graph, is `anchor_audit_chain` in defs/approvals/jobs.py.
"""

from datetime import date

from dagster import AssetExecutionContext, AssetKey, Failure, MaterializeResult, MetadataValue, asset

from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import WAREHOUSE_POOL, DriftPolicySource, FeedLocation, Warehouse, WorkflowStoreResource
from rebal_pipeline.workflow import anchoring, config_events


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
        changes = config_events.record_configuration(conn, as_of, snapshot, utc_now())
    context.log.info(f"{changes.events} configuration changes recorded in the audit chain")
    return MaterializeResult(metadata={
        "configuration_events": changes.events, "policy_version": policy.version_id,
        **{f"{kind}_events": n for kind, n in sorted(changes.by_kind.items())},
        **{f"{kind}_scopes": len(scopes) for kind, scopes in sorted(snapshot.scopes.items())},
    })


def _anchor(workflow_store: WorkflowStoreResource, archive_root) -> dict | None:
    with workflow_store.open() as store, store.begin() as conn:
        try:
            return anchoring.anchor_chain(conn, utc_now(), archive_root)
        except anchoring.AnchorRefused as refused:
            raise Failure(description=str(refused)) from None


def _metadata(document: dict | None) -> dict:
    summary = anchoring.anchor_summary(document)
    if "anchor_file" in summary:
        summary["anchor_file"] = MetadataValue.path(summary["anchor_file"])
    return summary


@asset(
    partitions_def=daily_partitions,
    group_name="approvals",
    deps=[AssetKey("pending_recommendations"), AssetKey("configuration_changes")],
    kinds={"sqlalchemy"},
)
def audit_anchor(context: AssetExecutionContext, workflow_store: WorkflowStoreResource, feed: FeedLocation):
    """The audit chain's head after the day's run, verified and written down outside the database."""
    document = _anchor(workflow_store, feed.archive_root)
    if document:
        context.log.info(f"audit chain anchored at event {document['seq']} ({document['hash'][:16]}…)")
    return MaterializeResult(metadata=_metadata(document))


assets = [configuration_changes, audit_anchor]
