"""The approval API over HTTP: a real uvicorn server on 127.0.0.1 (free port) in a thread, httpx
as the client, the real workflow store on SQLite and Postgres (the `store` fixture)."""

from __future__ import annotations

import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from sqlalchemy import func, select

from rebal_pipeline.approval_api import app as api_app
from rebal_pipeline.approval_api import create_app
from rebal_pipeline.approval_api.testing import running_server
from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.package import PackageRestriction
from rebal_pipeline.workflow.schema import advisor_team, audit_events, decisions, recommendations
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, USERS, package, publish

SECRET = b"test-link-secret-" + b"s" * 32
TEAM_MEMBER = factories.user("ADV-3", name="Pat Associate", email="pat@example-ria.com")


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs) -> None:
        self.now += timedelta(**kwargs)


@dataclass
class Api:
    """A running API over a published book: REC-1, REC-2 (no_buy VTI), REC-4, REC-5 for ADV-1;
    REC-3 for ADV-2, whose team has ADV-3."""

    store: object
    app: object
    url: str
    clock: Clock
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, user: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def get(self, user: str | None, path: str, **kwargs) -> httpx.Response:
        with self.client(user) as c:
            return c.get(path, **kwargs)

    def post(self, user: str | None, path: str, body=None, **kwargs) -> httpx.Response:
        with self.client(user) as c:
            return c.post(path, json=body, **kwargs)

    def decide(self, user: str, recommendation_id: str, **body) -> httpx.Response:
        return self.post(user, f"/recommendations/{recommendation_id}/decisions", body)

    def status_of(self, recommendation_id: str) -> str:
        with self.store.begin() as conn:
            return conn.execute(select(recommendations.c.status).where(
                recommendations.c.recommendation_id == recommendation_id)).scalar_one()

    def audit_count(self) -> int:
        with self.store.begin() as conn:
            return conn.execute(select(func.count()).select_from(audit_events)).scalar_one()


@pytest.fixture
def api(store):
    publish(store,
            package("REC-1", "ACC-1"),
            package("REC-2", "ACC-2", restrictions=[PackageRestriction(account_id="ACC-2", kind="no_buy_symbol",
                                                                      value="VTI")]),
            package("REC-3", "ACC-3", advisor_id="ADV-2"),
            package("REC-4", "ACC-4"),
            package("REC-5", "ACC-5"))
    clock = Clock(PUBLISHED_AT + timedelta(hours=1))
    tokens = {}
    with store.begin() as conn:
        # users.csv with ADV-3 on ADV-2's team (team_of).
        lifecycle.sync_users(conn, [*USERS, {**TEAM_MEMBER, "team_of": "ADV-2"}], PUBLISHED_AT)
        for user in [*USERS, TEAM_MEMBER]:
            tokens[user["user_id"]] = secrets.token_urlsafe(32)
            lifecycle.issue_api_token(conn, user["user_id"], tokens[user["user_id"]], PUBLISHED_AT)
    app = create_app(store, SECRET, clock=clock)
    with running_server(app) as url:
        yield Api(store=store, app=app, url=url, clock=clock, tokens=tokens)


def leave_team(api: Api) -> None:
    """The next users.csv no longer has ADV-3 on ADV-2's team."""
    with api.store.begin() as conn:
        lifecycle.sync_users(conn, [*USERS, TEAM_MEMBER], api.clock.now)
        assert conn.execute(select(advisor_team)).first() is None


def ids(response: httpx.Response) -> list[str]:
    return [item["recommendation_id"] for item in response.json()["items"]]


