"""The tax engine in the daily graph: tax_impact, recommendation_summary, tlh_candidates,
wash_sales and tax_lots from a hand-made feed, with hand-computed numbers.

Every household below pays 32% federal ordinary, 15% federal LTCG and 5% state: short-term
gains at 37%, long-term at 20%. Prices: VTI $100, BND $50, SCHB $50 (VTI's harvest substitute,
another wash group)."""

from datetime import timedelta

import polars as pl

from rebal_pipeline.core.overrides import WashSaleOverride, record_override
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder


def book() -> FeedBuilder:
    b = FeedBuilder()
    b.add("securities", symbol="SCHB", cusip="", description="SCHB test security", asset_class="equity",
          security_type="etf", wash_group="us_broad_dj", tlh_substitute="VTI", fractional="false")
    b.add("prices", symbol="SCHB", close="50")
    next(r for r in b.rows["securities"] if r["symbol"] == "VTI")["tlh_substitute"] = "SCHB"
    return b


def lot(b, account, symbol, lot_id, days_ago, quantity, cost_basis):
    b.add("lots", account_id=account, symbol=symbol, lot_id=lot_id,
          open_date=(AS_OF - timedelta(days=days_ago)).isoformat(), quantity=str(quantity), cost_basis=str(cost_basis))


def drifted_taxable_account(b, account="ACC-T", household="HH-1", vti_lots=((800, 40, 2400), (100, 30, 2850))):
    """$10,000 at 70/30 on the 60/40 model: the sizer sells 10 VTI and buys 20 BND."""
    b.household(household)
    row = b.account(account, household)
    b.position(account, "VTI", 70, lots=False)
    for i, (days_ago, quantity, basis) in enumerate(vti_lots, start=1):
        lot(b, account, "VTI", f"{account}-L{i}", days_ago, quantity, basis)
    b.position(account, "BND", 60)
    b.position(account, "CASH", "0")
    return row


def transaction(b, account, symbol, days_ago, kind, quantity, price, cost_basis="", acquired_days_ago=None):
    b.add("transactions", account_id=account, symbol=symbol, trade_date=(AS_OF - timedelta(days=days_ago)).isoformat(),
          type=kind, quantity=str(quantity), price=str(price), cost_basis=str(cost_basis),
          acquired_date="" if acquired_days_ago is None else (AS_OF - timedelta(days=acquired_days_ago)).isoformat())


def run(workspace, dagster_instance, b):
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success


def test_fifo_sells_the_oldest_lot_and_the_summary_shows_its_long_term_tax(workspace, dagster_instance):
    b = book()
    drifted_taxable_account(b)
    run(workspace, dagster_instance, b)
    impact = workspace.table("tax_impact").filter(pl.col("account_id") == "ACC-T")
    # FIFO (no instruction on the account): 10 shares of the 800-day-old $60 lot → +$400 long-term.
    assert impact.select("lot_id", "quantity", "proceeds", "cost_basis", "gain", "term", "est_tax").rows() == [
        ("ACC-T-L1", 10.0, 1000.0, 600.0, 400.0, "long", 80.0)]
    summary = workspace.table("recommendation_summary").filter(pl.col("scope_id") == "ACC-T").row(0, named=True)
    # Trades: sell $1,000 VTI + buy $1,000 BND; tax $80 = 4% of $2,000 traded.
    assert (summary["trade_value"], summary["lt_gain"], summary["st_gain"], summary["est_tax"], summary["net_tax_pct"]) \
        == (2000.0, 400.0, 0.0, 80.0, 0.04)
    assert summary["wait_for_long_term"] is False


def test_hifo_instruction_sells_the_dearest_lot_short_term(workspace, dagster_instance):
    b = book()
    drifted_taxable_account(b)["lot_relief_method"] = "hifo"
    run(workspace, dagster_instance, b)
    impact = workspace.table("tax_impact").filter(pl.col("account_id") == "ACC-T")
    # HIFO: the $95 lot bought 100 days ago → +$50 short-term, 37% → $18.50; long-term in 266 days.
    assert impact.select("lot_id", "gain", "term", "est_tax", "days_to_long_term", "lot_relief_method").rows() == [
        ("ACC-T-L2", 50.0, "short", 18.5, 266, "hifo")]


def test_short_term_lots_turning_long_term_in_10_days_advise_waiting(workspace, dagster_instance):
    b = book()
    # The $95 lot was bought 356 days ago (2025-11-29): long-term from 2026-11-30, in 10 days.
    drifted_taxable_account(b, vti_lots=((800, 40, 2400), (356, 30, 2850)))["lot_relief_method"] = "hifo"
    run(workspace, dagster_instance, b)
    summary = workspace.table("recommendation_summary").filter(pl.col("scope_id") == "ACC-T").row(0, named=True)
    # $50 short-term gain × (32% − 15%) = $8.50 saved; drift 10 points on a ±7 band (1.43× < 2×).
    assert summary["wait_for_long_term"] is True
    assert summary["tax_saved_by_waiting"] == 8.5
    assert summary["wait_until"] == AS_OF + timedelta(days=10)
    assert summary["wait_reason"].startswith(f"wait until {AS_OF + timedelta(days=10)} (10 days)")
    # The advisor still sees the trades.
    assert workspace.table("trade_proposals").filter(pl.col("account_id") == "ACC-T").height == 2


