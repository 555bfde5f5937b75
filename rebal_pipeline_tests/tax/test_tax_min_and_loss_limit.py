"""Issue 14, items 5 and 7: tax_min relief that minimises tax at the household's rates, and this
year's tax effect with the IRC §1211(b) limit on net capital losses (carry-forward §1212(b)).
Every number is worked by hand in the comments."""

from __future__ import annotations

import itertools
import os
from datetime import date

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebal_pipeline.core.tax_engine import PastWashSales, apply_tax_engine
from rebal_pipeline.core.tax_lots import TaxPolicy, estimate_lot_tax, net_capital_gains, relieve_lots
from rebal_pipeline.core.wash_sales import LOSS_SALES_SCHEMA, PURCHASES_SCHEMA

AS_OF = date(2026, 11, 20)
LONG_AGO = date(2020, 1, 2)  # long-term on AS_OF (IRC §1222(3): held more than one year)
RECENT = date(2026, 6, 1)  # short-term on AS_OF
# 32% federal ordinary, 15% federal LTCG, 5% state: short-term gains 37%, long-term 20%.
RATES = pl.DataFrame({"account_id": ["A"], "taxable": [True], "federal_ordinary_rate": [0.32],
                      "federal_ltcg_rate": [0.15], "state_rate": [0.05]})
EXAMPLES = int(os.environ.get("REBAL_HYPOTHESIS_EXAMPLES", "40"))


def lots(*rows):
    """(lot_id, acquired, quantity, cost per share) for account A / VTI."""
    return pl.DataFrame(
        [{"account_id": "A", "symbol": "VTI", "lot_id": lot_id, "lot_part": "", "acquired_date": acquired,
          "holding_from": acquired, "quantity": float(q), "cost_basis": float(q) * per_share}
         for lot_id, acquired, q, per_share in rows])


def sell(quantity, method="tax_min", price=100.0):
    return pl.DataFrame({"recommendation_id": ["R"], "account_id": ["A"], "symbol": ["VTI"],
                         "quantity": [float(quantity)], "est_price": [price], "lot_relief_method": [method]})


# ---- Item 5: tax_min ------------------------------------------------------------------------


def test_tax_min_sells_the_short_term_lot_costing_1_85_a_share_before_the_long_term_lot_costing_10():
    # At $100: the long-term lot (cost $50/sh) gains $50/sh × 20% = $10.00/sh of tax; the
    # short-term lot (cost $95/sh) gains $5/sh × 37% = $1.85/sh. Sorting by term first (long before
    # short, as before issue 14) sold the $10 lot: 100 sh → $1,000 of tax instead of $185.
    book = lots(("LT", LONG_AGO, 100, 50.0), ("ST", RECENT, 100, 95.0))
    relieved = relieve_lots(sell(100), book, AS_OF, RATES)
    assert relieved.select("lot_id", "quantity", "gain", "term").rows() == [("ST", 100.0, 500.0, "short")]
    assert estimate_lot_tax(relieved, RATES)["est_tax"].to_list() == [185.0]
    # The sale of 150 takes the rest from the long-term lot: 100 × $1.85 + 50 × $10 = $685.
    relieved = relieve_lots(sell(150), book, AS_OF, RATES)
    assert relieved.select("lot_id", "quantity").rows() == [("ST", 100.0), ("LT", 50.0)]
    assert estimate_lot_tax(relieved, RATES)["est_tax"].sum() == 685.0


def test_tax_min_takes_every_loss_before_any_gain_and_the_largest_saving_per_share_first():
    # Tax per share at $100: LOSS_LT cost $130 → −$30 × 20% = −$6.00; LOSS_ST cost $120 → −$20 ×
    # 37% = −$7.40 (a smaller loss in dollars, a larger saving); TINY_GAIN cost $99.99 →
    # +$0.01 × 20% = $0.002. Order: LOSS_ST, LOSS_LT, then the gain.
    book = lots(("TINY_GAIN", LONG_AGO, 50, 99.99), ("LOSS_LT", LONG_AGO, 50, 130.0), ("LOSS_ST", RECENT, 50, 120.0))
    relieved = relieve_lots(sell(120), book, AS_OF, RATES)
    assert relieved.select("lot_id", "quantity", "gain").rows() == [
        ("LOSS_ST", 50.0, -1000.0), ("LOSS_LT", 50.0, -1500.0), ("TINY_GAIN", 20.0, 0.2)]


