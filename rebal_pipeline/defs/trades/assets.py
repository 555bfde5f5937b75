"""Trade proposals: the `propose_trades` multi-asset (each drift alert becomes whole-share
trades back inside its bands).

Thin shell over core/proposals.py (reads, orchestration and writes) and the basis ledger assets
of defs/trades/basis.py.
"""

from datetime import date

import polars as pl
from dagster import AssetExecutionContext, AssetKey, AssetSpec, MaterializeResult, MetadataValue, multi_asset

from rebal_pipeline.core.pii import masker
from rebal_pipeline.core.proposals import INPUTS, propose_trades
from rebal_pipeline.defs.trades.basis import assets as basis_assets
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import WAREHOUSE_POOL, AdvisorOverrides, DriftPolicySource, Warehouse


@multi_asset(
    name="propose_trades",
    partitions_def=daily_partitions,
    group_name="trades",
    specs=[
        AssetSpec("trade_proposals", deps=[AssetKey(name) for name in INPUTS], description="Whole-share trades per recommendation (rebalance, "
                  "substitutes for washing buys, tax-loss harvests), each with its reason."),
        AssetSpec("trade_recommendations", deps=[AssetKey(name) for name in INPUTS], description="One recommendation per alerted account or household "
                  "(kind rebalance) and per harvest (kind harvest): inside its bands after rounding, or why not."),
        AssetSpec("tax_lots", deps=[AssetKey(name) for name in INPUTS], description="The cost-basis lots the day's tax work used (accounts traded or harvest-checked "
                  "today, and lots a past purchase opened), after past wash sales: basis and holding period of "
                  "replacement shares adjusted, with term and days to long-term."),
        AssetSpec("tax_impact", deps=[AssetKey(name) for name in INPUTS], description="Per lot relieved by a proposed sell: quantity, proceeds, basis, "
                  "gain, term, estimated tax, wash-sale disallowed loss."),
        AssetSpec("recommendation_summary", deps=[AssetKey(name) for name in INPUTS], description="Per recommendation: ST/LT gain, realised loss, "
                  "estimated tax (IRC §1222 netting), net tax %, wait-for-long-term advice."),
        AssetSpec("tlh_candidates", deps=[AssetKey(name) for name in INPUTS], description="Taxable lots down at least the policy threshold: loss, "
                  "substitute, wash-sale conflict, and whether a harvest is proposed."),
        AssetSpec("wash_sales", deps=[AssetKey(name) for name in INPUTS], description="Wash sales found (past sales from transactions.csv and sales "
                  "proposed today) and what happened to each disallowed loss."),
    ],
    can_subset=False,
    pool=WAREHOUSE_POOL,
)
def propose_trades_asset(context: AssetExecutionContext, warehouse: Warehouse,
                         drift_policy_source: DriftPolicySource, advisor_overrides: AdvisorOverrides):
    """Tax-aware trade proposals for the day's alerts and tax-loss harvests."""
    as_of = date.fromisoformat(context.partition_key)
    with warehouse.connect() as con:
        outcome = propose_trades(con, as_of, drift_policy_source.load(), advisor_overrides.wash_sale_overrides(as_of))
    recs, summary, trades = outcome.recommendations, outcome.summary, outcome.trades
    rebalance = recs.filter(pl.col("kind") == "rebalance")
    outside = rebalance.filter(~pl.col("inside_bands"))
    candidates = outcome.tlh_candidates
    mask = masker([*trades["account_id"], *recs.filter(pl.col("scope") == "account")["scope_id"]])  # last 4 only
    yield MaterializeResult(
        asset_key="trade_proposals",
        metadata={
            "recommendations": rebalance.height,
            "household_recommendations": rebalance.filter(pl.col("scope") == "household").height,
            "harvest_recommendations": recs.height - rebalance.height,
            "trades": trades.height,
            "substituted_buys": trades.filter(pl.col("reason") == "substitute").height,
            "inside_bands_after_trades": rebalance.height - outside.height,
            "could_not_reach_bands": outside.height,
            "compliance_reviews": rebalance.filter(pl.col("compliance_review").is_not_null()).height,
            "examples_not_reached": MetadataValue.md(
                "\n".join(f"- {mask(a)}: {mask(u)}" for a, u in outside.select("scope_id", "unresolved").head(5).iter_rows())
                or "none"
            ),
        },
    )
    yield MaterializeResult(asset_key="trade_recommendations", metadata={"recommendations": recs.height})
    yield MaterializeResult(asset_key="tax_lots", metadata={"lots_read": outcome.tax_impact.height})
    yield MaterializeResult(
        asset_key="tax_impact",
        metadata={
            "lots_relieved": outcome.tax_impact.height,
            "wash_sale_disallowed": float(outcome.tax_impact["wash_sale_disallowed"].sum()),
        },
    )
    yield MaterializeResult(
        asset_key="recommendation_summary",
        metadata={
            "recommendations": summary.height,
            "estimated_tax": float(summary["est_tax"].sum()),
            "wait_for_long_term": int(summary["wait_for_long_term"].sum()),
        },
    )
    yield MaterializeResult(
        asset_key="tlh_candidates",
        metadata={
            "candidate_lots": candidates.height,
            "harvests_proposed": candidates.filter(pl.col("status") == "proposed").height,
            "wash_sale_conflicts": int(candidates["wash_sale_conflict"].sum()) if candidates.height else 0,
        },
    )
    yield MaterializeResult(asset_key="wash_sales", metadata={"events": outcome.wash_sales.height})


assets = [propose_trades_asset, *basis_assets]
