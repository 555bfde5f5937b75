"""Market-event batch releases (issue #16): the decisions of one release, each passed by the gate,
go out as ONE set of tickets whose blocks span decisions, staged or submitted exactly once, and
the desk confirms the release (invariants R1-R6 in rebal_pipeline/execution/submit.py). On SQLite
and on Postgres (the `store` fixture; required when CI=true).

The book: four accounts of advisor ADV-1, each a $10,000 account holding 70 VTI ($100) and 60 BND
($50), each its own recommendation of Friday 20 November 2026, approved by ADV-1; the market
event of Monday 23 November opens batch mev-20261123 and its first release is mev-20261123-r1.
  REC-A  ACC-1 Schwab, non-discretionary:   sell 10 VTI, buy 20 BND   gate passed 15:10:00 UTC
  REC-B  ACC-2 Schwab, non-discretionary:   sell 15 VTI, buy 30 BND   gate passed 15:10:20 UTC
  REC-C  ACC-3 Fidelity, discretionary:     sell 5 VTI,  buy 10 BND   gate passed 15:10:40 UTC
  REC-D  ACC-4 Fidelity, discretionary:     sell 4 VTI,  buy 8 BND    gate passed 15:11:00 UTC
The release is placed at 15:11:00 UTC (its last gate) and makes four blocks, each allocating two
decisions: Schwab sell 25 VTI (10 + 15), Schwab buy 50 BND (20 + 30), Fidelity sell 9 VTI (5 + 4),
Fidelity buy 18 BND (10 + 8). With auto-submit on, the Fidelity blocks (discretionary) go to
Fidelity's drop instead of the desk's folder.
Packages come from the approval tests' `package` (rebal_pipeline_tests/factories.py underneath).
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from rebal_pipeline.execution import submit
from rebal_pipeline.resources import Warehouse
from rebal_pipeline.tickets import FixSession, dialect_for, load_fix44, read_fix_file
from rebal_pipeline.tickets.orders import (
    AccountRef, ApprovalDecision, SecurityRef, TicketBatch, cl_ord_id,
)
from rebal_pipeline.workflow import audit, gate, ledger, ticketing
from rebal_pipeline.workflow.schema import audit_events, recommendations, submissions
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals.conftest import AS_OF, USERS, package, publish, store  # noqa: F401 (fixture)
from rebal_pipeline_tests.approvals.test_gate import decide
from rebal_pipeline_tests.factories import DESK

ADVISOR = USERS[0]
PEOPLE = [*USERS, DESK]
RELEASE = "mev-20261123-r1"
PLACED = "20261123-15:11:00.000"  # the release's last gate, as FIX writes it
ACCOUNTS = {"ACC-1": ("schwab", False), "ACC-2": ("schwab", False), "ACC-3": ("fidelity", True),
            "ACC-4": ("fidelity", True)}
BOOK = {  # recommendation: account, VTI sold, BND bought, gate time
    "REC-A": ("ACC-1", 10, 20, datetime(2026, 11, 23, 15, 10, 0, tzinfo=timezone.utc)),
    "REC-B": ("ACC-2", 15, 30, datetime(2026, 11, 23, 15, 10, 20, tzinfo=timezone.utc)),
    "REC-C": ("ACC-3", 5, 10, datetime(2026, 11, 23, 15, 10, 40, tzinfo=timezone.utc)),
    "REC-D": ("ACC-4", 4, 8, datetime(2026, 11, 23, 15, 11, 0, tzinfo=timezone.utc)),
}
CUSIPS = {"VTI": "922908769", "BND": "921937827"}
LATER = datetime(2026, 11, 23, 16, 0, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------------
# The book: four decisions that passed the gate, and the warehouse's reference data
# ---------------------------------------------------------------------------------------------


def positions_for(accounts):
    return AS_OF, {(a, s): q for a in accounts for s, q in (("VTI", 70.0), ("BND", 60.0), ("CASH", 0.0))}


@pytest.fixture
def passed(store) -> dict[str, str]:
    """recommendation → its decision id, each decision passed by the gate at its BOOK time."""
    # REC-E (ACC-5: sell 10 VTI, buy 20 BND) is published with them and left undecided: the
    # tests that need a decision the gate has not passed decide it.
    publish(store, *[package(rec, account, discretionary=ACCOUNTS[account][1], trades=[
        factories.trade(account, "VTI", "equity", "sell", sold, 100),
        factories.trade(account, "BND", "fixed_income", "buy", bought, 50)])
        for rec, (account, sold, bought, _) in BOOK.items()], package("REC-E", "ACC-5"), users=PEOPLE)
    ids = {}
    for rec, (_, _, _, gate_at) in BOOK.items():
        decision_id = decide(store, rec, ADVISOR, "approve", reason="market event")["decision_id"]
        with store.begin() as conn:
            verdict = gate.gate_decision(conn, decision_id, positions_for, gate_at)
        assert verdict.passed, verdict.reason
        ids[rec] = decision_id
    return ids


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    warehouse = Warehouse(database=str(tmp_path / "warehouse.duckdb"))
    with warehouse.connect() as con:
        con.execute("create table stg_feed_securities (as_of date, _line integer, symbol varchar, cusip varchar, "
                    "description varchar, asset_class varchar, security_type varchar, wash_group varchar, "
                    "tlh_substitute varchar, fractional boolean)")
        con.execute("create table stg_feed_accounts (as_of date, _line integer, account_id varchar, "
                    "household_id varchar, custodian varchar, discretionary boolean, advisor_override_id varchar)")
        con.executemany("insert into stg_feed_securities values (?, 1, ?, ?, '', 'x', 'etf', '', '', false)",
                        [[AS_OF, symbol, cusip] for symbol, cusip in CUSIPS.items()])
        con.executemany("insert into stg_feed_accounts values (?, 1, ?, 'HH-1', ?, ?, null)",
                        [[AS_OF, a, custodian, disc] for a, (custodian, disc) in ACCOUNTS.items()])
    return warehouse


def release(store, wh, decision_ids, auto_submit=False) -> ticketing.OrderTickets:
    return ticketing.release_tickets(store, wh.connect, RELEASE, list(decision_ids), auto_submit=auto_submit,
                                     desk_id="trading_desk")


def stage(store, tickets, outbox, after_write=None, clock=None) -> submit.SubmissionOutcome:
    moments = clock or itertools.count()
    return submit.stage_and_submit(store, tickets, session=FixSession(), outbox=outbox, after_write=after_write,
                                   now=lambda: LATER + timedelta(seconds=next(moments)))


def rows(store) -> list[dict]:
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(submissions).order_by(submissions.c.cl_ord_id)).mappings()]


def order_events(store) -> list[dict]:
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(audit_events).where(
            audit_events.c.kind.in_(("ticket_staged", "order_submitted"))).order_by(audit_events.c.seq)).mappings()]


def chain_ok(store) -> bool:
    with store.begin() as conn:
        verified = audit.verify(conn)
    assert verified.ok, str(verified)
    return True


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (dot-files included: a left-over temporary would show)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def fix_messages(path: Path) -> list[dict]:
    """The FIX file's messages, each validated on the wire and parsed against the FIX 4.4 dictionary."""
    dictionary = load_fix44()
    found = []
    for line in path.read_bytes().splitlines():
        assert dictionary.validate_wire(line) == []
    for message in read_fix_file(path):
        assert dictionary.validate(message) == []
        fields = {tag: message.get(tag).decode() for tag in (11, 1, 38, 48, 52, 54, 55, 58, 60, 78)
                  if message.get(tag) is not None}
        if 78 in fields:
            fields["allocations"] = [(message.get(79, n).decode(), message.get(467, n).decode(),
                                      message.get(80, n).decode()) for n in range(1, int(fields[78]) + 1)]
        found.append(fields)
    return found


