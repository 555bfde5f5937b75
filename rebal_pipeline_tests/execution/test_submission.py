"""Staging and submission after the approval gate: execute_rebalance turns an approved household
recommendation into orders, stages them for the trading desk (FIX 4.4 + custodian-style files)
or submits a discretionary account's orders to the custodian drop when auto-submit is on, and
does each exactly once across re-runs and crashes, on SQLite and on Postgres.

The book: household HH-1 of advisor ADV-1, three accounts each holding 70 VTI ($100) and 60 BND
($50); approved Friday's recommendation, gate passed Monday 23 November 2026 14:35 UTC.
  ACC-1 Schwab, non-discretionary:   sell 10 VTI, buy 20 BND
  ACC-2 Schwab, non-discretionary:   sell 10 VTI, buy 103.093 VBTLX at $9.70 (a fund: $1,000.00)
  ACC-3 Fidelity, discretionary:     sell 10 VTI, buy 20 BND
ACC-1 and ACC-2 sell VTI at one custodian for one advisor: one block of 20.
The household's package is built through rebal_pipeline_tests/factories.py.
"""

import hashlib
import json
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest
from sqlalchemy import select

from rebal_pipeline.defs.approvals import jobs
from rebal_pipeline.execution import submit
from rebal_pipeline.settings import load_settings
from rebal_pipeline.tickets import dialect_for, load_fix44, read_fix_file
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import PackageBand, RecommendationPackage
from rebal_pipeline.workflow.schema import audit_events, submissions
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals.conftest import AS_OF, USERS, package, publish, store  # noqa: F401 (fixture)
from rebal_pipeline_tests.approvals.test_gate import (  # noqa: F401 (fixtures)
    NEXT_SESSION, decide, instance, outbox_home, run_gate, warehouse, write_holdings,
)

ADVISOR = USERS[0]
GATE_AT = datetime(2026, 11, 23, 14, 35, tzinfo=timezone.utc)  # Monday 09:35 New York: the orders' placement time
AFTER_GATE_DAY = date(2026, 11, 24)
ACCOUNTS = {"ACC-1": ("schwab", False), "ACC-2": ("schwab", False), "ACC-3": ("fidelity", True)}
SECURITIES = [("VTI", "922908769", "etf", False), ("BND", "921937827", "etf", False),
              ("VBTLX", "921937603", "mutual_fund", True)]
PRICES = {"VTI": 100.0, "BND": 50.0, "VBTLX": 9.70, "CASH": 1.0}
CLASSES = {"VTI": "equity", "BND": "fixed_income", "VBTLX": "fixed_income", "CASH": "cash"}
STAGED_BY = "trading_desk"
# The deployment's REBAL_AUTO_SUBMIT_DISCRETIONARY, as the run's execution resource carries it.
AUTO_SUBMIT_ON = load_settings({submit.AUTO_SUBMIT_ENV: "true"})
AUTO_SUBMIT_OFF = load_settings({submit.AUTO_SUBMIT_ENV: "false"})


