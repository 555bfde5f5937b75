"""trade_proposals in the daily graph: alerted accounts get whole-share trades with stable ids."""

import polars as pl

from rebal_pipeline_tests.feedkit import FeedBuilder


def book() -> FeedBuilder:
    b = FeedBuilder()
    b.model("M8020", VTI="0.8", BND="0.2")
    # $10,000 at 70/30 on the 60/40 model: sell 10 VTI ($1,000), buy 20 BND ($1,000).
    b.household("HH-1"); b.account("ACC-6040")
    b.position("ACC-6040", "VTI", 70); b.position("ACC-6040", "BND", 60); b.position("ACC-6040", "CASH", "0")
    # $10,000 at 90/10 on the 80/20 model: sell 10 VTI, buy 20 BND.
    b.household("HH-2"); b.account("ACC-8020", "HH-2", model_id="M8020")
    b.position("ACC-8020", "VTI", 90); b.position("ACC-8020", "BND", 20); b.position("ACC-8020", "CASH", "0")
    # On target: no alert, no proposal.
    b.household("HH-3"); b.account("ACC-OK", "HH-3")
    b.position("ACC-OK", "VTI", 60); b.position("ACC-OK", "BND", 80)
    return b


def trades_of(ws, account: str) -> list[tuple]:
    t = ws.table("trade_proposals").filter(pl.col("account_id") == account).sort("side", "symbol")
    return list(t.select("side", "symbol", "quantity", "reason").iter_rows())


def test_drifted_account_gets_the_hand_worked_whole_share_trades(workspace, dagster_instance):
    book().write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    assert trades_of(workspace, "ACC-6040") == [("buy", "BND", 20.0, "rebalance"), ("sell", "VTI", 10.0, "rebalance")]
    rec = workspace.table("trade_recommendations").filter(pl.col("account_id") == "ACC-6040").row(0, named=True)
    assert rec["inside_bands"] and rec["unresolved"] is None
    assert rec["model_version"].startswith("model:M6040@")
    assert trades_of(workspace, "ACC-OK") == []


def test_rerun_keeps_ids_and_a_model_change_regenerates_only_linked_accounts(workspace, dagster_instance):
    b = book()
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    first = dict(workspace.table("trade_recommendations").select("account_id", "recommendation_id").iter_rows())
    assert workspace.run_day(instance=dagster_instance).success
    again = workspace.table("trade_recommendations")
    assert dict(again.select("account_id", "recommendation_id").iter_rows()) == first
    assert again.height == 2 and workspace.table("trade_proposals").height == 4  # no duplicates

    # The 80/20 model gains a REIT sleeve: its account is re-proposed, the 60/40 one is not.
    b.model("M8020", VTI="0.75", BND="0.2", VNQ="0.05")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    after = dict(workspace.table("trade_recommendations").select("account_id", "recommendation_id").iter_rows())
    assert after["ACC-6040"] == first["ACC-6040"]
    assert after["ACC-8020"] != first["ACC-8020"]
    assert ("buy", "VNQ", 6.0, "rebalance") in trades_of(workspace, "ACC-8020")  # $500 / $80 → 6 whole shares