def ira_buying_vti(b, household="HH-1"):
    """An IRA of the same household at 50/50: the sizer buys 10 VTI and sells 20 BND."""
    b.account("ACC-IRA", household, account_type="traditional_ira")
    b.position("ACC-IRA", "VTI", 50)
    b.position("ACC-IRA", "BND", 100)
    b.position("ACC-IRA", "CASH", "0")


def test_a_buy_in_the_households_ira_that_would_wash_todays_loss_is_replaced_by_the_substitute(workspace, dagster_instance):
    b = book()
    drifted_taxable_account(b, vti_lots=((800, 70, 7700),))  # $110 a share: selling 10 loses $100
    ira_buying_vti(b)
    run(workspace, dagster_instance, b)
    ira = workspace.table("trade_proposals").filter(pl.col("account_id") == "ACC-IRA").sort("side")
    # $1,000 of VTI becomes 20 SCHB at $50 (another wash group), marked as a substitute.
    assert ira.select("side", "symbol", "quantity", "reason", "replaces_symbol").rows() == [
        ("buy", "SCHB", 20.0, "substitute", "VTI"), ("sell", "BND", 20.0, "rebalance", None)]
    impact = workspace.table("tax_impact").filter(pl.col("account_id") == "ACC-T").row(0, named=True)
    # The $100 long-term loss stays deductible: saves $20.
    assert (impact["gain"], impact["wash_sale_disallowed"], impact["est_tax"]) == (-100.0, 0.0, -20.0)
    summary = workspace.table("recommendation_summary").filter(pl.col("scope_id") == "ACC-T").row(0, named=True)
    assert summary["realized_loss"] == 100.0
    assert f"through {AS_OF + timedelta(days=30)}" in summary["wash_sale_watch"]


def test_an_advisor_override_keeps_the_washing_buy_and_the_loss_is_lost_in_the_ira(workspace, dagster_instance):
    b = book()
    drifted_taxable_account(b, vti_lots=((800, 70, 7700),))
    ira_buying_vti(b)
    record_override(workspace.overrides_path, WashSaleOverride(
        as_of=AS_OF, account_id="ACC-IRA", symbol="VTI", reason="Client insists on the model's VTI in the IRA",
        decided_by="ADV-1"))
    run(workspace, dagster_instance, b)
    buy = workspace.table("trade_proposals").filter((pl.col("account_id") == "ACC-IRA") & (pl.col("side") == "buy"))
    assert buy.select("symbol", "quantity", "wash_sale_disallowed").rows() == [("VTI", 10.0, 100.0)]
    assert buy["wash_sale_override"].item() == "Client insists on the model's VTI in the IRA (ADV-1)"
    impact = workspace.table("tax_impact").filter(pl.col("account_id") == "ACC-T").row(0, named=True)
    # Rev. Rul. 2008-5: the whole $100 loss is disallowed and lost; no tax saving.
    assert (impact["wash_sale_disallowed"], impact["loss_lost_permanently"], impact["est_tax"]) == (100.0, True, 0.0)
    event = workspace.table("wash_sales").filter(pl.col("when") == "proposed").row(0, named=True)
    assert event["purchase_account_id"] == "ACC-IRA" and "Rev. Rul. 2008-5" in event["treatment"]


def test_a_buy_proposed_today_washes_a_loss_sold_12_days_ago(workspace, dagster_instance):
    b = book()
    b.household("HH-1")
    ira_buying_vti(b)
    b.account("ACC-T", "HH-1")
    b.position("ACC-T", "VTI", 60); b.position("ACC-T", "BND", 80)  # on target
    transaction(b, "ACC-T", "VTI", 12, "sell", 20, 90, cost_basis=2400, acquired_days_ago=400)  # $600 loss
    run(workspace, dagster_instance, b)
    ira_buy = workspace.table("trade_proposals").filter((pl.col("account_id") == "ACC-IRA") & (pl.col("side") == "buy"))
    assert ira_buy.select("symbol", "reason").rows() == [("SCHB", "substitute")]


def test_a_past_wash_sale_raises_the_replacement_lots_basis_pub_550(workspace, dagster_instance):
    # Pub. 550: 100 shares bought for $1,000 and sold for $750; 100 bought back 10 days later for
    # $800 → basis $1,050, holding period tacked.
    b = book()
    b.household("HH-1")
    b.account("ACC-T", "HH-1")
    b.position("ACC-T", "VTI", 100, lots=False)
    lot(b, "ACC-T", "VTI", "NEW", 10, 100, 800)
    b.position("ACC-T", "BND", 133); b.position("ACC-T", "CASH", "50")
    transaction(b, "ACC-T", "VTI", 20, "sell", 100, "7.5", cost_basis=1000, acquired_days_ago=220)
    transaction(b, "ACC-T", "VTI", 10, "buy", 100, 8)
    run(workspace, dagster_instance, b)
    lots = workspace.table("tax_lots").filter(pl.col("lot_id") == "NEW").row(0, named=True)
    assert (lots["lot_part"], lots["cost_basis"]) == ("replacement", 1050.0)
    # Held 200 days before the sale: the new shares count from 200 days before their purchase.
    assert lots["holding_from"] == AS_OF - timedelta(days=10 + 200)
    event = workspace.table("wash_sales").row(0, named=True)
    assert (event["when"], event["disallowed_loss"], event["loss_lost_permanently"]) == ("past", 250.0, False)


