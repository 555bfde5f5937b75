"""One account, one ledger: the orders rebal has placed for an account and not yet seen filled.

Plain functions over a SQLAlchemy connection (the caller's transaction), like lifecycle.py. The
ledger is written by the approval gate (workflow/gate.py) in the transaction that records its
verdict, so an approval and the orders it commits the account to can never be seen apart.

Tables (schema.py, migration 0003): `wf_order_sets` (one per decision and account) and
`wf_ledger_orders` (its lines: one per account, symbol and side). `wf_submissions` keeps the
files' exactly-once protocol (execution/submit.py); the ledger keeps what the account owes.

Invariants (tested in rebal_pipeline_tests/approvals/test_execution_properties.py):
  L1. At most one order set per account and as-of date, whatever is re-run, re-published or
      decided again: the unique key `uq_wf_order_sets_account_as_of` enforces it in the store (a
      cancelled set keeps its date: after a cancel the next day's scan recommends again). One
      order set is one set of orders and one client confirmation for the account that day.
  L2. An order line is `open` from the gate's pass until a later day's holdings show it filled
      or the desk cancels it (`cancel`, `rebal orders-cancel`). Nothing else closes it.
  L3. The fill rule: a line starts from `base_quantity`, the account's position in the symbol
      that the gate expected once the account's earlier open lines fill (the latest holdings,
      minus the unfilled part of earlier open sells, plus that of earlier open buys). On holdings
      of a date after the line's `base_as_of`, the line has moved by (base − held) for a sell and
      (held − base) for a buy; it is filled when it has moved by its whole quantity (a fund
      bought by dollar amount at NAV: 95% of the estimated shares, since its NAV is struck after
      the order). Holdings of the base date or earlier never fill anything (an older day's
      re-run cannot release an account). A position that moved for another reason (a transfer,
      a trade placed by hand) counts as movement: the rule reads positions, not the custodian's
      execution reports.
  L4. What open lines claim (`reserved`): the unfilled part of each open sell's shares, and the
      unfilled part of every open line's cash (sell proceeds minus buy costs at their estimated
      prices). The gate checks a decision against the latest holdings net of that claim, for every
      open line of the account from any decision of any day, rebalance and harvest alike.
  L5. The gate serialises per account (`lock_accounts`): on Postgres a `SELECT ... FOR UPDATE` of
      the account's row in `wf_account_locks`, taken in account order (no deadlock between two
      household gates); on SQLite the store's BEGIN IMMEDIATE already makes every write
      transaction exclusive. Two gates of one account therefore never both pass on one view.
  L6. The end of the story (`record_outcome`): a recommendation whose orders are all submitted,
      or staged and confirmed by the desk (or seen filled), is `executed`; all of them cancelled
      → `cancelled`; some cancelled and the rest executed → `partially_executed`. Each change
      appends its audit event in the same transaction.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from typing import Iterable

from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import PackageTrade, Reserved
from rebal_pipeline.workflow.schema import (
    account_locks, ledger_orders, order_sets, recommendations, submissions, users,
)

OPEN, FILLED, CANCELLED, PARTIALLY_FILLED = "open", "filled", "cancelled", "partially_filled"
# A fund bought by dollar amount is filled at a NAV struck after the order: the shares it buys
# may differ from the estimate by the day's move.
NAV_FILL_SHARE = 0.95
_EPS = 1e-9
DESK_ROLES = ("trading_desk", "operations")
FUNDS_AT_NAV = ("mutual_fund", "money_market")
APPROVED_STATES = ("approved", "modified", "auto_approved")
OUTCOMES = ("executed", "partially_executed", "cancelled")

Positions = dict[tuple[str, str], float]


class LedgerError(Exception):
    """A ledger action the store refuses (the message says why, in plain words)."""


def _day(value) -> date:
    return value if isinstance(value, date) and not isinstance(value, datetime) else date.fromisoformat(str(value)[:10])


# ---------------------------------------------------------------------------------------------
# Serialising gates per account (L5)
# ---------------------------------------------------------------------------------------------


def lock_accounts(conn: Connection, account_ids: Iterable[str]) -> None:
    """Hold the accounts' lock rows until the caller's transaction ends (see L5)."""
    wanted = sorted(set(account_ids))
    if not wanted:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(account_locks).values([{"account_id": a} for a in wanted])
                     .on_conflict_do_nothing(index_elements=["account_id"]))
        conn.execute(select(account_locks.c.account_id).where(account_locks.c.account_id.in_(wanted))
                     .order_by(account_locks.c.account_id).with_for_update())
        return
    # SQLite: the transaction is BEGIN IMMEDIATE (store.py), exclusive for writers already; the
    # rows are kept so the table lists every account a gate has checked.
    present = set(conn.execute(select(account_locks.c.account_id).where(
        account_locks.c.account_id.in_(wanted))).scalars())
    missing = [{"account_id": a} for a in wanted if a not in present]
    if missing:
        conn.execute(insert(account_locks), missing)


# ---------------------------------------------------------------------------------------------
# Reading the ledger
# ---------------------------------------------------------------------------------------------


def open_lines(conn: Connection, account_ids: Iterable[str]) -> list[dict]:
    """The open lines of these accounts, oldest order set first."""
    wanted = sorted(set(account_ids))
    if not wanted:
        return []
    rows = conn.execute(
        select(ledger_orders, order_sets.c.as_of, order_sets.c.opened_at, order_sets.c.recommendation_id)
        .join(order_sets, and_(order_sets.c.decision_id == ledger_orders.c.decision_id,
                               order_sets.c.account_id == ledger_orders.c.account_id))
        .where(and_(ledger_orders.c.account_id.in_(wanted), ledger_orders.c.state == OPEN))
        .order_by(order_sets.c.opened_at, ledger_orders.c.decision_id, ledger_orders.c.account_id,
                  ledger_orders.c.symbol, ledger_orders.c.side)
    ).mappings().all()
    return [dict(r) for r in rows]


def accounts_with_open_orders(conn: Connection, account_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
    """account → the decisions whose order sets are still open (all accounts when None)."""
    query = select(order_sets.c.account_id, order_sets.c.decision_id).where(order_sets.c.state == OPEN)
    if account_ids is not None:
        wanted = sorted(set(account_ids))
        if not wanted:
            return {}
        query = query.where(order_sets.c.account_id.in_(wanted))
    found: dict[str, list[str]] = defaultdict(list)
    for row in conn.execute(query.order_by(order_sets.c.account_id, order_sets.c.decision_id)):
        found[row.account_id].append(row.decision_id)
    return dict(found)


def order_sets_on(conn: Connection, account_ids: Iterable[str], as_of: date) -> dict[str, dict]:
    """account → its order set of this as-of date (any state), for the accounts that have one."""
    wanted = sorted(set(account_ids))
    if not wanted:
        return {}
    rows = conn.execute(select(order_sets).where(and_(order_sets.c.account_id.in_(wanted),
                                                      order_sets.c.as_of == as_of))).mappings().all()
    return {r["account_id"]: dict(r) for r in rows}


def _moved(line: dict, held: float) -> float:
    return (line["base_quantity"] - held) if line["side"] == "sell" else (held - line["base_quantity"])


def _unfilled(line: dict, positions_as_of: date | None, positions: Positions | None) -> float:
    """The part of an open line not yet seen in the positions (all of it on positions of its base
    date or earlier)."""
    if positions is None or positions_as_of is None or positions_as_of <= _day(line["base_as_of"]):
        return float(line["quantity"])
    moved = _moved(line, positions.get((line["account_id"], line["symbol"]), 0.0))
    return float(line["quantity"]) - min(max(moved, 0.0), float(line["quantity"]))


def reserved(conn: Connection, account_ids: Iterable[str], positions_as_of: date | None = None,
             positions: Positions | None = None) -> Reserved:
    """What the accounts' open lines still claim (L4), measured on these positions."""
    sells: dict[tuple[str, str], float] = defaultdict(float)
    cash: dict[str, float] = defaultdict(float)
    for line in open_lines(conn, account_ids):
        left = _unfilled(line, positions_as_of, positions)
        if line["side"] == "sell":
            sells[(line["account_id"], line["symbol"])] += left
            cash[line["account_id"]] += left * line["est_price"]
        else:
            cash[line["account_id"]] -= left * line["est_price"]
    return Reserved(sells=dict(sells), cash=dict(cash))


