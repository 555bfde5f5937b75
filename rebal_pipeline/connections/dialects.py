"""Custodian dialects: translate a custodian's daily files into the canonical feed.

Three "-style" dialects, designed to be plausible rather than vendor-certified (the layouts are
documented in docs/custodian_feeds.md):

- ``schwab``: a set of CSV files with the custodian's own column names, MM/DD/YYYY dates, action
  codes, and a ``TRAILER,<records>,<control total>`` last row;
- ``fidelity``: one fixed-width file per kind of record, each with a header record (file type,
  business date, firm id) and a trailer record (record count, control total); implied decimals
  with a leading sign character;
- ``pershing``: one fixed-width file holding every kind of record, a three-letter record type per
  line, signed zoned ("overpunch") numbers with implied decimals, and a trailer with counts per
  record type and two control totals.

``to_canonical(dialect, raw_dir, as_of, reference_dir, out_dir)`` writes the canonical files the
custodian provides (positions, lots, transactions, prices) into ``out_dir`` and copies the
firm-maintained files (users, households, accounts, models, ips_targets, restrictions,
securities) from ``reference_dir`` as they are. Any malformed record raises ``DialectError``
naming the file, the line, the field and the reason: nothing is guessed, nothing is dropped, and
nothing is written to ``out_dir`` unless the whole delivery converted. Raw files are only read.

Custodian account numbers map to rebal account_ids through ``accounts.csv`` of the reference
files: the account_id *is* the custodian account number (so in the sandbox, ``ACC-0000001`` at
every custodian); a number that accounts.csv does not know is an error, not a new account.
This module is transport-free and Dagster-free.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal

from rebal_pipeline.core.feed_contract import CASH_SYMBOL, FEED_FILES

__all__ = [
    "AdapterReport",
    "CUSTODIAN_FILES",
    "DIALECTS",
    "DialectError",
    "REFERENCE_FILES",
    "to_canonical",
]

Dialect = Literal["schwab", "fidelity", "pershing"]
DIALECTS: tuple[str, ...] = ("schwab", "fidelity", "pershing")

# What the custodian sends, and what the firm maintains itself (copied from reference_dir).
CUSTODIAN_FILES = ("positions", "lots", "transactions", "prices")
REFERENCE_FILES = tuple(name for name in FEED_FILES if name not in CUSTODIAN_FILES)


class DialectError(ValueError):
    """A custodian file that cannot be translated: which file, which line, which field, why."""

    def __init__(self, file: str, line: int | None, field: str | None, reason: str):
        self.file, self.line, self.field, self.reason = file, line, field, reason
        where = file + (f", line {line}" if line is not None else "") + (f", field {field}" if field else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class AdapterReport:
    dialect: str
    as_of: dt.date
    out_dir: Path
    # raw file name -> sha256 of its bytes as read (the raw files are never modified)
    raw_files: dict[str, str]
    # canonical file name -> data rows written (custodian files) or copied (reference files)
    rows: dict[str, int]
    firm_id: str | None = None


# --------------------------------------------------------------------------------------------
# Shared value handling
# --------------------------------------------------------------------------------------------

# Canonical value of the transaction type <- dialect code.
SCHWAB_ACTIONS = {"B": "buy", "S": "sell", "RB": "reinvest", "TI": "transfer_in", "TO": "transfer_out"}
FIDELITY_TXN_CODES = {"BY": "buy", "SL": "sell", "RV": "reinvest", "RC": "transfer_in", "DL": "transfer_out"}
PERSHING_ACTIVITY_CODES = {"010": "buy", "020": "sell", "030": "reinvest", "040": "transfer_in", "050": "transfer_out"}
FLAGS = {"Y": "true", "N": "false", "": ""}

# How each custodian names the cash balance (canonical: CASH).
CASH_SYMBOLS = {"schwab": "$CASH", "fidelity": "FCASH", "pershing": "CASH"}

_PLAIN_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def canonical_decimal(value: Decimal) -> str:
    """Decimal text as the contract writes it: plain digits, no exponent, no trailing zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def parse_plain_decimal(text: str) -> Decimal | None:
    return Decimal(text) if _PLAIN_DECIMAL.match(text) else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_lines(path: Path) -> list[str]:
    """The physical lines of a raw file (LF or CRLF), ASCII only; a final newline is optional."""
    data = path.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DialectError(path.name, line, None, f"byte 0x{data[exc.start]:02x} is not ASCII") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# --------------------------------------------------------------------------------------------
