"""One small hand-computed book per sizing rule: each rule function of `core/trade_sizing.py`,
frames in and frames out, checked on its own (the end-to-end behaviour is in
test_trade_sizing.py and test_tax_aware_sizing.py).

The base book: account A worth $10,000 — CASH $1,000, VTI 60 × $100 = $6,000 (equity),
BND 30 × $100 = $3,000 (bonds); targets equity 50%, bonds 40%, cash 10%; model VTI 0.5,
BND 0.4; minimum trade max($100, 0.1% × $10,000) = $100."""

from __future__ import annotations

import polars as pl
import pytest

from rebal_pipeline.core import trade_sizing as ts

POLICY = ts.SizingPolicy()


def _book(
    holdings=(("A", "CASH", "cash", 1000.0, 1.0), ("A", "VTI", "equity", 60.0, 100.0), ("A", "BND", "bonds", 30.0, 100.0)),
    targets=(("A", "equity", 0.5), ("A", "bonds", 0.4), ("A", "cash", 0.1)),
    model=(("A", "VTI", 0.5), ("A", "BND", 0.4)),
    shelf=(("CASH", "cash", True, 1.0), ("VTI", "equity", False, 100.0), ("BND", "bonds", False, 100.0)),
    restrictions=(),
    tax=None,
) -> dict:
    frames = {
        "holdings": pl.DataFrame(
            [(a, s, c, q, p, q * p) for a, s, c, q, p in holdings], schema=ts._INPUTS["holdings"], orient="row"
        ),
        "class_targets": pl.DataFrame(list(targets), schema=ts._INPUTS["class_targets"], orient="row"),
        "model_weights": pl.DataFrame(list(model), schema=ts._INPUTS["model_weights"], orient="row"),
        "securities": pl.DataFrame(list(shelf), schema=ts._INPUTS["securities"], orient="row"),
        "restrictions": pl.DataFrame(list(restrictions), schema=ts._INPUTS["restrictions"], orient="row"),
        "sell_tax_cost": None
        if tax is None
        else pl.DataFrame(list(tax), schema=ts._INPUTS["sell_tax_cost"], orient="row"),
    }
    return frames


def _prepared(**kw):
    f = _book(**kw)
    return ts._prepare_inputs(
        f["holdings"], f["class_targets"], f["model_weights"], f["securities"], f["restrictions"], f["sell_tax_cost"]
    )


def _stages(policy: ts.SizingPolicy = POLICY, **kw) -> dict:
    """Runs the rules in size_trades' order, keeping every intermediate frame."""
    book = _prepared(**kw)
    targets, unreachable = ts._security_targets(book.ct, book.mw, book.held, book.model_first)
    acct = ts._cash_target(book.accounts, book.hv, targets, book.min_cash, book.ct, policy)
    final_t, nobuy_unsub = ts._no_buy_substitutes(book, targets, acct)
    u0 = ts._universe(book, final_t, acct, policy)
    u_tax = ts._tax_aware_class_sells(u0, book.taxable, book.stc)
    u_sell = ts._sells(u_tax)
    u_buy = ts._buys(u_sell)
    u_top = ts._top_up(u_buy)
    u_why = ts._trade_reasons(u_top)
    return dict(locals())


def _row(df: pl.DataFrame, symbol: str) -> dict:
    rows = df.filter(pl.col("symbol") == symbol).to_dicts()
    assert len(rows) == 1, rows
    return rows[0]


def test_prepare_inputs_keys_the_book_and_reads_restrictions():
    book = _prepared(
        holdings=(("A", "CASH", None, 500.0, 1.0), ("A", "VTI", "equity", 1.0, 100.0), ("A", "VTI", "equity", 2.0, 100.0),
                  ("B", "VTI", "equity", 5.0, 100.0)),
        restrictions=(("A", "no_buy_symbol", " VTI "), ("A", "min_cash_weight", "0.05")),
    )
    # Only account A has class targets, so B is not sized; CASH is always class cash; lots summed.
    assert book.accounts["account_id"].to_list() == ["A"]
    assert book.hv.select("symbol", "asset_class", "quantity", "market_value").rows() == [
        ("CASH", "cash", 500.0, 500.0),
        ("VTI", "equity", 3.0, 300.0),
    ]
    assert book.no_buy.rows() == [("A", "VTI", True)]
    assert book.min_cash.rows() == [("A", 0.05)]
    assert book.taxable.height == 0


def test_rule1_security_targets_scale_model_weights_and_fall_back_to_holdings():
    # The model has no cash security, so the cash class target goes to what A holds there (CASH).
    s = _stages(targets=(("A", "equity", 0.6), ("A", "bonds", 0.3), ("A", "cash", 0.1)), model=(("A", "VTI", 1.0), ("A", "BND", 3.0)))
    assert s["targets"].sort("symbol").rows() == [
        ("A", "BND", "bonds", 0.3),  # 0.3 × 3 / 3
        ("A", "CASH", "cash", 0.1),
        ("A", "VTI", "equity", 0.6),
    ]
    assert s["unreachable"].height == 0


