"""Trade sizing: one day's drifted accounts → whole-share trade proposals.

Pure and vectorised: plain functions over polars DataFrames, no Dagster, no DuckDB, and no
per-account Python loop (every step is a join, a group_by or a window `over` the account), so a
book of 100,000 accounts sizes in a few seconds.

    result = size_trades(holdings, class_targets, model_weights, securities, restrictions, bands,
                         SizingPolicy(), sell_tax_cost=None)
    result.trades     # account_id, symbol, asset_class, side, quantity, est_price, est_value, reason
    result.accounts   # account_id, market_value, cash_before, cash_after, trade_count,
                      # dust_dropped, inside_bands, unresolved, compliance_review

The sizing is not the final word on the trades (the tax engine may replace a buy that would wash
a loss), so it mints no recommendation id: core/recommendation_identity.py does, once, from the
final trades.

Only accounts present in `class_targets` are sized (the caller passes just the breached ones).

The rules, in the order they are applied (each is also commented where it is implemented):

1. Security targets. Within each asset class the account's model security weights are scaled to
   the account's class target (target × weight / the model's weight in that class). A class the
   model has no security in (or every class of an IPS-only account) is split over the securities
   the account already holds in that class, by value; if it holds none, the alphabetically first
   symbol of that class among the securities of any model in `model_weights`; if still none the
   class is unreachable and reported. The cash class is split the same way with the symbol CASH
   counted among its securities, and falls back to CASH itself (always reachable).
2. Cash (the symbol CASH, price 1, quantity = dollars) is never traded: it is the balancing item.
   Its target weight = max(CASH's share of the cash-class target, the account's min_cash_weight
   restriction, policy.default_cash_buffer). When that is above what the targets leave for cash,
   every other security target is scaled down by the same factor to make room. A money-market
   fund of the cash class is an ordinary (fractional) security; only CASH counts for the cash
   target, because money-market shares must be sold before they can be spent.
3. Sells first, toward target, never more than held; then buys of underweights with the cash
   available (cash + sell proceeds − cash target), all of an account's buys scaled down by one
   factor when they need more than that; buys round down, so cash never goes negative and never
   ends below its target because of rounding (sells are rounded up instead of to the nearest
   share when nearest rounding would leave cash under its target).
3t. Tax-aware class sells (taxable accounts): `sell_tax_cost` (account_id, symbol,
   tax_per_dollar = estimated tax per dollar of proceeds if the position is sold under the
   account's lot-relief method; negative = a realised loss, i.e. a saving) has rows only for
   taxable accounts; an account without rows is sized exactly as in rule 3. For an account with
   rows, every non-cash class that is not barred (no_asset_class) and whose current value is above
   its target value (its security targets summed, after rule 2's cash scaling and rule 4's
   substitution) is reduced by its net excess only (current − target of the class), sold from the
   class's held securities in ascending tax_per_dollar (a held security without a row counts as
   0.0; ties: larger market value first, then symbol), each up to its whole holding, never a
   no_sell_symbol security (the part of the excess only no-sell holdings could cover is reported
   as blocked by restriction, as in rule 4). Nothing is bought in such a class (rule 6b
   included), and its other securities stay as they are even when over their own targets.
   Underweight classes and cash keep rules 3 and 4. Rules 5, 6, 7 and 9 apply unchanged; for
   rule 8 a tax-preferred sell is "rebalance" unless the cash target enlarged it (the same
   greedy fill of the class excess measured against the unscaled target is the plain sell).
   Duplicate rows for one account and symbol: the largest tax_per_dollar counts; null or NaN
   counts as 0.0.
4. Restrictions: no_sell_symbol → never sold; no_buy_symbol → never bought: the security keeps
   at most what it holds and the rest of its target moves to a substitute of the same class (the
   first allowed of: the account's model securities of the class, then its holdings of the
   class, then the class's securities in any model, then any security of the class in
   `securities`; alphabetical within each tier); no substitute → the money stays in cash and the
   class is reported. no_asset_class (ERISA plan restriction) → nothing of the class is bought or
   sold, and holdings of it are flagged in `compliance_review`.
5. Rounding: fractional = false → whole shares (buys down, sells to the nearest share);
   fractional = true → policy.fractional_decimals (buys down, sells to the nearest unit); a sell
   is never above the held quantity.
6. Minimum trade: a trade whose value is below max(min_trade_value, min_trade_pct × account
   market value) is not proposed ("dust"); `dust_dropped` counts them (every security whose
   wanted trade was at least one cent and was not proposed, including a wanted trade that rounds
   to zero shares).
6b. Top-up: rules 3, 5 and 6 size each security on its own, so in a small account a class's
   shortfall split over several model securities rounds to zero shares or to dust in every one
   of them, and the account stays outside its band with the cash to get inside. So, after the
   minimum-trade filter, while an account still has investable cash (cash after trades − its
   cash target) and a non-cash class short of its target (the sum of its security targets) by at
   least one minimum trade, it buys the allowed security of that class that is most underweight
   against its security target (ties: alphabetical; never a no-buy security, a barred class, a
   security being sold or an unpriced one) in whole shares (fractional units for fractional
   securities): the class's shortfall rounded to the nearest unit (so the class overshoots its
   target by at most half a unit), capped by the investable cash (rounded down, so cash never
   ends under its target). A security whose top-up would be a new trade under the minimum is
   skipped for the next most underweight one; a top-up merged into a proposed buy of the same
   security may be smaller. Classes are served largest shortfall first, those the cash no longer
   covers wait for the next round; there are `_TOPUP_ROUNDS` vectorised rounds. A top-up moves
   every class weight toward its target, so it never pushes a class out of its band.
7. Post-trade asset-class weights are checked against `bands`; a class still outside is listed
   in `unresolved` with the reason in plain words (restriction, no reachable security, cash
   shortfall, cash target, or else rounding and minimum trade size). Nothing is ever violated to
   get inside.
8. Reason on every trade, one rule: "restriction" if a restriction changed the trade (a
   substitute buy for a no-buy security, or a buy cut because restricted holdings could not be
   sold to fund it); otherwise "cash" if the cash target changed it (a sell enlarged to raise the
   cash target, or a buy cut for lack of cash); otherwise "rebalance". A change counts only when
   it is at least one minimum trade, so rounding noise never relabels a trade (except a sell
   rounded up to protect the cash target, which is "cash"). A rule-6b top-up merged into a
   proposed buy keeps that buy's reason; a top-up that is a trade of its own is "rebalance".
9. Determinism: intermediate frames are sorted before every floating-point aggregation, and
   outputs are sorted by (account_id, side, symbol).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rebal_pipeline.core.frames import conform
from rebal_pipeline.core.recommendation_identity import QUANTITY_DECIMALS

CASH_SYMBOL = "CASH"
CASH_CLASS = "cash"

_KEY = ["account_id", "symbol"]
_CLASS_KEY = ["account_id", "asset_class"]
# Tolerance for comparing weights computed in floating point (e.g. 0.6 × 0.6 / 0.6).
_EPS = 1e-9
# Column shorthands shared by the rules (polars expressions are immutable, so sharing is safe).
_MV = pl.col("market_value")
_PRICE = pl.col("price")
# Window over one account: `.over(**_PER_ACCT)`.
_PER_ACCT = {"partition_by": "account_id"}
# A security's target before rule 2's cash scaling (tw / f): rules 3t and 8 measure against it.
_UNSCALED_TW = pl.when(pl.col("f") > 0).then(pl.col("tw") / pl.col("f")).otherwise(0.0)
# Rule 6b: rounds of the top-up pass (a round serves each short class of every account once).
_TOPUP_ROUNDS = 2

TRADES_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "symbol": pl.String(),
    "asset_class": pl.String(),
    "side": pl.String(),
    "quantity": pl.Float64(),
    "est_price": pl.Float64(),
    "est_value": pl.Float64(),
    "reason": pl.String(),
}
ACCOUNTS_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "market_value": pl.Float64(),
    "cash_before": pl.Float64(),
    "cash_after": pl.Float64(),
    "trade_count": pl.Int64(),
    "dust_dropped": pl.Int64(),
    "inside_bands": pl.Boolean(),
    "unresolved": pl.String(),
    "compliance_review": pl.String(),
}

_INPUTS: dict[str, dict[str, pl.DataType]] = {
    "holdings": {
        "account_id": pl.String(),
        "symbol": pl.String(),
        "asset_class": pl.String(),
        "quantity": pl.Float64(),
        "price": pl.Float64(),
        "market_value": pl.Float64(),
    },
    "class_targets": {"account_id": pl.String(), "asset_class": pl.String(), "target_weight": pl.Float64()},
    "model_weights": {"account_id": pl.String(), "symbol": pl.String(), "weight": pl.Float64()},
    "securities": {"symbol": pl.String(), "asset_class": pl.String(), "fractional": pl.Boolean(), "price": pl.Float64()},
    "restrictions": {"account_id": pl.String(), "kind": pl.String(), "value": pl.String()},
    "bands": {"account_id": pl.String(), "asset_class": pl.String(), "band": pl.Float64()},
    "sell_tax_cost": {"account_id": pl.String(), "symbol": pl.String(), "tax_per_dollar": pl.Float64()},
}


@dataclass(frozen=True)
class SizingPolicy:
    min_trade_value: float = 100.0  # dollars
    min_trade_pct: float = 0.001  # of the account's market value; the larger of the two applies
    default_cash_buffer: float = 0.0  # minimum cash weight when the account has no min_cash_weight
    fractional_decimals: int = 3  # share decimals for securities with fractional = true

    def __post_init__(self) -> None:
        if self.min_trade_value < 0:
            raise ValueError("min_trade_value must be >= 0")
        if not 0 <= self.min_trade_pct < 1:
            raise ValueError("min_trade_pct must be in [0, 1)")
        if not 0 <= self.default_cash_buffer < 1:
            raise ValueError("default_cash_buffer must be in [0, 1)")
        # No finer than the recommendation id writes quantities: two quantities must never
        # share an id's text.
        if not 0 <= self.fractional_decimals <= QUANTITY_DECIMALS:
            raise ValueError(f"fractional_decimals must be in [0, {QUANTITY_DECIMALS}]")


@dataclass(frozen=True)
class SizingResult:
    trades: pl.DataFrame
    accounts: pl.DataFrame


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _frame(df: pl.DataFrame, name: str) -> pl.DataFrame:
    return conform(df, _INPUTS[name], name)


def _flag(df: pl.DataFrame, name: str) -> pl.DataFrame:
    return df.unique().with_columns(pl.lit(True).alias(name))


def _pct(x: pl.Expr) -> pl.Expr:
    """A weight as text with one decimal of a percent, e.g. 0.7 → "70.0%" (integer arithmetic,
    so the text does not depend on float formatting)."""
    tenths = (x * 1000).round(0).cast(pl.Int64)
    mag = tenths.abs()
    return pl.concat_str(
        pl.when(tenths < 0).then(pl.lit("-")).otherwise(pl.lit("")),
        (mag // 10).cast(pl.String),
        pl.lit("."),
        (mag % 10).cast(pl.String),
        pl.lit("%"),
    )


# --------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------


def _top_up_round(u: pl.DataFrame) -> pl.DataFrame:
    """One vectorised round of rule 6b over every account of the universe `u` (sorted by
    account_id, symbol): adds this round's top-up quantities to `topup_q`."""
    price = pl.col("price")
    unit = pl.col("unit")
    target_v = pl.col("tw") * pl.col("market_value")
    bought_v = ((pl.col("buy_q_main") + pl.col("topup_q")) * price).fill_null(0.0)
    x = u.with_columns(
        bought_v=bought_v,
        post=pl.col("cv") - (pl.col("sell_q_final") * price).fill_null(0.0) + bought_v,
    ).with_columns(
        # Investable cash: what is left above the cash target after every trade so far.
        left=pl.col("cash_before") + pl.col("proceeds") - pl.col("bought_v").sum().over("account_id") - pl.col("cash_target_v"),
        class_short=(target_v.sum() - pl.col("post").sum()).over(_CLASS_KEY),
        sec_short=target_v - pl.col("post"),
    )
    picks = (
        # A class short by less than one minimum trade is rounding noise, not a top-up.
        x.filter(pl.col("topup_ok") & (pl.col("left") > 0.005) & (pl.col("class_short") >= pl.col("threshold") - 1e-6))
        .with_columns(
            q=pl.min_horizontal(
                # The class shortfall to the nearest unit: overshoots by at most half a unit ...
                (pl.col("class_short") / price * unit + 0.5).floor() / unit,
                # ... and never more than the investable cash (rounded down).
                (pl.col("left") / price * unit + _EPS).floor() / unit,
            )
        )
        .filter(
            (pl.col("q") > 0)
            # Rule 6: a top-up that is a trade of its own must reach the minimum trade; merged into
            # a proposed buy it may be smaller.
            & ((pl.col("buy_q_main") > 0) | ((pl.col("topup_q") + pl.col("q")) * price >= pl.col("threshold") - 1e-6))
        )
        # Cents, so float noise never breaks a tie (ties go alphabetical).
        .with_columns(sec_c=(pl.col("sec_short") * 100).round(0), cls_c=(pl.col("class_short") * 100).round(0))
        .sort(["account_id", "asset_class", "sec_c", "symbol"], descending=[False, False, True, False])
        .group_by(_CLASS_KEY, maintain_order=True)
        .agg(pl.col("symbol", "q", "price", "left", "cls_c").first())
        # Largest shortfall first; a class the remaining cash does not cover waits for next round.
        .sort(["account_id", "cls_c", "asset_class"], descending=[False, True, False])
        .with_columns(spent=(pl.col("q") * pl.col("price")).cum_sum().over("account_id"))
        .filter(pl.col("spent") <= pl.col("left") + 1e-6)
        .select("account_id", "symbol", add_q="q")
    )
    return (
        u.join(picks, on=_KEY, how="left")
        .with_columns(topup_q=pl.col("topup_q") + pl.col("add_q").fill_null(0.0))
        .drop("add_q")
        .sort(_KEY)
    )


