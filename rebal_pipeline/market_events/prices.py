"""The intraday prices drop file, read strictly, archived untouched, and the reference basket's move.

The drop file is a public interface (additive changes only), like the canonical feed
(docs/feed_contract.md):

    <feed_root>/intraday/<YYYY-MM-DD>/prices_<HHMMSS>.csv

- `YYYY-MM-DD` is the session's date and `HHMMSS` the New York wall-clock time the file was
  taken (24-hour). Within a day the names sort oldest first. A writer puts the file in place
  atomically (writes a dot-file, then renames or links it): dot-files, temporaries and any other
  name are not drop files and are ignored. A file is never changed once in place; a later
  price is a later file.
- UTF-8 (a leading byte-order mark is allowed), lines ending LF or CRLF, RFC 4180 CSV, at most
  8,000,000 bytes, no NUL byte. Blank lines are skipped (and counted in line numbers).
- Line 1 is the header, exactly `symbol,price,priced_at` (no other column, in this order).
- `symbol`: as in securities.csv (exactly: no surrounding whitespace, no whitespace, quote or
  control character inside).
- `price`: a positive decimal in dollars, plain digits with an optional `.` and at most 6 decimal
  places (no sign, exponent or thousands separator), within the feed contract's plausibility
  limits (at least $0.01 but for CASH, at most $1,000,000).
- `priced_at`: when the price was observed, ISO-8601 `YYYY-MM-DDTHH:MM:SS[.ffffff]` with a UTC
  offset (`-05:00`, `+00:00` or `Z`), e.g. `2026-11-20T14:31:00-05:00` or
  `2026-11-20T19:31:00Z`. Its New York date must be the folder's date.

Two kinds of problem, as for the canonical feed:
- file-level (`PricesFileError`, a ValueError): the file cannot be read, is larger than the
  limit, is not UTF-8, has a NUL byte or a carriage return that does not end a line, is not
  well-formed CSV, or its header is missing or not exactly the three columns. The message names
  the file (relative to feed_root), the line and column (1-based, in characters) when the
  problem has one, and the reason. Nothing of the file is used.
- row-level (`PriceReject`): a record with another number of fields than the header, an empty
  or malformed symbol, a price that is not as above, a priced_at without an offset or on another
  New York date, a symbol on two rows (both are rejected: which price is right?). Each names
  the file's 1-based line, the column and the raw value, one reject per bad value. The row is
  quarantined (`write_rejects`), never dropped silently and never "fixed"; the other rows are
  used. A file whose every row is rejected is still a snapshot, with no prices.

The dropped file is only ever opened for reading. `archive_snapshot` copies it byte for byte into
the feed's archive (core/landing.archive_file: content-addressed under its SHA-256, write-once,
0440) and checks the copy is the very bytes `read_snapshot` parsed.

The basket's move: Σ weight × (price / reference − 1) over the reference basket
(policy market_events.reference_basket), quantized to 1e-8 half-even. A basket symbol without a
price, or without a positive reference, makes the move unknown (None): an incomplete basket never
triggers a scan.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from pathlib import Path
from zoneinfo import ZoneInfo

from rebal_pipeline.core.feed_contract import CASH_SYMBOL, DECIMAL_PATTERN, PLAUSIBILITY
from rebal_pipeline.core.landing import ARCHIVE_FILE_MODE, FeedFileError, archive_file, scan_csv
from rebal_pipeline.core.write_once import write_file_once

INTRADAY_FOLDER = "intraday"
NEW_YORK = ZoneInfo("America/New_York")
COLUMNS = ("symbol", "price", "priced_at")
HEADER = ",".join(COLUMNS)
MAX_BYTES = 8_000_000
PRICE_DECIMALS = 6
MOVE_QUANTUM = Decimal("1e-8")
REJECTS_SUFFIX = ".rejects.csv"
REJECTS_HEADER = ("line", "column", "reason", "raw")

_UTF8_BOM = b"\xef\xbb\xbf"
_DAY_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SNAPSHOT_NAME = re.compile(r"prices_([01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]\.csv")
_SYMBOL = re.compile(r'[^\s"\x00-\x1f\x7f]+')
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_PRICED_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?")
_MIN_PRICE = Decimal(PLAUSIBILITY.min_price)
_MAX_PRICE = Decimal(PLAUSIBILITY.max_price)
_PRICED_AT_EXAMPLE = "e.g. 2026-11-20T14:31:00-05:00 or 2026-11-20T19:31:00Z"


class PricesFileError(ValueError):
    """The whole file is unusable. `file` is the path shown to people (relative to feed_root when
    known), `line` and `column` are 1-based (column in characters) or None, `reason` says what
    is wrong."""

    def __init__(self, file: Path | str, reason: str, line: int | None = None, column: int | None = None):
        self.file = str(file)
        self.reason = reason
        self.line = line
        self.column = column
        where = "" if line is None else f", line {line}" + ("" if column is None else f", column {column}")
        super().__init__(f"{self.file}{where}: {reason}")


@dataclass(frozen=True)
class PriceReject:
    """One bad value of one row: the file's 1-based line, the column's name, why, and the value as
    written (for a record with the wrong number of fields, the whole record)."""

    line: int
    column: str
    reason: str
    raw: str


@dataclass(frozen=True)
class PriceSnapshot:
    path: Path
    day: date  # the folder's date
    sha256: str  # of the bytes parsed
    size: int
    prices: dict[str, Decimal]  # symbol -> price, good rows only
    # The latest priced_at of the good rows, UTC-aware; None exactly when there is no good row
    # (no time of a price is known then, and none is made up).
    priced_at: datetime | None
    rejects: tuple[PriceReject, ...]  # in line order
    shown_as: str  # the path relative to feed_root, for messages


def intraday_dir(feed_root: Path, day: date) -> Path:
    return Path(feed_root) / INTRADAY_FOLDER / day.isoformat()


def is_snapshot_name(name: str) -> bool:
    return _SNAPSHOT_NAME.fullmatch(name) is not None


def snapshots(feed_root: Path, day: date) -> list[Path]:
    """The day's drop files (prices_HHMMSS.csv, regular files), oldest first. Dot-files (a writer's
    temporaries), other names and folders are not drop files; no folder means no file yet."""
    folder = intraday_dir(feed_root, day)
    if not folder.is_dir():
        return []
    # HHMMSS is fixed-width, so name order is time order within the day.
    return sorted((p for p in folder.iterdir() if is_snapshot_name(p.name) and p.is_file()), key=lambda p: p.name)


def _shown_as(path: Path, feed_root: Path | None) -> str:
    if feed_root is not None:
        try:
            return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(feed_root)))
        except ValueError:
            pass
    return str(path)


def _day_of(path: Path, shown: str) -> date:
    if not is_snapshot_name(path.name):
        raise PricesFileError(shown, f"not an intraday prices file name: {path.name!r} (expected prices_HHMMSS.csv)")
    folder = path.parent.name
    try:
        if not _DAY_NAME.fullmatch(folder):
            raise ValueError
        return date.fromisoformat(folder)
    except ValueError:
        raise PricesFileError(shown, f"the folder {folder!r} is not a date (expected "
                                     f"{INTRADAY_FOLDER}/YYYY-MM-DD/prices_HHMMSS.csv)") from None


def _read_bytes(path: Path, shown: str, max_bytes: int) -> bytes:
    try:
        if not path.is_file():
            raise PricesFileError(shown, "no such file" if not path.exists() else "not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise PricesFileError(shown, f"larger than the limit of {max_bytes:,} bytes ({size:,} bytes)")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise PricesFileError(shown, f"unreadable: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:  # it grew since the stat
        raise PricesFileError(shown, f"larger than the limit of {max_bytes:,} bytes")
    return data


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column) of a byte offset into `data` (the bytes after any BOM); the bytes before it
    on its line are valid UTF-8 (it is the first problem)."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    return line, len(data[line_start:offset].decode("utf-8")) + 1


def _decode(data: bytes, shown: str) -> str:
    """The file's text, or PricesFileError at the first byte that is not text: not UTF-8, NUL."""
    base = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    body = data[base:]
    problems: list[tuple[int, str]] = []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        if exc.reason == "unexpected end of data":
            problems.append((exc.start, "not UTF-8: the file ends inside a multi-byte character "
                                        f"(byte offset {exc.start + base})"))
        else:
            problems.append((exc.start, f"not UTF-8: byte 0x{body[exc.start]:02x} at byte offset "
                                        f"{exc.start + base} cannot be decoded"))
    nul = body.find(b"\x00")
    if nul >= 0:
        problems.append((nul, f"a NUL byte (0x00) at byte offset {nul + base}: not a text file"))
    if problems:
        offset, reason = min(problems)
        line, column = _position(body, offset)
        raise PricesFileError(shown, reason, line, column)
    assert text is not None
    bare_cr = re.search(r"\r(?!\n)", text)
    if bare_cr:
        line = text.count("\n", 0, bare_cr.start()) + 1
        column = bare_cr.start() - (text.rfind("\n", 0, bare_cr.start()) + 1) + 1
        raise PricesFileError(shown, "a carriage return (CR) that does not end a line: lines must end with LF or "
                                     "CRLF", line, column)
    return text


