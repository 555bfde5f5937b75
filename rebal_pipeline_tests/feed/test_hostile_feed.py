"""Hostile feed input never costs data and never takes down the day (issue #13, item 6).

File-level cases run the ingest asset alone: each fails with one message naming the file and the
line, after every file of the day has been archived byte for byte (0440). Row-level cases run the
whole daily graph on one small book: the bad rows are rejects naming file, line, column, raw
value and reason, the accounts they concern are held out, operations get one data-quality alert,
and every other account is sized and published as usual.
"""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from dagster import materialize

from rebal_pipeline.defs.feed.assets import assets as feed_assets
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder

PREVIOUS_SESSION = date(2026, 11, 19)


def small_book(as_of: date = AS_OF) -> FeedBuilder:
    b = FeedBuilder(as_of=as_of)
    b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    b.position("ACC-1", "CASH", "250.00")
    return b


def assert_archive_complete(workspace, folder: Path) -> None:
    """Every file of the day is in the archive, byte-identical, read-only (0440)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert len(files) == 11
    for path in files:
        raw = path.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        archived = workspace.root / "archive" / "sha256" / sha[:2] / sha
        assert archived.is_file(), f"{path.name} was not archived"
        assert archived.read_bytes() == raw
        assert stat.S_IMODE(os.stat(archived).st_mode) == 0o440


def ingest_only(workspace, dagster_instance):
    return materialize(feed_assets, partition_key=AS_OF.isoformat(), resources=workspace.resources(),
                       instance=dagster_instance, raise_on_error=False)


def ingest_failure(result) -> tuple[str, dict]:
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1
    data = failures[0].step_failure_data
    # A Failure raised by the asset (a clear message), not an exception escaping it.
    assert data.error is None or "Failure" in (data.error.cls_name or "")
    user = data.user_failure_data
    return user.description, {k: v.value for k, v in user.metadata.items()}


def test_file_that_is_not_utf8_is_archived_byte_for_byte_and_named_with_its_line(workspace, dagster_instance):
    b = small_book(); b.household("HH-2", name="Müller family")
    folder = b.write(workspace.feed_root)
    path = folder / "households.csv"
    path.write_bytes(path.read_text().encode("latin-1"))
    message, meta = ingest_failure(ingest_only(workspace, dagster_instance))
    assert message.startswith("households.csv: not UTF-8: byte 0xfc at line 3")
    assert meta["file"].endswith("households.csv") and meta["line"] == 3
    assert_archive_complete(workspace, folder)


def test_cr_only_line_endings_fail_naming_file_and_line_after_all_eleven_files_are_archived(
        workspace, dagster_instance):
    folder = small_book().write(workspace.feed_root)
    # positions.csv is the 9th file of the contract: before, ingest died on it with a bare
    # _csv.Error and lots.csv and transactions.csv were never archived.
    path = folder / "positions.csv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    message, meta = ingest_failure(ingest_only(workspace, dagster_instance))
    assert message.startswith("positions.csv: a carriage return (CR) not followed by a line feed at line 1")
    assert meta["line"] == 1
    assert "_csv.Error" not in message
    assert_archive_complete(workspace, folder)


def test_nul_byte_fails_naming_file_and_line(workspace, dagster_instance):
    folder = small_book().write(workspace.feed_root)
    path = folder / "prices.csv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",\x00", 1)
    path.write_bytes(b"\n".join(lines))
    message, meta = ingest_failure(ingest_only(workspace, dagster_instance))
    assert message.startswith("prices.csv: a NUL byte (0x00) at line 4")
    assert meta["line"] == 4
    assert_archive_complete(workspace, folder)


def test_huge_field_fails_naming_file_and_line(workspace, dagster_instance):
    folder = small_book().write(workspace.feed_root)
    path = folder / "securities.csv"
    with path.open("a") as handle:
        handle.write(f'HUGE,,"{"x" * 100_000}",equity,stock,huge,,false\n')
    huge_line = len(path.read_text().splitlines())
    message, meta = ingest_failure(ingest_only(workspace, dagster_instance))
    assert message.startswith(f"securities.csv: a field of more than 65536 bytes at line {huge_line}")
    assert meta["line"] == huge_line
    assert_archive_complete(workspace, folder)


def test_several_bad_files_are_all_named_in_one_message(workspace, dagster_instance):
    folder = small_book().write(workspace.feed_root)
    (folder / "models.csv").write_bytes((folder / "models.csv").read_bytes().replace(b"\n", b"\r"))
    (folder / "lots.csv").write_bytes(b"account_id,symbol\n\x00\n")
    message, meta = ingest_failure(ingest_only(workspace, dagster_instance))
    assert "models.csv: a carriage return" in message and "lots.csv: a NUL byte (0x00) at line 2" in message
    assert {f["file"] for f in meta["files_with_problems"]} == {"models.csv", "lots.csv"}
    assert_archive_complete(workspace, folder)


# --- row-level cases: the whole daily graph on one book -------------------------------------

def hostile_book(as_of: date) -> FeedBuilder:
    b = FeedBuilder(as_of=as_of)
    b.add("users", user_id="OPS-1", name="Olive Operations", email="ops@example-ria.com", role="operations")
    for hh in ("HH-OK", "HH-HUGE", "HH-PENNY", "HH-WS", "HH-CASH"):
        b.household(hh)
    b.account("ACC-OK", "HH-OK"); b.position("ACC-OK", "VTI", 10); b.position("ACC-OK", "BND", 500)
    b.position("ACC-OK", "CASH", "100")
    # Contract-valid (10 digits) but no account holds ten billion shares.
    b.account("ACC-HUGE", "HH-HUGE"); b.position("ACC-HUGE", "VTI", 9999999999, cost_basis="100")
    b.position("ACC-HUGE", "BND", 1)
    # A model security priced at a millionth of a cent: sizing it crashed the whole book.
    b.add("securities", symbol="PNY", cusip="", description="Penny Corp", asset_class="equity",
          security_type="stock", wash_group="pny", tlh_substitute="", fractional="false")
    b.add("prices", symbol="PNY", close="0.00000001")
    b.model("M-PNY", VTI="0.3", PNY="0.3", BND="0.4")
    b.account("ACC-PENNY", "HH-PENNY", model_id="M-PNY"); b.position("ACC-PENNY", "BND", 100000)
    b.position("ACC-PENNY", "CASH", "9999999")
    # Its cash row's account id has a trailing space: scanned without its cash it looked 100%
    # invested and got sell proposals.
    b.account("ACC-WS", "HH-WS"); b.position("ACC-WS", "VTI", 6); b.position("ACC-WS", "BND", 8)
    b.add("positions", account_id="ACC-WS ", symbol="CASH", quantity="90000")
    b.account("ACC-CASH", "HH-CASH"); b.position("ACC-CASH", "VTI", 60); b.position("ACC-CASH", "BND", 80)
    if as_of == PREVIOUS_SESSION:
        b.position("ACC-CASH", "CASH", "5000.00")
    else:
        b.add("transactions", account_id="ACC-GHOST", symbol="VTI", trade_date=(as_of - timedelta(days=3)).isoformat(),
              type="buy", quantity="5", price="100")
    return b


def insert_blank_lines(path: Path, after_line: int, count: int = 2) -> None:
    lines = path.read_text().split("\n")
    path.write_text("\n".join(lines[:after_line] + [""] * count + lines[after_line:]))


def physical_line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().split("\n"), start=1) if line.startswith(text))


@pytest.fixture(scope="module")
def hostile_day(module_workspace, dagster_instance):
    ws = module_workspace
    hostile_book(PREVIOUS_SESSION).write(ws.feed_root)
    assert ws.run_day(PREVIOUS_SESSION, instance=dagster_instance, raise_on_error=False) is not None
    folder = hostile_book(AS_OF).write(ws.feed_root)
    insert_blank_lines(folder / "positions.csv", after_line=2)
    insert_blank_lines(folder / "transactions.csv", after_line=1, count=3)
    result = ws.run_day(AS_OF, instance=dagster_instance, raise_on_error=False)
    failures = [(e.step_key, e.step_failure_data.error.message[:400]) for e in result.all_events if e.is_step_failure]
    assert result.success, failures
    return ws, folder, result


def reject(ws, **where) -> dict:
    rejects = ws.table("rejects")
    for column, value in where.items():
        rejects = rejects.filter(pl.col(column) == value)
    assert rejects.height >= 1, f"no reject with {where}:\n{ws.table('rejects')}"
    return rejects.row(0, named=True)


def test_reported_lines_are_physical_lines_with_blank_lines_counted(hostile_day):
    ws, folder, _ = hostile_day
    row = reject(ws, file="positions.csv", column="account_id", value="ACC-WS ")
    assert row["line"] == physical_line(folder / "positions.csv", "ACC-WS ,CASH")
    ghost = reject(ws, file="transactions.csv", value="ACC-GHOST")
    assert ghost["line"] == 5  # header, three blank lines, then the row
    assert_archive_complete(ws, folder)


def test_transaction_for_an_unknown_account_is_a_reject_and_an_operations_alert(hostile_day):
    ws, folder, _ = hostile_day
    row = reject(ws, file="transactions.csv", column="account_id", value="ACC-GHOST")
    assert row["reason"] == "unknown account_id (not in accounts.csv)"
    alert = ws.table("data_quality_alerts").filter(pl.col("account_id") == "ACC-GHOST").row(0, named=True)
    assert alert["account_known"] is False

    from rebal_pipeline.comms.waiting import operations_alerts_waiting_for_email
    from rebal_pipeline.workflow.operations_alerts import read_operations_alert
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore(ws.workflow_url)
    try:
        with store.begin() as conn:
            recorded = read_operations_alert(conn, f"feed_data_quality:{AS_OF.isoformat()}")
            now = datetime.now(timezone.utc)
            waiting = operations_alerts_waiting_for_email(conn, now, now - timedelta(days=1), 100)
    finally:
        store.dispose()
    assert recorded is not None and recorded.recipient_id == "OPS-1"
    assert recorded.details["unknown_accounts"] == 1
    assert recorded.details["accounts_held_out"] == len(ws.table("data_quality_alerts"))
    assert recorded.details["rejected_rows"] == len(ws.table("rejects"))
    assert "ACC-GHOST" not in str(recorded.details)  # masked: ••••HOST
    assert "\u2022\u2022\u2022\u2022HOST" in recorded.details["held_out_accounts"]
    assert f"{len(ws.table('rejects'))} rejected row(s)" in recorded.summary
    # It is on its way to operations through the outbox (the operations_alerts sensor).
    assert f"feed_data_quality:{AS_OF.isoformat()}" in str(waiting)


def test_extreme_values_hold_out_their_account_and_the_rest_of_the_book_is_proposed(hostile_day):
    ws, _, result = hostile_day
    huge = reject(ws, file="positions.csv", value="9999999999", column="quantity")
    assert "plausibility limit" in huge["reason"] and huge["account_id"] == "ACC-HUGE"
    penny = reject(ws, file="prices.csv", column="close", value="0.00000001")
    assert penny["reason"].startswith("price below the plausibility limit of $0.01")
    alerts = {r["account_id"]: r["reasons"] for r in ws.table("data_quality_alerts").iter_rows(named=True)}
    assert "quantity above the plausibility limit" in alerts["ACC-HUGE"]
    assert "price below the plausibility limit" in alerts["ACC-PENNY"]
    proposed = set(ws.table("trade_proposals")["account_id"].to_list())
    assert "ACC-OK" in proposed and not proposed & {"ACC-HUGE", "ACC-PENNY", "ACC-WS"}
    assert "ACC-OK" in ws.table("trade_recommendations")["scope_id"].to_list()
    published = [m for m in result.asset_materializations_for_node("pending_recommendations")]
    assert published and published[0].metadata["recommendations_today"].value >= 1


def test_id_with_trailing_space_is_rejected_raw_and_its_account_is_held_out(hostile_day):
    ws, _, _ = hostile_day
    row = reject(ws, file="positions.csv", column="account_id", value="ACC-WS ")
    assert row["reason"] == "leading or trailing whitespace in the id (without it: ACC-WS)"
    assert row["account_id"] == "ACC-WS"
    alert = ws.table("data_quality_alerts").filter(pl.col("account_id") == "ACC-WS").row(0, named=True)
    assert alert["account_known"] is True and alert["advisor_id"] == "ADV-1"
    # Not scanned without its cash: no holdings, no drift alert, no sell proposals.
    assert "ACC-WS" not in ws.table("holdings")["account_id"].to_list()
    assert "ACC-WS" not in ws.table("drift_alerts")["scope_id"].to_list()
    skipped = ws.table("skipped_accounts").filter(pl.col("account_id") == "ACC-WS")
    assert skipped["reason_kind"].to_list() == ["data_quality"]


def test_cash_position_vanishing_without_transactions_is_a_reconciliation_alert(hostile_day):
    ws, _, _ = hostile_day
    alerts = ws.table("reconciliation_alerts").filter(pl.col("symbol") == "CASH")
    assert alerts["account_id"].to_list() == ["ACC-CASH"]
    reason = alerts["reason"][0]
    assert reason.startswith("Cash position disappeared: ACC-CASH held $5000 in cash on 2026-11-19")
    assert "no transaction recorded" in reason


# --- files holding client names and emails --------------------------------------------------

def test_workflow_store_warehouse_and_dagster_home_are_private_when_rebal_creates_them(tmp_path, monkeypatch):
    from rebal_pipeline.drill import prepare_local_instance
    from rebal_pipeline.resources import Warehouse
    from rebal_pipeline.workflow.store import WorkflowStore

    monkeypatch.setattr(os, "umask", os.umask)  # restored below
    old = os.umask(0o022)
    try:
        store = WorkflowStore(f"sqlite:///{tmp_path / 'wf' / 'workflow.sqlite'}")
        store.migrate(); store.dispose()
        with Warehouse(database=str(tmp_path / 'wh' / 'warehouse.duckdb')).connect() as con:
            con.execute("create table t as select 1 as x")
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh" / "dagster_home"))
        home = prepare_local_instance()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "wf") == 0o700 and mode(tmp_path / "wf" / "workflow.sqlite") == 0o600
    assert mode(tmp_path / "wh") == 0o700 and mode(tmp_path / "wh" / "warehouse.duckdb") == 0o600
    assert mode(home) == 0o700 and mode(tmp_path / "dh") == 0o700
