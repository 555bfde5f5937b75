"""Trade proposals: each account-scope drift alert becomes whole-share trades back to target.

Thin shell: read the day's frames from the warehouse, call the pure sizing core
(core/trade_sizing.py), write the results. Households rebalanced as one need the household
optimiser (asset location across accounts), which is not built yet: their alerts are counted
in the metadata and get no proposal rather than a wrong one.
"""

import hashlib
from datetime import date

import polars as pl
from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from rebal_pipeline.core.sql_models import replace_partition
from rebal_pipeline.core.trade_sizing import SizingPolicy, size_trades
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import DriftPolicySource, Warehouse

INPUTS = (
    "drift_alerts", "drift", "holdings", "int_account_targets", "int_model_versions",
    "stg_feed_accounts", "stg_feed_models", "stg_feed_securities", "stg_feed_prices",
    "stg_feed_restrictions", "drift_policy",
)

# Every frame is limited to the accounts with a live account-scope alert today.
ALERTED = "(select scope_id from drift_alerts where as_of = $as_of and scope = 'account' and status = 'alert')"
QUERIES = {
    "holdings": f"""select account_id, symbol, asset_class, quantity::double as quantity, price::double as price,
                          market_value from holdings where as_of = $as_of and account_id in {ALERTED}""",
    "class_targets": f"""select account_id, asset_class, target_weight from int_account_targets
                         where as_of = $as_of and account_id in {ALERTED}""",
    "model_weights": f"""select a.account_id, m.symbol, m.weight::double as weight
                         from stg_feed_accounts a join stg_feed_models m on m.model_id = a.model_id and m.as_of = $as_of
                         where a.as_of = $as_of and a.account_id in {ALERTED}""",
    "securities": """select s.symbol, s.asset_class, s.security_type, s.fractional, p.close::double as price
                     from stg_feed_securities s join stg_feed_prices p on p.symbol = s.symbol and p.as_of = $as_of
                     where s.as_of = $as_of""",
    "restrictions": f"""select account_id, kind, value from stg_feed_restrictions
                        where as_of = $as_of and account_id in {ALERTED}""",
    "bands": f"""select scope_id as account_id, asset_class, band from drift
                 where as_of = $as_of and scope = 'account' and scope_id in {ALERTED}""",
    # The version of what the proposal was built from: the account's model (a hash of its
    # weights) or, for IPS-only accounts, its IPS targets.
    "versions": f"""select a.account_id,
                           coalesce('model:' || a.model_id || '@' || v.model_version, 'ips') as model_version
                    from stg_feed_accounts a
                    left join int_model_versions v on v.model_id = a.model_id and v.as_of = $as_of
                    where a.as_of = $as_of and a.account_id in {ALERTED}""",
}


def propose_trades(con, as_of: date, policy) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Size the day's account-scope alerts and write trade_proposals and trade_recommendations.

    Returns (trades, recommendations, household alerts not sized)."""
    rule = policy.trade_sizing
    frames = {name: con.execute(sql, {"as_of": as_of}).pl() for name, sql in QUERIES.items()}
    households_not_sized = con.execute(
        "select count(*) from drift_alerts where as_of = $as_of and scope = 'household' and status = 'alert'",
        {"as_of": as_of},
    ).fetchone()[0]
    sized = size_trades(
        frames["holdings"], frames["class_targets"], frames["model_weights"], frames["securities"],
        frames["restrictions"], frames["bands"],
        SizingPolicy(
            min_trade_value=float(rule.min_trade_value),
            min_trade_pct=float(rule.min_trade_pct),
            default_cash_buffer=float(rule.default_cash_buffer),
            fractional_decimals=rule.fractional_decimals,
        ),
    )
    # Identity: the same as-of date, account, policy, model version and trades give the
    # same recommendation_id, so re-running a day creates no duplicate recommendation.
    accounts = sized.accounts.join(frames["versions"], on="account_id", how="left").with_columns(
        pl.col("model_version").fill_null("ips"),
        pl.concat_str(
            [pl.lit(as_of.isoformat()), pl.col("account_id"), pl.lit(policy.version_id),
             pl.col("model_version").fill_null("ips"), pl.col("recommendation_id")],
            separator="|",
        )
        .map_elements(_stable_id, return_dtype=pl.String)
        .alias("recommendation_id"),
    )
    ids = accounts.select("account_id", "recommendation_id", "model_version")
    trades = (
        sized.trades.drop("recommendation_id")
        .join(ids, on="account_id", how="left")
        .with_columns(pl.lit(as_of).alias("as_of"))
    )
    accounts = accounts.with_columns(
        pl.lit(as_of).alias("as_of"),
        pl.lit("account").alias("scope"),
        pl.col("account_id").alias("scope_id"),
        pl.lit(policy.version_id).alias("policy_version"),
    )
    replace_partition(con, "trade_proposals", as_of, trades.to_arrow())
    replace_partition(con, "trade_recommendations", as_of, accounts.to_arrow())
    return trades, accounts, households_not_sized


def _stable_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@asset(
    partitions_def=daily_partitions,
    group_name="trades",
    deps=[AssetKey(name) for name in INPUTS],
    kinds={"duckdb", "polars"},
)
def trade_proposals(context: AssetExecutionContext, warehouse: Warehouse, drift_policy_source: DriftPolicySource):
    """Whole-share trades per alerted account (table trade_proposals) and one recommendation per
    account (table trade_recommendations): inside its bands after rounding, or why not."""
    as_of = date.fromisoformat(context.partition_key)
    with warehouse.connect() as con:
        trades, accounts, households_not_sized = propose_trades(con, as_of, drift_policy_source.load())
    outside = accounts.filter(~pl.col("inside_bands"))
    return MaterializeResult(
        metadata={
            "recommendations": accounts.height,
            "trades": trades.height,
            "inside_bands_after_trades": accounts.height - outside.height,
            "could_not_reach_bands": outside.height,
            "compliance_reviews": accounts.filter(pl.col("compliance_review").is_not_null()).height,
            "household_alerts_not_sized": households_not_sized,
            "examples_not_reached": MetadataValue.md(
                "\n".join(f"- {a}: {u}" for a, u in outside.select("account_id", "unresolved").head(5).iter_rows())
                or "none"
            ),
        }
    )


assets = [trade_proposals]
