"""Rule 3t: in a taxable account an overweight asset class is sold down by its net excess only,
from the securities whose sale costs the least tax, and nothing is bought in that class.

Shelf: VTI $100, VEA $20, SCHB $25 and QQQ $600 equity ETFs, BND $50 fixed-income ETF, CASH $1. Every
account has a ±5% band per class; minimum trade max($100, 0.1% of the account).

The base account (`_BASE`), $101,030: VTI 600 ($60,000, a big gain: 15 cents of tax per dollar
sold), VEA 500 ($10,000, at a loss: 4 cents saved per dollar), BND 600 ($30,000), $1,030 cash;
model VTI 40% / VEA 20% / BND 40%. Equity is at $70,000 against a target of 60% × 101,030 =
$60,618: $9,382 over. Fixed income wants 40% × 101,030 − 30,000 = $10,412 more.
"""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rebal_pipeline.core.trade_sizing import SizingPolicy, SizingResult, size_trades

SHELF = {  # symbol: (asset_class, fractional, price)
    "VTI": ("equity", False, 100.0),
    "VEA": ("equity", False, 20.0),
    "SCHB": ("equity", False, 25.0),
    "QQQ": ("equity", False, 600.0),
    "BND": ("fixed_income", False, 50.0),
    "CASH": ("cash", True, 1.0),
}
_BASE = {"VTI": 600, "VEA": 500, "BND": 600, "CASH": 1_030}
_MODEL = {"VTI": 0.4, "VEA": 0.2, "BND": 0.4}
_TAX = {"VTI": 0.15, "VEA": -0.04}


class Book:
    def __init__(self) -> None:
        self.holdings: list[dict] = []
        self.targets: list[dict] = []
        self.models: list[dict] = []
        self.restrictions: list[dict] = []
        self.bands: list[dict] = []
        self.tax: list[dict] = []

    def account(self, account_id, positions, *, model=None, targets=None, tax=None, restrictions=()) -> "Book":
        for sym, qty in positions.items():
            cls, _, price = SHELF[sym]
            self.holdings.append(dict(account_id=account_id, symbol=sym, asset_class=cls, quantity=float(qty),
                                      price=price, market_value=qty * price))
        for sym, w in (model or {}).items():
            self.models.append(dict(account_id=account_id, symbol=sym, weight=w))
        if targets is None:
            targets = {}
            for sym, w in (model or {}).items():
                targets[SHELF[sym][0]] = targets.get(SHELF[sym][0], 0.0) + w
        for cls, w in targets.items():
            self.targets.append(dict(account_id=account_id, asset_class=cls, target_weight=w))
        for cls in sorted(set(targets) | {SHELF[s][0] for s in positions}):
            self.bands.append(dict(account_id=account_id, asset_class=cls, band=0.05))
        for kind, value in restrictions:
            self.restrictions.append(dict(account_id=account_id, kind=kind, value=value))
        for sym, t in (tax or {}).items():
            self.tax.append(dict(account_id=account_id, symbol=sym, tax_per_dollar=t))
        return self

    def frames(self) -> dict[str, pl.DataFrame]:
        return dict(
            holdings=pl.DataFrame(self.holdings, schema={
                "account_id": pl.String, "symbol": pl.String, "asset_class": pl.String,
                "quantity": pl.Float64, "price": pl.Float64, "market_value": pl.Float64}),
            class_targets=pl.DataFrame(self.targets, schema={
                "account_id": pl.String, "asset_class": pl.String, "target_weight": pl.Float64}),
            model_weights=pl.DataFrame(self.models, schema={
                "account_id": pl.String, "symbol": pl.String, "weight": pl.Float64}),
            securities=pl.DataFrame(
                [dict(symbol=s, asset_class=c, fractional=f, price=p) for s, (c, f, p) in SHELF.items()],
                schema={"symbol": pl.String, "asset_class": pl.String, "fractional": pl.Boolean, "price": pl.Float64}),
            restrictions=pl.DataFrame(self.restrictions, schema={
                "account_id": pl.String, "kind": pl.String, "value": pl.String}),
            bands=pl.DataFrame(self.bands, schema={"account_id": pl.String, "asset_class": pl.String, "band": pl.Float64}),
        )

    def tax_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.tax, schema={"account_id": pl.String, "symbol": pl.String, "tax_per_dollar": pl.Float64})

    def size(self, *, taxed: bool = True, policy: SizingPolicy = SizingPolicy()) -> SizingResult:
        return size_trades(**self.frames(), policy=policy, sell_tax_cost=self.tax_frame() if taxed else None)


