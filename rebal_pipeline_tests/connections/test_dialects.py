"""Custodian dialects: a sandbox book delivered as Schwab-, Fidelity- or Pershing-style files
comes back through the adapters as the same canonical feed, lands with zero rejects, and every
malformed delivery is refused with the file, line, field and reason (docs/custodian_feeds.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pytest

from rebal_pipeline import settings
from rebal_pipeline.connections.dialects import (
    CUSTODIAN_FILES,
    DIALECTS,
    REFERENCE_FILES,
    DialectError,
    fidelity_filename,
    pershing_filename,
    schwab_filename,
    to_canonical,
)
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.landing import land_feed
from rebal_pipeline.core.sql_models import load_project, materialize_model
from rebal_pipeline.sandbox import generator
from rebal_pipeline.sandbox.dialects import SANDBOX_FIRM_ID, emit_dialect

AS_OF = dt.date(2025, 6, 13)  # a Friday
DECIMAL_COLUMNS = {"quantity", "cost_basis", "price", "close"}


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """The canonical sandbox feed folder of a 20-household book."""
    root = tmp_path_factory.mktemp("book")
    with pytest.MonkeyPatch.context() as patch:
        households_frame = generator._households_frame
        if "confirmation_style" not in households_frame(generator._draw_households(
            generator.SandboxConfig(as_of=AS_OF, households=1, seed=1)
        )).columns:
            # The generator at this commit does not write the optional households column
            # confirmation_style that feed_contract now lists; write it empty (= firm default).
            patch.setattr(
                generator, "_households_frame",
                lambda h: households_frame(h).with_columns(confirmation_style=pl.lit(None, pl.String)),
            )
        report = generator.generate_feed(generator.SandboxConfig(as_of=AS_OF, households=20, seed=1), root)
    return report.feed_dir


def parsed(feed_dir: Path, name: str) -> list[tuple]:
    """A canonical file as parsed values: decimals as Decimal (1.00 == 1), the rest as text."""
    frame = pl.read_csv(feed_dir / FEED_FILES[name].filename, infer_schema=False)
    columns = FEED_FILES[name].column_names
    return [
        tuple(Decimal(row[c]) if c in DECIMAL_COLUMNS and row.get(c) else (row.get(c) or "") for c in columns)
        for row in frame.iter_rows(named=True)
    ]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module", params=DIALECTS)
def delivery(request, book, tmp_path_factory) -> tuple[str, Path]:
    raw = tmp_path_factory.mktemp(f"raw_{request.param}")
    emit_dialect(book, request.param, raw)
    return request.param, raw


# --- the round trip -----------------------------------------------------------------------------


def test_round_trip_gives_back_the_same_positions_lots_transactions_and_prices(book, delivery, tmp_path):
    dialect, raw = delivery
    before = digests(raw)
    report = to_canonical(dialect, raw, AS_OF, book, tmp_path / "feed")
    for name in CUSTODIAN_FILES:
        original, converted = parsed(book, name), parsed(report.out_dir, name)
        assert len(converted) > 0 and converted == original, name
        assert report.rows[name] == len(original)
    for name in REFERENCE_FILES:  # the firm's own files, copied as they are
        filename = FEED_FILES[name].filename
        assert (report.out_dir / filename).read_bytes() == (book / filename).read_bytes()
    assert digests(raw) == before  # raw files untouched
    assert report.raw_files == before
    assert report.dialect == dialect and report.as_of == AS_OF
    assert report.firm_id == (None if dialect == "schwab" else SANDBOX_FIRM_ID)


def test_the_converted_feed_lands_with_zero_rejects(book, delivery, tmp_path):
    dialect, raw = delivery
    feed_dir = tmp_path / "feed" / AS_OF.isoformat()
    to_canonical(dialect, raw, AS_OF, book, feed_dir)
    models = load_project(settings.sql_dir())
    needed, pending = set(), ["rejects", "data_quality_alerts"]
    while pending:
        name = pending.pop()
        if name in models and name not in needed:
            needed.add(name)
            pending.extend(models[name].refs)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        landed = land_feed(con, feed_dir, AS_OF, tmp_path / "archive")
        for name, model in models.items():  # dependencies first
            if name in needed:
                materialize_model(con, model, AS_OF)
        rejects = con.execute("select * from rejects where as_of = ?", [AS_OF]).pl()
        positions = con.execute("select count(*) from landing_positions").fetchone()[0]
    assert rejects.height == 0, rejects.head(10)
    assert positions == len(parsed(book, "positions"))
    assert landed is not None


def test_an_account_number_missing_from_accounts_csv_is_refused(book, tmp_path):
    raw = tmp_path / "raw"
    emit_dialect(book, "schwab", raw)
    reference = tmp_path / "reference"
    shutil.copytree(book, reference)
    accounts = (reference / "accounts.csv").read_text().splitlines()
    dropped = accounts[1].split(",")[0]
    (reference / "accounts.csv").write_text("\n".join([accounts[0], *accounts[2:]]) + "\n")
    with pytest.raises(DialectError) as caught:
        to_canonical("schwab", raw, AS_OF, reference, tmp_path / "out")
    error = caught.value
    assert error.file == schwab_filename("positions", AS_OF) and error.line == 2
    assert error.field == "Account Number" and dropped in error.reason and "accounts.csv" in error.reason


def test_a_delivery_for_another_business_date_is_refused(book, tmp_path):
    raw = tmp_path / "raw"
    emit_dialect(book, "pershing", raw)
    path = raw / pershing_filename(AS_OF)
    path.write_text(path.read_text().replace("HDR20250613", "HDR20250612", 1))
    with pytest.raises(DialectError) as caught:
        to_canonical("pershing", raw, AS_OF, book, tmp_path / "out")
    error = caught.value
    assert (error.file, error.line, error.field) == (path.name, 1, "business_date")
    assert "2025-06-12 is not the as-of date 2025-06-13" in error.reason


# --- malformed deliveries -----------------------------------------------------------------------

Edit = Callable[[list[str]], None]


def replace_at(lines: list[str], index: int, column: int, text: str) -> None:
    """Overwrite `text` at 1-based `column` of lines[index], keeping the length."""
    line = lines[index]
    lines[index] = line[: column - 1] + text + line[column - 1 + len(text) :]


def csv_cell(lines: list[str], index: int, cell: int, text: str) -> None:
    cells = lines[index].split(",")
    cells[cell] = text
    lines[index] = ",".join(cells)


def bump_last_digit(lines: list[str], index: int, column: int) -> None:
    digit = lines[index][column - 1]
    replace_at(lines, index, column, str((int(digit) + 1) % 10))


# dialect -> case -> (file, edit, expected line (negative: from the end), field fragment, reason fragment)
CASES: dict[str, dict[str, tuple[Callable[[dt.date], str], Edit, int, str, str]]] = {
    "schwab": {
        "wrong_trailer_count": (
            lambda d: schwab_filename("positions", d), lambda ls: csv_cell(ls, -1, 1, "1"),
            -1, "record count", "trailer says 1 records",
        ),
        "wrong_control_total": (
            lambda d: schwab_filename("lots", d), lambda ls: csv_cell(ls, -1, 2, "12.34"),
            -1, "control total", "trailer says 12.34",
        ),
        "non_numeric_quantity": (
            lambda d: schwab_filename("positions", d), lambda ls: csv_cell(ls, 1, 2, "12O"),
            2, "Quantity", "not a number: '12O'",
        ),
        "truncated_line": (
            lambda d: schwab_filename("transactions", d), lambda ls: ls.__setitem__(2, ls[2][: ls[2].rindex(",")]),
            3, "", "7 fields, the layout has 8",
        ),
        "unknown_record_type": (
            lambda d: schwab_filename("transactions", d), lambda ls: csv_cell(ls, 3, 3, "XX"),
            4, "Action", "unknown action code 'XX'",
        ),
    },
    "fidelity": {
        "wrong_trailer_count": (
            lambda d: fidelity_filename("positions", d), lambda ls: replace_at(ls, -1, 2, "000000001"),
            -1, "record_count", "trailer says 1 detail records",
        ),
        "wrong_control_total": (
            lambda d: fidelity_filename("lots", d), lambda ls: bump_last_digit(ls, -1, 30),
            -1, "control_total", "the sum of cost_basis is",
        ),
        "non_numeric_quantity": (
            lambda d: fidelity_filename("positions", d), lambda ls: replace_at(ls, 1, 30, "A"),
            2, "quantity (columns 24-40)", "not a signed number",
        ),
        "truncated_line": (
            lambda d: fidelity_filename("transactions", d), lambda ls: ls.__setitem__(2, ls[2][:60]),
            3, "", "60 characters long, the layout is 100 (truncated)",
        ),
        "unknown_record_type": (
            lambda d: fidelity_filename("lots", d), lambda ls: replace_at(ls, 3, 1, "X"),
            4, "record_type", "unknown record type 'X'",
        ),
    },
    "pershing": {
        "wrong_trailer_count": (
            pershing_filename, lambda ls: replace_at(ls, -1, 4, "000000001"),
            -1, "record_count", "trailer says 1 records",
        ),
        "wrong_control_total": (
            pershing_filename, lambda ls: bump_last_digit(ls, -1, 60),
            -1, "position_quantity_total", "the records sum to",
        ),
        "non_numeric_quantity": (
            pershing_filename, lambda ls: replace_at(ls, 1, 30, "?"),
            2, "quantity (columns 28-45)", "not a signed zoned (overpunch) number",
        ),
        "truncated_line": (
            pershing_filename, lambda ls: ls.__setitem__(2, ls[2][:47]),
            3, "", "47 characters long, the layout is 120 (truncated)",
        ),
        "unknown_record_type": (
            pershing_filename, lambda ls: replace_at(ls, 3, 1, "XYZ"),
            4, "record_type", "unknown record type 'XYZ'",
        ),
    },
}


@pytest.mark.parametrize(
    "dialect,case", [(d, c) for d in DIALECTS for c in CASES[d]], ids=lambda v: v
)
def test_a_malformed_delivery_is_refused_naming_file_line_field_and_reason(book, tmp_path, dialect, case):
    filename_of, edit, line, field, reason = CASES[dialect][case]
    raw = tmp_path / "raw"
    emit_dialect(book, dialect, raw)
    path = raw / filename_of(AS_OF)
    lines = path.read_text(encoding="ascii").splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    before = digests(raw)
    out = tmp_path / "out"

    with pytest.raises(DialectError) as caught:
        to_canonical(dialect, raw, AS_OF, book, out)

    error = caught.value
    assert error.file == path.name
    assert error.line == (line if line > 0 else len(lines) + 1 + line)
    assert field in (error.field or "")
    assert reason in error.reason, error.reason
    assert f"{path.name}, line {error.line}" in str(error)
    assert digests(raw) == before  # the raw files are never modified
    assert not out.exists() or not any(out.iterdir())  # nothing half-converted is left behind