def test_tax_min_without_rates_orders_by_gain_and_in_an_ira_first_in_first_out():
    book = lots(("OLD_GAIN", LONG_AGO, 10, 50.0), ("NEW_LOSS", RECENT, 10, 120.0))
    # No rates row for the account: the order a single flat rate gives (gain per share).
    no_rates = RATES.clear()
    assert relieve_lots(sell(10), book, AS_OF, no_rates)["lot_id"].to_list() == ["NEW_LOSS"]
    # An IRA realises nothing (every share costs $0): the oldest lot first.
    ira = RATES.with_columns(pl.lit(False).alias("taxable"))
    assert relieve_lots(sell(10), book, AS_OF, ira)["lot_id"].to_list() == ["OLD_GAIN"]


_lot = st.tuples(st.sampled_from([LONG_AGO, RECENT]), st.integers(1, 50),
                 st.floats(20.0, 180.0, allow_nan=False).map(lambda x: round(x, 2)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(_lot, min_size=1, max_size=4), st.floats(0.05, 1.0))
def test_no_order_of_filling_the_lots_costs_less_tax_than_tax_min(rows, fraction):
    """The exchange argument of relieve_lots' docstring, checked: for one sale at flat rates the
    tax is Σ (tax per share × shares), and no order of filling the lots beats ascending tax per
    share (every permutation tried)."""
    book = lots(*[(f"L{i}", acquired, q, cost) for i, (acquired, q, cost) in enumerate(rows)])
    quantity = max(1, round(sum(q for _, q, _ in rows) * fraction))
    # Tax per share at $100, by hand: (100 − cost) × 20% long-term, × 37% short-term.
    t = {f"L{i}": (100.0 - cost) * (0.20 if acquired == LONG_AGO else 0.37) for i, (acquired, _, cost) in enumerate(rows)}
    held = {f"L{i}": q for i, (_, q, _) in enumerate(rows)}

    def fill(order):
        left, tax = quantity, 0.0
        for lot_id in order:
            take = min(left, held[lot_id])
            tax, left = tax + take * t[lot_id], left - take
        return tax

    chosen = relieve_lots(sell(quantity), book, AS_OF, RATES)
    tax_min = sum(t[lot_id] * q for lot_id, q in zip(chosen["lot_id"], chosen["quantity"]))
    best = min(fill(order) for order in itertools.permutations(held))
    assert tax_min <= best + 1e-6


# ---- Item 7: this year's tax effect, IRC §1211(b) / §1212(b) --------------------------------


def _summary(rows, limit=None):
    """rows: (lot_id, acquired, quantity, cost per share) sold in full at $100."""
    book = lots(*rows)
    per_lot = estimate_lot_tax(relieve_lots(sell(book["quantity"].sum(), "fifo"), book, AS_OF, RATES), RATES)
    if limit is not None:
        per_lot = per_lot.with_columns(pl.lit(limit).alias("capital_loss_limit"))
    return net_capital_gains(per_lot, ["recommendation_id"]).row(0, named=True)


def test_a_net_loss_of_10000_saves_only_3000_at_the_ordinary_rate_this_year_and_carries_7000_forward():
    # 100 sh bought at $200, sold at $100: a $10,000 short-term loss and no gains. IRC §1211(b):
    # $3,000 offsets ordinary income, saving 3,000 × (32% + 5%) = $1,110 this year; §1212(b): the
    # other $7,000 carries forward.
    row = _summary([("L", RECENT, 100, 200.0)])
    assert (row["realized_loss"], row["est_tax_this_year"], row["loss_carryforward"]) == (10000.0, -1110.0, 7000.0)


def test_married_filing_separately_deducts_1500():
    # §1211(b)(1): $1,500 for a married individual filing separately: 1,500 × 37% = $555 saved,
    # $8,500 carried forward.
    row = _summary([("L", RECENT, 100, 200.0)], limit=1500.0)
    assert (row["est_tax_this_year"], row["loss_carryforward"]) == (-555.0, 8500.0)


def test_a_net_loss_under_the_limit_is_all_deducted_and_a_net_gain_is_taxed_as_before():
    # −$1,200 short-term (cost $112 → $100 on 100 sh): all of it against ordinary income,
    # 1,200 × 37% = $444 saved, nothing carried.
    row = _summary([("L", RECENT, 100, 112.0)])
    assert (row["est_tax_this_year"], row["loss_carryforward"]) == (-444.0, 0.0)
    # +$4,000 long-term (cost $60): 4,000 × 20% = $800, this year and in est_tax alike.
    row = _summary([("G", LONG_AGO, 100, 60.0)])
    assert (row["est_tax"], row["est_tax_this_year"], row["loss_carryforward"]) == (800.0, 800.0, 0.0)


def test_netting_comes_before_the_limit():
    # ST gain +$2,000 (cost $80 on 100 sh), LT loss −$7,000 (cost $170 on 100 sh): §1222 netting
    # leaves a $5,000 net long-term loss; $3,000 of it offsets ordinary income (× 37% = $1,110),
    # $2,000 carries forward.
    row = _summary([("G", RECENT, 100, 80.0), ("L", LONG_AGO, 100, 170.0)])
    assert (row["st_gain"], row["realized_loss"], row["est_tax_this_year"], row["loss_carryforward"]) == (
        2000.0, 7000.0, -1110.0, 2000.0)


ACCOUNTS = pl.DataFrame({
    "account_id": ["T1", "T2"], "household_id": ["HH", "HH"], "account_type": ["taxable", "taxable"],
    "taxable": [True, True], "lot_relief_method": ["fifo", "fifo"], "federal_ordinary_rate": [0.32, 0.32],
    "federal_ltcg_rate": [0.15, 0.15], "state_rate": [0.05, 0.05], "harvest_eligible": [False, False],
})
SECURITIES = pl.DataFrame({
    "symbol": ["VTI", "BND"], "asset_class": ["equity", "fixed_income"], "security_type": ["etf", "etf"],
    "fractional": [False, False], "price": [100.0, 50.0], "wash_group": ["us_total", "us_agg"],
    "tlh_substitute": pl.Series([None, None], dtype=pl.String),
})


def test_the_household_figure_applies_the_limit_once_across_its_recommendations():
    # Two accounts of one household each sell 100 VTI bought at $140: −$4,000 short-term each.
    # Each recommendation alone: 3,000 × 37% = $1,110 saved, $1,000 carried. The household (one
    # taxpayer): −$8,000 → still $1,110 saved this year, $5,000 carried forward.
    lot_rows = pl.DataFrame({
        "account_id": ["T1", "T2"], "symbol": ["VTI", "VTI"], "lot_id": ["L1", "L2"], "lot_part": ["", ""],
        "acquired_date": [RECENT] * 2, "holding_from": [RECENT] * 2, "quantity": [100.0] * 2,
        "cost_basis": [14000.0] * 2, "taxable": [True, True]})
    trades = pl.DataFrame({
        "recommendation_key": ["R1", "R2"], "account_id": ["T1", "T2"], "symbol": ["VTI", "VTI"],
        "asset_class": ["equity", "equity"], "side": ["sell", "sell"], "quantity": [100.0, 100.0],
        "est_price": [100.0, 100.0], "est_value": [10000.0, 10000.0], "reason": ["rebalance", "rebalance"]})
    recs = pl.DataFrame({"recommendation_key": ["R1", "R2"], "scope": ["account"] * 2, "scope_id": ["T1", "T2"]})
    past = PastWashSales(lot_rows, pl.DataFrame(schema=LOSS_SALES_SCHEMA), pl.DataFrame(schema=PURCHASES_SCHEMA),
                         pl.DataFrame())
    outcome = apply_tax_engine(
        trades, recs, past, ACCOUNTS, SECURITIES,
        pl.DataFrame(schema={"account_id": pl.String, "kind": pl.String, "value": pl.String}),
        pl.DataFrame({"recommendation_key": ["R1", "R2"], "drift_to_band": [1.5, 1.5]}),
        pl.DataFrame(schema={"account_id": pl.String, "symbol": pl.String, "reason": pl.String}),
        AS_OF, TaxPolicy(tlh_min_loss=1e9), 100.0)
    # The engine's recommendations are known by their provisional key (ids are minted after it).
    rows = outcome.summary.sort("recommendation_key").select(
        "recommendation_key", "est_tax_this_year", "loss_carryforward", "tax_effect_words",
        "household_est_tax_this_year", "household_loss_carryforward").rows()
    assert rows == [
        ("R1", -1110.0, 1000.0, "estimated tax saving $1,110.00", -1110.0, 5000.0),
        ("R2", -1110.0, 1000.0, "estimated tax saving $1,110.00", -1110.0, 5000.0),
    ]
    # est_tax keeps the §1222 figure without the limit (4,000 × 37%), for comparison.
    assert outcome.summary["est_tax"].to_list() == [-1480.0, -1480.0]
    # net_tax_pct is this year's figure over the trade value: −1,110 / 10,000.
    assert outcome.summary["net_tax_pct"].to_list() == [-0.111, -0.111]


@pytest.mark.parametrize("amount, words", [
    (-121.0, "estimated tax saving $121.00"), (1733.42, "estimated tax $1,733.42"), (0.004, "estimated tax $0.00"),
    (-0.004, "estimated tax $0.00"), (None, "estimated tax $0.00"),
])
def test_tax_effect_words(amount, words):
    from rebal_pipeline.core.money import tax_effect_words

    assert tax_effect_words(amount) == words
    assert "$-" not in tax_effect_words(amount) and "-$" not in tax_effect_words(amount)