@pytest.fixture(autouse=True)
def gate_clock_and_clean_env(monkeypatch):
    """The gate decides at GATE_AT; no execution settings leak in from the environment."""
    monkeypatch.setattr(jobs, "utc_now", lambda: GATE_AT)
    for name in (submit.AUTO_SUBMIT_ENV, submit.TRADING_DESK_ENV, "REBAL_FIX_SENDER_COMP_ID",
                 "REBAL_FIX_TARGET_COMP_ID", "REBAL_FIX_FIRST_SEQ_NUM"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def book(warehouse):
    """The warehouse with the household's holdings and the feed's securities and accounts.
    A later as-of (after the gate's day) carries a changed CUSIP that must not be used."""
    write_holdings(warehouse, AS_OF, {"VTI": 70, "BND": 60, "CASH": 0}, "ACC-1")
    write_holdings(warehouse, AS_OF, {"VTI": 70, "BND": 60, "CASH": 50}, "ACC-2")
    write_holdings(warehouse, AS_OF, {"VTI": 70, "BND": 60, "CASH": 0}, "ACC-3")
    with warehouse.connect() as con:
        con.execute("create table stg_feed_securities (as_of date, _line integer, symbol varchar, cusip varchar, "
                    "description varchar, asset_class varchar, security_type varchar, wash_group varchar, "
                    "tlh_substitute varchar, fractional boolean)")
        con.execute("create table stg_feed_accounts (as_of date, _line integer, account_id varchar, "
                    "household_id varchar, custodian varchar, discretionary boolean, advisor_override_id varchar)")
        con.executemany("insert into stg_feed_securities values (?, 1, ?, ?, '', ?, ?, '', '', ?)", [
            [AS_OF, symbol, cusip, CLASSES[symbol], kind, fractional]
            for symbol, cusip, kind, fractional in SECURITIES])
        con.execute("insert into stg_feed_securities values (?, 1, 'VTI', '000000000', '', 'equity', 'etf', '', '', "
                    "false)", [AFTER_GATE_DAY])
        con.executemany("insert into stg_feed_accounts values (?, 1, ?, 'HH-1', ?, ?, null)", [
            [AS_OF, account, custodian, discretionary] for account, (custodian, discretionary) in ACCOUNTS.items()])
    return warehouse


def household_package() -> RecommendationPackage:
    cash = {"ACC-1": 0.0, "ACC-2": 50.0, "ACC-3": 0.0}
    holdings = [factories.holding(a, s, CLASSES[s], q, PRICES[s])
                for a in ACCOUNTS for s, q in (("VTI", 70), ("BND", 60), ("CASH", cash[a]))]

    def trade(account, symbol, side, quantity):
        return factories.trade(account, symbol, CLASSES[symbol], side, quantity, PRICES[symbol])
    return factories.make_package(
        recommendation_id="REC-HH", as_of=AS_OF, household_id="HH-1", account_ids=list(ACCOUNTS), tier="standard",
        urgency="medium", delivery="within_48h",
        trades=[trade("ACC-1", "VTI", "sell", 10), trade("ACC-1", "BND", "buy", 20),
                trade("ACC-2", "VTI", "sell", 10), trade("ACC-2", "VBTLX", "buy", 103.093),
                trade("ACC-3", "VTI", "sell", 10), trade("ACC-3", "BND", "buy", 20)],
        holdings=holdings,
        bands=[PackageBand(asset_class="equity", target_weight=0.6, band=0.05, current_weight=0.7, drift=0.1),
               PackageBand(asset_class="fixed_income", target_weight=0.4, band=0.05, current_weight=0.3, drift=-0.1)],
        inside_bands=True,
    )


def approved_household(store) -> str:
    publish(store, household_package())
    return decide(store, "REC-HH", ADVISOR, "approve", reason="household back to 60/40")["decision_id"]


def staged_dir(home, decision_id):
    return home / "outbox" / "staged" / decision_id


def submitted_dir(home, custodian):
    return home / "outbox" / "submitted" / custodian


def submission_rows(store) -> list[dict]:
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(submissions).order_by(submissions.c.cl_ord_id)).mappings()]


def order_events(store) -> list[dict]:
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(audit_events).where(
            audit_events.c.kind.in_(("ticket_staged", "order_submitted"))).order_by(audit_events.c.seq)).mappings()]


def chain(store) -> audit.Verification:
    with store.begin() as conn:
        return audit.verify(conn)


def stage_output(result) -> dict:
    return result.output_for_node("stage_or_submit_orders")


def tree(root) -> dict[str, bytes]:
    """Every file under root (dot-files included: a left-over temporary would show)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fix_orders(path) -> dict[str, dict]:
    """The FIX file's messages by ClOrdID, each validated against the FIX 4.4 dictionary."""
    dictionary = load_fix44()
    found = {}
    for message in read_fix_file(path):
        assert dictionary.validate(message) == []
        fields = {tag: message.get(tag).decode() for tag in (11, 1, 38, 152, 48, 52, 54, 55, 58, 60, 78)
                  if message.get(tag) is not None}
        if 78 in fields:
            fields["allocations"] = [(message.get(79, n).decode(), message.get(80, n).decode())
                                     for n in range(1, int(fields[78]) + 1)]
        found[fields[11]] = fields
    return found


