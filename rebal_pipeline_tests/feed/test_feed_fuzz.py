"""Fuzz target for the feed parser (issue #13, item 8), with hypothesis.

Random bytes and random row edits of a valid small feed never produce a traceback: the day
either lands (bad rows become rejects, and every SQL model of the day still runs) or fails with
a FeedFileError naming the file (and the line, for a problem inside a file). Whatever happens,
every file is archived exactly as it arrived. Bounded in CI (REBAL_FUZZ_EXAMPLES, default 50;
the full-SQL variant runs a fifth of them); e.g. REBAL_FUZZ_EXAMPLES=5000 for a long run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rebal_pipeline.core.landing as landing
from rebal_pipeline import settings as rebal_settings
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.landing import FeedFileError, land_feed
from rebal_pipeline.core.sql_models import load_project, materialize_model, replace_partition
from rebal_pipeline.resources import DriftPolicySource
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder

EXAMPLES = int(os.environ.get("REBAL_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("REBAL_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SQL = settings(FUZZ, max_examples=max(EXAMPLES // 5, 5))
FILES = sorted(spec.filename for spec in FEED_FILES.values())


def valid_feed(root: Path) -> Path:
    b = FeedBuilder()
    b.household("HH-1", name='Smith "Jr" Trust')
    b.account("ACC-1"); b.position("ACC-1", "VTI", 60); b.position("ACC-1", "BND", 80)
    b.position("ACC-1", "CASH", "1200.50")
    b.account("ACC-2"); b.position("ACC-2", "VTI", 5)
    b.add("transactions", account_id="ACC-1", symbol="VTI", trade_date="2026-11-02", type="buy", quantity="5",
          price="99.5")
    return b.write(root)


# Bytes that matter to a CSV reader, and values that matter to the rules.
NASTY = st.sampled_from([b",", b'"', b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\xc3", b"\xef\xbb\xbf", b" ",
                         b"\t", b"-", b"1e300", b"9999999999", b"0.00000001", b"", b"CASH", b"ACC-1 ", "é".encode()])
FRAGMENT = st.one_of(NASTY, st.binary(max_size=12))


@st.composite
def byte_edits(draw):
    """(file, new bytes): random bytes spliced into, or replacing, one file."""
    name = draw(st.sampled_from(FILES))
    kind = draw(st.sampled_from(["splice", "replace", "truncate"]))
    return name, kind, draw(st.lists(st.tuples(st.floats(0, 1), FRAGMENT), min_size=1, max_size=6)), draw(
        st.binary(max_size=200))


def apply_bytes(raw: bytes, kind: str, splices, noise: bytes) -> bytes:
    if kind == "replace":
        return noise
    if kind == "truncate":
        return raw[: int(len(raw) * splices[0][0])]
    for at, fragment in splices:
        i = int(len(raw) * at)
        raw = raw[:i] + fragment + raw[i:]
    return raw


@st.composite
def row_edits(draw):
    """(file, edits): values of one file's rows replaced, rows deleted, duplicated or blanked."""
    name = draw(st.sampled_from(FILES))
    edits = draw(st.lists(st.tuples(st.sampled_from(["value", "delete", "duplicate", "blank"]),
                                    st.integers(1, 20), st.integers(0, 15),
                                    st.one_of(NASTY.map(lambda b: b.decode("utf-8", "replace")),
                                              st.text(max_size=10))), min_size=1, max_size=4))
    return name, edits


def apply_rows(text: str, edits) -> str:
    lines = text.split("\n")
    for kind, row, column, value in edits:
        if len(lines) <= 1:
            continue  # only the header (or nothing) left to edit
        row = row % (len(lines) - 1) + 1
        if kind == "delete":
            del lines[row]
        elif kind == "duplicate":
            lines.insert(row, lines[row])
        elif kind == "blank":
            lines.insert(row, "")
        else:
            fields = lines[row].split(",")
            fields[column % len(fields)] = value
            lines[row] = ",".join(fields)
    return "\n".join(lines)


