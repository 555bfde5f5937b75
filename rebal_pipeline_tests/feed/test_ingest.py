"""Bad input gets a clear error and loses nothing: rejects, held-out accounts, file errors."""

import hashlib
import os
import stat

import polars as pl
import pytest

from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder


def defective_book() -> tuple[FeedBuilder, dict]:
    """One clean account plus one account per kind of bad row; returns where each defect is."""
    b = FeedBuilder()
    b.household("HH-1")
    expected = {}

    def account(account_id):
        b.account(account_id, "HH-1")
        return account_id

    good = account("ACC-GOOD")
    b.position(good, "VTI", 60); b.position(good, "BND", 80)

    acc = account("ACC-NEG")
    row = b.add("positions", account_id=acc, symbol="VTI", quantity="-5")
    expected["negative quantity"] = ("positions.csv", b.line_of("positions", row), "quantity", "-5", acc)

    acc = account("ACC-UNKNOWN")
    row = b.add("positions", account_id=acc, symbol="ZZZZ", quantity="10")
    expected["unknown symbol (not in securities.csv)"] = ("positions.csv", b.line_of("positions", row), "symbol", "ZZZZ", acc)

    # A security whose close is 0, held by one account only.
    b.add("securities", symbol="THIN", cusip="", description="Thin Holdings", asset_class="equity",
          security_type="stock", wash_group="thin", tlh_substitute="", fractional="false")
    row = b.add("prices", symbol="THIN", close="0")
    acc = account("ACC-THIN")
    b.position(acc, "THIN", 10)
    expected["price must be greater than 0"] = ("prices.csv", b.line_of("prices", row), "close", "0", acc)

    acc = account("ACC-LOTS")
    row = b.add("positions", account_id=acc, symbol="VTI", quantity="10")
    b.add("lots", account_id=acc, symbol="VTI", lot_id="L-1", open_date="2024-01-02", quantity="9", cost_basis="900")
    expected["lots sum to 9.0 (1 lot) but the position is 10.0"] = (
        "positions.csv", b.line_of("positions", row), "quantity", "10", acc)

    acc = account("ACC-IPS-BAD")
    b.position(acc, "VTI", 10)
    b.add("ips_targets", scope="account", scope_id=acc, asset_class="equity", target_weight="0.6")
    row = b.add("ips_targets", scope="account", scope_id=acc, asset_class="fixed_income", target_weight="0.35")
    expected["targets for account ACC-IPS-BAD sum to 0.95, not 1"] = (
        "ips_targets.csv", b.line_of("ips_targets", row), "target_weight", "0.35", acc)

    acc = account("ACC-DUP")
    b.position(acc, "VTI", 10)
    row = b.add("positions", account_id=acc, symbol="VTI", quantity="10")
    expected["duplicate key: 2 rows share it"] = (
        "positions.csv", b.line_of("positions", row), "account_id,symbol", "ACC-DUP|VTI", acc)

    acc = account("ACC-COMMA")
    row = b.add("positions", account_id=acc, symbol="VTI", quantity="1,250")
    expected["not a decimal number"] = ("positions.csv", b.line_of("positions", row), "quantity", "1,250", acc)

    acc = account("ACC-DATE")
    b.add("positions", account_id=acc, symbol="VTI", quantity="10")
    row = b.add("lots", account_id=acc, symbol="VTI", lot_id="L-D", open_date="2024-13-45", quantity="10", cost_basis="900")
    expected["not a valid ISO date"] = ("lots.csv", b.line_of("lots", row), "open_date", "2024-13-45", acc)

    acc = account("ACC-ENUM")
    b.position(acc, "VTI", 10)
    row = b.add("restrictions", account_id=acc, kind="no_trade_ever", value="VTI")
    expected["not one of: no_buy_symbol"] = ("restrictions.csv", b.line_of("restrictions", row), "kind", "no_trade_ever", acc)

    b.add("models", model_id="M-BAD", symbol="VTI", weight="0.5")
    row = b.add("models", model_id="M-BAD", symbol="BND", weight="0.4")
    acc = account("ACC-MODEL-BAD")
    b.rows["accounts"][-1]["model_id"] = "M-BAD"
    b.position(acc, "VTI", 10)
    expected["model M-BAD weights sum to 0.9, not 1"] = (
        "models.csv", b.line_of("models", row), "weight", "0.4", acc)
    return b, expected


@pytest.fixture(scope="module")
def bad_day(module_workspace, dagster_instance):
    book, expected = defective_book()
    book.write(module_workspace.feed_root)
    result = module_workspace.run_day(instance=dagster_instance)
    assert result.success
    module_workspace.last_result = result
    return module_workspace, expected


def test_each_kind_of_bad_row_lands_in_rejects_with_file_line_column_and_reason(bad_day):
    ws, expected = bad_day
    rejects = ws.table("rejects")
    for reason, (file, line, column, value, _account) in expected.items():
        match = rejects.filter(
            (pl.col("file") == file) & (pl.col("line") == line) & (pl.col("column") == column)
            & pl.col("reason").str.starts_with(reason)
        )
        assert match.height >= 1, f"no reject for {reason!r} at {file}:{line} {column}\n{rejects}"
        assert match["value"][0] == value


