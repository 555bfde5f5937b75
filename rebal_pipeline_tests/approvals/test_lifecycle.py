"""The recommendation lifecycle and the audit chain on the real workflow store (SQLite and
Postgres): publishing is idempotent, a later day supersedes without restarting the clock, the
market resolves, micro-trades auto-approve, and the chain names tampering."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events, decisions, recommendations
from rebal_pipeline_tests.approvals.conftest import AS_OF, PUBLISHED_AT, package, publish
from rebal_pipeline_tests.factories import user


def rec(store, recommendation_id):
    with store.begin() as conn:
        return conn.execute(select(recommendations).where(
            recommendations.c.recommendation_id == recommendation_id)).mappings().one()


def events(store):
    with store.begin() as conn:
        return conn.execute(select(func.count()).select_from(audit_events)).scalar()


def test_a_published_recommendation_is_pending_and_routed_to_its_advisor(store):
    result = publish(store, package("REC-1"))
    assert result.created == 1
    row = rec(store, "REC-1")
    assert (row["status"], row["advisor_id"], row["urgency"]) == ("pending", "ADV-1", "medium")
    with store.begin() as conn:
        alerted = conn.execute(select(audit_events).where(audit_events.c.event_id == "recommendation:REC-1")).mappings().one()
    assert alerted["kind"] == "recommendation_alerted" and '"routed_to":"ADV-1"' in alerted["payload"]


def test_republishing_the_day_creates_nothing_new(store):
    publish(store, package("REC-1"))
    before = events(store)
    again = publish(store, package("REC-1"), now=PUBLISHED_AT + timedelta(hours=2))
    assert (again.created, again.unchanged) == (0, 1)
    assert events(store) == before


def test_a_later_day_supersedes_without_restarting_the_escalation_clock(store):
    publish(store, package("REC-1"))
    with store.begin() as conn:
        due = lifecycle.due_notifications(conn, PUBLISHED_AT + timedelta(hours=25))
        assert lifecycle.record_notification(conn, due[0]["kind"], "REC-1", due[0]["notification_key"],
                                             PUBLISHED_AT + timedelta(hours=25))
    next_day = PUBLISHED_AT + timedelta(days=1)
    result = publish(store, package("REC-2"), as_of=AS_OF + timedelta(days=1), now=next_day)
    assert result.superseded == 1
    old, new = rec(store, "REC-1"), rec(store, "REC-2")
    assert (old["status"], old["superseded_by"]) == ("superseded", "REC-2")
    assert new["status"] == "pending" and new["supersedes"] == "REC-1"
    assert new["clock_started_at"].replace(tzinfo=None) == PUBLISHED_AT.replace(tzinfo=None)
    # The reminder was sent for this lineage: not again; the 48h escalation still comes on time.
    with store.begin() as conn:
        due = lifecycle.due_notifications(conn, PUBLISHED_AT + timedelta(hours=47))
        assert due == []
        due = lifecycle.due_notifications(conn, PUBLISHED_AT + timedelta(hours=48))
        assert [(d["kind"], d["recommendation_id"]) for d in due] == [("escalation", "REC-2")]


def test_an_account_back_inside_its_bands_closes_its_open_recommendation(store):
    publish(store, package("REC-1"))
    publish(store, as_of=AS_OF + timedelta(days=1), now=PUBLISHED_AT + timedelta(days=1),
            inside={"account:ACC-1:rebalance"})
    assert rec(store, "REC-1")["status"] == "resolved_by_market"


def test_a_discretionary_micro_trade_without_realised_gain_is_approved_by_policy(store):
    publish(store, package("REC-MICRO", discretionary=True), realized_gain=0.0)
    assert rec(store, "REC-MICRO")["status"] == "auto_approved"
    with store.begin() as conn:
        decision = conn.execute(select(decisions).where(decisions.c.recommendation_id == "REC-MICRO")).mappings().one()
    assert (decision["action"], decision["actor_id"], decision["via"]) == (
        "auto_approve", "policy:discretionary-micro-trade/1", "policy")


@pytest.mark.parametrize("discretionary, gain", [(False, 0.0), (True, 100.0)])
def test_no_auto_approval_with_a_gain_or_without_discretion(store, discretionary, gain):
    publish(store, package("REC-X", discretionary=discretionary), realized_gain=gain)
    assert rec(store, "REC-X")["status"] == "pending"


def test_the_database_refuses_to_rewrite_the_audit_trail(store):
    publish(store, package("REC-1"))
    for statement in ("update wf_audit_events set actor = 'someone else'", "delete from wf_audit_events"):
        with pytest.raises(Exception, match="append-only"):
            with store.begin() as conn:
                conn.execute(text(statement))
    with store.begin() as conn:
        assert audit.verify(conn).ok


def _bypass_triggers(conn):
    """What someone with raw database access could do: switch the guard off."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("alter table wf_audit_events disable trigger user"))
    else:
        conn.execute(text("drop trigger wf_audit_events_no_update"))
        conn.execute(text("drop trigger wf_audit_events_no_delete"))


def test_verify_names_an_edited_event(store):
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"))
    with store.begin() as conn:
        _bypass_triggers(conn)
        conn.execute(text("update wf_audit_events set payload = replace(payload, 'ADV-1', 'ADV-2') "
                          "where event_id = 'recommendation:REC-2'"))
    with store.begin() as conn:
        result = audit.verify(conn)
    assert not result.ok and "'recommendation:REC-2'" in result.problem and "altered" in result.problem


def test_verify_names_a_deleted_event(store):
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"))
    with store.begin() as conn:
        seq = conn.execute(text("select seq from wf_audit_events where event_id = 'recommendation:REC-1'")).scalar()
        _bypass_triggers(conn)
        conn.execute(text("delete from wf_audit_events where event_id = 'recommendation:REC-1'"))
    with store.begin() as conn:
        result = audit.verify(conn)
    assert not result.ok and result.seq == seq and "missing" in result.problem


def test_a_team_member_may_decide_for_their_advisor_and_an_outsider_may_not(store):
    publish(store, package("REC-1"))
    team = [user("ASSOC-1", name="Ari Associate", email="ari@example-ria.com", team_of="ADV-1")]
    with store.begin() as conn:
        lifecycle.sync_users(conn, team, PUBLISHED_AT)
        associate = {"user_id": "ASSOC-1", "role": "advisor"}
        outsider = {"user_id": "ADV-2", "role": "advisor"}
        with pytest.raises(lifecycle.DecisionError) as refused:
            lifecycle.decide(conn, "REC-1", outsider, "approve", PUBLISHED_AT + timedelta(hours=1))
        assert refused.value.status == 403
        decision, created = lifecycle.decide(conn, "REC-1", associate, "approve", PUBLISHED_AT + timedelta(hours=1))
    assert created and decision["actor_id"] == "ASSOC-1" and rec(store, "REC-1")["status"] == "approved"


def test_an_escalation_due_before_the_approval_is_not_recorded_after_it(store):
    publish(store, package("REC-1"))
    at_48h = PUBLISHED_AT + timedelta(hours=48)
    with store.begin() as conn:
        due = lifecycle.due_notifications(conn, at_48h)
        advisor = {"user_id": "ADV-1", "role": "advisor"}
        lifecycle.decide(conn, "REC-1", advisor, "approve", at_48h)
        assert not lifecycle.record_notification(conn, "escalation", "REC-1", due[0]["notification_key"], at_48h)
    assert rec(store, "REC-1")["status"] == "approved"
