"""rebal's basis ledger in the warehouse: the `basis_adjustments` and `basis_reconciliation` assets.

Thin shell over core/basis_ledger_store.py (read, compute, write) and core/basis_ledger.py.
"""


from datetime import date

import polars as pl
from dagster import AssetExecutionContext, AssetKey, AssetSpec, MaterializeResult, multi_asset

from rebal_pipeline.core.basis_ledger_store import INPUTS, write_basis_ledger
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import WAREHOUSE_POOL, Warehouse


@multi_asset(
    name="basis_ledger",
    partitions_def=daily_partitions,
    group_name="trades",
    specs=[
        AssetSpec("basis_adjustments", deps=[AssetKey(name) for name in INPUTS],
                  description="rebal's wash-sale basis ledger: one row per (loss sale, replacement purchase) with the "
                  "replacement lot, shares still held, basis added and tacked holding period; carried from session "
                  "to session (custodians adjust only within one account, IRC §6045(g))."),
        AssetSpec("basis_reconciliation", deps=[AssetKey(name) for name in INPUTS],
                  description="Lots the custodian marks wash_sale_adjusted: the custodian's basis (used) against "
                  "rebal's; status differs is a data-quality alert."),
    ],
    can_subset=False,
    pool=WAREHOUSE_POOL,
)
def basis_ledger_asset(context: AssetExecutionContext, warehouse: Warehouse):
    """Wash-sale basis adjustments carried day to day, and the custodian reconciliation."""
    as_of = date.fromisoformat(context.partition_key)
    with warehouse.connect() as con:
        past = write_basis_ledger(con, as_of)
    ledger, reconciliation = past.ledger, past.reconciliation
    differs = reconciliation.filter(pl.col("status") == "differs")
    if differs.height:
        context.log.warning(f"{differs.height} custodian wash-sale adjusted lot(s) differ from rebal's basis")
    yield MaterializeResult(asset_key="basis_adjustments", metadata={
        "rows": ledger.height,
        "applied_to_lots": int(ledger["applied_to_lot"].sum()) if ledger.height else 0,
        "basis_added_held": float(ledger.filter(pl.col("applied_to_lot"))["basis_added_held"].sum())
        if ledger.height else 0.0,
    })
    yield MaterializeResult(asset_key="basis_reconciliation", metadata={
        "custodian_adjusted_lots": reconciliation.height, "differences": differs.height,
    })


assets = [basis_ledger_asset]
