"""The tax engine's pure core: holding periods, lot relief, tax estimates, tax-loss harvesting.

Plain polars over whole-book frames (no Dagster, no DuckDB, no per-account loop). The wash-sale
matching lives in core/wash_sales.py; the asset that wires both to the warehouse is in
defs/trades/assets.py.

Money is computed in double precision and every dollar amount leaving the core is rounded to
cents; quantities keep the feed's 8 decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import polars as pl

from rebal_pipeline.core.frames import conform
from rebal_pipeline.core.wash_sales import match_wash_sales

LOT_RELIEF_METHODS = ("fifo", "hifo", "tax_min")


@dataclass(frozen=True)
class TaxPolicy:
    # Treas. Reg. §1.1012-1(c)(1): shares not adequately identified are deemed sold first in,
    # first out; an account without a standing instruction is relieved FIFO.
    default_lot_relief_method: str = "fifo"
    # Tax-loss harvesting: a lot in a taxable account down by at least this fraction of its basis,
    # and by at least this many dollars (a $3 harvest is not worth a trade).
    tlh_loss_threshold: float = 0.10
    tlh_min_loss: float = 0.0
    # "Rebalance now or wait for long-term": wait when short-term gain would be realised on lots
    # that turn long-term within this many days, the drift is below severe_drift_multiple × its
    # band, and waiting saves more than wait_min_tax_saved dollars.
    wait_window_days: int = 30
    severe_drift_multiple: float = 2.0
    wait_min_tax_saved: float = 0.0
    fractional_decimals: int = 3


LOTS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "lot_id": pl.String(),
    "lot_part": pl.String(),  # "" or "replacement" (the part of a lot that replaced washed shares)
    "acquired_date": pl.Date(),  # the purchase date (FIFO order)
    "holding_from": pl.Date(),  # the date the holding period counts from (tacked for replacements)
    "quantity": pl.Float64(),
    "cost_basis": pl.Float64(),  # total dollars, wash-sale adjustments included
}
SELLS_SCHEMA: dict[str, pl.DataType] = {
    "recommendation_id": pl.String(),
    "account_id": pl.String(),
    "symbol": pl.String(),
    "quantity": pl.Float64(),
    "est_price": pl.Float64(),
    "lot_relief_method": pl.String(),
}
RATES_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "taxable": pl.Boolean(),
    "federal_ordinary_rate": pl.Float64(),
    "federal_ltcg_rate": pl.Float64(),
    "state_rate": pl.Float64(),
}


# ---------------------------------------------------------------------------------------------
# Holding period
# ---------------------------------------------------------------------------------------------


def long_term_from(holding_from: pl.Expr) -> pl.Expr:
    """The first sale date on which a lot is long-term. IRC §1222(3): long-term = held more than
    one year. Pub. 550 ("Holding Period"): count from the day after acquisition, so shares bought
    on June 19, 2023 and sold on June 19, 2024 are short-term; sold on June 20, 2024, long-term.
    A lot bought on February 29 reaches its one-year mark on February 28 and is long-term from
    March 1."""
    return holding_from.dt.offset_by("1y") + pl.duration(days=1)


def with_terms(lots: pl.DataFrame, sale_date: date) -> pl.DataFrame:
    """Adds long_term_from, term ('short'/'long') and days_to_long_term (0 once long-term) for a
    sale on sale_date."""
    return lots.with_columns(long_term_from(pl.col("holding_from")).alias("long_term_from")).with_columns(
        pl.when(pl.lit(sale_date) >= pl.col("long_term_from")).then(pl.lit("long")).otherwise(pl.lit("short"))
        .alias("term"),
        (pl.col("long_term_from") - pl.lit(sale_date)).dt.total_days().clip(0).alias("days_to_long_term"),
    )


# ---------------------------------------------------------------------------------------------
# Past wash sales → adjusted lots
# ---------------------------------------------------------------------------------------------


def adjust_lots_for_wash_sales(
    lots: pl.DataFrame, matches: pl.DataFrame, custodian_adjusted: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Apply past wash sales to the replacement lots (a lot of the buying account and symbol
    opened on the purchase date). IRC §1091(d): the disallowed loss is added to the basis of the
    replacement shares; IRC §1223(3): their holding period includes that of the shares sold. Only
    the replacing shares change, so a lot that is partly replacement is split into its plain part
    and its 'replacement' part (same lot_id). A loss washed into a tax-advantaged account is gone
    and changes no lot. Lots the custodian reports as already adjusted (`custodian_adjusted`:
    account_id, lot_id) are left as reported.

    lots: account_id, symbol, lot_id, open_date, quantity, cost_basis. Returns LOTS_SCHEMA."""
    base = lots.select(
        "account_id", "symbol", "lot_id",
        pl.lit("").alias("lot_part"),
        pl.col("open_date").cast(pl.Date).alias("acquired_date"),
        pl.col("open_date").cast(pl.Date).alias("holding_from"),
        pl.col("quantity").cast(pl.Float64),
        pl.col("cost_basis").cast(pl.Float64),
    )
    deferred = matches.filter(~pl.col("loss_lost_permanently"))
    if deferred.height == 0:
        return base
    # Spread each purchase's replaced shares over the lots it opened (lot_id order).
    candidates = base.join(
        deferred.select(
            pl.col("purchase_account_id").alias("account_id"), pl.col("purchase_symbol").alias("symbol"),
            pl.col("purchase_date").alias("acquired_date"), "purchase_id", "replaced_quantity",
            "disallowed_loss", "tacked_holding_days",
        ),
        on=["account_id", "symbol", "acquired_date"],
    )
    if custodian_adjusted is not None and custodian_adjusted.height:
        candidates = candidates.join(custodian_adjusted.select("account_id", "lot_id"), on=["account_id", "lot_id"],
                                     how="anti")
    per_lot = (
        candidates.sort("account_id", "symbol", "acquired_date", "purchase_id", "lot_id")
        .with_columns(
            (pl.col("quantity").cum_sum().over("purchase_id") - pl.col("quantity")).alias("before")
        )
        .with_columns(
            pl.min_horizontal(pl.col("quantity"), (pl.col("replaced_quantity") - pl.col("before")).clip(0))
            .alias("replacing")
        )
        .filter(pl.col("replacing") > 0)
        .with_columns(
            (pl.col("disallowed_loss") * pl.col("replacing") / pl.col("replaced_quantity")).alias("basis_added"),
            (pl.col("acquired_date") - pl.duration(days=pl.col("tacked_holding_days").fill_null(0)))
            .alias("tacked_from"),
        )
        .group_by("account_id", "lot_id")
        .agg(
            pl.col("replacing").sum(),
            pl.col("basis_added").sum(),
            # Several washed sales into one lot: the shortest tacked period (conservative: never
            # calls a gain long-term too early).
            pl.col("tacked_from").max(),
        )
    )
    if per_lot.height == 0:
        return base
    touched = base.join(per_lot, on=["account_id", "lot_id"])
    replacing = pl.min_horizontal("replacing", "quantity")
    replacement_part = touched.select(
        "account_id", "symbol", "lot_id", pl.lit("replacement").alias("lot_part"), "acquired_date",
        pl.col("tacked_from").alias("holding_from"),
        replacing.alias("quantity"),
        (pl.col("cost_basis") * replacing / pl.col("quantity") + pl.col("basis_added")).alias("cost_basis"),
    )
    plain_part = touched.select(
        "account_id", "symbol", "lot_id", "lot_part", "acquired_date", "holding_from",
        (pl.col("quantity") - replacing).alias("quantity"),
        (pl.col("cost_basis") * (pl.col("quantity") - replacing) / pl.col("quantity")).alias("cost_basis"),
    ).filter(pl.col("quantity") > 1e-9)
    return pl.concat([
        base.join(per_lot.select("account_id", "lot_id"), on=["account_id", "lot_id"], how="anti"),
        replacement_part,
        plain_part,
    ]).sort("account_id", "symbol", "acquired_date", "lot_id", "lot_part")


