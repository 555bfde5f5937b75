"""Intraday prices drop files for drills and tests (the format: rebal_pipeline/market_events/prices.py).

`write_intraday_prices` puts one well-formed file in place the way a firm's price feed must:
written to a dot-file beside it, then linked under its name (core/write_once.write_file_once),
so the `market_events` sensor sees no file or the whole file, never half of one. A file is never
replaced: a second file for the same second is refused. `shocked_prices` moves a session's closes
by a fraction, to build a day whose reference basket crosses the policy's threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

from rebal_pipeline.core.feed_contract import CASH_SYMBOL
from rebal_pipeline.core.write_once import write_file_once
from rebal_pipeline.market_events.prices import HEADER, NEW_YORK, PRICE_DECIMALS, intraday_dir, symbol_problem

_PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_DECIMALS)
_CENT = Decimal("0.01")


def _price_text(symbol: str, value: Decimal | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{symbol}: the price {value} is not a number")
        # A float is already approximate: its shortest text, to 6 places at most.
        value = Decimal(repr(value)).quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_EVEN).normalize()
    elif not isinstance(value, Decimal):
        raise TypeError(f"{symbol}: the price must be a Decimal or a float, not {type(value).__name__}")
    if not value.is_finite() or value <= 0:
        raise ValueError(f"{symbol}: the price {value} is not a positive number")
    if value.as_tuple().exponent < -PRICE_DECIMALS:
        raise ValueError(f"{symbol}: the price {value} has more than {PRICE_DECIMALS} decimal places")
    return format(value, "f")  # never an exponent


def write_intraday_prices(feed_root: Path, day: date, at: datetime,
                          prices: Mapping[str, Decimal | float]) -> Path:
    """Write <feed_root>/intraday/<day>/prices_<HHMMSS>.csv (HHMMSS: `at` in New York), every row
    priced at `at`; returns its path. `at` must be timezone-aware and on `day` in New York.
    FileExistsError when that file is already there (drop files are never replaced)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("`at` must be timezone-aware (a price time without an offset is no moment)")
    local = at.astimezone(NEW_YORK)
    if local.date() != day:
        raise ValueError(f"{at.isoformat()} is on {local.date().isoformat()} in New York, not {day.isoformat()}")
    priced_at = local.isoformat(timespec="seconds")
    lines = [HEADER]
    for symbol, value in prices.items():
        problem = symbol_problem(symbol)
        if problem:
            raise ValueError(f"{symbol!r}: {problem}")
        lines.append(f"{symbol},{_price_text(symbol, value)},{priced_at}")
    path = intraday_dir(Path(feed_root), day) / f"prices_{local:%H%M%S}.csv"
    if not write_file_once(path, ("\n".join(lines) + "\n").encode("utf-8")):
        raise FileExistsError(f"{path} is already there: a drop file is never replaced")
    return path


def shocked_prices(closes: Mapping[str, Decimal], move: Decimal,
                   symbols: Iterable[str] | None = None) -> dict[str, Decimal]:
    """Every close, those of `symbols` (default: all but CASH) × (1 + move) rounded to cents
    (half-up, as the sandbox's closes); the others as they were."""
    move = Decimal(move)
    if move <= -1:
        raise ValueError(f"a move of {move} leaves no positive price")
    chosen = {s for s in closes if s != CASH_SYMBOL} if symbols is None else set(symbols)
    unknown = sorted(chosen - set(closes))
    if unknown:
        raise KeyError(f"no close for {', '.join(unknown)}")
    shocked = {
        symbol: (close * (1 + move)).quantize(_CENT, rounding=ROUND_HALF_UP) if symbol in chosen else close
        for symbol, close in closes.items()
    }
    gone = sorted(s for s in chosen if shocked[s] <= 0)
    if gone:
        raise ValueError(f"a move of {move} rounds the price of {', '.join(gone)} to no cents")
    return shocked
