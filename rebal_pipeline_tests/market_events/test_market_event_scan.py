"""A market event's whole story on a real book (issue #16 item 2), through the real pieces: the
drill builds the session of Friday 2026-11-20 (warehouse + workflow store); on Monday the
intraday prices arrive. A quiet snapshot launches nothing; one where the reference basket is
down 4% launches one scan (the `market_events` sensor ticked with build_sensor_context); the
scan values every account at those prices without touching the warehouse, and its alerts form
the day's batch with a severity-sorted report; a re-run publishes nothing; a second move the same
day extends the batch; the advisor's decisions are held, not launched alone; at the release time
one execute_rebalance run gates them and blocks their orders per custodian and symbol, and the
FIX file validates against the FIX 4.4 dictionary."""

import email
import email.policy
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import duckdb
import pytest
from dagster import DagsterInstance, build_sensor_context
from sqlalchemy import func, select

from rebal_pipeline import settings
from rebal_pipeline.cli import main
from rebal_pipeline.definitions import build_definitions
from rebal_pipeline.defs.approvals.sensors import build_approval_decisions_sensor, build_market_event_batches_sensor
from rebal_pipeline.defs.market_events.defs import build_market_events_sensor
from rebal_pipeline.market_events import batches, prices
from rebal_pipeline.resources import resources_for
from rebal_pipeline.sandbox.intraday import shocked_prices, write_intraday_prices
from rebal_pipeline.sandbox.local_peers import SmtpSink
from rebal_pipeline.tickets import load_fix44, read_fix_file
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import (
    batch_recommendations, decisions, market_batches, market_events, recommendations, submissions, users,
)
from rebal_pipeline.workflow.store import WorkflowStore

NEW_YORK = ZoneInfo("America/New_York")
SESSION = date(2026, 11, 20)  # a Friday
DAY = date(2026, 11, 23)  # the Monday after


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(DAY.year, DAY.month, DAY.day, hour, minute, tzinfo=NEW_YORK)


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv("REBAL_HOME", str(tmp_path))
    for name in ("REBAL_WAREHOUSE", "REBAL_FEED_ROOT", "REBAL_SMTP_HOST", "REBAL_LINK_SECRET", "REBAL_CRM",
                 "REBAL_WORKFLOW_DB"):
        monkeypatch.delenv(name, raising=False)
    for name in ("DAGSTER_HOME", "REBAL_SANDBOX"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert main(["drill", "--households", "40", "--as-of", SESSION.isoformat(), "--no-loop"]) == 0
    store = WorkflowStore(settings.workflow_db_url())
    with SmtpSink() as sink:  # the firm's relay: a real SMTP server on 127.0.0.1
        for name, value in {"REBAL_SMTP_HOST": sink.host, "REBAL_SMTP_PORT": str(sink.port),
                            "REBAL_SMTP_STARTTLS": "false", "REBAL_SMTP_FROM": "rebal@firm.example",
                            "REBAL_LINK_SECRET": "a-market-event-test-secret-of-32+bytes",
                            "REBAL_PUBLIC_URL": "http://127.0.0.1:8000"}.items():
            monkeypatch.setenv(name, value)
        yield tmp_path, store, sink
    store.dispose()


def _tick(sensor, when, cursor=None):
    context = build_sensor_context(cursor=cursor, resources=resources_for(settings.load_settings()))
    return build_market_events_sensor(clock=lambda: when)(context) if sensor is None else sensor(context)


def _run(job_name, request, instance):
    job = build_definitions().resolve_job_def(job_name)
    return job.execute_in_process(instance=instance, run_config=request.run_config, raise_on_error=False,
                                  tags={**request.tags, "dagster/run_key": request.run_key})


def _counts(store):
    with store.begin() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar()
                for t in (market_batches, market_events, batch_recommendations, recommendations, decisions)}