# ---------------------------------------------------------------------------------------------
# Lot relief
# ---------------------------------------------------------------------------------------------


def relieve_lots(sells: pl.DataFrame, lots: pl.DataFrame, sale_date: date) -> pl.DataFrame:
    """Which lots each proposed sell relieves, by the account's method:
    - fifo: first acquired first (Treas. Reg. §1.1012-1(c)(1), the default);
    - hifo: highest cost per share first;
    - tax_min (specific identification, §1.1012-1(c)(2)): losses first (largest loss per share
      first), then long-term gains, then short-term gains last, highest cost per share first
      within each.
    Ties: earlier acquisition, then lot_id. Returns one row per relieved lot (part) with quantity,
    proceeds, cost_basis, gain, term, long_term_from, days_to_long_term."""
    sells = conform(sells, SELLS_SCHEMA, "sells").filter(pl.col("quantity") > 0)
    lots = conform(lots, LOTS_SCHEMA, "lots")
    unknown = sells.filter(~pl.col("lot_relief_method").is_in(LOT_RELIEF_METHODS))
    if unknown.height:
        raise ValueError(f"unknown lot relief method(s): {sorted(set(unknown['lot_relief_method']))}")
    per_share_basis = pl.col("cost_basis") / pl.col("quantity_lot")
    gain_per_share = pl.col("est_price") - per_share_basis
    category = (
        pl.when(pl.col("lot_relief_method") != "tax_min").then(0)
        .when(gain_per_share < 0).then(0)
        .when(pl.col("term") == "long").then(1)
        .otherwise(2)
    )
    ordered = (
        with_terms(lots, sale_date)
        .rename({"quantity": "quantity_lot"})
        .join(sells, on=["account_id", "symbol"])
        .with_columns(
            category.alias("_category"),
            pl.when(pl.col("lot_relief_method") == "fifo").then(0.0).otherwise(-per_share_basis).alias("_basis_key"),
        )
        .sort("recommendation_id", "account_id", "symbol", "_category", "_basis_key", "acquired_date", "lot_id",
              "lot_part")
        .with_columns(
            (pl.col("quantity_lot").cum_sum().over("recommendation_id", "account_id", "symbol")
             - pl.col("quantity_lot")).alias("_before")
        )
        .with_columns(
            pl.min_horizontal(pl.col("quantity_lot"), (pl.col("quantity") - pl.col("_before")).clip(0))
            .alias("relieved")
        )
        .filter(pl.col("relieved") > 1e-9)
    )
    return ordered.select(
        "recommendation_id", "account_id", "symbol", "lot_id", "lot_part", "lot_relief_method",
        "acquired_date", "holding_from",
        pl.col("relieved").round(8).alias("quantity"),
        (pl.col("relieved") * pl.col("est_price")).round(2).alias("proceeds"),
        (pl.col("cost_basis") * pl.col("relieved") / pl.col("quantity_lot")).round(2).alias("cost_basis"),
        "term", "long_term_from", "days_to_long_term",
    ).with_columns((pl.col("proceeds") - pl.col("cost_basis")).round(2).alias("gain"))


