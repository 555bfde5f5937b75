"""Drift, tiers, bands and alerts on a book whose numbers are worked out by hand.

Prices: VTI $100 (equity), BND $50 (fixed income); model M6040 = 60% VTI / 40% BND.
Policy (rebal_pipeline/policies/drift_policy.yaml): base < $100k ±7% low, standard ±5% medium,
premium >= $500k ±3% high, tax-sensitive ±2% high.
"""


import polars as pl
import pytest

from rebal_pipeline_tests.feedkit import FeedBuilder


def drifted_book() -> FeedBuilder:
    b = FeedBuilder()
    # $10,000 at 70/30 against 60/40: equity +10 points, beyond the base band of 7.
    b.household("HH-BASE"); b.account("ACC-7030", "HH-BASE")
    b.position("ACC-7030", "VTI", 70); b.position("ACC-7030", "BND", 60)
    # Tier edges: exactly $100,000 is standard, $99,999.99 is base, exactly $500,000 premium.
    b.household("HH-100K"); b.account("ACC-100K", "HH-100K")
    b.position("ACC-100K", "VTI", 600); b.position("ACC-100K", "BND", 800)
    b.household("HH-99999"); b.account("ACC-99999", "HH-99999")
    b.position("ACC-99999", "VTI", 600); b.position("ACC-99999", "BND", 799); b.position("ACC-99999", "CASH", "49.99")
    b.household("HH-500K"); b.account("ACC-500K", "HH-500K")
    b.position("ACC-500K", "VTI", 3000); b.position("ACC-500K", "BND", 4000)
    # Standard tier ($200,000): exactly 5 points over is inside the band, 5.1 points is out.
    b.household("HH-AT-BAND"); b.account("ACC-AT-BAND", "HH-AT-BAND")
    b.position("ACC-AT-BAND", "VTI", 1300); b.position("ACC-AT-BAND", "BND", 1400)
    b.household("HH-OVER-BAND"); b.account("ACC-OVER-BAND", "HH-OVER-BAND")
    b.position("ACC-OVER-BAND", "VTI", 1302); b.position("ACC-OVER-BAND", "BND", 1396)
    # Premium ($540,000) at 64.81% equity: +4.81 points, beyond ±3 → high, same day.
    b.household("HH-PREM"); b.account("ACC-PREM", "HH-PREM")
    b.position("ACC-PREM", "VTI", 3500); b.position("ACC-PREM", "BND", 3800)
    # Tax-sensitive, $200,000 at 63/37: +3 points is inside standard ±5 but outside ±2.
    # Its BND lot cost $60/share, now $50: down 16.7% → a harvestable loss (TLH flag).
    b.household("HH-TS"); b.account("ACC-TS", "HH-TS", tax_sensitive=True)
    b.position("ACC-TS", "VTI", 1260); b.position("ACC-TS", "BND", 1480, cost_basis=1480 * 60)
    # Aggregated household: taxable all equity, IRA all bonds, together exactly 60/40.
    b.household("HH-AGG", aggregate=True)
    b.account("ACC-AGG-TAX", "HH-AGG"); b.account("ACC-AGG-IRA", "HH-AGG", account_type="traditional_ira")
    b.position("ACC-AGG-TAX", "VTI", 600); b.position("ACC-AGG-IRA", "BND", 800)
    # The same two accounts in a household that is not aggregated: each one alerts.
    b.household("HH-SPLIT")
    b.account("ACC-SPLIT-TAX", "HH-SPLIT"); b.account("ACC-SPLIT-IRA", "HH-SPLIT", account_type="traditional_ira")
    b.position("ACC-SPLIT-TAX", "VTI", 600); b.position("ACC-SPLIT-IRA", "BND", 800)
    # Aggregated household with its own IPS (50/50) while holding 60/40 → +10 points at household scope.
    b.household("HH-AGG-IPS", aggregate=True)
    b.account("ACC-AGGIPS-1", "HH-AGG-IPS"); b.account("ACC-AGGIPS-2", "HH-AGG-IPS", account_type="roth_ira")
    b.position("ACC-AGGIPS-1", "VTI", 600); b.position("ACC-AGGIPS-1", "BND", 800)
    b.position("ACC-AGGIPS-2", "VTI", 600); b.position("ACC-AGGIPS-2", "BND", 800)
    b.add("ips_targets", scope="household", scope_id="HH-AGG-IPS", asset_class="equity", target_weight="0.5")
    b.add("ips_targets", scope="household", scope_id="HH-AGG-IPS", asset_class="fixed_income", target_weight="0.5")
    # Suspended account, drifted: not alerted, recorded as skipped with its reason.
    b.household("HH-SUSP"); b.account("ACC-SUSP", "HH-SUSP", suspended=True, suspended_reason="legal hold")
    b.position("ACC-SUSP", "VTI", 70); b.position("ACC-SUSP", "BND", 60)
    # Account IPS 70/30 overrides the 60/40 model: holding 70/30 is on target.
    b.household("HH-IPS"); b.account("ACC-IPS", "HH-IPS")
    b.position("ACC-IPS", "VTI", 70); b.position("ACC-IPS", "BND", 60)
    b.add("ips_targets", scope="account", scope_id="ACC-IPS", asset_class="equity", target_weight="0.7")
    b.add("ips_targets", scope="account", scope_id="ACC-IPS", asset_class="fixed_income", target_weight="0.3")
    # Account with its own advisor of record, overriding the household's.
    b.household("HH-OVR", advisor_id="ADV-1"); b.account("ACC-OVR", "HH-OVR", advisor_id="ADV-2")
    b.position("ACC-OVR", "VTI", 70); b.position("ACC-OVR", "BND", 60)
    return b