# ---------------------------------------------------------------------------------------------
# Fills (L2, L3)
# ---------------------------------------------------------------------------------------------


def record_fills(conn: Connection, positions_as_of: date, positions: Positions, account_ids: Iterable[str],
                 now: datetime) -> list[tuple[str, str]]:
    """Close the open lines these holdings show filled (L3), and the order sets left with no open
    line. `positions` must hold every position of each account in `account_ids` (a symbol
    absent is 0). Returns the (decision, account) order sets this call closed."""
    now = _utc(now)
    positions_as_of = _day(positions_as_of)
    lines = open_lines(conn, account_ids)
    touched: set[tuple[str, str]] = set()
    for line in lines:
        if positions_as_of <= _day(line["base_as_of"]):
            continue
        share = NAV_FILL_SHARE if line["fund_at_nav"] else 1.0
        moved = _moved(line, positions.get((line["account_id"], line["symbol"]), 0.0))
        if moved + _EPS < line["quantity"] * share:
            continue
        conn.execute(update(ledger_orders).where(and_(
            ledger_orders.c.decision_id == line["decision_id"], ledger_orders.c.account_id == line["account_id"],
            ledger_orders.c.symbol == line["symbol"], ledger_orders.c.side == line["side"],
            ledger_orders.c.state == OPEN)).values(
            state=FILLED, filled_on=positions_as_of, closed_at=now, closed_by="rebal:positions",
            close_reason=f"holdings of {positions_as_of.isoformat()} moved {moved:g} from {line['base_quantity']:g}"))
        touched.add((line["decision_id"], line["account_id"]))
    closed = _close_sets(conn, touched, now, "rebal:positions", f"holdings of {positions_as_of.isoformat()}")
    for decision_id in sorted({d for d, _ in touched}):
        record_outcome(conn, decision_id, now)
    return closed