def test_approved_orders_are_staged_for_the_desk_by_default_and_parse_back(store, book, instance, outbox_home):
    decision_id = approved_household(store)

    result = run_gate(store, book, instance, decision_id)

    assert result.success
    folder = staged_dir(outbox_home, decision_id)
    assert sorted(p.name for p in folder.iterdir()) == [
        "fidelity_orders_20261123.csv", "orders.fix", "schwab_orders_20261123.csv"]
    assert not (outbox_home / "outbox" / "submitted").exists()  # auto-submit is off: the desk gets everything

    # FIX: one block (ACC-1 + ACC-2 sell 20 VTI) and four single-account orders, all valid FIX 4.4.
    fix = fix_orders(folder / "orders.fix")
    [block] = [m for m in fix.values() if 78 in m]
    assert (block[55], block[54], block[38], block[48]) == ("VTI", "2", "20", "922908769")  # not the later CUSIP
    assert block["allocations"] == [("ACC-1", "10"), ("ACC-2", "10")]
    singles = sorted((m[1], m[55], m[54], m.get(38), m.get(152)) for m in fix.values() if 78 not in m)
    assert singles == [("ACC-1", "BND", "1", "20", None), ("ACC-2", "VBTLX", "1", None, "1000.00"),
                       ("ACC-3", "BND", "1", "20", None), ("ACC-3", "VTI", "2", "10", None)]
    assert {m[60] for m in fix.values()} == {"20261123-14:35:00.000"}  # placed at the gate's time
    assert all(f"APR=ADV-1 PLC={STAGED_BY}" in m[58] for m in fix.values())

    # The custodian-style files read back with the dialects' own readers.
    schwab = dialect_for("schwab").read(folder / "schwab_orders_20261123.csv")
    assert [(o.account_id, o.side, o.symbol, o.quantity, o.cash_amount, o.block_id is not None)
            for o in schwab.orders] == [
        ("ACC-1", "buy", "BND", Decimal("20"), None, False), ("ACC-1", "sell", "VTI", Decimal("10"), None, True),
        ("ACC-2", "buy", "VBTLX", None, Decimal("1000.00"), False), ("ACC-2", "sell", "VTI", Decimal("10"), None, True)]
    assert [(b.symbol, b.quantity, b.block_id) for b in schwab.blocks] == [("VTI", Decimal("20"), block[11])]
    fidelity = dialect_for("fidelity").read(folder / "fidelity_orders_20261123.csv")
    assert [(o.account_id, o.side, o.symbol, o.quantity, o.discretionary, o.placed_by) for o in fidelity.orders] == [
        ("ACC-3", "buy", "BND", Decimal("20"), True, STAGED_BY),
        ("ACC-3", "sell", "VTI", Decimal("10"), True, STAGED_BY)]
    assert {o.cl_ord_id for o in schwab.orders + fidelity.orders} == set(fix) - {block[11]} | {
        o.cl_ord_id for o in schwab.blocks[0].allocations}

    # One done row and one audit event per order, on an intact chain.
    rows = submission_rows(store)
    assert len(rows) == 6
    assert {(r["status"], r["channel"], r["destination"]) for r in rows} == {
        ("done", "staged", f"staged/{decision_id}")}
    events = order_events(store)
    assert sorted(e["event_id"] for e in events) == sorted(f"ticket_staged:{r['cl_ord_id']}" for r in rows)
    fund = next(e for e in events if '"symbol":"VBTLX"' in e["payload"])
    body = json.loads(fund["payload"])
    assert (body["decision_id"], body["account_id"], body["side"], body["cash_amount"], body["quantity"],
            body["channel"]) == (decision_id, "ACC-2", "buy", "1000.00", None, "staged")
    assert body["files"] == {f"staged/{decision_id}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in sorted(folder.iterdir())}
    assert chain(store).ok


def test_discretionary_orders_go_to_the_custodian_drop_only_when_auto_submit_is_on(store, book, instance,
                                                                                  outbox_home):
    decision_id = approved_household(store)

    result = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert result.success
    # ACC-3 (discretionary, Fidelity) is submitted: its file is in Fidelity's drop, not in the desk's folder.
    [dropped] = list(submitted_dir(outbox_home, "fidelity").iterdir())
    assert dropped.name == f"fidelity_orders_20261123_{decision_id}.csv"
    submitted = dialect_for("fidelity").read(dropped)
    assert [(o.account_id, o.side, o.symbol, o.quantity, o.placed_by) for o in submitted.orders] == [
        ("ACC-3", "buy", "BND", Decimal("20"), submit.EXECUTOR),
        ("ACC-3", "sell", "VTI", Decimal("10"), submit.EXECUTOR)]
    assert sorted(p.name for p in (outbox_home / "outbox" / "submitted").iterdir()) == ["fidelity"]
    folder = staged_dir(outbox_home, decision_id)
    assert sorted(p.name for p in folder.iterdir()) == ["orders.fix", "schwab_orders_20261123.csv"]
    assert "ACC-3" not in {m.get(1) for m in fix_orders(folder / "orders.fix").values()}

    rows = submission_rows(store)
    assert sorted((r["account_id"], r["channel"]) for r in rows) == [
        ("ACC-1", "staged"), ("ACC-1", "staged"), ("ACC-2", "staged"), ("ACC-2", "staged"),
        ("ACC-3", "submitted"), ("ACC-3", "submitted")]
    kinds = [e["kind"] for e in order_events(store)]
    assert (kinds.count("ticket_staged"), kinds.count("order_submitted")) == (4, 2)
    assert stage_output(result)["written"] == [f"staged/{decision_id}", f"submitted/fidelity/{dropped.name}"]
    assert chain(store).ok


def test_a_rerun_after_the_day_was_rescanned_without_the_account_is_done_not_refused(
        store, book, instance, outbox_home):
    # Red team: the orders left; then the day was re-scanned from a corrected feed that no longer
    # carries ACC-1, and someone re-executes the run. Nothing is left to do: it must neither
    # refuse (the orders cannot be rebuilt) nor stage anything again.
    decision_id = approved_household(store)
    assert run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON).success
    rows, outbox = submission_rows(store), tree(outbox_home / "outbox")
    with book.connect() as con:
        con.execute("delete from stg_feed_accounts where account_id = 'ACC-1'")

    again = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert again.success
    assert instance.get_run_by_id(again.run_id).tags["rebal/tickets"] == "already_done"
    assert submission_rows(store) == rows and tree(outbox_home / "outbox") == outbox
    assert chain(store).ok