def trades_of(r: SizingResult, account_id: str) -> list[tuple[str, str, float, str]]:
    t = r.trades.filter(pl.col("account_id") == account_id)
    return list(zip(t["side"], t["symbol"], t["quantity"], t["reason"]))


def account_of(r: SizingResult, account_id: str) -> dict:
    (row,) = r.accounts.filter(pl.col("account_id") == account_id).to_dicts()
    return row


def test_overweight_equity_sells_only_the_loss_etf_by_the_class_excess_and_buys_no_equity():
    # Equity $9,382 over: VEA (the loss) sells 9,382 / 20 = 469.1 → 469 shares ($9,380); VTI, far
    # over its own $40,412 target, is not touched and VEA is not bought back up to its $20,206.
    # BND wants $10,412 with $1,030 + $9,380 = $10,410 available → 208.2 → 208 ($10,400); a $2
    # cut is under one minimum trade, so still "rebalance". Cash 1,030 + 9,380 − 10,400 = $10.
    r = Book().account("T", _BASE, model=_MODEL, tax=_TAX).size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 469.0, "rebalance")]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(10.0)
    assert (a["trade_count"], a["dust_dropped"]) == (2, 0)
    # Equity $60,620 of $101,030 = 60.0%, fixed income $40,400 = 40.0%: inside the bands.
    assert a["inside_bands"] is True and a["unresolved"] is None


def test_without_sell_tax_cost_the_same_account_trades_to_the_model_weights():
    # Today's rule: VTI sells to $40,412 → 195.88 → 196 ($19,600); VEA buys $10,206 → 510 ($10,200);
    # BND buys $10,412 → 208 ($10,400). Cash 1,030 + 19,600 − 20,600 = $30. Same BND buy as above.
    r = Book().account("T", _BASE, model=_MODEL, tax=_TAX).size(taxed=False)
    assert trades_of(r, "T") == [
        ("buy", "BND", 208.0, "rebalance"), ("buy", "VEA", 510.0, "rebalance"), ("sell", "VTI", 196.0, "rebalance"),
    ]
    assert account_of(r, "T")["cash_after"] == pytest.approx(30.0)


def test_no_sell_on_the_loss_etf_sells_the_next_cheapest_not_the_big_gain():
    # $101,030: VTI 300 ($30,000, +15%), SCHB 800 at $25 ($20,000, +2%), VEA 1,000 ($20,000, −4%,
    # no-sell), BND 600, $1,030 cash. Equity $9,382 over → SCHB 9,382 / 25 = 375.28 → 375 ($9,375).
    # BND: $1,030 + $9,375 = $10,405 of the $10,412 wanted → 208.1 → 208 ($10,400); cash $5.
    model = {"VTI": 0.3, "SCHB": 0.15, "VEA": 0.15, "BND": 0.4}
    positions = {"VTI": 300, "SCHB": 800, "VEA": 1_000, "BND": 600, "CASH": 1_030}
    tax = {"VTI": 0.15, "SCHB": 0.02, "VEA": -0.04}
    r = Book().account("T", positions, model=model, tax=tax, restrictions=[("no_sell_symbol", "VEA")]).size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "SCHB", 375.0, "rebalance")]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(5.0)
    assert a["inside_bands"] is True and a["unresolved"] is None
    # Without the restriction the loss ETF goes first: 9,382 / 20 → 469 VEA.
    r = Book().account("T", positions, model=model, tax=tax).size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 469.0, "rebalance")]