def alone(store, wh, decision_id, auto_submit=False) -> submit.Tickets:
    return ticketing.order_tickets(store, wh.connect, decision_id, auto_submit=auto_submit,
                                   desk_id="trading_desk").tickets


# ---------------------------------------------------------------------------------------------
# R1, R2, R6: one set of tickets, blocks across decisions, valid FIX
# ---------------------------------------------------------------------------------------------


def test_a_release_stages_one_folder_whose_blocks_allocate_accounts_of_several_decisions(store, passed, wh, tmp_path):
    ids = passed
    result = release(store, wh, reversed(list(ids.values())))
    tickets = result.tickets

    assert (result.decision_id, tickets.decision_id) == (RELEASE, RELEASE)
    assert tickets.covers == tuple(sorted(ids.values()))
    assert result.reference_day.isoformat() == "2026-11-23"
    outcome = stage(store, tickets, tmp_path / "outbox")

    folder = tmp_path / "outbox" / "staged" / RELEASE
    assert sorted(tree(tmp_path / "outbox")) == [
        f"staged/{RELEASE}/fidelity_orders_20261123.csv", f"staged/{RELEASE}/orders.fix",
        f"staged/{RELEASE}/schwab_orders_20261123.csv"]
    assert outcome.written == [f"staged/{RELEASE}"] and outcome.orders == 8

    # R2 + R6: four blocks, each two accounts of two decisions, valid FIX 4.4, placed at the last gate.
    def order(rec, symbol, side):
        return cl_ord_id(ids[rec], BOOK[rec][0], symbol, side)
    messages = fix_messages(folder / "orders.fix")
    assert [(m[55], m[54], m[38], m[48], m["allocations"]) for m in messages] == [
        ("BND", "1", "18", CUSIPS["BND"], [("ACC-3", order("REC-C", "BND", "buy"), "10"),
                                           ("ACC-4", order("REC-D", "BND", "buy"), "8")]),
        ("VTI", "2", "9", CUSIPS["VTI"], [("ACC-3", order("REC-C", "VTI", "sell"), "5"),
                                          ("ACC-4", order("REC-D", "VTI", "sell"), "4")]),
        ("BND", "1", "50", CUSIPS["BND"], [("ACC-1", order("REC-A", "BND", "buy"), "20"),
                                           ("ACC-2", order("REC-B", "BND", "buy"), "30")]),
        ("VTI", "2", "25", CUSIPS["VTI"], [("ACC-1", order("REC-A", "VTI", "sell"), "10"),
                                           ("ACC-2", order("REC-B", "VTI", "sell"), "15")]),
    ]
    assert {(m[52], m[60]) for m in messages} == {(PLACED, PLACED)}
    assert all("BLOCK ALLOCS=2 REC=MULTI(2)" in m[58] and "APR=ADV-1 PLC=trading_desk" in m[58] for m in messages)

    # The custodian files read back with the dialects' readers: the same blocks, by custodian.
    schwab = dialect_for("schwab").read(folder / "schwab_orders_20261123.csv")
    assert [(b.symbol, b.side, b.quantity, sorted(o.decision_id for o in b.allocations)) for b in schwab.blocks] == [
        ("BND", "buy", Decimal(50), sorted([ids["REC-A"], ids["REC-B"]])),
        ("VTI", "sell", Decimal(25), sorted([ids["REC-A"], ids["REC-B"]]))]
    fidelity = dialect_for("fidelity").read(folder / "fidelity_orders_20261123.csv")
    assert [(b.symbol, b.quantity, b.discretionary) for b in fidelity.blocks] == [
        ("BND", Decimal(18), True), ("VTI", Decimal(9), True)]

    # R1: one row per order, under its own decision, at the release's folder; one event per order.
    recorded = rows(store)
    assert sorted((r["decision_id"], r["account_id"], r["symbol"], r["side"], r["quantity"]) for r in recorded) == \
        sorted([(ids["REC-A"], "ACC-1", "VTI", "sell", 10.0), (ids["REC-A"], "ACC-1", "BND", "buy", 20.0),
                (ids["REC-B"], "ACC-2", "VTI", "sell", 15.0), (ids["REC-B"], "ACC-2", "BND", "buy", 30.0),
                (ids["REC-C"], "ACC-3", "VTI", "sell", 5.0), (ids["REC-C"], "ACC-3", "BND", "buy", 10.0),
                (ids["REC-D"], "ACC-4", "VTI", "sell", 4.0), (ids["REC-D"], "ACC-4", "BND", "buy", 8.0)])
    assert {(r["status"], r["channel"], r["destination"]) for r in recorded} == {
        ("done", "staged", f"staged/{RELEASE}")}
    events = order_events(store)
    assert sorted(e["event_id"] for e in events) == sorted(f"ticket_staged:{r['cl_ord_id']}" for r in recorded)
    body = json.loads(next(e["payload"] for e in events if e["subject_id"] == order("REC-B", "VTI", "sell")))
    assert (body["release_id"], body["decision_id"], body["account_id"], body["quantity"], body["destination"]) == (
        RELEASE, ids["REC-B"], "ACC-2", "15", f"staged/{RELEASE}")
    assert chain_ok(store)