# Fixed-width records
# --------------------------------------------------------------------------------------------

FieldKind = Literal["text", "date", "number", "count", "code", "flag"]
# Sign conventions of numeric fields: "lead" = a '+' or '-' character then digits (Fidelity);
# "overpunch" = signed zoned decimal, the sign carried by the last character (Pershing, COBOL
# PIC S9(n)V9(m) DISPLAY): '{' 'A'-'I' are +0..+9, '}' 'J'-'R' are -0..-9.
_OVERPUNCH_POSITIVE = "{ABCDEFGHI"
_OVERPUNCH_NEGATIVE = "}JKLMNOPQR"


@dataclass(frozen=True)
class Field:
    name: str
    start: int  # 1-based column
    width: int
    kind: FieldKind
    places: int = 0  # implied decimal places of a number
    sign: Literal["lead", "overpunch"] = "lead"
    nullable: bool = False  # all blanks = empty value
    codes: tuple[tuple[str, str], ...] = ()  # code fields: (code in file, canonical value)

    @property
    def end(self) -> int:
        return self.start + self.width - 1


@dataclass(frozen=True)
class RecordLayout:
    record_type: str
    length: int
    fields: tuple[Field, ...]

    def __post_init__(self):
        taken = 0
        for f in sorted(self.fields, key=lambda f: f.start):
            assert f.start > taken and f.end <= self.length, (self.record_type, f.name)
            taken = f.end


def field_label(layout: RecordLayout, name: str) -> str:
    """How an error names a field: its name and columns, e.g. `quantity (columns 24-40)`."""
    f = next(f for f in layout.fields if f.name == name)
    return f"{name} (columns {f.start}-{f.end})"


def parse_fixed(layout: RecordLayout, line: str, file: str, number: int) -> dict[str, object]:
    """One fixed-width record -> {field: value}; numbers as Decimal, dates as ISO text."""
    if len(line) != layout.length:
        raise DialectError(
            file, number, None,
            f"{layout.record_type} record is {len(line)} characters long, the layout is {layout.length}"
            + (" (truncated)" if len(line) < layout.length else ""),
        )
    values: dict[str, object] = {}
    for f in layout.fields:
        raw = line[f.start - 1 : f.end]
        values[f.name] = _parse_field(f, raw, file, number)
    return values


def _parse_field(f: Field, raw: str, file: str, number: int) -> object:
    def bad(reason: str) -> DialectError:
        return DialectError(file, number, f"{f.name} (columns {f.start}-{f.end})", f"{reason}: {raw!r}")

    if f.nullable and raw.strip() == "":
        return None if f.kind in ("number", "date") else ""
    if f.kind == "text":
        value = raw.rstrip(" ")
        if not value or value != value.lstrip(" "):
            raise bad("empty or not left-justified")
        return value
    if f.kind == "flag":
        if raw.strip() not in FLAGS:
            raise bad("flag must be Y, N or blank")
        return FLAGS[raw.strip()]
    if f.kind == "code":
        codes = dict(f.codes)
        if raw not in codes:
            raise bad(f"unknown code (known: {', '.join(codes)})")
        return codes[raw]
    if f.kind == "date":
        if not raw.isdigit():
            raise bad("date must be 8 digits YYYYMMDD")
        try:
            return dt.date(int(raw[:4]), int(raw[4:6]), int(raw[6:])).isoformat()
        except ValueError:
            raise bad("not a calendar date") from None
    if f.kind == "count":
        if not raw.isdigit():
            raise bad("not an unsigned whole number")
        return int(raw)
    # number with implied decimals
    if f.sign == "lead":
        sign_char, digits = raw[0], raw[1:]
        if sign_char not in "+-" or not digits.isdigit():
            raise bad(f"not a signed number ('+' or '-' then {f.width - 1} digits)")
        negative = sign_char == "-"
    else:
        digits, last = raw[:-1], raw[-1]
        if not digits.isdigit() and digits != "" or (last not in _OVERPUNCH_POSITIVE + _OVERPUNCH_NEGATIVE):
            raise bad("not a signed zoned (overpunch) number")
        negative = last in _OVERPUNCH_NEGATIVE
        digits += str((_OVERPUNCH_NEGATIVE if negative else _OVERPUNCH_POSITIVE).index(last))
    value = Decimal(int(digits)).scaleb(-f.places)
    return -value if negative else value


