"""Aggregated households: asset location across accounts, one recommendation per household."""

import polars as pl

from rebal_pipeline_tests.feedkit import FeedBuilder


def test_household_keeps_gains_unrealised_in_taxable_and_puts_bonds_in_the_ira(workspace, dagster_instance):
    b = FeedBuilder()
    b.household("HH-AGG", aggregate=True)
    b.account("ACC-TAX", "HH-AGG", account_type="taxable")
    b.account("ACC-IRA", "HH-AGG", account_type="traditional_ira")
    # Taxable: $80k VTI bought at $40 (a $48k gain) and $20k BND at cost. IRA: $60k VTI, $40k BND.
    # Household $200k at 70/30 against 60/40: equity +10 points, outside the ±5 standard band.
    b.position("ACC-TAX", "VTI", 800, cost_basis=800 * 40); b.position("ACC-TAX", "BND", 400, cost_basis=400 * 50)
    b.position("ACC-TAX", "CASH", "0")
    b.position("ACC-IRA", "VTI", 600); b.position("ACC-IRA", "BND", 800); b.position("ACC-IRA", "CASH", "0")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success

    alert = workspace.table("drift_alerts").filter(pl.col("scope_id") == "HH-AGG").row(0, named=True)
    assert alert["scope"] == "household" and alert["status"] == "alert"
    trades = workspace.table("trade_proposals").sort("account_id", "side", "symbol")
    by_key = {(r["account_id"], r["side"], r["symbol"]): r for r in trades.iter_rows(named=True)}
    # No VTI is sold in the taxable account: its gain stays unrealised.
    assert ("ACC-TAX", "sell", "VTI") not in by_key
    # Bonds go to the IRA, equity to taxable: taxable swaps its bonds for VTI, the IRA the reverse.
    assert by_key[("ACC-TAX", "sell", "BND")]["quantity"] == 400
    assert by_key[("ACC-TAX", "buy", "VTI")]["quantity"] == 200
    assert by_key[("ACC-IRA", "sell", "VTI")]["quantity"] == 400
    assert by_key[("ACC-IRA", "buy", "BND")]["quantity"] == 800
    # Buying equity in taxable while the household is over in equity is a location trade.
    assert by_key[("ACC-TAX", "buy", "VTI")]["reason"] == "location"
    assert trades["recommendation_id"].n_unique() == 1

    rec = workspace.table("trade_recommendations").filter(pl.col("scope") == "household").row(0, named=True)
    assert rec["scope_id"] == "HH-AGG" and rec["inside_bands"] and rec["trade_count"] == 4
    assert rec["recommendation_id"] == trades["recommendation_id"][0]
