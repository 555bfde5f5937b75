"""The README's drill, end to end: sandbox book → real Dagster instance → summary; each drill
from an empty home unless --keep; its progress on stderr; its words."""

import re
from datetime import date

import duckdb
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from rebal_pipeline.cli import main
from rebal_pipeline.drill import plural
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed

AS_OF = date(2026, 11, 20)


@pytest.fixture
def rebal_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REBAL_HOME", str(tmp_path))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("REBAL_WAREHOUSE", raising=False)
    monkeypatch.delenv("REBAL_FEED_ROOT", raising=False)
    # The drill sets these in the process environment (prepare_local_instance): undone after the test.
    for name in ("DAGSTER_HOME", "REBAL_SANDBOX"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return tmp_path


def test_drill_materialises_the_day_on_the_local_instance_and_prints_the_scan(rebal_home, capsys):
    assert main(["drill", "--households", "120", "--as-of", AS_OF.isoformat(), "--shock", "equity=-0.12"]) == 0
    captured = capsys.readouterr()
    out = captured.out
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

    # Where the drill's home is, first; and progress from the run's events on stderr only.
    assert out.splitlines()[0] == f"Drill home: {rebal_home} (fresh)"
    _assert_progress(captured.err, "drill")
    assert "[drill]" not in out


def _assert_progress(err: str, label: str) -> None:
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith(f"[{label}] ")]
    assert progress and all(re.match(rf"\[{label}\] \d\d:\d\d ", line) for line in progress), err
    steps = int(re.search(r"step 1/(\d+) ", err).group(1))
    for step in ("land_feed", "holdings", "drift_alerts", "propose_trades", "pending_recommendations"):
        assert any(re.fullmatch(rf"\[{label}\] \d\d:\d\d step \d+/{steps} {step} started", line) for line in lines), step
        assert any(re.fullmatch(rf"\[{label}\] \d\d:\d\d step \d+/{steps} {step} done \(\d+\.\d s\)", line)
                   for line in lines), step
    assert re.search(rf"^\[{label}\] \d\d:\d\d run [0-9a-f]{{8}} succeeded: {steps} steps in \d+\.\d s$", err, re.M)


def _scan_counts(home, as_of=AS_OF) -> dict[str, int]:
    """The warehouse's own counts of the day, to compare with what the summary says."""
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        one = lambda sql: con.execute(sql, [as_of]).fetchone()[0]  # noqa: E731
        return {
            "feed": one("select count(*) from stg_feed_accounts where as_of = ?"),
            "suspended": one("select count(*) from int_scanned_accounts where as_of = ? and suspended"),
            "held": one("select count(*) from int_held_accounts where as_of = ?"),
            "scanned": one("select count(*) from int_scanned_accounts where as_of = ? and not suspended "
                           "and market_value > 0"),
            "recommendations": one("select count(*) from trade_recommendations where as_of = ?"),
        }


def _line(out: str, start: str) -> str:
    [line] = [line for line in out.splitlines() if line.startswith(start)]
    return line


def _number(line: str) -> int:
    return int(re.search(r"\s([\d,]+)\s", line + " ").group(1).replace(",", ""))