@dataclass(frozen=True)
class _Book:
    """The inputs of one sizing run, cleaned, restricted to the accounts being sized and keyed
    (built by `_prepare_inputs`)."""

    ct: pl.DataFrame  # account_id, asset_class, target_weight (one row per class, summed)
    accounts: pl.DataFrame  # account_id of every account to size
    sec: pl.DataFrame  # the securities shelf, one row per symbol
    priced: pl.DataFrame  # symbol of every security with a price above 0
    hv: pl.DataFrame  # holdings of the accounts, one row per account and symbol (CASH is class cash)
    held: pl.DataFrame  # account_id, symbol, asset_class, market_value of positions worth more than 0
    no_buy: pl.DataFrame  # account_id, symbol, no_buy (no_buy_symbol restrictions)
    no_sell: pl.DataFrame  # account_id, symbol, no_sell (no_sell_symbol restrictions)
    barred: pl.DataFrame  # account_id, asset_class, barred (no_asset_class restrictions)
    stc: pl.DataFrame  # account_id, symbol, tax (rule 3t tax per dollar of proceeds)
    taxable: pl.DataFrame  # account_id, taxable (an account with any sell_tax_cost row)
    min_cash: pl.DataFrame  # account_id, min_cash (min_cash_weight restriction)
    mw: pl.DataFrame  # the accounts' model weights > 0 with asset_class, one row per account and symbol
    model_symbols: pl.DataFrame  # symbol, asset_class of every non-cash security of any model
    model_first: pl.DataFrame  # asset_class, first_symbol (rule 1 last fallback)


