"""The batch rules of market_events/batches.py (E1–E6), on SQLite and Postgres, including
hypothesis over random sequences of events, joins, decisions and releases: every executable
decision of a member ends in exactly one release, a release is claimed once, and one batch per
day holds every event of the day in order."""

import os
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import func, select

from rebal_pipeline.market_events import batches
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.schema import (
    batch_recommendations, batch_release_decisions, decisions, market_batches, market_events, users,
)
from rebal_pipeline_tests.approvals.conftest import package, publish, store  # noqa: F401 (fixture)

DAY = date(2026, 11, 23)
T0 = datetime(2026, 11, 23, 16, 0, tzinfo=timezone.utc)  # 11:00 New York
BASKET = [("VTI", Decimal("0.6")), ("VEA", Decimal("0.2")), ("BND", Decimal("0.2"))]
CLOSES = {"VTI": Decimal("280"), "VEA": Decimal("50"), "BND": Decimal("73")}
RELEASE_AFTER = timedelta(minutes=120)
EXAMPLES = int(os.environ.get("REBAL_HYPOTHESIS_EXAMPLES", "15"))


def prices_event(conn, key: str, vti: str, now=T0):
    return batches.record_event(
        conn, event_key=key, source=batches.PRICES, declared_by=batches.ACTOR, reason="basket moved", day=DAY,
        session_as_of=date(2026, 11, 20), detected_at=now, now=now, basket=BASKET, threshold=Decimal("0.03"),
        release_after=RELEASE_AFTER, basket_prices={"VTI": Decimal(vti), "VEA": Decimal("50"), "BND": Decimal("73")},
        session_closes=CLOSES)


def test_an_event_is_recorded_once_and_a_second_move_extends_the_days_batch(store):
    with store.begin() as conn:
        # VTI 280 → 260: 0.6 × (260/280 − 1) = −0.04285714 (to 1e-8).
        first = prices_event(conn, "prices:a", "260")
        again = prices_event(conn, "prices:a", "260")
        # Measured against the first event's prices, not Friday's close: 0.6 × (259/260 − 1) = −0.0023: absorbed.
        near = prices_event(conn, "prices:b", "259", now=T0 + timedelta(minutes=5))
        # 0.6 × (240/260 − 1) = −0.04615385: a second event, same batch, release moved later.
        second = prices_event(conn, "prices:c", "240", now=T0 + timedelta(minutes=30))
        batch = conn.execute(select(market_batches)).mappings().one()
    assert first.event_id == "mev-20261123-e1" and first.recorded_now
    assert again.event_id == first.event_id and not again.recorded_now
    assert near is None
    assert second.event_id == "mev-20261123-e2" and second.batch_id == first.batch_id
    assert first.move == pytest.approx(-0.04285714) and second.move == pytest.approx(-0.04615385)
    assert batch["events"] == 2
    assert batch["release_due_at"].replace(tzinfo=timezone.utc) == T0 + timedelta(minutes=30) + RELEASE_AFTER


def test_only_operations_or_compliance_declare_and_a_reason_is_required(store):
    publish(store, package("REC-1"))
    with store.begin() as conn:
        with pytest.raises(batches.BatchError, match="only operations or compliance"):
            batches.check_declarer(conn, "ADV-1")
        assert batches.check_declarer(conn, "CCO-1")["role"] == "compliance"
    with pytest.raises(batches.BatchError, match="needs a reason"):
        batches.check_reason("   ")


def test_members_join_once_only_while_waiting_and_their_decisions_go_in_one_release(store):
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"), package("REC-3", account_id="ACC-3"))
    with store.begin() as conn:
        advisor = dict(conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one())
        lifecycle.decide(conn, "REC-3", advisor, "approve", T0)  # decided before the event: goes alone
        event = prices_event(conn, "prices:a", "260")
        added = batches.add_members(conn, event.event_id, ["REC-1", "REC-2", "REC-3"], T0)
        assert batches.add_members(conn, event.event_id, ["REC-1"], T0) == []  # E4: once
    assert added == ["REC-1", "REC-2"]
    with store.begin() as conn:
        lifecycle.decide(conn, "REC-1", advisor, "approve", T0 + timedelta(minutes=1))
        assert batches.due_releases(conn, T0 + timedelta(minutes=5)) == []  # not yet due
        [due] = batches.due_releases(conn, T0 + RELEASE_AFTER)
        assert (due.release_id, due.decisions) == ("mev-20261123-r1", 1)
        claimed = batches.claim_release(conn, due.release_id, "run-1", T0 + RELEASE_AFTER)
        assert batches.claim_release(conn, due.release_id, "run-2", T0 + RELEASE_AFTER) == claimed  # E6
        with pytest.raises(batches.BatchError, match="not the next release"):
            batches.claim_release(conn, "mev-20261123-r3", "run-3", T0 + RELEASE_AFTER)
        # A decision made after the first release goes in the next one.
        lifecycle.decide(conn, "REC-2", advisor, "approve", T0 + RELEASE_AFTER + timedelta(minutes=1))
        [later] = batches.due_releases(conn, T0 + RELEASE_AFTER + timedelta(minutes=2))
        assert later.release_id == "mev-20261123-r2"
        # REC-3 was decided before the event: not a member, its decision goes alone (E4, E5).
        rec3 = conn.execute(select(decisions.c.decision_id).where(decisions.c.recommendation_id == "REC-3")).scalar_one()
        assert batches.goes_with_batch(conn, rec3) is None
        assert batches.goes_with_batch(conn, claimed[0]) == "mev-20261123"
    assert len(claimed) == 1


