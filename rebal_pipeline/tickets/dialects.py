"""Custodian-native CSV order files: Schwab-style, Fidelity-style and Pershing-style layouts.

These are "-style" layouts for staging orders with the trading desk, designed after the shape of
the custodians' bulk order upload files (column names, date formats, side codes, shares vs.
dollars, record types); they are not vendor-certified specifications. docs/custodian_orders.md
documents each one with a sample.

Each dialect writes a batch with the csv module and reads it back to the same batch
(`read(write(batch)) == batch`). A block is written as a block record followed by its
allocation records (the allocation list); orders not in a block are order records. Every order
and allocation record carries the SEC Rule 204-2(a)(3) memorandum: terms (side, quantity or
amount, order type, duration), account, order date and time, advisor, discretionary flag,
recommended by, approved by (with the decision id) and placed by.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from rebal_pipeline.tickets.orders import (
    BlockOrder, Order, TicketBatch, TicketError, fmt_cash, fmt_decimal, order_sort_key, parse_recommended_by,
)

NEW_YORK = ZoneInfo("America/New_York")


def _reverse(mapping: dict[str, str], what: str) -> Callable[[str], str]:
    back = {code: key for key, code in mapping.items()}

    def decode(code: str) -> str:
        try:
            return back[code]
        except KeyError:
            raise ValueError(f"{what} {code!r} is not one of {', '.join(back)}") from None
    return decode


_PLAIN_NUMBER = re.compile(r"\d+(\.\d+)?")


def _decimal(text: str) -> Decimal | None:
    """A quantity or amount as written: plain digits (no sign, separators or exponent)."""
    if text == "":
        return None
    if not _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} is not a plain number")
    return Decimal(text)


def _reason(exc: ValueError) -> str:
    """A validation failure in one line (pydantic's own message is several)."""
    if isinstance(exc, ValidationError):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


def _none(text: str) -> str | None:
    return text or None


# One record in the dialect-independent shape every layout encodes (see _records/_assemble).
Record = dict


def _records(batch: TicketBatch) -> list[Record]:
    """The batch as records in file order: each block then its allocations, then single orders."""
    def common(t: Order | BlockOrder) -> Record:
        return {"symbol": t.symbol, "cusip": t.cusip, "security_type": t.security_type, "side": t.side,
                "order_type": t.order_type, "time_in_force": t.time_in_force, "placed_at": t.placed_at,
                "placed_by": t.placed_by, "advisor_id": t.advisor_id, "discretionary": t.discretionary}

    def order(o: Order, record: str) -> Record:
        return common(o) | {"record": record, "id": o.cl_ord_id, "block_id": o.block_id, "account_id": o.account_id,
                            "quantity": o.quantity, "cash_amount": o.cash_amount,
                            "recommended_by": o.recommended_by, "approved_by": o.approved_by,
                            "decision_id": o.decision_id}
    rows = []
    for block in batch.blocks:
        rows.append(common(block) | {"record": "block", "id": block.block_id, "block_id": None, "account_id": None,
                                     "quantity": block.quantity, "cash_amount": None, "recommended_by": None,
                                     "approved_by": None, "decision_id": None})
        rows += [order(o, "allocation") for o in block.allocations]
    rows += [order(o, "order") for o in batch.standalone]
    return rows


def _assemble(records: list[tuple[int, Record]], custodian: str, source: str) -> TicketBatch:
    """Orders and blocks from decoded records (the inverse of `_records`)."""
    orders: list[Order] = []
    blocks: list[dict] = []
    for number, r in records:
        where = f"{source}: record {number}"
        try:
            if r["record"] == "block":
                blocks.append({k: r[k] for k in ("symbol", "cusip", "security_type", "side", "order_type",
                                                  "time_in_force", "placed_at", "placed_by", "advisor_id",
                                                  "discretionary", "quantity")} | {"block_id": r["id"],
                                                                                   "allocations": []})
                continue
            recommendation_id, policy_version = parse_recommended_by(r["recommended_by"] or "")
            order = Order(
                cl_ord_id=r["id"], block_id=r["block_id"], decision_id=r["decision_id"] or "",
                recommendation_id=recommendation_id, policy_version=policy_version, advisor_id=r["advisor_id"],
                custodian=custodian, account_id=r["account_id"] or "", discretionary=r["discretionary"],
                symbol=r["symbol"], cusip=r["cusip"], security_type=r["security_type"], side=r["side"],
                quantity=r["quantity"], cash_amount=r["cash_amount"], order_type=r["order_type"],
                time_in_force=r["time_in_force"], approved_by=r["approved_by"] or "", placed_by=r["placed_by"],
                placed_at=r["placed_at"],
            )
        except ValueError as exc:
            raise TicketError(f"{where}: {_reason(exc)}") from None
        if not order.account_id or not order.decision_id or not order.approved_by:
            raise TicketError(f"{where}: the 204-2 memo needs the account, the decision and who approved it")
        if r["record"] == "allocation":
            if not blocks or blocks[-1]["block_id"] != order.block_id:
                raise TicketError(f"{where}: allocation of block {order.block_id} does not follow its block record")
            blocks[-1]["allocations"].append(order)
        elif order.block_id:
            raise TicketError(f"{where}: an order record cannot name a block")
        orders.append(order)
    try:
        built = tuple(BlockOrder(custodian=custodian, **{**b, "allocations": tuple(b["allocations"])})
                      for b in blocks)
        return TicketBatch(orders=tuple(sorted(orders, key=order_sort_key)), blocks=built)
    except ValueError as exc:
        raise TicketError(f"{source}: {_reason(exc)}") from None


@dataclass(frozen=True)
class Dialect:
    """One custodian's order file layout."""

    name: str
    custodian: str
    title: str
    extension: str
    delimiter: str
    lineterminator: str
    header: tuple[str, ...] | None
    encode: Callable[[Record], list[str]]
    decode: Callable[[list[str]], Record]

    def file_name(self, batch: TicketBatch) -> str:
        day = max((o.placed_at for o in batch.orders), default=None)
        return f"{self.name}_orders_{day:%Y%m%d}{self.extension}" if day else f"{self.name}_orders{self.extension}"

    def rows(self, batch: TicketBatch) -> list[list[str]]:
        others = sorted({o.custodian for o in batch.orders} - {self.custodian})
        if others:
            raise TicketError(f"a {self.title} file holds {self.custodian} orders only; the batch also has "
                              f"{', '.join(others)} (use batch.for_custodian)")
        body = [self.encode(r) for r in _records(batch)]
        return ([list(self.header)] if self.header else []) + body

    def write(self, path: str | os.PathLike, batch: TicketBatch) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, delimiter=self.delimiter, lineterminator=self.lineterminator).writerows(self.rows(batch))
        return path

    def read(self, path: str | os.PathLike) -> TicketBatch:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter=self.delimiter))
        return self.parse(rows, str(path))

    def parse(self, rows: list[list[str]], source: str = "<rows>") -> TicketBatch:
        start = 0
        if self.header:
            if not rows or tuple(rows[0]) != self.header:
                raise TicketError(f"{source}: not a {self.title} order file (the header row differs from "
                                  f"{', '.join(self.header)})")
            start = 1
        records = []
        for number, row in enumerate(rows[start:], start=start + 1):
            try:
                records.append((number, self.decode(row)))
            except (ValueError, KeyError, IndexError) as exc:
                raise TicketError(f"{source}: row {number}: {exc}") from None
        return _assemble(records, self.custodian, source)


