"""Landing the canonical feed: archive raw files untouched, then parse them strictly.

Two kinds of problem, two outcomes (FEED_CONTRACT.md):
- file-level (unreadable, not UTF-8, no header, missing required column, malformed CSV):
  `FeedFileError`, naming the file and what is wrong; the ingest fails and nothing is landed.
- row-level (a value that is not of its column's type, an empty required value, an unknown
  enum): the row is kept in the landing table with `_type_ok = false` and one problem per bad
  value is recorded (file, line, column, value, reason). Nothing is dropped or "fixed":
  rows land exactly as written, as text, and the staging SQL casts only the good ones.
Semantic rules (negative quantity, unknown symbol, lots vs positions, ...) are SQL models in
dbt_like_sql/intermediate, where they can see every file at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl

from rebal_pipeline.core.feed_contract import (
    BOOL_VALUES,
    DATE_PATTERN,
    DECIMAL_PATTERN,
    FEED_FILES,
    Column,
    FeedFile,
)

# Columns copied onto every problem row so the affected account/household/model can be
# found even when the row itself never reaches staging.
REFERENCE_COLUMNS = ("account_id", "household_id", "model_id", "symbol", "scope", "scope_id")
UTF8_BOM = b"\xef\xbb\xbf"

PROBLEM_SCHEMA = {
    "file": pl.String,
    "line": pl.Int64,
    "column": pl.String,
    "value": pl.String,
    "reason": pl.String,
    **{c: pl.String for c in REFERENCE_COLUMNS},
}


class FeedFileError(Exception):
    """A whole feed file cannot be used. The message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(path).name}: {problem} ({path})")


@dataclass
class ArchivedFile:
    file: str
    sha256: str
    size_bytes: int
    archive_path: str


@dataclass
class LandedFile:
    spec: FeedFile
    rows: pl.DataFrame  # every row as text, plus _line and _type_ok
    problems: pl.DataFrame  # PROBLEM_SCHEMA
    warnings: list[str] = field(default_factory=list)


def archive_raw_file(path: Path, archive_root: Path) -> ArchivedFile:
    """Copy a raw file into the content-addressed archive before anything parses it.

    The archive is write-once: a file is stored under its SHA-256, never overwritten, never
    deleted, and made read-only, so the exact bytes a decision was based on stay recoverable
    (SEC Rule 17a-4(f) spirit: the original is preserved).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeedFileError(path, f"unreadable: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    target = archive_root / "sha256" / digest[:2] / digest
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    return ArchivedFile(path.name, digest, len(data), str(target))


def _decode_check(path: Path, data: bytes) -> bytes:
    if data.startswith(UTF8_BOM):
        # A byte-order mark is encoding metadata (Excel writes one), not data.
        data = data[len(UTF8_BOM) :]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FeedFileError(
            path, f"not UTF-8: byte 0x{data[exc.start]:02x} at line {line} cannot be decoded"
        ) from exc
    if not data.strip():
        raise FeedFileError(path, "empty file: no header row")
    return data


def _header(path: Path, data: bytes, spec: FeedFile) -> tuple[list[str], list[str]]:
    first_line = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
    header = next(csv.reader(io.StringIO(first_line)))
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise FeedFileError(path, f"duplicate column(s) in header: {', '.join(duplicated)}")
    missing = [c for c in spec.required_columns if c not in header]
    if missing:
        raise FeedFileError(
            path,
            f"missing required column(s): {', '.join(missing)} (header has: {', '.join(header)})",
        )
    extra = [h for h in header if h not in spec.column_names]
    return header, extra


def _bad_value(column: Column) -> tuple[pl.Expr, str]:
    """An expression that is true where a present value is not of the column's type."""
    value = pl.col(column.name)
    if column.kind == "decimal":
        return ~value.str.contains(DECIMAL_PATTERN), (
            "not a decimal number (plain digits, at most 10 before and 8 after an "
            "optional '.', no thousands separators or exponent)"
        )
    if column.kind == "date":
        parsed = value.str.strptime(pl.Date, "%Y-%m-%d", strict=False)
        return ~value.str.contains(DATE_PATTERN) | parsed.is_null(), (
            "not a valid ISO date (YYYY-MM-DD)"
        )
    if column.kind == "bool":
        return ~value.is_in(BOOL_VALUES), "not a boolean (true or false)"
    if column.kind == "enum":
        return ~value.is_in(column.choices), f"not one of: {', '.join(column.choices)}"
    return pl.lit(False), ""


def _physical_lines(frame: pl.DataFrame) -> pl.Series:
    """The line each record starts on (header = line 1), counting newlines inside quoted fields."""
    if frame.height == 0:
        return pl.Series("_line", [], dtype=pl.Int64)
    embedded = pl.sum_horizontal(
        [pl.col(c).str.count_matches("\n").fill_null(0) for c in frame.columns]
    )
    span = (embedded + 1).cast(pl.Int64)
    return frame.select((span.cum_sum() - span + 2).alias("_line")).to_series()