def render_fixed(layout: RecordLayout, values: dict[str, object]) -> str:
    """The inverse of parse_fixed; ValueError when a value cannot be represented exactly."""
    line = [" "] * layout.length
    for f in layout.fields:
        text = _render_field(f, values.get(f.name))
        line[f.start - 1 : f.end] = text
    return "".join(line)


def _render_field(f: Field, value: object) -> str:
    if value is None or value == "":
        if f.nullable or f.kind == "flag":
            return " " * f.width
        raise ValueError(f"{f.name}: a value is required")
    if f.kind == "text":
        text = str(value)
        if len(text) > f.width or not text.isascii():
            raise ValueError(f"{f.name}: {text!r} does not fit {f.width} ASCII characters")
        return text.ljust(f.width)
    if f.kind == "flag":
        return {v: k for k, v in FLAGS.items()}[str(value)]
    if f.kind == "code":
        return {v: k for k, v in f.codes}[str(value)]
    if f.kind == "date":
        return dt.date.fromisoformat(str(value)).strftime("%Y%m%d")
    if f.kind == "count":
        return str(int(value)).rjust(f.width, "0")
    number = Decimal(str(value))
    scaled = number.scaleb(f.places)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{f.name}: {value} has more than {f.places} decimal places")
    units = abs(int(scaled))
    if f.sign == "lead":
        digits = str(units).rjust(f.width - 1, "0")
        text = ("-" if number < 0 else "+") + digits
    else:
        digits = str(units).rjust(f.width, "0")
        table = _OVERPUNCH_NEGATIVE if number < 0 else _OVERPUNCH_POSITIVE
        text = digits[:-1] + table[int(digits[-1])]
    if len(text) != f.width:
        raise ValueError(f"{f.name}: {value} does not fit {f.width} characters")
    return text


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

# ---- Schwab-style CSV set -------------------------------------------------------------------
# file kind -> (file prefix, columns, {canonical column: schwab column}, control-total column)
SCHWAB_FILES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "positions": ("positions", ("Account Number", "Symbol", "Quantity", "As Of Date"), "Quantity"),
    "lots": (
        "costbasis",
        ("Account Number", "Symbol", "Lot ID", "Open Date", "Quantity", "Cost Basis", "Wash Sale Adjusted"),
        "Cost Basis",
    ),
    "transactions": (
        "transactions",
        ("Account Number", "Symbol", "Trade Date", "Action", "Quantity", "Price", "Cost Basis", "Acquired Date"),
        "Quantity",
    ),
    "prices": ("prices", ("Symbol", "Closing Price", "Price Date"), "Closing Price"),
}
SCHWAB_TRAILER = "TRAILER"


def schwab_filename(kind: str, as_of: dt.date) -> str:
    return f"{SCHWAB_FILES[kind][0]}_{as_of:%Y%m%d}.csv"


def schwab_date(value: str) -> str:
    return dt.date.fromisoformat(value).strftime("%m/%d/%Y")


