"""The tax engine's pure core: holding periods, lot relief, tax estimates, tax-loss harvesting.

Plain polars over whole-book frames (no Dagster, no DuckDB, no per-account loop). The wash-sale
matching lives in core/wash_sales.py; the orchestration that wires both to the warehouse is
core/proposals.py (its asset: defs/trades/assets.py).

Money is computed in double precision and every dollar amount leaving the core is rounded to
cents; quantities keep the feed's 8 decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import polars as pl

from rebal_pipeline.core.frames import conform
from rebal_pipeline.core.policy import TLH_LOSS_TOLERANCE
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
    # One rule with the drift alerts' TLH flag (int_tlh_flags.sql): see core.policy.TLH_LOSS_TOLERANCE.
    tlh_loss_tolerance: float = TLH_LOSS_TOLERANCE
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
    lots: pl.DataFrame, matches: pl.DataFrame | None = None, custodian_adjusted: pl.DataFrame | None = None,
    *, ledger: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Apply past wash sales to the replacement lots. IRC §1091(d): the disallowed loss is added to
    the basis of the replacement shares; IRC §1223(3): their holding period includes that of the
    shares sold. Only the replacing shares change: a lot that is partly replacement is split into
    its plain part ("") and one part per wash sale it replaced (`replacement`, `replacement-002`,
    ... same lot_id, each with its own basis and tacked holding period: one purchase of 200 that
    replaced two 100-share loss sales is two parts of 100). A loss washed into a tax-advantaged
    account is gone and changes no lot (Rev. Rul. 2008-5). Lots the custodian reports as already
    adjusted are left as reported (the custodian's figure wins; core.basis_ledger.reconcile says
    where it differs).

    `ledger` (core.basis_ledger.LEDGER_SCHEMA, what the tax engine passes): the parts with
    applied_to_lot are applied as they are. Without it, `matches` (core.wash_sales.MATCHES_SCHEMA)
    are turned into parts here, each purchase linked to the lot(s) of its account, symbol and
    day (core.basis_ledger.link_purchases_to_lots) and no share sold since; `custodian_adjusted`
    (account_id, lot_id) names the lots the custodian adjusted.

    lots: account_id, symbol, lot_id, open_date, quantity, cost_basis. Returns LOTS_SCHEMA."""
    base = lots.select(
        "account_id", "symbol", "lot_id",
        pl.lit("").alias("lot_part"),
        pl.col("open_date").cast(pl.Date).alias("acquired_date"),
        pl.col("open_date").cast(pl.Date).alias("holding_from"),
        pl.col("quantity").cast(pl.Float64),
        pl.col("cost_basis").cast(pl.Float64),
    )
    if ledger is None:
        ledger = _ledger_from_matches(lots, matches, custodian_adjusted)
    applied = ledger.filter(pl.col("applied_to_lot")).select(
        "account_id", "lot_id", pl.col("lot_part").alias("_part"), "held_quantity", "basis_added_held",
        pl.col("holding_from").alias("_tacked_from"),
    )
    if applied.height == 0:
        return base
    touched = base.join(applied, on=["account_id", "lot_id"])
    replacement_parts = touched.select(
        "account_id", "symbol", "lot_id", pl.col("_part").alias("lot_part"), "acquired_date",
        pl.col("_tacked_from").alias("holding_from"),
        pl.col("held_quantity").alias("quantity"),
        (pl.col("cost_basis") * pl.col("held_quantity") / pl.col("quantity") + pl.col("basis_added_held"))
        .alias("cost_basis"),
    )
    held = applied.group_by("account_id", "lot_id").agg(pl.col("held_quantity").sum().alias("_held"))
    plain_part = base.join(held, on=["account_id", "lot_id"]).select(
        "account_id", "symbol", "lot_id", "lot_part", "acquired_date", "holding_from",
        (pl.col("quantity") - pl.col("_held")).round(8).alias("quantity"),
        (pl.col("cost_basis") * (pl.col("quantity") - pl.col("_held")) / pl.col("quantity")).alias("cost_basis"),
    ).filter(pl.col("quantity") > 1e-9)
    return pl.concat([
        base.join(held, on=["account_id", "lot_id"], how="anti"),
        replacement_parts,
        plain_part,
    ]).sort("account_id", "symbol", "acquired_date", "lot_id", "lot_part")


