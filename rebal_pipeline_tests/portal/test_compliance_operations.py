"""The compliance view (escalations and compliance reviews, with their history) and the
operations view (feed status per connection, data-quality alerts, failed runs) of the portal."""

from __future__ import annotations

from datetime import timedelta

from rebal_pipeline.workflow import authority
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline_tests.portal.conftest import AS_OF, page_text, queue_ids
from rebal_pipeline_tests.portal.test_queue import decide


def escalate_some(portal) -> None:
    """Dana escalates Q-LOW; Q-HIGH-B is routed to compliance for review (an ERISA-barred class)."""
    dana = portal.sign_in("dana@example-ria.com")
    assert decide(dana, "Q-LOW", "escalate", reason="the client asked for a review of the bands").status_code == 201
    with portal.store.begin() as conn:
        assert authority.route_to_compliance(conn, {"recommendation_id": "Q-HIGH-B", "compliance_review":
                                                    "ACC-12 holds fixed income its ERISA plan bars"},
                                             portal.clock.now)


def test_compliance_sees_escalations_and_reviews_with_their_history(portal):
    escalate_some(portal)
    portal.clock.advance(hours=2)
    cco = portal.sign_in("cco@example-ria.com")
    page = cco.get("/portal/compliance")
    text = page_text(page, 200, "Escalations and compliance reviews", "Waiting for compliance (2)",
                     "Compliance review", "Routed to compliance at publication",
                     "••••C-12 holds fixed income its ERISA plan bars",
                     "Decision: escalate (via portal)", "the client asked for a review of the bands", "by ADV-1",
                     "History (", "Published and alerted to the advisor", "with compliance since 2 h 00 min")
    assert "ACC-12" not in text  # the review's reason names the account: masked
    assert queue_ids(page) == ["Q-HIGH-B", "Q-LOW"]  # high before low
    assert "Escalations decided lately (0)" in text
    # The compliance queue is the same escalated recommendations; compliance approves one.
    assert queue_ids(cco.get("/portal/queue")) == ["Q-HIGH-B", "Q-LOW"]
    view = cco.get("/portal/recommendations/Q-LOW")
    page_text(view, 200, "Approve these trades", "Return to the advisor")
    assert "Defer</h3>" not in view.text  # compliance does not defer
    page_text(decide(cco, "Q-LOW", "approve"), 201, "Approved")
    after = page_text(cco.get("/portal/compliance"), 200, "Waiting for compliance (1)",
                      "Escalations decided lately (1)", "Decision: approve (via portal) · CCO-1")
    assert "Q-LOW" in after or 'data-id="Q-LOW"' in cco.get("/portal/compliance").text
    page_text(decide(cco, "Q-HIGH-B", "return_to_advisor", reason="fine to proceed, the bar is lifted"), 201,
              "Returned to the advisor")
    dana = portal.sign_in("dana@example-ria.com")
    assert "Q-HIGH-B" in queue_ids(dana.get("/portal/queue"))
    # Only compliance opens this page.
    page_text(dana.get("/portal/compliance"), 403, "this page is for compliance only")
    ops = portal.sign_in("ops@example-ria.com")
    page_text(ops.get("/portal/compliance"), 403)


def test_operations_sees_feed_status_alerts_and_what_is_missing(portal):
    with portal.store.begin() as conn:
        raise_operations_alert(conn, key="feed_late:schwab-main:2026-11-20", alert="feed_late",
                               summary="Custodian files for 20 Nov 2026 are late on schwab-main.",
                               details={"missing": ["positions.csv", "transactions.csv"]}, now=portal.clock.now,
                               connection="schwab-main", as_of=AS_OF)
        raise_operations_alert(conn, key="feed_data_quality:2026-11-20", alert="feed_data_quality",
                               summary="12 rows of the 20 Nov 2026 feed were rejected.",
                               details={"rejected_rows": 12, "accounts_held_out": 2,
                                        "reconciliation_breaks": 1},
                               now=portal.clock.now + timedelta(minutes=5), connection="fidelity-api", as_of=AS_OF)
    ops = portal.sign_in("ops@example-ria.com")
    page = ops.get("/portal/operations")
    page_text(page, 200, "Feed status per connection", "schwab-main", "Custodian files are late",
              "fidelity-api", "Rows of today's feed were rejected", "Rejected rows: 12", "Reconciliation breaks: 1",
              "Missing files: positions.csv, transactions.csv", "Data-quality and reconciliation alerts (2)",
              "Failed runs (0)", "No failed-run alert is recorded in the workflow store", "this server does not reach "
              "Dagster")
    assert page.text.index("fidelity-api") < page.text.index("schwab-main")  # connections by name
    dana = portal.sign_in("dana@example-ria.com")
    page_text(dana.get("/portal/operations"), 403, "this page is for operations only")


def test_the_48h_rule_escalation_is_in_the_compliance_view(portal):
    from rebal_pipeline.workflow import lifecycle

    portal.clock.advance(hours=17)  # Q-MED-OLD's clock (30 h older) reaches 48 h; the others are at 18 h
    with portal.store.begin() as conn:
        due = [d for d in lifecycle.due_notifications(conn, portal.clock.now) if d["kind"] == "escalation"]
        for d in due:
            lifecycle.record_notification(conn, "escalation", d["recommendation_id"], d["notification_key"],
                                          portal.clock.now)
    assert {d["recommendation_id"] for d in due} == {"Q-MED-OLD"}  # alerted 30 h before the rest
    cco = portal.sign_in("cco@example-ria.com")
    page = cco.get("/portal/compliance")
    page_text(page, 200, "Waiting for compliance (1)", "Escalated to compliance", "rebal:escalation_sensor")
    assert queue_ids(page) == ["Q-MED-OLD"]