@pytest.mark.parametrize("auto_submit", [False, True])
def test_every_order_of_a_release_has_the_clordid_and_channel_it_has_alone(store, passed, wh, auto_submit):
    result = release(store, wh, passed.values(), auto_submit)
    by_itself = {}
    for rec, decision_id in passed.items():
        one = alone(store, wh, decision_id, auto_submit)
        by_itself.update(one.channels)
        assert {o.placed_at for o in one.batch.orders} == {BOOK[rec][3]}  # alone: at its own gate
    assert result.tickets.channels == by_itself and len(by_itself) == 8
    # In the release: every order at the release's last gate (REC-D's, 15:11:00).
    assert {o.placed_at.isoformat() for o in result.tickets.batch.orders} == {"2026-11-23T15:11:00+00:00"}
    assert submit.release_placed_at(result.approved).isoformat() == "2026-11-23T15:11:00+00:00"


def test_with_auto_submit_the_discretionary_blocks_go_to_the_custodian_drop_named_by_the_release(
        store, passed, wh, tmp_path):
    tickets = release(store, wh, passed.values(), auto_submit=True).tickets
    stage(store, tickets, tmp_path / "outbox")

    drop = f"submitted/fidelity/fidelity_orders_20261123_{RELEASE}.csv"
    assert sorted(tree(tmp_path / "outbox")) == [
        f"staged/{RELEASE}/orders.fix", f"staged/{RELEASE}/schwab_orders_20261123.csv", drop]
    submitted = dialect_for("fidelity").read(tmp_path / "outbox" / drop)
    assert [(b.symbol, b.side, b.quantity, b.placed_by, [o.account_id for o in b.allocations])
            for b in submitted.blocks] == [("BND", "buy", Decimal(18), submit.EXECUTOR, ["ACC-3", "ACC-4"]),
                                           ("VTI", "sell", Decimal(9), submit.EXECUTOR, ["ACC-3", "ACC-4"])]
    messages = fix_messages(tmp_path / "outbox" / "staged" / RELEASE / "orders.fix")
    assert sorted((m[55], m[38]) for m in messages) == [("BND", "50"), ("VTI", "25")]
    assert sorted((r["account_id"], r["channel"], r["destination"]) for r in rows(store) if r["symbol"] == "VTI") == [
        ("ACC-1", "staged", f"staged/{RELEASE}"), ("ACC-2", "staged", f"staged/{RELEASE}"),
        ("ACC-3", "submitted", drop), ("ACC-4", "submitted", drop)]
    kinds = [e["kind"] for e in order_events(store)]
    assert (kinds.count("ticket_staged"), kinds.count("order_submitted")) == (4, 4)
    assert chain_ok(store)