def _ledger_from_matches(lots: pl.DataFrame, matches: pl.DataFrame | None,
                         custodian_adjusted: pl.DataFrame | None) -> pl.DataFrame:
    """Parts for adjust_lots_for_wash_sales called with bare matches: each purchase as large as
    the shares matched to it, nothing sold since."""
    from rebal_pipeline.core.basis_ledger import empty_ledger, link_purchases_to_lots, parts_from_matches, settle

    if matches is None or matches.height == 0:
        return empty_ledger()
    purchases = matches.group_by("purchase_id").agg(
        pl.col("purchase_account_id").first().alias("account_id"), pl.col("purchase_symbol").first().alias("symbol"),
        pl.col("purchase_date").first().alias("trade_date"),
        (pl.col("purchase_offset") + pl.col("replaced_quantity")).max().alias("quantity"),
    )
    flagged = lots.select("account_id", "lot_id", "quantity", pl.lit(False).alias("wash_sale_adjusted"))
    if custodian_adjusted is not None and custodian_adjusted.height:
        flagged = flagged.join(custodian_adjusted.select("account_id", "lot_id", pl.lit(True).alias("_c")),
                               on=["account_id", "lot_id"], how="left").with_columns(
            pl.col("_c").fill_null(False).alias("wash_sale_adjusted")).drop("_c")
    no_sales = pl.DataFrame(schema={"sale_id": pl.String, "account_id": pl.String, "symbol": pl.String,
                                    "sale_date": pl.Date})
    parts = parts_from_matches(matches, link_purchases_to_lots(purchases, lots), no_sales)
    return settle(parts, flagged, date(1970, 1, 1))


# ---------------------------------------------------------------------------------------------
# Lot relief
# ---------------------------------------------------------------------------------------------