def test_random_sequences_put_every_member_decision_in_exactly_one_release(store):
    ids = [f"REC-{i}" for i in range(6)]
    publish(store, *[package(r, account_id=f"ACC-{i}") for i, r in enumerate(ids)])

    steps = st.lists(st.one_of(
        st.tuples(st.just("event"), st.sampled_from(["250", "240", "230", "260"])),
        st.tuples(st.just("join"), st.lists(st.sampled_from(ids), max_size=4)),
        st.tuples(st.just("decide"), st.sampled_from(ids)),
        st.tuples(st.just("release"), st.integers(0, 200)),
    ), min_size=1, max_size=14)

    @hsettings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(steps)
    def run(sequence):
        with store.begin() as conn:  # a fresh batch day per example: wipe what the last one made
            for table in (batch_release_decisions, batches.batch_releases, batch_recommendations, market_events,
                          market_batches):
                conn.execute(table.delete())
            conn.execute(decisions.delete())
            conn.execute(lifecycle.recommendations.update().values(status="pending"))
        clock = T0
        event_id = None
        for kind, value in sequence:
            clock += timedelta(minutes=7)
            with store.begin() as conn:
                if kind == "event":
                    found = prices_event(conn, f"prices:{value}:{clock.isoformat()}", value, now=clock)
                    event_id = found.event_id if found else event_id
                elif kind == "join" and event_id:
                    batches.add_members(conn, event_id, value, clock)
                elif kind == "decide":
                    advisor = dict(conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one())
                    status = conn.execute(select(lifecycle.recommendations.c.status).where(
                        lifecycle.recommendations.c.recommendation_id == value)).scalar_one()
                    if status in lifecycle.OPEN:
                        lifecycle.decide(conn, value, advisor, "approve", clock)
                elif kind == "release":
                    for due in batches.due_releases(conn, clock + timedelta(minutes=value)):
                        batches.claim_release(conn, due.release_id, "run", clock)
        with store.begin() as conn:
            members = set(conn.execute(select(batch_recommendations.c.recommendation_id)).scalars())
            for decision_id, rec_id in conn.execute(select(decisions.c.decision_id, decisions.c.recommendation_id)):
                releases = conn.execute(select(func.count()).where(
                    batch_release_decisions.c.decision_id == decision_id)).scalar_one()
                held = decision_id in batches.held_decisions(conn, batches.batch_id_for(DAY))
                if rec_id in members:
                    assert releases + held == 1  # released once, or still held: never both, never twice
                else:
                    assert releases == 0 and not held
            events = list(conn.execute(select(market_events.c.seq).order_by(market_events.c.seq)).scalars())
            assert events == list(range(1, len(events) + 1))
            assert conn.execute(select(func.count()).select_from(market_batches)).scalar_one() <= 1

    run()


def test_an_auto_approval_of_the_scan_joins_and_is_held_but_an_earlier_one_does_not(store):
    from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT

    # A discretionary micro-trade (under $5,000, no realised gain) is approved by policy at publication.
    publish(store, package("REC-OLD", account_id="ACC-8", discretionary=True), realized_gain=0.0)
    publish(store, package("REC-NEW", account_id="ACC-9", discretionary=True), realized_gain=0.0,
            now=PUBLISHED_AT + timedelta(hours=1))
    with store.begin() as conn:
        statuses = dict(conn.execute(select(lifecycle.recommendations.c.recommendation_id,
                                            lifecycle.recommendations.c.status)).all())
        assert statuses == {"REC-OLD": "auto_approved", "REC-NEW": "auto_approved"}
        event = prices_event(conn, "prices:a", "260")
        # The scan that published REC-NEW adds it in the same transaction, at its publication time.
        added = batches.add_members(conn, event.event_id, ["REC-OLD", "REC-NEW"], PUBLISHED_AT + timedelta(hours=1))
        [held] = batches.held_decisions(conn, event.batch_id)
        assert conn.execute(select(decisions.c.recommendation_id).where(decisions.c.decision_id == held)
                            ).scalar_one() == "REC-NEW"
    assert added == ["REC-NEW"]  # REC-OLD's auto-approval may be on its way to the gate already