def _close_sets(conn: Connection, keys: set[tuple[str, str]], now: datetime, actor: str, why: str) -> list[tuple[str, str]]:
    closed = []
    for decision_id, account_id in sorted(keys):
        states = set(conn.execute(select(ledger_orders.c.state).where(and_(
            ledger_orders.c.decision_id == decision_id, ledger_orders.c.account_id == account_id))).scalars())
        if OPEN in states:
            continue
        state = FILLED if states == {FILLED} else CANCELLED if states == {CANCELLED} else PARTIALLY_FILLED
        done = conn.execute(update(order_sets).where(and_(
            order_sets.c.decision_id == decision_id, order_sets.c.account_id == account_id,
            order_sets.c.state == OPEN)).values(state=state, closed_at=now, closed_by=actor, close_reason=why))
        if done.rowcount:
            audit.append(conn, f"order_set_{state}:{decision_id}:{account_id}", f"order_set_{state}", actor, now,
                         decision_id, {"account_id": account_id, "reason": why})
            closed.append((decision_id, account_id))
    return closed


# ---------------------------------------------------------------------------------------------
# Opening an order set (the gate, after it passed a decision)
# ---------------------------------------------------------------------------------------------


def open_order_set(conn: Connection, decision_id: str, rec: dict, trades: list[PackageTrade],
                   positions_as_of: date, positions: Positions, now: datetime) -> None:
    """Open one order set per account of the trades, with a line per (account, symbol, side).
    Call it under `lock_accounts`, after the trades were checked net of `reserved`. Raises
    IntegrityError if an order set of the account and as-of date exists (L1)."""
    now = _utc(now)
    positions_as_of = _day(positions_as_of)
    earlier = open_lines(conn, {t.account_id for t in trades})
    pending: dict[tuple[str, str, str], float] = defaultdict(float)
    for line in earlier:
        pending[(line["account_id"], line["symbol"], line["side"])] += _unfilled(line, positions_as_of, positions)
    lines: dict[tuple[str, str, str], dict] = {}
    for t in trades:
        key = (t.account_id, t.symbol, t.side)
        line = lines.setdefault(key, {"quantity": 0.0, "value": 0.0, "fund_at_nav": False})
        line["quantity"] += t.quantity
        line["value"] += t.quantity * t.est_price
        line["fund_at_nav"] |= bool(t.side == "buy" and t.fractional and t.security_type in FUNDS_AT_NAV)
    for account_id in sorted({a for a, _, _ in lines}):
        conn.execute(insert(order_sets).values(
            decision_id=decision_id, account_id=account_id, recommendation_id=rec["recommendation_id"],
            as_of=_day(rec["as_of"]), kind=rec["kind"], positions_as_of=positions_as_of, state=OPEN, opened_at=now))
    rows = []
    for (account_id, symbol, side), line in sorted(lines.items()):
        held = positions.get((account_id, symbol), 0.0)
        expected = (held - pending[(account_id, symbol, "sell")] + pending[(account_id, symbol, "buy")])
        rows.append({"decision_id": decision_id, "account_id": account_id, "symbol": symbol, "side": side,
                     "quantity": line["quantity"], "est_price": line["value"] / line["quantity"],
                     "fund_at_nav": line["fund_at_nav"], "base_quantity": expected, "base_as_of": positions_as_of,
                     "state": OPEN})
    if rows:
        conn.execute(insert(ledger_orders), rows)
    for account_id in sorted({a for a, _, _ in lines}):
        audit.append(conn, f"order_set_opened:{decision_id}:{account_id}", "order_set_opened", "rebal:approval_gate",
                     now, rec["recommendation_id"], {
                         "decision_id": decision_id, "account_id": account_id, "as_of": _day(rec["as_of"]),
                         "positions_as_of": positions_as_of,
                         "lines": [{"symbol": r["symbol"], "side": r["side"], "quantity": r["quantity"]}
                                   for r in rows if r["account_id"] == account_id]})