def test_a_market_event_scans_every_account_once_batches_the_alerts_and_releases_block_orders(book):
    home, store, sink = book
    feed_root = settings.feed_root()
    closes = prices.read_session_closes(feed_root, SESSION)
    warehouse_before = (home / "warehouse.duckdb").stat().st_mtime_ns if (home / "warehouse.duckdb").exists() else None
    instance = DagsterInstance.ephemeral()

    # A quiet morning: the basket is down 1% — under the 3% threshold, nothing is launched.
    write_intraday_prices(feed_root, DAY, at(10, 0), shocked_prices(closes, Decimal("-0.01")))
    quiet = _tick(None, at(10, 1))
    assert quiet.run_requests == [] and "under the 3.0% threshold" in quiet.skip_reason.skip_message

    # Equities fall: the basket is down 4% since Friday's close → one scan, keyed by the file.
    shocked = shocked_prices(closes, Decimal("-0.04"))
    dropped = write_intraday_prices(feed_root, DAY, at(11, 0), shocked)
    result = _tick(None, at(11, 1), cursor=quiet.cursor)
    [request] = result.run_requests
    assert request.run_key.startswith("market_event:prices:")
    again = _tick(None, at(11, 2), cursor=result.cursor)  # the same file is not looked at twice
    assert again.run_requests == []

    before = _counts(store)
    outcome = _run("market_event_scan", request, instance)
    assert outcome.success
    scanned = outcome.output_for_node("scan_market_event")
    assert scanned["event_id"] == "mev-20261123-e1" and scanned["batch_id"] == "mev-20261123"
    with store.begin() as conn:
        [event] = conn.execute(select(market_events)).mappings().all()
        members = conn.execute(select(batch_recommendations)).mappings().all()
        member_recs = {r["recommendation_id"]: dict(r) for r in conn.execute(select(recommendations).where(
            recommendations.c.recommendation_id.in_([m["recommendation_id"] for m in members]))).mappings()}
        chain = audit.verify(conn)
    assert event["move"] == pytest.approx(-0.04, abs=1e-4) and event["scanned_at"] is not None
    assert members, "a 4% fall puts accounts outside their bands"
    assert {r["status"] for r in member_recs.values()} <= set(lifecycle.OPEN)
    assert all(r["as_of"] == SESSION for r in member_recs.values())
    assert chain.ok, chain
    # The day's record is unchanged: the scan wrote nothing to the warehouse.
    with duckdb.connect(str(settings.warehouse_path()), read_only=True) as con:
        assert con.execute("select max(as_of) from drift_alerts").fetchone()[0] == SESSION
        assert con.execute("select count(*) from stg_feed_prices where as_of = $d and symbol = 'VTI' and close = $p",
                           {"d": SESSION, "p": closes["VTI"]}).fetchone()[0] == 1
    # The raw file is archived byte for byte.
    archived = home / "archive" / "sha256" / request.run_key.split(":")[-1][:2] / request.run_key.split(":")[-1]
    assert archived.read_bytes() == dropped.read_bytes()

    # The report, severity first, and one email per advisor with their part.
    report = outcome.output_for_node("report_market_event")
    html = (home / report["html"]).read_text() if not report["html"].startswith("/") else open(report["html"]).read()
    assert "mev-20261123" in html
    positions = [html.find(f"••••{r['scope_id'][-4:]}") for r in sorted(
        member_recs.values(), key=lambda r: -next(m["severity"] for m in members
                                                   if m["recommendation_id"] == r["recommendation_id"]))]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), "severity first"
    mails = sink.take_new()
    advisors = {r["advisor_id"] for r in member_recs.values()}
    with store.begin() as conn:
        emails = {u["email"] for u in conn.execute(select(users).where(users.c.user_id.in_(advisors))).mappings()}
    assert {rcpt for m in mails for rcpt in m.recipients} >= emails and len(mails) >= len(advisors)
    bodies = [email.message_from_bytes(m.data, policy=email.policy.default).get_body(("plain",)).get_content()
              for m in mails]
    assert all("/portal/queue?batch=mev-20261123" in body for body in bodies), bodies[0]

    # Exactly once: the same run again publishes, batches and emails nothing new.
    counts = _counts(store)
    assert counts["wf_recommendations"] > before["wf_recommendations"]
    assert _run("market_event_scan", request, instance).success
    assert _counts(store) == counts and sink.take_new() == []

    # A second move the same day (another 4% down since the first event) extends the batch.
    write_intraday_prices(feed_root, DAY, at(12, 30), shocked_prices(shocked, Decimal("-0.04")))
    second = _tick(None, at(12, 31), cursor=again.cursor)
    [request2] = second.run_requests
    assert _run("market_event_scan", request2, instance).success
    with store.begin() as conn:
        batch = conn.execute(select(market_batches)).mappings().one()
        assert [e for e in conn.execute(select(market_events.c.event_id).order_by(market_events.c.seq)).scalars()] \
            == ["mev-20261123-e1", "mev-20261123-e2"]
        assert batch["events"] == 2
        open_members = conn.execute(select(recommendations).join(
            batch_recommendations, batch_recommendations.c.recommendation_id == recommendations.c.recommendation_id)
            .where(recommendations.c.status == "pending").order_by(recommendations.c.recommendation_id)
        ).mappings().all()
        advisor_id = open_members[0]["advisor_id"]
        advisor = dict(conn.execute(select(users).where(users.c.user_id == advisor_id)).mappings().one())
        chosen = [r["recommendation_id"] for r in open_members if r["advisor_id"] == advisor_id][:2]
    assert batch["release_due_at"] is not None

    # The advisor approves two members in one session; the decision sensor does not launch them.
    with store.begin() as conn:
        for rec_id in chosen:
            lifecycle.decide(conn, rec_id, advisor, "approve", at(13, 0), reason="market event review")
    decisions_sensor = build_approval_decisions_sensor(clock=lambda: at(13, 1))
    seen = decisions_sensor(build_sensor_context(resources=resources_for(settings.load_settings())))
    assert not [r for r in (seen.run_requests or []) if r.tags.get("rebal/recommendation") in chosen]

    # Before the release time nothing goes out; after it, one run for the batch's release.
    releases = build_market_event_batches_sensor(clock=lambda: at(13, 2))
    assert releases(build_sensor_context(resources=resources_for(settings.load_settings()))).run_requests == []
    due = batches_due = batch["release_due_at"].replace(tzinfo=batch["release_due_at"].tzinfo or ZoneInfo("UTC"))
    releases = build_market_event_batches_sensor(clock=lambda: due + timedelta(minutes=1))
    [release] = releases(build_sensor_context(resources=resources_for(settings.load_settings()))).run_requests
    assert release.run_key == "market_batch_release:mev-20261123-r1" and batches_due
    ran = _run("execute_rebalance", release, instance)
    assert ran.success
    with store.begin() as conn:
        made = conn.execute(select(decisions).where(decisions.c.recommendation_id.in_(chosen))).mappings().all()
        orders = conn.execute(select(submissions).where(submissions.c.decision_id.in_(
            [d["decision_id"] for d in made]))).mappings().all()
        assert [batches.release_of(conn, d["decision_id"]) for d in made] == ["mev-20261123-r1"] * 2
    passed = [d for d in made if d["gate_verdict"] == "passed"]
    assert passed, [d["gate_verdict"] for d in made]
    assert {o["destination"] for o in orders} <= {"staged/mev-20261123-r1"} | {
        o["destination"] for o in orders if o["channel"] == "submitted"}
    fix_file = settings.outbox_root() / "staged" / "mev-20261123-r1" / "orders.fix"
    # Every message validates against the FIX 4.4 dictionary; a block message allocates to accounts
    # (NoAllocs) and every order of the release is in the file once.
    dictionary = load_fix44()
    assert all(dictionary.validate_wire(line) == [] for line in fix_file.read_bytes().splitlines())
    messages = list(read_fix_file(fix_file))
    assert messages and all(dictionary.validate(m) == [] for m in messages)
    sent = {m.get(11).decode() for m in messages}
    assert {o["cl_ord_id"] for o in orders if o["channel"] == "staged"} <= sent | {
        o["cl_ord_id"] for o in orders if o["block_id"] and o["block_id"] in sent}
    # A second run of the release changes nothing.
    assert _run("execute_rebalance", release, instance).success
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(submissions).where(submissions.c.decision_id.in_(
            [d["decision_id"] for d in made]))).scalar() == len(orders)
    assert warehouse_before is None or warehouse_before <= (home / "warehouse.duckdb").stat().st_mtime_ns