def _physical_lines(text: str) -> list[str]:
    # Split on LF only (str.splitlines would also split on form feeds, U+2028 and others).
    pieces = text.split("\n")
    lines = [p + "\n" for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def _records(lines: list[str], shown: str) -> Iterator[tuple[int, list[str], str]]:
    """(first physical line, fields, raw text) of every record, blank lines included (no fields)."""
    consumed = 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for line in lines:
            consumed += 1
            yield line

    reader = csv.reader(feed(), strict=True)
    while True:
        before = consumed
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise PricesFileError(shown, f"malformed CSV in the record starting on line {before + 1}: {exc}",
                                  before + 1) from exc
        raw = "".join(lines[before:consumed])
        raw = raw[:-1] if raw.endswith("\n") else raw
        raw = raw[:-1] if raw.endswith("\r") else raw
        yield before + 1, fields, raw


def _field_columns(line: str) -> list[int]:
    """The 1-based character column each field of a CSV line starts at."""
    starts, inside = [1], False
    for i, ch in enumerate(line):
        if ch == '"':
            inside = not inside  # a doubled quote toggles twice: no change
        elif ch == "," and not inside:
            starts.append(i + 2)
    return starts


def _shorten(text: str, limit: int = 120) -> str:
    # A header line of a file that is not a drop file may be long: the message quotes its start.
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def _check_header(fields: list[str], raw: str, shown: str) -> None:
    if list(fields) == list(COLUMNS):
        return
    if not fields:
        raise PricesFileError(shown, f"line 1 is blank: the header row ({HEADER}) must be line 1", 1)
    starts = _field_columns(raw)
    unknown = [(i, f) for i, f in enumerate(fields) if f not in COLUMNS]
    missing = [c for c in COLUMNS if c not in fields]
    duplicated = sorted({f for f in fields if f in COLUMNS and fields.count(f) > 1})
    if len(unknown) == len(fields) and len(missing) == len(COLUMNS):
        raise PricesFileError(shown, f"no header row: line 1 must be exactly {HEADER} (it is {_shorten(raw)})", 1, 1)
    problems = []
    if unknown:
        problems.append("unknown column(s): " + ", ".join(repr(f) for _, f in unknown))
    if missing:
        problems.append("missing column(s): " + ", ".join(missing))
    if duplicated:
        problems.append("duplicate column(s): " + ", ".join(duplicated))
    if not problems:
        problems.append("the columns are out of order")
    column = starts[unknown[0][0]] if unknown and unknown[0][0] < len(starts) else None
    raise PricesFileError(shown, f"the header must be exactly {HEADER}: {'; '.join(problems)} (it is {_shorten(raw)})",
                          1, column)


def symbol_problem(symbol: str) -> str | None:
    """Why `symbol` is not a symbol as the drop file writes one, or None."""
    if symbol == "":
        return "symbol is empty"
    if symbol != symbol.strip():
        return f"leading or trailing whitespace in the symbol (without it: {symbol.strip()})"
    if not _SYMBOL.fullmatch(symbol):
        return "not a symbol: it has whitespace, a quote or a control character inside"
    return None


def _price(text: str, symbol: str) -> tuple[Decimal | None, str | None]:
    if text == "":
        return None, "price is empty"
    if not _DECIMAL.fullmatch(text):
        return None, ("not a decimal number (plain digits with an optional '.', no sign, exponent or "
                      "thousands separator)")
    value = Decimal(text)
    if value <= 0:
        return None, "price must be positive"
    if "." in text and len(text.split(".", 1)[1]) > PRICE_DECIMALS:
        return None, f"more than {PRICE_DECIMALS} decimal places"
    if value > _MAX_PRICE:
        return None, f"price above the plausibility limit of ${PLAUSIBILITY.max_price}"
    if value < _MIN_PRICE and symbol != CASH_SYMBOL:
        return None, (f"price below the plausibility limit of ${PLAUSIBILITY.min_price} (rebal does not size "
                      "trades in sub-penny prices)")
    return value, None


def _priced_at(text: str, day: date) -> tuple[datetime | None, str | None]:
    if text == "":
        return None, "priced_at is empty"
    match = _PRICED_AT.fullmatch(text)
    moment = None
    if match:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
    if moment is None:
        return None, f"not an ISO-8601 date-time with a UTC offset ({_PRICED_AT_EXAMPLE})"
    if match.group(2) is None:
        return None, f"priced_at has no UTC offset, so the moment is unknown ({_PRICED_AT_EXAMPLE})"
    local_day = moment.astimezone(NEW_YORK).date()
    if local_day != day:
        return None, f"priced_at is on {local_day.isoformat()} in New York, not the folder's date {day.isoformat()}"
    return moment.astimezone(UTC), None


def read_snapshot(path: Path, *, feed_root: Path | None = None, max_bytes: int = MAX_BYTES) -> PriceSnapshot:
    """Read one drop file strictly (see the module docstring): PricesFileError when the file is
    unusable, otherwise its good prices and its rejects. The file is opened for reading only."""
    path = Path(path)
    shown = _shown_as(path, feed_root)
    day = _day_of(path, shown)
    data = _read_bytes(path, shown, max_bytes)
    text = _decode(data, shown)
    if not text:
        raise PricesFileError(shown, f"empty file: no header row ({HEADER})")
    records = _records(_physical_lines(text), shown)
    _, header, header_raw = next(records)
    _check_header(header, header_raw, shown)

    rows: list[tuple[int, list[str]]] = []
    rejects: list[PriceReject] = []
    for line, fields, raw in records:
        if not fields:
            continue  # a blank line
        if len(fields) != len(COLUMNS):
            column = COLUMNS[len(fields)] if len(fields) < len(COLUMNS) else COLUMNS[-1]
            detail = f"no {column} value" if len(fields) < len(COLUMNS) else f"a value after {column}"
            rejects.append(PriceReject(line, column, f"{len(fields)} field(s) but the header has {len(COLUMNS)} "
                                                     f"({detail})", raw))
            continue
        rows.append((line, fields))

    # A symbol on two rows (even if one of them is bad otherwise, or differs only by whitespace)
    # leaves its price unknown: neither row is used.
    on_rows = Counter(fields[0].strip() for _, fields in rows if fields[0].strip())
    prices: dict[str, Decimal] = {}
    moments: list[datetime] = []
    for line, (symbol, price_text, priced_at_text) in rows:
        problems: list[tuple[str, str, str]] = []
        bad_symbol = symbol_problem(symbol)
        if bad_symbol:
            problems.append(("symbol", bad_symbol, symbol))
        if on_rows[symbol.strip()] > 1:
            problems.append(("symbol", f"symbol {symbol.strip()} is on {on_rows[symbol.strip()]} rows of the file: "
                                       "which price is right? (none of them is used)", symbol))
        price, price_problem = _price(price_text, symbol)
        if price_problem:
            problems.append(("price", price_problem, price_text))
        moment, moment_problem = _priced_at(priced_at_text, day)
        if moment_problem:
            problems.append(("priced_at", moment_problem, priced_at_text))
        if problems:
            rejects.extend(PriceReject(line, column, reason, raw) for column, reason, raw in problems)
        else:
            prices[symbol] = price
            moments.append(moment)
    rejects.sort(key=lambda r: (r.line, COLUMNS.index(r.column)))
    return PriceSnapshot(
        path=path,
        day=day,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        prices=prices,
        priced_at=max(moments) if moments else None,
        rejects=tuple(rejects),
        shown_as=shown,
    )


def archive_drop(path: Path, archive_root: Path, *, shown_as: str | None = None) -> Path:
    """Archive any drop file byte for byte (also one read_snapshot refuses, so operations can see
    what arrived): content-addressed under archive/sha256/<2 hex>/<sha256>, write-once, 0440
    (core/landing.archive_file). Returns the archived path."""
    try:
        return archive_file(Path(path), Path(archive_root)).path
    except FeedFileError as exc:
        raise PricesFileError(shown_as or str(path), exc.problem) from exc


def archive_snapshot(snapshot: PriceSnapshot, archive_root: Path) -> Path:
    """Archive the snapshot's file byte for byte (see archive_drop); idempotent. PricesFileError
    when the file on disk is no longer the bytes that were read (the archive then holds the new
    bytes too, under their own hash: nothing received is lost)."""
    archived = archive_drop(snapshot.path, archive_root, shown_as=snapshot.shown_as)
    if archived.name != snapshot.sha256:
        raise PricesFileError(snapshot.shown_as, f"the file changed after it was read (SHA-256 {snapshot.sha256} "
                                                 f"when read, {archived.name} now): read it again")
    return archived


def archived_path(snapshot: PriceSnapshot, archive_root: Path) -> Path:
    return Path(archive_root) / "sha256" / snapshot.sha256[:2] / snapshot.sha256


def rejects_path(snapshot: PriceSnapshot, archive_root: Path) -> Path:
    archived = archived_path(snapshot, archive_root)
    return archived.with_name(archived.name + REJECTS_SUFFIX)


def write_rejects(snapshot: PriceSnapshot, archive_root: Path) -> Path | None:
    """The snapshot's quarantined rows, beside its archived copy: <sha256>.rejects.csv, UTF-8 CSV
    with the columns line, column, reason, raw (the lines are the archived file's), write-once
    and 0440. None when there is no reject. The snapshot must be archived first (archive_snapshot):
    a reject points into the archived file."""
    if not snapshot.rejects:
        return None
    if not archived_path(snapshot, archive_root).is_file():
        raise PricesFileError(snapshot.shown_as, "not archived yet: archive_snapshot comes before write_rejects")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REJECTS_HEADER)
    writer.writerows((r.line, r.column, r.reason, r.raw) for r in snapshot.rejects)
    target = rejects_path(snapshot, archive_root)
    # The rejects are a function of the archived bytes: a file already there says the same.
    if write_file_once(target, buffer.getvalue().encode("utf-8")):
        os.chmod(target, ARCHIVE_FILE_MODE)
    return target


