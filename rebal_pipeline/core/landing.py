"""Landing the canonical feed: archive raw files untouched, then load them strictly.

Order of work: every file of the day is archived first, byte for byte, before anything decodes
or checks it (`archive_file`: 0440, write-once under its SHA-256); then each archived copy is
scanned (`scan_csv`: UTF-8, RFC 4180 structure, field/record size limits, physical line of every
record) and loaded from the archive, so what lands is exactly what was archived.

Two kinds of problem, two outcomes (docs/feed_contract.md):
- file-level (unreadable, not UTF-8, NUL byte, CR-only or mixed line endings, stray/unclosed
  quote, huge field, wrong number of fields, no header, missing required column):
  `FeedFileError`, naming the file, the line and what is wrong; the ingest fails and nothing is
  landed. Every failing file of the day is named (`FeedFileError.also`).
- row-level (a value that is not of its column's type, an empty required value, an unknown
  enum, an id with leading/trailing whitespace): the row is kept in the landing table with `_type_ok = false` and one problem per bad
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
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

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
TRIMMED = "<trimmed>"  # placeholder in a reason for the value without leading/trailing whitespace
CHUNK = 8 * 2**20
# Archive copies: read-only for rebal and the operations group, nothing for others.
ARCHIVE_FILE_MODE = 0o440
ARCHIVE_DIR_MODE = 0o750
# No value of the contract comes near these; a file that has one is not a feed file (or is a
# hostile one), and the CSV reader's own limit (2 MB a line) must never be what stops it.
MAX_FIELD_BYTES = 64 * 2**10
MAX_RECORD_BYTES = 2**20

PROBLEMS_DDL = (
    'as_of date, file varchar, line bigint, "column" varchar, value varchar, reason varchar, '
    + ", ".join(f"{c} varchar" for c in REFERENCE_COLUMNS)
)
MANIFEST_DDL = (
    "as_of date, file varchar, sha256 varchar, size_bytes bigint, rows bigint, "
    "archive_path varchar, landed_at timestamp"
)


class FeedFileError(Exception):
    """A whole feed file cannot be used. The message names the file, the line (when the problem
    has one: physical line numbers, header = line 1) and the problem."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None):
        self.path = str(path)
        self.file = Path(path).name
        self.problem = problem
        self.line = line
        # Other files of the same feed that also failed (land_feed checks them all).
        self.also: list[FeedFileError] = []
        super().__init__(f"{self.file}: {problem} ({path})")


@dataclass
class ReceivedFile:
    """A feed file as received: archived, checked as UTF-8 CSV, header read."""

    spec: FeedFile
    path: Path
    sha256: str
    size_bytes: int
    archive_path: str
    header: list[str]
    # The physical line each data record starts on, in file order: blank lines (which the CSV
    # reader skips) and newlines inside quoted fields are counted.
    record_lines: np.ndarray | None = None

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


# ---------------------------------------------------------------------------------------------
# 1. Archive: bytes only, before anything reads the file as text.

@dataclass(frozen=True)
class Archived:
    sha256: str
    size_bytes: int
    path: Path


def _make_dirs(folder: Path) -> None:
    # Folders rebal creates in the archive: rebal writes, the operations group reads.
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for parent in reversed(missing):
        parent.mkdir(exist_ok=True)
        os.chmod(parent, ARCHIVE_DIR_MODE)