def test_rule1_class_without_any_security_is_unreachable():
    s = _stages(targets=(("A", "equity", 0.5), ("A", "gold", 0.4), ("A", "cash", 0.1)))
    assert s["unreachable"].rows() == [("A", "gold", True)]


def test_rule2_cash_target_from_min_cash_scales_the_other_targets_down():
    s = _stages(restrictions=(("A", "min_cash_weight", "0.2"),))
    a = s["acct"].to_dicts()[0]
    assert a["market_value"] == 10_000.0 and a["cash_before"] == 1000.0
    assert a["cash_target_w"] == pytest.approx(0.2)
    assert a["cash_target_v"] == pytest.approx(2000.0)
    assert a["f"] == pytest.approx(0.8 / 0.9)  # the 90% non-cash targets squeezed into 80%
    assert a["threshold"] == 100.0


def test_rule2_no_room_needed_keeps_targets():
    a = _stages()["acct"].to_dicts()[0]
    assert (a["cash_target_w"], a["f"], a["cash_target_v"]) == (pytest.approx(0.1), 1.0, pytest.approx(1000.0))


def test_rule4_no_buy_target_above_holding_moves_to_a_shelf_substitute():
    s = _stages(
        shelf=(("CASH", "cash", True, 1.0), ("VTI", "equity", False, 100.0), ("BND", "bonds", False, 100.0),
               ("AGG", "bonds", False, 50.0)),
        restrictions=(("A", "no_buy_symbol", "BND"),),
    )
    # BND keeps its 30% holding; the other 10% of the bonds target goes to AGG (tier 4: shelf).
    assert s["final_t"].sort("symbol").select("symbol", "tw", "sub_w").rows() == [
        ("AGG", pytest.approx(0.1), pytest.approx(0.1)),
        ("BND", pytest.approx(0.3), 0.0),
        ("VTI", 0.5, 0.0),
    ]
    assert s["nobuy_unsub"].height == 0


def test_rule4_no_buy_without_substitute_is_reported():
    s = _stages(restrictions=(("A", "no_buy_symbol", "BND"),))
    assert s["nobuy_unsub"].rows() == [("A", "bonds", "BND")]


def test_rule3t_taxable_class_sells_its_net_excess_cheapest_tax_first():
    s = _stages(
        holdings=(("A", "CASH", "cash", 1000.0, 1.0), ("A", "VTI", "equity", 40.0, 100.0), ("A", "SPY", "equity", 20.0, 100.0),
                  ("A", "BND", "bonds", 30.0, 100.0)),
        model=(("A", "VTI", 0.25), ("A", "SPY", 0.25), ("A", "BND", 0.4)),
        shelf=(("CASH", "cash", True, 1.0), ("VTI", "equity", False, 100.0), ("SPY", "equity", False, 100.0),
               ("BND", "bonds", False, 100.0)),
        tax=(("A", "VTI", 0.2), ("A", "SPY", -0.1)),
    )
    u = s["u_tax"]
    # Equity holds $6,000 against a $5,000 target: the $1,000 excess comes from SPY (a loss).
    assert _row(u, "SPY")["tax_class"] and _row(u, "VTI")["tax_class"]
    assert (_row(u, "SPY")["tax_sell_v"], _row(u, "VTI")["tax_sell_v"]) == (1000.0, 0.0)
    assert not _row(u, "BND")["tax_class"]  # underweight: rule 3 as usual
    # ... so the trades: sell 10 SPY, nothing bought in equity (VTI is $1,500 under its own target).
    assert (_row(s["u_sell"], "SPY")["sell_q_final"], _row(s["u_sell"], "VTI")["sell_q_final"]) == (10.0, 0.0)
    assert _row(s["u_top"], "VTI")["buy_q_final"] == 0.0


def test_rule3t_without_tax_rows_changes_nothing():
    u = _stages()["u_tax"]
    assert u["tax_class"].to_list() == [False, False]
    assert u["tax_sell_v"].to_list() == [0.0, 0.0]


def test_rule3_sells_overweight_to_target_in_whole_shares():
    u = _stages()["u_sell"]
    vti = _row(u, "VTI")
    assert vti["want_sell_v"] == 1000.0 and vti["sell_q_final"] == 10.0 and not vti["ceil_changed"]
    assert _row(u, "BND")["sell_q_final"] == 0.0
    assert vti["proceeds"] == 1000.0


def test_rule3_no_sell_blocks_the_sell():
    u = _stages(restrictions=(("A", "no_sell_symbol", "VTI"),))["u_sell"]
    vti = _row(u, "VTI")
    assert vti["sell_q_final"] == 0.0 and vti["blocked_sell_v"] == 1000.0


def test_rule3_buys_use_the_cash_available_rounded_down():
    u = _stages()["u_buy"]
    bnd = _row(u, "BND")
    # Cash available = 1,000 + 1,000 proceeds − 1,000 target = 1,000 = the wanted buy.
    assert (bnd["avail"], bnd["total_want"], bnd["scale"]) == (1000.0, pytest.approx(1000.0), pytest.approx(1.0))
    assert bnd["buy_q_final"] == 10.0
    assert not bnd["buys_cut"]