@pytest.fixture(scope="module")
def day(module_workspace, dagster_instance):
    drifted_book().write(module_workspace.feed_root)
    result = module_workspace.run_day(instance=dagster_instance)
    assert result.success
    return module_workspace


def drift_row(ws, scope_id, asset_class, scope="account") -> dict:
    rows = ws.table("drift").filter(
        (pl.col("scope") == scope) & (pl.col("scope_id") == scope_id) & (pl.col("asset_class") == asset_class)
    )
    assert rows.height == 1, f"expected one drift row for {scope} {scope_id} {asset_class}"
    return rows.row(0, named=True)


def alert(ws, scope_id) -> dict | None:
    rows = ws.table("drift_alerts").filter(pl.col("scope_id") == scope_id)
    return rows.row(0, named=True) if rows.height else None


def test_7030_account_drifts_ten_points_and_breaches_the_base_band(day):
    equity = drift_row(day, "ACC-7030", "equity")
    bonds = drift_row(day, "ACC-7030", "fixed_income")
    assert float(equity["market_value"]) == 7000.0 and float(bonds["market_value"]) == 3000.0
    assert equity["current_weight"] == pytest.approx(0.70)
    assert equity["target_weight"] == pytest.approx(0.60)
    assert equity["drift"] == pytest.approx(0.10)
    assert bonds["drift"] == pytest.approx(-0.10)
    assert equity["tier"] == "base" and equity["band"] == pytest.approx(0.07)
    assert equity["breached"] and bonds["breached"]
    a = alert(day, "ACC-7030")
    assert a["tier"] == "base" and a["urgency"] == "low" and a["delivery"] == "weekly_batch"
    assert a["max_abs_drift"] == pytest.approx(0.10)
    assert a["advisor_id"] == "ADV-1" and a["status"] == "alert"


@pytest.mark.parametrize(
    "account, tier, band",
    [("ACC-99999", "base", 0.07), ("ACC-100K", "standard", 0.05), ("ACC-500K", "premium", 0.03)],
)
def test_tier_edges_follow_household_value(day, account, tier, band):
    row = drift_row(day, account, "equity")
    assert row["tier"] == tier
    assert row["band"] == pytest.approx(band)


def test_on_target_accounts_raise_no_alert(day):
    for account in ("ACC-100K", "ACC-500K", "ACC-99999"):
        assert alert(day, account) is None


def test_drift_exactly_at_the_band_is_inside_and_just_over_breaches(day):
    at_band = drift_row(day, "ACC-AT-BAND", "equity")
    assert at_band["drift"] == pytest.approx(0.05) and not at_band["breached"]
    assert alert(day, "ACC-AT-BAND") is None
    over = drift_row(day, "ACC-OVER-BAND", "equity")
    assert over["drift"] == pytest.approx(0.051) and over["breached"]
    assert alert(day, "ACC-OVER-BAND")["urgency"] == "medium"


def test_premium_breach_is_high_urgency_same_day(day):
    a = alert(day, "ACC-PREM")
    assert a["tier"] == "premium" and a["urgency"] == "high" and a["delivery"] == "same_day"
    assert a["max_abs_drift"] == pytest.approx(350_000 / 540_000 - 0.60)  # 4.81 points


def test_tax_sensitive_account_uses_two_point_band_and_flags_harvestable_loss(day):
    row = drift_row(day, "ACC-TS", "equity")
    assert row["drift"] == pytest.approx(0.03) and row["band"] == pytest.approx(0.02) and row["breached"]
    a = alert(day, "ACC-TS")
    assert a["tax_sensitive"] and a["tlh_flag"] and a["urgency"] == "high"
    assert alert(day, "ACC-7030")["tlh_flag"] is False


