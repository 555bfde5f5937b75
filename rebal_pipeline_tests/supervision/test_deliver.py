"""Producing the report: three files, one audit event per period (the chain still verifies),
one email per active compliance user through a real SMTP server (aiosmtpd) with the PDF and the
CSV attached — and none again when the period is produced a second time. The same through the
Dagster job, its schedule, and `rebal supervisory-report`."""

import argparse
import email
import email.policy
import hashlib
import json
from datetime import datetime, timezone

import pytest
from dagster import DefaultScheduleStatus, RunRequest, build_schedule_context
from sqlalchemy import select

from rebal_pipeline.comms.settings import CommsSettings
from rebal_pipeline.settings import load_settings
from rebal_pipeline.supervision import command
from rebal_pipeline.supervision.deliver import EVENT_KIND, MESSAGE_KIND, event_id_of, produce
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import audit_events, messages
from rebal_pipeline_tests.comms.peers import smtp_server
from rebal_pipeline_tests.supervision.conftest import WEEK

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def smtp_peer():
    with smtp_server() as peer:
        yield peer


def relay(peer) -> dict:
    return {"REBAL_SMTP_HOST": peer.host, "REBAL_SMTP_PORT": str(peer.port), "REBAL_SMTP_STARTTLS": "false",
            "REBAL_SMTP_FROM": "Example RIA <alerts@example-ria.com>", "REBAL_SMTP_TIMEOUT": "5"}


def make(book, comms=None):
    return produce(book.store, WEEK, out_dir=book.out, now=NOW, anchors=book.anchors,
                   wash_sale_overrides=book.overrides, comms=comms)


def report_events(store) -> list[dict]:
    with store.begin() as conn:
        assert audit.verify(conn, anchors=False).ok
        return [dict(r) for r in conn.execute(select(audit_events).where(audit_events.c.kind == EVENT_KIND)).mappings()]


def test_the_files_and_one_audit_event_per_period(book):
    first = make(book)
    assert sorted(first.files) == ["csv", "html", "pdf"]
    assert {p.name for p in first.files.values()} == {
        "supervisory_report_2026-11-16_2026-11-22.html", "supervisory_report_2026-11-16_2026-11-22.pdf",
        "supervisory_report_2026-11-16_2026-11-22.csv"}
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in first.files.values())
    bytes_before = {fmt: p.read_bytes() for fmt, p in first.files.items()}
    assert first.recorded.created and first.recorded.matches
    again = make(book)
    assert not again.recorded.created and again.recorded.matches and again.sha256 == first.sha256
    assert {fmt: p.read_bytes() for fmt, p in again.files.items()} == bytes_before
    (event,) = report_events(book.store)
    assert event["event_id"] == event_id_of(WEEK, ["pdf", "html", "csv"]) == "supervisory_report:2026-11-16:2026-11-22:csv+html+pdf"
    assert json.loads(event["payload"])["sha256"] == first.sha256
    with book.store.begin() as conn:
        assert audit.verify(conn, anchors=book.anchors).ok


def test_emailed_once_to_every_compliance_user_with_the_pdf_and_csv(book, smtp_peer):
    comms = CommsSettings.from_settings(load_settings(relay(smtp_peer)))
    first = make(book, comms)
    assert [(d.message_key, d.status) for d in first.deliveries] == [
        ("supervisory_report:2026-11-16:2026-11-22:CCO-1", "sent"),
        ("supervisory_report:2026-11-16:2026-11-22:CCO-2", "sent")]
    again = make(book, comms)
    assert [d.status for d in again.deliveries] == ["already_sent", "already_sent"]
    assert len(smtp_peer.messages) == 2
    assert sorted(r for m in smtp_peer.messages for r in m.rcpt_tos) == ["casey@example-ria.com", "cco@example-ria.com"]
    files = {fmt: p.read_bytes() for fmt, p in first.files.items()}
    for received in smtp_peer.messages:
        mail = email.message_from_bytes(received.data, policy=email.policy.default)
        assert mail["Subject"] == "Supervisory review report 2026-11-16 to 2026-11-22: 7 recommendations, 7 exceptions"
        attached = {part.get_filename(): part.get_payload(decode=True) for part in mail.iter_attachments()}
        assert attached == {"supervisory_report_2026-11-16_2026-11-22.pdf": files["pdf"],
                            "supervisory_report_2026-11-16_2026-11-22.csv": files["csv"]}
        assert [part.get_content_type() for part in mail.iter_attachments()] == ["application/pdf", "text/csv"]
        body = mail.get_body(("plain",)).get_content()
        assert first.sha256["pdf"] in body and "Alert past its review window: 1" in body
        assert "ACC-" not in body
    with book.store.begin() as conn:
        rows = conn.execute(select(messages.c.message_key, messages.c.status, messages.c.attempts)
                            .where(messages.c.kind == MESSAGE_KIND).order_by(messages.c.message_key)).all()
    assert [(r.status, r.attempts) for r in rows] == [("sent", 1), ("sent", 1)]
    assert len(report_events(book.store)) == 1