# ---------------------------------------------------------------------------------------------
# Tax estimates
# ---------------------------------------------------------------------------------------------


def _rate(term: pl.Expr) -> pl.Expr:
    # Short-term gain is taxed as ordinary income, long-term at the LTCG rate (IRC §1(h));
    # the state taxes both at its rate.
    return (
        pl.when(term == "long").then(pl.col("federal_ltcg_rate")).otherwise(pl.col("federal_ordinary_rate"))
        + pl.col("state_rate")
    )


def estimate_lot_tax(relieved: pl.DataFrame, rates: pl.DataFrame, disallowed: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per relieved lot: est_tax = (gain + disallowed loss) × the rate of its term, in taxable
    accounts (negative = tax saved by a deductible loss); 0 in tax-advantaged accounts, where a
    sale realises nothing. `disallowed` (account_id, lot_id, lot_part, recommendation_id,
    wash_sale_disallowed) is the part of a loss a wash sale disallows."""
    rates = conform(rates, RATES_SCHEMA, "rates")
    out = relieved.join(rates, on="account_id", how="left")
    if disallowed is not None and disallowed.height:
        out = out.join(disallowed, on=["recommendation_id", "account_id", "lot_id", "lot_part"], how="left")
    else:
        out = out.with_columns(pl.lit(0.0).alias("wash_sale_disallowed"))
    return out.with_columns(
        pl.col("wash_sale_disallowed").fill_null(0.0),
        pl.col("taxable").fill_null(False),
    ).with_columns(
        pl.when(pl.col("taxable"))
        .then(((pl.col("gain") + pl.col("wash_sale_disallowed")) * _rate(pl.col("term"))).round(2))
        .otherwise(0.0)
        .alias("est_tax"),
        # What the same lot would cost once long-term (for "wait for long-term").
        pl.when(pl.col("taxable") & (pl.col("term") == "short") & (pl.col("gain") > 0))
        .then((pl.col("gain") * (pl.col("federal_ordinary_rate") - pl.col("federal_ltcg_rate"))).round(2))
        .otherwise(0.0)
        .alias("tax_saved_if_long_term"),
    )


def net_capital_gains(per_lot: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: st_gain, lt_gain (gains, ≥ 0), realized_loss (deductible losses, ≥ 0, after wash
    sales), wash_sale_disallowed, and est_tax with the netting of IRC §1222: short-term losses
    first offset short-term gains and long-term losses long-term gains; a net loss of one term
    then offsets the net gain of the other; what is left is taxed at its term's rate (a net loss
    overall is a saving at that rate). Only taxable accounts count."""
    taxable = pl.col("taxable")
    deductible = pl.when(taxable).then(pl.col("gain") + pl.col("wash_sale_disallowed")).otherwise(0.0)
    sums = per_lot.group_by(by).agg(
        deductible.filter((pl.col("term") == "short") & (deductible > 0)).sum().alias("st_gain"),
        deductible.filter((pl.col("term") == "long") & (deductible > 0)).sum().alias("lt_gain"),
        (-deductible.filter((pl.col("term") == "short") & (deductible < 0)).sum()).alias("st_loss"),
        (-deductible.filter((pl.col("term") == "long") & (deductible < 0)).sum()).alias("lt_loss"),
        pl.col("wash_sale_disallowed").sum(),
        (pl.col("federal_ordinary_rate").filter(taxable).first() + pl.col("state_rate").filter(taxable).first())
        .alias("st_rate"),
        (pl.col("federal_ltcg_rate").filter(taxable).first() + pl.col("state_rate").filter(taxable).first())
        .alias("lt_rate"),
    )
    net_st = pl.col("st_gain") - pl.col("st_loss")
    net_lt = pl.col("lt_gain") - pl.col("lt_loss")
    return sums.with_columns(
        net_st.alias("net_st"), net_lt.alias("net_lt")
    ).with_columns(
        # §1222 netting across terms: a net loss of one term reduces the other's net gain; what
        # is left keeps the character of the larger side (a net gain of that term, or a net loss
        # of the term whose loss was larger).
        pl.when((pl.col("net_st") < 0) & (pl.col("net_lt") > 0) & (pl.col("net_st") + pl.col("net_lt") >= 0))
        .then(pl.struct(st=pl.lit(0.0), lt=pl.col("net_lt") + pl.col("net_st")))
        .when((pl.col("net_st") < 0) & (pl.col("net_lt") > 0))
        .then(pl.struct(st=pl.col("net_st") + pl.col("net_lt"), lt=pl.lit(0.0)))
        .when((pl.col("net_lt") < 0) & (pl.col("net_st") > 0) & (pl.col("net_st") + pl.col("net_lt") >= 0))
        .then(pl.struct(st=pl.col("net_st") + pl.col("net_lt"), lt=pl.lit(0.0)))
        .when((pl.col("net_lt") < 0) & (pl.col("net_st") > 0))
        .then(pl.struct(st=pl.lit(0.0), lt=pl.col("net_st") + pl.col("net_lt")))
        .otherwise(pl.struct(st=pl.col("net_st"), lt=pl.col("net_lt")))
        .alias("_netted")
    ).with_columns(
        (pl.col("_netted").struct.field("st") * pl.col("st_rate").fill_null(0)
         + pl.col("_netted").struct.field("lt") * pl.col("lt_rate").fill_null(0)).round(2).alias("est_tax"),
        (pl.col("st_loss") + pl.col("lt_loss")).alias("realized_loss"),
    ).select(
        *by,
        pl.col("st_gain").round(2), pl.col("lt_gain").round(2), pl.col("realized_loss").round(2),
        pl.col("wash_sale_disallowed").round(2), "est_tax",
    )


# ---------------------------------------------------------------------------------------------
# Rebalance now or wait for long-term
# ---------------------------------------------------------------------------------------------


def wait_for_long_term(per_lot: pl.DataFrame, severity: pl.DataFrame, policy: TaxPolicy) -> pl.DataFrame:
    """Per recommendation: wait_for_long_term, wait_until, tax_saved_by_waiting, wait_reason.

    Waiting is advised when the sells realise short-term gain on lots that turn long-term within
    policy.wait_window_days (inclusive), the drift is not severe (max |drift| / band below
    policy.severe_drift_multiple) and waiting saves more than policy.wait_min_tax_saved (the
    ordinary − LTCG rate difference on those gains, prices unchanged). The advisor still sees the
    trades; when the drift is severe the reason says what rebalancing now costs.

    severity: recommendation_id, drift_to_band (max |drift| / band of the recommendation's scope)."""
    soon = (pl.col("term") == "short") & (pl.col("gain") > 0) & pl.col("taxable") & (
        pl.col("days_to_long_term").is_between(1, policy.wait_window_days)
    )
    candidates = (
        per_lot.filter(soon)
        .group_by("recommendation_id")
        .agg(
            pl.col("tax_saved_if_long_term").sum().round(2).alias("tax_saved_by_waiting"),
            pl.col("long_term_from").max().alias("wait_until"),
            pl.col("days_to_long_term").max().alias("days_to_wait"),
            pl.format("{} {} sh (lot {})", pl.col("symbol"), pl.col("quantity").round(3), pl.col("lot_id"))
            .sort().str.join(", ").alias("lots_text"),
        )
        .join(severity, on="recommendation_id", how="left")
    )
    severe = pl.col("drift_to_band").fill_null(float("inf")) >= policy.severe_drift_multiple
    worth = pl.col("tax_saved_by_waiting") > policy.wait_min_tax_saved
    return candidates.with_columns(
        (~severe & worth).alias("wait_for_long_term"),
        pl.when(~worth)
        .then(pl.lit(None, pl.String))
        .when(severe)
        .then(pl.format(
            "drift is {}× its band (severe at {}×): rebalance now, although waiting {} days (to {}) would save "
            "about ${} of tax on short-term gains ({})",
            pl.col("drift_to_band").round(2), pl.lit(policy.severe_drift_multiple), pl.col("days_to_wait"),
            pl.col("wait_until"), pl.col("tax_saved_by_waiting"), pl.col("lots_text"),
        ))
        .otherwise(pl.format(
            "wait until {} ({} days): the short-term gains on {} turn long-term and about ${} of tax is saved; "
            "drift is {}× its band (severe at {}×)",
            pl.col("wait_until"), pl.col("days_to_wait"), pl.col("lots_text"), pl.col("tax_saved_by_waiting"),
            pl.col("drift_to_band").round(2), pl.lit(policy.severe_drift_multiple),
        ))
        .alias("wait_reason"),
    ).select("recommendation_id", "wait_for_long_term", "wait_until", "tax_saved_by_waiting", "wait_reason")


# ---------------------------------------------------------------------------------------------
# Tax-loss harvesting
# ---------------------------------------------------------------------------------------------


def harvest_candidates(lots: pl.DataFrame, prices: pl.DataFrame, policy: TaxPolicy) -> pl.DataFrame:
    """Lots of taxable accounts down at least policy.tlh_loss_threshold of their basis and at least
    policy.tlh_min_loss dollars: account_id, symbol, lot_id, lot_part, quantity, market_value,
    cost_basis, unrealized_loss (≥ 0), loss_pct, term. `lots` carries a `taxable` column;
    `prices` symbol, price."""
    valued = lots.filter(pl.col("taxable") & (pl.col("cost_basis") > 0)).join(prices, on="symbol").with_columns(
        (pl.col("quantity") * pl.col("price")).round(2).alias("market_value"),
    ).with_columns(
        (pl.col("cost_basis") - pl.col("market_value")).round(2).alias("unrealized_loss"),
    ).with_columns(
        (pl.col("unrealized_loss") / pl.col("cost_basis")).alias("loss_pct"),
    )
    # The threshold is inclusive: a lot down exactly 10% is a candidate (1e-12 absorbs the
    # floating-point representation of, e.g., 90/100).
    return valued.filter(
        (pl.col("loss_pct") >= policy.tlh_loss_threshold - 1e-12)
        & (pl.col("unrealized_loss") >= policy.tlh_min_loss)
        & (pl.col("unrealized_loss") > 0)
    )


def recent_wash_window(as_of: date) -> tuple[date, date]:
    """The dates whose purchases would wash a loss taken on as_of (IRC §1091: 30 days before
    and after)."""
    return as_of - timedelta(days=30), as_of + timedelta(days=30)


__all__ = [
    "TaxPolicy", "long_term_from", "with_terms", "adjust_lots_for_wash_sales", "relieve_lots",
    "estimate_lot_tax", "net_capital_gains", "wait_for_long_term", "harvest_candidates",
    "match_wash_sales", "recent_wash_window",
]