def test_a_loss_position_too_small_for_the_excess_is_sold_whole_and_the_rest_comes_from_the_next():
    # VTI 660 ($66,000, +15%), VEA 200 ($4,000, −4%): equity $9,382 over. VEA sells all 200 shares
    # ($4,000); the other $5,382 comes from VTI: 53.82 → 54 ($5,400). BND: $1,030 + $9,400 covers
    # the $10,412 → 208 ($10,400); cash 1,030 + 9,400 − 10,400 = $30.
    positions = {"VTI": 660, "VEA": 200, "BND": 600, "CASH": 1_030}
    r = Book().account("T", positions, model=_MODEL, tax=_TAX).size()
    assert trades_of(r, "T") == [
        ("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 200.0, "rebalance"), ("sell", "VTI", 54.0, "rebalance"),
    ]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(30.0)
    assert a["inside_bands"] is True


def test_what_no_sell_holdings_keep_unsold_is_reported_as_a_restriction():
    # VTI 660 (+15%, no-sell), VEA 200 ($4,000, −4%): VEA sells whole (200); the other $5,382 of
    # the excess could only come from VTI, which may not be sold. BND wants $10,412 but has
    # $1,030 + $4,000 = $5,030 → 100 shares ($5,000), cut by more than a minimum trade because a
    # restricted holding could not be sold → "restriction". Equity ends 66,000 / 101,030 = 65.3%.
    positions = {"VTI": 660, "VEA": 200, "BND": 600, "CASH": 1_030}
    r = Book().account("T", positions, model=_MODEL, tax=_TAX, restrictions=[("no_sell_symbol", "VTI")]).size()
    assert trades_of(r, "T") == [("buy", "BND", 100.0, "restriction"), ("sell", "VEA", 200.0, "rebalance")]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(30.0)
    assert a["unresolved"] == (
        "equity at 65.3% vs target 60.0% ±5.0%: VTI no-sell (restriction)"
        " | fixed_income at 34.6% vs target 40.0% ±5.0%: cash shortfall: sales blocked by restriction (VTI)"
        " cannot fund the buys"
    )


def test_the_top_up_never_buys_into_a_class_being_sold_down():
    # Model VTI 30% / SCHB 20% / QQQ 10% / BND 40%; holds VTI 400 ($40,000, +15%), QQQ 50 at $600
    # ($30,000, −5%), no SCHB, BND 600, $1,030 cash. Equity $9,382 over → QQQ 15.64 → 16 shares
    # ($9,600): rounding leaves equity $218 under its target, more than one minimum trade. BND 208
    # ($10,400) leaves $230 of cash, enough for 9 SCHB ($225) — but equity is being sold down, so
    # the top-up buys nothing there (and SCHB, $20,206 under its own target, is not bought either).
    positions = {"VTI": 400, "QQQ": 50, "BND": 600, "CASH": 1_030}
    model = {"VTI": 0.3, "SCHB": 0.2, "QQQ": 0.1, "BND": 0.4}
    r = Book().account("T", positions, model=model, tax={"VTI": 0.15, "QQQ": -0.05}).size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "QQQ", 16.0, "rebalance")]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(230.0)
    assert a["inside_bands"] is True  # equity 60,400 = 59.8%


def test_a_held_security_without_a_row_counts_as_zero_and_ties_go_to_the_larger_holding():
    # Only VTI has a row (+15%); SCHB ($18,000: 720 at $25) and VEA ($22,000: 1,100 at $20) both
    # count as 0.0, so the larger holding, VEA, sells first (before SCHB, which is first by symbol):
    # 9,382 / 20 → 469 VEA ($9,380), BND 208 as in the base case.
    model = {"VTI": 0.3, "SCHB": 0.15, "VEA": 0.15, "BND": 0.4}
    positions = {"VTI": 300, "SCHB": 720, "VEA": 1_100, "BND": 600, "CASH": 1_030}
    r = Book().account("T", positions, model=model, tax={"VTI": 0.15}).size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 469.0, "rebalance")]


def test_the_cash_target_raises_the_class_sell_and_that_sell_is_labelled_cash():
    # VTI 500 ($50,000, +15%), VEA 1,000 ($20,000, −4%), BND 600, $1,030 cash; min_cash_weight 5%:
    # targets scaled by 0.95 → equity 57% × 101,030 = $57,587.10, excess $12,412.90 → VEA 620.6 →
    # 621 ($12,420). The plain excess was $9,382 (469 VEA): $3,030.90 more for cash → "cash".
    # BND 38% = $38,391.40 wants $8,391.40; available 1,030 + 12,420 − 5,051.50 = $8,398.50 →
    # 167.8 → 167 ($8,350). Cash 1,030 + 12,420 − 8,350 = $5,100 ≥ the $5,051.50 target.
    positions = {"VTI": 500, "VEA": 1_000, "BND": 600, "CASH": 1_030}
    r = Book().account("T", positions, model=_MODEL, tax=_TAX, restrictions=[("min_cash_weight", "0.05")]).size()
    assert trades_of(r, "T") == [("buy", "BND", 167.0, "rebalance"), ("sell", "VEA", 621.0, "cash")]
    a = account_of(r, "T")
    assert a["cash_after"] == pytest.approx(5_100.0)
    assert a["cash_after"] >= 0.05 * a["market_value"]
    # Equity 57,580 = 57.0% and fixed income 38,350 = 38.0% are inside their bands; only cash, at
    # 5.05% against a cash-class target of 0%, is outside, for the (pre-existing) floor reason.
    assert a["unresolved"] == (
        "cash at 5.0% vs target 0.0% ±5.0%: cash target of 5.0% (min_cash_weight restriction) is above the cash class target"
    )


