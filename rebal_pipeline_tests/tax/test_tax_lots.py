"""Lot relief, holding periods, tax estimates and "wait for long-term" (core/tax_lots.py),
with hand-computed numbers."""

from datetime import date

import polars as pl
import pytest

from rebal_pipeline.core.tax_lots import (
    TaxPolicy, estimate_lot_tax, harvest_candidates, net_capital_gains, relieve_lots, wait_for_long_term, with_terms,
)

AS_OF = date(2026, 11, 20)


def lots(*rows):
    """(lot_id, acquired, quantity, cost_basis) for account A / symbol VTI."""
    return pl.DataFrame(
        [{"account_id": "A", "symbol": "VTI", "lot_id": lot_id, "lot_part": "", "acquired_date": acquired,
          "holding_from": acquired, "quantity": quantity, "cost_basis": basis} for lot_id, acquired, quantity, basis in rows]
    )


# One account, one position of 300 VTI at $100 in three lots:
#   L1 bought 2020-03-02, 100 sh, $60/sh  → +$4,000 long-term gain
#   L2 bought 2026-02-10, 100 sh, $90/sh  → +$1,000 short-term gain
#   L3 bought 2024-05-01, 100 sh, $120/sh → −$2,000 long-term loss
THREE_LOTS = lots(("L1", date(2020, 3, 2), 100.0, 6000.0), ("L2", date(2026, 2, 10), 100.0, 9000.0),
                  ("L3", date(2024, 5, 1), 100.0, 12000.0))


def sell(quantity, method):
    return pl.DataFrame({"recommendation_id": ["R"], "account_id": ["A"], "symbol": ["VTI"],
                         "quantity": [quantity], "est_price": [100.0], "lot_relief_method": [method]})


@pytest.mark.parametrize("method, expected", [
    # FIFO: oldest first — L1 (100 sh, +4,000 LT) then 50 of L3 (acquired 2024 before L2 in 2026).
    ("fifo", [("L1", 100.0, 4000.0, "long"), ("L3", 50.0, -1000.0, "long")]),
    # HIFO: highest cost first — L3 ($120) then 50 of L2 ($90).
    ("hifo", [("L3", 100.0, -2000.0, "long"), ("L2", 50.0, 500.0, "short")]),
    # Tax-minimising at 32% ordinary / 15% LTCG / 5% state, tax per share: L3 −$20 × 20% = −$4.00,
    # L2 +$10 × 37% = $3.70, L1 +$40 × 20% = $8.00 → the loss lot L3, then the cheaper gain L2
    # although it is short-term (issue 14: the term alone does not make a gain cheaper).
    ("tax_min", [("L3", 100.0, -2000.0, "long"), ("L2", 50.0, 500.0, "short")]),
])
def test_150_shares_relieved_by_each_method(method, expected):
    rates = pl.DataFrame({"account_id": ["A"], "taxable": [True], "federal_ordinary_rate": [0.32],
                          "federal_ltcg_rate": [0.15], "state_rate": [0.05]})
    relieved = relieve_lots(sell(150.0, method), THREE_LOTS, AS_OF, rates)
    assert relieved.select("lot_id", "quantity", "gain", "term").rows() == expected


def test_the_three_methods_cost_different_tax_on_the_same_sale():
    rates = pl.DataFrame({"account_id": ["A"], "taxable": [True], "federal_ordinary_rate": [0.32],
                          "federal_ltcg_rate": [0.15], "state_rate": [0.05]})
    tax = {}
    for method in ("fifo", "hifo", "tax_min"):
        per_lot = estimate_lot_tax(relieve_lots(sell(150.0, method), THREE_LOTS, AS_OF, rates), rates)
        tax[method] = net_capital_gains(per_lot, ["recommendation_id"])["est_tax"].item()
    # fifo: LT 4,000 − 1,000 = 3,000 × 20% = 600; hifo and tax_min sell the same shares (L3, then
    # 50 of L2): ST 500, LT −2,000 → the net LT loss offsets the ST gain: −1,500 × 20% = −300.
    # (Before issue 14 tax_min sold 50 of L1 instead, LT −2,000 + 2,000 = 0: $300 more tax.)
    assert tax == {"fifo": 600.0, "hifo": -300.0, "tax_min": -300.0}


@pytest.mark.parametrize("sale_date, term", [(date(2024, 6, 19), "short"), (date(2024, 6, 20), "long")])
def test_pub_550_holding_period_example(sale_date, term):
    # Pub. 550: bought June 19, 2023 → counting starts June 20, 2023; sold June 19, 2024 is not
    # more than one year (short-term), sold June 20, 2024 is long-term.
    lot = lots(("L", date(2023, 6, 19), 1.0, 1.0))
    assert with_terms(lot, sale_date)["term"].item() == term


def test_days_to_long_term_counts_to_the_first_long_term_day():
    lot = with_terms(lots(("L", date(2025, 12, 1), 1.0, 1.0)), AS_OF)
    assert lot.select("term", "long_term_from", "days_to_long_term").row(0) == ("short", date(2026, 12, 2), 12)


