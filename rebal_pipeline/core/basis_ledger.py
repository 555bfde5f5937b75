"""rebal's own cost-basis ledger: the wash-sale adjustments rebal computes, kept per lot and
carried from one session to the next (pure polars, no Dagster; its warehouse reads and
writes are core/basis_ledger_store.py, the asset defs/trades/basis.py, the table `basis_adjustments`).

Why rebal keeps a ledger. A broker adjusts basis for a wash sale only when the loss sale and the
replacement purchase are in the same account (IRC §6045(g)(2)(B)(ii), Treas. Reg.
§1.6045-1(d)(6)(iii)); the taxpayer's own obligation (IRC §1091) runs across all the household's
accounts. So when a loss in account A is washed by a purchase in account B, B's custodian keeps
reporting B's unadjusted basis. Computed afresh each day from the feed alone, the adjustment
vanishes as soon as the loss sale leaves transactions.csv's look-back, and a later sale of B's
replacement shares is measured from the wrong basis: a second wash of that loss (a chain) would
carry too little (IRC §1091(d): the basis of the replacement includes the disallowed loss).

The ledger, one row per (loss sale, replacement purchase) match — a "part" of the replacement
lot — with:
- which lot (account_id, symbol, lot_id; the purchase that created it: purchase_id, a
  transaction identity, never the date), lot_part (`replacement`, `replacement-002`, ... in
  share order);
- replaced_quantity and basis_added (the disallowed loss, dollars for those shares), the tacked
  holding_from (IRC §1223(3)), loss_lost_permanently (replacement in a tax-advantaged account,
  Rev. Rul. 2008-5: recorded, but it adds no basis);
- held_quantity: replacement shares still held. Later sales of shares acquired on the purchase
  day in that account consume the replacement shares first — their holding period, tacked,
  starts earlier, so under first-in first-out (Treas. Reg. §1.1012-1(c)(1)) they are the first
  in — and each consumed share's basis_added goes into that sale's basis (`extra_basis`): the
  chain.
- custodian_adjusted: the lot's custodian says it already carries a wash-sale adjustment
  (lots.csv `wash_sale_adjusted`): the custodian's figure wins, rebal adds nothing to that lot,
  and a difference from rebal's own figure is reported (`basis_reconciliation`), not silently
  chosen.

Carrying forward (idempotent): a session reads the ledger of the previous session (the latest
as_of before its own). Rows whose loss sale is still in today's transactions are recomputed from
the feed; the others are carried as they were, consumed further only by sales after the previous
session. Re-running a day reads the same previous session and writes the same rows.

Invariants (tested): held_quantity ≤ replaced_quantity; the held replacement shares of a lot never
exceed the lot's quantity; the ledger is the same whatever the order of the input rows.
"""

from __future__ import annotations

from datetime import date

import polars as pl

LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "lot_id": pl.String(),  # null: the lot the purchase opened is no longer in lots.csv
    "lot_part": pl.String(),
    "acquired_date": pl.Date(),  # the replacement purchase's trade date
    "purchase_id": pl.String(),
    "purchase_offset": pl.Float64(),  # shares of the purchase matched before this part
    "sale_id": pl.String(),
    "sale_account_id": pl.String(),
    "sale_symbol": pl.String(),
    "sale_date": pl.Date(),
    "replaced_quantity": pl.Float64(),
    "held_quantity": pl.Float64(),
    "basis_added": pl.Float64(),  # for replaced_quantity shares
    "basis_added_held": pl.Float64(),  # for held_quantity shares: what the lot carries today
    "holding_from": pl.Date(),
    "loss_lost_permanently": pl.Boolean(),
    "custodian_adjusted": pl.Boolean(),
    "applied_to_lot": pl.Boolean(),  # rebal raises this lot's basis by basis_added_held
    "first_recorded": pl.Date(),
}

SELLS_SCHEMA: dict[str, pl.DataType] = {
    "sale_id": pl.String(),
    "account_id": pl.String(),
    "symbol": pl.String(),
    "trade_date": pl.Date(),
    "acquired_date": pl.Date(),
    "quantity": pl.Float64(),
}

RECONCILIATION_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "lot_id": pl.String(),
    "quantity": pl.Float64(),
    "custodian_basis": pl.Float64(),
    "rebal_basis": pl.Float64(),
    "difference": pl.Float64(),
    "status": pl.String(),  # agrees, differs, not_reconcilable
    "reason": pl.String(),
}