def test_class_targets_without_a_model_as_the_household_optimiser_gives_them():
    # No model: equity's $60,618 is split over the holdings by value (6:1): VTI $51,958.29, VEA
    # $8,659.71, so today both ETFs sell: VTI 80.42 → 80 ($8,000), VEA 67.01 → 67 ($1,340), and
    # BND gets $1,030 + $9,340 = $10,370 → 207.4 → 207. With tax rows only the loss ETF sells:
    # 469 VEA and BND 208, as in the base case.
    targets = {"equity": 0.6, "fixed_income": 0.4}
    book = Book().account("T", _BASE, targets=targets, tax=_TAX)
    assert trades_of(book.size(), "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 469.0, "rebalance")]
    assert trades_of(book.size(taxed=False), "T") == [
        ("buy", "BND", 207.0, "rebalance"), ("sell", "VEA", 67.0, "rebalance"), ("sell", "VTI", 80.0, "rebalance"),
    ]


def test_an_underweight_class_keeps_todays_rules_in_a_taxable_account():
    # $96,030: equity $55,000 (VTI $50,000 over its $38,412 target, VEA $5,000 under its $19,206)
    # is under its $57,618: not an overweight class, so today's rules apply as without tax rows:
    # VTI sells 11,588 / 100 → 116, BND (overweight by $1,588) sells 31.76 → 32, and VEA buys
    # $14,206 of the $1,030 + $11,600 + $1,600 = $14,230 available → 710.3 → 710.
    positions = {"VTI": 500, "VEA": 250, "BND": 800, "CASH": 1_030}
    book = Book().account("T", positions, model=_MODEL, tax=_TAX)
    assert_frame_equal(book.size().trades, book.size(taxed=False).trades)
    assert_frame_equal(book.size().accounts, book.size(taxed=False).accounts)
    assert trades_of(book.size(), "T") == [
        ("buy", "VEA", 710.0, "rebalance"), ("sell", "BND", 32.0, "rebalance"), ("sell", "VTI", 116.0, "rebalance"),
    ]


def _two_account_book() -> Book:
    return (
        Book()
        .account("N", _BASE, model=_MODEL)  # no rows: not taxable
        .account("T", _BASE, model=_MODEL, tax=_TAX)
        .account("T2", {"VTI": 660, "VEA": 200, "BND": 600, "CASH": 1_030}, model=_MODEL, tax=_TAX)
    )


def test_accounts_without_rows_are_unaffected_in_the_same_call():
    r = _two_account_book().size()
    assert trades_of(r, "T") == [("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 469.0, "rebalance")]
    assert trades_of(r, "T2") == [
        ("buy", "BND", 208.0, "rebalance"), ("sell", "VEA", 200.0, "rebalance"), ("sell", "VTI", 54.0, "rebalance"),
    ]
    # N is sized exactly as in a call without any tax rows: same trades, same account row.
    alone = Book().account("N", _BASE, model=_MODEL).size(taxed=False)
    assert_frame_equal(r.trades.filter(pl.col("account_id") == "N"), alone.trades)
    assert_frame_equal(r.accounts.filter(pl.col("account_id") == "N"), alone.accounts)


def test_shuffled_input_rows_give_identical_output():
    book = _two_account_book()
    frames = {**book.frames(), "sell_tax_cost": book.tax_frame()}
    policy = SizingPolicy()
    first = size_trades(**frames, policy=policy)
    for seed in (1, 7):
        shuffled = size_trades(**{k: v.sample(fraction=1.0, shuffle=True, seed=seed) for k, v in frames.items()}, policy=policy)
        assert_frame_equal(first.trades, shuffled.trades)
        assert_frame_equal(first.accounts, shuffled.accounts)
    assert first.trades.height == 8  # N 3, T 2, T2 3