def _prepare_inputs(
    holdings: pl.DataFrame,
    class_targets: pl.DataFrame,
    model_weights: pl.DataFrame,
    securities: pl.DataFrame,
    restrictions: pl.DataFrame,
    sell_tax_cost: pl.DataFrame | None,
) -> _Book:
    """Set-up: check the input frames against their contracts and turn them into the keyed
    frames every rule works on (class targets summed per class, holdings one row per account
    and symbol, restrictions as flags, the rule-3t tax rate per position, model securities with
    their class). Why: each rule then joins on clean keys and never re-derives an input; only
    the accounts in `class_targets` are kept, so nothing else is sized."""
    ct = (
        _frame(class_targets, "class_targets")
        .group_by(_CLASS_KEY)
        .agg(pl.col("target_weight").sum())
        .sort(_CLASS_KEY)
    )
    accounts = ct.select("account_id").unique().sort("account_id")

    sec = (
        _frame(securities, "securities")
        .unique(subset="symbol", keep="first", maintain_order=True)
        .sort("symbol")
    )
    priced = sec.filter(pl.col("price") > 0).select("symbol")

    hv = (
        _frame(holdings, "holdings")
        .join(accounts, on="account_id", how="semi")
        .with_columns(
            asset_class=pl.when(pl.col("symbol") == CASH_SYMBOL).then(pl.lit(CASH_CLASS)).otherwise(pl.col("asset_class"))
        )
        .sort(_KEY)
        .group_by(_KEY, maintain_order=True)
        .agg(
            pl.col("asset_class").first(),
            pl.col("quantity").sum(),
            pl.col("price").first(),
            pl.col("market_value").sum(),
        )
    )
    held = hv.filter(pl.col("market_value") > 0).select("account_id", "symbol", "asset_class", "market_value")

    r = (
        _frame(restrictions, "restrictions")
        .with_columns(pl.col("value").str.strip_chars())
        .join(accounts, on="account_id", how="semi")
    )
    no_buy = _flag(r.filter(pl.col("kind") == "no_buy_symbol").select("account_id", symbol="value"), "no_buy")
    no_sell = _flag(r.filter(pl.col("kind") == "no_sell_symbol").select("account_id", symbol="value"), "no_sell")
    barred = _flag(r.filter(pl.col("kind") == "no_asset_class").select("account_id", asset_class="value"), "barred")
    # Rule 3t input: one tax rate per (account, symbol); an account with any row is taxable.
    stc = (
        _frame(
            sell_tax_cost if sell_tax_cost is not None else pl.DataFrame(schema=_INPUTS["sell_tax_cost"]),
            "sell_tax_cost",
        )
        .join(accounts, on="account_id", how="semi")
        .with_columns(pl.col("tax_per_dollar").fill_nan(None).fill_null(0.0))
        .group_by(_KEY)
        .agg(tax=pl.col("tax_per_dollar").max())
        .sort(_KEY)
    )
    taxable = _flag(stc.select("account_id"), "taxable")
    # A min_cash_weight that is not a number fails loudly (strict cast): a compliance restriction
    # is never silently ignored.
    min_cash = (
        r.filter(pl.col("kind") == "min_cash_weight")
        .group_by("account_id")
        .agg(min_cash=pl.col("value").cast(pl.Float64).max())
    )

    # Model securities with their asset class (from `securities`; CASH is always class cash). A
    # model symbol unknown to `securities` cannot be priced or classed and is left out: its class
    # then falls through to the rule-1 fallbacks.
    mw_all = (
        _frame(model_weights, "model_weights")
        .join(sec.select("symbol", "asset_class"), on="symbol", how="left")
        .with_columns(
            asset_class=pl.when(pl.col("symbol") == CASH_SYMBOL).then(pl.lit(CASH_CLASS)).otherwise(pl.col("asset_class"))
        )
        .filter(pl.col("asset_class").is_not_null())
    )
    mw = (
        mw_all.join(accounts, on="account_id", how="semi")
        .filter(pl.col("weight") > 0)
        .sort(_KEY)
        .group_by(_KEY, maintain_order=True)
        .agg(pl.col("asset_class").first(), pl.col("weight").sum())
    )
    model_symbols = mw_all.filter(pl.col("symbol") != CASH_SYMBOL).select("symbol", "asset_class").unique().sort("symbol")
    # Rule 1, last fallback: the alphabetically first symbol of the class among the securities of
    # any model (deterministic). For the cash class it is CASH itself: cash is always reachable.
    model_first = pl.concat(
        [
            model_symbols.filter(pl.col("asset_class") != CASH_CLASS)
            .group_by("asset_class")
            .agg(first_symbol=pl.col("symbol").min()),
            pl.DataFrame({"asset_class": [CASH_CLASS], "first_symbol": [CASH_SYMBOL]}),
        ]
    )
    return _Book(
        ct=ct,
        accounts=accounts,
        sec=sec,
        priced=priced,
        hv=hv,
        held=held,
        no_buy=no_buy,
        no_sell=no_sell,
        barred=barred,
        stc=stc,
        taxable=taxable,
        min_cash=min_cash,
        mw=mw,
        model_symbols=model_symbols,
        model_first=model_first,
    )


