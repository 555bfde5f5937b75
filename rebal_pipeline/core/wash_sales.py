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

Matching (Treas. Reg. §1.1091-1(b)-(c)): when fewer replacement shares were bought than sold,
only the loss on as many shares as were bought is disallowed (Pub. 550: 75 of 100 shares → 75%
of the loss); replacement shares are matched first-acquired first, loss sales in the order they
were made, and a share replaces at most one sold share. The purchase that created the very
shares being sold is never their own replacement, nor are the other shares of that same
purchase (Rev. Rul. 56-602).

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

# Accounts whose basis never reaches the client's return: a loss washed into them is lost.
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
    "acquired_date": pl.Date(),  # when the shares sold were bought (null: unknown)
    "holding_days": pl.Int64(),  # days the shares sold were held (for tacking; null: unknown)
}
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
}

# Quantities are compared in whole units of 1e-8 share (the feed's precision), so the greedy
# fill never leaves a 1e-17 share "unmatched" from floating-point noise.
_UNITS = 100_000_000


def match_wash_sales(loss_sales: pl.DataFrame, purchases: pl.DataFrame) -> pl.DataFrame:
    """Match loss sales to their replacement purchases. One row per (sale, purchase) pair that
    replaced at least one share: how many shares, how much loss that disallows (pro rata to
    shares, Pub. 550), whether it is lost for good (replacement in a tax-advantaged account) and
    the holding days to tack on to the replacement shares."""
    sales = conform(loss_sales, LOSS_SALES_SCHEMA, "loss_sales").filter(
        (pl.col("quantity") > 0) & (pl.col("loss") > 0)
    )
    bought = conform(purchases, PURCHASES_SCHEMA, "purchases").filter(pl.col("quantity") > 0)
    if sales.height == 0 or bought.height == 0:
        return pl.DataFrame(schema=MATCHES_SCHEMA)

    window = timedelta(days=WASH_WINDOW_DAYS)
    sales = sales.with_columns(
        (pl.col("quantity") * _UNITS).round(0).cast(pl.Int64).alias("sale_units"),
        # Loss sales are matched in the order they were made (Treas. Reg. §1.1091-1(b)).
        pl.struct("sale_date", "sale_id").rank("dense").over("household_id", "wash_group").alias("sale_rank"),
    )
    bought = bought.with_columns((pl.col("quantity") * _UNITS).round(0).cast(pl.Int64).alias("units"))
    pairs = (
        sales.join(bought, on=["household_id", "wash_group"], suffix="_purchase")
        .filter(
            (pl.col("trade_date") >= pl.col("sale_date") - window)
            & (pl.col("trade_date") <= pl.col("sale_date") + window)
            # Rev. Rul. 56-602: the purchase that created the shares sold (all of its shares) is
            # not a replacement for them.
            & ~(
                (pl.col("account_id_purchase") == pl.col("account_id"))
                & (pl.col("symbol_purchase") == pl.col("symbol"))
                & (pl.col("trade_date") == pl.col("acquired_date")).fill_null(False)
            )
        )
        .select(
            "sale_id", "sale_rank", "household_id", "wash_group", "sale_units", "loss", "holding_days",
            "purchase_id", "trade_date",
            pl.col("account_id_purchase").alias("purchase_account_id"),
            pl.col("account_type").alias("purchase_account_type"),
            pl.col("symbol_purchase").alias("purchase_symbol"),
        )
    )
    remaining = bought.select("purchase_id", pl.col("units").alias("remaining"))
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
            .with_columns(
                (pl.col("sale_units") - pl.col("before")).clip(0).alias("wanted")
            )
            .with_columns(pl.min_horizontal("wanted", "remaining").alias("taken"))
            .filter(pl.col("taken") > 0)
        )
        if step.height == 0:
            continue
        matched.append(step)
        used = step.group_by("purchase_id").agg(pl.col("taken").sum())
        remaining = (
            remaining.join(used, on="purchase_id", how="left")
            .select("purchase_id", (pl.col("remaining") - pl.col("taken").fill_null(0)).alias("remaining"))
        )
    if not matched:
        return pl.DataFrame(schema=MATCHES_SCHEMA)
    return (
        pl.concat(matched)
        .select(
            "sale_id", "purchase_id",
            (pl.col("taken") / _UNITS).alias("replaced_quantity"),
            # Pub. 550: the disallowed part is the loss on as many shares as were replaced.
            (pl.col("loss") * pl.col("taken") / pl.col("sale_units")).round(2).alias("disallowed_loss"),
            pl.col("purchase_account_type").is_in(TAX_ADVANTAGED).alias("loss_lost_permanently"),
            "purchase_account_id", "purchase_symbol",
            pl.col("trade_date").alias("purchase_date"),
            pl.col("holding_days").alias("tacked_holding_days"),
        )
        .sort("sale_id", "purchase_date", "purchase_id")
    )