def read_session_closes(feed_root: Path, session_as_of: date) -> dict[str, Decimal]:
    """The closes of a session, from its canonical feed file <feed_root>/<YYYY-MM-DD>/prices.csv
    (the file that session's ingest lands): symbol -> close.

    PricesFileError when the file is missing or unusable (core/landing.scan_csv: not UTF-8 CSV,
    no symbol or close column). Only closes that can serve as a reference are in the mapping: a
    row whose close is not a positive decimal, or whose symbol is on two rows, is left out (the
    session's ingest quarantined it already), so a basket symbol among them makes the move
    unknown rather than measured against a wrong close."""
    path = Path(feed_root) / session_as_of.isoformat() / "prices.csv"
    shown = _shown_as(path, feed_root)
    if not path.is_file():
        raise PricesFileError(shown, f"no canonical prices file for the {session_as_of.isoformat()} session")
    try:
        layout = scan_csv(path, shown_as=shown)
        missing = [c for c in ("symbol", "close") if c not in layout.header]
        if missing:
            raise PricesFileError(shown, f"missing required column(s): {', '.join(missing)} (the header on line 1 "
                                         f"has: {', '.join(layout.header)})", 1)
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = [(row["symbol"], row["close"]) for row in csv.DictReader(handle)]
    except FeedFileError as exc:
        raise PricesFileError(shown, exc.problem, exc.line) from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:  # the file changed under the scan
        raise PricesFileError(shown, f"unreadable: {exc}") from exc
    on_rows = Counter(symbol for symbol, _ in rows)
    closes: dict[str, Decimal] = {}
    for symbol, close in rows:
        if on_rows[symbol] == 1 and close is not None and re.fullmatch(DECIMAL_PATTERN, close) and Decimal(close) > 0:
            closes[symbol] = Decimal(close)
    return closes