# ---------------------------------------------------------------------------------------------
# R3: exactly once across re-runs and a crash between the files and the rows
# ---------------------------------------------------------------------------------------------


def test_rerunning_a_release_writes_nothing_and_records_nothing_twice(store, passed, wh, tmp_path):
    outbox = tmp_path / "outbox"
    stage(store, release(store, wh, passed.values(), True).tickets, outbox)
    files, recorded, events = tree(outbox), rows(store), order_events(store)
    times = {p: p.stat().st_mtime_ns for p in outbox.rglob("*")}

    again = stage(store, release(store, wh, list(passed.values())[::-1], True).tickets, outbox)

    assert (again.completed, again.written, again.found_written, again.events) == ([], [], [], 0)
    assert len(again.already_done) == 8
    assert tree(outbox) == files and {p: p.stat().st_mtime_ns for p in outbox.rglob("*")} == times
    assert rows(store) == recorded and order_events(store) == events and len(events) == 8
    assert chain_ok(store)


@pytest.mark.parametrize("crash_after", ["staged", "submitted"])
def test_a_crash_after_the_release_files_are_written_is_finished_once_by_the_rerun(
        store, passed, wh, tmp_path, crash_after):
    outbox = tmp_path / "outbox"

    def crash(destination):
        if destination.channel == crash_after:
            raise RuntimeError("the process died here")
    with pytest.raises(RuntimeError, match="died"):
        stage(store, release(store, wh, passed.values(), True).tickets, outbox, after_write=crash)
    pending = {r["channel"] for r in rows(store) if r["status"] == "pending"}
    assert pending == ({"staged", "submitted"} if crash_after == "staged" else {"submitted"})
    assert len(rows(store)) == 8  # every order of every decision recorded before the first file
    with store.begin() as conn:
        assert submit.release_orders_all_done(conn, passed.values()) == 0  # not done: some pending

    rerun = stage(store, release(store, wh, passed.values(), True).tickets, outbox)

    drop = f"submitted/fidelity/fidelity_orders_20261123_{RELEASE}.csv"
    assert rerun.found_written == [f"staged/{RELEASE}" if crash_after == "staged" else drop]
    files = tree(outbox)
    assert sorted(files) == [f"staged/{RELEASE}/orders.fix", f"staged/{RELEASE}/schwab_orders_20261123.csv", drop]
    assert {r["status"] for r in rows(store)} == {"done"}
    events = order_events(store)
    assert sorted(e["event_id"] for e in events) == sorted(
        f"{submit.AUDIT_KIND[r['channel']]}:{r['cl_ord_id']}" for r in rows(store))
    with store.begin() as conn:
        assert submit.release_orders_all_done(conn, passed.values()) == 8
    # And once more: still one of everything.
    stage(store, release(store, wh, passed.values(), True).tickets, outbox)
    assert tree(outbox) == files and len(order_events(store)) == 8
    assert chain_ok(store)


# ---------------------------------------------------------------------------------------------
# R5: a decision goes out once, alone or in one release
# ---------------------------------------------------------------------------------------------


def test_a_rerun_of_a_crashed_release_that_no_longer_covers_one_of_its_decisions_is_refused(
        store, passed, wh, tmp_path):
    outbox = tmp_path / "outbox"
    with pytest.raises(RuntimeError):
        stage(store, release(store, wh, passed.values()).tickets, outbox,
              after_write=lambda destination: (_ for _ in ()).throw(RuntimeError("crash")))
    before, recorded = tree(outbox), rows(store)
    dropped = passed["REC-D"]

    # Re-run without REC-D: its two orders were recorded for this release's folder.
    with pytest.raises(submit.ExecutionError) as refused:
        stage(store, release(store, wh, [d for d in passed.values() if d != dropped]).tickets, outbox)

    theirs = sorted(r["cl_ord_id"] for r in recorded if r["decision_id"] == dropped)
    assert str(refused.value) == (f"release {RELEASE}: orders {', '.join(theirs)} were recorded by an earlier "
                                  "attempt but are not among this run's orders: nothing written")
    assert tree(outbox) == before and rows(store) == recorded


def test_a_decision_of_a_staged_release_run_alone_afterwards_is_recognised_done(store, passed, wh, tmp_path):
    outbox = tmp_path / "outbox"
    stage(store, release(store, wh, passed.values()).tickets, outbox)
    files, recorded, events = tree(outbox), rows(store), order_events(store)
    decision_id = passed["REC-A"]

    by_itself = alone(store, wh, decision_id)
    outcome = stage(store, by_itself, outbox)

    assert sorted(outcome.already_done) == sorted(by_itself.channels) and len(outcome.already_done) == 2
    assert (outcome.completed, outcome.written, outcome.found_written) == ([], [], [])
    assert not (outbox / "staged" / decision_id).exists() and tree(outbox) == files
    assert rows(store) == recorded and order_events(store) == events
    with store.begin() as conn:
        assert submit.orders_all_done(conn, decision_id) == 2


