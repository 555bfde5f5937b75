"""The drill runs the whole loop (issue #16 item 4): feed → drift → alert email (to the drill's
own SMTP sink) → the advisor approving one recommendation by its emailed link and modifying
another in the portal → gate → FIX and custodian order files → desk confirmation → client
confirmation and CRM note (the drill's CRM stand-in). Checked as a user sees it: the printed
steps, the saved emails, the store and its audit chain, the FIX file; and a second loop on the
same home sends nothing new."""

import email
import email.policy
import json
import re
from datetime import date

import duckdb
import pytest
import simplefix
from sqlalchemy import func, select

from rebal_pipeline.cli import main
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import decisions, messages, recommendations, submissions, users
from rebal_pipeline.workflow.store import WorkflowStore

AS_OF = date(2026, 11, 20)
STEPS = ["Loop 1/6 Alert emails", "Loop 2/6 ", "Loop 3/6 Approval gate", "Loop 4/6 The trading desk",
         "Loop 5/6 Client confirmation and CRM note", "Loop 6/6 Where it ended"]


@pytest.fixture
def rebal_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REBAL_HOME", str(tmp_path))
    for name in ("REBAL_WAREHOUSE", "REBAL_FEED_ROOT", "REBAL_SMTP_HOST", "REBAL_LINK_SECRET", "REBAL_CRM"):
        monkeypatch.delenv(name, raising=False)
    # The drill sets these in the process environment (prepare_local_instance): undone after the test.
    for name in ("DAGSTER_HOME", "REBAL_SANDBOX"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return tmp_path


def _mail(path):
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def _fix_orders(path) -> list[dict[int, str]]:
    parser = simplefix.FixParser()
    parser.append_buffer(path.read_bytes())
    found = []
    while (message := parser.get_message()) is not None:
        found.append({tag: message.get(tag).decode() for tag in (35, 1, 54, 55, 38, 152) if message.get(tag)})
    return found


def _counts(store) -> dict[str, int]:
    with store.begin() as conn:
        return {"messages": conn.execute(select(func.count()).select_from(messages)).scalar(),
                "decisions": conn.execute(select(func.count()).select_from(decisions)).scalar(),
                "submissions": conn.execute(select(func.count()).select_from(submissions)).scalar()}


def test_the_drill_runs_the_whole_loop_once_and_a_second_loop_sends_nothing_new(rebal_home, capsys):
    assert main(["drill", "--households", "30", "--as-of", AS_OF.isoformat()]) == 0
    captured = capsys.readouterr()
    out = captured.out

    # The steps, in order, after the scan's summary; progress on stderr only.
    starts = [out.find(step) for step in STEPS]
    assert all(s > out.index("Workflow store (sqlite)") for s in starts) and starts == sorted(starts), out
    assert "[drill]" not in out and "send_advisor_alert for ••••" in captured.err
    assert re.search(r"SMTP sink smtp://127\.0\.0\.1:\d+ · CRM stand-in \(Redtail-style\) http://127\.0\.0\.1:\d+"
                     r"/crm/v1/rest · approval API and portal http://127\.0\.0\.1:\d+", out)

    folder = rebal_home / "drill"
    subjects = json.loads((folder / f"loop_{AS_OF.isoformat()}.json").read_text())
    store = WorkflowStore(f"sqlite:///{rebal_home / 'workflow.sqlite'}")
    try:
        with store.begin() as conn:
            advisor = conn.execute(select(users).where(users.c.user_id == subjects["advisor_id"])).mappings().one()
            recs = {r["recommendation_id"]: dict(r) for r in conn.execute(select(recommendations).where(
                recommendations.c.recommendation_id.in_([subjects["approve"], subjects["modify"]]))).mappings()}
            made = {d["action"]: dict(d) for d in conn.execute(select(decisions).where(
                decisions.c.recommendation_id.in_(recs))).mappings()}
            chain = audit.verify(conn)
        accounts = {rec_id: r["scope_id"] for rec_id, r in recs.items()}

        # The advisor's two alerts, received by the sink and saved, with the approval links.
        mails = sorted(p.name for p in (folder / "mail").iterdir())
        assert mails == ["01-alert.eml", "02-alert.eml", "03-confirmation.eml", "04-confirmation.eml"]
        for name in mails[:2]:
            alert = _mail(folder / "mail" / name)
            assert alert["To"] == advisor["email"] and alert["Subject"].startswith("Rebalance needed: ")
            html = alert.get_body(("html",)).get_content()
            links = set(re.findall(r'href="(http://127\.0\.0\.1:\d+/links/[^"]+)"', html))
            assert len(links) == 4
        assert f"email to {advisor['email']}: \"Rebalance needed: [client], ••••" in out
        assert "buttons: Approve · Review or modify · Defer · Escalate to compliance" in out

        # One approval through its link, one modification through the portal, both the advisor's;
        # the gate passed both; the audit chain verifies.
        assert set(made) == {"approve", "modify"}
        assert made["approve"]["recommendation_id"] == subjects["approve"]
        assert made["modify"]["recommendation_id"] == subjects["modify"]
        assert {(d["actor_id"], d["via"], d["gate_verdict"]) for d in made.values()} == {
            (advisor["user_id"], "link", "passed")}
        assert chain.ok, chain
        assert "the page said (HTTP 201): Approved — the trades go to the approval gate" in out
        assert "the page said (HTTP 201): Modified — the changed trades go to the approval gate" in out
        assert {r["status"] for r in recs.values()} == {"executed"}

        # The FIX files parse and carry the approved quantities: the package's for the approval,
        # the changed one for the modification.
        approved = RecommendationPackage.model_validate_json(recs[subjects["approve"]]["package"])
        staged = rebal_home / "outbox" / "staged"
        fix = {action: _fix_orders(staged / d["decision_id"] / "orders.fix") for action, d in made.items()}
        assert all(o[35] == "D" for orders in fix.values() for o in orders)
        proposed = {(t.symbol, "1" if t.side == "buy" else "2"): t.quantity for t in approved.trades}
        by_quantity = {(o[55], o[54]): float(o[38]) for o in fix["approve"] if 38 in o}
        assert by_quantity and all(abs(q - proposed[key]) < 1e-9 for key, q in by_quantity.items())
        assert {o[1] for orders in fix.values() for o in orders} == set(accounts.values())
        [changed] = re.findall(r"changed Buy (\S+) \(••••\w{4}\): ([\d.]+) → ([\d.]+)", out)
        symbol, before, after = changed
        [line] = [o for o in fix["modify"] if o[55] == symbol and o[54] == "1"]
        assert float(line[38]) == float(after) < float(before)
        for d in made.values():
            assert str(staged / d["decision_id"] / "orders.fix") in out
            assert any(p.suffix in (".csv", ".txt") for p in (staged / d["decision_id"]).iterdir())
        assert out.count("orders confirmed executed") == 2

        # The clients' confirmations (to their own addresses) and the CRM notes.
        with duckdb.connect(str(rebal_home / "warehouse.duckdb"), read_only=True) as con:
            clients = dict(con.execute("select account_id, client_email from stg_feed_accounts where as_of = ?",
                                       [AS_OF]).fetchall())
        confirmed = {_mail(folder / "mail" / name)["To"] for name in mails[2:]}
        assert confirmed == {clients[a] for a in accounts.values()}
        assert all(_mail(folder / "mail" / name)["Subject"] == "Your Sandbox RIA portfolio has been rebalanced"
                   for name in mails[2:])
        assert out.count("CRM note #") == 2 and out.count("    Trades: ") == 2
        assert f"approve by {advisor['user_id']} via link" in out and f"modify by {advisor['user_id']} via link" in out

        # The terminal shows no account number whole, no client address.
        for account in accounts.values():
            assert account not in out
        for address in confirmed:
            assert address not in out

        # The loop again on the same home: every step finds its work done; nothing is sent.
        before_counts = _counts(store)
        from rebal_pipeline.drill import run_loop

        again = run_loop(AS_OF)
        text = "\n".join(again.lines)
        assert again.ok and again.emails == [] and again.crm_records == [], text
        assert text.count("alert already sent before: nothing new") == 2
        assert text.count("already decided") == 2 and text.count("recorded by an earlier run: nothing new") == 2
        assert text.count("already confirmed: nothing new") == 2
        assert "0 executed decisions owed one" in text
        assert _counts(store) == before_counts
        assert sorted(p.name for p in (folder / "mail").iterdir()) == mails
        with store.begin() as conn:
            assert audit.verify(conn).ok
    finally:
        store.dispose()


def test_no_loop_stops_after_the_scan(rebal_home, capsys):
    assert main(["drill", "--households", "30", "--as-of", AS_OF.isoformat(), "--no-loop"]) == 0
    out = capsys.readouterr().out
    assert "Workflow store (sqlite)" in out and "The whole loop" not in out
    assert not (rebal_home / "drill").exists()