def basket_move(basket: Sequence[tuple[str, Decimal]], reference: Mapping[str, Decimal],
                prices: Mapping[str, Decimal]) -> Decimal | None:
    """Σ weight × (price / reference − 1) over the basket, quantized to 1e-8 (half-even); None when
    a basket symbol has no positive price or no positive reference."""
    if not basket:
        raise ValueError("the reference basket is empty")
    with localcontext() as ctx:
        ctx.prec = 50  # well beyond 1e-8 of any plausible move: one rounding, at the end
        total = Decimal(0)
        for symbol, weight in basket:
            price, base = prices.get(symbol), reference.get(symbol)
            if price is None or base is None:
                return None
            try:
                if not (Decimal(price) > 0 and Decimal(base) > 0):
                    return None
            except InvalidOperation:  # NaN
                return None
            total += Decimal(weight) * (Decimal(price) / Decimal(base) - 1)
        return total.quantize(MOVE_QUANTUM, rounding=ROUND_HALF_EVEN)


def exceeds(move: Decimal | None, threshold: Decimal) -> bool:
    """|move| ≥ threshold: a move of exactly the threshold triggers. An unknown move never does."""
    return move is not None and abs(move) >= threshold


def basket_of(rule) -> list[tuple[str, Decimal]]:
    """(symbol, weight) of a MarketEventRule's reference basket, in the policy's order."""
    return [(w.symbol, w.weight) for w in rule.reference_basket]