def test_a_decision_whose_orders_cannot_be_built_is_still_refused_when_none_left(store, book, instance):
    decision_id = approved_household(store)
    with book.connect() as con:
        con.execute("delete from stg_feed_accounts where account_id = 'ACC-1'")
    refused = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)
    assert not refused.success and submission_rows(store) == []


def test_rerunning_the_job_stages_and_submits_nothing_twice(store, book, instance, outbox_home):
    decision_id = approved_household(store)
    assert run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON).success
    outbox = tree(outbox_home / "outbox")
    times = {p: p.stat().st_mtime_ns for p in (outbox_home / "outbox").rglob("*")}
    rows, events = submission_rows(store), order_events(store)

    again = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert again.success
    output = stage_output(again)
    assert (output["completed"], output["written"], output["found_written"]) == ([], [], [])
    assert len(output["already_done"]) == 6
    assert tree(outbox_home / "outbox") == outbox  # no file added, none rewritten
    assert {p: p.stat().st_mtime_ns for p in (outbox_home / "outbox").rglob("*")} == times
    assert submission_rows(store) == rows
    assert order_events(store) == events and len(events) == 6
    assert chain(store).ok


@pytest.mark.parametrize("crash_after", ["staged", "submitted"])
def test_a_crash_between_writing_and_recording_is_finished_exactly_once_by_the_rerun(
        store, book, instance, outbox_home, monkeypatch, crash_after):
    decision_id = approved_household(store)

    def crash(destination):
        if destination.channel == crash_after:
            raise RuntimeError("the process died here")
    monkeypatch.setattr(jobs, "after_delivery", crash)

    crashed = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert not crashed.success
    dropped = submitted_dir(outbox_home, "fidelity") / f"fidelity_orders_20261123_{decision_id}.csv"
    assert staged_dir(outbox_home, decision_id).is_dir()
    assert dropped.exists() == (crash_after == "submitted")
    pending = {r["channel"] for r in submission_rows(store) if r["status"] == "pending"}
    assert pending == ({"staged", "submitted"} if crash_after == "staged" else {"submitted"})
    assert len(submission_rows(store)) == 6  # every order recorded before the first file was written

    monkeypatch.setattr(jobs, "after_delivery", None)
    rerun = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert rerun.success
    output = stage_output(rerun)
    crashed_path = f"staged/{decision_id}" if crash_after == "staged" else f"submitted/fidelity/{dropped.name}"
    assert output["found_written"] == [crashed_path]  # the identical file was there: not written again
    files = tree(outbox_home / "outbox")
    assert sorted(files) == sorted([
        f"approved/{decision_id}.json", f"staged/{decision_id}/orders.fix",
        f"staged/{decision_id}/schwab_orders_20261123.csv", f"submitted/fidelity/{dropped.name}"])
    rows = submission_rows(store)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    events = order_events(store)
    assert sorted(e["event_id"] for e in events) == sorted(
        f"{'order_submitted' if r['channel'] == 'submitted' else 'ticket_staged'}:{r['cl_ord_id']}" for r in rows)
    assert chain(store).ok

    # And once more: still one of everything.
    assert run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON).success
    assert tree(outbox_home / "outbox") == files and len(order_events(store)) == 6


