"""Hostile input to every page of the review queue: random form bodies (any bytes, any content
type), random query strings and path segments, with and without a valid session and CSRF token.
The portal answers 4xx (or a page), never a 5xx, and a request that is refused records nothing.

The JSON API is fuzzed from its OpenAPI document (approvals/test_api_fuzz.py); the portal's pages
are not in that document, so they are fuzzed here."""

from __future__ import annotations

from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import func, select

from rebal_pipeline.approval_api.signin import SESSION_COOKIE
from rebal_pipeline.workflow import sessions
from rebal_pipeline.workflow.schema import audit_events, decisions
from rebal_pipeline_tests.portal.conftest import portal, store  # noqa: F401 (fixtures)

POSTS = ["/portal/sign-in", "/portal/sign-in/{token}", "/portal/sign-out", "/portal/batch",
         "/portal/recommendations/{rid}/decision"]
GETS = ["/portal", "/portal/sign-in", "/portal/sign-in/{token}", "/portal/queue", "/portal/recommendations/{rid}",
        "/portal/compliance", "/portal/operations"]
FIELDS = ["csrf", "email", "action", "reason", "deferred_until", "recommendation_id", "rid", "tier", "kind",
          "household", "status", "quantity_0", "quantity_VTI"]

text = st.text(min_size=0, max_size=80)
segment = st.one_of(st.sampled_from(["Q-HIGH-A", "Q-OTHER", "", "..", "%00", "x" * 300]), text)
form = st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(text, st.sampled_from(
    ["approve", "defer", "modify", "escalate", "2026-13-45", "-1", "1e309", "NaN", "Q-HIGH-A"]))), max_size=8)
body = st.one_of(form.map(lambda pairs: ("application/x-www-form-urlencoded",
                                         "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode())),
                 st.tuples(st.sampled_from(["application/x-www-form-urlencoded", "text/plain", "application/json",
                                            "multipart/form-data; boundary=x", ""]), st.binary(max_size=300)))


def _signed_in(portal, user_id: str = "ADV-1") -> tuple[httpx.Client, str]:
    with portal.store.begin() as conn:
        session = sessions.start_session(conn, user_id, portal.clock())
    client = httpx.Client(base_url=portal.url, follow_redirects=False, timeout=10,
                          cookies={SESSION_COOKIE: session.session_id})
    return client, session.csrf_token


def _counts(store):
    with store.begin() as conn:
        return (conn.execute(select(func.count()).select_from(decisions)).scalar(),
                conn.execute(select(func.count()).select_from(audit_events)).scalar())


def test_hostile_requests_get_a_4xx_page_never_a_5xx(portal):
    client, csrf = _signed_in(portal)
    anonymous = httpx.Client(base_url=portal.url, follow_redirects=False, timeout=10)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(post=st.booleans(), route=st.integers(0, 100), token=segment, rid=segment, query=form, payload=body,
           authenticated=st.booleans(), real_csrf=st.booleans())
    def probe(post, route, token, rid, query, payload, authenticated, real_csrf):
        who = client if authenticated else anonymous
        templates = POSTS if post else GETS
        path = templates[route % len(templates)].format(token=quote(token, safe=""), rid=quote(rid, safe=""))
        params = [(k, v) for k, v in query]
        if post:
            content_type, raw = payload
            if real_csrf and content_type == "application/x-www-form-urlencoded":
                raw = (raw + b"&" if raw else b"") + f"csrf={quote(csrf)}".encode()
            headers = {"Content-Type": content_type} if content_type else {}
            response = who.post(path, params=params, content=raw, headers=headers)
        else:
            response = who.get(path, params=params)
        assert response.status_code < 500, (path, response.status_code, response.text[:500])
        seen.add(response.status_code)
        probes.append(path)

    seen: set[int] = set()
    probes: list[str] = []
    probe()
    assert len(probes) >= 100, len(probes)
    # The probes reached the pages, not only the refusals: pages, redirects and 4xx answers.
    assert 200 in seen and 303 in seen and {401, 403} & seen and {404, 422} & seen, seen


def test_a_refused_form_records_nothing(portal):
    client, _ = _signed_in(portal)
    before = _counts(portal.store)
    for data in ({"action": "approve", "rid": "Q-HIGH-A"}, {"csrf": "forged", "action": "approve", "rid": "Q-HIGH-A"}):
        assert client.post("/portal/batch", data=data).status_code == 403
        assert client.post("/portal/recommendations/Q-HIGH-A/decision", data=data).status_code == 403
    assert _counts(portal.store) == before