def archive_file(path: Path, archive_root: Path) -> Archived:
    """Archive one raw file byte for byte under archive/sha256/<2 hex>/<sha256>, mode 0440.

    One streaming pass copies the bytes into a temporary file inside the archive while hashing
    them; the copy is then hard-linked under its SHA-256, which is write-once (a file already
    there has the same hash, hence the same bytes, and is left as it is). Nothing here decodes
    or checks the content: a file that is not UTF-8, not CSV or not text at all is preserved
    exactly as it arrived (SEC Rule 17a-4(f) spirit). FeedFileError when it cannot be read.
    """
    incoming = archive_root / "sha256" / ".incoming"
    _make_dirs(incoming)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=incoming, prefix=".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            try:
                with path.open("rb") as source:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
                        size += len(chunk)
            except OSError as exc:
                raise FeedFileError(path, f"unreadable: {exc.strerror or exc}") from exc
            sink.flush()
            os.fsync(sink.fileno())
        sha = digest.hexdigest()
        target = archive_root / "sha256" / sha[:2] / sha
        _make_dirs(target.parent)
        os.chmod(tmp, ARCHIVE_FILE_MODE)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        return Archived(sha, size, target)
    finally:
        tmp.unlink(missing_ok=True)


def archive_raw(path: Path, archive_root: Path) -> str:
    """Archive any raw file (a custodian's own format included) byte for byte, write-once, under
    its SHA-256; returns the digest."""
    return archive_file(path, archive_root).sha256


# ---------------------------------------------------------------------------------------------
# 2. Structure: is it UTF-8 CSV rebal reads exactly, and on which line does each record start?

@dataclass
class CsvLayout:
    header: list[str]
    record_lines: np.ndarray  # physical start line of every non-blank data record, in order


_CR_ONLY = ("a carriage return (CR) not followed by a line feed at line {line}: lines must end with "
            "LF or CRLF (CR-only line endings are not read)")


