"""Landing the canonical feed: archive raw files untouched, then load them strictly.

Two kinds of problem, two outcomes (FEED_CONTRACT.md):
- file-level (unreadable, not UTF-8, no header, missing required column, malformed CSV):
  `FeedFileError`, naming the file and what is wrong; the ingest fails and nothing is landed.
- row-level (a value that is not of its column's type, an empty required value, an unknown
  enum): the row is kept in the landing table with `_type_ok = false` and one problem per bad
  value is recorded in feed_type_errors (file, line, column, value, reason). Nothing is
  dropped or "fixed": rows land exactly as written, as text, and the staging SQL casts only
  the good ones.
Semantic rules (negative quantity, unknown symbol, lots vs positions, ...) are SQL models in
dbt_like_sql/intermediate, where they can see every file at once.

Files stream from disk into DuckDB (its CSV reader, explicit columns, no type sniffing): a
million-account feed is never held in Python memory.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb

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
CHUNK = 8 * 2**20

PROBLEMS_DDL = (
    'as_of date, file varchar, line bigint, "column" varchar, value varchar, reason varchar, '
    + ", ".join(f"{c} varchar" for c in REFERENCE_COLUMNS)
)
MANIFEST_DDL = (
    "as_of date, file varchar, sha256 varchar, size_bytes bigint, rows bigint, "
    "archive_path varchar, landed_at timestamp"
)


class FeedFileError(Exception):
    """A whole feed file cannot be used. The message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(path).name}: {problem} ({path})")


@dataclass
class ReceivedFile:
    """A feed file as received: archived, decoded as UTF-8, header read."""

    spec: FeedFile
    path: Path
    sha256: str
    size_bytes: int
    archive_path: str
    header: list[str]

    @property
    def ignored_columns(self) -> list[str]:
        return [h for h in self.header if h not in self.spec.column_names]


@dataclass
class LandedFeed:
    as_of: date
    received: dict[str, ReceivedFile]
    rows: dict[str, int] = field(default_factory=dict)
    rows_with_type_errors: dict[str, int] = field(default_factory=dict)
    type_errors: int = 0

    @property
    def warnings(self) -> list[str]:
        return [
            f"{r.path.name}: ignored unknown column(s): {', '.join(r.ignored_columns)}"
            for r in self.received.values()
            if r.ignored_columns
        ]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def landing_table(feed_file: str) -> str:
    return f"landing_{feed_file}"


def _store_in_archive(path: Path, sha: str, archive_root: Path) -> Path:
    target = archive_root / "sha256" / sha[:2] / sha
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha}.{os.getpid()}.part")
        with path.open("rb") as source, tmp.open("wb") as sink:
            while chunk := source.read(CHUNK):
                sink.write(chunk)
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    return target


