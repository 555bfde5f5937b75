"""The market-event batch report and the advisors' emails (market_events/report.py), on the real
workflow store (SQLite and Postgres) and a real SMTP server (aiosmtpd).

The batch of Monday 23 November 2026 (New York), built directly in the store:

| event | when (New York)  | source                          | move   | members added              |
|-------|------------------|---------------------------------|--------|----------------------------|
| e1    | 14:35, scan 14:41 | intraday prices                | −3.1%  | REC-A1 REC-A2 REC-B1 REC-B2 |
| e2    | 15:50, scan 15:58 | declared by OPS-1 (HTML and an account in its reason) | — | REC-B3 |

| rec    | advisor | account(s)              | drift / band: equity, FI | severity (by hand) | trade  | est. tax |
|--------|---------|-------------------------|--------------------------|--------------------|--------|----------|
| REC-A1 | ADV-1   | ACC-0001001             | +0.12/0.05, −0.06/0.04   | 2.4 (equity)       | $2,000 | $20.00   |
| REC-A2 | ADV-1   | ACC-0001002             | +0.03/0.05, −0.09/0.05   | 1.8 (FI)           | $2,000 | −$310.50 |
| REC-B1 | ADV-2   | ACC-0002001             | −0.10/0.05, +0.10/0.10   | 2.0 (equity)       | $2,000 | $0.00    |
| REC-B2 | ADV-2   | ACC-0002002             | +0.09/0.05, −0.09/0.10   | 1.8 (equity)       | $3,000 | $150.00  |
| REC-B3 | ADV-2   | ACC-0002003, ACC-0002004 | +0.06/0.05 (equity only) | 1.2 (equity)       | $1,000 | none     |

So the order is A1 (2.4), B1 (2.0), B2 (1.8, $3,000), A2 (1.8, $2,000: the tie goes to the larger
trade), B3 (1.2). ADV-1 approved REC-A2. ADV-1's users.csv row asks for team alerts; ADV-3 is on
ADV-1's team, so ADV-3 gets a copy of ADV-1's part.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from rebal_pipeline.comms.settings import CommsSettings
from rebal_pipeline.market_events import report
from rebal_pipeline.market_events.batches import BatchError
from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.package import PackageBand
from rebal_pipeline.workflow.schema import (
    audit_events, batch_recommendations, market_batches, market_events, messages, notifications,
)
from rebal_pipeline_tests.approvals.conftest import AS_OF, publish, store  # noqa: F401 (the store fixture)
from rebal_pipeline_tests.comms.peers import free_port, smtp_server
from rebal_pipeline_tests.comms.reading import parse, read_html
from rebal_pipeline_tests.factories import USERS, holding, make_package, trade, user

BATCH = "mev-20261123"
E1, E2 = f"{BATCH}-e1", f"{BATCH}-e2"
E1_AT = datetime(2026, 11, 23, 19, 35, tzinfo=timezone.utc)  # 14:35 New York
E1_SCANNED = E1_AT + timedelta(minutes=6)
E2_AT = datetime(2026, 11, 23, 20, 50, tzinfo=timezone.utc)  # 15:50 New York
E2_SCANNED = E2_AT + timedelta(minutes=8)
RELEASE_DUE = E2_AT + timedelta(minutes=120)
NOW = datetime(2026, 11, 23, 21, 5, tzinfo=timezone.utc)
PORTAL = "https://portal.example-ria.com"
QUEUE_LINK = "https://portal.example-ria.com/portal/queue?batch=mev-20261123"
E2_REASON = "Fed surprise <b>rate cut</b>; the client of ACC-0002003 called"
ADV1 = user("ADV-1", name="Dana Advisor", email="dana@example-ria.com", team_alerts="true")
ADV3 = user("ADV-3", name="Alex Associate", email="alex@example-ria.com", team_of="ADV-1")
FIRM = [ADV1, *USERS[1:], ADV3]
ORDER = ["REC-A1", "REC-B1", "REC-B2", "REC-A2", "REC-B3"]
SEVERITY = {"REC-A1": 2.4, "REC-B1": 2.0, "REC-B2": 1.8, "REC-A2": 1.8, "REC-B3": 1.2}
ACCOUNTS = {"REC-A1": ["ACC-0001001"], "REC-A2": ["ACC-0001002"], "REC-B1": ["ACC-0002001"],
            "REC-B2": ["ACC-0002002"], "REC-B3": ["ACC-0002003", "ACC-0002004"]}


def _package(rec_id: str, advisor_id: str, bands: list[tuple[str, float, float]], trade_value: float, tax: dict):
    accounts = ACCOUNTS[rec_id]
    first = accounts[0]
    targets = {"equity": 0.6, "fixed_income": 0.4}
    return make_package(
        recommendation_id=rec_id, as_of=AS_OF, advisor_id=advisor_id, household_id=f"HH-{rec_id[4:]}",
        account_ids=accounts, scope_id=first if len(accounts) == 1 else f"HH-{rec_id[4:]}",
        tier="standard", urgency="medium", delivery="within_48h",
        holdings=[h for a in accounts
                  for h in (holding(a, "VTI", "equity", 70, 100), holding(a, "BND", "fixed_income", 60, 50))],
        trades=[trade(first, "VTI", "equity", "sell", trade_value / 200, 100),
                trade(first, "BND", "fixed_income", "buy", trade_value / 100, 50)],
        bands=[PackageBand(asset_class=c, target_weight=targets[c], band=b, current_weight=targets[c] + d, drift=d)
               for c, d, b in bands],
        tax=tax, inside_bands=True)


PACKAGES = {
    "REC-A1": _package("REC-A1", "ADV-1", [("equity", 0.12, 0.05), ("fixed_income", -0.06, 0.04)], 2000,
                       {"est_tax": 20.0}),
    "REC-A2": _package("REC-A2", "ADV-1", [("equity", 0.03, 0.05), ("fixed_income", -0.09, 0.05)], 2000,
                       {"est_tax": -310.5}),
    "REC-B1": _package("REC-B1", "ADV-2", [("equity", -0.10, 0.05), ("fixed_income", 0.10, 0.10)], 2000,
                       {"est_tax": 0.0}),
    "REC-B2": _package("REC-B2", "ADV-2", [("equity", 0.09, 0.05), ("fixed_income", -0.09, 0.10)], 3000,
                       {"est_tax": 150.0}),
    "REC-B3": _package("REC-B3", "ADV-2", [("equity", 0.06, 0.05)], 1000, {}),
}


@pytest.fixture
def batch(store):  # noqa: F811 (the store fixture of the approvals tests)
    publish(store, *(PACKAGES[r] for r in ("REC-A1", "REC-A2", "REC-B1", "REC-B2")), now=E1_SCANNED, users=FIRM)
    publish(store, PACKAGES["REC-B3"], now=E2_SCANNED, users=FIRM)
    with store.begin() as conn:
        conn.execute(insert(market_batches).values(batch_id=BATCH, trading_day=date(2026, 11, 23),
                                                   session_as_of=AS_OF, opened_at=E1_AT, release_due_at=RELEASE_DUE,
                                                   events=2))
        common = dict(batch_id=BATCH, reference="{}", scan_run_id="run")
        conn.execute(insert(market_events), [
            dict(common, event_id=E1, event_key="prices:e1", seq=1, source="prices", declared_by="rebal:market_events",
                 reason="The reference basket moved -3.1% since the last close", move=-0.031, detected_at=E1_AT,
                 scanned_at=E1_SCANNED, recommendations=4),
            dict(common, event_id=E2, event_key="operator:e2", seq=2, source="operator", declared_by="OPS-1",
                 reason=E2_REASON, move=None, detected_at=E2_AT, scanned_at=E2_SCANNED, recommendations=1)])
        conn.execute(insert(batch_recommendations), [
            {"recommendation_id": r, "batch_id": BATCH, "event_id": E2 if r == "REC-B3" else E1,
             "severity": SEVERITY[r], "added_at": E2_SCANNED if r == "REC-B3" else E1_SCANNED} for r in SEVERITY])
        lifecycle.decide(conn, "REC-A2", {"user_id": "ADV-1", "role": "advisor"}, "approve", NOW - timedelta(minutes=1))
    return store


def rows_of(db, advisor_id=None, **kwargs):
    with db.begin() as conn:
        return report.batch_rows(conn, BATCH, advisor_id, **kwargs)


def rendered(db, through_event=None) -> tuple[str, bytes]:
    with db.begin() as conn:
        return report.render_batch_report(report.batch_summary(conn, BATCH, through_event=through_event),
                                          report.batch_rows(conn, BATCH, through_event=through_event))


def order_in(html: str) -> list[str]:
    return re.findall(r'<tr data-recommendation="([^"]+)"', html)


# ---------------------------------------------------------------------------------------------
# Rows and summary
# ---------------------------------------------------------------------------------------------


def test_rows_are_most_severe_first_with_the_hand_computed_severities(batch):
    rows = rows_of(batch)
    assert [r["recommendation_id"] for r in rows] == ORDER
    assert [r["severity"] for r in rows] == [2.4, 2.0, 1.8, 1.8, 1.2]
    assert [(r["worst_class"], r["worst_drift"], r["band"]) for r in rows] == [
        ("equity", 0.12, 0.05), ("equity", -0.10, 0.05), ("equity", 0.09, 0.05), ("fixed_income", -0.09, 0.05),
        ("equity", 0.06, 0.05)]
    assert [r["trade_value"] for r in rows] == [2000.0, 2000.0, 3000.0, 2000.0, 1000.0]
    assert [r["estimated_tax"] for r in rows] == [20.0, 0.0, 150.0, -310.5, None]
    assert [r["accounts"] for r in rows] == [["••••1001"], ["••••2001"], ["••••2002"], ["••••1002"],
                                             ["••••2003", "••••2004"]]
    assert [r["status"] for r in rows] == ["pending", "pending", "pending", "approved", "pending"]
    assert [r["event_id"] for r in rows] == [E1, E1, E1, E1, E2]
    assert rows[0]["added_at"] == E1_SCANNED and rows[0]["household_id"] == "HH-A1" and rows[4]["scope"] == "household"
    assert "ACC-" not in json.dumps(rows, default=str)
    assert [r["recommendation_id"] for r in rows_of(batch, "ADV-2")] == ["REC-B1", "REC-B2", "REC-B3"]
    assert [r["recommendation_id"] for r in rows_of(batch, through_event=E1)] == ORDER[:4]


def test_the_summary_lists_the_events_in_order_and_counts_by_status_and_advisor(batch):
    with batch.begin() as conn:
        summary = report.batch_summary(conn, BATCH)
    assert summary["batch"] == {"batch_id": BATCH, "trading_day": date(2026, 11, 23), "session_as_of": AS_OF,
                                "opened_at": E1_AT, "release_due_at": RELEASE_DUE, "events": 2}
    assert [(e["event_id"], e["detected_at"], e["source"], e["declared_by"], e["move"]) for e in summary["events"]] == [
        (E1, E1_AT, "prices", "rebal:market_events", -0.031), (E2, E2_AT, "operator", "OPS-1", None)]
    assert summary["events"][1]["reason"] == "Fed surprise <b>rate cut</b>; the client of ••••2003 called"
    assert summary["events"][1]["declared_by_name"] == "Olu Operations"
    # 2,000 + 2,000 + 3,000 + 2,000 + 1,000; 20 + 0 + 150 − 310.50
    assert summary["totals"] == {"members": 5, "open": 4, "by_status": {"pending": 4, "approved": 1},
                                 "trade_value": 10000.0, "estimated_tax": -140.5}
    assert summary["advisors"] == [
        {"advisor_id": "ADV-1", "name": "Dana Advisor", "members": 2, "open": 1,
         "by_status": {"pending": 1, "approved": 1}, "trade_value": 4000.0, "estimated_tax": -290.5},
        {"advisor_id": "ADV-2", "name": "Sam Advisor", "members": 3, "open": 3, "by_status": {"pending": 3},
         "trade_value": 6000.0, "estimated_tax": 150.0}]
    with batch.begin() as conn:
        after_e1 = report.batch_summary(conn, BATCH, through_event=E1)
        with pytest.raises(report.BatchNotFound, match="no market-event batch mev-20261124"):
            report.batch_summary(conn, "mev-20261124")
    assert [e["event_id"] for e in after_e1["events"]] == [E1] and after_e1["totals"]["members"] == 4


# ---------------------------------------------------------------------------------------------
# The report: HTML and CSV
# ---------------------------------------------------------------------------------------------


def test_the_report_is_severity_sorted_masked_escaped_and_the_same_when_rendered_again(batch):
    html, csv_bytes = rendered(batch)
    assert (html, csv_bytes) == rendered(batch)
    assert order_in(html) == ORDER
    assert "ACC-" not in html and b"ACC-" not in csv_bytes
    page = read_html(html).text
    assert "1 | 2.4× | Equity +12.00% vs. ±5.00% | ADV-1 | HH-A1 | ••••1001 | rebalance | standard | $2,000.00 | " \
           "$20.00 | pending | REC-A1 | mev-20261123-e1" in page
    assert "4 | 1.8× | Fixed income -9.00% vs. ±5.00% | ADV-1 | HH-A2 | ••••1002 | rebalance | standard | " \
           "$2,000.00 | $310.50 saving | approved" in page
    assert "••••2003, ••••2004" in page
    assert "Fed surprise <b>rate cut</b>; the client of ••••2003 called" in page  # shown as text …
    assert "&lt;b&gt;rate cut&lt;/b&gt;" in html and "<b>rate cut</b>" not in html  # … never as markup
    assert "| −3.1% |" in page and "Olu Operations (OPS-1)" in page
    assert "Dana Advisor (ADV-1) | 2 | 1 | 1 pending, 1 approved | $4,000.00 | $290.50 saving" in page
    table = list(csv.DictReader(io.StringIO(csv_bytes.decode("utf-8"))))
    assert [r["recommendation_id"] for r in table] == ORDER
    assert table[0] == {"batch_id": BATCH, "event_id": E1, "recommendation_id": "REC-A1", "advisor_id": "ADV-1",
                        "household_id": "HH-A1", "scope": "account", "accounts": "••••1001", "kind": "rebalance",
                        "tier": "standard", "status": "pending", "worst_class": "equity", "worst_drift": "0.120000",
                        "band": "0.050000", "severity": "2.400000", "trade_value": "2000.00",
                        "estimated_tax": "20.00", "added_at": "2026-11-23T14:41:00-05:00"}
    assert (table[3]["estimated_tax"], table[4]["estimated_tax"], table[4]["accounts"]) == (
        "-310.50", "", "••••2003 ••••2004")


# ---------------------------------------------------------------------------------------------
# Writing the report after an event: once, with its audit event
# ---------------------------------------------------------------------------------------------


def write(db, root: Path, event_id: str = E1):
    with db.begin() as conn:
        return report.write_batch_report(conn, root, BATCH, event_id, NOW)


def report_events(db) -> list[dict]:
    with db.begin() as conn:
        assert audit.verify(conn, anchors=False).ok
        return [dict(r) for r in conn.execute(select(audit_events).where(
            audit_events.c.kind == "market_batch_report").order_by(audit_events.c.seq)).mappings()]


def test_the_report_after_an_event_is_written_once_and_its_audit_event_holds_the_files_sha256(batch, tmp_path):
    expected = rendered(batch, through_event=E1)
    first = write(batch, tmp_path)
    folder = tmp_path / "market-events" / BATCH
    assert (first.html_path, first.csv_path) == (folder / f"after_{E1}.html", folder / f"after_{E1}.csv")
    assert first.written
    assert first.html_path.read_text("utf-8") == expected[0] and first.csv_path.read_bytes() == expected[1]
    # The report after e1 holds e1's members only, though e2 came since.
    assert order_in(expected[0]) == ORDER[:4] and "REC-B3" not in expected[0]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in (first.html_path, first.csv_path)} == {"0o600"}
    digests = {"csv": hashlib.sha256(first.csv_path.read_bytes()).hexdigest(),
               "html": hashlib.sha256(first.html_path.read_bytes()).hexdigest()}
    assert first.sha256 == digests
    (event,) = report_events(batch)
    assert (event["event_id"], event["actor"], event["subject_id"]) == (
        "market_batch_report:mev-20261123-e1", "rebal:market_events", BATCH)
    assert json.loads(event["payload"])["sha256"] == digests
    assert json.loads(event["payload"])["files"] == {"html": "after_mev-20261123-e1.html",
                                                     "csv": "after_mev-20261123-e1.csv"}

    again = write(batch, tmp_path)
    assert not again.written and again.sha256 == digests
    assert first.csv_path.read_bytes() == expected[1] and len(report_events(batch)) == 1

    # A file lost while the store is unchanged is written again, byte for byte.
    first.html_path.unlink()
    assert write(batch, tmp_path).written and first.html_path.read_text("utf-8") == expected[0]

    # A decision later changes the live report, not the one written after e1: a re-run writes nothing.
    with batch.begin() as conn:
        lifecycle.decide(conn, "REC-B1", {"user_id": "ADV-2", "role": "advisor"}, "approve", NOW)
    assert rendered(batch, through_event=E1) != expected
    assert not write(batch, tmp_path).written and first.html_path.read_text("utf-8") == expected[0]

    # … and a lost file can no longer be regenerated as recorded: refused, nothing written.
    first.html_path.unlink()
    with pytest.raises(report.ReportConflict, match="after_mev-20261123-e1.html: missing, and the report after "
                                                    "mev-20261123-e1 no longer renders as recorded"):
        write(batch, tmp_path)
    assert not first.html_path.exists()

    # A changed file is never replaced.
    first.csv_path.write_bytes(b"edited by hand\r\n")
    with pytest.raises(report.ReportConflict, match=r"after_mev-20261123-e1\.csv: SHA-256 .* is not the .* "
                                                    "recorded in audit event market_batch_report:mev-20261123-e1"):
        write(batch, tmp_path)
    assert first.csv_path.read_bytes() == b"edited by hand\r\n" and len(report_events(batch)) == 1


def test_a_file_in_the_way_is_an_error_and_nothing_is_recorded(batch, tmp_path):
    folder = tmp_path / "market-events" / BATCH
    folder.mkdir(parents=True)
    (folder / f"after_{E2}.csv").write_bytes(b"someone else's file\r\n")
    with pytest.raises(report.ReportConflict, match="after_mev-20261123-e2.csv: already written with other content"):
        write(batch, tmp_path, E2)
    assert (folder / f"after_{E2}.csv").read_bytes() == b"someone else's file\r\n" and report_events(batch) == []
    with pytest.raises(report.BatchNotFound, match="no market event mev-20261123-e3 in batch mev-20261123"):
        write(batch, tmp_path, f"{BATCH}-e3")
    with pytest.raises(BatchError, match="not a market-event id"):
        write(batch, tmp_path, "../e1")


# ---------------------------------------------------------------------------------------------
# The advisors' emails
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def smtp_peer():
    with smtp_server() as peer:
        yield peer


def comms_for(peer) -> CommsSettings:
    return CommsSettings.from_settings(load_settings({
        "REBAL_SMTP_HOST": peer.host, "REBAL_SMTP_PORT": str(peer.port), "REBAL_SMTP_STARTTLS": "false",
        "REBAL_SMTP_FROM": "Example RIA <alerts@example-ria.com>", "REBAL_SMTP_TIMEOUT": "5"}))


def queue(db, event_id: str) -> int:
    with db.begin() as conn:
        return report.email_advisors(conn, BATCH, event_id, NOW, portal_url=PORTAL)


def queued_keys(db) -> list[str]:
    with db.begin() as conn:
        return list(conn.execute(select(notifications.c.notification_key).where(
            notifications.c.kind == "market_event").order_by(notifications.c.notification_key)).scalars())


def test_each_advisor_is_emailed_their_part_once(batch, smtp_peer):
    assert queue(batch, E1) == 3
    assert queue(batch, E1) == 0  # a re-run queues nothing
    assert queued_keys(batch) == ["market_event:mev-20261123-e1:ADV-1", "market_event:mev-20261123-e1:ADV-1:ADV-3",
                                  "market_event:mev-20261123-e1:ADV-2"]
    comms = comms_for(smtp_peer)
    sent = [d for key in queued_keys(batch) for d in report.send_advisor_email(batch, key, NOW, comms=comms)]
    assert [d.status for d in sent] == ["sent", "sent", "sent"]
    again = [d for key in queued_keys(batch) for d in report.send_advisor_email(batch, key, NOW, comms=comms)]
    assert [d.status for d in again] == ["already_sent"] * 3
    assert [m.rcpt_tos for m in smtp_peer.messages] == [["dana@example-ria.com"], ["alex@example-ria.com"],
                                                        ["sam@example-ria.com"]]
    mails = [parse(m.data) for m in smtp_peer.messages]
    assert [m["Subject"] for m in mails] == [
        "Market event −3.1% on 23 Nov 2026: 2 recommendations to review",
        "Market event −3.1% on 23 Nov 2026: 2 recommendations to review for Dana Advisor",
        "Market event −3.1% on 23 Nov 2026: 2 recommendations to review"]
    theirs = {0: ["REC-A1", "REC-A2"], 1: ["REC-A1", "REC-A2"], 2: ["REC-B1", "REC-B2"]}
    for number, mail in enumerate(mails):
        text = mail.get_body(("plain",)).get_content()
        html = read_html(mail.get_body(("html",)).get_content())
        shown = [r for r in ORDER if r in html.text]
        assert shown == theirs[number], number  # their rows only, most severe first
        assert [r for r in ORDER if r in text] == theirs[number]
        assert html.links == [QUEUE_LINK] and QUEUE_LINK in text
        assert "ACC-" not in text and "ACC-" not in html.text
    dana = read_html(mails[0].get_body(("html",)).get_content()).text
    assert "2.4× | HH-A1\n••••1001 · REC-A1 | Equity +12.00% vs. ±5.00% | $2,000.00 | $20.00 | pending" in dana
    assert "1.8× | HH-A2\n••••1002 · REC-A2 | Fixed income -9.00% vs. ±5.00% | $2,000.00 | $310.50 saving | " \
           "approved" in dana
    assert ("Event 1 of the day, 2026-11-23 14:35 New York time, seen by rebal in the intraday prices: The reference "
            "basket moved -3.1% since the last close") in dana
    assert "a copy for Dana Advisor's team" in read_html(mails[1].get_body(("html",)).get_content()).text
    with batch.begin() as conn:
        rows = conn.execute(select(messages.c.message_key, messages.c.status, messages.c.attempts).where(
            messages.c.kind == "market_event").order_by(messages.c.message_key)).all()
        assert audit.verify(conn, anchors=False).ok
    assert [(r.status, r.attempts) for r in rows] == [("sent", 1)] * 3

    # The second event added one recommendation, of ADV-2's: one email, with that row only.
    assert queue(batch, E2) == 1
    sent = report.send_event_emails(batch, E2, NOW, comms=comms)
    assert [(d.message_key, d.status) for d in sent] == [("market_event:mev-20261123-e2:ADV-2", "sent")]
    assert [d.status for d in report.send_event_emails(batch, E1, NOW, comms=comms)] == ["already_sent"] * 3
    assert len(smtp_peer.messages) == 4
    last = parse(smtp_peer.messages[-1].data)
    assert last["Subject"] == "Market event on 23 Nov 2026 (declared): 1 recommendation to review"
    body = read_html(last.get_body(("html",)).get_content()).text
    assert [r for r in ORDER if r in body] == ["REC-B3"] and "••••2003, ••••2004" in body
    assert ("declared by Olu Operations (OPS-1): Fed surprise <b>rate cut</b>; the client of ••••2003 called" in body
            and "ACC-" not in body)


def test_no_email_before_the_event_is_scanned_and_only_to_a_portal_over_https(batch):
    with batch.begin() as conn:
        conn.execute(insert(market_events).values(
            event_id=f"{BATCH}-e3", event_key="operator:e3", batch_id=BATCH, seq=3, source="operator",
            declared_by="OPS-1", reason="Another move", move=None, reference="{}", detected_at=NOW))
    with pytest.raises(BatchError, match="mev-20261123-e3 has not been scanned yet"):
        queue(batch, f"{BATCH}-e3")
    with pytest.raises(ValueError, match="not an https URL"), batch.begin() as conn:
        report.email_advisors(conn, BATCH, E1, NOW, portal_url="http://portal.example-ria.com")
    assert queued_keys(batch) == []


def test_an_email_the_relay_refused_for_now_is_sent_by_the_retry_sensors_job_once(batch, smtp_peer):
    from rebal_pipeline.comms import delivery
    from rebal_pipeline.defs.comms.jobs import retry_target
    from rebal_pipeline.workflow.schema import messages

    queue(batch, E1)
    down = CommsSettings.from_settings(load_settings({  # nothing listens on this port: a passing failure
        "REBAL_SMTP_HOST": "127.0.0.1", "REBAL_SMTP_PORT": str(free_port()), "REBAL_SMTP_STARTTLS": "false",
        "REBAL_SMTP_FROM": "Example RIA <alerts@example-ria.com>", "REBAL_SMTP_TIMEOUT": "2"}))
    first = report.send_event_emails(batch, E1, NOW, comms=down)
    assert {d.status for d in first} == {"retry"}
    with batch.begin() as conn:
        rows = [dict(r) for r in conn.execute(select(messages).where(messages.c.kind == "market_event")).mappings()]
    # outbound_retries hands each to the send_notification job, which sends it once.
    targets = {retry_target(r)[0] for r in rows}
    assert targets == {"send_notification"}
    later = NOW + timedelta(hours=1)
    sent = [d for r in rows for d in delivery.send_notification_email(batch, None, r["message_key"], later,
                                                                       comms=comms_for(smtp_peer))]
    assert {d.status for d in sent} == {"sent"} and len(smtp_peer.messages) == len(rows)
    again = [d for r in rows for d in delivery.send_notification_email(batch, None, r["message_key"], later,
                                                                        comms=comms_for(smtp_peer))]
    assert {d.status for d in again} == {"already_sent"} and len(smtp_peer.messages) == len(rows)