def scan_csv(path: Path, shown_as: Path | str | None = None) -> CsvLayout:
    """Check in one streaming pass that a file is UTF-8 CSV rebal reads exactly, and find the
    physical line each record starts on.

    RFC 4180 with `,` and `"`: a quote opens a value only at its start and closes it only before
    a separator or a line end; lines end with LF or CRLF, the same throughout the file. Refused
    with FeedFileError naming the line: bytes that are not UTF-8, a NUL byte, a carriage return
    that does not end a line (CR-only line endings), mixed line endings, a stray or unclosed
    quote, a field over MAX_FIELD_BYTES, a record over MAX_RECORD_BYTES, a record with another
    number of fields than the header, a blank first line. Blank lines elsewhere are allowed (the
    CSV reader skips them) and counted, so the lines rebal reports are the file's own lines.

    Vectorised over 8 MiB chunks with numpy, no per-byte Python: whether a byte is inside quotes
    is the parity of the quotes before it (an escaped `""` counts twice and changes nothing).
    """
    name = shown_as or path
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos0 = lines_before = parity = 0
    body_start = 0
    field_start, field_start_line = 0, 1
    record_start, record_start_line, record_commas = 0, 1, 0
    open_quote_line = 1
    header_commas: int | None = None
    header_span: tuple[int, int] | None = None
    crlf: bool | None = None
    header_blank = False
    pieces: list[np.ndarray] = []
    prev_byte = -1

    with path.open("rb") as handle:
        cur = handle.read(CHUNK)
        if cur.startswith(UTF8_BOM):
            body_start = field_start = record_start = len(UTF8_BOM)
        while cur:
            nxt = handle.read(CHUNK)
            try:
                pending = len(decoder.getstate()[0])
                decoder.decode(cur, final=not nxt)
            except UnicodeDecodeError as exc:
                at = min(max(exc.start - pending, 0), len(cur) - 1)
                line = lines_before + cur[:at].count(b"\n") + 1
                if exc.reason == "unexpected end of data":
                    raise FeedFileError(name, f"not UTF-8: the file ends inside a multi-byte character at line {line}",
                                        line) from exc
                raise FeedFileError(name, f"not UTF-8: byte 0x{cur[at]:02x} at line {line} cannot be decoded",
                                    line) from exc
            b = np.frombuffer(cur, dtype=np.uint8)
            n = b.size
            window = np.concatenate(([prev_byte], b.astype(np.int16), [nxt[0] if nxt else -1]))
            before_v, after_v = window[:-2], window[2:]  # the byte before / after each byte
            is_quote = b == 34
            quotes = np.flatnonzero(is_quote)
            if quotes.size:
                inside = ((np.cumsum(is_quote, dtype=np.int32) - is_quote + parity) & 1).astype(bool)
            else:  # most feed files quote nothing: the state is the same all through the chunk
                inside = np.full(n, bool(parity))
            newlines = np.flatnonzero(b == 10)
            problems: list[tuple[int, str]] = []  # (absolute offset, problem): the earliest is raised

            nul = np.flatnonzero(b == 0)
            if nul.size:
                problems.append((pos0 + int(nul[0]), "a NUL byte (0x00) at line {line}: not a text file"))
            bare_cr = np.flatnonzero((b == 13) & ~inside & (after_v != 10))
            if bare_cr.size:
                problems.append((pos0 + int(bare_cr[0]), _CR_ONLY))
            opening, closing = quotes[~inside[quotes]], quotes[inside[quotes]]
            stray = opening[~((before_v[opening] == 44) | (before_v[opening] == 10) | (before_v[opening] == 34)
                              | (opening + pos0 == body_start))]
            if stray.size:
                problems.append((pos0 + int(stray[0]), "a quote inside an unquoted value at line {line} (quote the "
                                 "whole value and double every quote inside it)"))
            a = after_v[closing]
            text_after = closing[~((a == 34) | (a == 44) | (a == 10) | (a == 13) | (a == -1))]
            if text_after.size:
                problems.append((pos0 + int(text_after[0]), "text after the closing quote of a value at line {line} "
                                 "(double every quote inside a quoted value)"))
            if opening.size:
                open_quote_line = lines_before + int(np.searchsorted(newlines, opening[-1])) + 1

            def line_of(offset: int) -> int:
                if offset < pos0:  # a field or record that started in an earlier chunk
                    return field_start_line if offset == field_start else record_start_line
                return lines_before + int(np.searchsorted(newlines, offset - pos0)) + 1

            terminators = newlines[~inside[newlines]]
            commas = np.flatnonzero((b == 44) & ~inside)
            separators = np.flatnonzero(((b == 44) | (b == 10)) & ~inside) + pos0
            starts = np.concatenate(([field_start], separators + 1))
            ends = np.concatenate((separators, [pos0 + n]))
            huge = np.flatnonzero(ends - starts > MAX_FIELD_BYTES)
            if huge.size:
                problems.append((int(starts[huge[0]]), f"a field of more than {MAX_FIELD_BYTES} bytes at line {{line}}"))

            t_abs = terminators + pos0
            r_starts = np.concatenate(([record_start], t_abs + 1))
            r_ends = np.concatenate((t_abs, [pos0 + n]))
            long_records = np.flatnonzero(r_ends - r_starts > MAX_RECORD_BYTES)
            if long_records.size and not huge.size:  # a huge field is the more precise message
                problems.append((int(r_starts[long_records[0]]),
                                 f"a record of more than {MAX_RECORD_BYTES} bytes starting at line {{line}}"))
            if terminators.size:
                lengths = t_abs - r_starts[:-1]
                cr_before = before_v[terminators] == 13
                blank = (lengths == 0) | ((lengths == 1) & cr_before)
                per_record = np.bincount(np.searchsorted(terminators, commas), minlength=terminators.size + 1)
                per_record[0] += record_commas
                lines = np.concatenate(([record_start_line],
                                        lines_before + np.searchsorted(newlines, terminators[:-1]) + 2))
                if crlf is None:
                    crlf = bool(cr_before[0])
                mixed = np.flatnonzero(cr_before != crlf)
                if mixed.size:
                    problems.append((int(t_abs[mixed[0]]), "mixed line endings: line {line} ends with "
                                     + ("LF" if crlf else "CRLF") + " but line 1 ends with " + ("CRLF" if crlf else "LF")))
                first = 0
                if header_commas is None:
                    header_blank = bool(blank[0])
                    header_commas = int(per_record[0])
                    header_span = (int(r_starts[0]), int(t_abs[0]) - int(cr_before[0]))
                    first = 1
                data = np.arange(first, terminators.size)[~blank[first:]]
                wrong = data[per_record[data] != header_commas]
                if wrong.size and not header_blank:
                    k = int(wrong[0])
                    problems.append((int(r_starts[k]), f"malformed CSV: line {{line}} has {int(per_record[k]) + 1} "
                                     f"fields but the header has {header_commas + 1}"))
                pieces.append(lines[data].astype(np.int64))
                record_commas = int(per_record[-1])
                record_start = int(t_abs[-1]) + 1
                record_start_line = lines_before + int(np.searchsorted(newlines, terminators[-1])) + 2
            else:
                record_commas += int(commas.size)
            if problems:
                offset, problem = min(problems, key=lambda p: p[0])
                line = line_of(offset)
                raise FeedFileError(name, problem.format(line=line), line)
            if separators.size:
                last = int(separators[-1])
                field_start = last + 1
                field_start_line = lines_before + int(np.searchsorted(newlines, last - pos0)) + 1 + int(b[last - pos0] == 10)
            parity = (parity + int(quotes.size)) & 1
            prev_byte = int(b[-1])
            lines_before += int(newlines.size)
            pos0 += n
            cur = nxt

    size = pos0
    if parity:
        raise FeedFileError(name, f"a quoted value opened at line {open_quote_line} is never closed", open_quote_line)
    if record_start < size:  # the last record has no line ending
        if header_commas is None:
            header_commas, header_span = record_commas, (record_start, size)
        elif not header_blank:
            if record_commas != header_commas:
                raise FeedFileError(name, f"malformed CSV: line {record_start_line} has {record_commas + 1} fields but "
                                    f"the header has {header_commas + 1}", record_start_line)
            pieces.append(np.array([record_start_line], dtype=np.int64))
    if header_span is None or size <= body_start:
        raise FeedFileError(name, "empty file: no header row")
    with path.open("rb") as handle:
        handle.seek(header_span[0])
        header_bytes = handle.read(max(header_span[1] - header_span[0], 0))
    if header_blank or not header_bytes.strip():
        if not sum(p.size for p in pieces):
            raise FeedFileError(name, "empty file: no header row")
        raise FeedFileError(name, "line 1 is blank: the header row must be line 1", 1)
    try:
        header = next(csv.reader(io.StringIO(header_bytes.decode("utf-8"), newline="")))
    except (csv.Error, StopIteration) as exc:  # pragma: no cover - the scan above admits only RFC 4180
        raise FeedFileError(name, f"malformed CSV: the header on line 1 cannot be read ({exc})", 1) from exc
    lines = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return CsvLayout(header, lines)


