"""CRM notes and tasks against a real HTTP server on 127.0.0.1: the JSON bodies and headers the CRM
receives, retries on 429 (Retry-After respected) and 5xx with one Idempotency-Key, the OAuth
refresh on an expired token, and CrmUnavailable / CrmRejected when retrying cannot help."""

from __future__ import annotations

import base64
import logging
import time
from datetime import date, datetime, timezone

import pytest

from rebal_pipeline.comms.crm import (
    CrmRejected, CrmUnavailable, RedtailStyleClient, RetryPolicy, WealthboxStyleClient, idempotency_key,
)
from rebal_pipeline_tests.comms.peers import CrmPeer, Reply, crm_server, free_port

# Fast but real backoff: the tests wait milliseconds, the production default waits seconds.
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, max_total_seconds=5.0, jitter=0.0,
                   request_timeout=5.0)

RATIONALE = "Equity 11.54% over target (band ±5%); approved by ADV-1"
TRADES = "Sell 120 VTI; Buy 412.3456 BND"


class RecordingSleep:
    def __init__(self):
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def wealthbox(peer: CrmPeer, retry: RetryPolicy = FAST, **kwargs) -> WealthboxStyleClient:
    env = {
        "REBAL_WEALTHBOX_BASE_URL": peer.url + "/v1", "REBAL_WEALTHBOX_ACCESS_TOKEN": "access-0",
        "REBAL_WEALTHBOX_TOKEN_URL": peer.url + peer.token_path, "REBAL_WEALTHBOX_REFRESH_TOKEN": "refresh-1",
        "REBAL_WEALTHBOX_CLIENT_ID": "client-id", "REBAL_WEALTHBOX_CLIENT_SECRET": "client-secret",
    }
    return WealthboxStyleClient.from_env(env, retry=retry, **kwargs)


def redtail(peer: CrmPeer, retry: RetryPolicy = FAST, **kwargs) -> RedtailStyleClient:
    env = {"REBAL_REDTAIL_BASE_URL": peer.url + "/crm/v1/rest", "REBAL_REDTAIL_API_KEY": "api-key-123",
           "REBAL_REDTAIL_USER_KEY": "user-key-456"}
    return RedtailStyleClient.from_env(env, retry=retry, **kwargs)


def test_wealthbox_note_carries_the_date_rationale_trades_bearer_token_and_idempotency_key():
    with crm_server() as peer, wealthbox(peer) as crm:
        peer.bearer = "access-0"
        record = crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    [request] = peer.requests
    assert request.path == "/v1/notes"
    assert request.headers["authorization"] == "Bearer access-0"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == idempotency_key("record_note", "note:REC-1")
    assert request.json() == {
        "content": f"Portfolio rebalanced on 2026-11-23.\nRationale: {RATIONALE}\nTrades: {TRADES}",
        "linked_to": [{"id": "C-1001", "type": "Contact"}],
        "tags": ["rebalance"],
    }
    assert (record.id, record.status, record.attempts) == ("1", 201, 1)


def test_wealthbox_task_for_the_assignee_with_its_due_time():
    with crm_server() as peer, wealthbox(peer) as crm:
        crm.open_task("Review rebalance of household HH-7", datetime(2026, 11, 24, 14, 0, tzinfo=timezone.utc),
                      "USR-42", idempotency_key="task:REC-1", contact_or_account_ref="C-1001")
    [request] = peer.requests
    assert request.path == "/v1/tasks"
    assert request.json() == {"name": "Review rebalance of household HH-7", "due_date": "2026-11-24T14:00:00Z",
                              "assigned_to": "USR-42", "description": "",
                              "linked_to": [{"id": "C-1001", "type": "Contact"}]}