def test_rule3_buys_are_cut_by_one_factor_when_cash_is_short():
    # VTI may not be sold: the $1,000 of cash is exactly the 10% cash target, so nothing to spend.
    u = _stages(restrictions=(("A", "no_sell_symbol", "VTI"),))["u_buy"]
    bnd = _row(u, "BND")
    assert (bnd["avail"], bnd["scale"], bnd["buy_q_final"]) == (0.0, 0.0, 0.0)
    # The whole buy was cut for cash (rule 8), not dropped as dust (nothing was left to round).
    assert bnd["buys_cut"] and bnd["blocked_any"] and not bnd["buy_dust"]


def test_rule6b_tops_up_a_class_whose_split_buys_are_under_one_share():
    # $1,000 in cash, equity 90% split over VTI and SPY at $600: each wants $450, under a share.
    s = _stages(
        holdings=(("A", "CASH", "cash", 1000.0, 1.0),),
        targets=(("A", "equity", 0.9), ("A", "cash", 0.1)),
        model=(("A", "VTI", 0.5), ("A", "SPY", 0.5)),
        shelf=(("CASH", "cash", True, 1.0), ("VTI", "equity", False, 600.0), ("SPY", "equity", False, 600.0)),
    )
    assert (_row(s["u_buy"], "SPY")["buy_q_final"], _row(s["u_buy"], "VTI")["buy_q_final"]) == (0.0, 0.0)
    top = s["u_top"]
    # $900 investable buys one $600 share; the tie goes alphabetical (SPY); no longer dust.
    assert (_row(top, "SPY")["topup_q"], _row(top, "SPY")["buy_q_final"]) == (1.0, 1.0)
    assert _row(top, "VTI")["buy_q_final"] == 0.0
    assert not _row(top, "SPY")["buy_dust"]
    assert _row(s["u_why"], "SPY")["buy_reason"] == "rebalance"


def test_rule8_sell_enlarged_for_the_cash_target_is_cash():
    u = _stages(restrictions=(("A", "min_cash_weight", "0.2"),))["u_why"]
    vti, bnd = _row(u, "VTI"), _row(u, "BND")
    # VTI target 0.5 × 0.8/0.9 = 44.44% → sell $1,555.56, of which $555.56 (≥ $100) for cash.
    assert vti["sell_q_final"] == 16.0 and vti["sell_reason"] == "cash"
    # BND target 35.56% → buy $555.56 → 5 shares; the $600 available covers it: rebalance.
    assert bnd["buy_q_final"] == 5.0 and bnd["buy_reason"] == "rebalance"
    assert vti["post_v"] == 4400.0 and bnd["post_v"] == 3500.0


def test_rule8_plain_rebalance_and_the_trade_rows():
    s = _stages()
    assert _row(s["u_why"], "VTI")["sell_reason"] == "rebalance"
    trades = ts._trade_rows(s["u_why"])
    assert trades.rows() == [
        ("A", "BND", "bonds", "buy", 10.0, 100.0, 1000.0, "rebalance"),
        ("A", "VTI", "equity", "sell", 10.0, 100.0, 1000.0, "rebalance"),
    ]


def _bands(band: float = 0.05) -> pl.DataFrame:
    return pl.DataFrame(
        [("A", c, band) for c in ("equity", "bonds", "cash")], schema=ts._INPUTS["bands"], orient="row"
    )


def test_account_totals_and_rule7_inside_bands():
    s = _stages()
    acct = ts._account_totals(s["acct"], s["u_why"])
    a = acct.to_dicts()[0]
    assert (a["proceeds"], a["buy_cost"], a["cash_after"], a["trade_count"], a["dust_dropped"]) == (1000.0, 1000.0, 1000.0, 2, 0)
    book = s["book"]
    breached = ts._band_check(s["u_why"], acct, book.ct, _bands(), book.barred, s["unreachable"], s["nobuy_unsub"])
    assert breached.height == 0


def test_rule7_barred_class_is_explained_and_its_money_stays_in_cash():
    s = _stages(restrictions=(("A", "no_asset_class", "bonds"),))
    acct = ts._account_totals(s["acct"], s["u_why"])
    book = s["book"]
    breached = ts._band_check(s["u_why"], acct, book.ct, _bands(), book.barred, s["unreachable"], s["nobuy_unsub"])
    # VTI still sells $1,000 into cash; bonds are frozen at 30%.
    assert breached.rows() == [
        (
            "A",
            "bonds at 30.0% vs target 40.0% ±5.0%: barred by the plan restriction (no_asset_class bonds): nothing of it"
            " may be bought or sold | cash at 20.0% vs target 10.0% ±5.0%: money meant for bonds cannot be invested"
            " and stays in cash",
        )
    ]
    assert ts._compliance_review(book.hv, book.barred).rows() == [
        (
            "A",
            "holds bonds (BND), barred by ERISA plan restriction (no_asset_class): no trade proposed, review with compliance",
        )
    ]
