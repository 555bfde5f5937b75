"""Trade sizing on small books whose numbers are worked out by hand.

Shelf (unless a test says otherwise): VTI $100 equity ETF, VEA $20 equity ETF, BND $50 and IEF $100
fixed-income ETFs, VNQ $100 alternatives ETF, CASH $1. Every account has a ±5% band per class.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rebal_pipeline.core.trade_sizing import (
    ACCOUNTS_SCHEMA,
    TRADES_SCHEMA,
    SizingPolicy,
    SizingResult,
    size_trades,
)

# symbol: (asset_class, security_type, fractional, price)
SHELF: dict[str, tuple[str, str, bool, float]] = {
    "VTI": ("equity", "etf", False, 100.0),
    "VEA": ("equity", "etf", False, 20.0),
    "BND": ("fixed_income", "etf", False, 50.0),
    "IEF": ("fixed_income", "etf", False, 100.0),
    "VNQ": ("alternatives", "etf", False, 100.0),
    "CASH": ("cash", "cash", True, 1.0),
}
M6040 = {"VTI": 0.6, "BND": 0.4}


class Book:
    """Builds the six input frames of `size_trades` for a few hand-made accounts."""

    def __init__(self, **securities: tuple[str, str, bool, float]) -> None:
        self.sec = {**SHELF, **securities}
        self.holdings: list[dict] = []
        self.targets: list[dict] = []
        self.models: list[dict] = []
        self.restrictions: list[dict] = []
        self.bands: list[dict] = []

    def without(self, *symbols: str) -> "Book":
        for s in symbols:
            self.sec.pop(s)
        return self

    def account(self, account_id, positions, *, model=None, targets=None, restrictions=(), band=0.05, sized=True) -> "Book":
        for sym, qty in positions.items():
            cls, _, _, price = self.sec[sym]
            self.holdings.append(
                dict(account_id=account_id, symbol=sym, asset_class=cls, quantity=float(qty), price=price, market_value=qty * price)
            )
        for sym, w in (model or {}).items():
            self.models.append(dict(account_id=account_id, symbol=sym, weight=w))
        if targets is None:  # the model rolled up to asset classes
            targets = {}
            for sym, w in (model or {}).items():
                targets[self.sec[sym][0]] = targets.get(self.sec[sym][0], 0.0) + w
        if sized:
            for cls, w in targets.items():
                self.targets.append(dict(account_id=account_id, asset_class=cls, target_weight=w))
        for cls in sorted(set(targets) | {self.sec[s][0] for s in positions}):
            self.bands.append(dict(account_id=account_id, asset_class=cls, band=band))
        for kind, value in restrictions:
            self.restrictions.append(dict(account_id=account_id, kind=kind, value=value))
        return self

    def frames(self) -> dict[str, pl.DataFrame]:
        return dict(
            holdings=pl.DataFrame(
                self.holdings,
                schema={"account_id": pl.String, "symbol": pl.String, "asset_class": pl.String,
                        "quantity": pl.Float64, "price": pl.Float64, "market_value": pl.Float64},
            ),
            class_targets=pl.DataFrame(
                self.targets, schema={"account_id": pl.String, "asset_class": pl.String, "target_weight": pl.Float64}
            ),
            model_weights=pl.DataFrame(
                self.models, schema={"account_id": pl.String, "symbol": pl.String, "weight": pl.Float64}
            ),
            securities=pl.DataFrame(
                [dict(symbol=s, asset_class=c, security_type=t, fractional=f, price=p) for s, (c, t, f, p) in self.sec.items()],
                schema={"symbol": pl.String, "asset_class": pl.String, "security_type": pl.String,
                        "fractional": pl.Boolean, "price": pl.Float64},
            ),
            restrictions=pl.DataFrame(
                self.restrictions, schema={"account_id": pl.String, "kind": pl.String, "value": pl.String}
            ),
            bands=pl.DataFrame(self.bands, schema={"account_id": pl.String, "asset_class": pl.String, "band": pl.Float64}),
        )

    def size(self, policy: SizingPolicy = SizingPolicy()) -> SizingResult:
        return size_trades(**self.frames(), policy=policy)


def trades_of(result: SizingResult, account_id: str) -> list[tuple[str, str, float, str]]:
    t = result.trades.filter(pl.col("account_id") == account_id)
    return list(zip(t["side"], t["symbol"], t["quantity"], t["reason"]))


def account_of(result: SizingResult, account_id: str) -> dict:
    rows = result.accounts.filter(pl.col("account_id") == account_id).to_dicts()
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------------------------------------
# The plain case
# ---------------------------------------------------------------------------------------------


def test_60_40_account_drifted_to_70_30_sells_100_vti_buys_200_bnd():
    # $100,000: 700 VTI ($70,000) + 600 BND ($30,000), no cash; model 60/40.
    r = Book().account("A", {"VTI": 700, "BND": 600}, model=M6040).size()
    assert trades_of(r, "A") == [("buy", "BND", 200.0, "rebalance"), ("sell", "VTI", 100.0, "rebalance")]
    assert r.trades["est_value"].to_list() == [10_000.0, 10_000.0]
    assert r.trades["est_price"].to_list() == [50.0, 100.0]
    a = account_of(r, "A")
    assert a["market_value"] == 100_000.0
    assert (a["cash_before"], a["cash_after"]) == (0.0, 0.0)
    assert (a["trade_count"], a["dust_dropped"]) == (2, 0)
    assert a["inside_bands"] is True and a["unresolved"] is None and a["compliance_review"] is None
    assert r.trades.schema == pl.Schema(TRADES_SCHEMA) and r.accounts.schema == pl.Schema(ACCOUNTS_SCHEMA)


def test_only_accounts_in_class_targets_are_sized():
    r = (
        Book()
        .account("A", {"VTI": 700, "BND": 600}, model=M6040)
        .account("NOT-BREACHED", {"VTI": 700, "BND": 600}, model=M6040, sized=False)
        .size()
    )
    assert r.accounts["account_id"].to_list() == ["A"]
    assert set(r.trades["account_id"]) == {"A"}


# ---------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------


def test_fractional_fund_buys_to_three_decimals_while_the_etf_rounds_down():
    # $100,000 all cash into 60% VTI at $237.19 and 40% VBTLX at $10.37 (fractional mutual fund):
    # VTI 60,000 / 237.19 = 252.96 → 252 shares ($59,771.88);
    # VBTLX 40,000 / 10.37 = 3,857.2806… → 3,857.280 shares ($39,999.9936); cash left $228.1264.
    book = Book(VTI=("equity", "etf", False, 237.19), VBTLX=("fixed_income", "mutual_fund", True, 10.37))
    r = book.account("A", {"CASH": 100_000}, model={"VTI": 0.6, "VBTLX": 0.4}).size()
    assert trades_of(r, "A") == [("buy", "VBTLX", 3857.28, "rebalance"), ("buy", "VTI", 252.0, "rebalance")]
    a = account_of(r, "A")
    assert a["cash_after"] == pytest.approx(228.1264, abs=1e-6)
    assert a["cash_after"] >= 0


def test_sells_round_to_the_nearest_share_and_buys_round_down():
    # $100,030: 800 VTI at $80 ($64,000), 720 BND ($36,000), $30 cash; model 60/40.
    # VTI target 60,018 → sell 3,982 = 49.775 shares → 50 ($4,000).
    # BND target 40,012 → buy 4,012 = 80.24 shares → 80 ($4,000); cash 30 + 4,000 − 4,000 = 30.
    book = Book(VTI=("equity", "etf", False, 80.0))
    r = book.account("A", {"VTI": 800, "BND": 720, "CASH": 30}, model=M6040).size()
    assert trades_of(r, "A") == [("buy", "BND", 80.0, "rebalance"), ("sell", "VTI", 50.0, "rebalance")]
    assert account_of(r, "A")["cash_after"] == pytest.approx(30.0)


# ---------------------------------------------------------------------------------------------
# Minimum trade
# ---------------------------------------------------------------------------------------------


def _dust_book() -> Book:
    # $20,000: 126 VTI ($12,600), 129 BND ($6,450), 47 VEA at $20 ($940), $10 cash.
    # Model 60% VTI / 35% BND / 5% VEA → sell 6 VTI ($600), buy 11 BND ($550), buy 3 VEA ($60).
    return Book().account("A", {"VTI": 126, "BND": 129, "VEA": 47, "CASH": 10}, model={"VTI": 0.6, "BND": 0.35, "VEA": 0.05})


def test_a_60_dollar_trade_on_a_20000_account_is_dust():
    # Minimum = max($100, 0.1% × $20,000 = $20) = $100: the $60 VEA buy is dropped and counted.
    r = _dust_book().size()
    assert trades_of(r, "A") == [("buy", "BND", 11.0, "rebalance"), ("sell", "VTI", 6.0, "rebalance")]
    a = account_of(r, "A")
    assert (a["trade_count"], a["dust_dropped"]) == (2, 1)
    assert a["cash_after"] == pytest.approx(10 + 600 - 550)


def test_the_percentage_minimum_applies_when_larger():
    # 5% of $20,000 = $1,000 > $100: all three trades are dust.
    r = _dust_book().size(SizingPolicy(min_trade_pct=0.05))
    assert trades_of(r, "A") == []
    a = account_of(r, "A")
    assert (a["trade_count"], a["dust_dropped"], a["cash_after"]) == (0, 3, 10.0)


# ---------------------------------------------------------------------------------------------
# Cash target
# ---------------------------------------------------------------------------------------------


def test_min_cash_weight_is_respected_after_trades():
    # $100,000 at 70/30, no cash, model 60/40, min_cash_weight 0.05: targets scaled by 0.95 →
    # VTI 57,000 (sell 130: 30 shares more than the plain rebalance, so reason cash),
    # BND 38,000 (buy 160), cash 5,000 = 5%.
    # A second account without the restriction gets the policy's 2% buffer: VTI 58,800 (sell 112),
    # BND 39,200 (buy 184), cash 2,000.
    r = (
        Book()
        .account("MINCASH", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("min_cash_weight", "0.05")])
        .account("BUFFER", {"VTI": 700, "BND": 600}, model=M6040)
        .size(SizingPolicy(default_cash_buffer=0.02))
    )
    assert trades_of(r, "MINCASH") == [("buy", "BND", 160.0, "rebalance"), ("sell", "VTI", 130.0, "cash")]
    a = account_of(r, "MINCASH")
    assert a["cash_after"] == pytest.approx(5_000.0)
    assert a["cash_after"] / a["market_value"] >= 0.05 - 1e-12
    assert a["inside_bands"] is True
    assert trades_of(r, "BUFFER") == [("buy", "BND", 184.0, "rebalance"), ("sell", "VTI", 112.0, "cash")]
    assert account_of(r, "BUFFER")["cash_after"] == pytest.approx(2_000.0)


def test_cash_never_ends_below_its_target_because_of_rounding():
    # $10,000 all in VTI, min cash 5.49% = $549: the sell is 5.49 shares; to the nearest share (5,
    # $500) cash would end under its target, so the sell rounds up to 6 ($600), reason cash.
    r = Book().account(
        "A", {"VTI": 100}, model={"VTI": 1.0}, restrictions=[("min_cash_weight", "0.0549")]
    ).size(SizingPolicy(min_trade_value=0.0, min_trade_pct=0.0))
    assert trades_of(r, "A") == [("sell", "VTI", 6.0, "cash")]
    assert account_of(r, "A")["cash_after"] == pytest.approx(600.0)


def test_buys_are_scaled_down_together_when_cash_is_short():
    # The no-sell VTI keeps the account from raising money: $2,000 of cash is all there is for a
    # $12,000 BND buy → 40 shares, reason restriction (a restriction blocked the funding sell).
    r = Book().account(
        "A", {"VTI": 700, "BND": 560, "CASH": 2_000}, model=M6040, restrictions=[("no_sell_symbol", "VTI")]
    ).size()
    assert trades_of(r, "A") == [("buy", "BND", 40.0, "restriction")]
    assert account_of(r, "A")["cash_after"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Restrictions
# ---------------------------------------------------------------------------------------------


def test_no_buy_bnd_buys_the_next_allowed_fixed_income_security_from_the_shelf():
    # BND is no-buy and the model has no other bond: the $10,000 BND was to buy goes to the first
    # fixed-income security of the shelf that may be bought: AGG ($100), reason restriction.
    book = Book(AGG=("fixed_income", "etf", False, 100.0)).without("IEF")
    r = book.account("A", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("no_buy_symbol", "BND")]).size()
    assert trades_of(r, "A") == [("buy", "AGG", 100.0, "restriction"), ("sell", "VTI", 100.0, "rebalance")]
    assert account_of(r, "A")["inside_bands"] is True


def test_no_buy_substitute_prefers_the_account_s_own_model_securities():
    # Model 60 VTI / 30 BND / 10 IEF; holds VTI $70,000, BND $20,000, IEF $10,000. BND may not be
    # bought: it keeps its $20,000 and the $10,000 short goes to IEF (in the model) rather than
    # AGG (alphabetically first on the shelf): IEF 10,000 + 10,000 → buy 100, reason restriction.
    book = Book(AGG=("fixed_income", "etf", False, 100.0))
    r = book.account(
        "A", {"VTI": 700, "BND": 400, "IEF": 100}, model={"VTI": 0.6, "BND": 0.3, "IEF": 0.1},
        restrictions=[("no_buy_symbol", "BND")],
    ).size()
    assert trades_of(r, "A") == [("buy", "IEF", 100.0, "restriction"), ("sell", "VTI", 100.0, "rebalance")]
    assert account_of(r, "A")["inside_bands"] is True


def test_no_buy_bnd_without_any_substitute_reports_fixed_income_unresolved():
    book = Book().without("IEF")  # no other fixed-income security anywhere
    r = book.account("A", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("no_buy_symbol", "BND")]).size()
    assert trades_of(r, "A") == [("sell", "VTI", 100.0, "rebalance")]
    a = account_of(r, "A")
    assert a["inside_bands"] is False
    assert "fixed_income at 30.0% vs target 40.0%" in a["unresolved"]
    assert "BND no-buy" in a["unresolved"]
    # The $10,000 that could not be invested is explained on the cash class too.
    assert "money meant for fixed_income cannot be invested" in a["unresolved"]
    assert a["cash_after"] == pytest.approx(10_000.0)


def test_no_sell_vti_is_not_sold_and_the_account_names_the_restriction():
    r = Book().account("A", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("no_sell_symbol", "VTI")]).size()
    assert trades_of(r, "A") == []  # nothing to sell, no cash to buy with
    a = account_of(r, "A")
    assert a["inside_bands"] is False
    assert "equity at 70.0% vs target 60.0% ±5.0%: VTI no-sell (restriction)" in a["unresolved"]
    assert "fixed_income at 30.0% vs target 40.0%" in a["unresolved"]
    assert "sales blocked by restriction (VTI)" in a["unresolved"]


def test_erisa_plan_restriction_freezes_the_alternatives_holding_and_flags_compliance():
    # $100,000: VTI $75,000, BND $15,000, VNQ $10,000 (alternatives barred by the plan); model 60/40.
    # VNQ is neither sold nor bought. VTI sells 150 ($15,000); BND wants $25,000 but only $15,000
    # is there → 300 shares, reason restriction (the VNQ sale that would fund it is barred).
    r = Book().account(
        "A", {"VTI": 750, "BND": 300, "VNQ": 100}, model=M6040, restrictions=[("no_asset_class", "alternatives")]
    ).size()
    assert trades_of(r, "A") == [("buy", "BND", 300.0, "restriction"), ("sell", "VTI", 150.0, "rebalance")]
    assert "VNQ" not in r.trades["symbol"].to_list()
    a = account_of(r, "A")
    assert a["compliance_review"] == (
        "holds alternatives (VNQ), barred by ERISA plan restriction (no_asset_class): no trade proposed, review with compliance"
    )
    assert a["inside_bands"] is False
    assert "alternatives at 10.0% vs target 0.0% ±5.0%: barred by the plan restriction" in a["unresolved"]
    assert "fixed_income at 30.0% vs target 40.0% ±5.0%: cash shortfall: sales blocked by restriction (VNQ)" in a["unresolved"]


# ---------------------------------------------------------------------------------------------
# Impossible targets and the rule-1 fallbacks
# ---------------------------------------------------------------------------------------------


def test_a_target_class_the_account_may_not_buy_is_explained_and_nothing_violates_it():
    # ERISA account whose model wants 20% VNQ: alternatives are barred, so the 20% stays in cash.
    r = Book().account(
        "A", {"VTI": 500, "BND": 600, "CASH": 20_000}, model={"VTI": 0.5, "BND": 0.3, "VNQ": 0.2},
        restrictions=[("no_asset_class", "alternatives")],
    ).size()
    assert trades_of(r, "A") == []
    a = account_of(r, "A")
    assert a["compliance_review"] is None  # holds none of it
    assert "alternatives at 0.0% vs target 20.0% ±5.0%: barred by the plan restriction (no_asset_class alternatives)" in a["unresolved"]
    assert "cash at 20.0% vs target 0.0% ±5.0%: money meant for alternatives cannot be invested and stays in cash" in a["unresolved"]


def test_a_class_with_no_reachable_security_is_reported():
    # IPS-only account (no model) with 10% alternatives; it holds none and no model holds any.
    book = Book().account("A", {"VTI": 600, "BND": 600, "CASH": 10_000},
                          targets={"equity": 0.6, "fixed_income": 0.3, "alternatives": 0.1})
    r = book.size()
    assert trades_of(r, "A") == []
    assert "alternatives at 0.0% vs target 10.0% ±5.0%: no reachable security" in account_of(r, "A")["unresolved"]
    # Once some model (of another, unsized account) holds VNQ, it is the class's security.
    r = book.account("OTHER", {}, model={"VNQ": 1.0}, sized=False).size()
    assert trades_of(r, "A") == [("buy", "VNQ", 100.0, "rebalance")]
    assert account_of(r, "A")["inside_bands"] is True


def test_ips_only_account_splits_each_class_over_its_holdings_by_value():
    # Equity 60% over VTI $30,000 and VEA $10,000 (3:1) → VTI $45,000 (buy 150), VEA $15,000
    # (buy 250 at $20); fixed income 40% = the $40,000 BND already held; $20,000 cash deployed.
    r = Book().account("A", {"VTI": 300, "VEA": 500, "BND": 800, "CASH": 20_000},
                       targets={"equity": 0.6, "fixed_income": 0.4}).size()
    assert trades_of(r, "A") == [("buy", "VEA", 250.0, "rebalance"), ("buy", "VTI", 150.0, "rebalance")]
    assert account_of(r, "A")["cash_after"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def _mixed_book() -> Book:
    return (
        Book(AGG=("fixed_income", "etf", False, 100.0), VBTLX=("fixed_income", "mutual_fund", True, 10.37))
        .account("A1", {"VTI": 700, "BND": 600}, model=M6040)
        .account("A2", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("no_buy_symbol", "BND")])
        .account("A3", {"VTI": 750, "BND": 300, "VNQ": 100}, model=M6040, restrictions=[("no_asset_class", "alternatives")])
        .account("A4", {"CASH": 100_000}, model={"VTI": 0.6, "VBTLX": 0.4})
        .account("A5", {"VTI": 700, "BND": 600}, model=M6040, restrictions=[("min_cash_weight", "0.05")])
    )


# The recommendation ids of these trades: rebal_pipeline_tests/trades/test_recommendation_identity.py.
def test_same_inputs_give_identical_frames_whatever_the_row_order():
    frames = _mixed_book().frames()
    policy = SizingPolicy()
    first = size_trades(**frames, policy=policy)
    second = size_trades(**frames, policy=policy)
    shuffled = size_trades(**{k: v.sample(fraction=1.0, shuffle=True, seed=7) for k, v in frames.items()}, policy=policy)
    for other in (second, shuffled):
        assert_frame_equal(first.trades, other.trades)
        assert_frame_equal(first.accounts, other.accounts)
    assert first.trades.height > 0


def test_no_accounts_gives_empty_frames_with_the_schema():
    r = Book().size()
    assert r.trades.is_empty() and r.accounts.is_empty()
    assert r.trades.schema == pl.Schema(TRADES_SCHEMA) and r.accounts.schema == pl.Schema(ACCOUNTS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Vectorisation sanity
# ---------------------------------------------------------------------------------------------

GEN_SHELF = {
    "VTI": ("equity", False, 237.19),
    "VOO": ("equity", False, 520.0),
    "VEA": ("equity", False, 50.0),
    "BND": ("fixed_income", False, 73.0),
    "VBTLX": ("fixed_income", True, 10.37),
    "AGG": ("fixed_income", False, 98.0),
    "VNQ": ("alternatives", False, 90.0),
    "SWVXX": ("cash", True, 1.0),
    "CASH": ("cash", True, 1.0),
}
GEN_MODELS = [
    {"VTI": 0.4, "VOO": 0.15, "VEA": 0.1, "BND": 0.2, "VBTLX": 0.05, "VNQ": 0.05, "SWVXX": 0.03, "CASH": 0.02},
    {"VTI": 0.25, "VEA": 0.05, "BND": 0.3, "VBTLX": 0.3, "SWVXX": 0.06, "CASH": 0.04},
    {"VTI": 0.5, "VOO": 0.2, "VEA": 0.15, "AGG": 0.1, "VNQ": 0.03, "CASH": 0.02},
]


def _generated_book(n: int, seed: int = 11) -> tuple[dict[str, pl.DataFrame], pl.DataFrame]:
    rng = np.random.default_rng(seed)
    cls = {s: c for s, (c, _, _) in GEN_SHELF.items()}
    price = {s: p for s, (_, _, p) in GEN_SHELF.items()}
    ids = np.array([f"ACC{i:06d}" for i in range(n)])
    model_of = rng.integers(0, len(GEN_MODELS), n)
    size = rng.lognormal(11.5, 1.0, n)  # market value, about $100k median

    models = pl.DataFrame(
        [dict(model=m, symbol=s, weight=w) for m, weights in enumerate(GEN_MODELS) for s, w in weights.items()]
    )
    accounts = pl.DataFrame({"account_id": ids, "model": model_of, "size": size})
    model_weights = accounts.join(models, on="model").select("account_id", "symbol", "weight")
    # Holdings: the model's weights drifted by ±40% relative, whole shares (funds: thousandths).
    h = model_weights.with_columns(
        drift=pl.Series(rng.uniform(0.6, 1.4, model_weights.height)),
    ).join(accounts, on="account_id")
    h = h.with_columns(
        price=pl.col("symbol").replace_strict(price, return_dtype=pl.Float64),
        asset_class=pl.col("symbol").replace_strict(cls, return_dtype=pl.String),
        fractional=pl.col("symbol").replace_strict({s: f for s, (_, f, _) in GEN_SHELF.items()}, return_dtype=pl.Boolean),
    ).with_columns(
        quantity=pl.when(pl.col("fractional"))
        .then((pl.col("weight") * pl.col("drift") * pl.col("size") / pl.col("price") * 1000).floor() / 1000)
        .otherwise((pl.col("weight") * pl.col("drift") * pl.col("size") / pl.col("price")).floor())
    ).with_columns(market_value=pl.col("quantity") * pl.col("price"))
    holdings = h.select("account_id", "symbol", "asset_class", "quantity", "price", "market_value")
    class_targets = (
        model_weights.with_columns(asset_class=pl.col("symbol").replace_strict(cls, return_dtype=pl.String))
        .group_by("account_id", "asset_class")
        .agg(target_weight=pl.col("weight").sum())
    )
    bands = class_targets.select("account_id", "asset_class", band=pl.lit(0.05))
    pick = rng.uniform(size=n)
    restrictions = pl.concat(
        [
            pl.DataFrame({"account_id": ids[pick < 0.05], "kind": "no_buy_symbol", "value": "BND"}),
            pl.DataFrame({"account_id": ids[(pick >= 0.05) & (pick < 0.10)], "kind": "no_sell_symbol", "value": "VTI"}),
            pl.DataFrame({"account_id": ids[(pick >= 0.10) & (pick < 0.13)], "kind": "no_asset_class", "value": "alternatives"}),
            pl.DataFrame({"account_id": ids[(pick >= 0.13) & (pick < 0.20)], "kind": "min_cash_weight", "value": "0.06"}),
        ]
    )
    securities = pl.DataFrame(
        [dict(symbol=s, asset_class=c, security_type="etf", fractional=f, price=p) for s, (c, f, p) in GEN_SHELF.items()]
    )
    frames = dict(holdings=holdings, class_targets=class_targets, model_weights=model_weights,
                  securities=securities, restrictions=restrictions, bands=bands)
    return frames, restrictions


def test_twenty_thousand_generated_accounts_size_without_breaking_any_rule():
    frames, restrictions = _generated_book(20_000)
    policy = SizingPolicy()
    r = size_trades(**frames, policy=policy)
    acc, tr = r.accounts, r.trades
    assert acc.height == 20_000
    assert (acc["cash_after"] >= 0).all()
    assert tr.height > 20_000
    assert not (tr["symbol"] == "CASH").any()
    # Never sell more than held.
    held = frames["holdings"].select("account_id", "symbol", held="quantity")
    sells = tr.filter(pl.col("side") == "sell").join(held, on=["account_id", "symbol"], how="left")
    assert (sells["quantity"] <= sells["held"]).all()
    # Restrictions are never violated.
    def violating(kind: str, side: str | None, on: str) -> int:
        rows = restrictions.filter(pl.col("kind") == kind).select("account_id", pl.col("value").alias(on))
        t = tr if side is None else tr.filter(pl.col("side") == side)
        return t.join(rows, on=["account_id", on], how="semi").height
    assert violating("no_buy_symbol", "buy", "symbol") == 0
    assert violating("no_sell_symbol", "sell", "symbol") == 0
    assert violating("no_asset_class", None, "asset_class") == 0
    # Whole shares for ETFs, thousandths for funds; no dust.
    whole = tr.filter(~pl.col("symbol").is_in(["VBTLX", "SWVXX"]))
    assert (whole["quantity"] == whole["quantity"].floor()).all()
    funds = tr.filter(pl.col("symbol").is_in(["VBTLX", "SWVXX"]))
    assert ((funds["quantity"] * 1000 - (funds["quantity"] * 1000).round(0)).abs() < 1e-6).all()
    with_mv = tr.join(acc.select("account_id", "market_value"), on="account_id")
    minimum = with_mv.select(
        ok=pl.col("est_value") >= pl.max_horizontal(pl.lit(100.0), pl.col("market_value") * 0.001) - 1e-6
    )
    assert minimum["ok"].all()
    # Cash never ends below min(cash before, its target): target = max(CASH's model weight, min cash).
    cash_w = frames["model_weights"].filter(pl.col("symbol") == "CASH").select("account_id", cash_w="weight")
    min_cash = restrictions.filter(pl.col("kind") == "min_cash_weight").select(
        "account_id", min_cash=pl.col("value").cast(pl.Float64)
    )
    check = (
        acc.join(cash_w, on="account_id", how="left")
        .join(min_cash, on="account_id", how="left")
        .with_columns(target=pl.max_horizontal(pl.col("cash_w").fill_null(0.0), pl.col("min_cash").fill_null(0.0)) * pl.col("market_value"))
        .filter(pl.col("cash_after") < pl.min_horizontal("cash_before", "target") - 1e-6)
    )
    assert check.is_empty()
    # ERISA accounts holding VNQ are flagged for compliance.
    erisa = restrictions.filter(pl.col("kind") == "no_asset_class").select("account_id")
    flagged = acc.join(erisa, on="account_id", how="semi")
    assert flagged["compliance_review"].str.contains("VNQ").fill_null(False).sum() > 0
    assert set(tr["reason"].unique()) <= {"rebalance", "cash", "restriction"}
    assert acc["unresolved"].is_null().sum() > 0


# ---------------------------------------------------------------------------------------------
# Rule 6b: top-up of the cash that rounding and the minimum trade left over
# ---------------------------------------------------------------------------------------------

# Five $500+ equity ETFs; the model splits equity 60% over them (12% each), BND 38%, CASH 2%.
TOPUP_ETFS = {
    "QQQ": ("equity", "etf", False, 500.0),
    "SPY": ("equity", "etf", False, 510.0),
    "VOO": ("equity", "etf", False, 520.0),
    "VUG": ("equity", "etf", False, 540.0),
    "VGT": ("equity", "etf", False, 860.0),
}
M_SPLIT = {"QQQ": 0.12, "SPY": 0.12, "VOO": 0.12, "VUG": 0.12, "VGT": 0.12, "BND": 0.38, "CASH": 0.02}
# $10,000: QQQ 2 ($1,000), SPY 2 ($1,020), VOO 2 ($1,040), VUG 2 ($1,080), VGT 1 ($860) = equity
# $5,000 (50% vs 60%); BND 76 ($3,800 = its 38%); cash $1,200 (12% vs 2%, target $200).
SMALL = {"QQQ": 2, "SPY": 2, "VOO": 2, "VUG": 2, "VGT": 1, "BND": 76, "CASH": 1_200}


def test_small_account_tops_up_the_most_underweight_etf_and_ends_inside_its_band():
    # Each ETF's target is $1,200: short QQQ 200, SPY 180, VOO 160, VUG 120, VGT 340, all under
    # one share, so rules 3-6 alone buy nothing (5 dust) and the account stays at equity 50%,
    # cash 12% (±2% bands) with $1,000 of investable cash (1,200 − 200).
    # Top-up round 1: equity is short $1,000; the most underweight ETF is VGT (340): nearest
    # 1,000 / 860 = 1.16 → 1 share ($860), affordable. Round 2: $140 left, equity short $140:
    # no ETF rounds to a share → done. Equity 58.6%, cash $340 = 3.4%: inside the bands.
    r = Book(**TOPUP_ETFS).account("A", SMALL, model=M_SPLIT, band=0.02).size()
    assert trades_of(r, "A") == [("buy", "VGT", 1.0, "rebalance")]
    a = account_of(r, "A")
    assert a["cash_after"] == pytest.approx(340.0)
    assert a["cash_after"] >= 0.02 * a["market_value"]
    assert (a["trade_count"], a["dust_dropped"]) == (1, 4)
    assert a["inside_bands"] is True and a["unresolved"] is None


def test_equally_short_etfs_top_up_the_alphabetically_first():
    # All five at $500, 2 shares each: every one is short $200 (a tie). Equity is short $1,000 and
    # there is $1,000 to invest → 2 shares of QQQ (alphabetically first); cash ends at its $200.
    etfs = {s: ("equity", "etf", False, 500.0) for s in TOPUP_ETFS}
    r = Book(**etfs).account("A", {**SMALL, "VGT": 2, "CASH": 1_200}, model=M_SPLIT, band=0.02).size()
    assert trades_of(r, "A") == [("buy", "QQQ", 2.0, "rebalance")]
    a = account_of(r, "A")
    assert a["market_value"] == 10_000.0 and a["cash_after"] == pytest.approx(200.0)
    assert a["inside_bands"] is True


def test_top_up_never_buys_a_no_buy_security_nor_spends_below_the_cash_target():
    # As the first top-up test but VGT is no-buy: it keeps its $860 and its $340 short moves to
    # QQQ (first of the model's other equity ETFs): QQQ target 1,540, short 540 → rule 3 buys 1
    # share ($500, reason restriction); SPY/VOO/VUG round to 0. Investable cash left: $500.
    # Top-up: equity short 500; SPY (180), VOO, VUG cost more than $500 → QQQ (short 40): nearest
    # 500 / 500 = 1 share, exactly the $500 left, merged into the QQQ buy (keeps "restriction").
    # Cash ends exactly at its $200 target, never below.
    # Second account (FLOOR): model CASH 7% (target $700), BND 33% but BND is no-sell, so only
    # $500 of the $1,200 cash may be invested; rule 3 scales the $1,000 of equity buys to $500 and
    # none reaches a share. Top-up: VGT (most underweight) costs $860 > $500 → skipped; QQQ: 1 share
    # ($500, a new trade → "rebalance"). Cash ends exactly at its $700 target, never below.
    book = Book(**TOPUP_ETFS)
    book.account("NOBUY", SMALL, model=M_SPLIT, band=0.02, restrictions=[("no_buy_symbol", "VGT")])
    book.account("FLOOR", SMALL, model={**M_SPLIT, "BND": 0.33, "CASH": 0.07}, band=0.02,
                 restrictions=[("no_sell_symbol", "BND")])
    r = book.size()
    assert trades_of(r, "NOBUY") == [("buy", "QQQ", 2.0, "restriction")]
    a = account_of(r, "NOBUY")
    assert a["cash_after"] == pytest.approx(200.0)
    assert a["inside_bands"] is True
    assert "VGT" not in r.trades.filter(pl.col("account_id") == "NOBUY")["symbol"].to_list()
    assert trades_of(r, "FLOOR") == [("buy", "QQQ", 1.0, "rebalance")]
    f = account_of(r, "FLOOR")
    assert f["cash_after"] == pytest.approx(700.0)
    assert "equity at 55.0% vs target 60.0% ±2.0%: cash shortfall: sales blocked by restriction (BND)" in f["unresolved"]
    assert f["cash_after"] / f["market_value"] >= 0.07 - 1e-12


def test_top_up_results_are_identical_whatever_the_row_order():
    etfs = {**TOPUP_ETFS, "IVV": ("equity", "etf", False, 500.0)}
    book = Book(**etfs)
    book.account("A", SMALL, model=M_SPLIT, band=0.02)
    book.account("B", SMALL, model=M_SPLIT, band=0.02, restrictions=[("no_buy_symbol", "VGT")])
    book.account("C", {**SMALL, "QQQ": 1, "IVV": 1}, model={**M_SPLIT, "IVV": 0.12, "QQQ": 0.12, "BND": 0.26}, band=0.02)
    frames = book.frames()
    policy = SizingPolicy()
    first = size_trades(**frames, policy=policy)
    assert first.trades.height >= 3
    for seed in (1, 2, 3):
        shuffled = size_trades(**{k: v.sample(fraction=1.0, shuffle=True, seed=seed) for k, v in frames.items()}, policy=policy)
        assert_frame_equal(first.trades, shuffled.trades)
        assert_frame_equal(first.accounts, shuffled.accounts)
    # One row per account/symbol/side.
    assert first.trades.select("account_id", "symbol", "side").is_duplicated().sum() == 0