# ---- Fidelity-style fixed width: one file per record kind, 100-character records -----------
FIDELITY_LENGTH = 100
FIDELITY_FILE_TYPES = {"positions": "POS", "lots": "LOT", "transactions": "TRN", "prices": "PRC"}
_FID_ACCOUNT = Field("account", 2, 12, "text")
_FID_SYMBOL = Field("symbol", 14, 10, "text")
FIDELITY_HEADER = RecordLayout(
    "H", FIDELITY_LENGTH,
    (
        Field("record_type", 1, 1, "text"),
        Field("file_type", 2, 3, "text"),
        Field("business_date", 5, 8, "date"),
        Field("firm_id", 13, 8, "text"),
    ),
)
FIDELITY_DETAIL = {
    "positions": RecordLayout(
        "D", FIDELITY_LENGTH,
        (Field("record_type", 1, 1, "text"), _FID_ACCOUNT, _FID_SYMBOL, Field("quantity", 24, 17, "number", 5)),
    ),
    "lots": RecordLayout(
        "D", FIDELITY_LENGTH,
        (
            Field("record_type", 1, 1, "text"), _FID_ACCOUNT, _FID_SYMBOL,
            Field("lot_id", 24, 20, "text"),
            Field("open_date", 44, 8, "date"),
            Field("quantity", 52, 17, "number", 5),
            Field("cost_basis", 69, 17, "number", 2),
            Field("wash_sale_adjusted", 86, 1, "flag"),
        ),
    ),
    "transactions": RecordLayout(
        "D", FIDELITY_LENGTH,
        (
            Field("record_type", 1, 1, "text"), _FID_ACCOUNT, _FID_SYMBOL,
            Field("trade_date", 24, 8, "date"),
            Field("type", 32, 2, "code", codes=tuple(FIDELITY_TXN_CODES.items())),
            Field("quantity", 34, 17, "number", 5),
            Field("price", 51, 15, "number", 6),
            Field("cost_basis", 66, 17, "number", 2, nullable=True),
            Field("acquired_date", 83, 8, "date", nullable=True),
        ),
    ),
    "prices": RecordLayout(
        "D", FIDELITY_LENGTH,
        (Field("record_type", 1, 1, "text"), Field("symbol", 2, 10, "text"), Field("close", 12, 15, "number", 6)),
    ),
}
# Control total of each file: the sum of this field, with the field's implied decimals.
FIDELITY_CONTROL = {"positions": "quantity", "lots": "cost_basis", "transactions": "quantity", "prices": "close"}


def fidelity_trailer(kind: str) -> RecordLayout:
    places = next(f.places for f in FIDELITY_DETAIL[kind].fields if f.name == FIDELITY_CONTROL[kind])
    return RecordLayout(
        "T", FIDELITY_LENGTH,
        (
            Field("record_type", 1, 1, "text"),
            Field("record_count", 2, 9, "count"),
            Field("control_total", 11, 20, "number", places),
        ),
    )


def fidelity_filename(kind: str, as_of: dt.date) -> str:
    return f"fid_{FIDELITY_FILE_TYPES[kind].lower()}_{as_of:%Y%m%d}.dat"


# ---- Pershing-style fixed width: one file, 3-letter record types, 120-character records -----
PERSHING_LENGTH = 120
PERSHING_RECORD_TYPES = {"positions": "POS", "lots": "LOT", "transactions": "TRN", "prices": "PRC"}
_PSH_TYPE = Field("record_type", 1, 3, "text")
_PSH_ACCOUNT = Field("account", 4, 12, "text")
_PSH_SYMBOL = Field("symbol", 16, 12, "text")
PERSHING_HEADER = RecordLayout(
    "HDR", PERSHING_LENGTH,
    (_PSH_TYPE, Field("business_date", 4, 8, "date"), Field("firm_id", 12, 8, "text")),
)
PERSHING_DETAIL = {
    "positions": RecordLayout(
        "POS", PERSHING_LENGTH,
        (_PSH_TYPE, _PSH_ACCOUNT, _PSH_SYMBOL, Field("quantity", 28, 18, "number", 5, "overpunch")),
    ),
    "lots": RecordLayout(
        "LOT", PERSHING_LENGTH,
        (
            _PSH_TYPE, _PSH_ACCOUNT, _PSH_SYMBOL,
            Field("lot_id", 28, 20, "text"),
            Field("open_date", 48, 8, "date"),
            Field("quantity", 56, 18, "number", 5, "overpunch"),
            Field("cost_basis", 74, 17, "number", 2, "overpunch"),
            Field("wash_sale_adjusted", 91, 1, "flag"),
        ),
    ),
    "transactions": RecordLayout(
        "TRN", PERSHING_LENGTH,
        (
            _PSH_TYPE, _PSH_ACCOUNT, _PSH_SYMBOL,
            Field("trade_date", 28, 8, "date"),
            Field("type", 36, 3, "code", codes=tuple(PERSHING_ACTIVITY_CODES.items())),
            Field("quantity", 39, 18, "number", 5, "overpunch"),
            Field("price", 57, 16, "number", 6, "overpunch"),
            Field("cost_basis", 73, 17, "number", 2, "overpunch", nullable=True),
            Field("acquired_date", 90, 8, "date", nullable=True),
        ),
    ),
    "prices": RecordLayout(
        "PRC", PERSHING_LENGTH,
        (_PSH_TYPE, Field("symbol", 4, 12, "text"), Field("close", 16, 16, "number", 6, "overpunch")),
    ),
}
PERSHING_TRAILER = RecordLayout(
    "TRL", PERSHING_LENGTH,
    (
        _PSH_TYPE,
        Field("record_count", 4, 9, "count"),  # detail records (header and trailer not counted)
        Field("positions_count", 13, 9, "count"),
        Field("lots_count", 22, 9, "count"),
        Field("transactions_count", 31, 9, "count"),
        Field("prices_count", 40, 9, "count"),
        Field("position_quantity_total", 49, 20, "number", 5, "overpunch"),
        Field("lot_cost_basis_total", 69, 20, "number", 2, "overpunch"),
    ),
)