def land_feed_file(path: Path, spec: FeedFile) -> LandedFile:
    """Parse one feed file as text and flag each value that is not of its column's type."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FeedFileError(path, f"unreadable: {exc.strerror or exc}") from exc
    data = _decode_check(path, raw)
    header, extra = _header(path, data, spec)
    try:
        frame = pl.read_csv(
            data,
            infer_schema=False,
            has_header=True,
            quote_char='"',
            empty_string_is_null=True,
        )
    except Exception as exc:  # polars raises ComputeError/NoDataError with its own detail
        raise FeedFileError(path, f"malformed CSV: {exc}") from exc

    warnings = []
    if extra:
        warnings.append(f"{path.name}: ignored unknown column(s): {', '.join(extra)}")
    frame = frame.with_columns(_physical_lines(frame))
    missing_optional = [c.name for c in spec.columns if c.name not in header]
    frame = frame.select(
        [pl.col(c) if c in header else pl.lit(None, pl.String).alias(c) for c in spec.column_names]
        + ["_line"]
    )

    checks: list[tuple[str, pl.Expr, str]] = []
    for column in spec.columns:
        if column.name in missing_optional:
            continue
        value = pl.col(column.name)
        if not column.nullable:
            checks.append((column.name, value.is_null(), "required value is empty"))
        bad, reason = _bad_value(column)
        if reason:
            checks.append((column.name, value.is_not_null() & bad, reason))

    refs = [
        (pl.col(c) if c in spec.column_names else pl.lit(None, pl.String)).alias(c)
        for c in REFERENCE_COLUMNS
    ]
    problem_frames = [
        frame.filter(bad).select(
            pl.lit(spec.filename).alias("file"),
            pl.col("_line").alias("line"),
            pl.lit(name).alias("column"),
            pl.col(name).alias("value"),
            pl.lit(reason).alias("reason"),
            *refs,
        )
        for name, bad, reason in checks
    ]
    problems = (
        pl.concat(problem_frames).sort("line", "column")
        if problem_frames
        else pl.DataFrame(schema=PROBLEM_SCHEMA)
    )
    any_bad = pl.any_horizontal([bad for _, bad, _ in checks]) if checks else pl.lit(False)
    frame = frame.with_columns((~any_bad).alias("_type_ok"))
    return LandedFile(spec, frame, problems.cast(PROBLEM_SCHEMA), warnings)


@dataclass
class LandedFeed:
    as_of: date
    files: dict[str, LandedFile]
    archive: list[ArchivedFile]

    @property
    def problems(self) -> pl.DataFrame:
        frames = [f.problems for f in self.files.values()]
        return pl.concat(frames) if frames else pl.DataFrame(schema=PROBLEM_SCHEMA)

    @property
    def warnings(self) -> list[str]:
        return [w for f in self.files.values() for w in f.warnings]


def feed_dir_for(feed_root: Path, as_of: date) -> Path:
    return feed_root / as_of.isoformat()


def land_feed(feed_dir: Path, as_of: date, archive_root: Path) -> LandedFeed:
    """Archive every file of one as-of date's feed, then land each one.

    All files are archived first, so even a feed that fails a file-level check is preserved
    exactly as received for the operations team to inspect.
    """
    if not feed_dir.is_dir():
        raise FeedFileError(feed_dir, f"no feed folder for {as_of.isoformat()}")
    missing = [f.filename for f in FEED_FILES.values() if not (feed_dir / f.filename).exists()]
    present = [feed_dir / f.filename for f in FEED_FILES.values() if f.filename not in missing]
    archive = [archive_raw_file(p, archive_root) for p in present]
    if missing:
        raise FeedFileError(feed_dir, f"missing feed file(s): {', '.join(missing)}")
    files = {spec.name: land_feed_file(feed_dir / spec.filename, spec) for spec in FEED_FILES.values()}
    return LandedFeed(as_of, files, archive)


def archive_manifest(feed: LandedFeed) -> pl.DataFrame:
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = {name: f.rows.height for name, f in feed.files.items()}
    return pl.DataFrame(
        {
            "as_of": [feed.as_of] * len(feed.archive),
            "file": [a.file for a in feed.archive],
            "sha256": [a.sha256 for a in feed.archive],
            "size_bytes": [a.size_bytes for a in feed.archive],
            "rows": [rows.get(Path(a.file).stem, 0) for a in feed.archive],
            "archive_path": [a.archive_path for a in feed.archive],
            "landed_at": [now] * len(feed.archive),
        },
        schema_overrides={"as_of": pl.Date, "landed_at": pl.Datetime("us")},
    )
