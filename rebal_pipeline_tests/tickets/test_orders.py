"""Orders from approved recommendations: one per trade, stable ClOrdIDs, the 204-2 memo, funds by
dollar amount, blocks whose allocations sum exactly."""

from __future__ import annotations

import base64
import hashlib
from decimal import Decimal

import pytest

from rebal_pipeline.tickets.orders import BlockOrder, TicketError, build_blocks, build_orders, cl_ord_id
from rebal_pipeline_tests.tickets.book import (
    ACCOUNTS, PLACED_AT, PLACED_BY, POLICY, SECURITIES, approved_book, book_orders, decision, package, trade,
)


def _by(orders, account, symbol):
    return next(o for o in orders if o.account_id == account and o.symbol == symbol)


def test_every_approved_trade_becomes_one_order():
    orders = book_orders()
    assert len(orders) == sum(len(p.trades) for p, _ in approved_book()) == 9
    assert {(o.account_id, o.symbol, o.side) for o in orders} == {
        (t.account_id, t.symbol, t.side) for p, _ in approved_book() for t in p.trades}


def test_cl_ord_ids_are_unique_within_a_batch_and_fit_a_20_character_desk_limit():
    ids = [o.cl_ord_id for o in book_orders()]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and i.startswith("RB") and i[2:].isalnum() and i.isupper() for i in ids)


def test_cl_ord_ids_are_the_same_on_every_run():
    assert [o.cl_ord_id for o in book_orders()] == [o.cl_ord_id for o in book_orders()]
    # Pinned: a change here means a re-run after an upgrade would stage a second, different order.
    # "RB" + the first 18 base32 characters of SHA-256("order|DEC-1|ACC-1|VTI|sell").
    digest = base64.b32encode(hashlib.sha256(b"order|DEC-1|ACC-1|VTI|sell").digest()).decode()
    assert cl_ord_id("DEC-1", "ACC-1", "VTI", "sell") == "RB" + digest[:18] == "RBXOW2VQIIQXNWTUZRB7"
    assert _by(book_orders(), "ACC-1", "VTI").cl_ord_id == "RBXOW2VQIIQXNWTUZRB7"


def test_another_decision_on_the_same_trade_gets_another_cl_ord_id():
    assert cl_ord_id("DEC-1", "ACC-1", "VTI", "sell") != cl_ord_id("DEC-9", "ACC-1", "VTI", "sell")
    assert cl_ord_id("DEC-1", "ACC-1", "VTI", "sell") != cl_ord_id("DEC-1", "ACC-1", "VTI", "buy")


def test_every_order_carries_its_rule_204_2_memo():
    for order in book_orders():
        memo = order.memo
        assert memo.terms and memo.recommended_by and memo.approved_by and memo.placed_by and memo.account_id
        assert memo.order_time == PLACED_AT and memo.placed_by == PLACED_BY
    vti = _by(book_orders(), "ACC-1", "VTI")
    assert vti.memo.model_dump() == {
        "terms": "SELL 10 VTI MARKET DAY", "recommended_by": f"rebal:REC-HH1@{POLICY}", "approved_by": "ADV-1",
        "placed_by": "TRD-0001", "account_id": "ACC-1", "order_time": PLACED_AT, "discretionary": False,
    }


def test_an_auto_approved_order_names_the_policy_rule_as_approver_and_is_discretionary():
    aapl = _by(book_orders(), "ACC-4", "AAPL")
    assert aapl.approved_by == "policy:micro-trade-v1" and aapl.discretionary
    # An auto-approval recorded with a bare rule id still names the rule, never a person.
    pkg, _ = approved_book()[2]
    bare = build_orders(pkg, pkg.trades, decision("DEC-3", "REC-3", "micro-trade-v1", "auto_approve"), SECURITIES,
                        ACCOUNTS, placed_by=PLACED_BY, placed_at=PLACED_AT)
    assert {o.approved_by for o in bare} == {"policy:micro-trade-v1"}


def test_a_fund_buy_is_a_dollar_amount_and_a_fund_sell_is_shares():
    orders = book_orders()
    vbtlx = _by(orders, "ACC-1", "VBTLX")
    assert (vbtlx.quantity, vbtlx.cash_amount) == (None, Decimal("1000.00"))  # 103.093 × 9.70 = 1000.0021
    assert vbtlx.terms == "BUY $1000.00 VBTLX MARKET DAY"
    vtsax = _by(orders, "ACC-2", "VTSAX")  # the whole position, by shares
    assert (vtsax.quantity, vtsax.cash_amount) == (Decimal("12.345"), None)
    swvxx = _by(orders, "ACC-4", "SWVXX")  # money market: a fund at NAV too
    assert swvxx.cash_amount == Decimal("500.00")
    assert _by(orders, "ACC-4", "AAPL").quantity == Decimal(3)


def test_a_fractional_quantity_of_a_whole_share_security_is_refused():
    pkg = package("REC-X", "ADV-1", ["ACC-1"], [trade("ACC-1", "VTI", "buy", 2.5, 280.0)])
    with pytest.raises(TicketError, match="VTI trades in whole shares"):
        build_orders(pkg, pkg.trades, decision("DEC-X", "REC-X", "ADV-1"), SECURITIES, ACCOUNTS,
                     placed_by=PLACED_BY, placed_at=PLACED_AT)


