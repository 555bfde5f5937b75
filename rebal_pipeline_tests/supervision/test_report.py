"""The report's figures against the store: counts by outcome, decisions, time to decision per
advisor, shares deferred and escalated, the exceptions listed, the chain — each computed by hand
from the week in conftest.py, and the period-bounded counts re-counted with SQL of our own."""

from datetime import date, datetime, timezone

from sqlalchemy import and_, func, select

from rebal_pipeline.supervision.report import Period, build_report, period_ending_before
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import decisions, recommendations
from rebal_pipeline_tests.supervision.conftest import (
    DEFER_REASON, MODIFY_REASON, OVERRIDE_REASON, UNRESOLVED, WEEK, after_the_period,
)


def report_of(book, period=WEEK):
    with book.store.begin() as conn:
        return build_report(conn, period, anchors=book.anchors, wash_sale_overrides=book.overrides)


def test_the_period_is_whole_days_in_new_york():
    assert WEEK.starts_at == datetime(2026, 11, 16, 5, 0, tzinfo=timezone.utc)  # EST
    assert WEEK.ends_at == datetime(2026, 11, 23, 5, 0, tzinfo=timezone.utc)
    summer = Period(date(2026, 7, 1), date(2026, 7, 31))
    assert summer.starts_at.hour == 4 and summer.ends_at == datetime(2026, 8, 1, 4, 0, tzinfo=timezone.utc)  # EDT


def test_the_last_complete_period_of_each_frequency():
    thursday = date(2026, 12, 3)
    assert period_ending_before("weekly", thursday) == Period(date(2026, 11, 23), date(2026, 11, 29))
    assert period_ending_before("weekly", date(2026, 11, 23)) == WEEK  # a Monday: the week just ended
    assert period_ending_before("monthly", thursday) == Period(date(2026, 11, 1), date(2026, 11, 30))
    assert period_ending_before("quarterly", thursday) == Period(date(2026, 7, 1), date(2026, 9, 30))
    assert period_ending_before("quarterly", date(2027, 1, 1)) == Period(date(2026, 10, 1), date(2026, 12, 31))


def test_every_recommendation_of_the_period_with_its_outcome(book):
    report = report_of(book)
    outcomes = {line.recommendation_id: line.outcome for line in report.recommendations}
    assert outcomes == {"REC-A1": "approved", "REC-A2": "deferred", "REC-A3": "modified", "REC-A4": "approved",
                        "REC-B1": "escalated", "REC-B2": "escalated", "REC-B3": "auto_approved"}  # not REC-OLD
    assert dict(report.outcomes) == {"approved": 2, "deferred": 1, "modified": 1, "escalated": 2, "auto_approved": 1}
    with book.store.begin() as conn:  # the store agrees on which recommendations the week has
        in_store = conn.execute(select(func.count()).select_from(recommendations).where(and_(
            recommendations.c.as_of >= WEEK.start, recommendations.c.as_of <= WEEK.end))).scalar()
    assert in_store == len(report.recommendations) == 7
    assert {line.subject for line in report.recommendations} >= {"\u2022\u2022\u2022\u20221001"}
    assert not any("ACC-" in line.subject for line in report.recommendations)


def test_decisions_with_who_when_and_why(book):
    report = report_of(book)
    with book.store.begin() as conn:
        in_store = conn.execute(select(func.count()).select_from(decisions).where(and_(
            decisions.c.created_at >= WEEK.starts_at, decisions.c.created_at < WEEK.ends_at))).scalar()
    assert in_store == len(report.decisions) == 7  # the six of the week's recommendations and REC-OLD's
    by_rec = {d.recommendation_id: d for d in report.decisions}
    assert by_rec["REC-OLD"].action == "approve" and by_rec["REC-OLD"].actor_name == "Dana Advisor"
    assert (by_rec["REC-A2"].action, by_rec["REC-A2"].reason) == ("defer", DEFER_REASON)
    assert "until 2026-11-27" in by_rec["REC-A2"].detail
    assert (by_rec["REC-A3"].action, by_rec["REC-A3"].reason) == ("modify", MODIFY_REASON)
    assert "$800.00 (proposed: 2 trades, $2,000.00); inside bands: no" in by_rec["REC-A3"].detail
    assert by_rec["REC-B3"].action == "auto_approve" and by_rec["REC-B3"].via == "policy"
    assert [d.recommendation_id for d in report.modifications] == ["REC-A3"]
    assert [d.recommendation_id for d in report.deferrals] == ["REC-A2"]
    # Account numbers in a reason are masked like everywhere else.
    assert by_rec["REC-B1"].reason == "Request from the client's attorney about \u2022\u2022\u2022\u20222001; needs compliance"


def test_escalations_by_route(book):
    report = report_of(book)
    assert [(x.recommendation_id, x.route) for x in report.escalations] == [
        ("REC-B1", "the advisor"), ("REC-B2", "no decision in time")]
    assert report.escalations[0].by == "Sam Advisor"