def test_a_lot_bought_on_february_29_is_long_term_from_march_1():
    lot = with_terms(lots(("L", date(2024, 2, 29), 1.0, 1.0)), date(2025, 2, 28))
    assert lot.select("term", "long_term_from").row(0) == ("short", date(2025, 3, 1))


def test_sales_in_an_ira_realise_no_tax():
    rates = pl.DataFrame({"account_id": ["A"], "taxable": [False], "federal_ordinary_rate": [0.32],
                          "federal_ltcg_rate": [0.15], "state_rate": [0.05]})
    per_lot = estimate_lot_tax(relieve_lots(sell(300.0, "fifo"), THREE_LOTS, AS_OF), rates)
    assert per_lot["est_tax"].to_list() == [0.0, 0.0, 0.0]
    assert net_capital_gains(per_lot, ["recommendation_id"]).select("st_gain", "lt_gain", "est_tax").row(0) == (0.0, 0.0, 0.0)


def test_a_washed_loss_is_not_deductible():
    rates = pl.DataFrame({"account_id": ["A"], "taxable": [True], "federal_ordinary_rate": [0.32],
                          "federal_ltcg_rate": [0.15], "state_rate": [0.05]})
    relieved = relieve_lots(sell(100.0, "hifo"), THREE_LOTS, AS_OF)
    disallowed = pl.DataFrame({"recommendation_id": ["R"], "account_id": ["A"], "lot_id": ["L3"], "lot_part": [""],
                               "wash_sale_disallowed": [1500.0]})
    per_lot = estimate_lot_tax(relieved, rates, disallowed)
    summary = net_capital_gains(per_lot, ["recommendation_id"])
    # Loss 2,000, of which 1,500 washed: 500 deductible → saves 500 × 20% = 100.
    assert summary.select("realized_loss", "wash_sale_disallowed", "est_tax").row(0) == (500.0, 1500.0, -100.0)


def _short_gain_lot_turning_long_in(days):
    acquired = date(AS_OF.year - 1, AS_OF.month, AS_OF.day)  # one year ago: long-term from AS_OF + 1
    from datetime import timedelta
    acquired = acquired + timedelta(days=days - 1)
    per_lot = relieve_lots(sell(100.0, "fifo"), lots(("L", acquired, 100.0, 5000.0)), AS_OF)
    rates = pl.DataFrame({"account_id": ["A"], "taxable": [True], "federal_ordinary_rate": [0.35],
                          "federal_ltcg_rate": [0.15], "state_rate": [0.0]})
    return estimate_lot_tax(per_lot, rates)


@pytest.mark.parametrize("days, waits", [(1, True), (30, True), (31, False)])
def test_wait_for_long_term_at_the_window_edges(days, waits):
    per_lot = _short_gain_lot_turning_long_in(days)
    assert per_lot["days_to_long_term"].item() == days
    severity = pl.DataFrame({"recommendation_id": ["R"], "drift_to_band": [1.3]})
    advice = wait_for_long_term(per_lot, severity, TaxPolicy(wait_window_days=30))
    if waits:
        # $5,000 short-term gain × (35% − 15%) = $1,000 saved by waiting.
        assert advice.select("wait_for_long_term", "tax_saved_by_waiting").row(0) == (True, 1000.0)
        assert "wait until" in advice["wait_reason"].item()
    else:
        assert advice.height == 0


@pytest.mark.parametrize("drift_to_band, waits", [(1.99, True), (2.0, False)])
def test_severe_drift_rebalances_now_and_says_what_it_costs(drift_to_band, waits):
    per_lot = _short_gain_lot_turning_long_in(10)
    severity = pl.DataFrame({"recommendation_id": ["R"], "drift_to_band": [drift_to_band]})
    advice = wait_for_long_term(per_lot, severity, TaxPolicy(severe_drift_multiple=2.0))
    assert advice["wait_for_long_term"].item() is waits
    if not waits:
        assert advice["wait_reason"].item().startswith("drift is 2.0× its band (severe at 2.0×): rebalance now")


@pytest.mark.parametrize("price, candidate", [(90.0, True), (90.01, False)])
def test_harvest_threshold_is_inclusive_at_10_percent(price, candidate):
    lot = lots(("L", date(2025, 1, 2), 10.0, 1000.0)).with_columns(pl.lit(True).alias("taxable"))
    found = harvest_candidates(lot, pl.DataFrame({"symbol": ["VTI"], "price": [price]}), TaxPolicy())
    assert (found.height == 1) is candidate
    if candidate:
        assert found.select("unrealized_loss", "loss_pct").row(0) == (100.0, 0.1)


def test_ira_lots_are_never_harvest_candidates():
    lot = lots(("L", date(2025, 1, 2), 10.0, 1000.0)).with_columns(pl.lit(False).alias("taxable"))
    assert harvest_candidates(lot, pl.DataFrame({"symbol": ["VTI"], "price": [50.0]}), TaxPolicy()).height == 0
