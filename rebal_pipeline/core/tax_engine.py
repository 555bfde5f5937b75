"""The tax engine: one day's proposals → lots relieved, tax, wash sales, harvests, advice.

Pure polars over the whole book (no Dagster, no DuckDB). The proposal orchestration (core/proposals.py)
reads the frames, calls `past_wash_sales` before sizing (so every basis is right) and
`apply_tax_engine` after sizing, and writes what comes back.

Order of work, and why:
1. Past wash sales (transactions.csv, matched share by share, with rebal's basis ledger of the
   previous session carried forward: core/basis_ledger.py) adjust the replacement lots' basis and
   holding period first: every later number (tax per dollar for the sizer, gains, harvest candidates) starts
   from the adjusted lots.
2. The sizer prefers selling the cheapest-tax security of an overweight class (`sell_tax_cost`).
3. Each sell relieves lots by the account's method; loss lots are checked for wash sales against
   purchases of the household in the 30 days before (transactions) and the buys proposed today
   in any of its accounts. A proposed buy that would wash a loss (today's or a recent one) is
   replaced by its `tlh_substitute`, unless the advisor has overridden that with a reason.
4. Harvest candidates (taxable lots down ≥ threshold, not sold by the rebalance) become their own
   recommendation (sell the lots, buy the substitute), kept apart from rebalancing, unless a
   purchase of the household in the window would wash the loss.
5. A final wash-sale match over everything proposed gives the disallowed amounts that tax_impact
   and recommendation_summary report.

The engine mints no recommendation id: a substitution (step 3) or a harvest (step 4) changes the
trades, and an id is minted once, from the final trades (core/recommendation_identity.py). Every
frame in and out is keyed by the recommendation's provisional key (`recommendation_key`), and so
are the ids of today's proposed sales and buys ("S:<key>:…", "B:<key>:…"); the orchestration
mints the ids from the outcome and puts them in its place with `TaxOutcome.identified`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, timedelta

import polars as pl

from rebal_pipeline.core.tax_lots import (
    TaxPolicy, adjust_lots_for_wash_sales, estimate_lot_tax, harvest_candidates, net_capital_gains, relieve_lots,
    wait_for_long_term, with_terms,
)
from rebal_pipeline.core.basis_ledger import SELLS_SCHEMA as LEDGER_SELLS_SCHEMA
from rebal_pipeline.core.basis_ledger import (
    RECONCILIATION_SCHEMA, carried_rows, consume, empty_ledger, keep_prior_identity, link_purchases_to_lots,
    parts_from_matches, reconcile, settle,
)
from rebal_pipeline.core.wash_sales import (
    ACQUIRED_PURCHASE_IDS, ALREADY_REPLACED_SCHEMA, LOSS_SALES_SCHEMA, PURCHASES_SCHEMA, TAX_ADVANTAGED,
    WASH_WINDOW_DAYS, match_wash_sales,
)
from rebal_pipeline.core.money import tax_effect_words
from rebal_pipeline.core.recommendation_identity import ID, KEY, provisional_key, with_recommendation_ids

_PURCHASE_TYPES = ("buy", "reinvest")


@dataclass(frozen=True)
class PastWashSales:
    lots: pl.DataFrame  # tax lots after past wash sales (core.tax_lots.LOTS_SCHEMA + taxable)
    loss_sales: pl.DataFrame  # past loss sales with a known basis (wash_sales.LOSS_SALES_SCHEMA)
    purchases: pl.DataFrame  # past purchases (wash_sales.PURCHASES_SCHEMA)
    events: pl.DataFrame  # one row per washed past sale, and per sale that could not be checked
    # rebal's basis ledger for the day (core.basis_ledger.LEDGER_SCHEMA): what basis_adjustments holds.
    ledger: pl.DataFrame = field(default_factory=empty_ledger)
    # Lots the custodian marks wash_sale_adjusted, against rebal's figure (basis_ledger.RECONCILIATION_SCHEMA).
    reconciliation: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=RECONCILIATION_SCHEMA))
    # purchase_id → lot_id: which lot each past purchase opened (basis_ledger.link_purchases_to_lots).
    lot_links: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema={"purchase_id": pl.String,
                                                                                 "lot_id": pl.String}))
    # Shares of past purchases taken by ledger rows carried from earlier sessions (purchase_id, quantity).
    already_replaced: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ALREADY_REPLACED_SCHEMA))


# On the wash_sales rows of today's proposed sales: the provisional key of the sale's and of the
# buy's recommendation (null for a past transaction), until `TaxOutcome.identified`.
SALE_KEY, PURCHASE_KEY = "sale_recommendation_key", "purchase_recommendation_key"


@dataclass(frozen=True)
class TaxOutcome:
    """What `apply_tax_engine` returns, keyed by `recommendation_key`; `identified` gives the
    same frames with the minted recommendation_id instead (what the warehouse gets)."""

    trades: pl.DataFrame
    recommendations: pl.DataFrame
    tax_impact: pl.DataFrame
    summary: pl.DataFrame
    tlh_candidates: pl.DataFrame
    wash_sales: pl.DataFrame

    def identified(self, ids: pl.DataFrame) -> TaxOutcome:
        """Every frame with the minted id (`ids`: recommendation_key → recommendation_id, from
        core/recommendation_identity.py) in place of the key, sorted as the engine sorts; in
        wash_sales, "S:<key>:…" and "B:<key>:…" become "S:<id>:…" and "B:<id>:…"."""
        wash = self.wash_sales
        if SALE_KEY in wash.columns:  # only a day with a wash sale proposed names a key there
            wash = wash.with_columns(
                _rekeyed("sale_id", "S:", SALE_KEY, ids), _rekeyed("purchase_id", "B:", PURCHASE_KEY, ids),
            ).drop(SALE_KEY, PURCHASE_KEY).sort("when", "sale_id", "purchase_date")
        return replace(
            self,
            trades=with_recommendation_ids(self.trades, ids).sort(ID, "account_id", "side", "symbol"),
            recommendations=with_recommendation_ids(self.recommendations, ids),
            tax_impact=with_recommendation_ids(self.tax_impact, ids).sort(
                ID, "account_id", "symbol", "lot_id", "lot_part"),
            summary=with_recommendation_ids(self.summary, ids).sort(ID),
            tlh_candidates=with_recommendation_ids(self.tlh_candidates, ids),
            wash_sales=wash,
        )


def _rekeyed(column: str, prefix: str, key: str, ids: pl.DataFrame) -> pl.Expr:
    """`<prefix><key>:…` → `<prefix><id>:…` where the row names a key; otherwise as it is."""
    minted = pl.col(key).replace_strict(ids[KEY], ids[ID], return_dtype=pl.String)
    rest = pl.col(column).str.slice(pl.col(key).str.len_chars() + len(prefix))
    return pl.when(pl.col(key).is_not_null()).then(pl.concat_str(pl.lit(prefix), minted, rest)).otherwise(
        pl.col(column)).alias(column)


# core/tax_lots names the recommendation column recommendation_id; in the engine it is the key.
def _to_tax_lots(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.rename({KEY: ID})


def _from_tax_lots(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.rename({ID: KEY})


def _group_of(securities: pl.DataFrame) -> pl.DataFrame:
    return securities.select("symbol", "wash_group")


# A chain (a loss washed into shares that are sold at a loss and washed again, ...) is resolved
# one link per round; a longer chain in one look-back than this is not credible data.
_MAX_CHAIN_LINKS = 8


def transaction_ids(transactions: pl.DataFrame) -> pl.DataFrame:
    """Adds transaction_id: account, symbol, trade date, type and the transaction's sequence among
    that day's transactions of the same account, symbol and type (in file order, `_line`). The
    same transaction keeps its id from one day's file to the next (the look-back rolls, lines
    move), which the basis ledger relies on; two purchases of one security on one day in one
    account are told apart."""
    day = ["account_id", "symbol", "trade_date", "transaction_type"]
    return transactions.with_columns(
        pl.format("T:{}|{}|{}|{}|{}", "account_id", "symbol", "trade_date", "transaction_type",
                  pl.col("_line").rank("ordinal").over(day).cast(pl.String).str.zfill(3)).alias("transaction_id")
    )


def _creating_purchases(sells: pl.DataFrame, purchases: pl.DataFrame) -> pl.DataFrame:
    """sale_id → acquired_purchase_ids: the purchase(s) that created the shares each sell sold
    (Rev. Rul. 56-602 excludes exactly these, and the rest of their shares). Purchases of the
    account and symbol on the acquisition date — on the sale's own day only those before the sale
    in the file — hold the day's shares in transaction order, and the sells of shares acquired
    that day take them in date and transaction order."""
    day = ["account_id", "symbol", "acquired_date"]
    selling = sells.filter(pl.col("acquired_date").is_not_null()).select(
        "sale_id", "account_id", "symbol", "acquired_date", "trade_date", "_line", "quantity",
    ).sort("trade_date", "_line").with_columns(
        (pl.col("quantity").cum_sum().over(day) - pl.col("quantity")).alias("_s0"),
        pl.col("quantity").cum_sum().over(day).alias("_s1"),
    )
    bought = purchases.select("purchase_id", "account_id", "symbol", pl.col("trade_date").alias("acquired_date"),
                              pl.col("_line").alias("_bought_line"), pl.col("quantity").alias("_q"))
    candidates = selling.join(bought, on=day).filter(
        (pl.col("acquired_date") < pl.col("trade_date")) | (pl.col("_bought_line") < pl.col("_line")))
    ordered = candidates.sort("purchase_id").with_columns(
        (pl.col("_q").cum_sum().over("sale_id") - pl.col("_q")).alias("_p0"),
        pl.col("_q").cum_sum().over("sale_id").alias("_p1"),
        pl.col("_q").sum().over("sale_id").alias("_day_total"),
    )
    # The sale's shares [s0, s1) of the day's shares overlap the purchase's [p0, p1); a sale
    # beyond the day's visible purchases (some bought earlier the same day off the file) takes
    # the last one.
    overlapping = ordered.filter(
        ((pl.col("_p0") < pl.col("_s1")) & (pl.col("_s0") < pl.col("_p1")))
        | ((pl.col("_s0") >= pl.col("_day_total")) & (pl.col("_p1") == pl.col("_day_total")))
    )
    found = overlapping.group_by("sale_id").agg(pl.col("purchase_id").sort().alias(ACQUIRED_PURCHASE_IDS))
    return sells.select("sale_id").join(found, on="sale_id", how="left").with_columns(
        pl.col(ACQUIRED_PURCHASE_IDS).fill_null(pl.lit([], pl.List(pl.String))))


def past_wash_sales(lots: pl.DataFrame, transactions: pl.DataFrame, accounts: pl.DataFrame,
                    securities: pl.DataFrame, prior_ledger: pl.DataFrame | None = None,
                    prior_as_of: date | None = None, as_of: date | None = None,
                    lots_complete: bool = False) -> PastWashSales:
    """Past loss sales matched to the household's purchases (buys and dividend reinvestments) of
    the same wash group, share by share (core.wash_sales); the basis ledger for the day
    (core.basis_ledger); the lots with the ledger applied (IRC §1091(d), §1223(3)).

    Loss sales: sells in taxable accounts (a sale inside an IRA, 401(k), 529 or ERISA account
    realises no loss, IRC §408(e)) whose basis — the custodian's, plus what rebal's ledger adds for
    replacement shares sold (a chain) — is above their proceeds. A sell with a basis but no
    acquisition date, or with no basis, is not checkable: reported with the reason when a purchase
    of its group in the household falls within its window, never disallowed by guess.

    prior_ledger / prior_as_of: the previous session's basis_adjustments rows and date (none on
    the first day). as_of: the day (stamps first_recorded). lots_complete: `lots` is every lot of
    the book (the basis asset) rather than the day's subset (propose_trades).

    lots: account_id, symbol, lot_id, open_date, quantity, cost_basis, wash_sale_adjusted.
    transactions: _line, account_id, symbol, trade_date, transaction_type, quantity, price,
    cost_basis, acquired_date. accounts: account_id, household_id, account_type, taxable."""
    as_of = as_of or (transactions["trade_date"].max() if transactions.height else date.today())
    who = accounts.select("account_id", "household_id", "account_type")
    tx = transaction_ids(transactions).join(who, on="account_id").join(_group_of(securities), on="symbol")
    sells = tx.filter(pl.col("transaction_type") == "sell").with_columns(
        (pl.col("quantity") * pl.col("price")).alias("proceeds"),
        pl.col("transaction_id").alias("sale_id"),
    )
    purchases_full = tx.filter(pl.col("transaction_type").is_in(_PURCHASE_TYPES)).select(
        pl.col("transaction_id").alias("purchase_id"),
        "household_id", "wash_group", "account_id", "account_type", "symbol", "trade_date", "quantity", "price",
        "_line",
    )
    purchases = purchases_full.select(list(PURCHASES_SCHEMA))
    sells = sells.join(_creating_purchases(sells, purchases_full), on="sale_id", how="left")
    links = link_purchases_to_lots(purchases, lots)
    flags = lots.select("account_id", "lot_id", pl.col("wash_sale_adjusted").fill_null(False).alias("_flagged"))
    carried = carried_rows(prior_ledger, sells["sale_id"])
    already = carried.select("purchase_id", pl.col("replaced_quantity").alias("quantity"))
    # IRC §408(e): no loss is realised inside a tax-advantaged account, so §1091 has nothing there.
    taxable_sells = sells.filter(~pl.col("account_type").is_in(TAX_ADVANTAGED))
    consumers = taxable_sells.select(*LEDGER_SELLS_SCHEMA, ACQUIRED_PURCHASE_IDS)
    extra = pl.DataFrame(schema={"sale_id": pl.String, "extra_basis": pl.Float64, "replacement_quantity": pl.Float64,
                                 "replacement_holding_from": pl.Date})
    for _ in range(_MAX_CHAIN_LINKS):
        priced = taxable_sells.join(extra, on="sale_id", how="left").with_columns(
            pl.col("extra_basis").fill_null(0.0),
            (pl.col("cost_basis") + pl.col("extra_basis").fill_null(0.0)).alias("adjusted_basis"),
        )
        loss_sales = priced.filter(
            pl.col("cost_basis").is_not_null() & pl.col("acquired_date").is_not_null()
            & (pl.col("proceeds") < pl.col("adjusted_basis"))
        ).select(
            "sale_id", "household_id", "wash_group", "account_id", "symbol",
            pl.col("trade_date").alias("sale_date"), "quantity",
            (pl.col("adjusted_basis") - pl.col("proceeds")).round(2).alias("loss"),
            "acquired_date",
            # IRC §1223(3): shares that were all replacement shares carry their tacked period on.
            (pl.col("trade_date") - pl.when(pl.col("replacement_quantity").fill_null(0) >= pl.col("quantity") - 1e-9)
             .then(pl.col("replacement_holding_from")).otherwise(pl.col("acquired_date"))).dt.total_days()
            .alias("holding_days"),
            ACQUIRED_PURCHASE_IDS, "extra_basis", pl.col("cost_basis").alias("custodian_basis"),
        )
        matches = match_wash_sales(loss_sales, purchases, already)
        parts = keep_prior_identity(parts_from_matches(matches, links, loss_sales), prior_ledger).with_columns(
            pl.lit(False).alias("carried"))
        parts = pl.concat([parts, carried]).join(flags, on=["account_id", "lot_id"], how="left").with_columns(
            (pl.col("custodian_adjusted") | pl.col("_flagged").fill_null(False)).alias("custodian_adjusted")
        ).drop("_flagged")
        consumed, new_extra = consume(parts, consumers, prior_as_of)
        if new_extra.sort("sale_id").equals(extra.sort("sale_id")):
            break
        extra = new_extra
    ledger = settle(consumed.drop("carried"), lots, as_of, lots_complete)
    adjusted = adjust_lots_for_wash_sales(lots, ledger=ledger).join(
        accounts.select("account_id", "taxable"), on="account_id", how="left"
    ).with_columns(pl.col("taxable").fill_null(False))
    reconciliation = reconcile(lots, ledger, purchases_full.select("purchase_id", "price"), links)
    events = _with_event_columns(pl.concat([
        _washed_events(matches, loss_sales, ledger).with_columns(pl.lit("past").alias("when")),
        _not_checkable(taxable_sells, purchases),
    ], how="diagonal_relaxed"))
    return PastWashSales(adjusted, loss_sales, purchases, events, ledger, reconciliation, links, already)


# The wash_sales table's columns (docs/feed_contract.md), present even on a day without a wash.
WASH_EVENT_SCHEMA: dict[str, pl.DataType] = {
    "when": pl.String(), "status": pl.String(), "sale_id": pl.String(), "account_id": pl.String(),
    "symbol": pl.String(), "sale_date": pl.Date(), "quantity": pl.Float64(), "loss": pl.Float64(),
    "basis_from_earlier_wash_sales": pl.Float64(), "purchase_id": pl.String(), "purchase_account_id": pl.String(),
    "purchase_symbol": pl.String(), "purchase_date": pl.Date(), "replacement_lot_id": pl.String(),
    "replacement_lot_part": pl.String(), "replaced_quantity": pl.Float64(), "disallowed_loss": pl.Float64(),
    "loss_lost_permanently": pl.Boolean(), "tacked_holding_days": pl.Int64(), "treatment": pl.String(),
    "not_checkable_reason": pl.String(),
}


def _with_event_columns(events: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in WASH_EVENT_SCHEMA.items() if name not in events.columns]
    return events.with_columns(missing) if missing else events


def _not_checkable(sells: pl.DataFrame, purchases: pl.DataFrame) -> pl.DataFrame:
    """Sells whose wash-sale status cannot be decided, when a purchase of their group in the
    household falls within their window (otherwise there is nothing to decide): no basis (no loss
    can be known), or a basis but no acquisition date (which purchase created the shares, and so
    which purchases may replace them, cannot be told — Rev. Rul. 56-602)."""
    unknown = sells.filter(pl.col("cost_basis").is_null() | pl.col("acquired_date").is_null()).join(
        purchases.select("household_id", "wash_group", pl.col("trade_date").alias("bought")),
        on=["household_id", "wash_group"],
    ).filter((pl.col("bought") - pl.col("trade_date")).dt.total_days().abs() <= WASH_WINDOW_DAYS).unique("sale_id")
    reason = (
        pl.when(pl.col("cost_basis").is_null())
        .then(pl.lit("the sale has no cost basis in transactions.csv, so its loss cannot be known, and the household "
                     "bought the same wash group within 30 days"))
        .otherwise(pl.lit("the sale has a cost basis but no acquired_date in transactions.csv: which purchase created "
                          "the shares sold, and so which purchases could replace them, cannot be told (Rev. Rul. "
                          "56-602); the household bought the same wash group within 30 days"))
    )
    return unknown.select(
        "sale_id", "account_id", "symbol", pl.col("trade_date").alias("sale_date"),
        pl.col("quantity").cast(pl.Float64),
        pl.when(pl.col("cost_basis").is_not_null()).then((pl.col("cost_basis") - pl.col("proceeds")).round(2))
        .otherwise(None).alias("loss"),
        pl.lit(None, pl.String).alias("purchase_account_id"), pl.lit(None, pl.String).alias("purchase_symbol"),
        pl.lit(None, pl.Date).alias("purchase_date"), pl.lit(None, pl.Float64).alias("replaced_quantity"),
        pl.lit(None, pl.Float64).alias("disallowed_loss"), pl.lit(None, pl.Boolean).alias("loss_lost_permanently"),
        pl.lit("not_checkable").alias("status"), reason.alias("not_checkable_reason"),
        pl.format("not checked: {}", reason).alias("treatment"),
        pl.lit("past").alias("when"),
    ).sort("sale_id")


def _washed_events(matches: pl.DataFrame, sales: pl.DataFrame, ledger: pl.DataFrame | None) -> pl.DataFrame:
    """One row per (loss sale, replacement purchase), with what happened to the loss in words:
    lost in a tax-advantaged account; added by the custodian; or added by rebal's basis ledger —
    with why the custodian does not (another account: IRC §6045(g)), and whether the replacement
    shares have been sold since (then the deferred loss went into that sale's basis)."""
    if matches.height == 0:
        return pl.DataFrame()
    columns = ["sale_id", "account_id", "symbol", "sale_date", "quantity", "loss"]
    columns += [c for c in ("extra_basis", "custodian_basis") if c in sales.columns]
    out = matches.join(sales.select(columns), on="sale_id")
    if ledger is not None and ledger.height:
        out = out.join(ledger.select("sale_id", "purchase_id", pl.col("lot_id").alias("replacement_lot_id"),
                                     pl.col("lot_part").alias("replacement_lot_part"), "held_quantity",
                                     "custodian_adjusted"),
                       on=["sale_id", "purchase_id"], how="left")
    for name, dtype in (("replacement_lot_id", pl.String), ("replacement_lot_part", pl.String),
                        ("held_quantity", pl.Float64), ("custodian_adjusted", pl.Boolean),
                        ("extra_basis", pl.Float64), ("custodian_basis", pl.Float64)):
        if name not in out.columns:
            out = out.with_columns(pl.lit(None, dtype).alias(name))
    sold_since = (pl.col("replaced_quantity") - pl.col("held_quantity").fill_null(pl.col("replaced_quantity"))).round(8)
    ledger_words = pl.format(
        "added to the replacement shares' basis by rebal's basis ledger (IRC §1091(d)); holding period tacked "
        "(§1223(3)){}{}",
        pl.when(pl.col("purchase_account_id") != pl.col("account_id"))
        .then(pl.lit("; bought in another account, whose custodian does not adjust for it (brokers adjust only "
                     "within one account, IRC §6045(g))"))
        .otherwise(pl.lit("")),
        pl.when(sold_since > 1e-9)
        .then(pl.format("; {} of those shares sold since: their sale's basis includes it",
                        pl.when(sold_since == sold_since.round(0)).then(sold_since.cast(pl.Int64).cast(pl.String))
                        .otherwise(sold_since.cast(pl.String))))
        .otherwise(pl.lit("")),
    )
    return out.with_columns(
        pl.lit("wash_sale").alias("status"),
        pl.lit(None, pl.String).alias("not_checkable_reason"),
        pl.col("extra_basis").fill_null(0.0).alias("basis_from_earlier_wash_sales"),
        pl.when(pl.col("loss_lost_permanently"))
        .then(pl.lit("loss lost permanently: replacement bought in a tax-advantaged account (Rev. Rul. 2008-5)"))
        .when(pl.col("custodian_adjusted").fill_null(False))
        .then(pl.lit("added to the replacement lot's basis by the custodian (IRC §1091(d))"))
        .otherwise(ledger_words)
        .alias("treatment"),
    ).drop("custodian_adjusted", "held_quantity", "extra_basis", "custodian_basis")


def sell_tax_cost(lots: pl.DataFrame, prices: pl.DataFrame, rates: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Estimated tax per dollar of selling each taxable position (account_id, symbol,
    tax_per_dollar) — the sizer's preference order within an overweight class. Negative: the
    position sits at a loss (selling it saves tax)."""
    taxable = with_terms(lots.filter(pl.col("taxable")), as_of).join(prices, on="symbol").join(
        rates, on="account_id"
    )
    rate = pl.when(pl.col("term") == "long").then(pl.col("federal_ltcg_rate")).otherwise(
        pl.col("federal_ordinary_rate")) + pl.col("state_rate")
    return taxable.group_by("account_id", "symbol").agg(
        ((pl.col("quantity") * pl.col("price") - pl.col("cost_basis")) * rate).sum().alias("tax"),
        (pl.col("quantity") * pl.col("price")).sum().alias("value"),
    ).filter(pl.col("value") > 0).select("account_id", "symbol", (pl.col("tax") / pl.col("value")).alias("tax_per_dollar"))


def _proposed_loss_sales(relieved: pl.DataFrame, accounts: pl.DataFrame, securities: pl.DataFrame,
                         as_of: date, lot_links: pl.DataFrame | None = None) -> pl.DataFrame:
    """Today's proposed sells at a loss (taxable accounts only, IRC §408(e)), one per lot part
    relieved, with the purchase(s) that opened the lot (`lot_links`): only those are excluded as
    replacements (Rev. Rul. 56-602)."""
    links = lot_links if lot_links is not None else pl.DataFrame(schema={"purchase_id": pl.String, "lot_id": pl.String})
    created_by = links.group_by("lot_id").agg(pl.col("purchase_id").sort().alias(ACQUIRED_PURCHASE_IDS))
    return relieved.filter(pl.col("taxable") & (pl.col("gain") < 0)).join(
        accounts.select("account_id", "household_id"), on="account_id"
    ).join(_group_of(securities), on="symbol").join(created_by, on="lot_id", how="left").select(
        pl.format("S:{}:{}:{}:{}", KEY, "account_id", "lot_id", "lot_part").alias("sale_id"),
        "household_id", "wash_group", "account_id", "symbol",
        pl.lit(as_of).alias("sale_date"), "quantity", (-pl.col("gain")).alias("loss"),
        "acquired_date",
        (pl.lit(as_of) - pl.col("holding_from")).dt.total_days().alias("holding_days"),
        KEY, "lot_id", "lot_part",
        # A lot whose purchase is older than the look-back: no purchase in view created it.
        pl.col(ACQUIRED_PURCHASE_IDS).fill_null(pl.lit([], pl.List(pl.String))),
    )


def _proposed_purchases(trades: pl.DataFrame, accounts: pl.DataFrame, securities: pl.DataFrame,
                        as_of: date) -> pl.DataFrame:
    return trades.filter(pl.col("side") == "buy").join(
        accounts.select("account_id", "household_id", "account_type"), on="account_id"
    ).join(_group_of(securities), on="symbol").select(
        pl.format("B:{}:{}:{}", KEY, "account_id", "symbol").alias("purchase_id"),
        "household_id", "wash_group", "account_id", "account_type", "symbol",
        pl.lit(as_of).alias("trade_date"), "quantity", KEY,
    )


def _relieve(trades: pl.DataFrame, lots: pl.DataFrame, accounts: pl.DataFrame, as_of: date) -> pl.DataFrame:
    sells = trades.filter(pl.col("side") == "sell").join(
        accounts.select("account_id", "lot_relief_method"), on="account_id", how="left"
    )
    # tax_min orders lots by tax per share at the household's rates (accounts carries them).
    rates = accounts.select("account_id", "taxable", "federal_ordinary_rate", "federal_ltcg_rate", "state_rate")
    relieved = _from_tax_lots(relieve_lots(_to_tax_lots(sells), lots, as_of, rates))
    return relieved.join(accounts.select("account_id", "taxable"), on="account_id", how="left").with_columns(
        pl.col("taxable").fill_null(False)
    )


def _units(fractional: pl.Expr, decimals: int) -> pl.Expr:
    return pl.when(fractional).then(10.0 ** decimals).otherwise(1.0)


def _loss_groups(past: PastWashSales, proposed_sales: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """(household_id, wash_group) sold at a loss in the last 30 days or by today's proposals: a
    purchase of such a group in any of the household's accounts today could wash that loss."""
    since = as_of - timedelta(days=WASH_WINDOW_DAYS)
    return pl.concat([
        past.loss_sales.filter(pl.col("sale_date") >= since).select("household_id", "wash_group"),
        proposed_sales.select("household_id", "wash_group"),
    ]).unique()


def _substitute_washing_buys(trades: pl.DataFrame, loss_groups: pl.DataFrame, accounts: pl.DataFrame,
                             securities: pl.DataFrame, restrictions: pl.DataFrame, overrides: pl.DataFrame,
                             policy: TaxPolicy) -> pl.DataFrame:
    """Replace each proposed buy of a wash group the household sold at a loss within 30 days (or
    sells at a loss today) by the security's tlh_substitute (a different wash group of the same
    asset class, itself not sold at a loss by the household), same dollars, rounded down.

    Deliberately conservative: the regulation matches replacement shares first-acquired first
    (Treas. Reg. §1.1091-1(c)), so a buy after enough earlier purchases might not wash; but which
    shares match depends on the order trades execute, so rebal avoids every buy that could.
    Kept as it is when the advisor overrode the substitution (with a reason), or when there is
    no usable substitute (none on file, not priced, same group, sold at a loss too, or no_buy for
    the account); the wash is then computed and reported."""
    with_group = trades.join(accounts.select("account_id", "household_id"), on="account_id", how="left").join(
        securities.select("symbol", "wash_group"), on="symbol", how="left")
    washing = with_group.filter(pl.col("side") == "buy").join(
        loss_groups, on=["household_id", "wash_group"], how="semi")
    if washing.height == 0:
        return trades.with_columns(pl.lit(None, pl.String).alias("replaces_symbol"),
                                   pl.lit(None, pl.String).alias("wash_sale_override"))
    shelf = securities.select(
        pl.col("symbol").alias("substitute"), pl.col("asset_class").alias("sub_class"),
        pl.col("wash_group").alias("sub_group"), pl.col("price").alias("sub_price"),
        pl.col("fractional").alias("sub_fractional"),
    )
    no_buy = restrictions.filter(pl.col("kind") == "no_buy_symbol").select(
        "account_id", pl.col("value").alias("substitute"), pl.lit(True).alias("sub_no_buy"))
    candidates = (
        washing.drop("wash_group")
        .join(securities.select("symbol", pl.col("tlh_substitute").alias("substitute"), "wash_group"), on="symbol")
        .join(overrides.select("account_id", "symbol", pl.col("reason").alias("wash_sale_override")),
              on=["account_id", "symbol"], how="left")
        .join(shelf, on="substitute", how="left")
        .join(no_buy, on=["account_id", "substitute"], how="left")
        .join(loss_groups.select("household_id", pl.col("wash_group").alias("sub_group"), pl.lit(True).alias("sub_lost")),
              on=["household_id", "sub_group"], how="left")
        .filter(
            pl.col("wash_sale_override").is_null() & pl.col("sub_lost").is_null()
            & pl.col("sub_price").is_not_null() & (pl.col("sub_price") > 0)
            & (pl.col("sub_group") != pl.col("wash_group")) & (pl.col("sub_class") == pl.col("asset_class"))
            & pl.col("sub_no_buy").is_null()
        )
        .with_columns(_units(pl.col("sub_fractional"), policy.fractional_decimals).alias("_u"))
        .with_columns(((pl.col("est_value") / pl.col("sub_price") * pl.col("_u")).floor() / pl.col("_u")).alias("_q"))
        .filter(pl.col("_q") > 0)
        .select(KEY, "account_id", "symbol", "substitute", "sub_price", "_q")
    )
    key = [KEY, "account_id", "symbol"]
    out = trades.join(candidates, on=key, how="left").with_columns(
        pl.when(pl.col("substitute").is_not_null()).then(pl.col("symbol")).otherwise(None).alias("replaces_symbol"),
        pl.coalesce("substitute", "symbol").alias("symbol"),
        pl.coalesce("_q", "quantity").alias("quantity"),
        pl.coalesce("sub_price", "est_price").alias("est_price"),
        pl.when(pl.col("substitute").is_not_null()).then(pl.lit("substitute")).otherwise(pl.col("reason")).alias("reason"),
    ).with_columns((pl.col("quantity") * pl.col("est_price")).round(2).alias("est_value")).drop(
        "substitute", "sub_price", "_q")
    # The substitute may already be bought by the same recommendation: one buy per security.
    kept = [c for c in out.columns if c not in ("quantity", "est_value", "replaces_symbol", "reason")]
    out = out.group_by(kept, maintain_order=True).agg(
        pl.col("quantity").sum(), pl.col("est_value").sum(),
        pl.col("replaces_symbol").drop_nulls().first(),
        pl.when((pl.col("reason") == "substitute").any()).then(pl.lit("substitute"))
        .otherwise(pl.col("reason").first()).first().alias("reason"),
    )
    overridden = overrides.select("account_id", "symbol", pl.col("reason").alias("wash_sale_override"))
    return out.join(overridden, on=["account_id", "symbol"], how="left")


def _harvests(lots: pl.DataFrame, relieved: pl.DataFrame, accounts: pl.DataFrame, securities: pl.DataFrame,
              restrictions: pl.DataFrame, past_purchases: pl.DataFrame, proposed_buys: pl.DataFrame,
              loss_groups: pl.DataFrame, as_of: date, policy: TaxPolicy, min_trade_value: float,
              lot_links: pl.DataFrame | None = None,
              ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Tax-loss harvests: (tlh_candidates, trades, recommendations). A harvest is proposed only
    when nothing would wash its loss and its substitute would not wash another loss of the
    household (one sold in the last 30 days, by today's rebalancing, or by another harvest)."""
    prices = securities.select("symbol", "price")
    eligible = lots.join(accounts.filter(pl.col("harvest_eligible")).select("account_id", "household_id"),
                         on="account_id")
    found = with_terms(harvest_candidates(eligible, prices, policy), as_of)
    # What the rebalance already sells of the lot is harvested by it.
    sold = relieved.group_by("account_id", "lot_id", "lot_part").agg(pl.col("quantity").sum().alias("sold"))
    found = found.join(sold, on=["account_id", "lot_id", "lot_part"], how="left").with_columns(
        pl.col("sold").fill_null(0.0)
    ).join(securities.select("symbol", "wash_group", "asset_class", "tlh_substitute"), on="symbol")
    # IRC §1091: a purchase of the wash group in the household within the 30 days before today
    # (not the purchase that created this lot, Rev. Rul. 56-602), or a buy proposed today,
    # would wash the harvested loss.
    since = as_of - timedelta(days=WASH_WINDOW_DAYS)
    recent = past_purchases.filter(pl.col("trade_date") >= since).select(
        "purchase_id", "household_id", "wash_group", pl.col("account_id").alias("buyer"),
        pl.col("symbol").alias("bought"), "trade_date")
    today = proposed_buys.select("purchase_id", "household_id", "wash_group", pl.col("account_id").alias("buyer"),
                                 pl.col("symbol").alias("bought"), "trade_date")
    if lot_links is not None:
        # The lot's own purchase, by identity: another purchase the same day still washes.
        created = lot_links.select("purchase_id", pl.col("lot_id").alias("_created_lot"), pl.lit(True).alias("_own"))
        own = (pl.col("_own").fill_null(False) & (pl.col("buyer") == pl.col("account_id")))
    else:
        created = None
        own = ((pl.col("buyer") == pl.col("account_id")) & (pl.col("bought") == pl.col("symbol"))
               & (pl.col("trade_date") == pl.col("acquired_date")))
    paired = found.select("account_id", "symbol", "lot_id", "lot_part", "household_id", "wash_group",
                          "acquired_date").join(pl.concat([recent, today]), on=["household_id", "wash_group"])
    if created is not None:
        paired = paired.join(created, left_on=["purchase_id", "lot_id"], right_on=["purchase_id", "_created_lot"],
                             how="left")
    conflicts = (
        paired
        .filter(~own)
        .group_by("account_id", "lot_id", "lot_part")
        .agg(
            pl.format("{} bought in {} on {}", "bought", "buyer", "trade_date").sort().str.join("; ")
            .alias("conflict_reason"),
            (pl.col("trade_date").max() + pl.duration(days=WASH_WINDOW_DAYS + 1)).alias("conflict_clears_on"),
        )
    )
    no_sell = restrictions.filter(pl.col("kind") == "no_sell_symbol").select(
        "account_id", pl.col("value").alias("symbol"), pl.lit(True).alias("no_sell"))
    no_buy = restrictions.filter(pl.col("kind") == "no_buy_symbol").select(
        "account_id", pl.col("value").alias("tlh_substitute"), pl.lit(True).alias("sub_no_buy"))
    shelf = securities.select(pl.col("symbol").alias("tlh_substitute"), pl.col("wash_group").alias("sub_group"),
                              pl.col("asset_class").alias("sub_class"), pl.col("price").alias("sub_price"),
                              pl.col("fractional").alias("sub_fractional"))
    valid_substitute = (
        pl.col("sub_price").is_not_null() & (pl.col("sub_group") != pl.col("wash_group"))
        & (pl.col("sub_class") == pl.col("asset_class"))
    )
    # Every group harvested today is sold at a loss too: a substitute of that group would wash it.
    harvested = found.filter(pl.col("sold") < pl.col("quantity") - 1e-9).select("household_id", "wash_group")
    lost_groups = pl.concat([loss_groups, harvested]).unique().select(
        "household_id", pl.col("wash_group").alias("sub_group"), pl.lit(True).alias("sub_would_wash"))
    candidates = (
        found.join(conflicts, on=["account_id", "lot_id", "lot_part"], how="left")
        .join(no_sell, on=["account_id", "symbol"], how="left")
        .join(shelf, on="tlh_substitute", how="left")
        .join(no_buy, on=["account_id", "tlh_substitute"], how="left")
        .join(lost_groups, on=["household_id", "sub_group"], how="left")
        .with_columns(
            pl.col("conflict_reason").is_not_null().alias("wash_sale_conflict"),
            pl.when(valid_substitute).then(pl.col("tlh_substitute")).otherwise(None).alias("substitute_symbol"),
        )
        .with_columns(
            pl.when(pl.col("sold") >= pl.col("quantity") - 1e-9).then(pl.lit("sold_by_rebalance"))
            .when(pl.col("wash_sale_conflict")).then(pl.lit("wash_sale_conflict"))
            .when(pl.col("no_sell").fill_null(False)).then(pl.lit("no_sell_restriction"))
            .when(pl.col("substitute_symbol").is_null()).then(pl.lit("no_substitute"))
            .when(pl.col("sub_no_buy").fill_null(False)).then(pl.lit("substitute_restricted"))
            .when(pl.col("sub_would_wash").fill_null(False)).then(pl.lit("substitute_would_wash"))
            .otherwise(pl.lit("proposed"))
            .alias("status"),
            (pl.col("quantity") - pl.col("sold")).clip(0).alias("harvest_quantity"),
        )
    )
    # One harvest per position: sell the candidate lots (specific identification), buy the
    # substitute with the proceeds, rounded down (cash absorbs the remainder).
    positions = (
        candidates.filter(pl.col("status") == "proposed")
        .join(prices, on="symbol")
        .group_by("account_id", "symbol", "asset_class", "substitute_symbol", "sub_price", "sub_fractional")
        .agg(pl.col("harvest_quantity").sum().alias("quantity"), pl.col("price").first().alias("price"))
        .with_columns((pl.col("quantity") * pl.col("price")).round(2).alias("proceeds"))
        .with_columns(_units(pl.col("sub_fractional"), policy.fractional_decimals).alias("_u"))
        .with_columns(((pl.col("proceeds") / pl.col("sub_price") * pl.col("_u")).floor() / pl.col("_u")).alias("buy_qty"))
    )
    too_small = positions.filter((pl.col("proceeds") < min_trade_value) | (pl.col("buy_qty") <= 0))
    positions = positions.join(too_small.select("account_id", "symbol"), on=["account_id", "symbol"], how="anti")
    candidates = candidates.join(
        too_small.select("account_id", "symbol", pl.lit(True).alias("_small")), on=["account_id", "symbol"], how="left"
    ).with_columns(
        pl.when(pl.col("_small").fill_null(False) & (pl.col("status") == "proposed"))
        .then(pl.lit("below_minimum_trade")).otherwise(pl.col("status")).alias("status")
    )
    sells = positions.select("account_id", "symbol", "asset_class", pl.lit("sell").alias("side"), "quantity",
                             pl.col("price").alias("est_price"), pl.col("proceeds").alias("est_value"),
                             pl.lit("tlh").alias("reason"))
    # Two positions of an account may share a substitute (e.g. VTI and IWF both into VUG): one buy
    # line per security, as the package, the order ledger and the wash-sale match (one purchase
    # per recommendation, account and security) all expect.
    buys = positions.group_by("account_id", "substitute_symbol", "asset_class", "sub_price").agg(
        pl.col("buy_qty").sum().alias("buy_qty")
    ).select("account_id", pl.col("substitute_symbol").alias("symbol"), "asset_class",
             pl.lit("buy").alias("side"), pl.col("buy_qty").alias("quantity"),
             pl.col("sub_price").alias("est_price"),
             (pl.col("buy_qty") * pl.col("sub_price")).round(2).alias("est_value"),
             pl.lit("substitute").alias("reason"))
    # One harvest recommendation per account, its own (kind harvest), apart from the rebalance.
    trades = pl.concat([sells, buys]).sort("account_id", "side", "symbol").with_columns(
        provisional_key("harvest", "account", pl.col("account_id")).alias(KEY))
    harvested_accounts = trades.group_by("account_id", KEY, maintain_order=True).agg(pl.len().alias("trade_count"))
    recs = harvested_accounts.select(
        KEY, pl.lit("account").alias("scope"), pl.col("account_id").alias("scope_id"), "account_id",
        "trade_count", pl.lit("harvest").alias("kind"), pl.lit(True).alias("inside_bands"),
    )
    candidates = candidates.join(
        harvested_accounts.select("account_id", KEY), on="account_id", how="left"
    ).with_columns(
        pl.when(pl.col("status") == "proposed").then(pl.col(KEY)).otherwise(None).alias(KEY)
    ).select(
        pl.lit(as_of).alias("as_of"), "account_id", "symbol", "lot_id", "lot_part", "quantity",
        "market_value", "cost_basis", "unrealized_loss", pl.col("loss_pct").round(6), "term",
        "wash_sale_conflict", "conflict_reason", "conflict_clears_on", "substitute_symbol", "status",
        "harvest_quantity", KEY,
    ).sort("account_id", "symbol", "lot_id", "lot_part")
    return candidates, trades, recs


def _all_sales(past: PastWashSales, proposed: pl.DataFrame) -> pl.DataFrame:
    columns = [*LOSS_SALES_SCHEMA, ACQUIRED_PURCHASE_IDS]
    earlier = past.loss_sales
    if ACQUIRED_PURCHASE_IDS not in earlier.columns:
        earlier = earlier.with_columns(pl.lit(None, pl.List(pl.String)).alias(ACQUIRED_PURCHASE_IDS))
    return pl.concat([earlier.select(columns), proposed.select(columns)], how="diagonal_relaxed")


def apply_tax_engine(
    trades: pl.DataFrame, recommendations: pl.DataFrame, past: PastWashSales, accounts: pl.DataFrame,
    securities: pl.DataFrame, restrictions: pl.DataFrame, severity: pl.DataFrame, overrides: pl.DataFrame,
    as_of: date, policy: TaxPolicy, min_trade_value: float,
) -> TaxOutcome:
    """Steps 3–5 of the module docstring over the day's proposals (see there).

    trades: recommendation_key, account_id, symbol, asset_class, side, quantity, est_price,
    est_value, reason. recommendations: recommendation_key, scope, scope_id, …. accounts:
    account_id, household_id, account_type, taxable, lot_relief_method, federal_ordinary_rate,
    federal_ltcg_rate, state_rate, harvest_eligible. securities: symbol, asset_class, fractional,
    price, wash_group, tlh_substitute. overrides: account_id, symbol, reason (the advisor keeps a
    buy that washes a loss). severity: recommendation_key, drift_to_band."""
    lots = past.lots
    # Step 3: loss sells of today × purchases (past 30 days and today's buys).
    relieved = _relieve(trades, lots, accounts, as_of)
    loss_groups = _loss_groups(past, _proposed_loss_sales(relieved, accounts, securities, as_of, past.lot_links), as_of)
    # A substitution replaces buys only: the lots the sells relieve stand. It changes the trades,
    # and so the recommendation's id, which is minted from the final trades (not here).
    trades = _substitute_washing_buys(trades, loss_groups, accounts, securities, restrictions, overrides, policy)
    recommendations = recommendations.with_columns(pl.lit("rebalance").alias("kind"))

    # Step 4: harvests, kept apart from rebalancing.
    proposed_buys = _proposed_purchases(trades, accounts, securities, as_of)
    candidates, harvest_trades, harvest_recs = _harvests(
        lots, relieved, accounts, securities, restrictions, past.purchases, proposed_buys, loss_groups, as_of,
        policy, min_trade_value, past.lot_links,
    )
    harvest_relieved = candidates.filter(pl.col("status") == "proposed").join(
        lots.select("account_id", "lot_id", "lot_part", "acquired_date", "holding_from", "quantity", "cost_basis"),
        on=["account_id", "lot_id", "lot_part"], suffix="_lot",
    ).join(securities.select("symbol", "price"), on="symbol").select(
        KEY, "account_id", "symbol", "lot_id", "lot_part",
        pl.lit("specific_id").alias("lot_relief_method"), "acquired_date", "holding_from",
        pl.col("harvest_quantity").alias("quantity"),
        (pl.col("harvest_quantity") * pl.col("price")).round(2).alias("proceeds"),
        (pl.col("cost_basis_lot") * pl.col("harvest_quantity") / pl.col("quantity_lot")).round(2).alias("cost_basis"),
    )
    harvest_relieved = with_terms(harvest_relieved, as_of).with_columns(
        (pl.col("proceeds") - pl.col("cost_basis")).round(2).alias("gain"), pl.lit(True).alias("taxable"))
    all_trades = pl.concat([trades, harvest_trades], how="diagonal_relaxed")
    all_relieved = pl.concat([relieved, harvest_relieved.select(relieved.columns)])

    # Step 5: the final wash-sale match over everything proposed.
    proposed_sales = _proposed_loss_sales(all_relieved, accounts, securities, as_of, past.lot_links)
    proposed_purchases = _proposed_purchases(all_trades, accounts, securities, as_of)
    final = match_wash_sales(
        _all_sales(past, proposed_sales),
        pl.concat([past.purchases.select(list(PURCHASES_SCHEMA)), proposed_purchases.select(list(PURCHASES_SCHEMA))],
                  how="diagonal_relaxed"),
        past.already_replaced,
    )
    per_sale = final.group_by("sale_id").agg(pl.col("disallowed_loss").sum().alias("wash_sale_disallowed"),
                                             pl.col("loss_lost_permanently").any().alias("loss_lost_permanently"))
    disallowed = proposed_sales.join(per_sale, on="sale_id").select(
        KEY, "account_id", "lot_id", "lot_part", "wash_sale_disallowed", "loss_lost_permanently")
    rates = accounts.select("account_id", "taxable", "federal_ordinary_rate", "federal_ltcg_rate", "state_rate")
    per_lot = _from_tax_lots(estimate_lot_tax(_to_tax_lots(all_relieved.drop("taxable")), rates,
                                              _to_tax_lots(disallowed.drop("loss_lost_permanently")))).join(
        disallowed.select(KEY, "account_id", "lot_id", "lot_part", "loss_lost_permanently"),
        on=[KEY, "account_id", "lot_id", "lot_part"], how="left",
    ).with_columns(pl.col("loss_lost_permanently").fill_null(False))
    # A buy that washes a loss (kept by override or for want of a substitute) says so.
    buys_washing = final.filter(pl.col("purchase_id").str.starts_with("B:")).group_by("purchase_id").agg(
        pl.col("disallowed_loss").sum().alias("wash_sale_disallowed"))
    all_trades = all_trades.with_columns(
        pl.format("B:{}:{}:{}", KEY, "account_id", "symbol").alias("purchase_id")
    ).join(buys_washing, on="purchase_id", how="left").with_columns(
        pl.when(pl.col("side") == "buy").then(pl.col("wash_sale_disallowed").fill_null(0.0)).otherwise(0.0)
        .alias("wash_sale_disallowed")
    ).drop("purchase_id")
    # The per-sell figure is the sum over its lots.
    sell_disallowed = per_lot.group_by(KEY, "account_id", "symbol").agg(
        pl.col("wash_sale_disallowed").sum().alias("_sell_disallowed"))
    all_trades = all_trades.join(
        sell_disallowed, on=[KEY, "account_id", "symbol"], how="left"
    ).with_columns(
        pl.when(pl.col("side") == "sell").then(pl.col("_sell_disallowed").fill_null(0.0))
        .otherwise(pl.col("wash_sale_disallowed")).round(2).alias("wash_sale_disallowed")
    ).drop("_sell_disallowed").sort(KEY, "account_id", "side", "symbol")

    recs = pl.concat([recommendations, harvest_recs], how="diagonal_relaxed")
    summary = _summary(all_trades, per_lot, recs, severity, accounts, securities, as_of, policy)
    tax_impact = per_lot.select(
        pl.lit(as_of).alias("as_of"), KEY, "account_id", "symbol", "lot_id", "lot_part",
        "lot_relief_method", "acquired_date", "holding_from", "quantity", "proceeds", "cost_basis", "gain", "term",
        "est_tax", "wash_sale_disallowed", "loss_lost_permanently", "days_to_long_term", "long_term_from",
        "taxable",
    ).sort(KEY, "account_id", "symbol", "lot_id", "lot_part")
    proposed_events = _washed_events(final.filter(pl.col("sale_id").str.starts_with("S:")), proposed_sales, None)
    if proposed_events.height:
        # Which recommendations the ids of today's sales and buys name, for `TaxOutcome.identified`.
        proposed_events = proposed_events.with_columns(pl.lit("proposed").alias("when")).join(
            proposed_sales.select("sale_id", pl.col(KEY).alias(SALE_KEY)), on="sale_id", how="left",
        ).join(proposed_purchases.select("purchase_id", pl.col(KEY).alias(PURCHASE_KEY)), on="purchase_id", how="left")
    wash_events = pl.concat([past.events, proposed_events], how="diagonal_relaxed")
    if wash_events.height:
        wash_events = wash_events.with_columns(pl.lit(as_of).alias("as_of")).sort("when", "sale_id", "purchase_date")
    return TaxOutcome(all_trades, recs, tax_impact, summary, candidates, wash_events)


def _summary(trades: pl.DataFrame, per_lot: pl.DataFrame, recs: pl.DataFrame, severity: pl.DataFrame,
             accounts: pl.DataFrame, securities: pl.DataFrame, as_of: date, policy: TaxPolicy) -> pl.DataFrame:
    """One row per recommendation: values, gains, est_tax (§1222 netting, a net loss valued at its
    term's rate), this year's figures with the §1211(b) limit (est_tax_this_year,
    loss_carryforward, tax_effect_words) and the same for the household over all of today's
    recommendations of its accounts (household_est_tax_this_year, household_loss_carryforward):
    the limit is per taxpayer, so the household figure applies it once, not once per
    recommendation. net_tax_pct is this year's figure over the trade value."""
    values = trades.group_by(KEY).agg(
        pl.col("est_value").sum().round(2).alias("trade_value"),
        pl.col("est_value").filter(pl.col("side") == "sell").sum().round(2).alias("sell_value"),
    )
    # A filing status the feed may one day carry (married filing separately: $1,500, §1211(b)).
    if "capital_loss_limit" in accounts.columns and "capital_loss_limit" not in per_lot.columns:
        per_lot = per_lot.join(accounts.select("account_id", "capital_loss_limit"), on="account_id", how="left")
    gains = net_capital_gains(per_lot, [KEY]) if per_lot.height else pl.DataFrame(schema={KEY: pl.String})
    households = net_capital_gains(
        per_lot.join(accounts.select("account_id", "household_id"), on="account_id", how="left"), ["household_id"]
    ).select("household_id", pl.col("est_tax_this_year").alias("household_est_tax_this_year"),
             pl.col("loss_carryforward").alias("household_loss_carryforward")) if per_lot.height else pl.DataFrame(
        schema={"household_id": pl.String})
    waits = (_from_tax_lots(wait_for_long_term(_to_tax_lots(per_lot), _to_tax_lots(severity), policy))
             if per_lot.height else pl.DataFrame(schema={KEY: pl.String}))
    # After a loss sale, a purchase of the same wash group in any household account within 30
    # days would wash it: the advisor is told which groups and until when.
    watch = per_lot.filter(pl.col("taxable") & (pl.col("gain") < 0)).join(
        securities.select("symbol", "wash_group"), on="symbol").group_by(KEY).agg(
        pl.format("do not buy {} (wash group {}) in any of the household's accounts, IRAs included, through {}",
                  pl.col("symbol"), pl.col("wash_group"), pl.lit(as_of + timedelta(days=WASH_WINDOW_DAYS)))
        .unique().sort().str.join("; ").alias("wash_sale_watch")
    )
    out = recs.select(KEY, "scope", "scope_id", "kind").join(values, on=KEY, how="left")
    for frame in (gains, waits, watch):
        out = out.join(frame, on=KEY, how="left")
    out = out.join(accounts.select(pl.col("account_id").alias("scope_id"), pl.col("household_id").alias("_hh")),
                   on="scope_id", how="left").with_columns(
        pl.when(pl.col("scope") == "household").then(pl.col("scope_id")).otherwise(pl.col("_hh")).alias("household_id")
    ).drop("_hh")
    out = out.join(households, on="household_id", how="left")
    for column, dtype in (("st_gain", pl.Float64), ("lt_gain", pl.Float64), ("realized_loss", pl.Float64),
                          ("wash_sale_disallowed", pl.Float64), ("est_tax", pl.Float64),
                          ("est_tax_this_year", pl.Float64), ("loss_carryforward", pl.Float64),
                          ("household_est_tax_this_year", pl.Float64), ("household_loss_carryforward", pl.Float64),
                          ("wait_for_long_term", pl.Boolean), ("wait_reason", pl.String),
                          ("wait_until", pl.Date), ("tax_saved_by_waiting", pl.Float64),
                          ("wash_sale_watch", pl.String)):
        if column not in out.columns:
            out = out.with_columns(pl.lit(None, dtype).alias(column))
    return out.with_columns(
        pl.lit(as_of).alias("as_of"),
        *(pl.col(c).fill_null(0.0) for c in ("trade_value", "sell_value", "st_gain", "lt_gain", "realized_loss",
                                             "wash_sale_disallowed", "est_tax", "est_tax_this_year",
                                             "loss_carryforward", "household_est_tax_this_year",
                                             "household_loss_carryforward")),
        pl.col("wait_for_long_term").fill_null(False),
    ).with_columns(
        pl.when(pl.col("trade_value") > 0).then((pl.col("est_tax_this_year") / pl.col("trade_value")).round(6))
        .otherwise(0.0).alias("net_tax_pct"),
        # The words every surface shows (core/money.py): a saving is called a saving.
        pl.col("est_tax_this_year").map_elements(tax_effect_words, return_dtype=pl.String).alias("tax_effect_words"),
    ).select(
        "as_of", KEY, "scope", "scope_id", "kind", "trade_value", "sell_value", "st_gain", "lt_gain",
        "realized_loss", "wash_sale_disallowed", "est_tax", "net_tax_pct", "wait_for_long_term", "wait_until",
        "tax_saved_by_waiting", "wait_reason", "wash_sale_watch",
        "est_tax_this_year", "loss_carryforward", "tax_effect_words", "household_id",
        "household_est_tax_this_year", "household_loss_carryforward",
    ).sort(KEY)