_EPS = 1e-9


def empty_ledger() -> pl.DataFrame:
    return pl.DataFrame(schema=LEDGER_SCHEMA)


def link_purchases_to_lots(purchases: pl.DataFrame, lots: pl.DataFrame) -> pl.DataFrame:
    """Which lot each purchase opened: purchase_id → lot_id (account_id, symbol). A purchase opens
    a lot of its account and symbol dated its trade date. When one account bought one security
    several times that day, purchases (in transaction order: purchase_id) and that day's lots (in
    lot_id order) are paired one to one when they are as many; otherwise each purchase goes to
    the lot holding its first share, counting shares in those orders (a custodian that merged the
    day's purchases into one lot gets them all). Purchases whose lot is gone have no row.

    purchases: purchase_id, account_id, symbol, trade_date, quantity. lots: account_id, symbol,
    lot_id, open_date, quantity."""
    day = ["account_id", "symbol", "trade_date"]
    bought = purchases.select("purchase_id", "account_id", "symbol", "trade_date", pl.col("quantity").cast(pl.Float64))
    opened = lots.select("account_id", "symbol", "lot_id", pl.col("open_date").cast(pl.Date).alias("trade_date"),
                         pl.col("quantity").cast(pl.Float64).alias("lot_quantity"))
    if bought.height == 0 or opened.height == 0:
        return pl.DataFrame(schema={"purchase_id": pl.String, "lot_id": pl.String})
    bought = bought.sort("purchase_id").with_columns(
        pl.col("purchase_id").rank("ordinal").over(day).alias("_rank"),
        pl.len().over(day).alias("_count"),
        (pl.col("quantity").cum_sum().over(day) - pl.col("quantity")).alias("_first_share"),
    )
    opened = opened.sort("lot_id").with_columns(
        pl.col("lot_id").rank("ordinal").over(day).alias("_lot_rank"),
        pl.len().over(day).alias("_lot_count"),
        (pl.col("lot_quantity").cum_sum().over(day) - pl.col("lot_quantity")).alias("_lot_start"),
        pl.col("lot_quantity").cum_sum().over(day).alias("_lot_end"),
    )
    pairs = bought.join(opened, on=day)
    one_to_one = (pl.col("_count") == pl.col("_lot_count")) & (pl.col("_rank") == pl.col("_lot_rank"))
    by_share = (pl.col("_count") != pl.col("_lot_count")) & (
        ((pl.col("_first_share") >= pl.col("_lot_start")) & (pl.col("_first_share") < pl.col("_lot_end")))
        # Beyond the lots' shares (some sold since): the day's last lot.
        | ((pl.col("_first_share") >= pl.col("_lot_end")) & (pl.col("_lot_rank") == pl.col("_lot_count")))
    )
    return pairs.filter(one_to_one | by_share).select("purchase_id", "lot_id").unique("purchase_id", keep="first")


def parts_from_matches(matches: pl.DataFrame, links: pl.DataFrame, sales: pl.DataFrame) -> pl.DataFrame:
    """Ledger rows (held_quantity = replaced_quantity, nothing consumed yet) for the matches of
    core.wash_sales.match_wash_sales. sales: sale_id, account_id, symbol, sale_date."""
    if matches.height == 0:
        return empty_ledger()
    return matches.join(links, on="purchase_id", how="left").join(
        sales.select("sale_id", pl.col("account_id").alias("sale_account_id"),
                     pl.col("symbol").alias("sale_symbol"), "sale_date").unique("sale_id"),
        on="sale_id", how="left",
    ).select(
        pl.col("purchase_account_id").alias("account_id"), pl.col("purchase_symbol").alias("symbol"), "lot_id",
        pl.lit(None, pl.String).alias("lot_part"),
        pl.col("purchase_date").alias("acquired_date"), "purchase_id", "purchase_offset", "sale_id",
        "sale_account_id", "sale_symbol", "sale_date", "replaced_quantity",
        pl.col("replaced_quantity").alias("held_quantity"),
        # Rev. Rul. 2008-5: a loss washed into an IRA is disallowed and adds no basis anywhere.
        pl.when(pl.col("loss_lost_permanently")).then(0.0).otherwise(pl.col("disallowed_loss")).alias("basis_added"),
        pl.lit(None, pl.Float64).alias("basis_added_held"),
        # IRC §1223(3): the replacement's holding period includes that of the shares sold.
        (pl.col("purchase_date") - pl.duration(days=pl.col("tacked_holding_days").fill_null(0))).alias("holding_from"),
        "loss_lost_permanently",
        pl.lit(False).alias("custodian_adjusted"),
        pl.lit(None, pl.Boolean).alias("applied_to_lot"),
        pl.lit(None, pl.Date).alias("first_recorded"),
    ).cast(LEDGER_SCHEMA)