def test_aggregated_household_is_judged_as_one(day):
    household_equity = drift_row(day, "HH-AGG", "equity", scope="household")
    assert household_equity["current_weight"] == pytest.approx(0.60)
    assert not household_equity["breached"]
    # Each account alone is far off target, but the household is rebalanced as one.
    assert drift_row(day, "ACC-AGG-TAX", "equity")["breached"]
    assert alert(day, "HH-AGG") is None
    assert alert(day, "ACC-AGG-TAX") is None and alert(day, "ACC-AGG-IRA") is None


def test_same_accounts_without_aggregation_alert_one_by_one(day):
    assert alert(day, "ACC-SPLIT-TAX")["scope"] == "account"
    assert alert(day, "ACC-SPLIT-IRA")["scope"] == "account"


def test_household_ips_targets_drive_household_alert(day):
    row = drift_row(day, "HH-AGG-IPS", "equity", scope="household")
    assert row["target_weight"] == pytest.approx(0.5) and row["drift"] == pytest.approx(0.10)
    assert row["target_source"] == "household_ips"
    a = alert(day, "HH-AGG-IPS")
    assert a["scope"] == "household" and a["tier"] == "standard"
    assert float(a["market_value"]) == 200000.0


def test_account_ips_overrides_model(day):
    row = drift_row(day, "ACC-IPS", "equity")
    assert row["target_weight"] == pytest.approx(0.7) and row["target_source"] == "account_ips"
    assert alert(day, "ACC-IPS") is None


def test_suspended_account_is_not_alerted_and_is_recorded_as_skipped(day):
    a = alert(day, "ACC-SUSP")
    assert a["status"] == "skipped" and a["suspended"]
    assert a["skip_reason"] == "suspended: legal hold"
    skipped = day.table("skipped_accounts").filter(pl.col("account_id") == "ACC-SUSP")
    assert skipped.select("reason_kind", "reason").row(0) == ("suspended", "legal hold")
    live = day.table("drift_alerts").filter(pl.col("status") == "alert")
    assert "ACC-SUSP" not in live["scope_id"].to_list()


def test_alert_goes_to_account_advisor_override(day):
    assert alert(day, "ACC-OVR")["advisor_id"] == "ADV-2"


def test_every_alert_records_the_policy_version(day):
    alerts = day.table("drift_alerts")
    assert alerts.height > 0
    versions = set(alerts["policy_version"].to_list())
    # The shipped policy's version id: its version plus a hash of the file's bytes.
    from rebal_pipeline.core.policy import load_policy

    assert versions == {load_policy().version_id}


def test_rematerialising_the_day_gives_identical_tables_and_no_duplicates(day, dagster_instance):
    before = {t: day.table(t, order_by="all") for t in ("holdings", "drift", "drift_alerts", "rejects")}
    assert day.run_day(instance=dagster_instance).success
    for table, frame in before.items():
        after = day.table(table, order_by="all")
        assert after.equals(frame), f"{table} changed on re-run"
    alerts = day.table("drift_alerts")
    assert alerts["alert_id"].n_unique() == alerts.height


def test_relative_band_policy_option_tightens_small_targets(tmp_path, workspace, dagster_instance):
    # 5/25 rule: a 10% target breaches at 2.5 points, not the tier's 7.
    policy = (tmp_path / "policy.yaml")
    from rebal_pipeline.core.policy import DEFAULT_POLICY_FILE

    policy.write_text(DEFAULT_POLICY_FILE.read_text().replace("relative_band: null", "relative_band: 0.25"))
    b = FeedBuilder()
    b.model("M-REIT", VTI="0.5", BND="0.4", VNQ="0.1")
    b.household("HH-R"); b.account("ACC-R", "HH-R", model_id="M-REIT")
    # $10,000: VTI 48% , BND 39%, VNQ 13% (+3 points on a 10% target).
    b.position("ACC-R", "VTI", 48); b.position("ACC-R", "BND", 78); b.position("ACC-R", "VNQ", "16.25")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance, policy_file=policy).success
    reit = workspace.table("drift").filter(pl.col("asset_class") == "alternatives").row(0, named=True)
    assert reit["drift"] == pytest.approx(0.03)
    assert reit["band"] == pytest.approx(0.025) and reit["breached"]
    assert workspace.table("drift_alerts")["policy_version"][0] != ""


def test_model_version_changes_only_for_the_model_whose_weights_changed(workspace, dagster_instance):
    b = FeedBuilder()
    b.model("M8020", VTI="0.8", BND="0.2")
    b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    before = dict(workspace.table("int_model_versions").select("model_id", "model_version").iter_rows())

    b.model("M6040", VTI="0.55", BND="0.4", VNQ="0.05")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    after = dict(workspace.table("int_model_versions").select("model_id", "model_version").iter_rows())
    assert after["M8020"] == before["M8020"]
    assert after["M6040"] != before["M6040"]