def archive_raw(path: Path, archive_root: Path) -> str:
    """Archive any raw file (a custodian's own format included) byte for byte, write-once, under
    its SHA-256; returns the digest."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    _store_in_archive(path, sha, archive_root)
    return sha


def receive_file(path: Path, spec: FeedFile, archive_root: Path) -> ReceivedFile:
    """Archive one raw file, byte for byte, and check it can be read as the contract says.

    One streaming pass hashes the file, checks it decodes as UTF-8 and reads its header. The
    archive is write-once: stored under its SHA-256, never overwritten or deleted, read-only,
    so the exact bytes a decision was based on stay recoverable (SEC Rule 17a-4(f) spirit).
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, lines_before, first_chunk = 0, 0, b""
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                if not first_chunk:
                    first_chunk = chunk
                digest.update(chunk)
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    line = lines_before + chunk[: exc.start].count(b"\n") + 1
                    raise FeedFileError(
                        path, f"not UTF-8: byte 0x{chunk[exc.start]:02x} at line {line} cannot be decoded"
                    ) from exc
                lines_before += chunk.count(b"\n")
                size += len(chunk)
            decoder.decode(b"", final=True)
    except OSError as exc:
        raise FeedFileError(path, f"unreadable: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FeedFileError(path, "not UTF-8: the file ends inside a multi-byte character") from exc

    sha = digest.hexdigest()
    target = _store_in_archive(path, sha, archive_root)

    text = first_chunk.removeprefix(UTF8_BOM)
    if not text.strip():
        raise FeedFileError(path, "empty file: no header row")
    first_line = text.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    header = next(csv.reader(io.StringIO(first_line)))
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise FeedFileError(path, f"duplicate column(s) in header: {', '.join(duplicated)}")
    missing = [c for c in spec.required_columns if c not in header]
    if missing:
        raise FeedFileError(
            path, f"missing required column(s): {', '.join(missing)} (header has: {', '.join(header)})"
        )
    return ReceivedFile(spec, path, sha, size, str(target), header)


def _bad_value(column: Column) -> tuple[str, list, str] | None:
    """SQL that is true where a present value is not of the column's type (values bound)."""
    c = quote(column.name)
    if column.kind == "decimal":
        return (
            f"({c} is not null and not regexp_full_match({c}, ?))",
            [DECIMAL_PATTERN],
            "not a decimal number (plain digits, at most 10 before and 8 after an "
            "optional '.', no thousands separators or exponent)",
        )
    if column.kind == "date":
        return (
            f"({c} is not null and (not regexp_full_match({c}, ?) or try_cast({c} as date) is null))",
            [DATE_PATTERN],
            "not a valid ISO date (YYYY-MM-DD)",
        )
    if column.kind == "bool":
        return f"({c} is not null and not list_contains(?, {c}))", [list(BOOL_VALUES)], "not a boolean (true or false)"
    if column.kind == "enum":
        return (
            f"({c} is not null and not list_contains(?, {c}))",
            [list(column.choices)],
            f"not one of: {', '.join(column.choices)}",
        )
    return None


def _value_checks(spec: FeedFile, header: list[str]) -> list[tuple[str, str, list, str]]:
    """(column, bad-value SQL, its parameters, reason) for every check of the file."""
    checks = []
    for column in spec.columns:
        if column.name not in header:
            continue  # an optional column the file does not have
        if not column.nullable:
            checks.append((column.name, f"({quote(column.name)} is null)", [], "required value is empty"))
        bad = _bad_value(column)
        if bad:
            checks.append((column.name, *bad))
    return checks


def ensure_landing_table(con: duckdb.DuckDBPyConnection, spec: FeedFile) -> None:
    columns = ", ".join(f"{quote(c)} varchar" for c in spec.column_names)
    con.execute(
        f"create table if not exists {quote(landing_table(spec.name))} "
        f"(as_of date, _line bigint, _type_ok boolean, {columns})"
    )
    # The contract only grows (additive changes): a warehouse landed under an older contract
    # gains the new optional columns, empty for the days before they existed.
    for column in spec.column_names:
        con.execute(f"alter table {quote(landing_table(spec.name))} add column if not exists {quote(column)} varchar")


def _load_rows(con: duckdb.DuckDBPyConnection, received: ReceivedFile, as_of: date) -> int:
    spec, header = received.spec, received.header
    table = quote(landing_table(spec.name))
    selected = ", ".join(
        quote(c) if c in header else f"null::varchar as {quote(c)}" for c in spec.column_names
    )
    checks = _value_checks(spec, header)
    any_bad = " or ".join(sql for _, sql, _, _ in checks) or "false"
    # Placeholders in text order: the as-of date, the checks' values, the file path and its
    # columns (the header names come from the file, so they are bound, never rendered).
    params = [
        as_of,
        *[p for _, _, ps, _ in checks for p in ps],
        str(received.path),
        {name: "VARCHAR" for name in header},
    ]
    # row_number() over () numbers rows in file order (DuckDB preserves the order of a single
    # table-function scan); header = line 1. Newlines inside quoted fields are fixed up below.
    sql = f"""
        insert into {table} by name
        select ?::date as as_of, _row + 1 as _line, not ({any_bad}) as _type_ok, * exclude (_row)
        from (
            select row_number() over () as _row, {selected}
            from read_csv(?, header = true, auto_detect = false, columns = ?,
                          delim = ',', quote = '"', escape = '"', strict_mode = true,
                          null_padding = false)
        )
    """
    try:
        rows = con.execute(sql, params).fetchone()[0]
    except duckdb.Error as exc:
        raise FeedFileError(received.path, f"malformed CSV: {str(exc).splitlines()[0]}") from exc
    _fix_lines_after_embedded_newlines(con, spec, as_of)
    return rows


def _fix_lines_after_embedded_newlines(con: duckdb.DuckDBPyConnection, spec: FeedFile, as_of: date) -> None:
    """Make _line the physical line a record starts on when quoted fields contain newlines."""
    table = quote(landing_table(spec.name))
    newlines = " + ".join(
        f"coalesce(length({quote(c)}) - length(replace({quote(c)}, chr(10), '')), 0)" for c in spec.column_names
    )
    any_newline = " or ".join(f"contains({quote(c)}, chr(10))" for c in spec.column_names)
    has_any = con.execute(
        f"select count(*) from {table} where as_of = ? and ({any_newline})", [as_of]
    ).fetchone()[0]
    if not has_any:
        return
    con.execute(
        f"""
        update {table} t set _line = fixed.line
        from (
            select _line as record_line,
                   _line + coalesce(sum({newlines}) over (order by _line rows between unbounded preceding
                                                          and 1 preceding), 0) as line
            from {table} where as_of = ?
        ) fixed
        where t.as_of = ? and t._line = fixed.record_line
        """,
        [as_of, as_of],
    )


def _record_type_errors(con: duckdb.DuckDBPyConnection, received: ReceivedFile, as_of: date) -> int:
    spec, header = received.spec, received.header
    table = quote(landing_table(spec.name))
    refs = ", ".join(
        f"{quote(c) if c in spec.column_names and c in header else 'null::varchar'} as {quote(c)}"
        for c in REFERENCE_COLUMNS
    )
    total = 0
    for column, bad_sql, bad_params, reason in _value_checks(spec, header):
        total += con.execute(
            f"""insert into feed_type_errors by name
                select as_of, ? as file, _line as line, ? as "column", {quote(column)} as value,
                       ? as reason, {refs}
                from {table} where as_of = ? and not _type_ok and {bad_sql}""",
            [spec.filename, column, reason, as_of, *bad_params],
        ).fetchone()[0]
    return total


def land_feed(con: duckdb.DuckDBPyConnection, feed_dir: Path, as_of: date, archive_root: Path) -> LandedFeed:
    """Archive every file of one as-of date's feed, then land them all in one transaction.

    All present files are archived before anything is parsed, so even a feed that fails a
    file-level check is preserved exactly as received for operations to inspect; a failure
    while loading rolls the whole day's landing back.
    """
    if not feed_dir.is_dir():
        raise FeedFileError(feed_dir, f"no feed folder for {as_of.isoformat()}")
    specs = list(FEED_FILES.values())
    missing = [s.filename for s in specs if not (feed_dir / s.filename).exists()]
    received: dict[str, ReceivedFile] = {}
    problems: list[FeedFileError] = []
    for spec in specs:
        if spec.filename in missing:
            continue
        try:
            received[spec.name] = receive_file(feed_dir / spec.filename, spec, archive_root)
        except FeedFileError as exc:
            problems.append(exc)
    if missing:
        raise FeedFileError(feed_dir, f"missing feed file(s): {', '.join(missing)}")
    if problems:
        raise problems[0]

    feed = LandedFeed(as_of, received)
    con.execute(f"create table if not exists feed_type_errors ({PROBLEMS_DDL})")
    con.execute("begin transaction")
    try:
        con.execute("delete from feed_type_errors where as_of = ?", [as_of])
        for spec in specs:
            ensure_landing_table(con, spec)
            con.execute(f"delete from {quote(landing_table(spec.name))} where as_of = ?", [as_of])
            feed.rows[spec.name] = _load_rows(con, received[spec.name], as_of)
            errors = _record_type_errors(con, received[spec.name], as_of)
            feed.type_errors += errors
            feed.rows_with_type_errors[spec.name] = con.execute(
                f"select count(*) from {quote(landing_table(spec.name))} where as_of = ? and not _type_ok",
                [as_of],
            ).fetchone()[0]
        _record_manifest(con, feed)
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    return feed


def _record_manifest(con: duckdb.DuckDBPyConnection, feed: LandedFeed) -> None:
    con.execute(f"create table if not exists feed_manifest ({MANIFEST_DDL})")
    con.execute("delete from feed_manifest where as_of = ?", [feed.as_of])
    con.executemany(
        "insert into feed_manifest values (?, ?, ?, ?, ?, ?, now()::timestamp)",
        [
            [feed.as_of, r.path.name, r.sha256, r.size_bytes, feed.rows[name], r.archive_path]
            for name, r in feed.received.items()
        ],
    )
