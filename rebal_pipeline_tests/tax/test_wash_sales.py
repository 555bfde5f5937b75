"""Wash-sale matching (core/wash_sales.py) against IRS Publication 550's published examples and
the edges of the 61-day window."""

from datetime import date, timedelta

import polars as pl
import pytest

from rebal_pipeline.core.tax_lots import adjust_lots_for_wash_sales, with_terms
from rebal_pipeline.core.wash_sales import match_wash_sales

SALE = date(2026, 10, 1)


def sale(sale_id="S1", account="TAX-1", symbol="X", quantity=100.0, loss=250.0, sale_date=SALE,
         acquired=date(2026, 1, 5), household="HH-1", group="x"):
    return {"sale_id": sale_id, "household_id": household, "wash_group": group, "account_id": account,
            "symbol": symbol, "sale_date": sale_date, "quantity": quantity, "loss": loss,
            "acquired_date": acquired, "holding_days": (sale_date - acquired).days if acquired else None}


def buy(purchase_id="P1", account="TAX-1", account_type="taxable", symbol="X", quantity=100.0,
        trade_date=SALE + timedelta(days=10), household="HH-1", group="x"):
    return {"purchase_id": purchase_id, "household_id": household, "wash_group": group, "account_id": account,
            "account_type": account_type, "symbol": symbol, "trade_date": trade_date, "quantity": quantity}


def match(sales, buys):
    return match_wash_sales(pl.DataFrame(sales), pl.DataFrame(buys))


def test_pub_550_full_replacement_disallows_250_and_new_basis_is_1050():
    # Pub. 550: buy 100 X for $1,000, sell for $750, buy 100 X within 30 days for $800 →
    # the $250 loss is not deductible; the new shares' basis is $1,050.
    matches = match([sale()], [buy()])
    assert matches.select("replaced_quantity", "disallowed_loss").row(0) == (100.0, 250.0)
    lots = pl.DataFrame({"account_id": ["TAX-1"], "symbol": ["X"], "lot_id": ["NEW"],
                         "open_date": [SALE + timedelta(days=10)], "quantity": [100.0], "cost_basis": [800.0]})
    adjusted = adjust_lots_for_wash_sales(lots, matches)
    assert adjusted.select("lot_part", "quantity", "cost_basis").rows() == [("replacement", 100.0, 1050.0)]


def test_pub_550_partial_replacement_disallows_187_50_and_basis_is_787_50():
    # Pub. 550: sell 100 M for $750 (cost $1,000), buy 75 M within 30 days for $600 → $187.50
    # (75/100 × $250) is disallowed, $62.50 deductible; basis of the 75 new shares $787.50.
    matches = match([sale()], [buy(quantity=75.0)])
    assert matches.select("replaced_quantity", "disallowed_loss").row(0) == (75.0, 187.5)
    lots = pl.DataFrame({"account_id": ["TAX-1"], "symbol": ["X"], "lot_id": ["NEW"],
                         "open_date": [SALE + timedelta(days=10)], "quantity": [75.0], "cost_basis": [600.0]})
    assert adjust_lots_for_wash_sales(lots, matches)["cost_basis"].to_list() == [787.5]


def test_replacement_lot_holding_period_tacks_on_the_shares_sold():
    # IRC §1223(3): shares held 269 days and sold at a loss; the replacement bought 10 days later
    # counts its holding period from 269 days before its purchase.
    matches = match([sale(acquired=date(2026, 1, 5))], [buy()])
    lots = pl.DataFrame({"account_id": ["TAX-1"], "symbol": ["X"], "lot_id": ["NEW"],
                         "open_date": [date(2026, 10, 11)], "quantity": [100.0], "cost_basis": [800.0]})
    adjusted = with_terms(adjust_lots_for_wash_sales(lots, matches), date(2026, 11, 20))
    assert adjusted["holding_from"].to_list() == [date(2026, 10, 11) - timedelta(days=269)]
    # Long-term from 2027-01-16 rather than 2027-10-12.
    assert adjusted["long_term_from"].to_list() == [date(2027, 1, 16)]


