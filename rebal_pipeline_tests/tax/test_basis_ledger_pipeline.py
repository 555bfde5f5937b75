"""rebal's basis ledger through the daily graph: two consecutive sessions of hand-made feeds
(Thu 2026-11-19, Fri 2026-11-20), the `basis_adjustments` asset carrying day 1's adjustment
into day 2, and the drift alert's TLH flag agreeing with tlh_candidates on the wash-adjusted
basis (issue 14).

Household HH-1 (taxable accounts A, B, C; C tax-sensitive), one security VTI.
Day 1: A sold 100 VTI on Nov 2 for $90 (basis $10,000, bought Jun 1: a $1,000 loss, held 154
days); B bought 100 on Nov 5 for $92 (lot B1, $9,200). Day 2: B sold those 100 on Nov 20 for $88
(B's custodian reports $9,200: it does not see A, IRC §6045(g)); C bought 100 the same day for
$88 (lot C1, $8,800); VTI closes at $91.80."""

from datetime import date

import polars as pl

from rebal_pipeline_tests.feedkit import FeedBuilder

DAY_1, DAY_2 = date(2026, 11, 19), date(2026, 11, 20)


def transaction(b, account, day, kind, quantity, price, cost_basis="", acquired=None):
    b.add("transactions", account_id=account, symbol="VTI", trade_date=day.isoformat(), type=kind,
          quantity=str(quantity), price=str(price), cost_basis=str(cost_basis),
          acquired_date="" if acquired is None else acquired.isoformat())


def feed(as_of: date) -> FeedBuilder:
    b = FeedBuilder(as_of=as_of)
    b.household("HH-1")
    for account in ("A", "B", "C"):
        b.account(account, "HH-1", tax_sensitive=account == "C")
        b.position(account, "BND", 80, cost_basis=4000)
    transaction(b, "A", date(2026, 11, 2), "sell", 100, 90, 10000, date(2026, 6, 1))
    transaction(b, "B", date(2026, 11, 5), "buy", 100, 92)
    if as_of == DAY_1:
        b.position("B", "VTI", 100, lots=False)
        b.add("lots", account_id="B", symbol="VTI", lot_id="B1", open_date="2026-11-05", quantity="100",
              cost_basis="9200")
    else:
        transaction(b, "B", DAY_2, "sell", 100, 88, 9200, date(2026, 11, 5))
        transaction(b, "C", DAY_2, "buy", 100, 88)
        b.position("C", "VTI", 100, lots=False)
        b.add("lots", account_id="C", symbol="VTI", lot_id="C1", open_date="2026-11-20", quantity="100",
              cost_basis="8800")
        next(r for r in b.rows["prices"] if r["symbol"] == "VTI")["close"] = "91.80"
    return b


def test_a_wash_chain_across_accounts_and_two_sessions(workspace, dagster_instance):
    """Day 1: A's $1,000 loss goes onto B1 (IRC §1091(d)): basis $10,200, holding from Nov 5 −
    154 days = Jun 4 (§1223(3)). Day 2, with day 1's ledger: B's loss is $9,200 + $1,000 − $8,800
    = $1,400 (not the custodian's $400), washed by C's purchase: C1's basis $8,800 + $1,400 =
    $10,200, holding from Jun 4. Re-running day 2 writes the same ledger."""
    feed(DAY_1).write(workspace.feed_root)
    assert workspace.run_day(DAY_1, instance=dagster_instance).success
    day_1 = workspace.table("basis_adjustments", DAY_1)
    assert day_1.select("account_id", "lot_id", "sale_account_id", "held_quantity", "basis_added",
                        "holding_from", "applied_to_lot").rows() == [
        ("B", "B1", "A", 100.0, 1000.0, date(2026, 6, 4), True)]
    b1 = workspace.table("tax_lots", DAY_1).filter(pl.col("lot_id") == "B1")
    assert b1.select("lot_part", "cost_basis").rows() == [("replacement", 10200.0)]

    feed(DAY_2).write(workspace.feed_root)
    assert workspace.run_day(DAY_2, instance=dagster_instance).success
    c1 = workspace.table("tax_lots", DAY_2).filter(pl.col("lot_id") == "C1")
    assert c1.select("lot_part", "cost_basis", "holding_from").rows() == [
        ("replacement", 10200.0, date(2026, 6, 4))]
    second = workspace.table("wash_sales", DAY_2).filter(
        (pl.col("when") == "past") & (pl.col("account_id") == "B")).row(0, named=True)
    assert (second["loss"], second["basis_from_earlier_wash_sales"], second["disallowed_loss"]) == (
        1400.0, 1000.0, 1400.0)
    ledger = workspace.table("basis_adjustments", DAY_2).drop("as_of").sort("sale_id")
    assert ledger.select("lot_id", "held_quantity", "basis_added", "applied_to_lot").rows() == [
        ("B1", 0.0, 1000.0, False), ("C1", 100.0, 1400.0, True)]

    assert workspace.run_day(DAY_2, instance=dagster_instance).success
    assert workspace.table("basis_adjustments", DAY_2).drop("as_of").sort("sale_id").equals(ledger)


def test_the_tlh_flag_and_tlh_candidates_agree_on_the_wash_adjusted_basis(workspace, dagster_instance):
    """C1 at $91.80: $9,180 against its reported $8,800 is a gain, but against its wash-adjusted
    $10,200 a loss of $1,020 — exactly 10% (0.0999… in floating point). One rule (policy
    threshold − TLH_LOSS_TOLERANCE, wash-adjusted parts): the drift alert's TLH flag and
    tlh_candidates both count it."""
    for day in (DAY_1, DAY_2):
        feed(day).write(workspace.feed_root)
        assert workspace.run_day(day, instance=dagster_instance).success
    candidate = workspace.table("tlh_candidates", DAY_2).filter(pl.col("lot_id") == "C1").row(0, named=True)
    assert (candidate["lot_part"], candidate["cost_basis"], candidate["unrealized_loss"]) == (
        "replacement", 10200.0, 1020.0)
    flags = workspace.table("int_tlh_flags", DAY_2).filter(pl.col("account_id") == "C")
    assert flags.select("harvestable_lots", pl.col("harvestable_loss").round(2)).rows() == [(1, 1020.0)]
    alert = workspace.table("drift_alerts", DAY_2).filter(pl.col("scope_id") == "C").row(0, named=True)
    assert alert["tlh_flag"] is True
