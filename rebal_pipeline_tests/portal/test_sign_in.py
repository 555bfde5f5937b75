"""Sign-in, sessions and CSRF of the review portal, over HTTP: a real server, the real store
(SQLite and Postgres), a real SMTP server receiving the sign-in emails."""

from __future__ import annotations

import re
import time
from datetime import timedelta


from sqlalchemy import func, select

from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.schema import audit_events, messages, portal_sessions, sign_in_links
from rebal_pipeline.workflow.sessions import MAX_SIGN_IN_LINKS
from rebal_pipeline_tests.portal.conftest import hidden, page_text


def count(portal, table) -> int:
    with portal.store.begin() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_sign_in_by_email_link_then_the_queue(portal):
    client = portal.client()
    # Without a session: the queue is the sign-in page, 401.
    first = client.get("/portal/queue")
    page_text(first, 401, "Sign in to the review queue", "please sign in")
    [pre] = [c for c in first.headers.get_list("set-cookie") if c.startswith("rebal_signin=")]
    form = client.get("/portal/sign-in")
    page_text(form, 200, "Sign in to the review queue", "Email me a sign-in link")
    assert "rebal_signin=" in pre and "HttpOnly" in pre and "SameSite=strict" in pre and "Path=/portal" in pre

    sent = client.post("/portal/sign-in", data={"email": "Dana@Example-RIA.com ", "csrf": hidden(form.text, "csrf")})
    page_text(sent, 200, "Check your email", "If Dana@Example-RIA.com belongs to a user of rebal")
    [message] = portal.wait_for_mail("dana@example-ria.com", 1)
    assert message["Subject"] == "Your rebal sign-in link"
    assert message["To"] == "dana@example-ria.com"
    text = message.get_body(("plain",)).get_content()
    assert f"Sign in: {portal.url}/portal/sign-in/" in text and "works once" in text
    token = portal.latest_token("dana@example-ria.com")
    for _ in range(500):  # the outbox records "sent" once the relay has answered
        with portal.store.begin() as conn:
            [row] = conn.execute(select(messages)).mappings().all()
            [link] = conn.execute(select(sign_in_links)).mappings().all()
        if row["status"] == "sent":
            break
        time.sleep(0.01)
    # The deterministic message key names the link's public id; the store holds the token's digest only.
    assert (row["message_key"], row["kind"], row["status"]) == (f"sign_in:{link['link_id']}", "sign_in", "sent")
    assert token not in str(dict(link)) and len(link["token_sha256"]) == 64

    # Opening the link (a mail scanner, the person) changes nothing.
    for _ in range(2):
        confirm = client.get(f"/portal/sign-in/{token}")
        page_text(confirm, 200, "Sign in as Dana Advisor?", "Opening this page changed nothing")
    assert count(portal, portal_sessions) == 0

    done = client.post(f"/portal/sign-in/{token}", data={"csrf": hidden(confirm.text, "csrf")})
    assert done.status_code == 303 and done.headers["location"] == "/portal/queue"
    cookie = [c for c in done.headers.get_list("set-cookie") if c.startswith("rebal_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/portal" in cookie
    assert "Secure" not in cookie  # served over http here; Secure over https
    session_id = re.match(r"rebal_session=([^;]+)", cookie)[1]
    with portal.store.begin() as conn:
        [stored] = conn.execute(select(portal_sessions)).mappings().all()
        kinds = conn.execute(select(audit_events.c.kind)).scalars().all()
    assert stored["user_id"] == "ADV-1" and stored["session_sha256"] != session_id and len(stored["session_sha256"]) == 64
    assert {"portal_sign_in_link", "portal_signed_in", "sign_in_sent"} <= set(kinds)
    page_text(client.get("/portal/queue"), 200, "My queue", "Dana Advisor", "Sign out")


def test_the_answer_is_the_same_whether_or_not_the_address_exists(portal):
    client = portal.client()
    answers = {}
    for address in ("dana@example-ria.com", "nobody@example-ria.com"):
        answers[address] = page_text(portal.ask_link(client, address), 200, "Check your email")
    assert answers["dana@example-ria.com"].replace("dana@", "X@") == answers["nobody@example-ria.com"].replace(
        "nobody@", "X@")
    # Only the user's request made a link (recorded before the answer; emailed right after it).
    assert count(portal, sign_in_links) == 1
    portal.wait_for_mail("dana@example-ria.com", 1)
    assert len(portal.mail.messages) == 1 and not portal.emails_to("nobody@example-ria.com")
    # A deactivated user is not sent one either (and the page is the same).
    with portal.store.begin() as conn:
        lifecycle.deactivate_user(conn, "ADV-2", "CCO-1", "left the firm", portal.clock.now)
    page_text(portal.ask_link(client, "sam@example-ria.com"), 200, "Check your email")
    assert count(portal, sign_in_links) == 1 and not portal.emails_to("sam@example-ria.com")


def test_sign_in_links_are_rate_limited_per_address(portal):
    client = portal.client()
    for _ in range(MAX_SIGN_IN_LINKS + 2):
        page_text(portal.ask_link(client, "dana@example-ria.com"), 200, "Check your email")
    assert count(portal, sign_in_links) == MAX_SIGN_IN_LINKS
    assert len(portal.wait_for_mail("dana@example-ria.com", MAX_SIGN_IN_LINKS)) == MAX_SIGN_IN_LINKS
    portal.clock.advance(hours=1, minutes=1)  # the window has passed
    portal.ask_link(client, "dana@example-ria.com")
    assert count(portal, sign_in_links) == MAX_SIGN_IN_LINKS + 1
    assert len(portal.wait_for_mail("dana@example-ria.com", MAX_SIGN_IN_LINKS + 1)) == MAX_SIGN_IN_LINKS + 1


def test_bad_email_is_a_422_page(portal):
    client = portal.client()
    form = client.get("/portal/sign-in")
    page_text(client.post("/portal/sign-in", data={"email": "not an address", "csrf": hidden(form.text, "csrf")}),
              422, "Enter your email address")
    assert count(portal, sign_in_links) == 0 and not portal.mail.messages


def test_a_used_link_is_410_and_an_expired_one_401(portal):
    client = portal.sign_in("dana@example-ria.com")
    token = portal.latest_token("dana@example-ria.com")
    page_text(client.get(f"/portal/sign-in/{token}"), 410, "This sign-in link has already been used")
    other = portal.client()
    confirm_form = other.get("/portal/sign-in")
    page_text(other.post(f"/portal/sign-in/{token}", data={"csrf": hidden(confirm_form.text, "csrf")}), 410,
              "already been used")

    fresh = portal.client()
    portal.ask_link(fresh, "dana@example-ria.com")
    portal.wait_for_mail("dana@example-ria.com", 2)
    token = portal.latest_token("dana@example-ria.com")
    confirm = fresh.get(f"/portal/sign-in/{token}")
    portal.clock.advance(minutes=16)  # the link lasts 15 minutes
    page_text(fresh.post(f"/portal/sign-in/{token}", data={"csrf": hidden(confirm.text, "csrf")}), 401,
              "This sign-in link has expired")
    page_text(fresh.get(f"/portal/sign-in/{token}"), 401, "expired")
    page_text(fresh.get("/portal/sign-in/not-a-token"), 401, "This sign-in link is not valid")
    assert count(portal, portal_sessions) == 1  # the first sign-in's only


def test_sign_in_forms_need_their_csrf_token(portal):
    client = portal.client()
    client.get("/portal/sign-in")
    page_text(client.post("/portal/sign-in", data={"email": "dana@example-ria.com"}), 403, "CSRF")
    page_text(client.post("/portal/sign-in", data={"email": "dana@example-ria.com", "csrf": "x" * 64}), 403, "CSRF")
    # Another browser's token (its own cookie) does not fit this one's cookie.
    stranger = portal.client()
    theirs = hidden(stranger.get("/portal/sign-in").text, "csrf")
    page_text(client.post("/portal/sign-in", data={"email": "dana@example-ria.com", "csrf": theirs}), 403, "CSRF")
    assert not portal.mail.messages
    # No pre-session cookie at all (cookies off, or a cross-site post): 403.
    bare = portal.client()
    page_text(bare.post("/portal/sign-in", data={"email": "dana@example-ria.com", "csrf": theirs}), 403, "cookie")
    assert count(portal, sign_in_links) == 0


def test_session_forms_need_the_session_csrf_token(portal):
    client = portal.sign_in("dana@example-ria.com")
    csrf = hidden(client.get("/portal/queue").text, "csrf")
    for fields in ({}, {"csrf": ""}, {"csrf": csrf[:-2] + "xx"}):
        page_text(client.post("/portal/batch", data={"rid": "Q-HIGH-A", "action": "approve", **fields}), 403,
                  "CSRF check", "Nothing was recorded")
        page_text(client.post("/portal/recommendations/Q-HIGH-A/decision", data={"action": "approve", **fields}),
                  403, "CSRF check")
        page_text(client.post("/portal/sign-out", data=fields), 403, "CSRF check")
    assert portal.status_of("Q-HIGH-A") == "pending"
    # Another session's token is not this one's.
    other = portal.sign_in("dana@example-ria.com")
    theirs = hidden(other.get("/portal/queue").text, "csrf")
    assert theirs != csrf
    page_text(client.post("/portal/batch", data={"rid": "Q-HIGH-A", "action": "approve", "csrf": theirs}), 403, "CSRF")
    assert portal.status_of("Q-HIGH-A") == "pending"


def test_idle_timeout_and_absolute_lifetime(portal):
    client = portal.sign_in("dana@example-ria.com")
    for _ in range(3):  # activity keeps the session alive
        portal.clock.advance(minutes=25)
        page_text(client.get("/portal/queue"), 200, "My queue")
    portal.clock.advance(minutes=31)
    page_text(client.get("/portal/queue"), 401, "your session ended after 30 minutes without activity")
    assert count(portal, portal_sessions) == 0  # the ended session's row is gone
    assert "rebal_session" not in client.cookies  # and the 401 page cleared the cookie
    page_text(client.get("/portal/queue"), 401, "please sign in")

    client = portal.sign_in("dana@example-ria.com")
    for _ in range(26):  # 26 x 29 min > 12 h
        portal.clock.advance(minutes=29)
        response = client.get("/portal/queue")
        if response.status_code == 401:
            break
    page_text(response, 401, "maximum length")


def test_sign_out_ends_the_session(portal):
    client = portal.sign_in("dana@example-ria.com")
    cookie = client.cookies.get("rebal_session")
    csrf = hidden(client.get("/portal/queue").text, "csrf")
    out = client.post("/portal/sign-out", data={"csrf": csrf})
    page_text(out, 200, "You are signed out")
    assert 'rebal_session=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    assert count(portal, portal_sessions) == 0
    # The old cookie, sent again (copied, replayed), opens nothing.
    replay = portal.client()
    replay.cookies.set("rebal_session", cookie, path="/portal")
    page_text(replay.get("/portal/queue"), 401, "your session has ended")


def test_a_deactivated_users_session_is_refused_at_once(portal):
    client = portal.sign_in("dana@example-ria.com")
    page_text(client.get("/portal/queue"), 200, "My queue")
    with portal.store.begin() as conn:
        lifecycle.deactivate_user(conn, "ADV-1", "CCO-1", "left the firm", portal.clock.now)
    page_text(client.get("/portal/queue"), 401, "your account may no longer use the portal")
    csrf = "irrelevant"
    page_text(client.post("/portal/batch", data={"rid": "Q-HIGH-A", "action": "approve", "csrf": csrf}), 401)
    assert portal.status_of("Q-HIGH-A") == "pending"
    assert count(portal, portal_sessions) == 0


def test_a_link_of_a_user_deactivated_since_is_refused(portal):
    client = portal.client()
    portal.ask_link(client, "dana@example-ria.com")
    token = portal.latest_token("dana@example-ria.com")
    confirm = client.get(f"/portal/sign-in/{token}")
    with portal.store.begin() as conn:
        lifecycle.deactivate_user(conn, "ADV-1", "CCO-1", "left the firm", portal.clock.now)
    page_text(client.post(f"/portal/sign-in/{token}", data={"csrf": hidden(confirm.text, "csrf")}), 403,
              "may no longer sign in")
    assert count(portal, portal_sessions) == 0


def test_portal_errors_are_pages_never_5xx(portal):
    client = portal.sign_in("dana@example-ria.com")
    csrf = hidden(client.get("/portal/queue").text, "csrf")
    page_text(client.get("/portal/nowhere"), 404, "Not found")
    page_text(client.get("/portal/queue", params={"status": "nonsense"}), 422, "status must be one of")
    page_text(client.get("/portal/queue", params={"kind": "<script>"}), 422, "kind must be rebalance or harvest")
    page_text(client.get("/portal/queue", params={"page": "-1"}), 422, "page must be")
    page_text(client.get("/portal/queue", params={"sort": "x"}), 422, "unknown filter")
    page_text(client.get("/portal/recommendations/no%20such"), 422)
    page_text(client.get("/portal/recommendations/NOPE"), 404, "no recommendation NOPE")
    page_text(client.post("/portal/batch", content=b"\xff\xfe", headers={"Content-Type":
                                                                         "application/x-www-form-urlencoded"}), 400)
    page_text(client.post("/portal/batch", json={"rid": "x"}), 400, "application/x-www-form-urlencoded")
    page_text(client.post("/portal/batch", data={"csrf": csrf, "action": "approve"}), 422, "no row was selected")
    page_text(client.post("/portal/batch", data={"csrf": csrf, "action": "delete", "rid": "Q-LOW"}), 422)
    page_text(client.post("/portal/batch", data={"csrf": csrf, "action": "defer", "rid": "Q-LOW"}), 422,
              "a reason is required to defer")
    page_text(client.post("/portal/batch", data={"csrf": csrf, "action": "defer", "rid": "Q-LOW", "reason": "x",
                                                 "deferred_until": "tomorrow"}), 422, "Defer until: not a date")
    page_text(client.get("/portal/compliance"), 403, "this page is for compliance only")
    page_text(client.get("/portal/operations"), 403, "this page is for operations only")
    assert portal.status_of("Q-LOW") == "pending"
    portal.clock.advance(minutes=1)


def test_the_api_is_unchanged_by_the_portal(portal):
    doc = httpx_get_json(portal, "/openapi.json")
    assert not [p for p in doc["paths"] if p.startswith("/portal")]


def httpx_get_json(portal, path):
    with portal.client() as c:
        return c.get(path, headers={"Accept": "application/json"}).json()





def test_cookies_are_secure_when_served_over_https():
    from starlette.requests import Request
    from starlette.responses import Response

    from rebal_pipeline.approval_api import signin

    for scheme, secure in (("https", True), ("http", False)):
        request = Request({"type": "http", "scheme": scheme, "method": "POST", "path": "/portal/sign-in/x",
                           "headers": [], "query_string": b"", "server": ("rebal.example-ria.com", 443)})
        response = Response()
        signin.set_session_cookie(response, request, signin.PortalSettings(), "session-id")
        cookie = response.headers["set-cookie"]
        assert ("Secure" in cookie) is secure and "HttpOnly" in cookie and "SameSite=strict" in cookie
    # Behind a TLS-terminating proxy the settings say so.
    response = Response()
    signin.set_session_cookie(response, request, signin.PortalSettings(secure_cookies=True), "session-id")
    assert "Secure" in response.headers["set-cookie"]


def test_two_posts_of_one_link_sign_in_once(portal):
    from concurrent.futures import ThreadPoolExecutor

    clients = [portal.client() for _ in range(4)]
    portal.ask_link(clients[0], "dana@example-ria.com")
    token = portal.latest_token("dana@example-ria.com")
    forms = [c.get(f"/portal/sign-in/{token}") for c in clients]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda cf: cf[0].post(f"/portal/sign-in/{token}",
                                                      data={"csrf": hidden(cf[1].text, "csrf")}),
                                zip(clients, forms)))
    assert sorted(a.status_code for a in answers) == [303, 410, 410, 410]
    assert count(portal, portal_sessions) == 1


