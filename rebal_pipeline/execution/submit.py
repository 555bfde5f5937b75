"""The orders of an approved decision, staged for the trading desk or submitted, exactly once.

Where an order goes (its channel):
  - staged: the default. The trading desk receives a FIX 4.4 NewOrderSingle file and the
    custodian-style order file(s) in one folder per decision,
        <outbox>/staged/<decision_id>/orders.fix, <custodian>_orders_<YYYYMMDD>.<csv|txt>
    and places the orders itself (`placed_by` = the desk: REBAL_TRADING_DESK_ID, default
    "trading_desk").
  - submitted: an order of a discretionary account when REBAL_AUTO_SUBMIT_DISCRETIONARY=true
    (default false). "Submitting" is delivering the custodian-style order file to the
    custodian's drop folder,
        <outbox>/submitted/<custodian>/<custodian>_orders_<YYYYMMDD>_<decision_id>.<csv|txt>
    (`placed_by` = "rebal:execute_rebalance"). The upload from that folder to the custodian
    (SFTP with a pinned host key, or its OAuth API) is issue #7 and not built yet: today the
    drop folder is where submission ends. A discretionary order at a custodian rebal has no file
    layout for is staged instead (the desk sends it as FIX).

Exactly once per order (ClOrdID), across re-runs and crashes (the wf_submissions table):
  1. one transaction inserts a `pending` row per ClOrdID, with its channel and destination,
     before anything is written (a row already there is kept: `done` rows are skipped, `pending`
     ones are finished and must describe the same order, or nothing is written);
  2. each destination holding a pending order is written atomically and never overwritten (a
     dot-named temporary file or folder, fsynced, then a hard link / rename that fails instead of
     replacing): an identical file already there (a crash after step 2) is left as it is; a
     different one is an error;
  3. a second transaction per destination marks its rows `done` and appends one audit event per
     order (`ticket_staged:<ClOrdID>` / `order_submitted:<ClOrdID>`, idempotent by id) carrying
     the decision, account, symbol, side, quantity or amount, channel and the files' SHA-256.
A crash between 2 and 3 leaves `pending` rows and a complete file: the re-run finds the identical
file, writes nothing, and completes the rows and events. Readers of the outbox ignore dot-files; a
temporary left by a killed write (its writer held a lock on it, released when the process died) is
removed by the next write of the destination (`remove_abandoned_temps`), never renamed into place.
Orders the desk cancels (`rebal orders-cancel`, workflow/ledger.py) are marked `cancelled` and
never written again.

Determinism: the orders are built from the store's decision and package, the hand-off's
approved trades and the warehouse's reference data of the gate's trading day, placed at the
gate's time, so a re-run writes the same bytes; the FIX header comes from REBAL_FIX_* (keep them
unchanged between a crash and its re-run).

Releases (issue #16, market-event batch scans): the decisions of one batch release, each passed
by the gate, go out as ONE set of tickets (`build_release_tickets`) labelled by the release id
(`mev-YYYYMMDD-r<seq>`), which names the folder and files as a decision id does:
    <outbox>/staged/<release_id>/orders.fix, <custodian>_orders_<YYYYMMDD>.<csv|txt>
    <outbox>/submitted/<custodian>/<custodian>_orders_<YYYYMMDD>_<release_id>.<csv|txt>
`Tickets.covers` names the decisions. The invariants (tested in
rebal_pipeline_tests/execution/test_release_tickets.py, SQLite and Postgres):
  R1. Every approved trade of every covered decision is exactly one order, with the ClOrdID it
      has when the decision goes alone (ClOrdID = hash(decision|account|symbol|side)) and the
      same channel rule (`build_tickets`'); one wf_submissions row per order, under its own
      decision id.
  R2. Blocks are built once over all the release's orders (`build_blocks`): one block per
      custodian, advisor, symbol, side, channel and discretionary flag spans the accounts of
      several decisions; its allocations sum exactly to its quantity and share those fields.
  R3. Exactly once as for a decision: a re-run, or a crash between writing the files and marking
      them done, writes nothing new and ends with every order done once and one audit event per
      order.
  R4. The same decisions and trades in any order make identical tickets and identical bytes.
  R5. A decision goes out once, alone or in one release. After a release, the decision run
      alone finds every order done and writes nothing (a pending one is refused: it would be a
      different destination); a release covering a decision whose orders already left alone
      (or in another release) is refused before anything is recorded or written
      (`_record_pending`: an order recorded for another destination is never written into a
      new one).
  R6. The release's FIX file validates against the FIX 4.4 dictionary, blocks included.
The desk confirms a release it placed with `confirm_release_executed`.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

import duckdb
from pydantic import ValidationError
from sqlalchemy import Connection, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline import settings
from rebal_pipeline.core.write_once import fsync_dir, remove_abandoned_temps, temp_path, write_file_once
from rebal_pipeline.tickets.dialects import DIALECTS
from rebal_pipeline.tickets.fix import FixSession, encode_batch
from rebal_pipeline.tickets.orders import (
    AccountRef, ApprovalDecision, Order, SecurityRef, TicketBatch, TicketError, build_blocks, build_orders, fmt_cash,
    fmt_decimal,
)
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage
from rebal_pipeline.workflow.schema import decisions, recommendations, submissions
from rebal_pipeline.core.clock import utc as _utc

EXECUTOR = "rebal:execute_rebalance"
DEFAULT_TRADING_DESK = "trading_desk"
AUTO_SUBMIT_ENV = "REBAL_AUTO_SUBMIT_DISCRETIONARY"
TRADING_DESK_ENV = "REBAL_TRADING_DESK_ID"
STAGED, SUBMITTED = "staged", "submitted"
AUDIT_KIND = {STAGED: "ticket_staged", SUBMITTED: "order_submitted"}
FIX_FILE_NAME = "orders.fix"
TICKETS_FORMAT = "rebal.tickets/1"
REFERENCE_TABLES = ("stg_feed_securities", "stg_feed_accounts")
NEW_YORK = ZoneInfo("America/New_York")
# Decision ids (and release ids, mev-YYYYMMDD-r<seq>) name folders and files: nothing that could
# leave the outbox.
_SAFE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class ExecutionError(RuntimeError):
    """The orders cannot be staged or submitted as asked; nothing more is written (the reason says why)."""


def _typed(rebal_settings: settings.RebalSettings | Mapping[str, str]) -> settings.RebalSettings:
    """A RebalSettings as given, or the one a mapping of variables describes (settings.py is the one
    home of their rules; a malformed value is an ExecutionError naming the variable)."""
    if isinstance(rebal_settings, settings.RebalSettings):
        return rebal_settings
    try:
        return settings.load_settings(rebal_settings)
    except settings.SettingsError as exc:
        raise ExecutionError(str(exc)) from None


def auto_submit_discretionary(rebal_settings: settings.RebalSettings | Mapping[str, str]) -> bool:
    """REBAL_AUTO_SUBMIT_DISCRETIONARY: `true` submits discretionary accounts' orders, `false`
    (the default) stages them with the rest. Anything else is refused rather than guessed
    (RebalSettings' rule). `rebal_settings`: the run's settings (the op's execution resource), or
    a mapping of variables."""
    return _typed(rebal_settings).auto_submit_discretionary


def trading_desk_id(rebal_settings: settings.RebalSettings | Mapping[str, str]) -> str:
    """Who places staged orders (the 204-2 memo's "placed by"): REBAL_TRADING_DESK_ID, else the desk."""
    return (_typed(rebal_settings).trading_desk_id or "").strip() or DEFAULT_TRADING_DESK


def trading_day(moment: datetime) -> date:
    """The New York date of a moment: the as-of date whose reference data applies to it."""
    return _utc(moment).astimezone(NEW_YORK).date()


# ---------------------------------------------------------------------------------------------
# Inputs: the approved decision (workflow store) and the reference data (warehouse)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovedDecision:
    decision: ApprovalDecision
    package: RecommendationPackage
    gate_checked_at: datetime  # the orders' placement time: the same on every re-run


def load_approved_decision(conn: Connection, decision_id: str) -> ApprovedDecision:
    """The decision and its package, only if the approval gate passed it (a refused or unchecked
    decision stages and submits nothing)."""
    row = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
    if row is None:
        raise ExecutionError(f"no decision {decision_id} in the workflow store")
    if row["gate_verdict"] != "passed":
        raise ExecutionError(f"decision {decision_id} has gate verdict {row['gate_verdict'] or 'none'}, not passed: "
                             "nothing is staged or submitted")
    package = RecommendationPackage.model_validate_json(conn.execute(
        select(recommendations.c.package).where(recommendations.c.recommendation_id == row["recommendation_id"])
    ).scalar_one())
    decision = ApprovalDecision(decision_id=row["decision_id"], recommendation_id=row["recommendation_id"],
                                action=row["action"], actor_id=row["actor_id"], created_at=_utc(row["created_at"]),
                                via=row["via"])
    return ApprovedDecision(decision, package, _utc(row["gate_checked_at"]))


def has_reference_tables(con: duckdb.DuckDBPyConnection) -> bool:
    found = {name for (name,) in con.execute(
        "select table_name from information_schema.tables where list_contains($names, table_name)",
        {"names": list(REFERENCE_TABLES)}).fetchall()}
    return found == set(REFERENCE_TABLES)


def _latest(con: duckdb.DuckDBPyConnection, table: str, key: str, columns: list[str], keys: list[str],
            day: date) -> dict[str, tuple[date, set[tuple]]]:
    """Per key: the latest as_of on or before `day` that has it, and the distinct rows of that date."""
    rows = con.execute(
        f'select {key}, as_of, {", ".join(columns)} from "{table}" '
        f"where as_of <= $day and list_contains($keys, {key}) "
        f"qualify as_of = max(as_of) over (partition by {key})",
        {"day": day, "keys": keys},
    ).fetchall()
    found: dict[str, tuple[date, set[tuple]]] = {}
    for name, as_of, *values in rows:
        found.setdefault(name, (as_of, set()))[1].add(tuple(values))
    return found


def read_reference(con: duckdb.DuckDBPyConnection, symbols: Iterable[str], account_ids: Iterable[str],
                   day: date) -> tuple[dict[str, SecurityRef], dict[str, AccountRef]]:
    """SecurityRef / AccountRef of the trades from the staged feed (`stg_feed_securities`,
    `stg_feed_accounts`), each from the latest as-of date on or before `day` that has it.
    Missing ones are left out (build_orders names them); a key with two different rows on its
    date is refused (which one would the custodian get?)."""
    symbols, account_ids = sorted(set(symbols)), sorted(set(account_ids))
    account_columns = {c for (c,) in con.execute(
        "select column_name from information_schema.columns where table_name = 'stg_feed_accounts'").fetchall()}
    advisor = "advisor_override_id" if "advisor_override_id" in account_columns else "null"
    securities, accounts = {}, {}
    try:
        for symbol, (as_of, rows) in _latest(con, "stg_feed_securities", "symbol",
                                             ["cusip", "security_type", "fractional"], symbols, day).items():
            if len(rows) > 1:
                raise TicketError(f"{symbol}: {len(rows)} different security rows on {as_of} (stg_feed_securities)")
            cusip, security_type, fractional = rows.pop()
            securities[symbol] = SecurityRef(symbol=symbol, cusip=cusip or None, security_type=security_type,
                                             fractional=bool(fractional))
        for account_id, (as_of, rows) in _latest(con, "stg_feed_accounts", "account_id",
                                                 ["custodian", "discretionary", advisor], account_ids, day).items():
            if len(rows) > 1:
                raise TicketError(f"{account_id}: {len(rows)} different account rows on {as_of} (stg_feed_accounts)")
            custodian, discretionary, advisor_id = rows.pop()
            accounts[account_id] = AccountRef(account_id=account_id, custodian=custodian,
                                              discretionary=bool(discretionary), advisor_id=advisor_id or None)
    except ValidationError as exc:
        raise TicketError(f"reference data of {day} cannot make an order: "
                          + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    return securities, accounts


# ---------------------------------------------------------------------------------------------
# The tickets: orders, blocks and each order's channel
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tickets:
    """The orders of one run. `decision_id` is the label naming the outbox folder and files: the
    decision's id, or the release's id for a release, whose decisions `decision_ids` lists
    (sorted; empty for a single decision). Every order belongs to a decision it covers."""

    decision_id: str
    batch: TicketBatch
    channels: dict[str, str]  # cl_ord_id → staged | submitted
    decision_ids: tuple[str, ...] = ()  # the decisions a release covers; (): just decision_id

    def __post_init__(self) -> None:
        object.__setattr__(self, "decision_ids", tuple(self.decision_ids))  # a document carries a list
        # The exactly-once checks read the covered decisions' rows (`covers`): an order of any
        # other decision would escape them.
        strangers = sorted({o.decision_id for o in self.batch.orders} - set(self.covers))
        if strangers:
            raise ExecutionError(f"{self.decision_id}: orders of decision(s) {', '.join(strangers)} it does not "
                                 "cover")

    @property
    def covers(self) -> tuple[str, ...]:
        """The decisions whose orders these are: a release's decisions, or the one decision."""
        return self.decision_ids or (self.decision_id,)

    @property
    def is_release(self) -> bool:
        return bool(self.decision_ids)

    @property
    def label(self) -> str:
        """How messages name the run: "decision <id>" or "release <id>"."""
        return f"{'release' if self.is_release else 'decision'} {self.decision_id}"

    def to_document(self) -> dict:
        document = {"format": TICKETS_FORMAT, "decision_id": self.decision_id,
                    "batch": self.batch.model_dump(mode="json"), "channels": dict(sorted(self.channels.items()))}
        if self.decision_ids:  # a single decision's document stays as it always was
            document["decision_ids"] = list(self.decision_ids)
        return document

    @classmethod
    def from_document(cls, document: dict) -> Tickets:
        if document.get("format") != TICKETS_FORMAT:
            raise ExecutionError(f"not a {TICKETS_FORMAT} document")
        return cls(document["decision_id"], TicketBatch.model_validate(document["batch"]), dict(document["channels"]),
                   tuple(document.get("decision_ids") or ()))

    def count(self, channel: str) -> int:
        return sum(1 for c in self.channels.values() if c == channel)


def _routed_orders(approved: ApprovedDecision, trades: Iterable[PackageTrade], securities: Mapping[str, SecurityRef],
                   accounts: Mapping[str, AccountRef], *, auto_submit: bool, desk_id: str,
                   placed_at: datetime) -> tuple[list[Order], dict[str, str]]:
    """One decision's orders (not blocked yet) and each one's channel: a discretionary account's
    orders are submitted when auto-submit is on and its custodian has an order file layout;
    every other order is staged for the desk (placed by `desk_id`)."""
    trades = list(trades)

    def channel_of(trade: PackageTrade) -> str:
        account = accounts.get(trade.account_id)
        if auto_submit and account is not None and account.discretionary and account.custodian in DIALECTS:
            return SUBMITTED
        return STAGED

    orders: list[Order] = []
    channels: dict[str, str] = {}
    for channel, placed_by in ((STAGED, desk_id), (SUBMITTED, EXECUTOR)):
        mine = [t for t in trades if channel_of(t) == channel]
        built = build_orders(approved.package, mine, approved.decision, securities, accounts, placed_by=placed_by,
                             placed_at=placed_at)
        orders += built
        channels.update({o.cl_ord_id: channel for o in built})
    return orders, channels


def build_tickets(approved: ApprovedDecision, trades: Iterable[PackageTrade], securities: Mapping[str, SecurityRef],
                  accounts: Mapping[str, AccountRef], *, auto_submit: bool, desk_id: str) -> Tickets:
    """Orders for the approved trades, routed: a discretionary account's orders are submitted
    when auto-submit is on and its custodian has an order file layout; every other order is
    staged for the desk. Raises TicketError (nothing built) when any trade cannot be an order."""
    if not _SAFE_ID.fullmatch(approved.decision.decision_id):
        raise ExecutionError(f"{approved.decision.decision_id!r} cannot name an outbox folder")
    orders, channels = _routed_orders(approved, trades, securities, accounts, auto_submit=auto_submit,
                                      desk_id=desk_id, placed_at=approved.gate_checked_at)
    # Blocks never mix channels: build_blocks groups by placed_by and by discretionary.
    return Tickets(approved.decision.decision_id, build_blocks(orders), channels)


def release_placed_at(approved: Iterable[ApprovedDecision]) -> datetime:
    """When a release's orders are placed: the latest gate time of its decisions (see
    `build_release_tickets`)."""
    times = [a.gate_checked_at for a in approved]
    if not times:
        raise ExecutionError("a release covers at least one decision")
    return max(_utc(t) for t in times)


def build_release_tickets(release_id: str, approved: Sequence[ApprovedDecision],
                          trades: Mapping[str, Sequence[PackageTrade]], securities: Mapping[str, SecurityRef],
                          accounts: Mapping[str, AccountRef], *, auto_submit: bool, desk_id: str) -> Tickets:
    """One set of tickets for a release's decisions (each passed by the gate; `trades`: decision
    id → the trades it approved, `gate.passed_trades`), labelled `release_id`.

    Each decision's orders are built exactly as `build_tickets` builds them (the same ClOrdIDs,
    the same channel rule: R1), then blocked ONCE over all of them (`build_blocks`), so one
    block per custodian, advisor, symbol, side, channel and discretionary flag spans the
    accounts of several decisions (R2). The result does not depend on the order of `approved`
    or of any decision's trades (R4); `decision_ids` are sorted.

    Placement time: a block is one NewOrderSingle with one TransactTime(60) and its allocations
    share it (BlockOrder's rule), so the release has one placement time for all its orders: the
    latest gate time of its decisions — the moment the release's last gate passed, the earliest
    moment at which every order of the release had been re-verified (no order is placed before
    its own gate), and, a gate verdict being recorded once, the same on every re-run (so a re-run
    writes the same bytes: R3). The time the release run started would differ on every re-run.

    Refused (nothing built): a release id that cannot name an outbox folder or is also one of
    its decisions' ids, no decision, a decision listed twice, trades for a decision not in the
    release or none for one in it (ExecutionError); a trade that cannot be an order
    (TicketError naming the decision)."""
    if not _SAFE_ID.fullmatch(release_id):
        raise ExecutionError(f"{release_id!r} cannot name an outbox folder")
    approved = sorted(approved, key=lambda a: a.decision.decision_id)
    ids = [a.decision.decision_id for a in approved]
    if not ids:
        raise ExecutionError(f"release {release_id} covers no decision")
    twice = sorted({d for d in ids if ids.count(d) > 1})
    if twice:
        raise ExecutionError(f"release {release_id}: decision(s) {', '.join(twice)} listed twice")
    if release_id in ids:  # its folder would be the decision's own
        raise ExecutionError(f"release {release_id} has the id of one of its decisions")
    problems = []
    missing, strangers = sorted(set(ids) - set(trades)), sorted(set(trades) - set(ids))
    if missing:
        problems.append(f"no approved trades given for decision(s) {', '.join(missing)}")
    if strangers:
        problems.append(f"trades given for decision(s) {', '.join(strangers)} it does not cover")
    if problems:
        raise ExecutionError(f"release {release_id}: {'; '.join(problems)}")
    placed_at = release_placed_at(approved)
    orders: list[Order] = []
    channels: dict[str, str] = {}
    for one in approved:
        try:
            built, routed = _routed_orders(one, trades[one.decision.decision_id], securities, accounts,
                                           auto_submit=auto_submit, desk_id=desk_id, placed_at=placed_at)
        except TicketError as exc:
            raise TicketError(f"decision {one.decision.decision_id}: {exc}") from None
        orders += built
        channels.update(routed)
    return Tickets(release_id, build_blocks(orders), channels, decision_ids=tuple(ids))


# ---------------------------------------------------------------------------------------------
# Destinations: the files each channel writes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    channel: str
    path: str  # relative to the outbox, POSIX: staged/<decision_id> (a folder) or submitted/<custodian>/<file>
    files: dict[str, bytes]  # file name → content (a folder's files; a submitted file: one entry)
    cl_ord_ids: tuple[str, ...]

    @property
    def is_folder(self) -> bool:
        return self.channel == STAGED

    def file_path(self, name: str) -> str:
        return f"{self.path}/{name}" if self.is_folder else self.path

    @property
    def sha256(self) -> dict[str, str]:
        return {self.file_path(name): hashlib.sha256(data).hexdigest() for name, data in sorted(self.files.items())}


def _part(batch: TicketBatch, keep: set[str]) -> TicketBatch:
    """The orders of `keep` and the blocks they make up (a block is all in or all out)."""
    blocks = []
    for block in batch.blocks:
        inside = {o.cl_ord_id in keep for o in block.allocations}
        if inside == {True, False}:
            raise ExecutionError(f"block {block.block_id} would be split between staging and submission")
        if inside == {True}:
            blocks.append(block)
    return TicketBatch(orders=tuple(o for o in batch.orders if o.cl_ord_id in keep), blocks=tuple(blocks))


def _custodian_file(batch: TicketBatch, custodian: str) -> tuple[str, bytes]:
    """The custodian's order file, as `Dialect.write` writes it (csv module, UTF-8), in memory."""
    dialect = DIALECTS[custodian]
    part = batch.for_custodian(custodian)
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=dialect.delimiter, lineterminator=dialect.lineterminator).writerows(dialect.rows(part))
    return dialect.file_name(part), buffer.getvalue().encode("utf-8")


def destinations(tickets: Tickets, session: FixSession) -> list[Destination]:
    """The staged folder (FIX file + one order file per custodian with a layout) and one
    submitted file per custodian, with their bytes."""
    batch, decision_id = tickets.batch, tickets.decision_id
    found = []
    staged = {c for c, channel in tickets.channels.items() if channel == STAGED}
    if staged:
        part = _part(batch, staged)
        files = {FIX_FILE_NAME: b"".join(data + b"\n" for data in encode_batch(part, session))}
        for custodian in part.custodians:
            if custodian in DIALECTS:
                name, data = _custodian_file(part, custodian)
                files[name] = data
        found.append(Destination(STAGED, f"{STAGED}/{decision_id}", files, tuple(o.cl_ord_id for o in part.orders)))
    submitted = {c for c, channel in tickets.channels.items() if channel == SUBMITTED}
    if submitted:
        part = _part(batch, submitted)
        for custodian in part.custodians:
            name, data = _custodian_file(part, custodian)
            stem, dot, extension = name.rpartition(".")
            file_name = f"{stem}_{decision_id}{dot}{extension}"
            found.append(Destination(SUBMITTED, f"{SUBMITTED}/{custodian}/{file_name}", {file_name: data},
                                     tuple(o.cl_ord_id for o in part.for_custodian(custodian).orders)))
    return found


# ---------------------------------------------------------------------------------------------
# Writing once: a file (hard link) or a folder (rename), never replacing what is there
# ---------------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _folder_content(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if not p.name.startswith(".")}


def deliver(outbox: Path, destination: Destination) -> bool:
    """Write the destination unless it is there already. True: written by this call; False: an
    identical copy was there. Raises ExecutionError if something different is there. Temporary
    files of earlier, killed writes of the destination are removed first."""
    target = outbox / destination.path
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temps(target.parent, target.name)
    tmp = temp_path(target)
    lock = tmp.with_name(tmp.name + ".lock")
    try:
        if destination.is_folder:
            if not target.exists():
                with open(lock, "x") as guard:
                    fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
                    tmp.mkdir()
                    for name, data in destination.files.items():
                        _write_new(tmp / name, data)
                    fsync_dir(tmp)
                    try:
                        # rename() replaces only an empty folder; ours never is (checked above).
                        os.rename(tmp, target)
                        fsync_dir(target.parent)
                        return True
                    except OSError as exc:
                        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
            same = target.is_dir() and _folder_content(target) == destination.files
        else:
            [data] = destination.files.values()
            if write_file_once(target, data):
                return True
            same = target.is_file() and target.read_bytes() == data
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    if not same:
        raise ExecutionError(f"{destination.path} already exists with other content: it is never overwritten "
                             "(find out what changed since it was written)")
    return False


# ---------------------------------------------------------------------------------------------
# Exactly once: pending rows → file → done rows + audit events
# ---------------------------------------------------------------------------------------------

_COMPARED = ("decision_id", "recommendation_id", "account_id", "custodian", "symbol", "side", "quantity",
             "cash_amount", "block_id", "channel", "destination")


def _row(order: Order, channel: str, destination: Destination) -> dict:
    return {"cl_ord_id": order.cl_ord_id, "decision_id": order.decision_id,
            "recommendation_id": order.recommendation_id, "account_id": order.account_id,
            "custodian": order.custodian, "symbol": order.symbol, "side": order.side,
            "quantity": float(order.quantity) if order.quantity is not None else None,
            "cash_amount": float(order.cash_amount) if order.cash_amount is not None else None,
            "block_id": order.block_id, "channel": channel, "destination": destination.path}


@dataclass
class SubmissionOutcome:
    orders: int = 0
    completed: list[str] = field(default_factory=list)  # ClOrdIDs this call marked done
    already_done: list[str] = field(default_factory=list)  # ClOrdIDs done before this call
    written: list[str] = field(default_factory=list)  # destinations this call wrote
    found_written: list[str] = field(default_factory=list)  # destinations an earlier attempt had written
    events: int = 0  # audit events this call appended
    sha256: dict[str, str] = field(default_factory=dict)  # every file of the decision → its SHA-256


def _record_pending(conn: Connection, tickets: Tickets, wanted: dict[str, dict], now: datetime) -> dict[str, str]:
    """Step 1: a pending row per ClOrdID not recorded yet; the status of every one.

    Refused, in this transaction (so nothing is recorded) and before anything is written:
      - a row of a covered decision, or one recorded for a destination of this run, that is not
        among this run's orders (stray: the earlier attempt was another set of orders);
      - a pending row this run would make different (channel, destination, quantity, ...);
      - an order that left already (done, executed, cancelled) for another destination, when
        this run's destination for it is still to be written: writing it would send the order
        a second time (R5: a decision staged alone, then in a release, or the reverse)."""
    paths = sorted({row["destination"] for row in wanted.values()} | {f"{STAGED}/{tickets.decision_id}"})
    stray = conn.execute(select(submissions.c.cl_ord_id).where(and_(
        or_(submissions.c.decision_id.in_(list(tickets.covers)), submissions.c.destination.in_(paths)),
        submissions.c.cl_ord_id.notin_(list(wanted))))
    ).scalars().all()
    if stray:
        raise ExecutionError(f"{tickets.label}: orders {', '.join(sorted(stray))} were recorded by an "
                             "earlier attempt but are not among this run's orders: nothing written")
    status, recorded_at = {}, {}
    for cl_ord_id, row in wanted.items():
        existing = conn.execute(select(submissions).where(submissions.c.cl_ord_id == cl_ord_id)).mappings().first()
        if existing is None:
            try:
                with conn.begin_nested():
                    conn.execute(insert(submissions).values(**row, status="pending", created_at=now))
                status[cl_ord_id], recorded_at[cl_ord_id] = "pending", row["destination"]
                continue
            except IntegrityError:  # another run of the same decision got there first
                existing = conn.execute(select(submissions).where(submissions.c.cl_ord_id == cl_ord_id)
                                        ).mappings().one()
        if existing["status"] == "pending":
            differs = [f"{k} {existing[k]!r} → {row[k]!r}" for k in _COMPARED if existing[k] != row[k]]
            if differs:
                raise ExecutionError(
                    f"order {cl_ord_id} was recorded (pending) by an earlier attempt and this run would make it "
                    f"different ({'; '.join(differs)}): nothing written. Restore what changed (reference data, "
                    f"{AUTO_SUBMIT_ENV}) or settle the order by hand")
        status[cl_ord_id], recorded_at[cl_ord_id] = existing["status"], existing["destination"]
    to_write = {wanted[c]["destination"] for c, s in status.items() if s == "pending"}
    gone = sorted((recorded_at[c], c) for c, s in status.items() if s != "pending"
                  and recorded_at[c] != wanted[c]["destination"] and wanted[c]["destination"] in to_write)
    if gone:
        where = sorted({d for d, _ in gone})
        raise ExecutionError(
            f"{tickets.label}: orders {', '.join(c for _, c in gone)} already left for {', '.join(where)} "
            f"(decision(s) {', '.join(sorted({wanted[c]['decision_id'] for _, c in gone}))}); writing them into "
            f"{', '.join(sorted({wanted[c]['destination'] for _, c in gone}))} would send them again: nothing "
            "written. A decision goes out once, alone or in one release")
    return status


def orders_all_done(conn: Connection, decision_id: str) -> int:
    """How many orders an earlier run recorded for the decision, when none is still pending (0:
    none recorded, or some pending). Every order's row is written at once, pending, before any
    leaves (`stage_and_submit` step 1), so no pending row means every order was handled."""
    return release_orders_all_done(conn, [decision_id])


def release_orders_all_done(conn: Connection, decision_ids: Iterable[str]) -> int:
    """`orders_all_done` over a release's decisions: how many orders an earlier run recorded for
    them, when none is still pending and each decision has its orders recorded (0 otherwise).
    A release's rows are all written at once, pending, in one transaction (`stage_and_submit`
    step 1), so a decision without rows was never part of a recorded release."""
    ids = sorted(set(decision_ids))
    if not ids:
        return 0
    rows = conn.execute(select(
        submissions.c.decision_id, func.count(), func.count().filter(submissions.c.status == "pending"),
    ).where(submissions.c.decision_id.in_(ids)).group_by(submissions.c.decision_id)).all()
    if len(rows) != len(ids) or any(pending for _, _, pending in rows):
        return 0
    return sum(int(total) for _, total, _ in rows)


def _audit_payload(order: Order, channel: str, destination: Destination, release_id: str | None = None) -> dict:
    payload = {
        "decision_id": order.decision_id, "recommendation_id": order.recommendation_id, "cl_ord_id": order.cl_ord_id,
        "block_id": order.block_id, "account_id": order.account_id, "custodian": order.custodian,
        "symbol": order.symbol, "side": order.side,
        "quantity": fmt_decimal(order.quantity) if order.quantity is not None else None,
        "cash_amount": fmt_cash(order.cash_amount) if order.cash_amount is not None else None,
        "channel": channel, "destination": destination.path, "placed_by": order.placed_by,
        "placed_at": order.placed_at, "files": destination.sha256,
    }
    if release_id is not None:  # a single decision's event stays as it always was
        payload["release_id"] = release_id
    return payload


def stage_and_submit(store, tickets: Tickets, *, session: FixSession, now: Callable[[], datetime],
                     outbox: Path | None = None,
                     after_write: Callable[[Destination], None] | None = None) -> SubmissionOutcome:
    """Stage or submit every order of `tickets` exactly once (see the module's docstring): a
    decision's, or a release's (`build_release_tickets`: one row per order under its own
    decision, the destinations the release's; the checks read every decision it covers).

    `store`: a WorkflowStore. `after_write` is called after a destination is on disk and before
    its rows are marked done: the crash seam (tests raise there to play a crash)."""
    outbox = outbox or settings.outbox_root()  # one home: RebalSettings.outbox_root
    found = destinations(tickets, session)
    orders = {o.cl_ord_id: o for o in tickets.batch.orders}
    where = {cl_ord_id: d for d in found for cl_ord_id in d.cl_ord_ids}
    wanted = {c: _row(o, tickets.channels[c], where[c]) for c, o in orders.items()}
    outcome = SubmissionOutcome(orders=len(orders), sha256={k: v for d in found for k, v in d.sha256.items()})
    if not orders:
        return outcome

    with store.begin() as conn:  # 1. pending before anything leaves
        status = _record_pending(conn, tickets, wanted, _utc(now()))
    outcome.already_done = sorted(c for c, s in status.items() if s == "done")

    for destination in found:
        todo = [c for c in destination.cl_ord_ids if status[c] == "pending"]
        if not todo:
            continue
        # 2. the file, once
        if deliver(outbox, destination):
            outcome.written.append(destination.path)
        else:
            outcome.found_written.append(destination.path)
        if after_write is not None:
            after_write(destination)
        with store.begin() as conn:  # 3. done, with the audit event, in one transaction
            moment = _utc(now())
            for cl_ord_id in todo:
                done = conn.execute(update(submissions).where(and_(
                    submissions.c.cl_ord_id == cl_ord_id, submissions.c.status == "pending"))
                    .values(status="done", completed_at=moment))
                if done.rowcount != 1:
                    continue  # another run of the decision completed it
                channel = tickets.channels[cl_ord_id]
                if audit.append(conn, f"{AUDIT_KIND[channel]}:{cl_ord_id}", AUDIT_KIND[channel], EXECUTOR, moment,
                                cl_ord_id, _audit_payload(orders[cl_ord_id], channel, destination,
                                                          tickets.decision_id if tickets.is_release else None)):
                    outcome.events += 1
                outcome.completed.append(cl_ord_id)
    return outcome


def _check_desk_user(conn: Connection, user_id: str) -> None:
    """Only an active trading-desk or operations user confirms that orders were placed."""
    from rebal_pipeline.workflow.schema import users

    user = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().first()
    if user is None or not user["active"] or user["role"] not in ("trading_desk", "operations"):
        raise ExecutionError(f"{user_id} is not an active trading-desk or operations user")


def confirm_executed(conn, decision_id: str, user_id: str, now: datetime) -> int:
    """The trading desk confirms it placed a decision's staged orders (status done → executed,
    one audit event). Only an active trading-desk or operations user may; orders that were not
    staged, or are not written yet, are refused. Returns the orders confirmed (0: already)."""
    from sqlalchemy import and_, select, update

    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.schema import submissions

    _check_desk_user(conn, user_id)
    rows = conn.execute(select(submissions).where(submissions.c.decision_id == decision_id)).mappings().all()
    if not rows:
        raise ExecutionError(f"no orders for decision {decision_id}")
    not_ready = [r["cl_ord_id"] for r in rows if r["channel"] == "staged" and r["status"] == "pending"]
    if not_ready:
        raise ExecutionError(f"orders {', '.join(not_ready)} are not staged yet (their files are not written)")
    confirmed = conn.execute(update(submissions).where(and_(
        submissions.c.decision_id == decision_id, submissions.c.channel == "staged", submissions.c.status == "done"))
        .values(status="executed", completed_at=_utc(now))).rowcount
    if confirmed:
        audit.append(conn, f"orders_executed:{decision_id}", "orders_executed", user_id, _utc(now),
                     rows[0]["recommendation_id"], {"decision_id": decision_id, "orders": confirmed})
        from rebal_pipeline.workflow import ledger

        ledger.record_outcome(conn, decision_id, _utc(now))  # every order placed: the recommendation is executed
    return confirmed


def _of_release(row, release_id: str) -> bool:
    """An order row written into the release's destinations: its staged folder, or a submitted
    file named <custodian>_orders_<YYYYMMDD>_<release_id>.<ext>."""
    destination = row["destination"] or ""
    if row["channel"] == STAGED:
        return destination == f"{STAGED}/{release_id}"
    return destination.startswith(f"{SUBMITTED}/") and Path(destination).stem.endswith(f"_{release_id}")


def confirm_release_executed(conn: Connection, release_id: str, decision_ids: Sequence[str], user_id: str,
                             now: datetime) -> int:
    """The trading desk confirms it placed a release's staged orders: every staged `done` order
    of these decisions written into staged/<release_id> becomes `executed`, with ONE audit event
    `orders_executed:<release_id>` (its payload: the decisions and the orders confirmed of each),
    then each decision's recommendation moves to its outcome (`ledger.record_outcome`, L6), in
    the caller's transaction. Returns the orders confirmed (0: already).

    Refused, as `confirm_executed` refuses (nothing changes): a user who is not an active
    trading-desk or operations user; decisions with no orders; staged orders of these decisions
    that are not written yet (pending). Also refused: no decision named, and a decision none of
    whose orders is in the release (the wrong release, or a decision that went out alone)."""
    from rebal_pipeline.workflow import ledger

    now = _utc(now)
    _check_desk_user(conn, user_id)
    ids = sorted(set(decision_ids))
    if not ids:
        raise ExecutionError(f"release {release_id}: no decisions named")
    rows = conn.execute(select(submissions).where(submissions.c.decision_id.in_(ids))).mappings().all()
    if not rows:
        raise ExecutionError(f"no orders for release {release_id} (decisions {', '.join(ids)})")
    not_ready = sorted(r["cl_ord_id"] for r in rows if r["channel"] == STAGED and r["status"] == "pending")
    if not_ready:
        raise ExecutionError(f"orders {', '.join(not_ready)} are not staged yet (their files are not written)")
    outside = [d for d in ids if not any(r["decision_id"] == d and _of_release(r, release_id) for r in rows)]
    if outside:
        raise ExecutionError(f"decision(s) {', '.join(outside)} have no orders in release {release_id}")
    confirmed: dict[str, int] = {}
    for decision_id in ids:
        count = conn.execute(update(submissions).where(and_(
            submissions.c.decision_id == decision_id, submissions.c.channel == STAGED,
            submissions.c.destination == f"{STAGED}/{release_id}", submissions.c.status == "done"))
            .values(status="executed", completed_at=now)).rowcount
        if count:
            confirmed[decision_id] = count
    total = sum(confirmed.values())
    if total:
        audit.append(conn, f"orders_executed:{release_id}", "orders_executed", user_id, now, release_id,
                     {"release_id": release_id, "decision_ids": ids, "orders": total, "by_decision": confirmed})
        for decision_id in ids:  # every order placed: each recommendation is executed (L6)
            ledger.record_outcome(conn, decision_id, now)
    return total
