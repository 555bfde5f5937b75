"""The out-of-cycle scan of a market event: every account of the last session's book, valued at the
event's prices, through the same SQL models and the same proposal code as the daily run.

The day's record is never changed. The warehouse file is attached READ ONLY to an in-memory
DuckDB (`session_warehouse`); the tables the scan recomputes are *shadow* tables in memory, found
first on the search path, so every model and query reads the event's numbers where they differ
and the session's everywhere else:
  - `stg_feed_prices`: the session's closes with the event's prices in place of the closes of
    the symbols the event priced (every other symbol keeps its close; the reference says which);
  - `drift_policy`: the policy in force now (its version id goes into the recommendation ids);
  - every SQL model downstream of those two (holdings, drift, drift_alerts, the scanned and held
    accounts, …: `shadowed_models`), materialised for the session's date;
  - the proposal outputs (core/proposals.OUTPUT_TABLES), written by `propose_trades`.
Shadows that models may read for the session before (reconciliation compares with it) hold
that session's rows too. Nothing is written to the warehouse; closing the connection drops the
shadows. The caller publishes from the returned connection (workflow/publishing.py), in the
workflow store.

Why not write the event's numbers into the warehouse: the warehouse is one partition per
session, the daily run's record, lineage and backfills read it; an intraday valuation is not a
session. Why not copy the file: at 1M accounts that is gigabytes per event.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Iterator, Mapping

import duckdb
import polars as pl

from rebal_pipeline.core import proposals
from rebal_pipeline.core.sql_models import load_project, materialize_model, quote_identifier

ATTACHED = "session_warehouse"
SHADOWED_INPUTS = ("stg_feed_prices", "drift_policy")


class ScanError(RuntimeError):
    """The event cannot be scanned (no session in the warehouse, unreadable file); the message says why."""


@cache
def shadowed_models(sql_dir: Path) -> tuple[str, ...]:
    """The SQL models downstream of the shadowed inputs, in dependency order."""
    project = load_project(sql_dir)
    down = set(SHADOWED_INPUTS)
    ordered = []
    for name, model in project.items():
        if name in down:
            continue
        if any(ref in down for ref in model.refs):
            down.add(name)
            ordered.append(name)
    return tuple(ordered)


def _exists(con, table: str) -> bool:
    return bool(con.execute("select count(*) from duckdb_tables() where database_name = $db and table_name = $t",
                            {"db": ATTACHED, "t": table}).fetchone()[0])


@contextmanager
def attached(warehouse_path: str | Path, memory_limit: str = "4GB") -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the warehouse attached read-only behind it."""
    path = Path(warehouse_path)
    if not path.exists():
        raise ScanError(f"no warehouse at {path}: the daily scan has never run")
    con = duckdb.connect(":memory:", config={"memory_limit": memory_limit})
    try:
        try:
            con.execute(f"attach {_literal(str(path))} as {ATTACHED} (read_only)")
        except duckdb.Error as exc:
            raise ScanError(f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from None
        con.execute("use memory")
        con.execute(f"set search_path = 'memory.main,{ATTACHED}.main'")
        yield con
    finally:
        con.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def newest_session(con, on_or_before: date) -> date | None:
    """The newest session the daily scan valued (on or before the latest closed session): the
    book the event's prices revalue."""
    if not _exists(con, "int_scanned_accounts"):
        return None
    return con.execute(f"select max(as_of) from {ATTACHED}.main.int_scanned_accounts where as_of <= $day",
                       {"day": on_or_before}).fetchone()[0]


def _shadow(con, table: str, as_of: date, keep_previous: bool) -> None:
    """An empty shadow of `table` (its columns), or with the session before's rows."""
    name = quote_identifier(table)
    source = f"{ATTACHED}.main.{name}"
    if not _exists(con, table):
        return  # written for the first time here: created in memory by its writer
    if keep_previous:
        con.execute(f"create or replace table memory.main.{name} as select * from {source} "
                    f"where as_of = (select max(as_of) from {source} where as_of < $as_of)", {"as_of": as_of})
    else:
        con.execute(f"create or replace table memory.main.{name} as select * from {source} limit 0")


def event_closes(con, as_of: date, prices: Mapping[str, Decimal]) -> dict[str, int]:
    """Shadow stg_feed_prices: the session's closes with the event's prices in their place.
    Returns counts: symbols repriced, symbols the event priced that the session has no close for
    (left out: a price without a security is no valuation)."""
    source = f"{ATTACHED}.main.stg_feed_prices"
    con.execute(f"create or replace table memory.main.stg_feed_prices as select * from {source} "
                f"where as_of >= (select coalesce(max(as_of), $as_of) from {source} where as_of < $as_of)",
                {"as_of": as_of})
    event = pl.DataFrame({"symbol": list(prices), "price": [str(p) for p in prices.values()]},
                         schema={"symbol": pl.String, "price": pl.String})
    con.register("__event_prices", event.to_arrow())
    try:
        repriced = con.execute("select count(*) from memory.main.stg_feed_prices p join __event_prices e "
                               "using (symbol) where p.as_of = $as_of", {"as_of": as_of}).fetchone()[0]
        con.execute("update memory.main.stg_feed_prices p set close = cast(e.price as decimal(18, 8)) "
                    "from __event_prices e where p.symbol = e.symbol and p.as_of = $as_of", {"as_of": as_of})
    finally:
        con.unregister("__event_prices")
    return {"repriced": int(repriced), "unknown": len(prices) - int(repriced)}


def scan(con, sql_dir: Path, as_of: date, policy, prices: Mapping[str, Decimal],
         overrides: pl.DataFrame | None = None) -> dict:
    """Value the session `as_of` at `prices` and propose trades, all in shadows (see the module
    docstring). Returns counts for the run's metadata; the day's tables are readable from `con`."""
    if not _exists(con, "stg_feed_prices"):
        raise ScanError("the warehouse has no prices: the daily scan has never run")
    counts = event_closes(con, as_of, prices)
    frame = policy.bands_frame().with_columns(as_of=as_of)
    con.register("__policy", frame.to_arrow())
    try:
        con.execute("create or replace table memory.main.drift_policy as select * from __policy")
    finally:
        con.unregister("__policy")
    project = load_project(sql_dir)
    for name in shadowed_models(sql_dir):
        _shadow(con, name, as_of, keep_previous=True)
        materialize_model(con, project[name], as_of)
    for name in proposals.OUTPUT_TABLES:
        _shadow(con, name, as_of, keep_previous=False)
    outcome = proposals.propose_trades(con, as_of, policy, overrides)
    alerts = con.execute("select count(*) from drift_alerts where as_of = $as_of and status = 'alert'",
                         {"as_of": as_of}).fetchone()[0]
    scanned = con.execute("select count(*) from int_scanned_accounts where as_of = $as_of and not suspended",
                          {"as_of": as_of}).fetchone()[0]
    return {**counts, "accounts_scanned": int(scanned), "alerts": int(alerts),
            "recommendations": outcome.recommendations.height, "trades": outcome.trades.height}


def recommendation_ids(con, as_of: date) -> list[str]:
    return [r for (r,) in con.execute("select recommendation_id from trade_recommendations where as_of = $as_of "
                                      "order by recommendation_id", {"as_of": as_of}).fetchall()]