def test_wash_sale_overrides_with_their_reasons(book):
    (override,) = report_of(book).wash_sale_overrides
    assert (override.account, override.symbol, override.decided_by, override.reason, override.recommendation_id) == (
        "\u2022\u2022\u2022\u20221001", "BND", "ADV-1", OVERRIDE_REASON, "REC-A1")


def test_per_advisor_time_to_decision_and_shares(book):
    advisors = {a.advisor_id: a for a in report_of(book).advisors}
    dana, sam = advisors["ADV-1"], advisors["ADV-2"]
    # ADV-1: A1 2h, A3 4h, A2 6h, A4 30h.
    assert (dana.recommendations, dana.decided) == (4, 4)
    assert (dana.median_hours, dana.mean_hours, dana.longest_hours) == (5.0, 10.5, 30.0)
    assert (dana.deferred, dana.share_deferred, dana.escalated, dana.share_escalated) == (1, 0.25, 0, 0.0)
    # ADV-2: B1 escalated by Sam at 10h; B2 undecided (escalated by the 48h rule); B3 auto-approved (not a person).
    assert (sam.recommendations, sam.decided, sam.auto_approved) == (3, 1, 1)
    assert (sam.median_hours, sam.mean_hours) == (10.0, 10.0)
    assert (sam.deferred, sam.escalated) == (0, 2) and round(sam.share_escalated, 4) == 0.6667


def test_exceptions_listed(book):
    report = report_of(book)
    listed = [(x.kind, x.recommendation_id or x.subject) for x in report.exceptions]
    assert listed == [
        ("past_review_window", "REC-B2"),
        ("outside_bands", "REC-A2"), ("outside_bands", "REC-A3"), ("outside_bands", "REC-A4"),
        ("micro_trade_auto_approval", "REC-B3"),
        ("suspended_account", "\u2022\u2022\u2022\u20223001"),
        ("data_quality_hold", "1 account(s) held out"),
    ]
    by = {(x.kind, x.recommendation_id): x for x in report.exceptions}
    assert "no decision by the end of the period" in by[("past_review_window", "REC-B2")].detail
    assert UNRESOLVED in by[("outside_bands", "REC-A4")].detail
    assert "leave equity, fixed income outside their bands" in by[("outside_bands", "REC-A3")].detail
    assert "Estate of the client pending" in report.exceptions_of("suspended_account")[0].detail
    assert "held out: \u2022\u2022\u2022\u20224001" in report.exceptions_of("data_quality_hold")[0].detail


def test_the_audit_chain_and_its_anchor_for_the_period(book):
    report = report_of(book)
    with book.store.begin() as conn:
        seq, head_hash = audit.head(conn)
    chain = report.chain
    assert chain.verified and chain.problem is None
    assert (chain.head_seq, chain.head_hash, chain.events_to_period_end) == (seq, head_hash, seq)
    assert chain.anchor_seq == seq and chain.anchor_file.endswith(f"_{seq:012d}.json")


def test_what_happens_after_the_period_is_not_in_it(book):
    before = report_of(book)
    after_the_period(book.store)
    later = report_of(book)
    assert later == before
    assert {x.recommendation_id: x.outcome for x in later.recommendations}["REC-B2"] == "escalated"


def test_a_period_with_nothing_in_it(book):
    empty = report_of(book, Period(date(2026, 10, 5), date(2026, 10, 11)))
    assert (empty.recommendations, empty.decisions, empty.exceptions, empty.advisors) == ((), (), (), ())
    assert empty.chain.verified and empty.chain.head_seq == 0


def test_a_state_carried_over_from_last_week_is_the_outcome(store, tmp_path):
    from datetime import timedelta

    from rebal_pipeline_tests.approvals.conftest import package, publish
    from rebal_pipeline_tests.supervision.conftest import ADV1, FIRM, LAST_WEEK, decide

    last_week = datetime(2026, 11, 13, 21, 30, tzinfo=timezone.utc)
    old = package("REC-1", account_id="ACC-0005001").model_copy(update={"as_of": LAST_WEEK})
    publish(store, old, as_of=LAST_WEEK, now=last_week, users=FIRM)
    decide(store, "REC-1", ADV1, "defer", last_week + timedelta(hours=1), reason=DEFER_REASON,
           payload={"deferred_until": "2026-11-30T14:00:00+00:00"})
    # This week's scan of the same account supersedes it; the deferral (and the clock) carry over.
    publish(store, package("REC-2", account_id="ACC-0005001"), users=FIRM)
    with store.begin() as conn:
        report = build_report(conn, WEEK, anchors=tmp_path / "anchors")
    (line,) = report.recommendations
    assert (line.recommendation_id, line.outcome, line.alerted_at) == ("REC-2", "deferred", last_week)
    assert report.decisions == ()  # the deferral was last week's
    assert [x.kind for x in report.exceptions] == ["outside_bands"]
