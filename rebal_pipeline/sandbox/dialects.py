"""Deliver a sandbox book in a custodian dialect: the inverse of the dialect adapters.

`emit_dialect(canonical_feed_dir, dialect, out_dir)` writes the custodian files that
`rebal_pipeline.connections.dialects.to_canonical` turns back into the canonical positions,
lots, transactions and prices of `canonical_feed_dir` (equal as parsed values; the bytes may
differ, e.g. `1.00` comes back as `1`). The firm-maintained files are not emitted: a custodian
does not send them, the adapter takes them from the reference folder (which may simply be the
canonical feed folder itself).

The whole book is emitted, whatever each account's `custodian` column says: in the sandbox one
custodian can be made to deliver every account, so that any dialect can be exercised on any book.
Account numbers are the account_ids (docs/custodian_feeds.md). A value the dialect cannot
represent exactly (too many decimals, too long an id) raises ValueError rather than being
rounded or cut.
"""

from __future__ import annotations

import csv
import datetime as dt
from decimal import Decimal
from pathlib import Path

from rebal_pipeline.connections.dialects import (
    CASH_SYMBOLS,
    CUSTODIAN_FILES,
    DIALECTS,
    FIDELITY_CONTROL,
    FIDELITY_DETAIL,
    FIDELITY_FILE_TYPES,
    FIDELITY_HEADER,
    PERSHING_DETAIL,
    PERSHING_HEADER,
    PERSHING_RECORD_TYPES,
    PERSHING_TRAILER,
    SCHWAB_ACTIONS,
    SCHWAB_FILES,
    SCHWAB_TRAILER,
    canonical_decimal,
    fidelity_filename,
    fidelity_trailer,
    pershing_filename,
    render_fixed,
    schwab_date,
    schwab_filename,
)
from rebal_pipeline.core.feed_contract import CASH_SYMBOL, FEED_FILES

SANDBOX_FIRM_ID = "RBLSBX01"

__all__ = ["SANDBOX_FIRM_ID", "emit_dialect"]