def relieve_lots(sells: pl.DataFrame, lots: pl.DataFrame, sale_date: date,
                 rates: pl.DataFrame | None = None) -> pl.DataFrame:
    """Which lots each proposed sell relieves, by the account's method:
    - fifo: first acquired first (Treas. Reg. §1.1012-1(c)(1), the default);
    - hifo: highest cost per share first;
    - tax_min (specific identification, §1.1012-1(c)(2)): ascending estimated tax per share at
      the household's rates (`rates`, RATES_SCHEMA): (price − basis per share) × (federal
      ordinary + state rate) for a short-term lot, × (federal LTCG + state rate) for a long-term
      one (IRC §1(h), §1222). So the losses saving the most tax per share go first, then the
      cheapest gains whatever their term: a short-term lot costing $1.85/share of tax is sold
      before a long-term lot costing $10/share.
    Ties: earlier acquisition, then lot_id. Returns one row per relieved lot (part) with quantity,
    proceeds, cost_basis, gain, term, long_term_from, days_to_long_term.

    Why tax_min is optimal for one sale (an exchange argument). Assume the rates are flat for this
    sale (no bracket effects: the marginal rate of the next dollar is the rate of the last) and
    that a loss is worth the rate of its term, i.e. of the gains it offsets (§1222 netting within
    the term; the $3,000 ordinary-income limit of §1211(b) and cross-term netting are ignored for
    the ordering — the figures reported later apply them). Then selling q shares costs
    Σ t_i·x_i, the sum over shares of each share's tax t_i, with Σ x_i = q and 0 ≤ x_i ≤ held_i.
    Take any relief that sells some of lot j while leaving some of a lot i with t_i < t_j unsold:
    moving ε shares from j to i keeps the quantity and changes the tax by ε·(t_i − t_j) < 0, so
    it was not minimal. The only relief with no such pair fills lots in ascending t — this
    order (ties cost the same either way). It is a fractional-knapsack greedy, exact because the
    tax is linear in the shares sold.

    A tax_min sell whose account has no rates row (or null rates) is ordered by gain per share,
    the order any single flat rate gives; in a tax-advantaged account (taxable false) every share
    costs 0 and the lots go first in, first out. Vectorised: one sort key per (sell, lot)."""
    sells = conform(sells, SELLS_SCHEMA, "sells").filter(pl.col("quantity") > 0)
    lots = conform(lots, LOTS_SCHEMA, "lots")
    unknown = sells.filter(~pl.col("lot_relief_method").is_in(LOT_RELIEF_METHODS))
    if unknown.height:
        raise ValueError(f"unknown lot relief method(s): {sorted(set(unknown['lot_relief_method']))}")
    if rates is None:
        rates = pl.DataFrame(schema=RATES_SCHEMA)
    rates = conform(rates, RATES_SCHEMA, "rates").unique("account_id", keep="first").rename(
        {c: f"_{c}" for c in RATES_SCHEMA if c != "account_id"})
    per_share_basis = pl.col("cost_basis") / pl.col("quantity_lot")
    gain_per_share = pl.col("est_price") - per_share_basis
    term_rate = (
        pl.when(pl.col("term") == "long").then(pl.col("_federal_ltcg_rate")).otherwise(pl.col("_federal_ordinary_rate"))
        + pl.col("_state_rate")
    )
    tax_per_share = (
        pl.when(pl.col("_taxable").not_()).then(0.0)  # null (no rates row) falls through
        .when(term_rate.is_not_null()).then(gain_per_share * term_rate)
        .otherwise(gain_per_share)
    )
    sort_key = (
        pl.when(pl.col("lot_relief_method") == "fifo").then(0.0)
        .when(pl.col("lot_relief_method") == "hifo").then(-per_share_basis)
        .otherwise(tax_per_share)
    )
    ordered = (
        with_terms(lots, sale_date)
        .rename({"quantity": "quantity_lot"})
        .join(sells, on=["account_id", "symbol"])
        .join(rates, on="account_id", how="left")
        .with_columns(sort_key.alias("_key"))
        .sort("recommendation_id", "account_id", "symbol", "_key", "acquired_date", "lot_id", "lot_part")
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


# IRC §1211(b): a net capital loss offsets at most $3,000 of ordinary income a year ($1,500 for a
# married individual filing separately); §1212(b): the rest carries forward to later years,
# keeping its character. The feed carries no filing status, so every household gets $3,000 unless
# the frame passed in has a `capital_loss_limit` column (e.g. 1500 for married filing separately).
CAPITAL_LOSS_LIMIT = 3000.0
CAPITAL_LOSS_LIMIT_MFS = 1500.0


def net_capital_gains(per_lot: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: st_gain, lt_gain (gains, ≥ 0), realized_loss (deductible losses, ≥ 0, after wash
    sales), wash_sale_disallowed, and est_tax with the netting of IRC §1222: short-term losses
    first offset short-term gains and long-term losses long-term gains; a net loss of one term
    then offsets the net gain of the other; what is left is taxed at its term's rate (a net loss
    overall is a saving at that rate, as if it offset other gains of its term). Only taxable
    accounts count.

    And the figures for this year's return: est_tax_this_year and loss_carryforward. A net gain
    is taxed as in est_tax. A net capital loss offsets ordinary income only up to the limit of
    IRC §1211(b) ($3,000; $1,500 married filing separately: a `capital_loss_limit` column, one
    value per group, overrides CAPITAL_LOSS_LIMIT), saving that amount × (federal ordinary +
    state rate) this year — the state assumed to follow the federal limit — and the rest is
    loss_carryforward (IRC §1212(b)), shown, not counted as this year's saving. The group is taken
    as the whole year's realised gains (other sales of the year are not known to rebal)."""
    taxable = pl.col("taxable")
    deductible = pl.when(taxable).then(pl.col("gain") + pl.col("wash_sale_disallowed")).otherwise(0.0)
    limit = (pl.col("capital_loss_limit").drop_nulls().min() if "capital_loss_limit" in per_lot.columns
             else pl.lit(None, pl.Float64))
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
        limit.alias("_limit"),
    )
    net_st = pl.col("st_gain") - pl.col("st_loss")
    net_lt = pl.col("lt_gain") - pl.col("lt_loss")
    st_left = pl.col("_netted").struct.field("st")
    lt_left = pl.col("_netted").struct.field("lt")
    # After netting no term is left with a gain while the other has a loss, so the net capital
    # loss (if any) is −(st + lt) with both ≤ 0.
    net_loss = (-(st_left + lt_left)).clip(lower_bound=0.0)
    deducted = pl.min_horizontal(net_loss, pl.col("_limit").fill_null(CAPITAL_LOSS_LIMIT))
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
        (st_left * pl.col("st_rate").fill_null(0) + lt_left * pl.col("lt_rate").fill_null(0)).round(2).alias("est_tax"),
        pl.when(net_loss > 0)
        .then(-deducted * pl.col("st_rate").fill_null(0))
        .otherwise(st_left * pl.col("st_rate").fill_null(0) + lt_left * pl.col("lt_rate").fill_null(0))
        .round(2).alias("est_tax_this_year"),
        (net_loss - deducted).round(2).alias("loss_carryforward"),
        (pl.col("st_loss") + pl.col("lt_loss")).alias("realized_loss"),
    ).select(
        *by,
        pl.col("st_gain").round(2), pl.col("lt_gain").round(2), pl.col("realized_loss").round(2),
        pl.col("wash_sale_disallowed").round(2), "est_tax", "est_tax_this_year", "loss_carryforward",
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
    """Lots (parts) of taxable accounts down at least policy.tlh_loss_threshold of their basis and
    at least policy.tlh_min_loss dollars: account_id, symbol, lot_id, lot_part, quantity,
    market_value, cost_basis, unrealized_loss (≥ 0), loss_pct, term. `lots` carries a `taxable`
    column and is wash-adjusted (tax_lots, the basis ledger applied); `prices` symbol, price.

    The same rule as the drift alerts' TLH flag (dbt_like_sql/intermediate/int_tlh_flags.sql, on
    the same wash-adjusted parts): loss = basis − quantity × price, unrounded; candidate when
    loss / basis ≥ threshold − policy.tlh_loss_tolerance (inclusive: a lot down exactly 10% is one,
    though it computes as 0.09999999999999985), loss ≥ tlh_min_loss and loss > 0."""
    valued = lots.filter(pl.col("taxable") & (pl.col("cost_basis") > 0)).join(prices, on="symbol").with_columns(
        (pl.col("cost_basis") - pl.col("quantity") * pl.col("price")).alias("_loss"),
    ).with_columns(
        (pl.col("_loss") / pl.col("cost_basis")).alias("loss_pct"),
    )
    return valued.filter(
        (pl.col("loss_pct") >= policy.tlh_loss_threshold - policy.tlh_loss_tolerance)
        & (pl.col("_loss") >= policy.tlh_min_loss)
        & (pl.col("_loss") > 0)
    ).with_columns(
        (pl.col("quantity") * pl.col("price")).round(2).alias("market_value"),
        pl.col("_loss").round(2).alias("unrealized_loss"),
    ).drop("_loss")


def recent_wash_window(as_of: date) -> tuple[date, date]:
    """The dates whose purchases would wash a loss taken on as_of (IRC §1091: 30 days before
    and after)."""
    return as_of - timedelta(days=30), as_of + timedelta(days=30)


__all__ = [
    "TaxPolicy", "long_term_from", "with_terms", "adjust_lots_for_wash_sales", "relieve_lots",
    "estimate_lot_tax", "net_capital_gains", "wait_for_long_term", "harvest_candidates",
    "CAPITAL_LOSS_LIMIT", "CAPITAL_LOSS_LIMIT_MFS",
    "match_wash_sales", "recent_wash_window",
]