def test_a_decision_of_a_crashed_release_run_alone_is_refused_and_the_release_finishes_it(
        store, passed, wh, tmp_path):
    outbox = tmp_path / "outbox"
    with pytest.raises(RuntimeError):
        stage(store, release(store, wh, passed.values()).tickets, outbox,
              after_write=lambda destination: (_ for _ in ()).throw(RuntimeError("crash")))
    before, recorded = tree(outbox), rows(store)

    with pytest.raises(submit.ExecutionError, match="recorded \\(pending\\) by an earlier attempt") as refused:
        stage(store, alone(store, wh, passed["REC-B"]), outbox)

    assert f"destination 'staged/{RELEASE}' → 'staged/{passed['REC-B']}'" in str(refused.value)
    assert tree(outbox) == before and rows(store) == recorded and order_events(store) == []
    stage(store, release(store, wh, passed.values()).tickets, outbox)
    assert {r["status"] for r in rows(store)} == {"done"} and len(order_events(store)) == 8


def test_a_release_covering_a_decision_that_went_out_alone_is_refused_before_anything_is_recorded(
        store, passed, wh, tmp_path):
    outbox = tmp_path / "outbox"
    first = passed["REC-A"]
    stage(store, alone(store, wh, first), outbox)
    files, recorded = tree(outbox), rows(store)

    with pytest.raises(submit.ExecutionError) as refused:
        stage(store, release(store, wh, passed.values()).tickets, outbox)

    message = str(refused.value)
    assert message.startswith(f"release {RELEASE}: orders ")
    assert f"already left for staged/{first} (decision(s) {first}); writing them into staged/{RELEASE} would " \
           "send them again: nothing written" in message
    assert tree(outbox) == files and not (outbox / "staged" / RELEASE).exists()
    assert rows(store) == recorded and len(recorded) == 2  # the other decisions' rows were not kept either
    # Without it the release goes out: the three other decisions, once.
    rest = [d for d in passed.values() if d != first]
    stage(store, ticketing.release_tickets(store, wh.connect, RELEASE, rest, auto_submit=False,
                                           desk_id="trading_desk").tickets, outbox)
    assert sorted({r["destination"] for r in rows(store)}) == [f"staged/{first}", f"staged/{RELEASE}"]
    assert len(order_events(store)) == 8
    assert chain_ok(store)


# ---------------------------------------------------------------------------------------------
# ticketing.release_tickets: the outcomes of order_tickets, for a release
# ---------------------------------------------------------------------------------------------


def test_a_release_with_a_trade_that_cannot_be_an_order_is_refused_naming_the_decision_and_masked_account(
        store, passed, wh):
    with wh.connect() as con:
        con.execute("delete from stg_feed_accounts where account_id = 'ACC-2'")

    with pytest.raises(ticketing.TicketsRefused) as refused:
        release(store, wh, passed.values())

    assert str(refused.value) == (f"release {RELEASE}: no orders staged or submitted: decision {passed['REC-B']}: "
                                  "••••CC-2 sell VTI: no account reference (custodian, discretionary) for the account")
    assert rows(store) == []


def test_a_release_with_a_decision_the_gate_did_not_pass_is_refused(store, passed, wh):
    unchecked = decide(store, "REC-E", ADVISOR, "approve")["decision_id"]

    with pytest.raises(ticketing.TicketsRefused) as refused:
        release(store, wh, [*passed.values(), unchecked])
    assert str(refused.value) == (f"release {RELEASE}: no orders staged or submitted: decision {unchecked} has "
                                  "gate verdict none, not passed: nothing is staged or submitted")
    assert rows(store) == []
    with pytest.raises(ticketing.TicketsRefused, match="listed twice"):
        release(store, wh, [passed["REC-A"], passed["REC-A"]])


def test_a_release_without_reference_tables_tickets_nothing(store, passed, tmp_path):
    empty = Warehouse(database=str(tmp_path / "empty.duckdb"))
    result = release(store, empty, passed.values())
    assert result.tickets is None and result.orders_done == 0 and result.decision_id == RELEASE
    assert [a.decision.decision_id for a in result.approved] == sorted(passed.values())


def test_a_rerun_of_a_release_whose_orders_left_is_done_when_the_day_was_rescanned_without_an_account(
        store, passed, wh, tmp_path):
    stage(store, release(store, wh, passed.values()).tickets, tmp_path / "outbox")
    with wh.connect() as con:
        con.execute("delete from stg_feed_accounts where account_id = 'ACC-1'")

    result = release(store, wh, passed.values())

    assert (result.decision_id, result.tickets, result.orders_done) == (RELEASE, None, 8)
    # Not when the release also covers a decision none of whose orders left: that one is refused.
    newcomer = decide(store, "REC-E", ADVISOR, "approve")["decision_id"]
    with store.begin() as conn:
        assert gate.gate_decision(conn, newcomer, positions_for, LATER).passed
    with pytest.raises(ticketing.TicketsRefused, match="••••CC-[15] sell VTI: no account reference"):
        release(store, wh, [*passed.values(), newcomer])
    assert len(rows(store)) == 8