def test_the_summary_counts_suspended_accounts_apart_from_the_scanned_ones(rebal_home, capsys):
    assert main(["drill", "--households", "60", "--as-of", AS_OF.isoformat()]) == 0
    out = capsys.readouterr().out
    counts = _scan_counts(rebal_home)
    assert counts["suspended"] > 0
    assert _number(_line(out, "Accounts in feed ")) == counts["feed"]
    held = _line(out, "  held out for data quality ")
    suspended = _line(out, "  suspended ")
    scanned = _line(out, "Accounts scanned ")
    assert (_number(held), _number(suspended), _number(scanned)) == (counts["held"], counts["suspended"],
                                                                      counts["scanned"])
    assert held.endswith("   (rejected feed rows below; not scanned)")
    assert suspended.endswith("   (cannot be traded; not scanned)")
    assert counts["held"] + counts["suspended"] + counts["scanned"] == counts["feed"]
    # Every row of the alerts table says what it counts.
    rows = out.split("Drift alerts: ")[1].split("\n\n")[0].splitlines()[1:]
    assert rows and all(re.fullmatch(r"  (premium|standard|base) tier +\w+ urgency +(delivered|in the) .+ "
                                     r"[\d,]+ alerts?(, [\d,]+ with a tax-loss harvest opportunity)?"
                                     r"(; [\d,]+ breach(es)? on (a )?suspended accounts? not alerted)?", row)
                        for row in rows), rows
    # Plurals and a saving labelled as one.
    assert re.search(r"^Trade proposals: [\d,]+ recommendations? \([\d,]+ accounts?, [\d,]+ households? through",
                     out, re.M)
    assert "of tax saved by waiting" not in out and "$-" not in out
    wait = _line(out, "  wait for long-term advised on ")
    assert re.fullmatch(r"  wait for long-term advised on (0 recommendations|1 recommendation \(estimated tax saving "
                        r"by waiting \$[\d,]+\)|[\d,]+ recommendations \(estimated tax saving by waiting \$[\d,]+\))",
                        wait), wait
    workflow = _line(out, "Workflow store (sqlite): ")
    assert re.fullmatch(r"Workflow store \(sqlite\): ([\d,]+ (harvest|rebalance) recommendations? \([\d,]+ [a-z-]+"
                        r"(, [\d,]+ [a-z-]+)*\)(; )?)+; routed to [\d,]+ advisors?", workflow), workflow


def _workflow_total(out: str) -> int:
    """The recommendations the summary's workflow line counts, all kinds and states."""
    return sum(int(n.replace(",", "")) for n in
               re.findall(r"([\d,]+) (?:harvest|rebalance) recommendations? \(", _line(out, "Workflow store")))


def _dagster_runs(home) -> int:
    with DagsterInstance.from_config(str(home / "dagster_home")) as instance:
        return len(instance.get_runs(RunsFilter(job_name="daily_drift_scan")))


def _from_the_summary_on(out: str) -> str:
    """The scan's summary (the loop after it prints this run's ports, times and ids)."""
    return out[out.index("rebal daily drift scan"):out.index("The whole loop")]


def test_each_drill_starts_from_an_empty_home_and_keeps_the_previous_one_aside(rebal_home, capsys):
    drill = ["drill", "--households", "40", "--as-of", AS_OF.isoformat()]
    assert main([*drill, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*drill, "--seed", "4"]) == 0
    second = capsys.readouterr().out
    [moved] = (rebal_home / "previous_drills").iterdir()
    assert second.splitlines()[0] == f"Drill home: {rebal_home} (fresh; the previous drill was moved to {moved})"
    assert (moved / "warehouse.duckdb").exists() and (moved / "dagster_home" / "dagster.yaml").exists()
    # Only this drill's recommendations and run count: none of the first drill's.
    assert _workflow_total(second) == _scan_counts(rebal_home)["recommendations"]
    assert "superseded" not in second and _dagster_runs(rebal_home) == 1

    # The first book again: the same counts as the first time, not the two drills' together.
    assert main([*drill, "--seed", "3"]) == 0
    third = capsys.readouterr().out
    assert _from_the_summary_on(third) == _from_the_summary_on(first)
    assert _dagster_runs(rebal_home) == 1 and len(list((rebal_home / "previous_drills").iterdir())) == 2