def pershing_filename(as_of: dt.date) -> str:
    return f"PSH_{as_of:%Y%m%d}.dat"


# --------------------------------------------------------------------------------------------
# Readers: raw files -> canonical rows (dicts of canonical text)
# --------------------------------------------------------------------------------------------


@dataclass
class _Delivery:
    rows: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {k: [] for k in CUSTODIAN_FILES})
    raw_files: dict[str, str] = field(default_factory=dict)
    firm_id: str | None = None


class _AccountBook:
    """Custodian account number -> rebal account_id, through the firm's accounts.csv."""

    def __init__(self, reference_dir: Path):
        path = reference_dir / "accounts.csv"
        if not path.is_file():
            raise DialectError("accounts.csv", None, None, f"reference file missing from {reference_dir}")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            self.ids = {row["account_id"] for row in csv.DictReader(handle)}

    def account_id(self, number: str, file: str, line: int, field_name: str) -> str:
        if number not in self.ids:
            raise DialectError(file, line, field_name, f"account number {number!r} is not in accounts.csv")
        return number


def _canonical_row(kind: str, values: dict[str, object], cash_symbol: str) -> dict[str, str]:
    row: dict[str, str] = {}
    for column in FEED_FILES[kind].column_names:
        value = values.get(column)
        if column == "symbol" and value == cash_symbol:
            value = CASH_SYMBOL
        row[column] = "" if value is None else canonical_decimal(value) if isinstance(value, Decimal) else str(value)
    return row


def _read_schwab(raw_dir: Path, as_of: dt.date, accounts: _AccountBook) -> _Delivery:
    delivery = _Delivery()
    for kind, (_prefix, columns, control_column) in SCHWAB_FILES.items():
        name = schwab_filename(kind, as_of)
        path = _require(raw_dir, name)
        delivery.raw_files[name] = _sha256(path)
        lines = _read_lines(path)
        # One record per physical line: a quoted field may not hide a newline.
        records = [next(csv.reader([line]), []) for line in lines]
        if not records or tuple(records[0]) != columns:
            raise DialectError(name, 1, None, f"header must be {','.join(columns)}")
        if len(records) < 2 or records[-1][:1] != [SCHWAB_TRAILER]:
            raise DialectError(name, len(records), None, f"the last row must be the {SCHWAB_TRAILER} row")
        trailer_line = len(records)
        trailer = records[-1]
        if len(trailer) != 3:
            raise DialectError(name, trailer_line, None, "TRAILER row must be TRAILER,<record count>,<control total>")
        total = Decimal(0)
        for number, record in enumerate(records[1:-1], start=2):
            if record[:1] == [SCHWAB_TRAILER]:
                raise DialectError(name, number, None, "TRAILER row before the end of the file")
            if len(record) != len(columns):
                raise DialectError(name, number, None, f"{len(record)} fields, the layout has {len(columns)}")
            cells = dict(zip(columns, record))
            values = _schwab_values(kind, cells, name, number, as_of, accounts)
            if values[control_column] is not None:
                total += values[control_column]
            delivery.rows[kind].append(_canonical_row(kind, values["_canonical"], CASH_SYMBOLS["schwab"]))
        count_text, control_text = trailer[1], trailer[2]
        if not count_text.isdigit():
            raise DialectError(name, trailer_line, "record count", f"not a whole number: {count_text!r}")
        if int(count_text) != len(records) - 2:
            raise DialectError(
                name, trailer_line, "record count",
                f"trailer says {int(count_text)} records, the file has {len(records) - 2}",
            )
        control = parse_plain_decimal(control_text)
        if control is None:
            raise DialectError(name, trailer_line, "control total", f"not a decimal: {control_text!r}")
        if control != total:
            raise DialectError(
                name, trailer_line, "control total",
                f"trailer says {control_text}, the sum of {control_column} is {canonical_decimal(total)}",
            )
    return delivery


