"""My queue, the package page and the batch review session of the portal, over HTTP (real
server, real store on SQLite and Postgres)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select

from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import decisions, recommendations
from rebal_pipeline_tests.portal.conftest import ORDER, hidden, page_text, queue_ids


def decision_rows(portal, rid: str) -> list[dict]:
    with portal.store.begin() as conn:
        return [dict(r) for r in conn.execute(select(decisions).where(
            decisions.c.recommendation_id == rid).order_by(decisions.c.decision_seq)).mappings()]


def csrf_of(client) -> str:
    return hidden(client.get("/portal/queue").text, "csrf")


def decide(client, rid: str, action: str, **fields):
    page = client.get(f"/portal/recommendations/{rid}")
    return client.post(f"/portal/recommendations/{rid}/decision",
                       data={"csrf": hidden(page.text, "csrf"), "action": action, **fields})


# ---------------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------------


def test_my_queue_is_sorted_by_urgency_then_severity_then_age(portal):
    client = portal.sign_in("dana@example-ria.com")
    response = client.get("/portal/queue")
    text = page_text(response, 200, "My queue", "5 recommendations")
    # high before medium before low; among the two highs the larger |drift|/band (3.0 before 1.5);
    # among the two mediums of equal severity the older (its clock started 30 h earlier) first.
    assert queue_ids(response) == ORDER
    assert "Q-OTHER" not in response.text and "HH-Z" not in text  # ADV-2's client is not listed
    # What each row shows: the client (household, masked account), worst drift with its band and
    # severity, trade value, estimated tax, age and the escalation clock.
    row = response.text.split('data-id="Q-HIGH-A"')[1].split("</tr>")[0]
    row_text = " ".join(page_text.__globals__["visible_text"](row).split())
    for words in ("HH-A", "••••C-11", "+15.00%", "Equity, band ±5.00% · 3.0×", "$2,000.00", "2 trades", "$20.00",
                  "1 h 00 min", "escalates in 47 h 00 min", "pending", "High", "Rebalance", "premium"):
        assert words in row_text, (words, row_text)
    assert "ACC-11" not in response.text  # account ids are masked
    old = page_text.__globals__["visible_text"](response.text.split('data-id="Q-MED-OLD"')[1].split("</tr>")[0])
    assert "31 h 00 min" in old and "escalates in 17 h 00 min" in old
    harvest = page_text.__globals__["visible_text"](response.text.split('data-id="Q-HIGH-B"')[1].split("</tr>")[0])
    assert "$310.50 saving" in harvest and "-$310.50" not in harvest and "Harvest" in harvest
    # Every row of the advisor's is theirs to decide: one checkbox each, in the batch form.
    assert response.text.count('type="checkbox" name="rid"') == 5


def test_the_queue_is_what_the_api_would_show(portal):
    sam = portal.sign_in("sam@example-ria.com")
    assert queue_ids(sam.get("/portal/queue")) == ["Q-OTHER"]
    pat = portal.sign_in("pat@example-ria.com")  # on ADV-2's team
    assert queue_ids(pat.get("/portal/queue")) == ["Q-OTHER"]
    ops = portal.sign_in("ops@example-ria.com")
    everything = ops.get("/portal/queue")
    page_text(everything, 200, "All recommendations", "read only")
    assert queue_ids(everything) == ["Q-HIGH-A", "Q-HIGH-B", "Q-MED-OLD", "Q-MED-NEW", "Q-OTHER", "Q-LOW"]
    assert 'name="rid"' not in everything.text  # operations decides nothing: no batch form
    cco = portal.sign_in("cco@example-ria.com")
    assert queue_ids(cco.get("/portal/queue")) == []  # compliance's queue: escalated ones
    assert len(queue_ids(cco.get("/portal/queue", params={"status": "open"}))) == 6
    # Another advisor's recommendation cannot be opened either.
    dana = portal.sign_in("dana@example-ria.com")
    page_text(dana.get("/portal/recommendations/Q-OTHER"), 403, "not one of your recommendations")


def test_filters(portal):
    client = portal.sign_in("dana@example-ria.com")
    assert queue_ids(client.get("/portal/queue", params={"kind": "harvest"})) == ["Q-HIGH-B"]
    assert queue_ids(client.get("/portal/queue", params={"kind": "rebalance"})) == [
        "Q-HIGH-A", "Q-MED-OLD", "Q-MED-NEW", "Q-LOW"]
    assert queue_ids(client.get("/portal/queue", params={"tier": "premium"})) == ["Q-HIGH-A"]
    assert queue_ids(client.get("/portal/queue", params={"household": "HH-C"})) == ["Q-MED-NEW", "Q-LOW"]
    assert queue_ids(client.get("/portal/queue", params={"household": "HH-A", "tier": "standard"})) == ["Q-MED-OLD"]
    empty = client.get("/portal/queue", params={"household": "HH-Z"})  # another advisor's household
    page_text(empty, 200, "No recommendation matches these filters")
    assert queue_ids(empty) == []
    # The filter form offers the person's own tiers and households only.
    page = client.get("/portal/queue").text
    assert '<option value="HH-A"' in page and '<option value="HH-Z"' not in page
    assert '<option value="premium"' in page
    # Status: after a decision the row leaves the open queue and is found under its status.
    assert decide(client, "Q-LOW", "approve").status_code == 201
    assert "Q-LOW" not in queue_ids(client.get("/portal/queue"))
    assert queue_ids(client.get("/portal/queue", params={"status": "approved"})) == ["Q-LOW"]
    # The filter values go to SQL as bound parameters: a quote is just a household that does not exist.
    assert queue_ids(client.get("/portal/queue", params={"household": "HH-A'--"})) == []


# ---------------------------------------------------------------------------------------------
# The package page
# ---------------------------------------------------------------------------------------------


def test_package_page_and_its_decisions(portal):
    client = portal.sign_in("dana@example-ria.com")
    page = client.get("/portal/recommendations/Q-HIGH-A")
    text = page_text(page, 200, "Account ••••C-11", "Proposed trades (2)", "Drift", "+15.00%", "Tax impact",
                     "Approve these trades", "Defer", "Escalate to compliance", "Change the quantities", "History",
                     "Published and alerted to the advisor", "escalates in 47 h 00 min")
    assert "ACC-11" not in text
    # Sign-out, approve, defer, escalate, modify: every form carries the session's CSRF token.
    assert page.text.count("<form") == page.text.count('name="csrf"') == 5
    done = decide(client, "Q-HIGH-A", "approve")
    page_text(done, 201, "Approved", "approval gate", "approved", "as ADV-1")
    again = decide(client, "Q-HIGH-A", "approve")
    page_text(again, 200, "You had already recorded this decision")
    # A different decision now: 409, shown on the package page with nothing recorded.
    refused = decide(client, "Q-HIGH-A", "defer", reason="wait for the client")
    page_text(refused, 409, "Nothing was recorded", "recommendation is approved")
    [row] = decision_rows(portal, "Q-HIGH-A")
    assert (row["action"], row["actor_id"], row["via"]) == ("approve", "ADV-1", "portal")
    # Modify through the page: the package's own trade rows.
    modified = decide(client, "Q-MED-OLD", "modify", qty_0="5", qty_1="10", reason="half now")
    page_text(modified, 201, "Modified")
    assert portal.status_of("Q-MED-OLD") == "modified"
    bad = decide(client, "Q-MED-NEW", "modify", qty_0="500", qty_1="20")
    page_text(bad, 422, "Nothing was recorded", "only 70 held")
    assert "ACC-14" not in bad.text  # masked in the messages too
    # Defer with a day: the start of that day in New York.
    deferred = decide(client, "Q-LOW", "defer", reason="client travelling", deferred_until="2026-11-30")
    page_text(deferred, 201, "Deferred until 30 Nov 2026 00:00 EST")
    with portal.store.begin() as conn:
        until = conn.execute(select(recommendations.c.deferred_until).where(
            recommendations.c.recommendation_id == "Q-LOW")).scalar_one()
    assert until.replace(tzinfo=until.tzinfo or ZoneInfo("UTC")) == datetime(2026, 11, 30,
                                                                             tzinfo=ZoneInfo("America/New_York"))
    page_text(decide(client, "Q-HIGH-B", "escalate", reason=""), 422, "Nothing was recorded")
    page_text(decide(client, "Q-HIGH-B", "escalate", reason="large harvest, please check"), 201,
              "Escalated to compliance")
    with portal.store.begin() as conn:
        assert audit.verify(conn, anchors=False).ok
    # Read-only roles see the package and no form.
    ops = portal.sign_in("ops@example-ria.com")
    view = ops.get("/portal/recommendations/Q-MED-NEW")
    page_text(view, 200, "Proposed trades (2)", "Your role (operations) reads recommendations and decides none")
    assert view.text.count("<form") == 1  # sign-out only


# ---------------------------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------------------------


def result_rows(response) -> dict[str, tuple[str, str]]:
    import re

    return {rid: code for rid, code in re.findall(r'<tr data-id="([^"]*)" data-code="(\d+)">', response.text)}


def test_batch_approve_reports_every_row(portal):
    dana = portal.sign_in("dana@example-ria.com")
    csrf = csrf_of(dana)
    # Beforehand: Q-HIGH-B already approved by Dana (a repeat is 200); Q-MED-NEW escalated by Dana
    # and approved by compliance (so Dana's approve now conflicts: 409); Q-LOW escalated (with
    # compliance: not Dana's to approve, 403).
    assert decide(dana, "Q-HIGH-B", "approve").status_code == 201
    assert decide(dana, "Q-MED-NEW", "escalate", reason="unusual").status_code == 201
    assert decide(dana, "Q-LOW", "escalate", reason="check the bands").status_code == 201
    cco = portal.sign_in("cco@example-ria.com")
    assert decide(cco, "Q-MED-NEW", "approve").status_code == 201

    picked = ["Q-HIGH-A", "Q-HIGH-B", "Q-MED-NEW", "Q-LOW", "Q-OTHER", "NOPE", "bad id!", "Q-MED-OLD"]
    response = dana.post("/portal/batch", data={"csrf": csrf, "action": "approve", "rid": picked})
    text = page_text(response, 200, "Review session: approve 8 recommendations")
    assert result_rows(response) == {"Q-HIGH-A": "201", "Q-HIGH-B": "200", "Q-MED-NEW": "409", "Q-LOW": "403",
                                     "Q-OTHER": "403", "NOPE": "404", "bad id!": "422", "Q-MED-OLD": "201"}
    for words in ("2 recorded", "1 already recorded", "1 already decided", "2 not yours to decide", "1 not found",
                  "1 not valid", "You had already recorded this decision",
                  "Recommendation is approved; a approve cannot be recorded on it",
                  "only compliance may approve, modify or return it",
                  "You may act only on recommendations for your own clients", "No recommendation NOPE"):
        assert words in text, (words, text)
    # Another advisor's client is refused and shown by id only: nothing of it is on the page.
    other = response.text.split('data-id="Q-OTHER"')[1].split("</tr>")[0]
    assert "HH-Z" not in other and "C-21" not in other and "/portal/recommendations/Q-OTHER" not in other
    assert (portal.status_of("Q-HIGH-A"), portal.status_of("Q-MED-OLD"), portal.status_of("Q-OTHER")) == (
        "approved", "approved", "pending")
    assert [r["via"] for r in decision_rows(portal, "Q-HIGH-A")] == ["portal"]
    assert len(decision_rows(portal, "Q-HIGH-B")) == 1  # the repeat recorded nothing
    with portal.store.begin() as conn:
        assert audit.verify(conn, anchors=False).ok


def test_batch_defer_until_a_day(portal):
    dana = portal.sign_in("dana@example-ria.com")
    response = dana.post("/portal/batch", data={"csrf": csrf_of(dana), "action": "defer", "rid": ["Q-LOW", "Q-HIGH-B"],
                                                "reason": "after the client meeting", "deferred_until": "2026-11-27"})
    page_text(response, 200, "Review session: defer 2 recommendations", "2 recorded")
    assert result_rows(response) == {"Q-LOW": "201", "Q-HIGH-B": "201"}
    for rid in ("Q-LOW", "Q-HIGH-B"):
        [row] = decision_rows(portal, rid)
        assert (row["action"], row["reason"], row["via"]) == ("defer", "after the client meeting", "portal")
        assert portal.status_of(rid) == "deferred"
    # Deferred rows stay in the open queue, with their clock paused.
    row = dana.get("/portal/queue").text.split('data-id="Q-LOW"')[1].split("</tr>")[0]
    assert "deferred" in row and "left" in row
    # A day too far ahead is refused on its row (422), as the API refuses it.
    late = dana.post("/portal/batch", data={"csrf": csrf_of(dana), "action": "defer", "rid": ["Q-HIGH-A"],
                                            "reason": "x", "deferred_until": "2030-01-01"})
    page_text(late, 200, "deferred_until may be at most 366 days ahead")
    assert result_rows(late) == {"Q-HIGH-A": "422"}
    assert portal.status_of("Q-HIGH-A") == "pending"


def test_a_team_member_decides_the_team_advisors_recommendations(portal):
    pat = portal.sign_in("pat@example-ria.com")  # ADV-3, on ADV-2's team
    response = pat.post("/portal/batch", data={"csrf": csrf_of(pat), "action": "approve",
                                               "rid": ["Q-OTHER", "Q-HIGH-A"]})
    assert result_rows(response) == {"Q-OTHER": "201", "Q-HIGH-A": "403"}
    [row] = decision_rows(portal, "Q-OTHER")
    assert (row["actor_id"], row["via"]) == ("ADV-3", "portal")


def test_pages_of_the_queue(portal, monkeypatch):
    from rebal_pipeline.approval_api import review_queue

    monkeypatch.setattr(review_queue, "PAGE_SIZE", 2)
    client = portal.sign_in("dana@example-ria.com")
    first = client.get("/portal/queue")
    assert queue_ids(first) == ORDER[:2]
    page_text(first, 200, "5 recommendations (showing 1–2)", "Next")
    assert queue_ids(client.get("/portal/queue", params={"page": "2"})) == ORDER[2:4]
    last = client.get("/portal/queue", params={"page": "3"})
    assert queue_ids(last) == ORDER[4:]
    assert "Next" not in page_text(last, 200, "Previous")