def test_release_orders_all_done_counts_only_a_release_whose_every_decision_left(store, passed, wh, tmp_path):
    ids = list(passed.values())
    with store.begin() as conn:
        assert submit.release_orders_all_done(conn, ids) == 0  # nothing recorded
    stage(store, release(store, wh, ids).tickets, tmp_path / "outbox")
    other = decide(store, "REC-E", ADVISOR, "approve")["decision_id"]
    with store.begin() as conn:
        assert submit.release_orders_all_done(conn, ids) == 8
        assert submit.release_orders_all_done(conn, ids[:2]) == 4
        assert submit.release_orders_all_done(conn, [*ids, other]) == 0  # `other` has no orders
        assert submit.release_orders_all_done(conn, []) == 0


# ---------------------------------------------------------------------------------------------
# The desk confirms a release
# ---------------------------------------------------------------------------------------------


def statuses(store, recs) -> list[str]:
    with store.begin() as conn:
        return [conn.execute(select(recommendations.c.status).where(
            recommendations.c.recommendation_id == rec)).scalar_one() for rec in recs]


def finish_stage(store, tickets):
    """What execute_rebalance does after staging: each decision's outcome (ledger L6)."""
    with store.begin() as conn:
        for decision_id in tickets.covers:
            ledger.record_outcome(conn, decision_id, LATER)


def test_the_desk_confirms_a_release_once_and_every_recommendation_is_executed(store, passed, wh, tmp_path):
    ids = list(passed.values())
    tickets = release(store, wh, ids, auto_submit=True).tickets
    stage(store, tickets, tmp_path / "outbox")
    finish_stage(store, tickets)
    # Submitted to the drop: REC-C and REC-D are executed; the staged ones wait for the desk.
    assert statuses(store, BOOK) == ["approved", "approved", "executed", "executed"]

    with store.begin() as conn, pytest.raises(submit.ExecutionError, match="ADV-1 is not an active trading-desk"):
        submit.confirm_release_executed(conn, RELEASE, ids, "ADV-1", LATER)
    with store.begin() as conn, pytest.raises(submit.ExecutionError,
                                              match="have no orders in release mev-20261123-r9"):
        submit.confirm_release_executed(conn, "mev-20261123-r9", ids, "DESK-1", LATER)
    with store.begin() as conn:
        assert submit.confirm_release_executed(conn, RELEASE, ids, "DESK-1", LATER) == 4
    with store.begin() as conn:
        assert submit.confirm_release_executed(conn, RELEASE, ids, "DESK-1", LATER) == 0  # already

    assert statuses(store, BOOK) == ["executed"] * 4
    assert sorted((r["channel"], r["status"]) for r in rows(store)) == [("staged", "executed")] * 4 + [
        ("submitted", "done")] * 4
    with store.begin() as conn:
        [event] = conn.execute(select(audit_events).where(audit_events.c.kind == "orders_executed")).mappings().all()
    assert (event["event_id"], event["actor"], event["subject_id"]) == (f"orders_executed:{RELEASE}", "DESK-1", RELEASE)
    assert json.loads(event["payload"]) == {
        "release_id": RELEASE, "decision_ids": sorted(ids), "orders": 4,
        "by_decision": {passed["REC-A"]: 2, passed["REC-B"]: 2}}
    assert chain_ok(store)


def test_a_release_not_yet_staged_cannot_be_confirmed(store, passed, wh, tmp_path):
    ids = list(passed.values())
    with store.begin() as conn, pytest.raises(submit.ExecutionError, match=f"no orders for release {RELEASE}"):
        submit.confirm_release_executed(conn, RELEASE, ids, "DESK-1", LATER)
    with pytest.raises(RuntimeError):
        stage(store, release(store, wh, ids).tickets, tmp_path / "outbox",
              after_write=lambda destination: (_ for _ in ()).throw(RuntimeError("crash")))
    with store.begin() as conn, pytest.raises(submit.ExecutionError, match="are not staged yet"):
        submit.confirm_release_executed(conn, RELEASE, ids, "OPS-1", LATER)
    assert {r["status"] for r in rows(store)} == {"pending"}


# ---------------------------------------------------------------------------------------------
# The tickets document
# ---------------------------------------------------------------------------------------------