def test_keep_runs_on_top_of_what_the_earlier_drill_left(rebal_home, capsys):
    drill = ["drill", "--households", "40", "--as-of", AS_OF.isoformat()]
    assert main([*drill, "--seed", "3"]) == 0
    capsys.readouterr()
    assert main([*drill, "--seed", "4", "--keep"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"Drill home: {rebal_home} (--keep: what earlier drills left there counts too)"
    assert not (rebal_home / "previous_drills").exists()
    # The earlier drill's recommendations are still in the store (superseded or pending) and its run is there.
    assert _workflow_total(out) > _scan_counts(rebal_home)["recommendations"]
    assert _dagster_runs(rebal_home) == 2


def test_a_rebal_home_holding_other_files_is_refused_untouched(rebal_home, capsys):
    (rebal_home / "client_notes.txt").write_text("not a drill's")
    assert main(["drill", "--households", "40", "--as-of", AS_OF.isoformat()]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"rebal: REBAL_HOME={rebal_home} holds files that are not a drill's (client_notes.txt; no .rebal-drill "
        "file), and a drill starts from an empty home. Point REBAL_HOME at an empty or new folder (or unset it "
        "for <repo>/.rebal), or pass --keep to run on top of what is there.\n")
    assert [p.name for p in rebal_home.iterdir()] == ["client_notes.txt"]
    assert (rebal_home / "client_notes.txt").read_text() == "not a drill's"


def test_a_location_outside_the_drill_home_is_refused(rebal_home, tmp_path_factory, monkeypatch, capsys):
    elsewhere = tmp_path_factory.mktemp("production_warehouse") / "warehouse.duckdb"
    monkeypatch.setenv("REBAL_WAREHOUSE", str(elsewhere))
    assert main(["drill", "--households", "40", "--as-of", AS_OF.isoformat()]) == 2
    assert capsys.readouterr().err == (
        f"rebal: the drill starts from an empty home ({rebal_home}), but REBAL_WAREHOUSE={elsewhere} points "
        "outside it, where earlier runs would still count. Unset it for the drill, or pass --keep to run on top "
        "of what is there.\n")
    assert not elsewhere.exists() and list(rebal_home.iterdir()) == []


def test_plural_counts_with_their_noun():
    assert plural(0, "account") == "0 accounts"
    assert plural(1, "account") == "1 account"
    assert plural(2, "account") == "2 accounts"
    assert plural(1_250, "lot") == "1,250 lots"
    assert plural(1, "breach on a suspended account", "breaches on suspended accounts") == \
        "1 breach on a suspended account"
    assert plural(3, "breach on a suspended account", "breaches on suspended accounts") == \
        "3 breaches on suspended accounts"


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
    assert "Custodian delivery: 1 pershing-style file on sftp://127.0.0.1:" in out and "host key pinned" in out
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
    assert "sandbox-schwab: 4 schwab-style files" in out and "sandbox-pershing: 1 pershing-style file for" in out
    assert "feed waits for sandbox-pershing, sandbox-fidelity-api" in out  # no half feed after the first
    assert "through the OAuth 2.0 API at http://127.0.0.1:" in out
    assert f"feed assembled → {rebal_home / 'feeds' / AS_OF.isoformat()}" in out
    assert "Drift alerts:" in out and "Rejected feed rows: 0" in out
    assert "Socket exception" not in out


def test_the_default_home_is_moved_aside_never_deleted_and_only_marked_drills_are_pruned(tmp_path, monkeypatch):
    from rebal_pipeline import settings
    from rebal_pipeline.drill import DRILL_MARK, KEEP_PREVIOUS_DRILLS, start_drill_home

    for name in ("REBAL_HOME", "DAGSTER_HOME", "REBAL_WAREHOUSE", "REBAL_FEED_ROOT", "REBAL_ARCHIVE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)  # the default home is <repo>/.rebal
    home = tmp_path / ".rebal"
    home.mkdir()
    (home / "connections.yaml").write_text("from before drills were marked")

    first = start_drill_home()
    assert first.describe() == (f"Drill home: {home} (fresh; the files that were there were moved to "
                                f"{first.moved_to})")
    assert (first.moved_to / "connections.yaml").read_text() == "from before drills were marked"
    assert sorted(p.name for p in home.iterdir()) == [DRILL_MARK, "previous_drills"]

    moved = []
    for n in range(KEEP_PREVIOUS_DRILLS + 2):
        (home / "warehouse.duckdb").write_text(f"drill {n}")
        drill = start_drill_home()
        assert drill.describe() == f"Drill home: {home} (fresh; the previous drill was moved to {drill.moved_to})"
        moved.append(drill.moved_to)
    kept = sorted(p for p in (home / "previous_drills").iterdir())
    # The unmarked folder stays; of the drills, the most recent three.
    assert first.moved_to in kept and set(kept) - {first.moved_to} == set(moved[-KEEP_PREVIOUS_DRILLS:])
    assert [(p / "warehouse.duckdb").read_text() for p in moved[-KEEP_PREVIOUS_DRILLS:]] == \
        [f"drill {n}" for n in range(2, KEEP_PREVIOUS_DRILLS + 2)]