def _fixed(row: list[str], width: int) -> list[str]:
    if len(row) != width:
        raise ValueError(f"{len(row)} fields, the layout has {width}")
    return row


# ---------------------------------------------------------------------------------------------
# Schwab-style: comma-separated with a Title Case header row, Buy/Sell actions, shares in
# "Quantity" or dollars in "Dollar Amount", US dates and Eastern times.
# ---------------------------------------------------------------------------------------------

SCHWAB_HEADER = (
    "Record Type", "Order ID", "Block ID", "Account Number", "Action", "Quantity", "Dollar Amount", "Symbol",
    "CUSIP", "Security Type", "Order Type", "Duration", "Order Date", "Order Time (ET)", "Advisor ID",
    "Discretionary", "Recommended By", "Approved By", "Decision ID", "Placed By",
)
_SCHWAB_RECORD = {"order": "Order", "block": "Block", "allocation": "Allocation"}
_SCHWAB_ACTION = {"buy": "Buy", "sell": "Sell"}
_SCHWAB_TYPE = {"stock": "Equity", "etf": "ETF", "mutual_fund": "Mutual Fund", "money_market": "Money Market"}
_SCHWAB_YES = {True: "Yes", False: "No"}


def _schwab_encode(r: Record) -> list[str]:
    local = r["placed_at"].astimezone(NEW_YORK)
    return [
        _SCHWAB_RECORD[r["record"]], r["id"], r["block_id"] or "", r["account_id"] or "", _SCHWAB_ACTION[r["side"]],
        fmt_decimal(r["quantity"]) if r["quantity"] is not None else "",
        fmt_cash(r["cash_amount"]) if r["cash_amount"] is not None else "",
        r["symbol"], r["cusip"] or "", _SCHWAB_TYPE[r["security_type"]], "Market", "Day",
        f"{local:%m/%d/%Y}", f"{local:%H:%M:%S}", r["advisor_id"] or "", _SCHWAB_YES[r["discretionary"]],
        r["recommended_by"] or "", r["approved_by"] or "", r["decision_id"] or "", r["placed_by"],
    ]


