"""The outbox protocol (comms/outbound.py) against real peers — an SMTP server (aiosmtpd) and a CRM
HTTP server on 127.0.0.1 — and the workflow store on SQLite and Postgres: a sent key is never
sent again; a send interrupted by a crash is repeated with the same Message-ID; a peer that is
down leaves the message for a retry with capped exponential backoff; a permanent refusal is
final; every outcome is an audit event with ids only."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from rebal_pipeline.comms import emails, outbound
from rebal_pipeline.comms.crm import RedtailStyleClient, RetryPolicy
from rebal_pipeline.comms.outbound import OutboundPolicy, Permanent, Transient, deliver
from rebal_pipeline.comms.smtp import SmtpSettings, make_message_id
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import audit_events, messages
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.comms.fixtures import CLIENT_NAME, LINKS, make_package
from rebal_pipeline_tests.comms.peers import Reply, crm_server, free_port, smtp_server
from rebal_pipeline_tests.comms.reading import parse

DOMAIN = "example-ria.com"
ADVISOR_EMAIL = "dana@example-ria.com"
T0 = datetime(2026, 11, 20, 21, 31, tzinfo=timezone.utc)
KEY = "alert:9f2c1e0a7b6d5c4e3f2a1b0c9d8e7f60:ADV-1"
REC = "9f2c1e0a7b6d5c4e3f2a1b0c9d8e7f60"


def relay(port: int) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=port, sender=f"rebal <alerts@{DOMAIN}>", starttls=False, timeout=5)


def alert_sender(settings_of):
    """A send function for the fixture's alert through the relay `settings_of()` returns now."""
    def send(message_key: str) -> str:
        settings = settings_of()
        return outbound.email_sender(lambda message_id: emails.advisor_alert(
            make_package(), client_name=CLIENT_NAME, links=LINKS, sender=settings.sender, to=ADVISOR_EMAIL,
            message_id=message_id), settings)(message_key)
    return send


def send_alert(store, send_fn, now, policy=outbound.DEFAULT_POLICY, key=KEY):
    return deliver(store.begin, key, "alert", "smtp", send_fn, now, recipient_id="ADV-1", recommendation_id=REC,
                   policy=policy)


def row(store, key=KEY) -> dict:
    with store.begin() as conn:
        return dict(conn.execute(select(messages).where(messages.c.message_key == key)).mappings().one())


def events(store) -> list[dict]:
    with store.begin() as conn:
        rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings().all()
        assert audit.verify(conn).ok
    return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


def utc(moment):
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Crash(BaseException):
    """The process dies (a BaseException: nothing in the protocol may swallow it)."""


# ---------------------------------------------------------------------------------------------
# Exactly once, and the same identity on a re-send
# ---------------------------------------------------------------------------------------------


def test_a_sent_key_is_sent_once_with_its_message_id_and_one_audit_event_carrying_ids_only(store):
    with smtp_server() as peer:
        first = send_alert(store, alert_sender(lambda: relay(peer.port)), T0)
        again = send_alert(store, alert_sender(lambda: relay(peer.port)), T0 + timedelta(hours=1))
    assert (first.status, again.status) == ("sent", "already_sent")
    [received] = peer.messages
    message_id = make_message_id(KEY, DOMAIN)
    assert parse(received.data)["Message-ID"] == message_id == first.external_id == again.external_id
    stored = row(store)
    assert (stored["status"], stored["attempts"], stored["external_id"], stored["next_attempt_at"]) == (
        "sent", 1, message_id, None)
    [event] = events(store)
    assert (event["event_id"], event["kind"], event["subject_id"], event["actor"]) == (
        f"alert_sent:{KEY}", "alert_sent", REC, "rebal:mailer")
    assert event["payload"] == {"message_key": KEY, "channel": "smtp", "recipient_id": "ADV-1",
                                "recommendation_id": REC, "external_id": message_id, "attempts": 1}
    assert ADVISOR_EMAIL not in json.dumps(event, default=str) and "Avery" not in json.dumps(event, default=str)


def test_a_send_interrupted_by_a_crash_is_repeated_after_its_lease_with_the_same_message_id(store):
    policy = OutboundPolicy(lease=timedelta(minutes=15))
    with smtp_server() as peer:
        sender = alert_sender(lambda: relay(peer.port))

        def send_then_die(message_key):
            sender(message_key)  # the relay accepted it ...
            raise Crash()  # ... and the process died before recording it

        with pytest.raises(Crash):
            send_alert(store, send_then_die, T0, policy)
        assert row(store)["status"] == "pending"
        # Within the lease it may still be in flight elsewhere: nobody sends it.
        assert send_alert(store, sender, T0 + timedelta(minutes=14), policy).status == "in_flight"
        assert len(peer.messages) == 1
        # The lease ran out: the restart sends it again, as the same message.
        again = send_alert(store, sender, T0 + timedelta(minutes=15), policy)
        assert send_alert(store, sender, T0 + timedelta(hours=2), policy).status == "already_sent"
    assert again.status == "sent" and again.attempts == 2
    ids = [parse(m.data)["Message-ID"] for m in peer.messages]
    assert ids == [make_message_id(KEY, DOMAIN)] * 2  # at least once on the wire, one identity
    assert [e["kind"] for e in events(store)] == ["alert_sent"]


