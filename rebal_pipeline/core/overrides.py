"""Advisor overrides of the tax engine: "keep this buy although it washes a loss".

The engine replaces a proposed buy that would wash a loss (IRC §1091) by the security's
substitute. An advisor may keep the original security instead — a client preference, a
model-tracking reason — but only with a documented reason and their name; the override is then
shown on the trade and the disallowed loss is still reported. Overrides are kept in one
append-only CSV (one row per decision; a later row for the same day, account and symbol wins).
The approval workflow (issue #5) records the same decision through its API.
"""

from __future__ import annotations

import csv
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

COLUMNS = ("as_of", "account_id", "symbol", "reason", "decided_by", "decided_at")


class WashSaleOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    as_of: date
    account_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    symbol: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._/-]+$")
    # A documented reason, not a checkbox: at least a short sentence.
    reason: str = Field(min_length=10, max_length=500)
    decided_by: str = Field(min_length=1, max_length=64)
    decided_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class OverrideFileError(ValueError):
    pass


def record_override(path: Path, override: WashSaleOverride) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({**override.model_dump(mode="json")})


def read_overrides(path: Path, as_of: date) -> pl.DataFrame:
    """The day's overrides (account_id, symbol, reason, decided_by). A malformed row fails with
    the file, line and reason: an override is a compliance record, never skipped silently."""
    schema = {"account_id": pl.String, "symbol": pl.String, "reason": pl.String, "decided_by": pl.String}
    if not path.exists():
        return pl.DataFrame(schema=schema)
    latest: dict[tuple[str, str], WashSaleOverride] = {}
    with path.open(newline="", encoding="utf-8") as src:
        for line, row in enumerate(csv.DictReader(src), start=2):
            try:
                override = WashSaleOverride.model_validate(row)
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise OverrideFileError(f"{path} line {line}: {problems}") from None
            if override.as_of == as_of:
                latest[(override.account_id, override.symbol)] = override
    rows = [{"account_id": o.account_id, "symbol": o.symbol, "reason": f"{o.reason} ({o.decided_by})",
             "decided_by": o.decided_by} for o in latest.values()]
    return pl.DataFrame(rows, schema=schema)