def test_an_order_left_pending_is_not_rerouted_when_the_policy_changes_before_the_rerun(
        store, book, instance, outbox_home, monkeypatch):
    decision_id = approved_household(store)
    monkeypatch.setattr(jobs, "after_delivery", lambda destination: (_ for _ in ()).throw(RuntimeError("crash")))
    assert not run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON).success
    monkeypatch.setattr(jobs, "after_delivery", None)
    before = tree(outbox_home / "outbox")

    # Auto-submit switched off between the crash and the re-run: ACC-3's orders were recorded as
    # submissions; staging them now would make them different orders. Nothing is written.
    refused = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_OFF)

    assert not refused.success
    failure = next(e for e in refused.all_node_events if e.is_failure)
    assert "was recorded (pending) by an earlier attempt" in failure.step_failure_data.error.message
    assert "channel 'submitted' → 'staged'" in failure.step_failure_data.error.message
    assert tree(outbox_home / "outbox") == before
    assert {r["status"] for r in submission_rows(store)} == {"pending"} and order_events(store) == []

    assert run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON).success
    assert {r["status"] for r in submission_rows(store)} == {"done"} and len(order_events(store)) == 6


def test_a_refused_gate_verdict_stages_and_submits_nothing(store, book, instance, outbox_home):
    publish(store, package())
    decision_id = decide(store, "REC-1", ADVISOR, "approve")["decision_id"]
    write_holdings(book, NEXT_SESSION, {"VTI": 5, "BND": 60, "CASH": 6500})  # the sell of 10 VTI no longer fits

    result = run_gate(store, book, instance, decision_id, AUTO_SUBMIT_ON)

    assert result.success and result.output_for_node("approval_gate", "verdict")["verdict"] == "refused"
    skipped = {e.node_name for e in result.all_node_events if e.event_type_value == "STEP_SKIPPED"}
    assert skipped == {"prepare_approved_trades", "build_order_tickets", "stage_or_submit_orders"}
    assert not (outbox_home / "outbox").exists()
    assert submission_rows(store) == [] and order_events(store) == []
    # And the execution code itself refuses a decision the gate did not pass.
    with store.begin() as conn, pytest.raises(submit.ExecutionError, match="gate verdict refused, not passed"):
        submit.load_approved_decision(conn, decision_id)