def test_redtail_uses_userkeyauth_with_the_api_key_and_user_key():
    with crm_server() as peer, redtail(peer) as crm:
        crm.record_note("4711", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
        crm.open_task("Call client about rebalance", date(2026, 11, 25), "17", idempotency_key="task:REC-1")
    note, task = peer.requests
    expected_auth = "Userkeyauth " + base64.b64encode(b"api-key-123:user-key-456").decode()
    assert note.headers["authorization"] == task.headers["authorization"] == expected_auth
    assert note.path == "/crm/v1/rest/contacts/4711/notes"
    assert note.json() == {"note_date": "2026-11-23", "category": "Rebalance",
                           "body": f"Portfolio rebalanced on 2026-11-23.\nRationale: {RATIONALE}\nTrades: {TRADES}"}
    assert task.path == "/crm/v1/rest/activities"
    assert task.json() == {"subject": "Call client about rebalance", "due_date": "2026-11-25", "assigned_to": "17",
                           "activity_type": "Task", "description": ""}
    assert note.headers["idempotency-key"] != task.headers["idempotency-key"]


def test_a_429_with_retry_after_and_a_503_are_survived_with_one_idempotency_key():
    sleep = RecordingSleep()
    with crm_server() as peer, redtail(peer, sleep=sleep) as crm:
        path = "/crm/v1/rest/contacts/4711/notes"
        peer.script(path, Reply(429, {"error": "rate limited"}, {"Retry-After": "1"}), Reply(503, {"error": "busy"}))
        record = crm.record_note("4711", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert [r.path for r in peer.requests] == [path] * 3
    assert record.attempts == 3 and record.status == 201
    assert len({r.headers["idempotency-key"] for r in peer.requests}) == 1
    assert sleep.waits[0] >= 1.0  # the CRM asked for one second
    assert sleep.waits[1] < 1.0  # then the (fast) exponential backoff


def test_an_expired_token_is_refreshed_once_and_the_call_repeated():
    rotated = []
    with crm_server() as peer, wealthbox(peer, on_tokens=lambda a, r: rotated.append((a, r))) as crm:
        peer.bearer = "access-new-only"  # the CRM no longer accepts access-0
        record = crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
        first, token, second = peer.requests
        assert (first.path, token.path, second.path) == ("/v1/notes", "/oauth/token", "/v1/notes")
        assert token.form() == {"grant_type": "refresh_token", "refresh_token": "refresh-1"}
        assert token.headers["authorization"] == "Basic " + base64.b64encode(b"client-id:client-secret").decode()
        assert first.headers["authorization"] == "Bearer access-0"
        assert second.headers["authorization"] == f"Bearer {peer.bearer}"
        assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
        assert rotated == [(peer.bearer, peer.refresh_token)]  # the rotated refresh token, to persist
        assert record.status == 201 and record.attempts == 1
        # The next call uses the new token straight away.
        crm.open_task("Follow up", date(2026, 11, 24), "USR-42", idempotency_key="task:REC-1")
        assert peer.requests[-1].headers["authorization"] == f"Bearer {peer.bearer}"
        assert len(peer.on("/oauth/token")) == 1


def test_a_refused_refresh_token_is_rejected_not_retried():
    with crm_server() as peer, wealthbox(peer) as crm:
        peer.bearer = "something-else"
        peer.refresh_token = "not-ours"
        with pytest.raises(CrmRejected, match="re-authorise"):
            crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert [r.path for r in peer.requests] == ["/v1/notes", "/oauth/token"]


def test_a_401_that_is_not_an_expired_token_is_rejected_without_a_refresh():
    with crm_server() as peer, wealthbox(peer) as crm:
        peer.script("/v1/notes", Reply(401, {"error": "insufficient_scope"}))
        with pytest.raises(CrmRejected) as refused:
            crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert refused.value.status == 401
    assert peer.on("/oauth/token") == []


def test_persistent_503_gives_crm_unavailable_after_bounded_attempts():
    sleep = RecordingSleep()
    started = time.monotonic()
    with crm_server() as peer, wealthbox(peer, sleep=sleep) as crm:
        peer.script("/v1/notes", *[Reply(503, {"error": "down"})] * 10)
        with pytest.raises(CrmUnavailable) as unavailable:
            crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert len(peer.requests) == FAST.max_attempts == unavailable.value.attempts
    assert unavailable.value.status == 503 and unavailable.value.operation == "record_note"
    assert sleep.waits == [0.01, 0.02, 0.04]  # exponential
    assert len({r.headers["idempotency-key"] for r in peer.requests}) == 1
    assert time.monotonic() - started < 3


def test_a_retry_after_beyond_the_time_budget_ends_the_retries_at_once():
    with crm_server() as peer, redtail(peer) as crm:
        peer.script("/crm/v1/rest/activities", Reply(429, {}, {"Retry-After": "120"}))
        with pytest.raises(CrmUnavailable) as unavailable:
            crm.open_task("Follow up", date(2026, 11, 24), "17", idempotency_key="task:REC-1")
    assert len(peer.requests) == 1
    assert unavailable.value.retry_after == 120  # the caller can schedule its replay


def test_a_validation_error_is_rejected_without_retrying():
    with crm_server() as peer, redtail(peer) as crm:
        peer.script("/crm/v1/rest/activities", Reply(422, {"error": "assigned_to unknown"}))
        with pytest.raises(CrmRejected) as refused:
            crm.open_task("Follow up", date(2026, 11, 24), "17", idempotency_key="task:REC-1")
    assert refused.value.status == 422 and len(peer.requests) == 1


def test_a_crm_that_is_not_listening_is_unavailable():
    crm = RedtailStyleClient(f"http://127.0.0.1:{free_port()}", api_key="k", user_key="u",
                             retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=0.0, request_timeout=2))
    with crm, pytest.raises(CrmUnavailable) as unavailable:
        crm.record_note("4711", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert unavailable.value.attempts == 2 and unavailable.value.status is None


def test_nothing_secret_or_personal_is_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="rebal")
    with crm_server() as peer, wealthbox(peer) as crm:
        peer.bearer = "access-rotated"
        peer.script("/v1/notes", Reply(503, {}))
        crm.record_note("C-1001", date(2026, 11, 23), RATIONALE, TRADES, idempotency_key="note:REC-1")
    assert "refreshed" in caplog.text and "retrying" in caplog.text
    for secret in ("access-0", "access-rotated", "refresh-1", "client-secret", "C-1001", "VTI", RATIONALE):
        assert secret not in caplog.text
    assert "access-0" not in repr(crm)


def test_credentials_never_go_to_a_plain_http_crm_elsewhere_than_loopback():
    with pytest.raises(ValueError, match="https"):
        RedtailStyleClient("http://crm.example.com/api", api_key="k", user_key="u")
    with pytest.raises(ValueError, match="REBAL_WEALTHBOX_ACCESS_TOKEN"):
        WealthboxStyleClient.from_env({"REBAL_WEALTHBOX_BASE_URL": "https://crm.example.com"})