def _schwab_values(kind, cells, name, number, as_of, accounts) -> dict[str, object]:
    def decimal(column: str, nullable: bool = False) -> Decimal | None:
        text = cells[column]
        if text == "" and nullable:
            return None
        value = parse_plain_decimal(text)
        if value is None:
            raise DialectError(name, number, column, f"not a number: {text!r}")
        return value

    def date(column: str, nullable: bool = False) -> str | None:
        text = cells[column]
        if text == "" and nullable:
            return None
        try:
            if not re.fullmatch(r"[0-9]{2}/[0-9]{2}/[0-9]{4}", text):
                raise ValueError
            return dt.datetime.strptime(text, "%m/%d/%Y").date().isoformat()
        except ValueError:
            raise DialectError(name, number, column, f"not a date MM/DD/YYYY: {text!r}") from None

    def text(column: str) -> str:
        value = cells[column]
        if value == "" or value != value.strip():
            raise DialectError(name, number, column, f"empty or padded value: {value!r}")
        return value

    def as_of_date(column: str) -> None:
        if date(column) != as_of.isoformat():
            raise DialectError(name, number, column, f"{cells[column]} is not the as-of date {as_of:%m/%d/%Y}")

    out: dict[str, object] = {}
    if kind == "prices":
        as_of_date("Price Date")
        close = decimal("Closing Price")
        out["Closing Price"] = close
        out["_canonical"] = {"symbol": text("Symbol"), "close": close}
        return out
    account = accounts.account_id(text("Account Number"), name, number, "Account Number")
    canonical: dict[str, object] = {"account_id": account, "symbol": text("Symbol"), "quantity": decimal("Quantity")}
    out["Quantity"] = canonical["quantity"]
    if kind == "positions":
        as_of_date("As Of Date")
    elif kind == "lots":
        flag = cells["Wash Sale Adjusted"]
        if flag not in FLAGS:
            raise DialectError(name, number, "Wash Sale Adjusted", f"must be Y, N or empty: {flag!r}")
        canonical.update(
            lot_id=text("Lot ID"), open_date=date("Open Date"), cost_basis=decimal("Cost Basis"),
            wash_sale_adjusted=FLAGS[flag],
        )
        out["Cost Basis"] = canonical["cost_basis"]
    else:
        action = cells["Action"]
        if action not in SCHWAB_ACTIONS:
            raise DialectError(name, number, "Action", f"unknown action code {action!r} (known: {', '.join(SCHWAB_ACTIONS)})")
        canonical.update(
            trade_date=date("Trade Date"), type=SCHWAB_ACTIONS[action], price=decimal("Price"),
            cost_basis=decimal("Cost Basis", nullable=True), acquired_date=date("Acquired Date", nullable=True),
        )
    out["_canonical"] = canonical
    return out


def _require(raw_dir: Path, name: str) -> Path:
    path = raw_dir / name
    if not path.is_file():
        raise DialectError(name, None, None, f"file missing from {raw_dir}")
    return path


def _check_header(values: dict[str, object], name: str, as_of: dt.date, expected: dict[str, str]) -> None:
    for field_name, want in expected.items():
        if values[field_name] != want:
            raise DialectError(name, 1, field_name, f"header says {values[field_name]!r}, expected {want!r}")
    if values["business_date"] != as_of.isoformat():
        raise DialectError(name, 1, "business_date", f"header date {values['business_date']} is not the as-of date {as_of}")