def test_a_larger_replacement_lot_is_split_into_its_replacing_and_plain_shares():
    matches = match([sale(quantity=40.0, loss=100.0)], [buy(quantity=100.0)])
    lots = pl.DataFrame({"account_id": ["TAX-1"], "symbol": ["X"], "lot_id": ["NEW"],
                         "open_date": [SALE + timedelta(days=10)], "quantity": [100.0], "cost_basis": [800.0]})
    parts = adjust_lots_for_wash_sales(lots, matches).sort("lot_part")
    assert parts.select("lot_part", "quantity", "cost_basis").rows() == [("", 60.0, 480.0), ("replacement", 40.0, 420.0)]


@pytest.mark.parametrize("days, washed", [(-31, False), (-30, True), (0, True), (30, True), (31, False)])
def test_the_window_is_30_calendar_days_either_side_including_the_sale_day(days, washed):
    matches = match([sale()], [buy(trade_date=SALE + timedelta(days=days))])
    assert (matches.height == 1) is washed


def test_a_buy_into_the_households_ira_loses_the_loss_permanently():
    # Rev. Rul. 2008-5: a loss washed by a purchase in the client's IRA is disallowed and does
    # not increase any basis.
    matches = match([sale()], [buy(account="IRA-1", account_type="traditional_ira")])
    assert matches.select("disallowed_loss", "loss_lost_permanently").row(0) == (250.0, True)
    lots = pl.DataFrame({"account_id": ["IRA-1"], "symbol": ["X"], "lot_id": ["IRA-LOT"],
                         "open_date": [SALE + timedelta(days=10)], "quantity": [100.0], "cost_basis": [800.0]})
    assert adjust_lots_for_wash_sales(lots, matches)["cost_basis"].to_list() == [800.0]


def test_substantially_identical_means_same_wash_group_not_same_symbol():
    matches = match([sale(symbol="VTI", group="us_total")],
                    [buy(symbol="ITOT", group="us_total"), buy("P2", symbol="VXUS", group="intl")])
    assert matches["purchase_symbol"].to_list() == ["ITOT"]


def test_another_households_purchase_is_not_a_wash():
    assert match([sale()], [buy(household="HH-2", account="OTHER")]).height == 0


def test_the_purchase_that_created_the_shares_sold_is_not_their_replacement():
    # Rev. Rul. 56-602: buying 200 shares and selling 100 of them at a loss 10 days later is not a
    # wash sale, even though the other 100 were bought within the window.
    bought = SALE - timedelta(days=10)
    matches = match([sale(acquired=bought)], [buy(trade_date=bought, quantity=200.0)])
    assert matches.height == 0


def test_same_day_purchase_is_a_wash():
    assert match([sale()], [buy(trade_date=SALE)])["disallowed_loss"].to_list() == [250.0]


def test_first_acquired_replacement_shares_are_matched_first_and_each_share_replaces_once():
    # Two loss sales of 100 shares; purchases of 60 (day -5) and 100 (day +5). The first sale takes
    # the 60 and 40 of the 100; the second sale (day +20) gets the remaining 60.
    sales = [sale("S1", quantity=100.0, loss=200.0), sale("S2", quantity=100.0, loss=300.0, sale_date=SALE + timedelta(days=20))]
    buys = [buy("P1", quantity=60.0, trade_date=SALE - timedelta(days=5)), buy("P2", quantity=100.0, trade_date=SALE + timedelta(days=5))]
    rows = match(sales, buys).select("sale_id", "purchase_id", "replaced_quantity", "disallowed_loss").rows()
    assert rows == [("S1", "P1", 60.0, 120.0), ("S1", "P2", 40.0, 80.0), ("S2", "P2", 60.0, 180.0)]


def test_matching_runs_across_many_households_at_once():
    sales = [sale(f"S{i}", household=f"HH-{i}") for i in range(500)]
    buys = [buy(f"P{i}", household=f"HH-{i}", quantity=float(i % 150)) for i in range(500)]
    matches = match(sales, buys)
    expected = {f"S{i}": round(250 * min(i % 150, 100) / 100, 2) for i in range(500) if i % 150}
    assert dict(matches.select("sale_id", "disallowed_loss").iter_rows()) == expected