@pytest.mark.parametrize("symbol", ["BOND1", "CASH"])
def test_bonds_and_cash_get_no_market_order_ticket(symbol):
    pkg = package("REC-X", "ADV-1", ["ACC-1"], [trade("ACC-1", symbol, "buy", 5, 100.0)])
    with pytest.raises(TicketError, match="is not sent as a market order ticket"):
        build_orders(pkg, pkg.trades, decision("DEC-X", "REC-X", "ADV-1"), SECURITIES, ACCOUNTS,
                     placed_by=PLACED_BY, placed_at=PLACED_AT)


def test_trades_outside_the_decision_or_the_recommendation_are_refused():
    pkg, _ = approved_book()[1]
    with pytest.raises(TicketError, match="is for recommendation REC-HH1, not REC-2"):
        build_orders(pkg, pkg.trades, decision("DEC-1", "REC-HH1", "ADV-1"), SECURITIES, ACCOUNTS,
                     placed_by=PLACED_BY, placed_at=PLACED_AT)
    with pytest.raises(TicketError, match="not part of recommendation REC-2"):
        build_orders(pkg, [trade("ACC-1", "VTI", "sell", 1, 280.0)], decision("DEC-2", "REC-2", "ADV-1"),
                     SECURITIES, ACCOUNTS, placed_by=PLACED_BY, placed_at=PLACED_AT)


def test_a_modified_trade_of_zero_is_dropped():
    pkg, dec = approved_book()[0]
    kept = [t if t.symbol != "VBTLX" else t.model_copy(update={"quantity": 0.0}) for t in pkg.trades]
    orders = build_orders(pkg, kept, dec, SECURITIES, ACCOUNTS, placed_by=PLACED_BY, placed_at=PLACED_AT)
    assert {o.symbol for o in orders} == {"VTI", "VTSAX"} and len(orders) == 3


def test_one_symbol_and_side_in_several_accounts_of_an_advisor_at_a_custodian_is_one_block():
    batch = build_blocks(book_orders())
    blocks = {(b.custodian, b.symbol, b.side): b for b in batch.blocks}
    assert set(blocks) == {("schwab", "VTI", "sell"), ("pershing", "IVV", "buy")}
    vti = blocks[("schwab", "VTI", "sell")]
    assert vti.quantity == Decimal(42)  # 10 + 25 + 7, across two decisions
    assert [(o.account_id, o.quantity) for o in vti.allocations] == [
        ("ACC-1", Decimal(10)), ("ACC-2", Decimal(25)), ("ACC-3", Decimal(7))]
    assert {o.decision_id for o in vti.allocations} == {"DEC-1", "DEC-2"}
    assert blocks[("pershing", "IVV", "buy")].quantity == Decimal(10)
    for block in batch.blocks:
        assert sum(o.quantity for o in block.allocations) == block.quantity
        assert len(block.block_id) == 20 and block.block_id.startswith("BK")
    # Everything else stays a single-account order; nothing is lost or doubled.
    assert {o.symbol for o in batch.standalone} == {"VBTLX", "VTSAX", "AAPL", "SWVXX"}
    assert len(batch.orders) == 9 and len(batch.tickets) == 2 + 4


def test_fractional_allocations_sum_exactly_to_the_block():
    # In floats 0.1 + 0.2 is 0.30000000000000004; the block must be exactly 0.3.
    pkg = package("REC-F", "ADV-1", ["ACC-1", "ACC-2"], [trade("ACC-1", "VTSAX", "sell", 0.1, 140.0),
                                                        trade("ACC-2", "VTSAX", "sell", 0.2, 140.0)])
    orders = build_orders(pkg, pkg.trades, decision("DEC-F", "REC-F", "ADV-1"), SECURITIES, ACCOUNTS,
                          placed_by=PLACED_BY, placed_at=PLACED_AT)
    (block,) = build_blocks(orders).blocks
    assert block.quantity == Decimal("0.3") and str(block.quantity) == "0.3"


def test_dollar_buys_and_mixed_discretion_are_not_blocked():
    accounts = ACCOUNTS | {"ACC-2": ACCOUNTS["ACC-2"].model_copy(update={"discretionary": True})}
    pkg = package("REC-M", "ADV-1", ["ACC-1", "ACC-2"], [
        trade("ACC-1", "VBTLX", "buy", 10, 9.70), trade("ACC-2", "VBTLX", "buy", 20, 9.70),
        trade("ACC-1", "VTI", "buy", 1, 280.0), trade("ACC-2", "VTI", "buy", 2, 280.0)])
    orders = build_orders(pkg, pkg.trades, decision("DEC-M", "REC-M", "ADV-1"), SECURITIES, accounts,
                          placed_by=PLACED_BY, placed_at=PLACED_AT)
    batch = build_blocks(orders)
    assert batch.blocks == () and len(batch.standalone) == 4


def test_blocks_are_the_same_on_every_run():
    assert build_blocks(book_orders()) == build_blocks(list(reversed(book_orders())))


def test_a_block_whose_allocations_do_not_sum_is_refused():
    block = next(b for b in build_blocks(book_orders()).blocks if b.symbol == "VTI")
    with pytest.raises(ValueError, match="allocations sum to 42, not the block's 43"):
        BlockOrder(**{**block.model_dump(), "quantity": Decimal(43), "allocations": block.allocations})


def test_the_same_trade_given_twice_is_refused():
    orders = book_orders()
    with pytest.raises(TicketError, match="ClOrdIDs repeat"):
        build_blocks(orders + orders[:1])
