"""From an approval that passed the gate to its orders (the hand-off to execution/, issue #12).

`order_tickets` reads the hand-off from the workflow store only (the decision, its `passed` gate
verdict and the trades it approved: `gate.passed_trades`; outbox/approved/<id>.json is a copy
for people and is never read back), then the reference data of the gate's trading day from the
warehouse (stg_feed_securities, stg_feed_accounts, latest as_of on or before it), and builds the
orders and blocks placed at the gate's time, each routed `staged` or `submitted`
(execution/submit.py). Outcomes:
  OrderTickets with tickets        the orders, ready for `submit.stage_and_submit`
  OrderTickets without tickets     the warehouse has no reference tables at all (never built by
                                   the daily scan): nothing is ticketed, the hand-off stays for the desk
  OrderTickets, orders_done > 0    a re-run for a decision every order of which an earlier run
                                   staged or submitted (submit.orders_all_done: none pending), whose orders
                                   can no longer be rebuilt (the day re-scanned without the account
                                   or symbol): nothing is left to do, so nothing is refused
  WarehouseUnreadable              the warehouse cannot be read now (e.g. a write lock): try again
  TicketsRefused                   a trade that cannot be an order (no reference data for its symbol
                                   or account, a bond, a fractional quantity of a whole-share
                                   security), or no passed hand-off: fix the feed, then re-execute.
                                   Its message shows the accounts masked (core/pii.py).

`release_tickets` does the same for the decisions of a market-event batch release (issue #16),
each of which the caller has gated first: their hand-offs read in one store transaction, the
reference data of the release's trading day (the New York date of its placement time, the
latest gate time: `submit.release_placed_at`) read once for all of them, one set of tickets
(`submit.build_release_tickets`: blocks span decisions) labelled by the release id. The same
outcomes, with OrderTickets.decision_id the release id and `approved` the decisions' records;
`orders_done` counts the release's orders when every one left already
(`submit.release_orders_all_done`); a refusal names the release and the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Sequence

import duckdb

from rebal_pipeline.core.pii import masker
from rebal_pipeline.execution import submit
from rebal_pipeline.tickets import TicketError
from rebal_pipeline.workflow import gate
from rebal_pipeline.workflow.store import WorkflowStore


class WarehouseUnreadable(RuntimeError):
    """The warehouse could not be read now; the message names the DuckDB error."""


class TicketsRefused(ValueError):
    """No orders can be built for the decision; the message says why, accounts masked."""


@dataclass(frozen=True)
class OrderTickets:
    decision_id: str
    approved: Any  # submit.load_approved_decision's record (gate_checked_at: when orders are placed);
    # for a release, a tuple of them, by decision id (submit.release_placed_at: when orders are placed)
    reference_day: date
    tickets: submit.Tickets | None  # None: the warehouse has no reference tables, or orders_done
    orders_done: int = 0  # > 0: every order was staged or submitted by an earlier run


def _reference(connect: Callable[[], Any], trades: Sequence, day: date):
    """(securities, accounts) of the trades on `day` from the warehouse, or None when it has no
    reference tables at all (never built by the daily scan)."""
    try:
        with connect() as con:
            if not submit.has_reference_tables(con):
                return None
            return submit.read_reference(con, {t.symbol for t in trades}, {t.account_id for t in trades}, day)
    except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock: re-execute later
        raise WarehouseUnreadable(f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from None


def order_tickets(store: WorkflowStore, connect: Callable[[], Any], decision_id: str, *, auto_submit: bool,
                  desk_id: str) -> OrderTickets:
    """The orders of a decision that passed the gate (`connect`: opens the warehouse as a
    context manager). `auto_submit` and `desk_id` are the run's settings
    (REBAL_AUTO_SUBMIT_DISCRETIONARY, REBAL_TRADING_DESK_ID: `submit.auto_submit_discretionary`,
    `submit.trading_desk_id`), given by the caller: nothing here reads the environment."""
    trades: list = []  # (the accounts an error names are masked in the refusal)
    approved, day = None, None
    try:
        with store.begin() as conn:
            approved = submit.load_approved_decision(conn, decision_id)
            try:
                _handoff, trades = gate.passed_trades(conn, decision_id)
            except gate.GateCannotCheck as exc:
                raise submit.ExecutionError(str(exc)) from None
        day = submit.trading_day(approved.gate_checked_at)
        reference = _reference(connect, trades, day)
        if reference is None:
            return OrderTickets(decision_id, approved, day, None)
        securities, accounts = reference
        tickets = submit.build_tickets(approved, trades, securities, accounts,
                                       auto_submit=auto_submit, desk_id=desk_id)
    except (TicketError, submit.ExecutionError) as exc:
        if approved is not None:
            with store.begin() as conn:
                done = submit.orders_all_done(conn, decision_id)
            if done:  # a re-run after the day was re-scanned: the orders left already, exactly once
                return OrderTickets(decision_id, approved, day, None, orders_done=done)
        raise TicketsRefused(f"decision {decision_id}: no orders staged or submitted: "
                             f"{masker(t.account_id for t in trades)(str(exc))}") from None
    return OrderTickets(decision_id, approved, day, tickets)


def release_tickets(store: WorkflowStore, connect: Callable[[], Any], release_id: str, decision_ids: Sequence[str], *,
                    auto_submit: bool, desk_id: str) -> OrderTickets:
    """The orders of a release: `decision_ids` are its decisions, each passed by the gate (the
    caller gates them first; one that did not pass refuses the whole release). `connect`,
    `auto_submit` and `desk_id` as for `order_tickets`. OrderTickets.decision_id is the release
    id; `tickets.covers` the decisions."""
    trades: dict[str, list] = {}
    approved: list[submit.ApprovedDecision] = []
    named: set[str] = set()  # the accounts an error may name: masked in the refusal
    ids = sorted(decision_ids)
    day = None
    try:
        if not ids:
            raise submit.ExecutionError("the release covers no decision")
        with store.begin() as conn:
            for decision_id in ids:
                try:
                    one = submit.load_approved_decision(conn, decision_id)
                    named.update(one.package.account_ids)
                    _handoff, trades[decision_id] = gate.passed_trades(conn, decision_id)
                    named.update(t.account_id for t in trades[decision_id])
                except (gate.GateCannotCheck, submit.ExecutionError) as exc:
                    # Every refusal names the decision (most of these messages do already).
                    reason = str(exc) if decision_id in str(exc) else f"decision {decision_id}: {exc}"
                    raise submit.ExecutionError(reason) from None
                approved.append(one)
        day = submit.trading_day(submit.release_placed_at(approved))
        reference = _reference(connect, [t for mine in trades.values() for t in mine], day)
        if reference is None:
            return OrderTickets(release_id, tuple(approved), day, None)
        securities, accounts = reference
        tickets = submit.build_release_tickets(release_id, approved, trades, securities, accounts,
                                               auto_submit=auto_submit, desk_id=desk_id)
    except (TicketError, submit.ExecutionError) as exc:
        if approved and len(approved) == len(ids):
            with store.begin() as conn:
                done = submit.release_orders_all_done(conn, ids)
            if done:  # a re-run after the day was re-scanned: the orders left already, exactly once
                return OrderTickets(release_id, tuple(approved), day, None, orders_done=done)
        raise TicketsRefused(f"release {release_id}: no orders staged or submitted: "
                             f"{masker(named)(str(exc))}") from None
    return OrderTickets(release_id, tuple(approved), day, tickets)