def consume(parts: pl.DataFrame, sells: pl.DataFrame, since: date | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Replacement shares sold since they were bought. Each sell of shares of an account and
    symbol acquired on a replacement purchase's day takes that day's replacement shares first
    (parts in purchase, then share order; sells in date, then transaction order), then plain
    shares. Parts with `carried` true (their loss sale has left the look-back) had their earlier
    sales consumed already, on the day they were recorded: only sells after `since` consume them.

    Returns (parts with held_quantity reduced, per sell: sale_id, extra_basis — the basis_added
    of the replacement shares it sold, which rebal adds to the custodian's basis — and
    replacement_quantity, replacement_holding_from)."""
    per_sale_schema = {"sale_id": pl.String, "extra_basis": pl.Float64, "replacement_quantity": pl.Float64,
                       "replacement_holding_from": pl.Date}
    created_by = (pl.col("acquired_purchase_ids").cast(pl.List(pl.String)) if "acquired_purchase_ids" in sells.columns
                  else pl.lit(None, pl.List(pl.String)))
    sells = sells.select(*SELLS_SCHEMA, created_by.alias("_created_by")).cast(SELLS_SCHEMA).filter(
        pl.col("acquired_date").is_not_null() & (pl.col("quantity") > 0))
    # A loss lost in an IRA (no basis to carry) is not consumed: nothing rides on those shares.
    live = pl.col("basis_added") > 0
    if parts.height == 0 or sells.height == 0 or parts.filter(live).height == 0:
        return parts, pl.DataFrame(schema=per_sale_schema)
    group = ["account_id", "symbol", "acquired_date"]
    out_parts, out_sales = [], []
    for carried in (False, True):
        mine = parts.filter(live & (pl.col("carried") == carried) & (pl.col("held_quantity") > _EPS))
        selling = sells if not (carried and since is not None) else sells.filter(pl.col("trade_date") > since)
        if mine.height == 0 or selling.height == 0:
            continue
        mine = mine.sort("purchase_id", "purchase_offset", "sale_id").with_columns(
            (pl.col("held_quantity").cum_sum().over(group) - pl.col("held_quantity")).alias("_p0"),
            pl.col("held_quantity").cum_sum().over(group).alias("_p1"),
        )
        selling = selling.sort("trade_date", "sale_id").with_columns(
            (pl.col("quantity").cum_sum().over(group) - pl.col("quantity")).alias("_s0"),
            pl.col("quantity").cum_sum().over(group).alias("_s1"),
        )
        overlap = (
            mine.select("sale_id", "purchase_id", *group, "_p0", "_p1", "held_quantity", "basis_added",
                        "replaced_quantity", "holding_from", "custodian_adjusted")
            .join(selling.select(pl.col("sale_id").alias("selling_id"), *group, "_s0", "_s1", "_created_by",
                                 pl.col("trade_date").alias("selling_date")), on=group)
            # A sell consumes only shares of the purchase(s) that created what it sold, when they
            # are known (not the rebuy after a same-day sale, not its own replacement).
            .filter((pl.col("selling_date") >= pl.col("acquired_date"))
                    & (pl.col("_created_by").is_null() | (pl.col("_created_by").list.len() == 0)
                       | pl.col("_created_by").list.contains(pl.col("purchase_id"))))
            .with_columns((pl.min_horizontal("_p1", "_s1") - pl.max_horizontal("_p0", "_s0")).clip(0).alias("_sold"))
            .filter(pl.col("_sold") > _EPS)
        )
        out_parts.append(overlap.group_by("sale_id", "purchase_id").agg(pl.col("_sold").sum()).with_columns(
            pl.lit(carried).alias("carried")))
        out_sales.append(overlap.select(
            pl.col("selling_id").alias("sale_id"),
            # The custodian's reported basis already includes what it adjusted itself.
            pl.when(pl.col("custodian_adjusted")).then(0.0)
            .otherwise(pl.col("basis_added") * pl.col("_sold") / pl.col("replaced_quantity")).alias("extra_basis"),
            pl.col("_sold").alias("replacement_quantity"), "holding_from",
        ))
    if not out_parts:
        return parts, pl.DataFrame(schema=per_sale_schema)
    sold = pl.concat(out_parts)
    parts = parts.join(sold, on=["sale_id", "purchase_id", "carried"], how="left").with_columns(
        (pl.col("held_quantity") - pl.col("_sold").fill_null(0.0)).clip(0).round(8).alias("held_quantity")
    ).drop("_sold")
    per_sale = pl.concat(out_sales).group_by("sale_id").agg(
        pl.col("extra_basis").sum().round(2), pl.col("replacement_quantity").sum(),
        # Several parts in one sale: the latest tacked start (never calls a term long too early).
        pl.col("holding_from").max().alias("replacement_holding_from"),
    )
    return parts, per_sale


def settle(parts: pl.DataFrame, lots: pl.DataFrame, as_of: date, lots_complete: bool = True) -> pl.DataFrame:
    """The ledger as written for the day: lot ids and part names, held shares capped at what the
    lot holds (replacement shares first), the basis the lot carries, whether rebal applies it.
    lots: account_id, symbol, lot_id, quantity, wash_sale_adjusted. `lots_complete` false: `lots`
    is a subset of the book, so a lot missing from it is not known to be gone (held is kept)."""
    if parts.height == 0:
        return empty_ledger()
    held_lots = lots.select("account_id", "lot_id", pl.col("quantity").cast(pl.Float64).alias("_lot_quantity"),
                            pl.col("wash_sale_adjusted").fill_null(False).alias("_flagged"))
    out = (
        parts.join(held_lots, on=["account_id", "lot_id"], how="left")
        .sort("account_id", "lot_id", "purchase_id", "purchase_offset", "sale_id")
        .with_columns(
            # A lot that is gone holds nothing; a lot never holds more replacement shares than shares.
            pl.when(pl.col("lot_id").is_null()).then(0.0)
            .when(pl.col("_lot_quantity").is_null()).then(pl.lit(0.0) if lots_complete else pl.col("held_quantity"))
            .otherwise(pl.min_horizontal(
                pl.col("held_quantity"),
                (pl.col("_lot_quantity") - (pl.col("held_quantity").cum_sum().over("account_id", "lot_id")
                                            - pl.col("held_quantity"))).clip(0),
            )).round(8).alias("held_quantity"),
            pl.col("purchase_id").rank("ordinal").over("account_id", "lot_id").alias("_n"),
            (pl.col("custodian_adjusted") | pl.col("_flagged").fill_null(False)).alias("custodian_adjusted"),
        )
        .with_columns(
            pl.coalesce(
                pl.col("lot_part"),
                pl.when(pl.col("_n") == 1).then(pl.lit("replacement"))
                .otherwise(pl.format("replacement-{}", pl.col("_n").cast(pl.String).str.zfill(3))),
            ).alias("lot_part"),
            (pl.col("basis_added") * pl.col("held_quantity") / pl.col("replaced_quantity")).round(2)
            .alias("basis_added_held"),
            pl.coalesce("first_recorded", pl.lit(as_of)).alias("first_recorded"),
        )
        .with_columns(
            (pl.col("lot_id").is_not_null() & (pl.col("held_quantity") > _EPS) & ~pl.col("loss_lost_permanently")
             & ~pl.col("custodian_adjusted")).alias("applied_to_lot"),
        )
    )
    return out.select(list(LEDGER_SCHEMA)).cast(LEDGER_SCHEMA).sort("account_id", "symbol", "lot_id", "lot_part",
                                                                     "sale_id")


def carried_rows(prior: pl.DataFrame | None, recomputed_sale_ids: pl.Series) -> pl.DataFrame:
    """The previous session's rows whose loss sale is no longer in today's transactions, still
    holding shares: kept as they were (lot ids, held shares, first_recorded)."""
    if prior is None or prior.height == 0:
        return empty_ledger().with_columns(pl.lit(True).alias("carried"))
    return prior.select(list(LEDGER_SCHEMA)).cast(LEDGER_SCHEMA).filter(
        ~pl.col("sale_id").is_in(recomputed_sale_ids.implode()) & (pl.col("held_quantity") > _EPS)
    ).with_columns(pl.lit(True).alias("carried"))


def keep_prior_identity(parts: pl.DataFrame, prior: pl.DataFrame | None) -> pl.DataFrame:
    """A recomputed row keeps the lot id, part name and first_recorded it had (its lot may have
    left lots.csv since; its name must not change under the advisor)."""
    if prior is None or prior.height == 0:
        return parts
    known = prior.select("sale_id", "purchase_id", pl.col("lot_id").alias("_lot_id"),
                         pl.col("lot_part").alias("_lot_part"), pl.col("first_recorded").alias("_first"))
    return parts.join(known, on=["sale_id", "purchase_id"], how="left").with_columns(
        pl.coalesce("lot_id", "_lot_id").alias("lot_id"),
        pl.coalesce("lot_part", "_lot_part").alias("lot_part"),
        pl.coalesce("first_recorded", "_first").alias("first_recorded"),
    ).drop("_lot_id", "_lot_part", "_first")


def reconcile(lots: pl.DataFrame, ledger: pl.DataFrame, purchase_costs: pl.DataFrame,
              links: pl.DataFrame) -> pl.DataFrame:
    """For every lot the custodian marks wash_sale_adjusted: the custodian's basis (which wins)
    against rebal's — what the purchase cost for the lot's shares plus the disallowed losses rebal
    matched to them. A difference over a cent is `differs` (a data-quality alert: one of the two
    missed or mis-sized a wash sale); a lot whose purchase is not in the look-back cannot be
    reconciled and says so. purchase_costs: purchase_id, price."""
    flagged = lots.filter(pl.col("wash_sale_adjusted").fill_null(False)).select(
        "account_id", "symbol", "lot_id", pl.col("quantity").cast(pl.Float64), pl.col("cost_basis").cast(pl.Float64))
    if flagged.height == 0:
        return pl.DataFrame(schema=RECONCILIATION_SCHEMA)
    priced = links.join(purchase_costs, on="purchase_id").group_by("lot_id").agg(
        pl.col("price").mean().alias("_price"), pl.len().alias("_purchases"))
    # What rebal's own matching adds to the lot's shares still held (whether or not it applies it).
    added = ledger.filter(~pl.col("loss_lost_permanently")).group_by("account_id", "lot_id").agg(
        pl.col("basis_added_held").sum().alias("_added"))
    out = flagged.join(priced, on="lot_id", how="left").join(added, on=["account_id", "lot_id"], how="left").with_columns(
        (pl.col("quantity") * pl.col("_price") + pl.col("_added").fill_null(0.0)).round(2).alias("rebal_basis"),
    ).with_columns((pl.col("cost_basis") - pl.col("rebal_basis")).round(2).alias("difference"))
    return out.select(
        "account_id", "symbol", "lot_id", "quantity", pl.col("cost_basis").alias("custodian_basis"), "rebal_basis",
        "difference",
        pl.when(pl.col("rebal_basis").is_null()).then(pl.lit("not_reconcilable"))
        .when(pl.col("difference").abs() <= 0.01).then(pl.lit("agrees"))
        .otherwise(pl.lit("differs")).alias("status"),
        pl.when(pl.col("rebal_basis").is_null())
        .then(pl.lit("the purchase that opened this lot is not in transactions.csv: rebal cannot recompute its basis"))
        .when(pl.col("difference").abs() <= 0.01)
        .then(pl.lit("the custodian's wash-sale adjusted basis matches rebal's"))
        .otherwise(pl.format(
            "the custodian's wash-sale adjusted basis ${} differs from rebal's ${} (purchase cost plus the "
            "disallowed losses rebal matched to these shares) by ${}; the custodian's figure is used — check the "
            "wash sales of this security in the household", pl.col("cost_basis").round(2), pl.col("rebal_basis"),
            pl.col("difference"),
        )).alias("reason"),
    ).cast(RECONCILIATION_SCHEMA).sort("account_id", "lot_id")
