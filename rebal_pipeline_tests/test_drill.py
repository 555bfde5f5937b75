"""The README's drill, end to end: sandbox book → real Dagster instance → summary."""

from datetime import date

import duckdb
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from rebal_pipeline.cli import main
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed

AS_OF = date(2026, 11, 20)


@pytest.fixture
def rebal_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REBAL_HOME", str(tmp_path))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("REBAL_WAREHOUSE", raising=False)
    monkeypatch.delenv("REBAL_FEED_ROOT", raising=False)
    return tmp_path


def test_drill_materialises_the_day_on_the_local_instance_and_prints_the_scan(rebal_home, capsys):
    assert main(["drill", "--households", "120", "--as-of", AS_OF.isoformat(), "--shock", "equity=-0.12"]) == 0
    out = capsys.readouterr().out
    assert "Accounts scanned" in out and "Drift alerts:" in out
    for tier in ("premium", "standard", "base"):
        assert f"  {tier} " in out
    assert "Top 10 drifted:" in out
    assert "Trade proposals: " in out and " back inside every band after whole-share rounding" in out
    assert "Rejected feed rows: " in out and "unknown symbol (not in securities.csv)" in out
    assert "dagster dev -w workspace.yaml" in out

    # The run is on the project-local SQLite instance, where the Dagster UI will find it.
    home = rebal_home / "dagster_home"
    assert (home / "dagster.yaml").exists()
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(RunsFilter(job_name="daily_drift_scan"))
        assert len(runs) == 1 and runs[0].status == DagsterRunStatus.SUCCESS
        assert runs[0].tags["dagster/partition"] == AS_OF.isoformat()

    with duckdb.connect(str(rebal_home / "warehouse.duckdb"), read_only=True) as con:
        alerts = con.execute("select count(*) from drift_alerts where status = 'alert'").fetchone()[0]
    assert f"Drift alerts: {alerts:,}" in out and alerts > 0


def test_sandbox_defects_hold_out_exactly_the_named_accounts(workspace, dagster_instance):
    report = generate_feed(SandboxConfig(as_of=AS_OF, households=150, seed=3, defects=True), workspace.feed_root)
    assert workspace.run_day(as_of=AS_OF, instance=dagster_instance).success
    held = set(workspace.table("data_quality_alerts", AS_OF)["account_id"].to_list())
    assert held == {d.account_id for d in report.defects}
    rejected_files = set(workspace.table("rejects", AS_OF)["file"].to_list())
    assert rejected_files == {d.file for d in report.defects}


def test_the_tax_engine_finds_exactly_the_sandboxs_past_wash_sales(workspace, dagster_instance):
    """Sandbox → Dagster → wash_sales: every planted wash sale is found with its replacement and
    its disallowed loss, the IRA ones lost for good, and the two non-washes are not reported."""
    import polars as pl

    report = generate_feed(SandboxConfig(as_of=AS_OF, households=200, seed=42, defects=True), workspace.feed_root)
    assert workspace.run_day(as_of=AS_OF, instance=dagster_instance).success
    found = workspace.table("wash_sales", AS_OF).filter(pl.col("when") == "past")
    found_rows = {
        (r["account_id"], r["symbol"], r["sale_date"], r["purchase_account_id"], r["purchase_symbol"],
         r["purchase_date"]): (round(r["disallowed_loss"], 2), r["loss_lost_permanently"])
        for r in found.iter_rows(named=True)
    }
    planted = {
        (w.account_id, w.symbol, w.sale_date, w.replacement_account_id, w.replacement_symbol, w.replacement_date):
            (round(float(w.disallowed_loss), 2), w.kind == "ira_replacement")
        for w in report.wash_sales if w.wash_sale
    }
    assert planted and found_rows == planted
    # Custodian-adjusted replacement lots keep their basis; the others gain the disallowed loss.
    lots = workspace.table("tax_lots", AS_OF)
    for w in report.wash_sales:
        if w.kind in ("same_account", "partial_replacement"):
            part = lots.filter((pl.col("account_id") == w.replacement_account_id) & (pl.col("symbol") == w.replacement_symbol)
                               & (pl.col("lot_part") == "replacement"))
            assert part.height == 1 and part["acquired_date"].item() == w.replacement_date


def test_the_drill_through_sftp_pulls_translates_and_scans(rebal_home, capsys):
    assert main(["drill", "--households", "40", "--as-of", AS_OF.isoformat(), "--via-sftp", "pershing"]) == 0
    out = capsys.readouterr().out
    assert "pershing-style files on sftp://127.0.0.1:" in out and "host key pinned" in out
    assert f"pulled, archived by SHA-256 and translated for {AS_OF}" in out
    assert "Drift alerts:" in out and "Rejected feed rows: 0" in out


def test_the_drill_by_custodian_assembles_sftp_and_api_parts_then_scans(rebal_home, capsys, monkeypatch):
    # The drill sets its sandbox credentials in the process environment: undone after the test.
    for name in ("REBAL_TOKEN_KEY", "REBAL_SANDBOX_SFTP_KEY", "REBAL_SANDBOX_API_CLIENT_ID",
                 "REBAL_SANDBOX_API_CLIENT_SECRET"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert main(["drill", "--households", "40", "--as-of", AS_OF.isoformat(), "--via-custodians"]) == 0
    out = capsys.readouterr().out
    assert "sandbox-schwab: 4 schwab-style files" in out and "sandbox-pershing: 1 pershing-style files" in out
    assert "feed waits for sandbox-pershing, sandbox-fidelity-api" in out  # no half feed after the first
    assert "through the OAuth 2.0 API at http://127.0.0.1:" in out
    assert f"feed assembled → {rebal_home / 'feeds' / AS_OF.isoformat()}" in out
    assert "Drift alerts:" in out and "Rejected feed rows: 0" in out
    assert "Socket exception" not in out