def _schwab_decode(row: list[str]) -> Record:
    (record, ident, block, account, action, quantity, amount, symbol, cusip, sec_type, order_type, duration,
     day, time, advisor, discretionary, recommended, approved, decision, placed_by) = _fixed(row, len(SCHWAB_HEADER))
    if order_type != "Market" or duration != "Day":
        raise ValueError(f"only Market / Day orders are staged, not {order_type} / {duration}")
    if discretionary not in ("Yes", "No"):
        raise ValueError(f"Discretionary is Yes or No, not {discretionary!r}")
    local = datetime.strptime(f"{day} {time}", "%m/%d/%Y %H:%M:%S").replace(tzinfo=NEW_YORK)
    return {"record": _reverse(_SCHWAB_RECORD, "Record Type")(record), "id": ident, "block_id": _none(block),
            "account_id": _none(account), "side": _reverse(_SCHWAB_ACTION, "Action")(action),
            "quantity": _decimal(quantity), "cash_amount": _decimal(amount), "symbol": symbol, "cusip": _none(cusip),
            "security_type": _reverse(_SCHWAB_TYPE, "Security Type")(sec_type), "order_type": "market",
            "time_in_force": "day", "placed_at": local.astimezone(timezone.utc), "advisor_id": _none(advisor),
            "discretionary": {"Yes": True, "No": False}[discretionary],
            "recommended_by": _none(recommended), "approved_by": _none(approved), "decision_id": _none(decision),
            "placed_by": placed_by}


SCHWAB = Dialect("schwab", "schwab", "Schwab-style", ".csv", ",", "\r\n", SCHWAB_HEADER,
                 _schwab_encode, _schwab_decode)


# ---------------------------------------------------------------------------------------------
# Fidelity-style: comma-separated with an UPPER_SNAKE header row, one-letter codes, one QTY
# column qualified by QTY_TYPE (S shares, D dollars), compact UTC dates and times.
# ---------------------------------------------------------------------------------------------

FIDELITY_HEADER = (
    "REC_TYPE", "CLIENT_ORDER_ID", "BLOCK_REF", "ACCT_NO", "TRAN_CD", "QTY", "QTY_TYPE", "SYMBOL", "CUSIP",
    "SEC_TYPE", "ORDER_TYPE", "TIF", "ORDER_DT", "ORDER_TM", "REP_CD", "DISC_FL", "RECOMMENDED_BY",
    "APPROVED_BY", "DECISION_ID", "PLACED_BY",
)
_FIDELITY_RECORD = {"order": "O", "block": "B", "allocation": "A"}
_FIDELITY_SIDE = {"buy": "B", "sell": "S"}
_FIDELITY_TYPE = {"stock": "EQ", "etf": "ETF", "mutual_fund": "MF", "money_market": "MM"}