# ---------------------------------------------------------------------------------------------
# Cancelling (the desk) and the recommendation's outcome (L6)
# ---------------------------------------------------------------------------------------------


def cancel(conn: Connection, decision_id: str, user_id: str, reason: str, now: datetime) -> int:
    """The trading desk cancels a decision's staged orders (and the lines never ticketed): their
    ledger lines close as cancelled, which releases the account. Only an active trading-desk or
    operations user may; submitted orders (at the custodian) and staged orders the desk confirmed
    placing cannot be cancelled here. Returns the lines cancelled (0: nothing left to cancel)."""
    now = _utc(now)
    if not (reason and reason.strip()):
        raise LedgerError("a cancellation needs a reason")
    user = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().first()
    if user is None or not user["active"] or user["role"] not in DESK_ROLES:
        raise LedgerError(f"{user_id} is not an active trading-desk or operations user")
    lines = conn.execute(select(ledger_orders).where(ledger_orders.c.decision_id == decision_id)).mappings().all()
    if not lines:
        raise LedgerError(f"no orders for decision {decision_id}")
    placed = conn.execute(select(submissions).where(submissions.c.decision_id == decision_id)).mappings().all()
    by_line: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in placed:
        by_line[(row["account_id"], row["symbol"], row["side"])].append(dict(row))
    blocked, todo = [], []
    for line in lines:
        if line["state"] != OPEN:
            continue
        orders = by_line.get((line["account_id"], line["symbol"], line["side"]), [])
        gone = [o for o in orders if o["channel"] == "submitted" or o["status"] == "executed"]
        if gone:
            blocked.append(f"{line['account_id']} {line['side']} {line['symbol']}")
        else:
            todo.append(line)
    if not todo:
        if blocked:
            raise LedgerError(f"decision {decision_id}: {', '.join(blocked)} were submitted to the custodian or "
                              "confirmed placed; they cannot be cancelled here (cancel them at the custodian)")
        return 0
    for line in todo:
        conn.execute(update(ledger_orders).where(and_(
            ledger_orders.c.decision_id == decision_id, ledger_orders.c.account_id == line["account_id"],
            ledger_orders.c.symbol == line["symbol"], ledger_orders.c.side == line["side"],
            ledger_orders.c.state == OPEN)).values(state=CANCELLED, closed_at=now, closed_by=user_id,
                                                   close_reason=reason))
        conn.execute(update(submissions).where(and_(
            submissions.c.decision_id == decision_id, submissions.c.account_id == line["account_id"],
            submissions.c.symbol == line["symbol"], submissions.c.side == line["side"],
            submissions.c.channel == "staged", submissions.c.status.in_(("pending", "done"))))
            .values(status="cancelled", completed_at=now))
    rec_id = conn.execute(select(order_sets.c.recommendation_id).where(order_sets.c.decision_id == decision_id)
                          .limit(1)).scalar_one()
    audit.append(conn, f"orders_cancelled:{decision_id}:{now.isoformat()}", "orders_cancelled", user_id, now, rec_id, {
        "decision_id": decision_id, "reason": reason, "not_cancellable": blocked,
        "lines": [{"account_id": l["account_id"], "symbol": l["symbol"], "side": l["side"],
                   "quantity": l["quantity"]} for l in todo]})
    _close_sets(conn, {(decision_id, l["account_id"]) for l in todo}, now, user_id, reason)
    record_outcome(conn, decision_id, now)
    return len(todo)