def land_and_check(root: Path, folder: Path, con) -> bool:
    """Land the day; True when it landed, False on a named file-level failure. Checks the archive."""
    arrived = {p.name: p.read_bytes() for p in folder.iterdir()}
    try:
        land_feed(con, folder, AS_OF, root / "archive")
        landed = True
    except FeedFileError as exc:
        assert exc.file in FILES, exc
        assert str(exc).startswith(f"{exc.file}: ")
        if exc.line is not None:
            assert exc.line >= 1 and f"line {exc.line}" in exc.problem
        landed = False
    for name, raw in arrived.items():
        sha = hashlib.sha256(raw).hexdigest()
        archived = root / "archive" / "sha256" / sha[:2] / sha
        assert archived.read_bytes() == raw, f"{name} archived differently from what arrived"
    return landed


# The feed's data-quality models and what they need (other models read tables the trade steps write).
QUALITY_MODELS = ("rejects", "data_quality_alerts", "skipped_accounts", "reconciliation_alerts", "holdings")


def run_sql_day(con) -> None:
    frame = DriftPolicySource(policy_file="").load().bands_frame().with_columns(as_of=AS_OF)
    replace_partition(con, "drift_policy", AS_OF, frame.to_arrow())
    project = load_project(rebal_settings.sql_dir())
    needed, todo = set(), list(QUALITY_MODELS)
    while todo:
        name = todo.pop()
        if name in project and name not in needed:
            needed.add(name)
            todo.extend(project[name].refs)
    for model in project.values():
        if model.name in needed:
            materialize_model(con, model, AS_OF)


@FUZZ
@given(edit=byte_edits())
def test_random_bytes_in_a_feed_file_are_a_named_error_or_land(edit):
    name, kind, splices, noise = edit
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = valid_feed(root / "feeds")
        path = folder / name
        path.write_bytes(apply_bytes(path.read_bytes(), kind, splices, noise))
        with duckdb.connect() as con:
            land_and_check(root, folder, con)


@FUZZ_SQL
@given(edit=row_edits())
def test_random_row_edits_are_rejects_or_a_named_error_and_every_model_still_runs(edit):
    name, edits = edit
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = valid_feed(root / "feeds")
        path = folder / name
        path.write_bytes(apply_rows(path.read_bytes().decode(), edits).encode())
        with duckdb.connect() as con:
            if land_and_check(root, folder, con):
                run_sql_day(con)  # a bad row is a reject: no SQL model may fail on it
                held = {r[0] for r in con.execute("select account_id from int_held_accounts").fetchall()}
                rejected = con.execute("select count(*) from rejects").fetchone()[0]
                assert not held or rejected, "an account held out with no reject naming why"


@FUZZ
@given(data=st.lists(st.sampled_from([b"a", b",", b"\n", b"\r\n", b'"', b"\r", b"\x00", "ü".encode(), b"1", b" "]),
                     max_size=40).map(b"".join), chunk=st.integers(1, 9))
def test_the_scan_reads_a_file_the_same_in_any_chunk_size(data, chunk):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.csv"
        path.write_bytes(b"a,b\n" + data)

        def outcome():
            try:
                layout = landing.scan_csv(path)
                return ("ok", layout.header, layout.record_lines.tolist())
            except FeedFileError as exc:
                assert exc.line is None or exc.line >= 1
                return ("error",)

        whole = outcome()
        saved = landing.CHUNK
        landing.CHUNK = chunk
        try:
            assert outcome() == whole
        finally:
            landing.CHUNK = saved


def test_fuzz_examples_default_is_bounded_for_ci():
    if "REBAL_FUZZ_EXAMPLES" not in os.environ:
        assert EXAMPLES == 50
    else:
        pytest.skip("a long fuzz run was asked for")