def _fidelity_encode(r: Record) -> list[str]:
    by_amount = r["cash_amount"] is not None
    at = r["placed_at"].astimezone(timezone.utc)
    return [
        _FIDELITY_RECORD[r["record"]], r["id"], r["block_id"] or "", r["account_id"] or "", _FIDELITY_SIDE[r["side"]],
        fmt_cash(r["cash_amount"]) if by_amount else fmt_decimal(r["quantity"]), "D" if by_amount else "S",
        r["symbol"], r["cusip"] or "", _FIDELITY_TYPE[r["security_type"]], "M", "D", f"{at:%Y%m%d}", f"{at:%H%M%S}",
        r["advisor_id"] or "", "Y" if r["discretionary"] else "N", r["recommended_by"] or "",
        r["approved_by"] or "", r["decision_id"] or "", r["placed_by"],
    ]


def _fidelity_decode(row: list[str]) -> Record:
    (record, ident, block, account, side, qty, qty_type, symbol, cusip, sec_type, order_type, tif, day, time,
     rep, discretionary, recommended, approved, decision, placed_by) = _fixed(row, len(FIDELITY_HEADER))
    if (order_type, tif) != ("M", "D"):
        raise ValueError(f"only market (M) day (D) orders are staged, not {order_type}/{tif}")
    if qty_type not in ("S", "D") or discretionary not in ("Y", "N"):
        raise ValueError(f"QTY_TYPE must be S or D and DISC_FL Y or N, not {qty_type!r} / {discretionary!r}")
    return {"record": _reverse(_FIDELITY_RECORD, "REC_TYPE")(record), "id": ident, "block_id": _none(block),
            "account_id": _none(account), "side": _reverse(_FIDELITY_SIDE, "TRAN_CD")(side),
            "quantity": _decimal(qty) if qty_type == "S" else None,
            "cash_amount": _decimal(qty) if qty_type == "D" else None, "symbol": symbol, "cusip": _none(cusip),
            "security_type": _reverse(_FIDELITY_TYPE, "SEC_TYPE")(sec_type), "order_type": "market",
            "time_in_force": "day",
            "placed_at": datetime.strptime(day + time, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc),
            "advisor_id": _none(rep), "discretionary": discretionary == "Y", "recommended_by": _none(recommended),
            "approved_by": _none(approved), "decision_id": _none(decision), "placed_by": placed_by}


FIDELITY = Dialect("fidelity", "fidelity", "Fidelity-style", ".csv", ",", "\r\n", FIDELITY_HEADER,
                   _fidelity_encode, _fidelity_decode)


# ---------------------------------------------------------------------------------------------
# Pershing-style: pipe-delimited positional records without a header row, framed by a header
# record (H) and a trailer record (T) with control totals; D order, K block, L allocation.
# ---------------------------------------------------------------------------------------------

PERSHING_FIELDS = (
    "record_type", "order_id", "block_id", "account", "side", "shares", "amount", "symbol", "cusip",
    "security_type", "order_type", "tif", "entered_utc", "ip_number", "discretion", "recommended_by",
    "approved_by", "decision_id", "placed_by",
)
_PERSHING_RECORD = {"order": "D", "block": "K", "allocation": "L"}
_PERSHING_SIDE = {"buy": "BUY", "sell": "SELL"}
_PERSHING_TYPE = {"stock": "STK", "etf": "ETF", "mutual_fund": "MF", "money_market": "MMF"}
PERSHING_FILE_ID = "REBAL-ORDERS"
PERSHING_LAYOUT_VERSION = "1"


def _pershing_encode(r: Record) -> list[str]:
    return [
        _PERSHING_RECORD[r["record"]], r["id"], r["block_id"] or "", r["account_id"] or "",
        _PERSHING_SIDE[r["side"]], fmt_decimal(r["quantity"]) if r["quantity"] is not None else "",
        fmt_cash(r["cash_amount"]) if r["cash_amount"] is not None else "", r["symbol"], r["cusip"] or "",
        _PERSHING_TYPE[r["security_type"]], "MKT", "DAY",
        r["placed_at"].astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), r["advisor_id"] or "",
        "D" if r["discretionary"] else "N", r["recommended_by"] or "", r["approved_by"] or "",
        r["decision_id"] or "", r["placed_by"],
    ]