def _security_targets(
    ct: pl.DataFrame, mw: pl.DataFrame, held: pl.DataFrame, model_first: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rule 1: security-level targets `tw0` (before the cash target), and the classes no
    security can reach.

    The model's security weights are scaled to the account's class target (target × weight /
    the model's weight in that class), so an IPS that overrides the model's class weights still
    uses the model's securities inside each class. A class without a model security is split
    over what the account already holds there, by value (no needless switching); failing that,
    the alphabetically first symbol of the class in any model (`model_first`, CASH for cash);
    failing that the class is unreachable.

    Returns (targets: account_id, symbol, asset_class, tw0; unreachable: account_id,
    asset_class, unreachable)."""
    model_t = (
        mw.join(ct, on=_CLASS_KEY, how="inner")
        .sort(_KEY)
        .with_columns(tw0=pl.col("target_weight") * pl.col("weight") / pl.col("weight").sum().over(_CLASS_KEY))
        .select("account_id", "symbol", "asset_class", "tw0")
    )
    need = ct.filter(pl.col("target_weight") > 0).join(model_t.select(_CLASS_KEY).unique(), on=_CLASS_KEY, how="anti")
    # No model security in the class: keep what the account already holds there, in proportion
    # to value (no needless switching of securities).
    held_t = (
        need.join(held, on=_CLASS_KEY, how="inner")
        .sort(_KEY)
        .with_columns(
            tw0=pl.col("target_weight") * pl.col("market_value") / pl.col("market_value").sum().over(_CLASS_KEY)
        )
        .select("account_id", "symbol", "asset_class", "tw0")
    )
    need2 = need.join(held_t.select(_CLASS_KEY).unique(), on=_CLASS_KEY, how="anti")
    any_t = need2.join(model_first, on="asset_class", how="inner").select(
        "account_id", symbol="first_symbol", asset_class="asset_class", tw0="target_weight"
    )
    unreachable = _flag(need2.join(model_first, on="asset_class", how="anti").select(_CLASS_KEY), "unreachable")
    targets = (
        pl.concat([model_t, held_t, any_t])
        .sort(_KEY)
        .group_by(_KEY, maintain_order=True)
        .agg(pl.col("asset_class").first(), pl.col("tw0").sum())
    )
    return targets, unreachable


def _cash_target(
    accounts: pl.DataFrame,
    hv: pl.DataFrame,
    targets: pl.DataFrame,
    min_cash: pl.DataFrame,
    ct: pl.DataFrame,
    policy: SizingPolicy,
) -> pl.DataFrame:
    """Rule 2: each account's cash target and the room it needs, one row per account.

    CASH is never traded: it is the balancing item. Its target weight `cash_target_w` =
    max(CASH's share of the cash-class target, the min_cash_weight restriction,
    policy.default_cash_buffer), clipped to [0, 1]. When that is above what the security
    targets leave for cash, every non-cash target is scaled down by one factor `f` (never up:
    money that cannot be invested stays in cash). Also carries the account's market value,
    cash_before, the cash target in dollars and the rule-6 minimum trade `threshold`
    (the larger of min_trade_value and min_trade_pct × market value)."""
    acct = (
        accounts.join(
            hv.group_by("account_id").agg(
                market_value=pl.col("market_value").sum(),
                cash_before=pl.col("market_value").filter(pl.col("symbol") == CASH_SYMBOL).sum(),
            ),
            on="account_id",
            how="left",
        )
        .join(
            targets.filter(pl.col("symbol") == CASH_SYMBOL).select("account_id", tw0_cash="tw0"),
            on="account_id",
            how="left",
        )
        .join(
            targets.filter(pl.col("symbol") != CASH_SYMBOL).group_by("account_id").agg(noncash_w=pl.col("tw0").sum()),
            on="account_id",
            how="left",
        )
        .join(min_cash, on="account_id", how="left")
        .join(
            ct.filter(pl.col("asset_class") == CASH_CLASS).select("account_id", cash_class_target="target_weight"),
            on="account_id",
            how="left",
        )
        .with_columns(pl.col("market_value", "cash_before", "tw0_cash", "noncash_w", "cash_class_target").fill_null(0.0))
        .with_columns(
            cash_target_w=pl.max_horizontal(
                pl.col("tw0_cash"), pl.col("min_cash").fill_null(0.0), pl.lit(float(policy.default_cash_buffer))
            ).clip(0.0, 1.0)
        )
        .with_columns(
            # Scale every non-cash target down by one factor when the cash target needs more room
            # than the targets leave for cash (never scale up: unreachable money stays in cash).
            f=pl.when(
                (pl.col("noncash_w") > 0) & (pl.col("noncash_w") > 1.0 - pl.col("cash_target_w") + _EPS)
            )
            .then((1.0 - pl.col("cash_target_w")) / pl.col("noncash_w"))
            .otherwise(1.0),
            cash_target_v=pl.col("cash_target_w") * pl.col("market_value"),
            # Rule 6: the larger of the dollar and the percentage minimum applies.
            threshold=pl.max_horizontal(
                pl.lit(float(policy.min_trade_value)), pl.lit(float(policy.min_trade_pct)) * pl.col("market_value")
            ),
        )
        .sort("account_id")
    )
    return acct


def _no_buy_substitutes(book: _Book, targets: pl.DataFrame, acct: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rule 4 (no_buy_symbol): the final security targets `tw` after rule 2's scaling, with the
    part of a no-buy security's target above what it holds moved to a substitute.

    Why: a no-buy security may be kept but not added to, yet the class still needs its money.
    The substitute is the first allowed (not no-buy, priced, not CASH) of: the account's model
    securities of the class, its holdings of the class, the class's securities in any model,
    any security of the class on the shelf; alphabetical within each tier. In the cash class
    the unbought part simply stays in CASH. A barred class is left alone (rule 4
    no_asset_class). CASH itself is not in the result (rule 2 handles it).

    Returns (final_t: account_id, symbol, asset_class, tw, sub_w = the weight a substitute
    received; nobuy_unsub: account_id, asset_class, nobuy_syms for classes without a
    substitute, whose money stays in cash)."""
    hv, no_buy, barred, mw, held, model_symbols, sec, priced = (
        book.hv, book.no_buy, book.barred, book.mw, book.held, book.model_symbols, book.sec, book.priced,
    )
    t2 = (
        targets.filter(pl.col("symbol") != CASH_SYMBOL)
        .join(acct.select("account_id", "f", "market_value"), on="account_id", how="left")
        .join(hv.select("account_id", "symbol", cv="market_value"), on=_KEY, how="left")
        .join(no_buy, on=_KEY, how="left")
        .join(barred, on=_CLASS_KEY, how="left")
        .with_columns(pl.col("cv").fill_null(0.0), pl.col("no_buy", "barred").fill_null(False))
        .sort(_KEY)
        .with_columns(
            tw=pl.col("tw0") * pl.col("f"),
            cur_w=pl.when(pl.col("market_value") > 0)
            .then(pl.col("cv") / pl.col("market_value"))
            .otherwise(0.0),
        )
        .with_columns(
            short_w=pl.when(pl.col("no_buy") & ~pl.col("barred") & (pl.col("tw") > pl.col("cur_w") + _EPS))
            .then(pl.col("tw") - pl.col("cur_w"))
            .otherwise(0.0)
        )
        .with_columns(tw=pl.col("tw") - pl.col("short_w"))
    )
    # In the cash class the unbought part simply stays in CASH (same class): no substitute needed.
    pairs = (
        t2.filter((pl.col("short_w") > 0) & (pl.col("asset_class") != CASH_CLASS))
        .group_by(_CLASS_KEY, maintain_order=True)
        .agg(pl.col("short_w").sum(), restricted=pl.col("symbol").sort().str.join(", "))
        .sort(_CLASS_KEY)
    )
    # Substitute candidates in order of preference: 1 the account's own model securities of the
    # class, 2 its holdings of the class, 3 the class's securities in any model, 4 any security
    # of the class on the shelf (`securities`); alphabetical within a tier. Never a no-buy one.
    cand_cols = ["account_id", "asset_class", "symbol", "tier"]
    candidates = (
        pl.concat(
            [
                pairs.join(mw.select("account_id", "symbol", "asset_class"), on=_CLASS_KEY).with_columns(tier=pl.lit(1)).select(cand_cols),
                pairs.join(held.select("account_id", "symbol", "asset_class"), on=_CLASS_KEY).with_columns(tier=pl.lit(2)).select(cand_cols),
                pairs.join(model_symbols, on="asset_class").with_columns(tier=pl.lit(3)).select(cand_cols),
                pairs.join(sec.select("symbol", "asset_class"), on="asset_class").with_columns(tier=pl.lit(4)).select(cand_cols),
            ]
        )
        .filter(pl.col("symbol") != CASH_SYMBOL)
        .join(no_buy.select(_KEY), on=_KEY, how="anti")
        .join(priced, on="symbol", how="semi")
    )
    subs = (
        candidates.sort(["account_id", "asset_class", "tier", "symbol"])
        .group_by(_CLASS_KEY, maintain_order=True)
        .agg(sub_symbol=pl.col("symbol").first())
    )
    sub_rows = pairs.join(subs, on=_CLASS_KEY, how="inner").select(
        "account_id", symbol="sub_symbol", asset_class="asset_class", tw="short_w", sub_w="short_w"
    )
    nobuy_unsub = pairs.join(subs, on=_CLASS_KEY, how="anti").select(
        "account_id", "asset_class", nobuy_syms="restricted"
    )
    final_t = (
        pl.concat(
            [
                t2.select("account_id", "symbol", "asset_class", "tw", sub_w=pl.lit(0.0)),
                sub_rows,
            ]
        )
        .sort(_KEY)
        .group_by(_KEY, maintain_order=True)
        .agg(pl.col("asset_class").first(), pl.col("tw").sum(), pl.col("sub_w").sum())
    )
    return final_t, nobuy_unsub


def _universe(book: _Book, final_t: pl.DataFrame, acct: pl.DataFrame, policy: SizingPolicy) -> pl.DataFrame:
    """The universe the trade rules work on: one row per (account, non-cash security) with a
    target or a holding, carrying its class, price, share unit (rule 5: 1, or 10^decimals for a
    fractional security), held quantity and value `cv`, target `tw`, the dollar gap `diff` to
    target, the account's rule-2 figures, the rule-4 restriction flags and `tradable`.

    Why one frame: every later rule is then a column expression or a window over the account,
    never a per-account loop. A barred class is frozen (no trade either way); so is anything
    unpriced, and an account without market value has nothing to rebalance."""
    hv, sec, no_buy, no_sell, barred = book.hv, book.sec, book.no_buy, book.no_sell, book.barred
    u = (
        final_t.join(
            hv.filter(pl.col("symbol") != CASH_SYMBOL).select(
                "account_id", "symbol", h_class="asset_class", quantity="quantity", h_price="price", cv="market_value"
            ),
            on=_KEY,
            how="full",
            coalesce=True,
        )
        .join(
            sec.select("symbol", s_class="asset_class", s_price="price", fractional="fractional"),
            on="symbol",
            how="left",
        )
        .with_columns(
            asset_class=pl.coalesce("asset_class", "h_class", "s_class"),
            price=pl.coalesce("s_price", "h_price"),
            fractional=pl.col("fractional").fill_null(False),
            quantity=pl.col("quantity").fill_null(0.0),
            cv=pl.col("cv").fill_null(0.0),
            tw=pl.col("tw").fill_null(0.0),
            sub_w=pl.col("sub_w").fill_null(0.0),
        )
        .drop("h_class", "s_class", "h_price", "s_price")
        .join(
            acct.select("account_id", "market_value", "cash_before", "cash_target_v", "threshold", "f"),
            on="account_id",
            how="left",
        )
        .join(no_buy, on=_KEY, how="left")
        .join(no_sell, on=_KEY, how="left")
        .join(barred, on=_CLASS_KEY, how="left")
        .with_columns(pl.col("no_buy", "no_sell", "barred").fill_null(False))
        .sort(_KEY)
    )

    mv = _MV
    price = _PRICE
    # Share units: 1 for whole shares, 10^decimals for fractional securities.
    unit = pl.when(pl.col("fractional")).then(pl.lit(10.0 ** policy.fractional_decimals)).otherwise(pl.lit(1.0))

    u = u.with_columns(
        unit=unit,
        diff=pl.col("tw") * mv - pl.col("cv"),
        # A barred class is frozen (no trade either way); so is anything unpriced, and an account
        # without market value has nothing to rebalance.
        tradable=(price > 0).fill_null(False) & (mv > 0) & ~pl.col("barred"),
    )
    return u


def _tax_aware_class_sells(u: pl.DataFrame, taxable: pl.DataFrame, stc: pl.DataFrame) -> pl.DataFrame:
    """Rule 3t: in a taxable account (one with `sell_tax_cost` rows) an overweight class sells
    its net excess only, cheapest tax first.

    Why: selling every overweight security back to its own model weight realises gains on
    positions that merely drifted inside a class, and buying the class's underweights with the
    proceeds is a round trip that costs tax for no change in the asset mix. The bands are on
    classes, so a taxable account only needs the class back to its target: sell the class's
    net excess (current − target of the class) from the positions whose sale costs the least
    tax (losses first; ties: larger holding, then symbol), each up to its whole holding, and buy
    nothing in the class. Adds to `u`: taxable, tax, class_cv, class_tv, class_tv0, tax_class
    (the class is sold down this way), held_v, sellable, tax_sell_v (the dollars to sell) and
    tax_plain_v (the same fill against the target before the cash scaling, for rule 8). An
    account without rows gets tax_class = false and is sized by rule 3 as before."""
    mv = _MV
    unscaled_tw = _UNSCALED_TW
    u = (
        u.join(taxable, on="account_id", how="left")
        .join(stc, on=_KEY, how="left")
        .with_columns(pl.col("taxable").fill_null(False), pl.col("tax").fill_null(0.0))
        .sort(_KEY)
        .with_columns(
            class_cv=pl.col("cv").sum().over(_CLASS_KEY),
            class_tv=(pl.col("tw") * mv).sum().over(_CLASS_KEY),
            class_tv0=(unscaled_tw * mv).sum().over(_CLASS_KEY),
        )
        .with_columns(
            tax_class=(
                pl.col("taxable")
                & (pl.col("asset_class") != CASH_CLASS)
                & ~pl.col("barred")
                & (mv > 0)
                & (pl.col("class_cv") - pl.col("class_tv") > 0.005)
            ),
            held_v=pl.col("cv").clip(lower_bound=0.0),
            sellable=pl.col("tradable") & ~pl.col("no_sell") & (pl.col("quantity") > 0),
        )
    )
    # Greedy fill, vectorised: within each such class, securities in sale order (those that may
    # be sold first; then cheapest tax, larger holding, symbol); each sells what of the excess is
    # left after the ones before it (a running sum), at most its holding. A no-sell or unpriced
    # holding comes last, so its "wanted" sell is only the part nothing else could cover (and a
    # no-sell one is then reported as blocked by restriction, rules 4 and 7).
    fill = (
        u.filter(pl.col("tax_class") & (pl.col("held_v") > 0))
        .sort(
            ["account_id", "asset_class", "sellable", "tax", "held_v", "symbol"],
            descending=[False, False, True, False, True, False],
        )
        .with_columns(before=pl.col("held_v").cum_sum().over(_CLASS_KEY) - pl.col("held_v"))
        .select(
            "account_id",
            "symbol",
            tax_sell_v=pl.min_horizontal(pl.col("held_v"), pl.col("class_cv") - pl.col("class_tv") - pl.col("before"))
            .clip(lower_bound=0.0),
            # Rule 8: the same fill of the excess over the target before the cash scaling is the
            # plain (tax-preferred, "rebalance") sell; anything above it was for the cash target.
            tax_plain_v=pl.min_horizontal(pl.col("held_v"), pl.col("class_cv") - pl.col("class_tv0") - pl.col("before"))
            .clip(lower_bound=0.0),
        )
    )
    u = (
        u.join(fill, on=_KEY, how="left")
        .with_columns(pl.col("tax_sell_v", "tax_plain_v").fill_null(0.0))
        .sort(_KEY)
    )
    return u


def _sells(u: pl.DataFrame) -> pl.DataFrame:
    """Rules 3, 4, 5 and 6 for sells: sell overweights toward target first, never more than held.

    The wanted sell is the rule-3t class fill where it applies, else the overweight (at most the
    holding). A no-sell security or a barred class sells nothing (its wanted sell is recorded as
    `blocked_sell_v` for rules 7 and 8). Sells round to the nearest unit, capped at the held
    quantity, except that an account whose cash would end under its target rounds its sells up
    instead (`ceil_changed` marks a sell that grew for it). A sell below the minimum trade is
    dust. Why sells first: their proceeds fund the buys. Adds want_sell_v, sell_blocked,
    blocked_sell_v, sell_raw_q, sell_q_near, sell_q_up, use_ceil, sell_q, ceil_changed,
    sell_keep, sell_q_final, sell_dust and the account's `proceeds`."""
    price, per_acct = _PRICE, _PER_ACCT
    u = u.with_columns(
        # Sell overweights toward target, never more than held.
        want_sell_v=pl.when(pl.col("tax_class"))
        .then(pl.col("tax_sell_v"))  # rule 3t
        .when(pl.col("diff") < 0)
        .then(pl.min_horizontal(-pl.col("diff"), pl.col("cv")))
        .otherwise(0.0)
        .clip(lower_bound=0.0),
        sell_blocked=~pl.col("tradable") | pl.col("no_sell"),
    ).with_columns(
        # The part of the wanted sell that a restriction (no-sell, barred class) blocks.
        blocked_sell_v=pl.when(pl.col("no_sell") | pl.col("barred")).then(pl.col("want_sell_v")).otherwise(0.0),
        sell_raw_q=pl.when(pl.col("sell_blocked")).then(0.0).otherwise(pl.col("want_sell_v") / price),
    ).with_columns(
        # Rule 5: sells round to the nearest unit, never above the held quantity.
        sell_q_near=pl.min_horizontal(
            (pl.col("sell_raw_q") * pl.col("unit") + 0.5).floor() / pl.col("unit"), pl.col("quantity")
        ).clip(lower_bound=0.0),
        sell_q_up=pl.min_horizontal(
            (pl.col("sell_raw_q") * pl.col("unit") - _EPS).ceil() / pl.col("unit"), pl.col("quantity")
        ).clip(lower_bound=0.0),
    ).with_columns(
        # Rule 3: if nearest rounding would leave cash under its target, round this account's
        # sells up instead (at most one more unit each, still capped at the holding).
        use_ceil=(
            pl.col("cash_before") + (pl.col("sell_q_near") * price).fill_null(0.0).sum().over(**per_acct)
            < pl.col("cash_target_v") - 0.005
        )
    ).with_columns(
        sell_q=pl.when(pl.col("use_ceil")).then(pl.col("sell_q_up")).otherwise(pl.col("sell_q_near")),
    ).with_columns(
        ceil_changed=pl.col("use_ceil") & (pl.col("sell_q") > pl.col("sell_q_near")),
        # Rule 6: drop dust sells.
        sell_keep=(pl.col("sell_q") > 0) & (pl.col("sell_q") * price >= pl.col("threshold") - 1e-6),
    ).with_columns(
        sell_q_final=pl.when(pl.col("sell_keep")).then(pl.col("sell_q")).otherwise(0.0),
        sell_dust=(pl.col("sell_raw_q") * price >= 0.01) & ~pl.col("sell_keep"),
    ).with_columns(
        proceeds=(pl.col("sell_q_final") * price).fill_null(0.0).sum().over(**per_acct),
    )
    return u


def _buys(u: pl.DataFrame) -> pl.DataFrame:
    """Rules 3, 5 and 6 for buys: buy underweights with the cash available, scaled to it.

    The cash available is cash + sell proceeds − the cash target; when an account's wanted buys
    (never a no-buy security, a barred or unpriced one, or a class rule 3t is selling down) need
    more, every buy is cut by one factor. Buys round down to the unit so cash never goes under
    its target; a buy below the minimum trade is dust. `buys_cut` (rule 8) counts only a cut of
    at least one minimum trade, so rounding noise is not a cash decision; `blocked_any` marks an
    account whose restricted holdings could not be sold. Adds want_buy_v, total_want, avail,
    scale, buy_raw_v, buy_q, buy_keep, buy_q_final, buy_dust, buys_cut, blocked_any."""
    price, per_acct = _PRICE, _PER_ACCT
    u = u.with_columns(
        # Rule 3t: nothing is bought in a class a taxable account is selling down.
        want_buy_v=pl.when(pl.col("tradable") & ~pl.col("no_buy") & ~pl.col("tax_class") & (pl.col("diff") > 0))
        .then(pl.col("diff"))
        .otherwise(0.0),
    ).with_columns(
        total_want=pl.col("want_buy_v").sum().over(**per_acct),
        avail=pl.col("cash_before") + pl.col("proceeds") - pl.col("cash_target_v"),
    ).with_columns(
        # One scale factor per account: every buy is cut in the same proportion.
        scale=pl.when(pl.col("total_want") > 0)
        .then((pl.col("avail") / pl.col("total_want")).clip(0.0, 1.0))
        .otherwise(0.0),
    ).with_columns(
        buy_raw_v=pl.col("want_buy_v") * pl.col("scale"),
    ).with_columns(
        # Rule 5: buys round down (whole shares or fractional units), so they never overspend.
        buy_q=((pl.col("buy_raw_v") / price * pl.col("unit") + _EPS).floor() / pl.col("unit")).fill_null(0.0),
    ).with_columns(
        buy_keep=(pl.col("buy_q") > 0) & (pl.col("buy_q") * price >= pl.col("threshold") - 1e-6),
    ).with_columns(
        buy_q_final=pl.when(pl.col("buy_keep")).then(pl.col("buy_q")).otherwise(0.0),
        buy_dust=(pl.col("buy_raw_v") >= 0.01) & ~pl.col("buy_keep"),
        # A cut of less than one minimum trade is rounding noise, not a cash decision.
        buys_cut=(pl.col("total_want") - pl.col("avail") >= pl.col("threshold")) & (pl.col("total_want") > 0),
        blocked_any=pl.col("blocked_sell_v").sum().over(**per_acct) > 0.005,
    )
    return u


def _top_up(u: pl.DataFrame) -> pl.DataFrame:
    """Rule 6b: top up with the cash that rounding and the minimum trade left over.

    Why: without this a small account whose class shortfall is split over several securities
    ends outside its band with the cash to get inside: each security's own buy is under one share
    or under the minimum trade. The whole class shortfall goes to one security per round instead
    (`_top_up_round`, `_TOPUP_ROUNDS` vectorised rounds), never a no-buy, barred, unpriced or
    cash-class security, one being sold, or one in a class rule 3t sells down. The top-up is
    merged into the proposed buy (`buy_q_final`, re-rounded to the unit); `buy_q_main` keeps the
    buy before it and `topup_q` the top-up; a security the top-up bought is no longer dust."""
    u = u.with_columns(
        buy_q_main=pl.col("buy_q_final"),
        topup_q=pl.lit(0.0),
        topup_ok=(
            pl.col("tradable")
            & ~pl.col("no_buy")
            & (pl.col("tw") > 0)
            & (pl.col("asset_class") != CASH_CLASS)  # a money-market buy leaves the cash class as it is
            & (pl.col("sell_q_final") == 0)  # never buy and sell the same security
            & ~pl.col("tax_class")  # rule 3t: never buy into a class being sold down
        ),
    )
    for _ in range(_TOPUP_ROUNDS):
        u = _top_up_round(u)
    u = u.with_columns(
        # One row per account/symbol/side: the top-up is merged into the proposed buy (re-rounded to
        # the unit so float noise of the sum never reaches the quantity, nor the recommendation id).
        buy_q_final=((pl.col("buy_q_main") + pl.col("topup_q")) * pl.col("unit")).round(0) / pl.col("unit"),
    ).with_columns(
        buy_q_final=pl.col("buy_q_final").fill_null(0.0),
        # A security the top-up bought is proposed after all: it is no longer dust.
        buy_dust=pl.col("buy_dust") & ~(pl.col("topup_q") > 0),
    )
    return u


def _trade_reasons(u: pl.DataFrame) -> pl.DataFrame:
    """Rule 8: one reason per trade, and each security's value after the trades (`post_v`).

    "restriction" if a restriction changed the trade (a substitute buy for a no-buy security, or
    a buy cut because restricted holdings could not be sold to fund it); otherwise "cash" if the
    cash target changed it (a sell enlarged to raise the cash target, or rounded up to protect
    it; a buy cut for lack of cash); otherwise "rebalance". Why the minimum-trade test: a change
    counts only when it is at least one minimum trade, so rounding noise never relabels a trade.
    A top-up of its own is "rebalance"; one merged into a buy keeps that buy's reason. Adds
    sell_reason, buy_reason and post_v."""
    mv, price, unscaled_tw = _MV, _PRICE, _UNSCALED_TW
    # The ordinary overweight, measured against the target before the cash-target scaling (for a
    # rule-3t class: that security's share of the class excess over the unscaled target).
    ordinary_sell_v = (
        pl.when(pl.col("tax_class"))
        .then(pl.col("tax_plain_v"))
        .otherwise((pl.col("cv") - unscaled_tw * mv).clip(lower_bound=0.0))
    )
    u = u.with_columns(
        sell_reason=pl.when(
            pl.col("ceil_changed")
            | ((pl.col("f") < 1.0 - _EPS) & (pl.col("want_sell_v") - ordinary_sell_v >= pl.col("threshold")))
        )
        .then(pl.lit("cash"))
        .otherwise(pl.lit("rebalance")),
        # Rule 6b: a top-up of its own (no proposed buy to merge into) is "rebalance".
        buy_reason=pl.when((pl.col("buy_q_main") == 0) & (pl.col("topup_q") > 0))
        .then(pl.lit("rebalance"))
        .when((pl.col("sub_w") > _EPS) | (pl.col("buys_cut") & pl.col("blocked_any")))
        .then(pl.lit("restriction"))
        .when(pl.col("buys_cut"))
        .then(pl.lit("cash"))
        .otherwise(pl.lit("rebalance")),
        post_v=pl.col("cv") - (pl.col("sell_q_final") * price).fill_null(0.0) + (pl.col("buy_q_final") * price).fill_null(0.0),
    )
    return u


def _trade_rows(u: pl.DataFrame) -> pl.DataFrame:
    """The proposed trades of the universe: one row per account, symbol and side with a quantity
    above 0 (account_id, symbol, asset_class, side, quantity, est_price, est_value, reason),
    sorted by (account_id, side, symbol) so the output is deterministic (rule 9)."""
    price = _PRICE
    trades = pl.concat(
        [
            u.filter(pl.col(f"{side}_q_final") > 0).select(
                "account_id",
                "symbol",
                "asset_class",
                side=pl.lit(side),
                quantity=f"{side}_q_final",
                est_price="price",
                est_value=pl.col(f"{side}_q_final") * price,
                reason=f"{side}_reason",
            )
            for side in ("sell", "buy")
        ]
    ).sort(["account_id", "side", "symbol"])
    return trades


def _account_totals(acct: pl.DataFrame, u: pl.DataFrame) -> pl.DataFrame:
    """Account totals after the trades: `acct` (rule 2) with proceeds, buy_cost, trade_count,
    dust_dropped (rule 6), buys_cut, blocked_any, blocked_syms (rules 7 and 8) and cash_after.
    Why the rounding of cash_after: cents-level float noise of the buy rounding would otherwise
    show as a non-zero or negative-zero cash balance."""
    price = _PRICE
    acct_u = u.group_by("account_id", maintain_order=True).agg(
        proceeds=pl.col("proceeds").first(),
        buy_cost=(pl.col("buy_q_final") * price).fill_null(0.0).sum(),
        trade_count=((pl.col("sell_q_final") > 0).cast(pl.Int64) + (pl.col("buy_q_final") > 0).cast(pl.Int64)).sum(),
        dust_dropped=(pl.col("sell_dust").cast(pl.Int64) + pl.col("buy_dust").cast(pl.Int64)).sum(),
        buys_cut=pl.col("buys_cut").first(),
        blocked_any=pl.col("blocked_any").first(),
        blocked_syms=pl.col("symbol").filter(pl.col("blocked_sell_v") > 0.005).sort().str.join(", "),
    )
    acct = (
        acct.join(acct_u, on="account_id", how="left")
        .with_columns(
            pl.col("proceeds", "buy_cost").fill_null(0.0),
            pl.col("trade_count", "dust_dropped").fill_null(0),
            pl.col("buys_cut", "blocked_any").fill_null(False),
        )
        .with_columns(
            # Cents-level float noise of the buy rounding is cleared (+ 0.0 turns -0.0 into 0.0).
            cash_after=(pl.col("cash_before") + pl.col("proceeds") - pl.col("buy_cost")).round(6) + 0.0,
        )
        .sort("account_id")
    )
    return acct


def _band_check(
    u: pl.DataFrame,
    acct: pl.DataFrame,
    ct: pl.DataFrame,
    bands: pl.DataFrame,
    barred: pl.DataFrame,
    unreachable: pl.DataFrame,
    nobuy_unsub: pl.DataFrame,
) -> pl.DataFrame:
    """Rule 7: post-trade asset-class weights against the bands; account_id → `unresolved`, one
    row per account with a class still outside its band.

    Why: nothing is ever violated to get inside a band, so the advisor must be told which class
    is still outside and why, in plain words (every cause that applies: barred class, no
    reachable security, no-buy without substitute, no-sell, cash shortfall, cash target; else
    whole-share rounding and the minimum trade size). A class without a band row is held to the
    account's tightest band; an account without any band row to 0 (strict). `acct` must carry
    the account totals (cash_after, buys_cut, blocked_any, blocked_syms)."""
    cls = _with_bands_and_causes(_post_trade_classes(u, acct, ct), acct, bands, barred, unreachable, nobuy_unsub)
    return _unresolved_text(cls.filter(pl.col("breach")))


def _post_trade_classes(u: pl.DataFrame, acct: pl.DataFrame, ct: pl.DataFrame) -> pl.DataFrame:
    """Rule 7, step 1: each account's asset classes (cash included) before and after the trades,
    with their targets: account_id, asset_class, post_v, pre_v, nosell_syms, target_weight."""
    return (
        pl.concat(
            [
                u.select(
                    "account_id",
                    "asset_class",
                    "post_v",
                    pre_v="cv",
                    nosell_sym=pl.when(pl.col("no_sell") & (pl.col("blocked_sell_v") > 0.005)).then(pl.col("symbol")),
                ),
                acct.select(
                    "account_id",
                    asset_class=pl.lit(CASH_CLASS),
                    post_v="cash_after",
                    pre_v="cash_before",
                    nosell_sym=pl.lit(None, dtype=pl.String),
                ),
            ]
        )
        .sort(_CLASS_KEY)
        .group_by(_CLASS_KEY, maintain_order=True)
        .agg(
            pl.col("post_v").sum(),
            pl.col("pre_v").sum(),
            nosell_syms=pl.col("nosell_sym").drop_nulls().sort().str.join(", "),
        )
        .join(ct, on=_CLASS_KEY, how="full", coalesce=True)
        .with_columns(pl.col("post_v", "pre_v", "target_weight").fill_null(0.0))
        .filter((pl.col("target_weight") > 0) | (pl.col("post_v").abs() > 0.005) | (pl.col("pre_v").abs() > 0.005))
    )


def _with_bands_and_causes(cls: pl.DataFrame, acct: pl.DataFrame, bands: pl.DataFrame, barred: pl.DataFrame,
                           unreachable: pl.DataFrame, nobuy_unsub: pl.DataFrame) -> pl.DataFrame:
    """Rule 7, step 2: each class's band, post-trade weight, whether it breaches, and the flags
    that explain a breach (barred, unreachable, no-buy, cash shortfall, cash target)."""
    bands_f = _frame(bands, "bands").group_by(_CLASS_KEY).agg(pl.col("band").min())
    # A class without a band row (e.g. a class held but not targeted) is held to the account's
    # tightest band; an account without any band row to 0 (strict).
    min_band = bands_f.group_by("account_id").agg(min_band=pl.col("band").min())
    return (
        cls.join(bands_f, on=_CLASS_KEY, how="left")
        .join(min_band, on="account_id", how="left")
        .join(barred, on=_CLASS_KEY, how="left")
        .join(unreachable, on=_CLASS_KEY, how="left")
        .join(nobuy_unsub, on=_CLASS_KEY, how="left")
        .join(
            acct.select(
                "account_id", "market_value", "buys_cut", "blocked_any", "blocked_syms", "cash_target_w", "tw0_cash", "min_cash"
            ),
            on="account_id",
            how="left",
        )
        .with_columns(
            band=pl.coalesce("band", "min_band", pl.lit(0.0)),
            barred=pl.col("barred").fill_null(False),
            unreachable=pl.col("unreachable").fill_null(False),
            post_w=pl.when(pl.col("market_value") > 0).then(pl.col("post_v") / pl.col("market_value")).otherwise(0.0),
        )
        .with_columns(
            breach=(pl.col("post_w") - pl.col("target_weight")).abs() > pl.col("band") + _EPS,
            under=pl.col("post_w") < pl.col("target_weight"),
            is_cash=pl.col("asset_class") == CASH_CLASS,
            blocked_in=pl.col("barred") | pl.col("unreachable") | pl.col("nobuy_syms").is_not_null(),
        )
        .with_columns(
            # Money meant for a class that cannot be bought stays in cash.
            uninvestable=pl.when(pl.col("blocked_in") & pl.col("under"))
            .then(pl.col("asset_class"))
            .otherwise(None)
            .drop_nulls()
            .sort()
            .str.join(", ")
            .over("account_id"),
        )
    )


def _unresolved_reasons() -> pl.Expr:
    """Rule 7, step 3: why a class is still outside its band, in plain words (every cause that applies)."""
    cash_shortfall = pl.when(pl.col("blocked_any")).then(
        pl.concat_str(pl.lit("cash shortfall: sales blocked by restriction ("), pl.col("blocked_syms"), pl.lit(") cannot fund the buys"))
    ).otherwise(pl.lit("cash shortfall: not enough cash to fund the buys"))
    cash_floor_raised = pl.col("cash_target_w") > pl.col("tw0_cash") + _EPS
    floor_text = pl.concat_str(
        pl.lit("cash target of "),
        _pct(pl.col("cash_target_w")),
        pl.when(pl.col("min_cash").is_not_null() & (pl.col("min_cash") >= pl.col("cash_target_w") - _EPS))
        .then(pl.lit(" (min_cash_weight restriction)"))
        .otherwise(pl.lit(" (policy cash buffer)")),
    )
    return pl.concat_str(
        [
            pl.when(pl.col("barred")).then(
                pl.concat_str(
                    pl.lit("barred by the plan restriction (no_asset_class "),
                    pl.col("asset_class"),
                    pl.lit("): nothing of it may be bought or sold"),
                )
            ),
            pl.when(pl.col("unreachable") & pl.col("under")).then(
                pl.lit("no reachable security: none in the account's model, none held, none in any model")
            ),
            pl.when(pl.col("nobuy_syms").is_not_null() & pl.col("under")).then(
                pl.concat_str(
                    pl.col("nobuy_syms"),
                    pl.lit(" no-buy (restriction) and no other "),
                    pl.col("asset_class"),
                    pl.lit(" security may be bought"),
                )
            ),
            pl.when(pl.col("nosell_syms").is_not_null() & (pl.col("nosell_syms") != "") & ~pl.col("under")).then(
                pl.concat_str(pl.col("nosell_syms"), pl.lit(" no-sell (restriction)"))
            ),
            pl.when(~pl.col("is_cash") & pl.col("under") & pl.col("buys_cut") & ~pl.col("blocked_in")).then(cash_shortfall),
            pl.when(~pl.col("is_cash") & pl.col("under") & ~pl.col("buys_cut") & cash_floor_raised).then(
                pl.concat_str(pl.lit("money held back for the "), floor_text)
            ),
            pl.when(pl.col("is_cash") & ~pl.col("under") & (pl.col("uninvestable") != "")).then(
                pl.concat_str(pl.lit("money meant for "), pl.col("uninvestable"), pl.lit(" cannot be invested and stays in cash"))
            ),
            pl.when(pl.col("is_cash") & ~pl.col("under") & cash_floor_raised).then(
                pl.concat_str(floor_text, pl.lit(" is above the cash class target"))
            ),
            pl.when(pl.col("is_cash") & pl.col("under") & pl.col("blocked_any")).then(
                pl.concat_str(pl.lit("sales blocked by restriction ("), pl.col("blocked_syms"), pl.lit(") cannot raise the cash target"))
            ),
        ],
        separator="; ",
        ignore_nulls=True,
    )


def _unresolved_text(breached: pl.DataFrame) -> pl.DataFrame:
    """Rule 7, step 4: account_id → `unresolved`, one line per class still outside its band."""
    return (
        breached
        .with_columns(reasons=_unresolved_reasons())
        .with_columns(
            reasons=pl.when(pl.col("reasons").is_null() | (pl.col("reasons") == ""))
            .then(pl.lit("whole-share rounding and the minimum trade size"))
            .otherwise(pl.col("reasons"))
        )
        .select(
            "account_id",
            "asset_class",
            text=pl.concat_str(
                pl.col("asset_class"),
                pl.lit(" at "),
                _pct(pl.col("post_w")),
                pl.lit(" vs target "),
                _pct(pl.col("target_weight")),
                pl.lit(" ±"),
                _pct(pl.col("band")),
                pl.lit(": "),
                pl.col("reasons"),
            ),
        )
        .sort(_CLASS_KEY)
        .group_by("account_id", maintain_order=True)
        .agg(unresolved=pl.col("text").str.join(" | "))
    )


def _compliance_review(hv: pl.DataFrame, barred: pl.DataFrame) -> pl.DataFrame:
    """Rule 4 (no_asset_class): account_id → `compliance_review`, naming every holding of a
    barred class. Why: an ERISA plan restriction bars the class, so rule 4 trades none of it and
    the holding must be reviewed with compliance instead of silently left."""
    compliance = (
        hv.filter((pl.col("symbol") != CASH_SYMBOL) & ((pl.col("quantity") != 0) | (pl.col("market_value") != 0)))
        .join(barred, on=_CLASS_KEY, how="semi")
        .sort(_KEY)
        .group_by(_CLASS_KEY, maintain_order=True)
        .agg(syms=pl.col("symbol").str.join(", "))
        .sort(_CLASS_KEY)
        .select(
            "account_id",
            text=pl.concat_str(
                pl.lit("holds "),
                pl.col("asset_class"),
                pl.lit(" ("),
                pl.col("syms"),
                pl.lit("), barred by ERISA plan restriction (no_asset_class): no trade proposed, review with compliance"),
            ),
        )
        .group_by("account_id", maintain_order=True)
        .agg(compliance_review=pl.col("text").str.join("; "))
    )
    return compliance


def size_trades(
    holdings: pl.DataFrame,
    class_targets: pl.DataFrame,
    model_weights: pl.DataFrame,
    securities: pl.DataFrame,
    restrictions: pl.DataFrame,
    bands: pl.DataFrame,
    policy: SizingPolicy = SizingPolicy(),
    *,
    sell_tax_cost: pl.DataFrame | None = None,
) -> SizingResult:
    """Size whole-share trades for every account in `class_targets`. See the module docstring.
    `sell_tax_cost` (account_id, symbol, tax_per_dollar; rows only for taxable accounts) turns
    on rule 3t for the accounts it has rows for."""
    book = _prepare_inputs(holdings, class_targets, model_weights, securities, restrictions, sell_tax_cost)
    targets, unreachable = _security_targets(book.ct, book.mw, book.held, book.model_first)  # rule 1
    acct = _cash_target(book.accounts, book.hv, targets, book.min_cash, book.ct, policy)  # rule 2
    final_t, nobuy_unsub = _no_buy_substitutes(book, targets, acct)  # rule 4 (no-buy)
    u = _universe(book, final_t, acct, policy)
    u = _tax_aware_class_sells(u, book.taxable, book.stc)  # rule 3t
    u = _sells(u)  # rules 3, 4, 5, 6
    u = _buys(u)  # rules 3, 5, 6
    u = _top_up(u)  # rule 6b
    u = _trade_reasons(u)  # rule 8
    trades = _trade_rows(u)
    acct = _account_totals(acct, u)
    breached = _band_check(u, acct, book.ct, bands, book.barred, unreachable, nobuy_unsub)  # rule 7
    compliance = _compliance_review(book.hv, book.barred)  # rule 4 (no_asset_class)

    trades = trades.select(list(TRADES_SCHEMA)).cast(TRADES_SCHEMA)
    accounts_out = (
        acct.join(breached, on="account_id", how="left")
        .join(compliance, on="account_id", how="left")
        .with_columns(
            unresolved=pl.when(pl.col("market_value") <= 0)
            .then(pl.lit("account has no market value to rebalance"))
            .otherwise(pl.col("unresolved")),
        )
        .with_columns(inside_bands=pl.col("unresolved").is_null())
        .select(list(ACCOUNTS_SCHEMA))
        .cast(ACCOUNTS_SCHEMA)
        .sort("account_id")
    )
    return SizingResult(trades=trades, accounts=accounts_out)
