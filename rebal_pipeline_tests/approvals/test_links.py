"""One-click links: the token format on its own, then through the API (real uvicorn server, real
store on SQLite and Postgres)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from rebal_pipeline.approval_api.links import (
    LinkError, issue_links, make_link_token, new_link_id, read_link_token,
)
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import decisions, used_links
from rebal_pipeline_tests.approvals.test_api import SECRET, api, assert_error, leave_team  # noqa: F401  (fixture)

NOW = datetime(2026, 11, 20, 22, 30, tzinfo=timezone.utc)
LATER = NOW + timedelta(hours=72)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _with_claims(token: str, **changes) -> str:
    """The same signature over an edited payload: what a tamperer can make without the secret."""
    payload, signature = token.split(".")
    claims = json.loads(_b64d(payload)) | changes
    return _b64e(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()) + "." + signature


# ---------------------------------------------------------------------------------------------
# The token format
# ---------------------------------------------------------------------------------------------


def test_round_trip_and_format():
    token = make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER, "L" * 20)
    payload, signature = token.split(".")
    assert json.loads(_b64d(payload)) == {"a": "approve", "adv": "ADV-1", "exp": int(LATER.timestamp()),
                                          "lid": "L" * 20, "rid": "REC-1", "v": 1}
    assert len(_b64d(signature)) == 32 and "=" not in token
    claims = read_link_token(SECRET, token, NOW)
    assert (claims.recommendation_id, claims.advisor_id, claims.action, claims.link_id, claims.expires_at) == (
        "REC-1", "ADV-1", "approve", "L" * 20, LATER)
    # Deterministic for the same inputs; a fresh random link id by default.
    assert make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER, "L" * 20) == token
    assert read_link_token(SECRET, make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER), NOW).link_id != "L" * 20
    links = issue_links(SECRET, "REC-1", "ADV-1", NOW)
    assert sorted(links) == ["approve", "defer", "escalate", "review"]
    assert len({read_link_token(SECRET, t, NOW).link_id for t in links.values()}) == 4
    assert len(new_link_id()) >= 16


def test_expiry():
    token = make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER)
    assert read_link_token(SECRET, token, LATER - timedelta(seconds=1))
    for when in (LATER, LATER + timedelta(days=1)):
        with pytest.raises(LinkError, match="expired") as refused:
            read_link_token(SECRET, token, when)
        assert refused.value.status == 401


@pytest.mark.parametrize("change", [
    {"rid": "REC-2"}, {"adv": "ADV-2"}, {"a": "escalate"}, {"exp": int(LATER.timestamp()) + 3600}, {"lid": "M" * 20},
])
def test_tampered_claims_are_refused(change):
    token = make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER, "L" * 20)
    with pytest.raises(LinkError, match="not valid") as refused:
        read_link_token(SECRET, _with_claims(token, **change), NOW)
    assert refused.value.status == 401


@pytest.mark.parametrize("mangle", [
    lambda t: t.split(".")[0] + "." + _b64e(b"\0" * 32),                  # forged signature
    lambda t: t.split(".")[0] + "." + t.split(".")[1][:-1] + ("A" if t[-1] != "A" else "B"),  # one char off
    lambda t: t + "=",                                                     # padding: not canonical
    lambda t: t.replace(".", ".!"),                                        # junk base64 would ignore
    lambda t: t.split(".")[0],                                             # no signature
    lambda t: t + "." + t.split(".")[1],                                   # three parts
    lambda t: "",
    lambda t: "." ,
    lambda t: t[: len(t) // 2],
    lambda t: "x" * 5000,
])
def test_malformed_tokens_are_refused(mangle):
    token = make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER)
    with pytest.raises(LinkError) as refused:
        read_link_token(SECRET, mangle(token), NOW)
    assert refused.value.status == 401


def test_other_secret_and_secret_length():
    token = make_link_token(SECRET, "REC-1", "ADV-1", "approve", LATER)
    with pytest.raises(LinkError):
        read_link_token(b"another-secret-of-enough-length-" * 2, token, NOW)
    with pytest.raises(ValueError, match="32 bytes"):
        make_link_token(b"short", "REC-1", "ADV-1", "approve", LATER)
    with pytest.raises(ValueError, match="32 bytes"):
        read_link_token(b"short", token, NOW)
    with pytest.raises(ValueError):
        make_link_token(SECRET, "REC-1", "ADV-1", "sell_everything", LATER)
    with pytest.raises(ValueError):
        make_link_token(SECRET, "REC 1", "ADV-1", "approve", LATER)


def test_genuine_but_malformed_payload_is_refused():
    """Signed with the right secret but not our claims (an old format, a bug): still 401."""
    import hashlib
    import hmac

    for claims in ({"v": 2, "a": "approve"}, {"a": "approve", "adv": "ADV-1", "exp": "soon", "lid": "L" * 20,
                                              "rid": "REC-1", "v": 1}, [1, 2]):
        payload = _b64e(json.dumps(claims).encode())
        signature = _b64e(hmac.new(SECRET, b"rebal-link/v1." + payload.encode(), hashlib.sha256).digest())
        with pytest.raises(LinkError):
            read_link_token(SECRET, f"{payload}.{signature}", NOW)


# ---------------------------------------------------------------------------------------------
# Through the API
# ---------------------------------------------------------------------------------------------


def link(api, recommendation_id: str, advisor_id: str, action: str) -> str:
    return api.app.state.issue_links(recommendation_id, advisor_id, actions=(action,))[action]


def test_approve_link_works_once(api):
    token = link(api, "REC-1", "ADV-1", "approve")
    used = api.post(None, f"/links/{token}")
    assert used.status_code == 201, used.text
    decision = used.json()["decision"]
    assert (decision["action"], decision["actor_id"], decision["via"]) == ("approve", "ADV-1", "link")
    assert api.status_of("REC-1") == "approved"
    with api.store.begin() as conn:
        row = conn.execute(select(used_links)).mappings().one()
        assert (row["recommendation_id"], row["action"]) == ("REC-1", "approve")
        assert audit.verify(conn).ok
    again = api.post(None, f"/links/{token}")
    assert_error(again, 410, "already been used")
    assert_error(api.get(None, f"/links/{token}"), 410)
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar_one() == 1


def test_get_changes_nothing(api):
    token = link(api, "REC-1", "ADV-1", "approve")
    before = api.audit_count()
    for _ in range(3):  # a mail scanner prefetching, the advisor opening it
        view = api.get(None, f"/links/{token}")
        assert view.status_code == 200, view.text
    body = view.json()
    assert body["action"] == "approve" and body["recommendation_id"] == "REC-1" and body["advisor_id"] == "ADV-1"
    assert body["recommendation"]["status"] == "pending" and body["needs_reason"] is False
    assert body["package"] is None and "approve" in body["would"]
    assert datetime.fromisoformat(body["expires_at"]) == api.clock.now + timedelta(hours=72)
    assert api.audit_count() == before and api.status_of("REC-1") == "pending"
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(used_links)).scalar_one() == 0
    assert api.post(None, f"/links/{token}").status_code == 201


def test_expired_link(api):
    token = link(api, "REC-1", "ADV-1", "approve")
    api.clock.advance(hours=72)
    assert_error(api.get(None, f"/links/{token}"), 401, "expired")
    assert_error(api.post(None, f"/links/{token}"), 401, "expired")
    assert api.status_of("REC-1") == "pending"


def test_forged_and_tampered_links(api):
    token = link(api, "REC-1", "ADV-1", "approve")
    forged = make_link_token(b"an-attacker-guessed-this-secret!!", "REC-1", "ADV-1", "approve",
                             api.clock.now + timedelta(hours=1))
    assert_error(api.post(None, f"/links/{forged}"), 401, "not valid")
    # Pointing a genuine link at another recommendation (or advisor) breaks the signature.
    assert_error(api.post(None, f"/links/{_with_claims(token, rid='REC-2')}"), 401, "not valid")
    assert_error(api.post(None, f"/links/{_with_claims(token, adv='ADV-2', rid='REC-3')}"), 401)
    assert_error(api.get(None, f"/links/{_with_claims(token, rid='REC-2')}"), 401)
    assert_error(api.post(None, "/links/garbage!"), 401)
    assert_error(api.post(None, "/links/" + "a" * 1025), 422)
    assert [api.status_of(r) for r in ("REC-1", "REC-2", "REC-3")] == ["pending"] * 3


def test_wrong_advisor_and_rerouted(api):
    # A genuine link, but for an advisor who does not act for this recommendation.
    token = link(api, "REC-1", "ADV-2", "approve")
    assert_error(api.get(None, f"/links/{token}"), 403)
    assert_error(api.post(None, f"/links/{token}"), 403)
    # ADV-3 was on ADV-2's team when the email went out, and is no longer.
    token = link(api, "REC-3", "ADV-3", "approve")
    assert api.get(None, f"/links/{token}").status_code == 200
    leave_team(api)
    assert_error(api.post(None, f"/links/{token}"), 403)
    # Unknown user in a genuine link.
    assert_error(api.post(None, f"/links/{link(api, 'REC-1', 'GONE-1', 'approve')}"), 403)
    assert api.status_of("REC-1") == api.status_of("REC-3") == "pending"
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(used_links)).scalar_one() == 0


def test_defer_and_escalate_links_need_a_reason(api):
    token = link(api, "REC-5", "ADV-1", "defer")
    view = api.get(None, f"/links/{token}").json()
    assert view["needs_reason"] is True
    assert_error(api.post(None, f"/links/{token}"), 422, "reason")
    assert_error(api.post(None, f"/links/{token}", {"reason": "  "}), 422)
    assert api.status_of("REC-5") == "pending"  # and the link is still good:
    until = (api.clock.now + timedelta(days=2)).replace(microsecond=0)
    deferred = api.post(None, f"/links/{token}", {"reason": "client on holiday", "deferred_until": until.isoformat()})
    assert deferred.status_code == 201, deferred.text
    decision = deferred.json()["decision"]
    assert (decision["action"], decision["actor_id"], decision["via"], decision["reason"]) == (
        "defer", "ADV-1", "link", "client on holiday")
    assert api.status_of("REC-5") == "deferred"
    escalate = link(api, "REC-4", "ADV-1", "escalate")
    assert_error(api.post(None, f"/links/{escalate}", {"reason": "x", "deferred_until": until.isoformat()}), 422)
    assert api.post(None, f"/links/{escalate}", {"reason": "IPS question"}).status_code == 201
    assert api.status_of("REC-4") == "escalated"
    assert_error(api.post(None, f"/links/{escalate}", {"reason": "IPS question"}), 410)


def test_review_link_opens_the_package(api):
    token = link(api, "REC-1", "ADV-1", "review")
    view = api.get(None, f"/links/{token}")
    assert view.status_code == 200
    assert view.json()["package"]["recommendation_id"] == "REC-1"
    assert_error(api.post(None, f"/links/{token}"), 422, "review")
    assert api.get(None, f"/links/{token}").status_code == 200  # reusable: it records nothing
    assert api.status_of("REC-1") == "pending"


def test_link_after_a_portal_decision(api):
    """The advisor approved in the portal, then clicks the email's approve link: the same decision
    (200); their defer link now conflicts (409) and stays unused."""
    assert api.decide("ADV-1", "REC-1", action="approve").status_code == 201
    again = api.post(None, f"/links/{link(api, 'REC-1', 'ADV-1', 'approve')}")
    assert again.status_code == 200 and again.json()["created"] is False
    defer = link(api, "REC-1", "ADV-1", "defer")
    assert_error(api.post(None, f"/links/{defer}", {"reason": "wait"}), 409)
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(used_links)).scalar_one() == 1


def test_racing_clicks_use_a_link_once(api):
    token = link(api, "REC-1", "ADV-1", "approve")
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: api.post(None, f"/links/{token}").status_code, range(8)))
    assert codes == [201] + [410] * 7
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(used_links)).scalar_one() == 1