def _pershing_decode(row: list[str]) -> Record:
    (record, ident, block, account, side, shares, amount, symbol, cusip, sec_type, order_type, tif, entered, ip,
     discretion, recommended, approved, decision, placed_by) = _fixed(row, len(PERSHING_FIELDS))
    if (order_type, tif) != ("MKT", "DAY") or discretion not in ("D", "N"):
        raise ValueError(f"expected MKT/DAY and discretion D or N, not {order_type}/{tif}/{discretion!r}")
    return {"record": _reverse(_PERSHING_RECORD, "record type")(record), "id": ident, "block_id": _none(block),
            "account_id": _none(account), "side": _reverse(_PERSHING_SIDE, "side")(side),
            "quantity": _decimal(shares), "cash_amount": _decimal(amount), "symbol": symbol, "cusip": _none(cusip),
            "security_type": _reverse(_PERSHING_TYPE, "security type")(sec_type), "order_type": "market",
            "time_in_force": "day",
            "placed_at": datetime.strptime(entered, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc),
            "advisor_id": _none(ip), "discretionary": discretion == "D", "recommended_by": _none(recommended),
            "approved_by": _none(approved), "decision_id": _none(decision), "placed_by": placed_by}


class _PershingDialect(Dialect):
    """Adds the H and T records; the trailer's control totals are checked on reading."""

    def rows(self, batch: TicketBatch) -> list[list[str]]:
        body = super().rows(batch)
        accounts = [r for r in body if r[0] in ("D", "L")]
        shares = sum((Decimal(r[5]) for r in accounts if r[5]), Decimal(0))
        dollars = sum((Decimal(r[6]) for r in accounts if r[6]), Decimal(0))
        day = max((o.placed_at for o in batch.orders), default=None)
        return ([["H", PERSHING_FILE_ID, PERSHING_LAYOUT_VERSION, f"{day:%Y-%m-%d}" if day else ""]] + body
                + [["T", str(len(body)), fmt_decimal(shares), fmt_cash(dollars)]])

    def parse(self, rows: list[list[str]], source: str = "<rows>") -> TicketBatch:
        if len(rows) < 2 or rows[0][:3] != ["H", PERSHING_FILE_ID, PERSHING_LAYOUT_VERSION] or rows[-1][:1] != ["T"]:
            raise TicketError(f"{source}: not a Pershing-style order file (H record first, T record last)")
        body = rows[1:-1]
        batch = super().parse(body, source)
        trailer = rows[-1]
        expected = self.rows(batch)[-1]
        if len(trailer) != 4 or trailer[1] != str(len(body)) or _decimal(trailer[2]) != _decimal(expected[2]) \
                or _decimal(trailer[3]) != _decimal(expected[3]):
            raise TicketError(f"{source}: trailer {'|'.join(trailer)} does not match the records "
                              f"({len(body)} records, {expected[2]} shares, ${expected[3]})")
        return batch


PERSHING = _PershingDialect("pershing", "pershing", "Pershing-style", ".txt", "|", "\n", None,
                            _pershing_encode, _pershing_decode)

DIALECTS: dict[str, Dialect] = {d.custodian: d for d in (SCHWAB, FIDELITY, PERSHING)}


def dialect_for(custodian: str) -> Dialect:
    try:
        return DIALECTS[custodian]
    except KeyError:
        raise TicketError(f"no CSV order layout for custodian {custodian!r} (known: {', '.join(DIALECTS)}); "
                          "send its orders as FIX") from None


def write_custodian_files(batch: TicketBatch, folder: str | os.PathLike) -> dict[str, Path]:
    """One order file per custodian of the batch, in that custodian's dialect."""
    folder = Path(folder)
    written = {}
    for custodian in batch.custodians:
        dialect = dialect_for(custodian)
        part = batch.for_custodian(custodian)
        written[custodian] = dialect.write(folder / dialect.file_name(part), part)
    return written