def _detail(kind: str, values: dict[str, object], name: str, number: int, accounts: _AccountBook, dialect: str) -> dict[str, str]:
    if "account" in values:
        values["account_id"] = accounts.account_id(str(values["account"]), name, number, "account")
    return _canonical_row(kind, values, CASH_SYMBOLS[dialect])


def _read_fidelity(raw_dir: Path, as_of: dt.date, accounts: _AccountBook) -> _Delivery:
    delivery = _Delivery()
    firm_ids = set()
    for kind, file_type in FIDELITY_FILE_TYPES.items():
        name = fidelity_filename(kind, as_of)
        path = _require(raw_dir, name)
        delivery.raw_files[name] = _sha256(path)
        lines = _read_lines(path)
        if not lines or lines[0][:1] != "H":
            raise DialectError(name, 1, "record_type (column 1)", "the first record must be the header (H)")
        header = parse_fixed(FIDELITY_HEADER, lines[0], name, 1)
        _check_header(header, name, as_of, {"file_type": file_type})
        firm_ids.add(header["firm_id"])
        if len(lines) < 2 or lines[-1][:1] != "T":
            raise DialectError(name, len(lines), "record_type (column 1)", "the last record must be the trailer (T)")
        control_field = FIDELITY_CONTROL[kind]
        total = Decimal(0)
        for number, line in enumerate(lines[1:-1], start=2):
            record_type = line[:1]
            if record_type != "D":
                raise DialectError(
                    name, number, "record_type (column 1)",
                    f"unknown record type {record_type!r} where a detail record (D) belongs",
                )
            values = parse_fixed(FIDELITY_DETAIL[kind], line, name, number)
            total += values[control_field]
            delivery.rows[kind].append(_detail(kind, values, name, number, accounts, "fidelity"))
        trailer_line = len(lines)
        trailer = parse_fixed(fidelity_trailer(kind), lines[-1], name, trailer_line)
        if trailer["record_count"] != len(lines) - 2:
            raise DialectError(
                name, trailer_line, field_label(fidelity_trailer(kind), "record_count"),
                f"trailer says {trailer['record_count']} detail records, the file has {len(lines) - 2}",
            )
        if trailer["control_total"] != total:
            raise DialectError(
                name, trailer_line, field_label(fidelity_trailer(kind), "control_total"),
                f"trailer says {canonical_decimal(trailer['control_total'])}, "
                f"the sum of {control_field} is {canonical_decimal(total)}",
            )
    if len(firm_ids) > 1:
        raise DialectError(name, 1, "firm_id", f"the files name different firms: {', '.join(sorted(firm_ids))}")
    delivery.firm_id = firm_ids.pop()
    return delivery


def _read_pershing(raw_dir: Path, as_of: dt.date, accounts: _AccountBook) -> _Delivery:
    delivery = _Delivery()
    name = pershing_filename(as_of)
    path = _require(raw_dir, name)
    delivery.raw_files[name] = _sha256(path)
    lines = _read_lines(path)
    if not lines or lines[0][:3] != "HDR":
        raise DialectError(name, 1, "record_type (columns 1-3)", "the first record must be the header (HDR)")
    header = parse_fixed(PERSHING_HEADER, lines[0], name, 1)
    _check_header(header, name, as_of, {})
    delivery.firm_id = str(header["firm_id"])
    if len(lines) < 2 or lines[-1][:3] != "TRL":
        raise DialectError(name, len(lines), "record_type (columns 1-3)", "the last record must be the trailer (TRL)")
    kinds = {code: kind for kind, code in PERSHING_RECORD_TYPES.items()}
    quantity_total = cost_total = Decimal(0)
    for number, line in enumerate(lines[1:-1], start=2):
        record_type = line[:3]
        if record_type not in kinds:
            raise DialectError(
                name, number, "record_type (columns 1-3)",
                f"unknown record type {record_type!r} (known: {', '.join(kinds)})",
            )
        kind = kinds[record_type]
        values = parse_fixed(PERSHING_DETAIL[kind], line, name, number)
        if kind == "positions":
            quantity_total += values["quantity"]
        elif kind == "lots":
            cost_total += values["cost_basis"]
        delivery.rows[kind].append(_detail(kind, values, name, number, accounts, "pershing"))
    trailer_line = len(lines)
    trailer = parse_fixed(PERSHING_TRAILER, lines[-1], name, trailer_line)
    counts = {"record_count": len(lines) - 2} | {f"{k}_count": len(delivery.rows[k]) for k in CUSTODIAN_FILES}
    for field_name, actual in counts.items():
        if trailer[field_name] != actual:
            raise DialectError(
                name, trailer_line, field_label(PERSHING_TRAILER, field_name),
                f"trailer says {trailer[field_name]} records, the file has {actual}",
            )
    for field_name, actual in (("position_quantity_total", quantity_total), ("lot_cost_basis_total", cost_total)):
        if trailer[field_name] != actual:
            raise DialectError(
                name, trailer_line, field_label(PERSHING_TRAILER, field_name),
                f"trailer says {canonical_decimal(trailer[field_name])}, the records sum to {canonical_decimal(actual)}",
            )
    return delivery


