"""The market-event batch in the review portal (issue 16 item 2): the queue filtered to one batch
(`?batch=mev-YYYYMMDD`) under the same who-sees-what rule and order, its header (the day's events,
where the person's recommendations of it stand, when the approved trades go out), the "Market
events" box and the row badges of the whole queue, and the review session on a batch's rows.
Over HTTP (SQLite and Postgres) and in Chromium (screenshots beside the portal's others).

The batch of Monday 23 Nov 2026 (trading day; the book of the 20 Nov session), on the portal's
book (conftest) plus Q-MEV-HELD (ADV-1's, HH-D, ACC-16):
    event 1  09:20 EST  intraday prices, rebal automatically, the basket −3.12%, re-scanned 09:28
             → Q-HIGH-A (open), Q-HIGH-B (approved 10:30, released 11:20), Q-LOW (open)
    event 2  11:35 EST  declared by Olu Operations, no price move, re-scanned 11:41
             → Q-MED-NEW (open), Q-MEV-HELD (approved 12:00, held), Q-OTHER (ADV-2's, open)
    release due 13:35 EST (11:35 + 120 min); the portal's clock: 12:15 EST (1 h 20 min before).
Not a member: Q-MED-OLD (ADV-1's). Five earlier batches (16–20 Nov) have no member at all.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone

import pytest
from sqlalchemy import insert, select, update

from rebal_pipeline.approval_api import review_queue
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.schema import (
    batch_recommendations, batch_release_decisions, batch_releases, market_batches, market_events,
    recommendations, users,
)
from rebal_pipeline_tests.portal.conftest import (
    PEOPLE, SCREENSHOTS, book_package, hidden, page_text, publish, queue_ids, visible_text,
)

BATCH = "mev-20261123"


def est(hour: int, minute: int, day: int = 23) -> datetime:
    """A New York time in November 2026 (EST, UTC−5) as UTC."""
    return datetime(2026, 11, day, hour + 5, minute, tzinfo=timezone.utc)


NOW = est(12, 15)
EVENT_OF = {"Q-HIGH-A": 1, "Q-HIGH-B": 1, "Q-LOW": 1, "Q-MED-NEW": 2, "Q-MEV-HELD": 2, "Q-OTHER": 2}
SCANNED = {1: est(9, 28), 2: est(11, 41)}


@pytest.fixture
def batch(portal):
    """The portal over the batch described in the module docstring; the clock at 12:15 EST."""
    store = portal.store
    publish(store, book_package("Q-MEV-HELD", "ACC-16", urgency="medium", drift=0.08, household="HH-D"),
            users=PEOPLE)
    with store.begin() as conn:
        for n in range(16, 21):  # earlier days whose re-scans published nothing
            conn.execute(insert(market_batches).values(
                batch_id=f"mev-202611{n}", trading_day=date(2026, 11, n), session_as_of=date(2026, 11, n - 1),
                opened_at=est(10, 0, n), release_due_at=est(12, 0, n), events=1))
        conn.execute(insert(market_batches).values(
            batch_id=BATCH, trading_day=date(2026, 11, 23), session_as_of=date(2026, 11, 20), opened_at=est(9, 20),
            release_due_at=est(13, 35), events=2))
        conn.execute(insert(market_events), [
            {"event_id": f"{BATCH}-e1", "event_key": "prices:" + "a" * 64, "batch_id": BATCH, "seq": 1,
             "source": "prices", "declared_by": "rebal:market_events",
             "reason": "The reference basket fell 3.1% from the 20 Nov close", "move": -0.0312,
             "reference": "{}", "detected_at": est(9, 20), "scanned_at": SCANNED[1], "scan_run_id": "run-e1",
             "recommendations": 3},
            {"event_id": f"{BATCH}-e2", "event_key": "operator:2026-11-23:" + "b" * 64, "batch_id": BATCH, "seq": 2,
             "source": "operator", "declared_by": "OPS-1",
             "reason": "Rate decision at 11:30; the client of ACC-21 called", "move": None, "reference": "{}",
             "detected_at": est(11, 35), "scanned_at": SCANNED[2], "scan_run_id": "run-e2", "recommendations": 3},
        ])
        for rid, seq in EVENT_OF.items():
            # The re-scan published them: their escalation clocks start at the scan.
            conn.execute(update(recommendations).where(recommendations.c.recommendation_id == rid)
                         .values(clock_started_at=SCANNED[seq]))
            conn.execute(insert(batch_recommendations).values(
                recommendation_id=rid, batch_id=BATCH, event_id=f"{BATCH}-e{seq}", severity=2.0,
                added_at=SCANNED[seq]))
        dana = dict(conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one())
        released, _ = lifecycle.decide(conn, "Q-HIGH-B", dana, "approve", est(10, 30), via="portal")
        lifecycle.decide(conn, "Q-MEV-HELD", dana, "approve", est(12, 0), via="portal")
        conn.execute(insert(batch_releases).values(release_id=f"{BATCH}-r1", batch_id=BATCH, seq=1,
                                                   claimed_at=est(11, 20), claimed_by_run="run-r1"))
        conn.execute(insert(batch_release_decisions).values(decision_id=released["decision_id"],
                                                            release_id=f"{BATCH}-r1"))
    portal.clock.now = NOW
    return portal


def part(response, css_id: str) -> str:
    """The visible text of the element with this id (one line, spaces collapsed)."""
    found = re.search(rf'<(\w+)[^>]* id="{css_id}"[^>]*>(.*?)</\1>', response.text, re.S)
    assert found, (css_id, response.text[:3000])
    return " ".join(visible_text(found[2]).split())


def counts(response) -> dict[str, str]:
    return {name: part(response, f"n-{name}") for name in ("members", "waiting", "held", "released")}


# ---------------------------------------------------------------------------------------------
# Over HTTP
# ---------------------------------------------------------------------------------------------


def test_the_batch_queue_lists_only_the_persons_members_in_the_queue_order(batch):
    dana = batch.sign_in("dana@example-ria.com")
    response = dana.get("/portal/queue", params={"batch": BATCH})
    text = page_text(response, 200, "Market event of 23 Nov 2026", "3 recommendations")
    # Open members of Dana's only: high, then medium, then low (Q-LOW's larger drift does not
    # lift it over the urgencies); Q-MED-OLD is hers but not in the batch, Q-OTHER is Sam's.
    assert queue_ids(response) == ["Q-HIGH-A", "Q-MED-NEW", "Q-LOW"]
    assert "HH-Z" not in text and "Q-OTHER" not in response.text
    # The review session works on them: one checkbox each, the form posting to the batch's session.
    assert response.text.count('type="checkbox" name="rid"') == 3
    assert f'action="/portal/batch?batch={BATCH}"' in response.text
    # No badge inside the batch's own queue.
    assert 'class="mev-badge"' not in response.text
    # Other statuses of the batch: its approved ones (held and released alike).
    approved = dana.get("/portal/queue", params={"batch": BATCH, "status": "approved"})
    assert queue_ids(approved) == ["Q-HIGH-B", "Q-MEV-HELD"]

    sam = batch.sign_in("sam@example-ria.com")
    assert queue_ids(sam.get("/portal/queue", params={"batch": BATCH})) == ["Q-OTHER"]
    pat = batch.sign_in("pat@example-ria.com")  # on ADV-2's team
    assert queue_ids(pat.get("/portal/queue", params={"batch": BATCH})) == ["Q-OTHER"]
    ops = batch.sign_in("ops@example-ria.com")
    everyone = ops.get("/portal/queue", params={"batch": BATCH})
    assert queue_ids(everyone) == ["Q-HIGH-A", "Q-MED-NEW", "Q-OTHER", "Q-LOW"]
    assert 'name="rid"' not in everyone.text  # operations decides nothing


def test_the_batch_header_states_the_events_the_counts_and_the_release(batch):
    dana = batch.sign_in("dana@example-ria.com")
    response = dana.get("/portal/queue", params={"batch": BATCH})
    page_text(response, 200, "Trading day 23 Nov 2026 (today)", "against the positions of 20 Nov 2026")
    rows = re.findall(r'<tr data-event="(\d+)">(.*?)</tr>', response.text, re.S)
    assert [(seq, " | ".join(visible_text(cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)))
            for seq, row in rows] == [
        ("1", "09:20 | Intraday prices | rebal, automatically | The reference basket fell 3.1% from the 20 Nov close | "
              "\u22123.1% | re-scanned at 09:28: 3 recommendations"),
        # An account named in a typed reason is masked; an event without prices has no move.
        ("2", "11:35 | Declared by a person | Olu Operations | Rate decision at 11:30; the client of "
              "\u2022\u2022\u2022\u2022C-21 called | \u2014 | re-scanned at 11:41: 3 recommendations")]
    assert "ACC-21" not in response.text
    # Dana's five members: Q-HIGH-A, Q-LOW, Q-MED-NEW open; Q-MEV-HELD approved, not released;
    # Q-HIGH-B released at 11:20.
    assert counts(response) == {"members": "5 your clients' and your team's", "waiting": "3", "held": "1",
                                "released": "1"}
    assert part(response, "release") == ("The approved trades go out together as block orders at 13:35 New York "
                                         "(in 1 h 20 min). Released so far: 11:20.")
    # Operations counts every member: Sam's Q-OTHER waits too.
    ops = batch.sign_in("ops@example-ria.com")
    assert counts(ops.get("/portal/queue", params={"batch": BATCH})) == {
        "members": "6", "waiting": "4", "held": "1", "released": "1"}
    assert 'id="n-closed"' not in response.text  # nothing closed otherwise yet
    # After the due time, the page says the release was due (a new sign-in: the idle timeout);
    # Q-LOW, back inside its bands meanwhile, needs no decision any more.
    with batch.store.begin() as conn:
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == "Q-LOW")
                     .values(status="resolved_by_market"))
    batch.clock.now = est(13, 40)
    later = batch.sign_in("dana@example-ria.com").get("/portal/queue", params={"batch": BATCH})
    assert part(later, "release") == ("The release was due at 13:35 New York: trades approved since go out "
                                      "together as block orders at the next check. Released so far: 11:20.")
    assert {**counts(later), "closed": part(later, "n-closed")} == {
        "members": "5 your clients' and your team's", "waiting": "2", "held": "1", "released": "1",
        "closed": "1 resolved by market: 1"}


def test_batch_approve_of_two_members_gives_two_results_and_moves_the_counts(batch):
    dana = batch.sign_in("dana@example-ria.com")
    form = dana.get("/portal/queue", params={"batch": BATCH})
    response = dana.post(f"/portal/batch?batch={BATCH}", data={"csrf": hidden(form.text, "csrf"), "action": "approve",
                                                              "rid": ["Q-HIGH-A", "Q-MED-NEW"]})
    page_text(response, 200, "Review session: approve 2 recommendations", "2 recorded")
    assert re.findall(r'<tr data-id="([^"]*)" data-code="(\d+)">', response.text) == [("Q-HIGH-A", "201"),
                                                                                     ("Q-MED-NEW", "201")]
    assert part(response, "batch-now") == ("Market event of 23 Nov 2026, now: waiting for a "
                                           "person 1 · approved, held for the release 3 · released 1. The approved "
                                           "trades go out together as block orders at 13:35 New York.")
    assert f'href="/portal/queue?batch={BATCH}">Back to the market event of 23 Nov 2026' in response.text
    assert (batch.status_of("Q-HIGH-A"), batch.status_of("Q-MED-NEW"), batch.status_of("Q-LOW")) == (
        "approved", "approved", "pending")
    after = dana.get("/portal/queue", params={"batch": BATCH})
    assert queue_ids(after) == ["Q-LOW"]
    assert counts(after) == {"members": "5 your clients' and your team's", "waiting": "1", "held": "3",
                             "released": "1"}
    # Sam's member, ticked by a forged form, is refused on its row and left pending.
    refused = dana.post(f"/portal/batch?batch={BATCH}", data={"csrf": hidden(form.text, "csrf"), "action": "approve",
                                                             "rid": ["Q-OTHER"]})
    assert re.findall(r'data-id="([^"]*)" data-code="(\d+)"', refused.text) == [("Q-OTHER", "403")]
    assert batch.status_of("Q-OTHER") == "pending"
    # A malformed batch on the session's address: refused before any row is decided.
    bad = dana.post("/portal/batch?batch=mev-1", data={"csrf": hidden(form.text, "csrf"), "action": "approve",
                                                       "rid": ["Q-LOW"]})
    page_text(bad, 422, "batch: not a market-event batch id", "Nothing was recorded")
    assert batch.status_of("Q-LOW") == "pending"


def test_a_bad_batch_id_is_a_422_page_and_an_unknown_one_lists_nothing(batch):
    dana = batch.sign_in("dana@example-ria.com")
    for bad in ("mev-2026112", "mev-202611230", "MEV-20261123", "20261123", "mev-2026-11-23", "mev-20261123'--"):
        page_text(dana.get("/portal/queue", params={"batch": bad}), 422, "batch: not a market-event batch id",
                  "e.g. mev-20261120")
    unknown = dana.get("/portal/queue", params={"batch": "mev-20991231"})
    page_text(unknown, 200, "No market-event batch mev-20991231 is recorded, so there is nothing to list for it",
              "Nothing here")
    assert queue_ids(unknown) == []
    # A batch with no member of Dana's: its header, no row.
    empty = dana.get("/portal/queue", params={"batch": "mev-20261120"})
    page_text(empty, 200, "Market event of 20 Nov 2026", "No recommendation matches these filters")
    assert queue_ids(empty) == [] and counts(empty)["members"] == "0 your clients' and your team's"


def test_the_batch_stays_across_pages_and_the_other_filters(batch, monkeypatch):
    assert review_queue.Filters(household="HH-C", batch=BATCH, page=2).query(page="3") == {
        "status": "open", "household": "HH-C", "batch": BATCH, "page": "3"}
    assert review_queue.Filters(batch=BATCH).query(kind="harvest") == {"status": "open", "kind": "harvest",
                                                                       "batch": BATCH}
    monkeypatch.setattr(review_queue, "PAGE_SIZE", 2)
    dana = batch.sign_in("dana@example-ria.com")
    first = dana.get("/portal/queue", params={"batch": BATCH})
    assert queue_ids(first) == ["Q-HIGH-A", "Q-MED-NEW"]
    [next_url] = re.findall(r'<a href="([^"]+)">Next', first.text)
    assert next_url.replace("&amp;", "&") == f"/portal/queue?status=open&batch={BATCH}&page=2"
    second = dana.get(next_url.replace("&amp;", "&"))
    assert queue_ids(second) == ["Q-LOW"]
    # The filter form carries the batch, and the batch narrows with the other filters.
    assert f'<input type="hidden" name="batch" value="{BATCH}">' in first.text
    assert queue_ids(dana.get("/portal/queue", params={"batch": BATCH, "household": "HH-C"})) == [
        "Q-MED-NEW", "Q-LOW"]
    page_text(dana.get("/portal/queue", params={"batch": BATCH, "urgency": "high"}), 422, "unknown filter 'urgency'")


def test_the_whole_queue_has_the_market_events_box_and_row_badges(batch):
    dana = batch.sign_in("dana@example-ria.com")
    response = dana.get("/portal/queue")
    # Dana's: the batch she has members in, with her open count (the empty batches are not hers).
    assert re.findall(r'<li data-batch="([^"]+)">', response.text) == [BATCH]
    assert part(response, "market-events").endswith(
        "23 Nov 2026 (today) · 2 events · 3 open of 5 recommendations")
    assert f'<a href="/portal/queue?batch={BATCH}"><strong>23 Nov 2026</strong>' in response.text
    # The rows of the batch carry its badge; Q-MED-OLD (not a member) does not.
    badged = {rid for rid in queue_ids(response)
              if f'href="/portal/queue?batch={BATCH}">Market event 23 Nov 2026' in
              response.text.split(f'data-id="{rid}"')[1].split("</tr>")[0]}
    assert badged == {"Q-HIGH-A", "Q-MED-NEW", "Q-LOW"}
    assert "Q-MED-OLD" in queue_ids(response)
    # Operations: every batch, the latest five (16 Nov left out), its own counts.
    ops = batch.sign_in("ops@example-ria.com")
    box = ops.get("/portal/queue")
    assert re.findall(r'<li data-batch="([^"]+)">', box.text) == [
        BATCH, "mev-20261120", "mev-20261119", "mev-20261118", "mev-20261117"]
    assert "2 events · 4 open of 6 recommendations" in part(box, "market-events")
    assert "20 Nov 2026 · 1 event · 0 open of 0 recommendations" in part(box, "market-events")
    # A batch-filtered queue has no box.
    assert 'id="market-events"' not in dana.get("/portal/queue", params={"batch": BATCH}).text


def test_signed_move():
    assert [review_queue.signed_move(m) for m in (-0.031, -0.0312, 0.0148, 0.03, -0.0004, 0.0, None)] == [
        "\u22123.1%", "\u22123.1%", "+1.5%", "+3.0%", "0.0%", "0.0%", "\u2014"]


# ---------------------------------------------------------------------------------------------
# In the browser
# ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_in_the_browser_the_batch_from_the_box_to_the_review_session(batch, page):
    from playwright.sync_api import expect

    from rebal_pipeline_tests.portal.test_browser import sign_in

    sign_in(batch, page, "dana@example-ria.com")
    box = page.locator("#market-events")
    expect(box).to_contain_text("3 open of 5 recommendations")
    expect(page.locator('tr[data-id="Q-LOW"] a.mev-badge')).to_have_text("Market event 23 Nov 2026")
    expect(page.locator('tr[data-id="Q-MED-OLD"] a.mev-badge')).to_have_count(0)
    page.screenshot(path=str(SCREENSHOTS / "portal_market_events.png"), full_page=True)
    box.get_by_role("link", name="23 Nov 2026").click()
    expect(page.get_by_role("heading", name="Market event of 23 Nov 2026")).to_be_visible()
    assert page.url.endswith(f"/portal/queue?batch={BATCH}")
    assert re.findall(r'<tr data-id="([^"]+)"', page.content()) == ["Q-HIGH-A", "Q-MED-NEW", "Q-LOW"]
    expect(page.locator("#events tbody tr").first).to_contain_text("\u22123.1%")
    expect(page.locator("#n-waiting")).to_have_text("3")
    expect(page.locator("#release")).to_contain_text("block orders at 13:35 New York (in 1 h 20 min)")
    page.screenshot(path=str(SCREENSHOTS / "portal_market_batch.png"), full_page=True)

    # A filter keeps the batch (the form's hidden field, no script).
    page.get_by_label("Household").select_option("HH-C")
    page.get_by_role("button", name="Apply filters").click()
    assert f"batch={BATCH}" in page.url
    assert re.findall(r'<tr data-id="([^"]+)"', page.content()) == ["Q-MED-NEW", "Q-LOW"]
    page.get_by_label("Household").select_option("")
    page.get_by_role("button", name="Apply filters").click()

    for rid in ("Q-HIGH-A", "Q-MED-NEW"):
        page.locator(f'tr[data-id="{rid}"] input[type=checkbox]').check()
    page.get_by_role("button", name="Approve selected").click()
    expect(page.get_by_role("heading", name="Review session: approve 2 recommendations")).to_be_visible()
    expect(page.locator("#results tbody tr")).to_have_count(2)
    expect(page.locator('#results tr[data-id="Q-HIGH-A"]')).to_contain_text("201 recorded")
    expect(page.locator('#results tr[data-id="Q-MED-NEW"]')).to_contain_text("201 recorded")
    expect(page.locator("#batch-now")).to_contain_text("waiting for a person 1 · approved, held for the release 3")
    page.screenshot(path=str(SCREENSHOTS / "portal_market_batch_result.png"), full_page=True)

    page.get_by_role("link", name="Back to the market event of 23 Nov 2026").click()
    assert re.findall(r'<tr data-id="([^"]+)"', page.content()) == ["Q-LOW"]
    expect(page.locator("#n-held")).to_have_text("3")
    assert not page.errors  # nothing refused by the CSP