def test_the_job_writes_records_and_emails_the_period(book, smtp_peer, tmp_path, monkeypatch):
    from rebal_pipeline.defs.supervision.defs import supervisory_report
    from rebal_pipeline.resources import resources_for

    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    deployment = load_settings({**relay(smtp_peer), "REBAL_HOME": str(tmp_path / "home"),
                                "REBAL_WORKFLOW_DB_URL": book.store.url, "REBAL_AUDIT_ANCHOR_DIR": str(book.anchors),
                                "REBAL_WASH_SALE_OVERRIDES": str(book.overrides)})
    monkeypatch.setenv("REBAL_AUDIT_ANCHOR_DIR", str(book.anchors))
    resources = resources_for(deployment)
    result = supervisory_report.execute_in_process(
        run_config={"ops": {"write_supervisory_report": {"config": {
            "date_from": "2026-11-16", "date_to": "2026-11-22", "now": NOW.isoformat()}}}},
        resources={k: resources[k] for k in ("workflow_store", "feed", "advisor_overrides", "email", "crm", "links",
                                             "approval_clock", "drift_policy_source")})
    assert result.success
    [output] = [e for e in result.all_node_events if e.is_successful_output]
    metadata = output.step_output_data.metadata
    assert metadata["recommendations"].value == 7 and metadata["audit_chain_verified"].value is True
    assert (tmp_path / "home" / "outbox" / "supervision" / "2026-11-16_2026-11-22"
            / "supervisory_report_2026-11-16_2026-11-22.pdf").exists()
    assert len(smtp_peer.messages) == 2 and len(report_events(book.store)) == 1


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_the_schedule_follows_the_policy_frequency_and_starts_stopped(store, tmp_path):
    from rebal_pipeline.core.policy import DEFAULT_POLICY_FILE
    from rebal_pipeline.defs.supervision.defs import build_schedules, schedules

    assert [s.default_status for s in schedules] == [DefaultScheduleStatus.STOPPED]
    assert schedules[0].cron_schedule == "0 7 * * 1"  # the shipped policy: weekly
    monthly = tmp_path / "policy.yaml"
    monthly.write_text(DEFAULT_POLICY_FILE.read_text().replace("frequency: weekly", "frequency: monthly"))
    (schedule,) = build_schedules(load_settings({"REBAL_DRIFT_POLICY": str(monthly)}))
    assert schedule.cron_schedule == "0 7 1 * *" and schedule.default_status == DefaultScheduleStatus.STOPPED
    tick = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)  # 07:00 New York on 1 December
    request = schedule.evaluate_tick(build_schedule_context(scheduled_execution_time=tick)).run_requests[0]
    assert isinstance(request, RunRequest) and request.run_key == "supervisory_report:2026-11-01:2026-11-30"
    config = request.run_config["ops"]["write_supervisory_report"]["config"]
    assert (config["date_from"], config["date_to"], config["scheduled"]) == ("2026-11-01", "2026-11-30", True)


def test_the_command_writes_the_files_and_prints_their_sha256(book, smtp_peer, tmp_path, monkeypatch, capsys):
    for name, value in {**relay(smtp_peer), "REBAL_HOME": str(tmp_path / "home"), "REBAL_WORKFLOW_DB_URL": book.store.url,
                        "REBAL_AUDIT_ANCHOR_DIR": str(book.anchors),
                        "REBAL_WASH_SALE_OVERRIDES": str(book.overrides)}.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--from", "2026-11-16", "--to", "2026-11-22", "--email"])) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "home" / "outbox" / "supervision" / "2026-11-16_2026-11-22"
    pdf = folder / "supervisory_report_2026-11-16_2026-11-22.pdf"
    assert f"{pdf}  sha256 {hashlib.sha256(pdf.read_bytes()).hexdigest()}" in out
    assert "Recorded in the audit chain as supervisory_report:2026-11-16:2026-11-22:csv+html+pdf." in out
    assert "Email to CCO-1: sent" in out and "Email to CCO-2: sent" in out
    elsewhere = tmp_path / "copy"
    assert command.run(parser.parse_args(["--from", "2026-11-16", "--to", "2026-11-22", "--out", str(elsewhere)])) == 0
    assert "Already recorded in the audit chain" in capsys.readouterr().out
    assert (elsewhere / pdf.name).read_bytes() == pdf.read_bytes()
    assert len(smtp_peer.messages) == 2
    assert command.run(parser.parse_args(["--from", "2026-11-22", "--to", "2026-11-16"])) == 2  # ends before it starts