_READERS: dict[str, Callable[[Path, dt.date, _AccountBook], _Delivery]] = {
    "schwab": _read_schwab,
    "fidelity": _read_fidelity,
    "pershing": _read_pershing,
}


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def write_canonical_csv(path: Path, columns: Iterable[str], rows: Iterable[dict[str, str]]) -> int:
    """Write one canonical CSV beside its final name and move it into place; returns rows."""
    columns = list(columns)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
            written += 1
    os.replace(partial, path)
    return written


def to_canonical(dialect: str, raw_dir: Path, as_of: dt.date, reference_dir: Path, out_dir: Path) -> AdapterReport:
    """Translate one day's custodian delivery in `dialect` into the canonical feed in out_dir.

    Everything is read and checked before anything is written, so a DialectError leaves
    out_dir as it was.
    """
    if dialect not in _READERS:
        raise ValueError(f"unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    raw_dir, reference_dir, out_dir = Path(raw_dir), Path(reference_dir), Path(out_dir)
    if out_dir.resolve() == raw_dir.resolve():
        raise ValueError("out_dir must not be the raw folder: raw files are never touched")
    for name in REFERENCE_FILES:
        if not (reference_dir / FEED_FILES[name].filename).is_file():
            raise DialectError(FEED_FILES[name].filename, None, None, f"reference file missing from {reference_dir}")
    delivery = _READERS[dialect](raw_dir, as_of, _AccountBook(reference_dir))

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    for name in REFERENCE_FILES:
        filename = FEED_FILES[name].filename
        shutil.copyfile(reference_dir / filename, out_dir / (filename + ".partial"))
        os.replace(out_dir / (filename + ".partial"), out_dir / filename)
        with open(out_dir / filename, newline="", encoding="utf-8-sig") as handle:
            rows[name] = sum(1 for _ in csv.reader(handle)) - 1
    for name in CUSTODIAN_FILES:
        spec = FEED_FILES[name]
        rows[name] = write_canonical_csv(out_dir / spec.filename, spec.column_names, delivery.rows[name])
    return AdapterReport(
        dialect=dialect, as_of=as_of, out_dir=out_dir, raw_files=delivery.raw_files, rows=rows,
        firm_id=delivery.firm_id,
    )


def _adapter(dialect: str) -> Callable[[Path, dt.date, Path, Path], AdapterReport]:
    def adapter(raw_dir: Path, as_of: dt.date, reference_dir: Path, out_dir: Path) -> AdapterReport:
        return to_canonical(dialect, raw_dir, as_of, reference_dir, out_dir)

    adapter.__name__ = f"{dialect}_to_canonical"
    adapter.__doc__ = f"to_canonical for the {dialect}-style dialect."
    return adapter


schwab_to_canonical = _adapter("schwab")
fidelity_to_canonical = _adapter("fidelity")
pershing_to_canonical = _adapter("pershing")
__all__ += ["schwab_to_canonical", "fidelity_to_canonical", "pershing_to_canonical"]