def test_a_lot_the_custodian_already_adjusted_is_not_adjusted_twice(workspace, dagster_instance):
    b = book()
    b.household("HH-1")
    b.account("ACC-T", "HH-1")
    b.position("ACC-T", "VTI", 100, lots=False)
    lot(b, "ACC-T", "VTI", "NEW", 10, 100, 1050)
    b.rows["lots"][-1]["wash_sale_adjusted"] = "true"
    b.position("ACC-T", "BND", 133); b.position("ACC-T", "CASH", "50")
    transaction(b, "ACC-T", "VTI", 20, "sell", 100, "7.5", cost_basis=1000, acquired_days_ago=220)
    transaction(b, "ACC-T", "VTI", 10, "buy", 100, 8)
    run(workspace, dagster_instance, b)
    assert workspace.table("tax_lots").filter(pl.col("lot_id") == "NEW")["cost_basis"].to_list() == [1050.0]
    assert "by the custodian" in workspace.table("wash_sales")["treatment"].item()


def harvestable_account(b):
    """On target (60/40, no rebalance) but its VTI lot cost $120 a share: down 16.7%, $1,200."""
    b.household("HH-1")
    b.account("ACC-H", "HH-1")
    b.position("ACC-H", "VTI", 60, cost_basis=7200, open_date=AS_OF - timedelta(days=200))
    b.position("ACC-H", "BND", 80, cost_basis=4000)


def test_a_lot_down_17_percent_is_harvested_into_the_substitute_as_its_own_recommendation(workspace, dagster_instance):
    b = book()
    harvestable_account(b)
    run(workspace, dagster_instance, b)
    candidate = workspace.table("tlh_candidates").filter(
        (pl.col("account_id") == "ACC-H") & (pl.col("symbol") == "VTI")).row(0, named=True)
    assert (candidate["unrealized_loss"], round(candidate["loss_pct"], 4), candidate["substitute_symbol"],
            candidate["wash_sale_conflict"], candidate["status"]) == (1200.0, 0.1667, "SCHB", False, "proposed")
    trades = workspace.table("trade_proposals").filter(pl.col("account_id") == "ACC-H").sort("side")
    assert trades.select("side", "symbol", "quantity", "reason").rows() == [
        ("buy", "SCHB", 120.0, "substitute"), ("sell", "VTI", 60.0, "tlh")]
    rec = workspace.table("trade_recommendations").filter(pl.col("account_id") == "ACC-H").row(0, named=True)
    assert rec["kind"] == "harvest" and rec["recommendation_id"] == candidate["recommendation_id"]
    summary = workspace.table("recommendation_summary").filter(pl.col("scope_id") == "ACC-H").row(0, named=True)
    # $1,200 short-term loss at 37%: $444 saved.
    assert (summary["kind"], summary["realized_loss"], summary["est_tax"]) == ("harvest", 1200.0, -444.0)


def test_a_purchase_in_the_household_5_days_ago_blocks_the_harvest(workspace, dagster_instance):
    b = book()
    harvestable_account(b)
    b.account("ACC-ROTH", "HH-1", account_type="roth_ira")
    b.position("ACC-ROTH", "VTI", 6, open_date=AS_OF - timedelta(days=5)); b.position("ACC-ROTH", "BND", 8)
    transaction(b, "ACC-ROTH", "VTI", 5, "buy", 6, 100)
    run(workspace, dagster_instance, b)
    candidate = workspace.table("tlh_candidates").filter(
        (pl.col("account_id") == "ACC-H") & (pl.col("symbol") == "VTI")).row(0, named=True)
    assert candidate["wash_sale_conflict"] is True and candidate["status"] == "wash_sale_conflict"
    assert candidate["conflict_clears_on"] == AS_OF - timedelta(days=5) + timedelta(days=31)
    assert "ACC-ROTH" in candidate["conflict_reason"]
    assert workspace.table("trade_proposals").filter(pl.col("account_id") == "ACC-H").height == 0


def test_rerunning_the_day_writes_the_same_tax_rows_once(workspace, dagster_instance):
    b = book()
    drifted_taxable_account(b, vti_lots=((800, 70, 7700),))
    ira_buying_vti(b)
    harvestable_account_rows = None  # (one household is enough)
    run(workspace, dagster_instance, b)
    first = {name: workspace.table(name).drop("as_of").sort(pl.all()) for name in
             ("tax_impact", "recommendation_summary", "trade_proposals", "tlh_candidates")}
    assert workspace.run_day(instance=dagster_instance).success
    for name, frame in first.items():
        assert workspace.table(name).drop("as_of").sort(pl.all()).equals(frame), name
    assert harvestable_account_rows is None