def test_a_sign_in_email_that_cannot_be_sent_is_withdrawn_not_retried(portal):
    from rebal_pipeline.comms.smtp import SmtpSettings
    from rebal_pipeline_tests.comms.peers import free_port

    portal.app.state.portal.smtp = SmtpSettings(host="127.0.0.1", port=free_port(), starttls=False,
                                                sender="rebal <rebal@example-ria.com>", timeout=2)
    client = portal.client()
    page_text(portal.ask_link(client, "dana@example-ria.com"), 200, "Check your email")
    for _ in range(500):
        with portal.store.begin() as conn:
            rows = conn.execute(select(messages)).mappings().all()
        if rows and rows[0]["status"] == "rejected":
            break
        time.sleep(0.02)
    [row] = rows
    # Rejected (final) with the reason: the outbox's retry sensor never sends a stale sign-in link.
    assert row["status"] == "rejected" and row["last_error"].startswith("withdrawn: a sign-in link is not sent late")


def test_the_sign_in_email_builder():
    from datetime import datetime, timezone

    import pytest

    from rebal_pipeline.comms import emails

    made = [emails.sign_in(link="https://rebal.example-ria.com/portal/sign-in/abc_DEF-123",
                           expires_at=datetime(2026, 11, 20, 21, 45, tzinfo=timezone.utc),
                           sender="rebal <rebal@example-ria.com>", to="dana@example-ria.com",
                           message_id="<rebal.1@example-ria.com>", recipient_name="Dana <Advisor>")
            for _ in range(2)]
    assert made[0].as_bytes() == made[1].as_bytes()  # pure: same input, same bytes
    page = made[0].get_body(("html",)).get_content()
    assert 'href="https://rebal.example-ria.com/portal/sign-in/abc_DEF-123"' in page
    assert "Dana &lt;Advisor&gt;" in page and "20 Nov 2026 21:45 UTC" in page
    text = made[0].get_body(("plain",)).get_content()
    assert "Sign in: https://rebal.example-ria.com/portal/sign-in/abc_DEF-123" in text
    with pytest.raises(ValueError, match="https"):
        emails.sign_in(link="http://evil.example.com/portal/sign-in/x", expires_at=datetime.now(timezone.utc),
                       sender="rebal@example-ria.com", to="dana@example-ria.com",
                       message_id="<rebal.1@example-ria.com>")


def test_portal_root_goes_to_the_queue(portal):
    with portal.client() as c:
        response = c.get("/portal")
    assert response.status_code == 303 and response.headers["location"] == "/portal/queue"


def test_sign_in_tokens_stay_out_of_the_logs(portal, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="rebal")
    client = portal.sign_in("dana@example-ria.com")
    token = portal.latest_token("dana@example-ria.com")
    client.get(f"/portal/sign-in/{token}/more")  # no route: the raw path is not logged either
    session_id = client.cookies.get("rebal_session")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/portal/sign-in/{token}" in logged
    assert token not in logged and session_id not in logged and "dana@example-ria.com" not in logged


def test_every_page_states_the_idle_timeout_the_firm_set_error_pages_too(portal):
    portal.app.state.portal.idle_timeout = timedelta(minutes=45)  # REBAL_PORTAL_IDLE_MINUTES=45
    client = portal.client()
    form = page_text(client.get("/portal/sign-in"), 200)
    refused = page_text(client.get("/portal/sign-in/not-a-real-token"), 401)
    for text in (form, refused):
        assert "Sessions end after 45 minutes without activity." in text