def test_the_tickets_document_carries_the_release_decisions_and_old_documents_still_load(store, passed, wh):
    tickets = release(store, wh, passed.values()).tickets
    document = tickets.to_document()
    assert document["decision_ids"] == sorted(passed.values())
    assert submit.Tickets.from_document(json.loads(json.dumps(document))) == tickets

    single = alone(store, wh, passed["REC-A"])
    old = single.to_document()
    assert "decision_ids" not in old  # a decision's document is as it always was
    loaded = submit.Tickets.from_document(old)
    assert (loaded.decision_ids, loaded.covers, loaded.label) == ((), (passed["REC-A"],),
                                                                  f"decision {passed['REC-A']}")
    with pytest.raises(submit.ExecutionError, match="orders of decision"):
        submit.Tickets(RELEASE, tickets.batch, tickets.channels, decision_ids=(passed["REC-A"],))


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis): R1, R2, R4, R6 on random releases; R3 with a crash anywhere
# ---------------------------------------------------------------------------------------------

GATED = datetime(2026, 11, 23, 15, 0, tzinfo=timezone.utc)
POOL = {  # account: custodian, discretionary, advisor override
    "ACC-1": ("schwab", False, None), "ACC-2": ("schwab", False, None), "ACC-3": ("schwab", True, None),
    "ACC-4": ("fidelity", True, None), "ACC-5": ("fidelity", True, None), "ACC-6": ("fidelity", False, None),
    "ACC-7": ("pershing", False, None), "ACC-8": ("pershing", False, "ADV-9"), "ACC-9": ("pershing", True, None),
}
REFS = {
    "VTI": SecurityRef(symbol="VTI", cusip="922908769", security_type="etf"),
    "BND": SecurityRef(symbol="BND", cusip="921937827", security_type="etf"),
    "AAPL": SecurityRef(symbol="AAPL", cusip="037833100", security_type="stock"),
    "VBTLX": SecurityRef(symbol="VBTLX", cusip="921937603", security_type="mutual_fund", fractional=True),
}
ACCOUNT_REFS = {a: AccountRef(account_id=a, custodian=c, discretionary=d, advisor_id=o)
                for a, (c, d, o) in POOL.items()}
PRICE = {"VTI": 100.0, "BND": 50.0, "AAPL": 225.0, "VBTLX": 9.70}
CLASS = {"VTI": "equity", "BND": "fixed_income", "AAPL": "equity", "VBTLX": "fixed_income"}


@st.composite
def releases(draw):
    """2-4 decisions over disjoint accounts (one order set per account and day), each trading
    1-3 of its accounts' symbols and sides, each passed by the gate at its own second."""
    accounts = draw(st.permutations(sorted(POOL)))
    cuts = sorted(draw(st.lists(st.integers(1, len(accounts) - 1), min_size=1, max_size=3, unique=True)))
    groups = [list(accounts[a:b]) for a, b in zip([0, *cuts], [*cuts, len(accounts)])]
    decisions = []
    for n, group in enumerate(groups):
        trades = []
        for account in group:
            lines = draw(st.lists(st.tuples(st.sampled_from(sorted(REFS)), st.sampled_from(["buy", "sell"])),
                                  min_size=1, max_size=3, unique=True))
            for symbol, side in lines:
                quantity = (draw(st.integers(1, 99_999)) / 1000 if REFS[symbol].fractional
                            else draw(st.integers(1, 500)))
                trades.append(factories.trade(account, symbol, CLASS[symbol], side, quantity, PRICE[symbol],
                                              fractional=REFS[symbol].fractional))
        rec = f"REC-P{n}"
        pkg = factories.make_package(recommendation_id=rec, scope_id=group[0], account_ids=group,
                                     household_id=None, trades=trades, positions_fingerprint="0" * 64)
        decision = ApprovalDecision(decision_id=f"DEC{n}{draw(st.integers(0, 9999)):04d}", recommendation_id=rec,
                                    action="approve", actor_id="ADV-1", created_at=GATED - timedelta(hours=2))
        gate_at = GATED + timedelta(seconds=draw(st.integers(0, 3600)), microseconds=draw(st.integers(0, 999_999)))
        decisions.append((submit.ApprovedDecision(decision, pkg, gate_at), trades))
    return decisions, draw(st.booleans()), draw(st.randoms(use_true_random=False))


def build(decisions, auto_submit, order=None, shuffle=None) -> submit.Tickets:
    chosen = list(decisions) if order is None else [decisions[i] for i in order]
    trades = {}
    for approved, mine in chosen:
        mine = list(mine)
        if shuffle is not None:
            shuffle.shuffle(mine)
        trades[approved.decision.decision_id] = mine
    return submit.build_release_tickets(RELEASE, [a for a, _ in chosen], trades, REFS, ACCOUNT_REFS,
                                        auto_submit=auto_submit, desk_id="trading_desk")


def file_bytes(tickets) -> dict[str, dict[str, bytes]]:
    return {d.path: d.files for d in submit.destinations(tickets, FixSession())}