def assert_error(response: httpx.Response, status: int, words: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    if words:
        assert words in body["error"], body
    return body


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_health_and_openapi(api):
    health = api.get(None, "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "store": api.store.dialect}
    doc = api.get(None, "/openapi.json").json()
    assert {"/recommendations", "/recommendations/{recommendation_id}", "/recommendations/{recommendation_id}/decisions",
            "/decisions/batch", "/links/{token}", "/health"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["api_token"]["scheme"] == "bearer"


def test_pending_list_per_role(api):
    assert ids(api.get("ADV-1", "/recommendations", params={"status": "pending"})) == [
        "REC-1", "REC-2", "REC-4", "REC-5"]
    assert ids(api.get("ADV-2", "/recommendations")) == ["REC-3"]
    # ADV-3 is on ADV-2's team: routed to them too.
    assert ids(api.get("ADV-3", "/recommendations")) == ["REC-3"]
    # Compliance: escalated ones only; nothing yet.
    assert ids(api.get("CCO-1", "/recommendations")) == []
    # Operations: everything, read-only.
    assert ids(api.get("OPS-1", "/recommendations")) == ["REC-1", "REC-2", "REC-3", "REC-4", "REC-5"]
    first = api.get("ADV-1", "/recommendations", params={"limit": 1}).json()
    assert first["next_offset"] == 1 and len(first["items"]) == 1
    summary = first["items"][0]
    assert {"recommendation_id", "as_of", "scope", "scope_id", "kind", "urgency", "delivery", "status", "trade_value",
            "clock_started_at"} <= set(summary)
    assert summary["as_of"] == "2026-11-20" and summary["status"] == "pending" and summary["trade_value"] == 2000.0
    assert datetime.fromisoformat(summary["clock_started_at"]) == PUBLISHED_AT
    assert_error(api.get("ADV-1", "/recommendations", params={"status": "nonsense"}), 422)
    assert_error(api.get("ADV-1", "/recommendations", params={"limit": 0}), 422)
    assert_error(api.get("ADV-1", "/recommendations", params={"stauts": "approved"}), 422)  # a typo is not ignored


def test_read_package(api):
    response = api.get("ADV-1", "/recommendations/REC-1")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "pending" and body["decisions"] == []
    assert body["package"]["recommendation_id"] == "REC-1"
    assert [(t["side"], t["symbol"], t["quantity"]) for t in body["package"]["trades"]] == [
        ("sell", "VTI", 10), ("buy", "BND", 20)]
    assert_error(api.get("ADV-2", "/recommendations/REC-1"), 403)
    assert api.get("ADV-3", "/recommendations/REC-3").status_code == 200  # team member
    assert api.get("OPS-1", "/recommendations/REC-1").status_code == 200  # operations may read
    assert api.get("CCO-1", "/recommendations/REC-1").status_code == 200  # compliance supervises
    assert_error(api.get("ADV-1", "/recommendations/NOPE-1"), 404)
    assert_error(api.get("ADV-1", "/recommendations/bad id!"), 422)
    assert_error(api.get("ADV-1", "/recommendations/" + "x" * 65), 422)
    assert_error(api.get("ADV-1", "/nowhere"), 404)
    assert_error(api.client("ADV-1").delete("/recommendations/REC-1"), 405)
    # One path, two routes: Allow names both methods.
    with api.client() as c:
        options = c.request("OPTIONS", "/links/abc")
    assert_error(options, 405)
    assert options.headers["allow"] == "GET, POST"


def test_authentication(api):
    assert_error(api.get(None, "/recommendations"), 401, "token")
    assert api.get(None, "/recommendations").headers["www-authenticate"] == "Bearer"
    with httpx.Client(base_url=api.url) as c:
        assert_error(c.get("/recommendations", headers={"Authorization": "Bearer not-a-token"}), 401)
        assert_error(c.get("/recommendations", headers={"Authorization": f"Basic {api.tokens['ADV-1']}"}), 401)
        assert_error(c.get("/recommendations", headers={"Authorization": "Bearer " + "x" * 600}), 401)
        assert_error(c.post("/recommendations/REC-1/decisions", json={"action": "approve"}), 401)
        assert_error(c.post("/decisions/batch", json={"items": [{"recommendation_id": "REC-1", "action": "approve"}]}),
                     401)
    assert api.status_of("REC-1") == "pending"


# ---------------------------------------------------------------------------------------------
# Deciding
# ---------------------------------------------------------------------------------------------


def test_approve_repeat_and_conflict(api):
    before = api.audit_count()
    first = api.decide("ADV-1", "REC-1", action="approve", reason="fine")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["created"] is True and body["recommendation_status"] == "approved"
    decision = body["decision"]
    assert (decision["action"], decision["actor_id"], decision["via"], decision["reason"]) == (
        "approve", "ADV-1", "api", "fine")
    assert datetime.fromisoformat(decision["created_at"]) == api.clock.now
    with api.store.begin() as conn:
        assert audit.verify(conn).ok
        kinds = conn.execute(select(audit_events.c.kind, audit_events.c.actor).where(
            audit_events.c.subject_id == "REC-1").order_by(audit_events.c.seq)).all()
    assert [tuple(k) for k in kinds] == [("recommendation_alerted", "rebal:daily_scan"), ("decision_approve", "ADV-1")]
    assert api.audit_count() == before + 1

    api.clock.advance(minutes=5)
    repeat = api.decide("ADV-1", "REC-1", action="approve")
    assert repeat.status_code == 200 and repeat.json()["created"] is False
    assert repeat.json()["decision"]["decision_id"] == decision["decision_id"]
    assert api.audit_count() == before + 1

    conflict = api.decide("ADV-1", "REC-1", action="defer", reason="wait for the dividend")
    assert_error(conflict, 409, "approved")
    assert api.status_of("REC-1") == "approved"
    detail = api.get("ADV-1", "/recommendations/REC-1").json()
    assert detail["status"] == "approved" and [d["decision_id"] for d in detail["decisions"]] == [decision["decision_id"]]


def test_roles(api):
    # Another advisor's account.
    assert_error(api.decide("ADV-2", "REC-1", action="approve"), 403)
    # Operations reads but never decides.
    assert_error(api.decide("OPS-1", "REC-1", action="approve"), 403)
    # Compliance decides escalated recommendations only.
    assert_error(api.decide("CCO-1", "REC-4", action="approve"), 403, "escalated")
    escalated = api.decide("ADV-1", "REC-4", action="escalate", reason="client disputes the IPS")
    assert escalated.status_code == 201 and escalated.json()["recommendation_status"] == "escalated"
    assert ids(api.get("CCO-1", "/recommendations")) == ["REC-4"]
    assert ids(api.get("CCO-1", "/recommendations", params={"status": "escalated"})) == ["REC-4"]
    assert "REC-4" not in ids(api.get("ADV-1", "/recommendations"))
    approved = api.decide("CCO-1", "REC-4", action="approve", reason="IPS checked")
    assert approved.status_code == 201, approved.text
    assert approved.json()["decision"]["actor_id"] == "CCO-1" and api.status_of("REC-4") == "approved"
    # The team member acts on the advisor's recommendation; the advisor's peer does not.
    assert api.decide("ADV-3", "REC-3", action="approve").status_code == 201
    assert_error(api.decide("ADV-1", "REC-3", action="approve"), 403)
    assert_error(api.decide("ADV-1", "NOPE-9", action="approve"), 404)
    for rec in ("REC-1", "REC-2", "REC-5"):
        assert api.status_of(rec) == "pending"


def test_modify_refused_with_reasons(api):
    oversell = api.decide("ADV-1", "REC-1", action="modify",
                          trades=[{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 100}])
    errors = assert_error(oversell, 422, "cannot be accepted")["detail"]["errors"]
    assert any("only 70 held" in e for e in errors), errors
    restricted = api.decide("ADV-1", "REC-2", action="modify",
                            trades=[{"account_id": "ACC-2", "symbol": "VTI", "side": "buy", "quantity": 1}])
    errors = assert_error(restricted, 422)["detail"]["errors"]
    assert any("may not buy it (no_buy_symbol)" in e for e in errors), errors
    unknown = api.decide("ADV-1", "REC-1", action="modify",
                         trades=[{"account_id": "ACC-9", "symbol": "VTI", "side": "sell", "quantity": 1}])
    assert any("not an account" in e for e in assert_error(unknown, 422)["detail"]["errors"])
    # Someone who may not decide learns nothing about the package from a modification.
    foreign = api.decide("ADV-2", "REC-1", action="modify",
                         trades=[{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 100}])
    assert assert_error(foreign, 403)["detail"] is None
    # Schema: modify needs trades; quantities are non-negative.
    assert_error(api.decide("ADV-1", "REC-1", action="modify"), 422)
    assert_error(api.decide("ADV-1", "REC-1", action="modify", trades=[]), 422)
    assert_error(api.decide("ADV-1", "REC-1", action="modify",
                            trades=[{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": -1}]), 422)
    assert api.status_of("REC-1") == api.status_of("REC-2") == "pending"


def test_modify_valid(api):
    change = [{"account_id": "ACC-1", "symbol": "VTI", "side": "sell", "quantity": 8},
              {"account_id": "ACC-1", "symbol": "BND", "side": "buy", "quantity": 16}]
    response = api.decide("ADV-1", "REC-1", action="modify", trades=change, reason="smaller step")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["recommendation_status"] == "modified"
    mod = body["modification"]
    assert mod["inside_bands"] is True
    assert [(t["side"], t["symbol"], t["quantity"]) for t in mod["trades"]] == [("buy", "BND", 16), ("sell", "VTI", 8)]
    assert {b["asset_class"]: b["weight_after"] for b in mod["band_report"]} == {"equity": 0.62, "fixed_income": 0.38}
    payload = body["decision"]["payload"]
    assert set(payload) == {"trades", "band_report", "inside_bands"} and payload["trades"] == mod["trades"]
    with api.store.begin() as conn:
        stored = json.loads(conn.execute(select(decisions.c.payload).where(
            decisions.c.recommendation_id == "REC-1")).scalar_one())
        assert audit.verify(conn).ok
    assert stored == payload
    repeat = api.decide("ADV-1", "REC-1", action="modify", trades=list(reversed(change)))
    assert repeat.status_code == 200 and repeat.json()["modification"] == mod
    # Outside the bands is reported, not refused: the advisor decides.
    drop = api.decide("ADV-1", "REC-5", action="modify",
                      trades=[{"account_id": "ACC-5", "symbol": "VTI", "side": "sell", "quantity": 2},
                              {"account_id": "ACC-5", "symbol": "BND", "side": "buy", "quantity": 0}])
    assert drop.status_code == 201 and drop.json()["modification"]["inside_bands"] is False


def test_defer_and_escalate_rules(api):
    assert_error(api.decide("ADV-1", "REC-5", action="defer"), 422)
    assert_error(api.decide("ADV-1", "REC-5", action="defer", reason="   "), 422)
    assert_error(api.decide("ADV-1", "REC-5", action="escalate"), 422)
    assert_error(api.decide("ADV-1", "REC-5", action="approve", trades=[]), 422)  # extra field
    assert_error(api.decide("ADV-1", "REC-5", action="defer", reason="x",
                            deferred_until=(api.clock.now - timedelta(days=1)).isoformat()), 422, "future")
    assert_error(api.decide("ADV-1", "REC-5", action="defer", reason="x",
                            deferred_until=(api.clock.now + timedelta(days=400)).isoformat()), 422, "366")
    assert_error(api.decide("ADV-1", "REC-5", action="defer", reason="x", deferred_until="2026-12-01T00:00:00"),
                 422)  # no offset: ambiguous
    assert_error(api.decide("ADV-1", "REC-5", action="defer", reason="a\x00b"), 422)
    assert_error(api.decide("ADV-1", "REC-5", action="approve", reason="x" * 2001), 422)
    assert_error(api.decide("ADV-1", "REC-5", action="sell everything"), 422)
    with api.client("ADV-1") as c:
        assert_error(c.post("/recommendations/REC-5/decisions", content=b"{not json",
                            headers={"content-type": "application/json"}), 422)
        assert_error(c.post("/recommendations/REC-5/decisions", content=b"[1, 2]",
                            headers={"content-type": "application/json"}), 422)
        assert_error(c.post("/recommendations/REC-5/decisions", content=b"x" * (3 * 1024 * 1024),
                            headers={"content-type": "application/json"}), 413)
    assert api.status_of("REC-5") == "pending"
    until = (api.clock.now + timedelta(days=3)).replace(microsecond=0)
    deferred = api.decide("ADV-1", "REC-5", action="defer", reason="client travelling",
                          deferred_until=until.isoformat())
    assert deferred.status_code == 201, deferred.text
    assert datetime.fromisoformat(deferred.json()["decision"]["payload"]["deferred_until"]) == until
    assert api.decide("ADV-1", "REC-5", action="defer", reason="client travelling",
                      deferred_until=until.isoformat()).status_code == 200
    # A deferred recommendation can still be approved later.
    assert api.decide("ADV-1", "REC-5", action="approve").status_code == 201


def test_batch_review_session(api):
    items = [
        {"recommendation_id": "REC-1", "action": "approve"},
        {"recommendation_id": "REC-3", "action": "approve"},  # ADV-2's
        {"recommendation_id": "NOPE-1", "action": "approve"},
        {"recommendation_id": "REC-2", "action": "modify",
         "trades": [{"account_id": "ACC-2", "symbol": "VTI", "side": "buy", "quantity": 5}]},
        {"recommendation_id": "REC-5", "action": "defer", "reason": "after the earnings call"},
        {"recommendation_id": "REC-1", "action": "approve"},  # repeat
        {"recommendation_id": "REC-1", "action": "escalate", "reason": "second thoughts"},  # conflict
        {"recommendation_id": "REC-4", "action": "modify",
         "trades": [{"account_id": "ACC-4", "symbol": "VTI", "side": "sell", "quantity": 3},
                    {"account_id": "ACC-4", "symbol": "BND", "side": "buy", "quantity": 6}]},
    ]
    response = api.post("ADV-1", "/decisions/batch", {"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 403, 404, 422, 201, 200, 409, 201]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert results[0]["result"]["decision"]["via"] == "batch" and results[0]["error"] is None
    assert "no_buy_symbol" in " ".join(results[3]["error"]["detail"]["errors"])
    assert results[5]["result"]["decision"]["decision_id"] == results[0]["result"]["decision"]["decision_id"]
    assert results[7]["result"]["modification"]["inside_bands"] is False
    assert response.json()["counts"] == {"201": 3, "403": 1, "404": 1, "422": 1, "200": 1, "409": 1}
    assert [api.status_of(r) for r in ("REC-1", "REC-2", "REC-3", "REC-4", "REC-5")] == [
        "approved", "pending", "pending", "modified", "deferred"]
    with api.store.begin() as conn:
        assert audit.verify(conn).ok


def test_batch_malformed_document_records_nothing(api):
    before = api.audit_count()
    malformed = api.post("ADV-1", "/decisions/batch", {"items": [
        {"recommendation_id": "REC-1", "action": "approve"},
        {"recommendation_id": "REC-5", "action": "defer"},  # no reason: the schema refuses it
    ]})
    body = assert_error(malformed, 422)
    assert any(d["loc"][:3] == ["body", "items", 1] for d in body["detail"]), body
    assert_error(api.post("ADV-1", "/decisions/batch", {"items": []}), 422)
    too_many = [{"recommendation_id": "REC-1", "action": "approve"}] * 201
    assert_error(api.post("ADV-1", "/decisions/batch", {"items": too_many}), 422)
    assert api.status_of("REC-1") == "pending" and api.audit_count() == before


def test_unexpected_error_is_a_generic_500_without_pii(api, monkeypatch, caplog):
    caplog.set_level(logging.INFO)

    def broken(conn, token):
        raise RuntimeError(f"boom for dana@example-ria.com token={token}")

    monkeypatch.setattr(lifecycle, "user_for_token", broken)
    response = api.get("ADV-1", "/recommendations")
    body = assert_error(response, 500, "internal error")
    assert set(body["detail"]) == {"request_id"}
    assert "RuntimeError" in caplog.text and "/recommendations" in caplog.text
    assert "dana@example-ria.com" not in caplog.text and api.tokens["ADV-1"] not in caplog.text


def test_logs_carry_ids_not_pii(api, caplog):
    caplog.set_level(logging.DEBUG)
    api.get("ADV-1", "/recommendations")
    api.get(None, "/recommendations", headers={"Authorization": "Bearer wrong-token-value"})
    api.decide("ADV-1", "REC-1", action="approve", reason="ok")
    link = api.app.state.issue_links("REC-2", "ADV-1", actions=("approve",))["approve"]
    assert api.post(None, f"/links/{link}").status_code == 201
    # The server side's records (the httpx client in this process logs the URLs it calls itself).
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "decision recorded recommendation=REC-1 action=approve actor=ADV-1 via=api" in text
    assert "/links/{token}" in text
    for secret in [*api.tokens.values(), "wrong-token-value", link, link.split(".")[1], SECRET.decode()]:
        assert secret not in text
    for user in [*USERS, TEAM_MEMBER]:
        assert user["email"] not in text and user["name"] not in text


def test_link_secret_from_env(monkeypatch):
    with pytest.raises(SystemExit, match="REBAL_LINK_SECRET must be set.*It is not set"):
        api_app.link_secret_from_env(load_settings({}))
    with pytest.raises(SystemExit) as refused:
        api_app.build_app_from_env(rebal_settings=load_settings({"REBAL_LINK_SECRET": "short-secret"}))
    assert "only 12 bytes" in str(refused.value) and "short-secret" not in str(refused.value)
    assert str(refused.value).endswith(" The approval API does not start without it.")
    monkeypatch.setenv("REBAL_LINK_SECRET", "k" * 40)  # the process environment, as `rebal api` reads it
    assert api_app.link_secret_from_env() == b"k" * 40
    with pytest.raises(ValueError):
        create_app(object(), b"too short")


def test_app_from_env_serves(tmp_path):
    app = api_app.build_app_from_env(rebal_settings=load_settings({
        "REBAL_LINK_SECRET": secrets.token_urlsafe(48), "REBAL_WORKFLOW_DB_URL": f"sqlite:///{tmp_path / 'wf.sqlite'}"}))
    with running_server(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").json() == {"status": "ok", "store": "sqlite"}
        assert c.get("/recommendations").status_code == 401
    app.state.store.dispose()


def test_team_change_reroutes(api):
    leave_team(api)
    assert ids(api.get("ADV-3", "/recommendations")) == []
    assert_error(api.decide("ADV-3", "REC-3", action="approve"), 403)
    assert api.status_of("REC-3") == "pending"


def test_timestamps_are_utc(api):
    api.clock.now = datetime(2026, 11, 21, 9, 0, tzinfo=timezone.utc)
    body = api.decide("ADV-1", "REC-1", action="approve").json()
    assert body["decision"]["created_at"] in ("2026-11-21T09:00:00Z", "2026-11-21T09:00:00+00:00")


def test_concurrent_decisions(api):
    """Racing requests: one decision is recorded; identical ones are idempotent repeats (200),
    different ones conflicts (409) — on Postgres (row locks, read committed) as on SQLite."""
    with ThreadPoolExecutor(8) as pool:
        same = sorted(pool.map(lambda _: api.decide("ADV-1", "REC-1", action="approve").status_code, range(8)))
        # approve and modify are both final: whichever commits first, the other is a conflict.
        modify = {"trades": [{"account_id": "ACC-2", "symbol": "VTI", "side": "sell", "quantity": 8},
                             {"account_id": "ACC-2", "symbol": "BND", "side": "buy", "quantity": 16}]}
        mixed = list(pool.map(lambda action: (action, api.decide(
            "ADV-1", "REC-2", action=action, **(modify if action == "modify" else {})).status_code),
            ["approve", "modify"] * 4))
    assert same == [200] * 7 + [201]
    winner = [action for action, code in mixed if code == 201]
    assert len(winner) == 1, mixed
    assert all(code == (200 if action == winner[0] else 409) for action, code in mixed if action != winner[0] or code != 201)
    with api.store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar_one() == 2
        assert audit.verify(conn).ok
