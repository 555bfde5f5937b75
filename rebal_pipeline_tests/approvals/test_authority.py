"""Compliance authority (issue 12, item 6): once a recommendation is escalated — by the advisor,
by compliance, by the 48h rule, or because its package needs compliance review — only compliance
approves, modifies or hands it back; the advisor may comment. One rule (workflow/authority.py),
seen here through the API, the one-click links, the lifecycle and the gate's re-check, on SQLite
and Postgres."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from rebal_pipeline.workflow import audit, authority, lifecycle
from rebal_pipeline.workflow.schema import audit_events, decisions, notifications, recommendations
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, USERS, package, publish
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.approvals.test_api import api, assert_error  # noqa: F401 (fixture)

ADVISOR, OTHER_ADVISOR, COMPLIANCE, OPERATIONS = ({**u, "active": True} for u in USERS)
POLICY = lifecycle.LifecyclePolicy()


def link(api, recommendation_id: str, advisor_id: str, action: str) -> str:
    return api.app.state.issue_links(recommendation_id, advisor_id, actions=(action,))[action]


def escalation_rows(store, recommendation_id: str) -> list[dict]:
    with store.begin() as conn:
        return [dict(r) for r in conn.execute(select(notifications).where(and_rec(recommendation_id))
                                              .order_by(notifications.c.created_at)).mappings()]


def and_rec(recommendation_id: str):
    return (notifications.c.recommendation_id == recommendation_id) & (notifications.c.kind == "escalation")


def audit_of(store, recommendation_id: str) -> list[tuple[str, str]]:
    with store.begin() as conn:
        assert audit.verify(conn).ok
        return [(r.kind, r.actor) for r in conn.execute(select(audit_events.c.kind, audit_events.c.actor).where(
            audit_events.c.subject_id == recommendation_id).order_by(audit_events.c.seq))]


# ---------------------------------------------------------------------------------------------
# Through the API and the links
# ---------------------------------------------------------------------------------------------


def test_an_advisor_who_escalated_cannot_approve_and_compliance_approves_modifies_or_returns_it(api):
    escalated = api.decide("ADV-1", "REC-4", action="escalate", reason="client disputes the IPS")
    assert escalated.status_code == 201 and escalated.json()["recommendation_status"] == "escalated"

    # The advisor who escalated it: no approval, modification or deferral — by API or by link.
    for body in ({"action": "approve"}, {"action": "defer", "reason": "later"},
                 {"action": "modify", "trades": [{"account_id": "ACC-4", "symbol": "VTI", "side": "sell",
                                                  "quantity": 5}]}):
        assert_error(api.decide("ADV-1", "REC-4", **body), 403, "escalated to compliance")
    approve_link = link(api, "REC-4", "ADV-1", "approve")
    assert_error(api.get(None, f"/links/{approve_link}"), 403, "only compliance may approve")
    assert_error(api.post(None, f"/links/{approve_link}"), 403, "only compliance may approve")
    review = api.get(None, f"/links/{link(api, 'REC-4', 'ADV-1', 'review')}")
    assert review.status_code == 200  # they may still read it
    # ... nor may they hand it back to themselves.
    assert_error(api.decide("ADV-1", "REC-4", action="return_to_advisor", reason="never mind"), 403, "only compliance")

    # A comment: recorded and audited, nothing changes.
    commented = api.decide("ADV-1", "REC-4", action="comment", reason="client called: wants the bond sleeve kept")
    assert commented.status_code == 201, commented.text
    assert commented.json()["recommendation_status"] == "escalated"
    assert commented.json()["decision"]["action"] == "comment"
    assert api.decide("ADV-1", "REC-4", action="comment", reason="client called: wants the bond sleeve kept"
                      ).status_code == 200  # the same comment again is the same record
    assert_error(api.decide("ADV-1", "REC-4", action="comment", reason=" "), 422)
    assert api.status_of("REC-4") == "escalated"

    # Compliance hands it back with a reason: pending again, the advisor decides.
    assert_error(api.decide("CCO-1", "REC-4", action="return_to_advisor"), 422)
    returned = api.decide("CCO-1", "REC-4", action="return_to_advisor", reason="IPS confirmed; advisor to decide")
    assert returned.status_code == 201, returned.text
    assert returned.json()["recommendation_status"] == "pending"
    assert_error(api.decide("CCO-1", "REC-4", action="approve"), 403, "escalated")  # no longer compliance's
    assert api.decide("ADV-1", "REC-4", action="approve").status_code == 201
    assert api.status_of("REC-4") == "approved"

    # Escalated again on another recommendation: compliance modifies it; compliance does not defer.
    assert api.decide("ADV-1", "REC-5", action="escalate", reason="large sale in a trust").status_code == 201
    assert_error(api.decide("CCO-1", "REC-5", action="defer", reason="later"), 403, "does not defer")
    modified = api.decide("CCO-1", "REC-5", action="modify", reason="sell less", trades=[
        {"account_id": "ACC-5", "symbol": "VTI", "side": "sell", "quantity": 8},
        {"account_id": "ACC-5", "symbol": "BND", "side": "buy", "quantity": 16}])
    assert modified.status_code == 201, modified.text
    assert modified.json()["recommendation_status"] == "modified"
    assert modified.json()["decision"]["actor_id"] == "CCO-1"

    assert audit_of(api.store, "REC-4") == [
        ("recommendation_alerted", "rebal:daily_scan"), ("decision_escalate", "ADV-1"),
        ("recommendation_escalation", "ADV-1"), ("decision_comment", "ADV-1"),
        ("decision_return_to_advisor", "CCO-1"), ("decision_approve", "ADV-1")]
    detail = api.get("ADV-1", "/recommendations/REC-4").json()
    assert [d["action"] for d in detail["decisions"]] == ["escalate", "comment", "return_to_advisor", "approve"]
    assert detail["decisions"][1]["reason"] == "client called: wants the bond sleeve kept"


def test_an_escalation_by_the_48h_rule_is_compliance_alone_even_for_the_team(api):
    with api.store.begin() as conn:
        [due] = [d for d in lifecycle.due_notifications(conn, PUBLISHED_AT + timedelta(hours=49))
                 if d["recommendation_id"] == "REC-3" and d["kind"] == "escalation"]
        assert lifecycle.record_notification(conn, "escalation", "REC-3", due["notification_key"],
                                             PUBLISHED_AT + timedelta(hours=49))
    # ADV-3 is on ADV-2's team: neither approves it now, both may comment.
    for user in ("ADV-2", "ADV-3"):
        assert_error(api.decide(user, "REC-3", action="approve"), 403, "escalated to compliance")
        assert api.decide(user, "REC-3", action="comment", reason=f"{user}: client is travelling").status_code == 201
    # People outside it still may not even comment.
    assert_error(api.decide("ADV-1", "REC-3", action="comment", reason="hello"), 403, "your own clients")
    assert_error(api.decide("OPS-1", "REC-3", action="comment", reason="hello"), 403)
    assert api.decide("CCO-1", "REC-3", action="approve", reason="checked").status_code == 201


def test_a_manual_escalation_records_one_email_to_the_compliance_officer(store):
    publish(store, package("REC-1"))
    at = PUBLISHED_AT + timedelta(hours=2)
    with store.begin() as conn:
        decision, created = lifecycle.decide(conn, "REC-1", ADVISOR, "escalate", at, reason="client disputes the model")
        again, created_again = lifecycle.decide(conn, "REC-1", ADVISOR, "escalate", at + timedelta(minutes=1),
                                                reason="client disputes the model")
    assert created and not created_again and again["decision_id"] == decision["decision_id"]
    [row] = escalation_rows(store, "REC-1")
    assert row["notification_key"] == f"escalation:REC-1:{decision['decision_id']}"
    assert row["recipient_id"] == "CCO-1" and json.loads(row["payload"])["reason"] == "client disputes the model"
    # No compliance officer on file: the escalation is refused rather than sent to nobody.
    publish(store, package("REC-2", "ACC-2"))
    with store.begin() as conn:
        lifecycle.sync_users(conn, [u for u in USERS if u["role"] != "compliance"], at)
        with pytest.raises(lifecycle.DecisionError) as refused:
            lifecycle.decide(conn, "REC-2", ADVISOR, "escalate", at, reason="question")
    assert refused.value.status == 409 and "compliance officer" in refused.value.message


# ---------------------------------------------------------------------------------------------
# Routed to compliance from the start (ERISA-barred class held)
# ---------------------------------------------------------------------------------------------

ERISA_REVIEW = "ACC-9: holds GLD (alternatives), barred by ERISA plan restriction (no_asset_class): review with compliance"


@pytest.mark.parametrize("rec, carried, expected", [
    ({"compliance_review": ERISA_REVIEW}, None, "escalated"),
    ({"compliance_review": ERISA_REVIEW}, "pending", "escalated"),
    ({"package": {"compliance_review": ERISA_REVIEW}}, None, "escalated"),
    ({"compliance_review": None}, None, "pending"),
    ({"compliance_review": "   "}, None, "pending"),
    ({}, "deferred", "deferred"),
    ({}, "escalated", "escalated"),
])
def test_initial_status_routes_a_compliance_review_package_to_compliance(rec, carried, expected):
    assert authority.initial_status(rec, carried) == expected


def test_a_package_needing_compliance_review_is_compliance_alone_from_the_start(store):
    publish(store, package("REC-1"))
    rec = {"recommendation_id": "REC-1", "compliance_review": ERISA_REVIEW}
    at = PUBLISHED_AT + timedelta(seconds=1)
    with store.begin() as conn:
        assert authority.route_to_compliance(conn, rec, at)
        assert not authority.route_to_compliance(conn, rec, at)  # once
        stored = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == "REC-1")
                              ).mappings().one()
        assert (stored["status"], stored["escalated_to"]) == ("escalated", "CCO-1")
        with pytest.raises(lifecycle.DecisionError) as refused:
            lifecycle.decide(conn, "REC-1", ADVISOR, "approve", at + timedelta(hours=1))
        assert refused.value.status == 403
        decision, _ = lifecycle.decide(conn, "REC-1", COMPLIANCE, "approve", at + timedelta(hours=2), reason="ok")
        full = conn.execute(select(decisions).where(decisions.c.decision_id == decision["decision_id"])).mappings().one()
        assert authority.decider_problems(conn, dict(full), dict(stored), POLICY) == []
    [row] = escalation_rows(store, "REC-1")
    assert row["notification_key"] == "escalation:REC-1:compliance_review" and row["recipient_id"] == "CCO-1"
    assert ("recommendation_routed_to_compliance", "rebal:daily_scan") in audit_of(store, "REC-1")


# ---------------------------------------------------------------------------------------------
# The gate's re-check of who decided (authority.decider_problems)
# ---------------------------------------------------------------------------------------------


def _gate_view(conn, decision_id: str) -> tuple[dict, dict]:
    decision = dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one())
    rec = dict(conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == decision["recommendation_id"])).mappings().one())
    return decision, rec


def test_the_gate_refuses_an_approval_by_a_user_deactivated_after_deciding(store):
    publish(store, package("REC-1"))
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, "REC-1", ADVISOR, "approve", PUBLISHED_AT + timedelta(hours=1))
        assert authority.decider_problems(conn, *_gate_view(conn, decision["decision_id"]), POLICY) == []
        # ADV-1 leaves the firm (users.csv without them) before the gate runs.
        lifecycle.sync_users(conn, [u for u in USERS if u["user_id"] != "ADV-1"], PUBLISHED_AT + timedelta(hours=2))
        assert authority.decider_problems(conn, *_gate_view(conn, decision["decision_id"]), POLICY) == [
            "the decider ADV-1 is not an active user"]


def test_the_gate_refuses_an_advisor_approval_recorded_while_escalated(store):
    """A decision that reached the store while the recommendation was with compliance (an older
    code path, a race) is refused by the gate; one after compliance returned it passes."""
    publish(store, package("REC-1"))
    t = PUBLISHED_AT + timedelta(hours=49)
    with store.begin() as conn:
        [due] = [d for d in lifecycle.due_notifications(conn, t) if d["kind"] == "escalation"]
        assert lifecycle.record_notification(conn, "escalation", "REC-1", due["notification_key"], t)
        # Forged past the API's rule: the advisor "approves" the escalated recommendation.
        forged = lifecycle._insert_decision(conn, "REC-1", "approve", "ADV-1", "api", None, {"forged": True},
                                            t + timedelta(hours=1))
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == "REC-1")
                     .values(status="approved"))
        [problem] = authority.decider_problems(conn, *_gate_view(conn, forged["decision_id"]), POLICY)
        assert "escalated to compliance" in problem
        # Compliance hands it back; the advisor's approval after that is theirs to make.
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == "REC-1")
                     .values(status="escalated"))
        lifecycle.decide(conn, "REC-1", COMPLIANCE, "return_to_advisor", t + timedelta(hours=2), reason="yours")
        after, created = lifecycle.decide(conn, "REC-1", ADVISOR, "approve", t + timedelta(hours=3), reason="now")
        assert created
        assert authority.decider_problems(conn, *_gate_view(conn, after["decision_id"]), POLICY) == []


def test_the_gate_refuses_compliance_deciding_what_was_never_escalated(store):
    publish(store, package("REC-1"))
    with store.begin() as conn:
        forged = lifecycle._insert_decision(conn, "REC-1", "approve", "CCO-1", "api", None, {},
                                            PUBLISHED_AT + timedelta(hours=1))
        assert authority.decider_problems(conn, *_gate_view(conn, forged["decision_id"]), POLICY) == [
            "the decider CCO-1 (compliance) decided a recommendation that had not been escalated"]


def test_the_rule_table_for_each_role_and_state(store):
    publish(store, package("REC-1"))
    with store.begin() as conn:
        rec = dict(conn.execute(select(recommendations)).mappings().one())

        def verdict(user, action, status):
            problem = authority.refusal(conn, user, {**rec, "status": status}, action)
            return problem.status if problem else "ok"

        assert [verdict(ADVISOR, a, "pending") for a in authority.ACTIONS] == ["ok", "ok", "ok", "ok", 403, "ok"]
        assert [verdict(ADVISOR, a, "escalated") for a in authority.ACTIONS] == [403, 403, 403, 409, 403, "ok"]
        assert [verdict(ADVISOR, a, "approved") for a in authority.ACTIONS] == [409, 409, 409, 409, 403, "ok"]
        assert [verdict(COMPLIANCE, a, "escalated") for a in authority.ACTIONS] == ["ok", "ok", 403, 409, "ok", "ok"]
        assert [verdict(COMPLIANCE, a, "pending") for a in authority.ACTIONS] == [403, 403, 403, "ok", 403, "ok"]
        assert [verdict(OTHER_ADVISOR, a, "pending") for a in authority.ACTIONS] == [403] * 6
        assert [verdict(OPERATIONS, a, "pending") for a in authority.ACTIONS] == [403] * 6
        assert [verdict({**ADVISOR, "active": False}, a, "pending") for a in authority.ACTIONS] == [403] * 6


def test_publish_day_routes_a_compliance_review_package_to_compliance_and_never_auto_approves_it(store):
    p = package("REC-1", discretionary=True)  # a micro-trade ($2,000) on a discretionary account...
    rec = {"recommendation_id": "REC-1", "scope": "account", "scope_id": "ACC-1", "kind": "rebalance",
           "household_id": "HH-1", "advisor_id": "ADV-1", "tier": "standard", "urgency": "medium",
           "delivery": "within_48h", "discretionary": True, "trade_value": 2000.0, "realized_gain": 0.0,
           "policy_version": p.policy_version, "positions_fingerprint": p.positions_fingerprint,
           "package": p.model_dump(mode="json"), "compliance_review": ERISA_REVIEW}  # ...holding a barred class
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, PUBLISHED_AT)
        result = lifecycle.publish_day(conn, p.as_of, [rec], set(), PUBLISHED_AT)
        stored = conn.execute(select(recommendations)).mappings().one()
    assert result.auto_approved == 0
    assert (stored["status"], stored["escalated_to"]) == ("escalated", "CCO-1")
    [row] = escalation_rows(store, "REC-1")
    assert row["recipient_id"] == "CCO-1" and json.loads(row["payload"])["reason"] == ERISA_REVIEW