def receive_file(path: Path, spec: FeedFile, archive_root: Path) -> ReceivedFile:
    """Archive one raw file byte for byte, then check the archived copy reads as the contract
    says (so what is parsed is exactly what was archived, even if the source changes later)."""
    archived = archive_file(path, archive_root)
    return check_received(path, spec, archived)


def check_received(path: Path, spec: FeedFile, archived: Archived) -> ReceivedFile:
    layout = scan_csv(archived.path, shown_as=path)
    header = layout.header
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise FeedFileError(path, f"duplicate column(s) in the header on line 1: {', '.join(duplicated)}", 1)
    missing = [c for c in spec.required_columns if c not in header]
    if missing:
        raise FeedFileError(
            path, f"missing required column(s): {', '.join(missing)} (the header on line 1 has: {', '.join(header)})", 1
        )
    return ReceivedFile(spec, path, archived.sha256, archived.size_bytes, str(archived.path), header,
                        layout.record_lines)


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
        if column.kind == "id":
            # Ids are matched exactly: 'ACC-1 ' is not ACC-1. Rejected (never trimmed silently),
            # and the account it resolves to is held out (int_feed_problems trims the reference).
            c = quote(column.name)
            checks.append((column.name, f"({c} is not null and regexp_matches({c}, ?))", [r"^\s|\s$"],
                           f"leading or trailing whitespace in the id (without it: {TRIMMED})"))
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
    lines = received.record_lines if received.record_lines is not None else np.zeros(0, dtype=np.int64)
    # The usual file (no blank line, no newline inside a value): record k is on line k + 1.
    plain = bool(lines.size == 0 or np.array_equal(lines, np.arange(2, lines.size + 2)))
    line_sql = "_row + 1" if plain else "_record_line"
    join_sql = "" if plain else "join __record_lines _lines using (_row)"
    # Placeholders in text order: the as-of date, the checks' values, the archived file and its
    # columns (the header names come from the file, so they are bound, never rendered). The
    # archived copy is read, so what lands is exactly what was archived.
    params = [
        as_of,
        *[p for _, _, ps, _ in checks for p in ps],
        received.archive_path,
        {name: "VARCHAR" for name in header},
    ]
    # row_number() over () numbers rows in file order (DuckDB preserves the order of a single
    # table-function scan); the scan (scan_csv) gives each record's physical line.
    sql = f"""
        insert into {table} by name
        select ?::date as as_of, {line_sql} as _line, not ({any_bad}) as _type_ok, * exclude ({"_row" if plain else "_row, _record_line"})
        from (
            select row_number() over () as _row, {selected}
            from read_csv(?, header = true, auto_detect = false, columns = ?,
                          delim = ',', quote = '"', escape = '"', strict_mode = true,
                          null_padding = false)
        ) {join_sql}
    """
    if not plain:
        con.register("__record_lines", pa.table({"_row": np.arange(1, lines.size + 1, dtype=np.int64),
                                                 "_record_line": lines}))
    try:
        rows = con.execute(sql, params).fetchone()[0]
    except duckdb.Error as exc:
        raise FeedFileError(received.path, f"malformed CSV: {str(exc).splitlines()[0]}") from exc
    finally:
        if not plain:
            con.unregister("__record_lines")
    if rows != lines.size:
        # The scan and the CSV reader disagree about where records are: refuse rather than guess.
        raise FeedFileError(received.path, f"malformed CSV: {rows} records read but the file has {lines.size}")
    return rows