def _read_canonical(feed_dir: Path, name: str) -> list[dict[str, str]]:
    with open(feed_dir / FEED_FILES[name].filename, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    # Optional columns may be absent from a feed: treat them as empty.
    return [{c: (row.get(c) or "") for c in FEED_FILES[name].column_names} for row in rows]


def _custodian_symbol(symbol: str, dialect: str) -> str:
    if symbol == CASH_SYMBOLS[dialect] and symbol != CASH_SYMBOL:
        raise ValueError(f"symbol {symbol!r} collides with the {dialect} cash symbol")
    return CASH_SYMBOLS[dialect] if symbol == CASH_SYMBOL else symbol


def _number(text: str) -> Decimal | None:
    return Decimal(text) if text != "" else None


def _values(kind: str, row: dict[str, str], dialect: str) -> dict[str, object]:
    """A canonical row as field values of the fixed-width layouts."""
    values: dict[str, object] = dict(row)
    values["symbol"] = _custodian_symbol(row["symbol"], dialect)
    if "account_id" in row:
        values["account"] = row["account_id"]
    for column in ("quantity", "cost_basis", "price", "close"):
        if column in row:
            values[column] = _number(row[column])
    for column in ("acquired_date",):
        if column in row and row[column] == "":
            values[column] = None
    return values


def emit_dialect(
    canonical_feed_dir: Path,
    dialect: str,
    out_dir: Path,
    as_of: dt.date | None = None,
    firm_id: str = SANDBOX_FIRM_ID,
    account_ids: set[str] | None = None,
) -> list[Path]:
    """Write the custodian files of `dialect` for the canonical feed; returns their paths.

    `as_of` defaults to the feed folder's name (`<feed_root>/<YYYY-MM-DD>`). `account_ids`, when
    given, limits the delivery to those accounts (one custodian's share of a firm's book); the
    price file stays whole (a custodian prices its whole security master, which covers model and
    substitute securities no account holds yet).
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    feed_dir = Path(canonical_feed_dir)
    as_of = as_of or dt.date.fromisoformat(feed_dir.name)
    rows = {kind: _read_canonical(feed_dir, kind) for kind in CUSTODIAN_FILES}
    if account_ids is not None:
        for kind in CUSTODIAN_FILES:
            if kind != "prices":
                rows[kind] = [r for r in rows[kind] if r["account_id"] in account_ids]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emit = {"schwab": _emit_schwab, "fidelity": _emit_fidelity, "pershing": _emit_pershing}[dialect]
    return emit(rows, as_of, out_dir, firm_id)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("ascii"))
    return path


def _emit_schwab(rows, as_of: dt.date, out_dir: Path, firm_id: str) -> list[Path]:
    actions = {v: k for k, v in SCHWAB_ACTIONS.items()}
    flags = {"true": "Y", "false": "N", "": ""}
    written = []
    for kind, (_prefix, columns, control_column) in SCHWAB_FILES.items():
        records: list[dict[str, str]] = []
        for row in rows[kind]:
            symbol = _custodian_symbol(row["symbol"], "schwab")
            if kind == "prices":
                records.append({"Symbol": symbol, "Closing Price": row["close"], "Price Date": schwab_date(as_of.isoformat())})
                continue
            record = {"Account Number": row["account_id"], "Symbol": symbol, "Quantity": row["quantity"]}
            if kind == "positions":
                record["As Of Date"] = schwab_date(as_of.isoformat())
            elif kind == "lots":
                record.update({
                    "Lot ID": row["lot_id"], "Open Date": schwab_date(row["open_date"]),
                    "Cost Basis": row["cost_basis"], "Wash Sale Adjusted": flags[row["wash_sale_adjusted"]],
                })
            else:
                record.update({
                    "Trade Date": schwab_date(row["trade_date"]), "Action": actions[row["type"]],
                    "Price": row["price"], "Cost Basis": row["cost_basis"],
                    "Acquired Date": schwab_date(row["acquired_date"]) if row["acquired_date"] else "",
                })
            records.append(record)
        total = sum((Decimal(r[control_column]) for r in records if r[control_column] != ""), Decimal(0))
        path = out_dir / schwab_filename(kind, as_of)
        with open(path, "w", newline="", encoding="ascii") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows([r[c] for c in columns] for r in records)
            writer.writerow([SCHWAB_TRAILER, len(records), canonical_decimal(total)])
        written.append(path)
    return written


def _emit_fidelity(rows, as_of: dt.date, out_dir: Path, firm_id: str) -> list[Path]:
    written = []
    for kind, file_type in FIDELITY_FILE_TYPES.items():
        lines = [render_fixed(FIDELITY_HEADER, {
            "record_type": "H", "file_type": file_type, "business_date": as_of.isoformat(), "firm_id": firm_id,
        })]
        total = Decimal(0)
        for row in rows[kind]:
            values = _values(kind, row, "fidelity") | {"record_type": "D"}
            total += values[FIDELITY_CONTROL[kind]]
            lines.append(render_fixed(FIDELITY_DETAIL[kind], values))
        lines.append(render_fixed(fidelity_trailer(kind), {
            "record_type": "T", "record_count": len(lines) - 1, "control_total": total,
        }))
        written.append(_write_lines(out_dir / fidelity_filename(kind, as_of), lines))
    return written


def _emit_pershing(rows, as_of: dt.date, out_dir: Path, firm_id: str) -> list[Path]:
    lines = [render_fixed(PERSHING_HEADER, {"record_type": "HDR", "business_date": as_of.isoformat(), "firm_id": firm_id})]
    trailer: dict[str, object] = {"record_type": "TRL", "position_quantity_total": Decimal(0), "lot_cost_basis_total": Decimal(0)}
    for kind, record_type in PERSHING_RECORD_TYPES.items():
        for row in rows[kind]:
            values = _values(kind, row, "pershing") | {"record_type": record_type}
            lines.append(render_fixed(PERSHING_DETAIL[kind], values))
            if kind == "positions":
                trailer["position_quantity_total"] += values["quantity"]
            elif kind == "lots":
                trailer["lot_cost_basis_total"] += values["cost_basis"]
        trailer[f"{kind}_count"] = len(rows[kind])
    trailer["record_count"] = len(lines) - 1
    lines.append(render_fixed(PERSHING_TRAILER, trailer))
    return [_write_lines(out_dir / pershing_filename(as_of), lines)]