def record_outcome(conn: Connection, decision_id: str, now: datetime) -> str | None:
    """Move the decision's recommendation to its outcome (L6) when its orders say so. Returns the
    outcome recorded by this call (None: not yet, or already)."""
    now = _utc(now)
    lines = conn.execute(select(ledger_orders).where(ledger_orders.c.decision_id == decision_id)).mappings().all()
    if not lines:
        return None
    placed = conn.execute(select(submissions).where(submissions.c.decision_id == decision_id)).mappings().all()
    by_line: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in placed:
        by_line[(row["account_id"], row["symbol"], row["side"])].append(dict(row))

    def executed(line) -> bool:
        if line["state"] == FILLED:
            return True
        orders = by_line.get((line["account_id"], line["symbol"], line["side"]), [])
        return bool(orders) and all((o["channel"] == "submitted" and o["status"] == "done") or o["status"] == "executed"
                                    for o in orders)

    cancelled = [l for l in lines if l["state"] == CANCELLED]
    done = [l for l in lines if l["state"] != CANCELLED and executed(l)]
    if len(cancelled) == len(lines):
        outcome = "cancelled"
    elif len(cancelled) + len(done) < len(lines):
        return None
    else:
        outcome = "partially_executed" if cancelled else "executed"
    rec_id = conn.execute(select(order_sets.c.recommendation_id).where(order_sets.c.decision_id == decision_id)
                          .limit(1)).scalar_one()
    changed = conn.execute(update(recommendations).where(and_(
        recommendations.c.recommendation_id == rec_id,
        recommendations.c.status.in_((*APPROVED_STATES, "executed", "partially_executed")),
        recommendations.c.status != outcome)).values(status=outcome, updated_at=now))
    if changed.rowcount != 1:
        return None
    audit.append(conn, f"recommendation_{outcome}:{rec_id}:{decision_id}", f"recommendation_{outcome}",
                 "rebal:ledger", now, rec_id, {"decision_id": decision_id, "lines": len(lines),
                                               "cancelled": len(cancelled)})
    return outcome


__all__ = [
    "CANCELLED", "FILLED", "LedgerError", "OPEN", "PARTIALLY_FILLED", "accounts_with_open_orders", "cancel",
    "lock_accounts", "open_lines", "open_order_set", "order_sets_on", "record_fills", "record_outcome", "reserved",
    "IntegrityError",
]