@settings(max_examples=60, deadline=None)
@given(drawn=releases())
def test_any_release_makes_one_order_per_trade_valid_blocks_and_the_same_bytes_in_any_order(drawn):
    decisions, auto_submit, rng = drawn
    tickets = build(decisions, auto_submit)
    batch: TicketBatch = tickets.batch

    # R1: every approved trade is exactly one order, with the ClOrdID and channel it has alone.
    expected = {cl_ord_id(a.decision.decision_id, t.account_id, t.symbol, t.side) for a, ts in decisions for t in ts}
    assert {o.cl_ord_id for o in batch.orders} == expected and len(batch.orders) == len(expected)
    by_itself = {}
    for approved, trades in decisions:
        by_itself.update(submit.build_tickets(approved, trades, REFS, ACCOUNT_REFS, auto_submit=auto_submit,
                                              desk_id="trading_desk").channels)
    assert tickets.channels == by_itself
    assert {o.placed_at for o in batch.orders} == {max(a.gate_checked_at for a, _ in decisions).replace(microsecond=0)}

    # R2: each block's allocations sum to it and share custodian, advisor, symbol, side, channel, discretion;
    # no two blocks (nor a block and a single order) could have been one.
    for block in batch.blocks:
        assert sum((o.quantity for o in block.allocations), Decimal(0)) == block.quantity
        assert {(o.custodian, o.advisor_id, o.symbol, o.side, tickets.channels[o.cl_ord_id], o.discretionary)
                for o in block.allocations} == {(block.custodian, block.advisor_id, block.symbol, block.side,
                                                 tickets.channels[block.allocations[0].cl_ord_id],
                                                 block.discretionary)}
    groups = {}
    for o in batch.orders:
        if not o.by_amount:
            key = (o.custodian, o.advisor_id, o.symbol, o.side, tickets.channels[o.cl_ord_id], o.discretionary)
            groups.setdefault(key, set()).add(o.block_id)
    assert all(len(blocks) == 1 for blocks in groups.values())

    # R6: the staged FIX file validates against the FIX 4.4 dictionary, message by message.
    dictionary = load_fix44()
    for destination in submit.destinations(tickets, FixSession()):
        for line in destination.files.get(submit.FIX_FILE_NAME, b"").splitlines():
            assert dictionary.validate_wire(line) == []

    # R4: the decisions in another order, each one's trades shuffled: the same tickets and bytes.
    order = list(range(len(decisions)))
    rng.shuffle(order)
    again = build(decisions, auto_submit, order=order, shuffle=rng)
    assert again == tickets and again.to_document() == tickets.to_document()
    assert file_bytes(again) == file_bytes(tickets)


_runs = itertools.count()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(drawn=releases(), crash_at=st.integers(0, 3))
def test_any_release_crashed_anywhere_is_finished_exactly_once(store, tmp_path, drawn, crash_at):
    decisions, auto_submit, _rng = drawn
    run = next(_runs)
    # The store is shared by the examples: each example's decisions get their own ids.
    decisions = [(submit.ApprovedDecision(
        a.decision.model_copy(update={"decision_id": f"X{run}{a.decision.decision_id}"}), a.package,
        a.gate_checked_at), t) for a, t in decisions]
    release_id = f"mev-20261123-r{run + 1}"
    tickets = submit.build_release_tickets(
        release_id, [a for a, _ in decisions], {a.decision.decision_id: t for a, t in decisions}, REFS, ACCOUNT_REFS,
        auto_submit=auto_submit, desk_id="trading_desk")
    outbox = tmp_path / f"outbox{run}"
    found = submit.destinations(tickets, FixSession())
    seen = []

    def crash(destination):
        seen.append(destination.path)
        if len(seen) == crash_at + 1:
            raise RuntimeError("the process died here")
    crashed = crash_at < len(found)
    if crashed:
        with pytest.raises(RuntimeError, match="died"):
            stage(store, tickets, outbox, after_write=crash)
    else:
        stage(store, tickets, outbox, after_write=crash)

    # The re-run gets the tickets as the job hands them over: through their document.
    rerun = stage(store, submit.Tickets.from_document(json.loads(json.dumps(tickets.to_document()))), outbox)
    third = stage(store, tickets, outbox)

    paths = [d.path for d in found]
    if crashed:  # the crashed destination found complete, the later ones written by the re-run
        assert (rerun.found_written, rerun.written) == ([paths[crash_at]], paths[crash_at + 1:])
    else:
        assert (rerun.found_written, rerun.written, rerun.completed) == ([], [], [])
    assert (third.found_written, third.written, third.completed, third.events) == ([], [], [], 0)
    # Every destination with its bytes, and nothing else (no temporary left).
    assert tree(outbox) == {d.file_path(name): data for d in found for name, data in d.files.items()}
    with store.begin() as conn:
        mine = [dict(r) for r in conn.execute(select(submissions).where(
            submissions.c.decision_id.in_(list(tickets.covers)))).mappings()]
        kinds = {r["cl_ord_id"]: r["channel"] for r in mine}
        events = conn.execute(select(audit_events.c.event_id).where(
            audit_events.c.subject_id.in_(list(kinds)))).scalars().all()
        assert submit.release_orders_all_done(conn, tickets.covers) == len(tickets.batch.orders)
    assert sorted(kinds) == sorted(tickets.channels) and {r["status"] for r in mine} == {"done"}
    assert sorted(events) == sorted(f"{submit.AUDIT_KIND[c]}:{k}" for k, c in kinds.items())
    assert chain_ok(store)