def test_a_trade_without_reference_data_of_the_gate_day_fails_the_run_before_anything_is_recorded(
        store, book, instance, outbox_home):
    # The feed's only VBTLX row is dated after the gate's trading day: it is not used.
    with book.connect() as con:
        con.execute("update stg_feed_securities set as_of = ? where symbol = 'VBTLX'", [AFTER_GATE_DAY])
    decision_id = approved_household(store)

    failed = run_gate(store, book, instance, decision_id)

    assert not failed.success
    failure = next(e for e in failed.all_node_events if e.is_failure)
    assert failure.node_name == "build_order_tickets"
    # Account numbers reach Dagster masked to their last four characters (issue #13).
    assert "••••CC-2 buy VBTLX: no security reference" in failure.step_failure_data.error.message
    assert not (outbox_home / "outbox" / "staged").exists() and submission_rows(store) == []

    # The feed corrected for the day: re-executing the run stages all six orders.
    with book.connect() as con:
        con.execute("update stg_feed_securities set as_of = ? where symbol = 'VBTLX'", [AS_OF])
    assert run_gate(store, book, instance, decision_id).success
    assert len(submission_rows(store)) == 6 and len(order_events(store)) == 6


def test_a_warehouse_without_reference_tables_tickets_nothing_and_says_so(store, warehouse, instance, outbox_home):
    publish(store, package())
    decision_id = decide(store, "REC-1", ADVISOR, "approve")["decision_id"]

    result = run_gate(store, warehouse, instance, decision_id)

    assert result.success
    assert instance.get_run_by_id(result.run_id).tags[jobs.TICKETS_TAG] == "no_reference_data"
    assert (outbox_home / "outbox" / "approved" / f"{decision_id}.json").exists()  # the hand-off stays for the desk
    assert not (outbox_home / "outbox" / "staged").exists()
    assert submission_rows(store) == []


def test_a_file_already_in_the_outbox_with_other_content_is_never_overwritten(tmp_path):
    destination = submit.Destination(submit.SUBMITTED, "submitted/schwab/x.csv", {"x.csv": b"new"}, ("RB1",))
    assert submit.deliver(tmp_path, destination) is True
    assert submit.deliver(tmp_path, destination) is False  # identical: left as it is
    (tmp_path / "submitted" / "schwab" / "x.csv").unlink()
    (tmp_path / "submitted" / "schwab" / "x.csv").write_bytes(b"old")
    with pytest.raises(submit.ExecutionError, match="never overwritten"):
        submit.deliver(tmp_path, destination)
    assert (tmp_path / "submitted" / "schwab" / "x.csv").read_bytes() == b"old"
    folder = submit.Destination(submit.STAGED, "staged/D1", {"orders.fix": b"a", "s.csv": b"b"}, ("RB1",))
    assert submit.deliver(tmp_path, folder) is True and submit.deliver(tmp_path, folder) is False
    changed = submit.Destination(submit.STAGED, "staged/D1", {"orders.fix": b"a", "s.csv": b"c"}, ("RB1",))
    with pytest.raises(submit.ExecutionError, match="never overwritten"):
        submit.deliver(tmp_path, changed)
    assert tree(tmp_path) == {"staged/D1/orders.fix": b"a", "staged/D1/s.csv": b"b", "submitted/schwab/x.csv": b"old"}


def test_auto_submit_setting_is_true_or_false_and_nothing_else():
    assert submit.auto_submit_discretionary({}) is False
    assert submit.auto_submit_discretionary({submit.AUTO_SUBMIT_ENV: "TRUE"}) is True
    assert submit.auto_submit_discretionary({submit.AUTO_SUBMIT_ENV: "false"}) is False
    with pytest.raises(submit.ExecutionError, match="must be true or false"):
        submit.auto_submit_discretionary({submit.AUTO_SUBMIT_ENV: "yes please"})