def test_accounts_with_bad_rows_are_held_out_with_a_visible_alert(bad_day):
    ws, expected = bad_day
    held = {e[-1] for e in expected.values()}
    holdings_accounts = set(ws.table("holdings")["account_id"].to_list())
    assert holdings_accounts == {"ACC-GOOD"}
    alerts = ws.table("data_quality_alerts")
    assert held <= set(alerts["account_id"].to_list())
    negative = alerts.filter(pl.col("account_id") == "ACC-NEG").row(0, named=True)
    assert "negative quantity" in negative["reasons"] and negative["advisor_id"] == "ADV-1"
    skipped = ws.table("skipped_accounts").filter(pl.col("reason_kind") == "data_quality")
    assert held <= set(skipped["account_id"].to_list())
    assert "ACC-GOOD" in ws.table("drift")["scope_id"].to_list()


def test_clean_book_has_no_rejects(workspace, dagster_instance):
    b = FeedBuilder()
    b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    assert workspace.table("rejects").height == 0
    assert workspace.table("holdings").height == 2


def test_raw_files_are_archived_byte_for_byte_and_read_only(bad_day):
    ws, _ = bad_day
    manifest = ws.table("feed_manifest")
    assert manifest.height == 11
    feed_dir = ws.feed_root / AS_OF.isoformat()
    for row in manifest.iter_rows(named=True):
        original = (feed_dir / row["file"]).read_bytes()
        archived = open(row["archive_path"], "rb").read()
        assert archived == original
        assert hashlib.sha256(archived).hexdigest() == row["sha256"]
        assert not os.stat(row["archive_path"]).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected the ingest to fail"
    return failures[0].step_failure_data.user_failure_data.description


def test_missing_required_column_fails_ingest_naming_file_and_column(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 1)
    folder = b.write(workspace.feed_root)
    lines = (folder / "positions.csv").read_text().splitlines()
    (folder / "positions.csv").write_text("\n".join(l.rsplit(",", 1)[0] for l in lines) + "\n")
    result = workspace.run_day(instance=dagster_instance, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert message.startswith("positions.csv: missing required column(s): quantity")
    # Nothing downstream ran on a partial feed.
    assert not any(e.is_successful_output and e.step_key == "drift" for e in result.all_events)


def test_file_that_is_not_utf8_fails_with_file_and_line(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1", name="Müller family"); b.account("ACC-1")
    folder = b.write(workspace.feed_root)
    path = folder / "households.csv"
    path.write_bytes(path.read_text().encode("latin-1"))
    result = workspace.run_day(instance=dagster_instance, raise_on_error=False)
    assert failure_message(result).startswith("households.csv: not UTF-8: byte 0xfc at line 2")


def test_missing_feed_file_fails_and_the_present_files_are_still_archived(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1")
    folder = b.write(workspace.feed_root)
    (folder / "lots.csv").unlink()
    result = workspace.run_day(instance=dagster_instance, raise_on_error=False)
    assert "missing feed file(s): lots.csv" in failure_message(result)
    archived = list((workspace.root / "archive" / "sha256").rglob("*"))
    assert len([p for p in archived if p.is_file()]) == 10


def test_unknown_extra_column_is_ignored_and_the_rows_still_land(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    folder = b.write(workspace.feed_root)
    path = folder / "prices.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",currency"] + [l + ",USD" for l in lines[1:]]) + "\n")
    result = workspace.run_day(instance=dagster_instance)
    assert result.success
    manifest_meta = result.asset_materializations_for_node("land_feed")
    ignored = [m.metadata["ignored_columns"].value for m in manifest_meta if "ignored_columns" in m.metadata]
    assert ignored == [["prices.csv: ignored unknown column(s): currency"]]
    assert workspace.table("rejects").height == 0


def test_line_numbers_count_newlines_inside_quoted_fields(workspace, dagster_instance):
    b = FeedBuilder()
    b.household("HH-1", name="Smith\nTrust")  # a quoted field spanning two lines
    b.household("HH-2", ordinary="high")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    reject = workspace.table("rejects").filter(pl.col("column") == "federal_ordinary_rate").row(0, named=True)
    assert reject["file"] == "households.csv" and reject["line"] == 4 and reject["value"] == "high"


def test_held_out_accounts_show_as_a_warning_check_in_dagster(bad_day):
    ws, expected = bad_day
    evaluations = [
        e.event_specific_data for e in ws.last_result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == "no_accounts_held_out_for_data_quality"
    ]
    assert len(evaluations) == 1
    evaluation = evaluations[0]
    assert evaluation.passed is False and evaluation.severity.value == "WARN"
    assert evaluation.metadata["accounts_held_out"].value >= 10


def test_malformed_csv_fails_naming_the_file(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60)
    folder = b.write(workspace.feed_root)
    with (folder / "positions.csv").open("a") as handle:
        handle.write("ACC-1,BND,10,surprise,extra\n")  # more fields than the header
    result = workspace.run_day(instance=dagster_instance, raise_on_error=False)
    assert failure_message(result).startswith("positions.csv: malformed CSV:")


def test_a_utf8_byte_order_mark_is_accepted(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    folder = b.write(workspace.feed_root)
    path = folder / "accounts.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert workspace.run_day(instance=dagster_instance).success
    assert workspace.table("rejects").height == 0
    assert workspace.table("holdings")["account_id"].unique().to_list() == ["ACC-1"]


def test_a_hostile_unknown_column_name_is_only_data(workspace, dagster_instance):
    b = FeedBuilder(); b.household("HH-1"); b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    folder = b.write(workspace.feed_root)
    path = folder / "prices.csv"
    lines = path.read_text().splitlines()
    hostile = "\"x'); drop table landing_positions; --\""
    path.write_text("\n".join([lines[0] + "," + hostile] + [l + ",1" for l in lines[1:]]) + "\n")
    assert workspace.run_day(instance=dagster_instance).success
    assert workspace.table("landing_positions").height == 2
    assert workspace.table("rejects").height == 0