def test_a_concurrent_sender_finds_the_attempt_in_flight_and_sends_nothing(store):
    calls = []

    def send(message_key):
        calls.append(message_key)
        # Another worker picks up the same key while this one talks to the relay.
        inner = send_alert(store, send, T0)
        calls.append(inner.status)
        return "<x@example-ria.com>"

    assert send_alert(store, send, T0).status == "sent"
    assert calls == [KEY, "in_flight"]


# ---------------------------------------------------------------------------------------------
# Retry and rejection
# ---------------------------------------------------------------------------------------------


def test_an_unreachable_relay_is_retried_with_capped_exponential_backoff_until_it_answers(store):
    policy = OutboundPolicy(first_retry=timedelta(minutes=5), max_retry=timedelta(minutes=20))
    dead = free_port()
    target = {"settings": relay(dead)}
    sender = alert_sender(lambda: target["settings"])
    waits, now = [], T0
    for _ in range(4):
        result = send_alert(store, sender, now, policy)
        assert result.status == "retry" and not result.unexpected
        waits.append(result.next_attempt_at - now)
        # Not due yet: nothing is attempted.
        assert send_alert(store, sender, now + timedelta(minutes=1), policy).status == "not_due"
        now = result.next_attempt_at
    assert waits == [timedelta(minutes=m) for m in (5, 10, 20, 20)]
    stored = row(store)
    assert (stored["status"], stored["attempts"]) == ("retry", 4)
    assert stored["last_error"] == "could not reach the peer (ConnectionRefusedError)"
    with store.begin() as conn:
        assert [r["message_key"] for r in outbound.due(conn, now)] == [KEY]
        assert outbound.due(conn, now - timedelta(seconds=1)) == []

    with smtp_server() as peer:
        target["settings"] = relay(peer.port)
        done = send_alert(store, sender, now, policy)
    assert done.status == "sent" and done.attempts == 5 and len(peer.messages) == 1
    kinds = [e["kind"] for e in events(store)]
    assert kinds == ["alert_retry"] * 4 + ["alert_sent"]
    assert events(store)[0]["payload"]["error"] == "could not reach the peer (ConnectionRefusedError)"


class RefuseRecipients:
    """An SMTP handler answering 550 to every RCPT, echoing the address (as relays do)."""

    def __init__(self):
        self.rcpt = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt += 1
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