def _record_type_errors(con: duckdb.DuckDBPyConnection, received: ReceivedFile, as_of: date) -> int:
    spec, header = received.spec, received.header
    table = quote(landing_table(spec.name))
    refs = ", ".join(
        f"{quote(c) if c in spec.column_names and c in header else 'null::varchar'} as {quote(c)}"
        for c in REFERENCE_COLUMNS
    )
    total = 0
    for column, bad_sql, bad_params, reason in _value_checks(spec, header):
        # A reason may name the value without its whitespace (the id it resolves to).
        trimmed = f"regexp_replace({quote(column)}, '^\\s+|\\s+$', '', 'g')"
        total += con.execute(
            f"""insert into feed_type_errors by name
                select as_of, ? as file, _line as line, ? as "column", {quote(column)} as value,
                       replace(?, '{TRIMMED}', {trimmed}) as reason, {refs}
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
    problems: list[FeedFileError] = []
    # First every file is archived, byte for byte, before any of them is decoded or checked:
    # one bad file must not keep the others (or itself) out of the archive.
    archived: dict[str, Archived] = {}
    for spec in specs:
        if spec.filename in missing:
            continue
        try:
            archived[spec.name] = archive_file(feed_dir / spec.filename, archive_root)
        except FeedFileError as exc:
            problems.append(exc)
    received: dict[str, ReceivedFile] = {}
    for spec in specs:
        if spec.name in archived:
            try:
                received[spec.name] = check_received(feed_dir / spec.filename, spec, archived[spec.name])
            except FeedFileError as exc:
                problems.append(exc)
    if missing:
        problems.insert(0, FeedFileError(feed_dir, f"missing feed file(s): {', '.join(missing)}"))
    if problems:
        first = problems[0]
        first.also = problems[1:]
        raise first

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
