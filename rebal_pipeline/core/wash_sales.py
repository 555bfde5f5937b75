"""Wash sales (IRC §1091; IRS Publication 550, "Wash Sales"): pure polars, no Dagster.

A loss from selling stock or securities is not deductible when, within 30 calendar days before
or after the sale, substantially identical securities are bought — in any account of the
taxpayer's household, IRAs and Roth IRAs included (Rev. Rul. 2008-5). "Substantially identical"
is the feed's `wash_group`: securities of one group are treated as one.

What happens to the disallowed loss depends on where the replacement was bought:
- in a taxable account it is added to the replacement shares' basis (IRC §1091(d)) and the
  holding period of the shares sold tacks on to theirs (IRC §1223(3)): deferred, not lost;
- in an IRA, Roth IRA, 401(k), 529 or ERISA plan account there is no basis to carry it: the
  loss is lost for good (Rev. Rul. 2008-5 for IRAs; the same reasoning applies to every
  tax-advantaged account, whose basis never enters the client's return).
A sale *inside* a tax-advantaged account realises no loss at all (IRC §408(e): the account is
exempt), so it is never a loss sale here; callers pass taxable sales only.

Matching, share by share (Treas. Reg. §1.1091-1(b)-(c)). Loss sales are taken in the order they
were made, and each loss share is paired with one replacement share, the replacement shares
first acquired first; a share replaces at most one sold share. A match (sale, purchase, shares)
is a run of consecutive pairs: it says which shares of the sale (`sale_offset`) replaced which
shares of the purchase (`purchase_offset`), and carries its own disallowed loss (the loss per
share sold × its shares, Pub. 550: 75 of 100 shares → 75% of the loss) and the holding period
to tack on. Only the purchase(s) that created the very shares sold are not their replacement,
and neither are the other shares of that same purchase (Rev. Rul. 56-602): a purchase is named
by its identity (`acquired_purchase_ids`), not by its date, so a sell and a rebuy on one day in
one account is a wash. A sale whose acquisition date is unknown cannot be decided and is never
matched (the caller reports it not checkable).

Invariants (tested with hypothesis, rebal_pipeline_tests/tax/test_wash_sale_cases.py):
- the output is the same whatever the order of the input rows (every sort is on a unique key);
- per sale, replaced shares ≤ shares sold and the disallowed cents sum to the loss × replaced /
  sold, rounded once; per purchase, replaced shares ≤ shares bought.

Vectorised: every (loss sale, purchase) pair of a household's wash group within the window is
found by one join; the greedy first-acquired-first matching then runs as one polars step per
*rank* of loss sale within its group (the first loss sale of every group in the book at once,
then the second, ...), so the Python loop runs a handful of times, never once per account.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from rebal_pipeline.core.frames import conform

# IRC §1091(a): "within a period beginning 30 days before the date of such sale ... and ending
# 30 days after such date" — 61 calendar days including the sale date.
WASH_WINDOW_DAYS = 30

# Accounts whose basis never reaches the client's return: a loss washed into them is lost, and
# a sale inside them realises no loss (IRC §408(e)).
TAX_ADVANTAGED = ("traditional_ira", "roth_ira", "401k", "529", "erisa")

LOSS_SALES_SCHEMA: dict[str, pl.DataType] = {
    "sale_id": pl.String(),
    "household_id": pl.String(),
    "wash_group": pl.String(),
    "account_id": pl.String(),
    "symbol": pl.String(),
    "sale_date": pl.Date(),
    "quantity": pl.Float64(),  # shares sold at a loss
    "loss": pl.Float64(),  # the loss on those shares, a positive number of dollars
    "acquired_date": pl.Date(),  # when the shares sold were bought (null: unknown → not checkable)
    "holding_days": pl.Int64(),  # days the shares sold were held (for tacking; null: unknown)
}
# Optional on loss sales: acquired_purchase_ids (list of purchase_id) — the purchase(s) that
# created the shares sold. Absent or null: the purchases of the same account and symbol on the
# acquisition date are taken to be them (all that can be said without an identity).
ACQUIRED_PURCHASE_IDS = "acquired_purchase_ids"

PURCHASES_SCHEMA: dict[str, pl.DataType] = {
    "purchase_id": pl.String(),
    "household_id": pl.String(),
    "wash_group": pl.String(),
    "account_id": pl.String(),
    "account_type": pl.String(),
    "symbol": pl.String(),
    "trade_date": pl.Date(),
    "quantity": pl.Float64(),
}
MATCHES_SCHEMA: dict[str, pl.DataType] = {
    "sale_id": pl.String(),
    "purchase_id": pl.String(),
    "replaced_quantity": pl.Float64(),
    "disallowed_loss": pl.Float64(),
    "loss_lost_permanently": pl.Boolean(),
    "purchase_account_id": pl.String(),
    "purchase_symbol": pl.String(),
    "purchase_date": pl.Date(),
    "tacked_holding_days": pl.Int64(),
    "sale_offset": pl.Float64(),  # shares of the sale matched before this match
    "purchase_offset": pl.Float64(),  # shares of the purchase matched before this match
}
# Optional: shares of purchases already taken by matches made on earlier days and kept in the
# basis ledger (purchase_id, quantity): they cannot replace a second time.
ALREADY_REPLACED_SCHEMA: dict[str, pl.DataType] = {"purchase_id": pl.String(), "quantity": pl.Float64()}

# Quantities are compared in whole units of 1e-8 share (the feed's precision), so the greedy
# fill never leaves a 1e-17 share "unmatched" from floating-point noise.
_UNITS = 100_000_000


def _units(column: str) -> pl.Expr:
    return (pl.col(column) * _UNITS).round(0).cast(pl.Int64)


def match_wash_sales(loss_sales: pl.DataFrame, purchases: pl.DataFrame,
                     already_replaced: pl.DataFrame | None = None) -> pl.DataFrame:
    """Match loss sales to their replacement purchases, share by share (see the module
    docstring). One row per (sale, purchase) pair that replaced at least one share: how many
    shares and which (offsets), how much loss that disallows, whether it is lost for good
    (replacement in a tax-advantaged account) and the holding days to tack on to the
    replacement shares. Returns MATCHES_SCHEMA, sorted by sale_id, purchase_date, purchase_id."""
    sales = conform(loss_sales, LOSS_SALES_SCHEMA, "loss_sales").with_columns(
        (loss_sales[ACQUIRED_PURCHASE_IDS].cast(pl.List(pl.String)) if ACQUIRED_PURCHASE_IDS in loss_sales.columns
         else pl.lit(None, pl.List(pl.String))).alias(ACQUIRED_PURCHASE_IDS)
    ).filter((pl.col("quantity") > 0) & (pl.col("loss") > 0) & pl.col("acquired_date").is_not_null())
    bought = conform(purchases, PURCHASES_SCHEMA, "purchases").filter(pl.col("quantity") > 0)
    if sales.height == 0 or bought.height == 0:
        return pl.DataFrame(schema=MATCHES_SCHEMA)
    if sales["sale_id"].is_duplicated().any() or bought["purchase_id"].is_duplicated().any():
        # Every tie is broken on these ids: duplicates would make the result depend on row order.
        raise ValueError("match_wash_sales: sale_id and purchase_id must be unique")

    window = timedelta(days=WASH_WINDOW_DAYS)
    sales = sales.with_columns(
        _units("quantity").alias("sale_units"),
        # Loss sales are matched in the order they were made (Treas. Reg. §1.1091-1(b)).
        pl.struct("sale_date", "sale_id").rank("dense").over("household_id", "wash_group").alias("sale_rank"),
    )
    bought = bought.with_columns(_units("quantity").alias("units"))
    own_purchase = (
        pl.when(pl.col(ACQUIRED_PURCHASE_IDS).is_not_null())
        .then(pl.col(ACQUIRED_PURCHASE_IDS).list.contains(pl.col("purchase_id")))
        .otherwise(
            (pl.col("account_id_purchase") == pl.col("account_id"))
            & (pl.col("symbol_purchase") == pl.col("symbol"))
            & (pl.col("trade_date") == pl.col("acquired_date"))
        )
        .fill_null(False)
    )
    pairs = (
        sales.join(bought, on=["household_id", "wash_group"], suffix="_purchase")
        .filter(
            (pl.col("trade_date") >= pl.col("sale_date") - window)
            & (pl.col("trade_date") <= pl.col("sale_date") + window)
            # Rev. Rul. 56-602: the purchase that created the shares sold (all of its shares) is
            # not a replacement for them.
            & ~own_purchase
        )
        .select(
            "sale_id", "sale_rank", "sale_units", "loss", "holding_days",
            "purchase_id", "trade_date",
            pl.col("account_id_purchase").alias("purchase_account_id"),
            pl.col("account_type").alias("purchase_account_type"),
            pl.col("symbol_purchase").alias("purchase_symbol"),
        )
    )
    remaining = bought.select("purchase_id", "units", pl.col("units").alias("remaining"))
    if already_replaced is not None and already_replaced.height:
        used = conform(already_replaced, ALREADY_REPLACED_SCHEMA, "already_replaced").group_by("purchase_id").agg(
            _units("quantity").sum().alias("used"))
        remaining = remaining.join(used, on="purchase_id", how="left").select(
            "purchase_id", "units", (pl.col("remaining") - pl.col("used").fill_null(0)).clip(0).alias("remaining"))
    matched: list[pl.DataFrame] = []
    for rank in range(1, int(pairs["sale_rank"].max() or 0) + 1):
        step = (
            pairs.filter(pl.col("sale_rank") == rank)
            .join(remaining, on="purchase_id")
            .filter(pl.col("remaining") > 0)
            # Treas. Reg. §1.1091-1(c): the replacement shares first acquired are matched first.
            .sort("sale_id", "trade_date", "purchase_id")
            .with_columns(
                (pl.col("remaining").cum_sum().over("sale_id") - pl.col("remaining")).alias("before")
            )
            .with_columns((pl.col("sale_units") - pl.col("before")).clip(0).alias("wanted"))
            .with_columns(pl.min_horizontal("wanted", "remaining").alias("taken"))
            .filter(pl.col("taken") > 0)
            .with_columns(
                # Which shares: the sale's next unmatched shares, the purchase's first unused ones.
                (pl.col("taken").cum_sum().over("sale_id") - pl.col("taken")).alias("sale_before"),
                (pl.col("units") - pl.col("remaining")).alias("purchase_before"),
            )
        )
        if step.height == 0:
            continue
        matched.append(step)
        used = step.group_by("purchase_id").agg(pl.col("taken").sum())
        remaining = (
            remaining.join(used, on="purchase_id", how="left")
            .select("purchase_id", "units", (pl.col("remaining") - pl.col("taken").fill_null(0)).alias("remaining"))
        )
    if not matched:
        return pl.DataFrame(schema=MATCHES_SCHEMA)
    per_share = pl.col("loss") / pl.col("sale_units")
    return (
        pl.concat(matched)
        .select(
            "sale_id", "purchase_id",
            (pl.col("taken") / _UNITS).alias("replaced_quantity"),
            # Pub. 550: the disallowed part is the loss on as many shares as were replaced.
            # Rounded on the running total, so a sale's matches add up to its rounded total.
            ((per_share * (pl.col("sale_before") + pl.col("taken"))).round(2)
             - (per_share * pl.col("sale_before")).round(2)).round(2).alias("disallowed_loss"),
            pl.col("purchase_account_type").is_in(TAX_ADVANTAGED).alias("loss_lost_permanently"),
            "purchase_account_id", "purchase_symbol",
            pl.col("trade_date").alias("purchase_date"),
            pl.col("holding_days").alias("tacked_holding_days"),
            (pl.col("sale_before") / _UNITS).alias("sale_offset"),
            (pl.col("purchase_before") / _UNITS).alias("purchase_offset"),
        )
        .sort("sale_id", "purchase_date", "purchase_id")
    )