def test_a_recipient_refused_for_good_is_rejected_never_retried_and_requeued_only_by_a_person(store):
    from aiosmtpd.controller import Controller

    handler, port = RefuseRecipients(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    try:
        sender = alert_sender(lambda: relay(port))
        first = send_alert(store, sender, T0)
        later = send_alert(store, sender, T0 + timedelta(days=1))
    finally:
        controller.stop()
    assert (first.status, later.status, handler.rcpt) == ("rejected", "rejected", 1)
    stored = row(store)
    assert stored["last_error"] == "the mail relay refused the recipient (SMTP 550)"
    assert ADVISOR_EMAIL not in stored["last_error"]
    with store.begin() as conn:
        assert outbound.due(conn, T0 + timedelta(days=30)) == []
        assert outbound.requeue(conn, KEY, "OPS-1", T0 + timedelta(days=2))
        assert [r["message_key"] for r in outbound.due(conn, T0 + timedelta(days=2))] == [KEY]
    assert [e["kind"] for e in events(store)] == ["alert_rejected", "alert_requeued"]
    assert ADVISOR_EMAIL not in json.dumps(events(store), default=str)


def test_crm_unavailable_waits_for_its_retry_after_and_then_creates_one_note_with_one_idempotency_key(store):
    def note_sender(peer):
        def send(message_key):
            crm = RedtailStyleClient(peer.url + "/crm/v1/rest", api_key="k", user_key="u",
                                     retry=RetryPolicy(max_attempts=1, request_timeout=5))
            with crm:
                return crm.record_note("HH-1", date(2026, 11, 23), "rebalance", "Sell 10 VTI",
                                       idempotency_key=message_key).id
        return send

    key = "crm_note:d-1"
    with crm_server() as peer:
        peer.script("/crm/v1/rest/contacts/HH-1/notes", Reply(503, {}, {"Retry-After": "3600"}))
        down = deliver(store.begin, key, "crm_note", "crm", note_sender(peer), T0, recommendation_id="REC-1")
        assert down.status == "retry" and down.next_attempt_at == T0 + timedelta(hours=1)  # > the 5 min backoff
        assert "unavailable" in down.error and "503" in down.error
        up = deliver(store.begin, key, "crm_note", "crm", note_sender(peer), down.next_attempt_at,
                     recommendation_id="REC-1")
        peer.script("/crm/v1/rest/contacts/HH-1/notes", Reply(422, {"error": "contact unknown"}))
        refused = deliver(store.begin, "crm_note:d-2", "crm_note", "crm", note_sender(peer), T0,
                          recommendation_id="REC-2")
    assert (up.status, up.external_id) == ("sent", "1")
    notes = [r for r in peer.requests if r.path == "/crm/v1/rest/contacts/HH-1/notes"]
    assert len({r.headers["idempotency-key"] for r in notes[:2]}) == 1 and len(notes) == 3
    assert refused.status == "rejected" and "HTTP 422" in refused.error
    assert [e["kind"] for e in events(store)] == ["crm_note_retry", "crm_note_sent", "crm_note_rejected"]
    assert all(e["actor"] == "rebal:crm" for e in events(store))


def test_a_transient_failure_past_max_attempts_is_rejected_with_the_last_reason(store):
    policy = OutboundPolicy(max_attempts=3)

    def busy(_key):
        raise Transient("the warehouse cannot be read now (IOException)")

    now, statuses = T0, []
    for _ in range(3):
        result = send_alert(store, busy, now, policy)
        statuses.append(result.status)
        now = result.next_attempt_at or now
    assert statuses == ["retry", "retry", "rejected"]
    assert row(store)["last_error"] == ("gave up after 3 attempts; the last one failed: the warehouse cannot be "
                                        "read now (IOException)")


def test_a_permanent_problem_found_while_rendering_is_rejected_at_once(store):
    def no_address(_key):
        raise Permanent("the advisor of record has no email address in the workflow store")

    result = send_alert(store, no_address, T0)
    assert result.status == "rejected" and result.attempts == 1
    assert [e["kind"] for e in events(store)] == ["alert_rejected"]


def test_an_unexpected_error_is_queued_for_a_retry_flagged_and_its_text_kept_out_of_the_record(store):
    def bug(_key):
        raise KeyError("avery.client@example.com")

    result = send_alert(store, bug, T0)
    assert (result.status, result.unexpected) == ("retry", True)
    assert row(store)["last_error"] == "unexpected KeyError while sending (see the run's log)"
    assert "avery" not in json.dumps(events(store), default=str)


def test_withdrawing_ends_an_unsent_message_and_a_skip_is_recorded_without_a_row(store):
    def down(_key):
        raise Transient("could not reach the peer (ConnectionRefusedError)")

    send_alert(store, down, T0)
    with store.begin() as conn:
        assert outbound.withdraw(conn, KEY, "the recommendation is approved", T0 + timedelta(minutes=1))
        assert outbound.due(conn, T0 + timedelta(days=1)) == []
        assert outbound.record_skipped(conn, "crm_task:REC-1", "crm_task", "no CRM is configured", T0,
                                       recommendation_id="REC-1")
        assert not outbound.record_skipped(conn, "crm_task:REC-1", "crm_task", "no CRM is configured", T0,
                                           recommendation_id="REC-1")
    assert row(store)["last_error"] == "withdrawn: the recommendation is approved"
    assert [e["kind"] for e in events(store)] == ["alert_retry", "alert_withdrawn", "crm_task_skipped"]


def test_the_backoff_doubles_from_the_first_retry_and_is_capped():
    policy = OutboundPolicy()
    assert [policy.backoff(n) for n in (1, 2, 3)] == [timedelta(minutes=m) for m in (5, 10, 20)]
    assert policy.backoff(50) == timedelta(hours=6)
    assert policy.backoff(1, retry_after=120) == timedelta(minutes=5)
    assert policy.backoff(1, retry_after=86400) == timedelta(hours=6)


def test_a_client_confirmation_is_logged_with_its_account_masked(store, caplog):
    # Run logs leave the warehouse: a confirmation's key names the account, shown as ••••4321.
    caplog.set_level("INFO", logger="rebal")
    key = "confirmation:DEC-1:ACC-87654321"
    deliver(store.begin, key, "confirmation", "smtp", lambda _key: "<id@example-ria.com>", T0)
    deliver(store.begin, key, "confirmation", "smtp", lambda _key: "<id@example-ria.com>", T0)  # already sent
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "confirmation:DEC-1:••••4321" in logged and "87654321" not in logged
    with store.begin() as conn:  # the store keeps the key whole
        assert conn.execute(select(messages.c.message_key)).scalar() == key
