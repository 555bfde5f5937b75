"""The approval portal: the HTML pages behind the emails' one-click links.

First over HTTP (a real uvicorn server, httpx, the store on SQLite and Postgres — the `api`
fixture of test_api.py): content negotiation, the form posts, the error pages, the headers. Then
in a real browser: Debian's headless chromium driven by Playwright, from the advisor's alert email
to the confirmation page. Screenshots go to rebal_pipeline_tests/approvals/output/.
"""

from __future__ import annotations

import html
import json
import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import func, select

from rebal_pipeline.approval_api import portal
from rebal_pipeline.approval_api.links import LinkClaims, make_link_token
from rebal_pipeline.approval_api.models import RecommendationSummary
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import decisions, recommendations, used_links
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, package
from rebal_pipeline_tests.approvals.test_api import SECRET, api, assert_error, leave_team  # noqa: F401  (fixture)
from rebal_pipeline_tests.browser import chromium  # noqa: F401 (fixture: Debian's chromium)

OUTPUT = Path(__file__).parent / "output"
# What Chromium and Firefox send when opening a link.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"}
FORM = "application/x-www-form-urlencoded"
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
APPROVED = ("Approved — the trades go to the approval gate, which re-checks today's positions before any ticket "
            "is prepared")
MODIFIED = ("Modified — the changed trades go to the approval gate, which re-checks today's positions before any "
            "ticket is prepared")


def link(api, recommendation_id: str, action: str, advisor_id: str = "ADV-1") -> str:
    return api.app.state.issue_links(recommendation_id, advisor_id, actions=(action,))[action]


def browse(api, token: str, accept: dict | None = None) -> httpx.Response:
    with api.client() as c:
        return c.get(f"/links/{token}", headers=BROWSER if accept is None else accept)


def submit(api, token: str, **fields: str) -> httpx.Response:
    """The portal's form as a browser posts it (urlencoded, UTF-8; an empty body for approve)."""
    with api.client() as c:
        return c.post(f"/links/{token}", content=urlencode(fields).encode(), headers={**BROWSER, "Content-Type": FORM})


def visible_text(page: str) -> str:
    """What a reader sees: tags and the style sheet dropped, entities decoded, spaces collapsed."""
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page))).replace(" .", ".").replace(" :", ":")


def page_text(response: httpx.Response, status: int, *words: str) -> str:
    """The page's text (entities decoded), after checking status, type and the security headers."""
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "Accept" in response.headers["vary"]
    text = visible_text(response.text)
    for w in words:
        assert w in text, (w, text[:3000])
    # Nothing outside the page: no script, no external stylesheet, image, font or frame.
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", response.text, re.I)
    assert "http://" not in response.text and "https://" not in response.text
    return text


def used_count(api) -> int:
    with api.store.begin() as conn:
        return conn.execute(select(func.count()).select_from(used_links)).scalar_one()


def decision_rows(api, recommendation_id: str) -> list[dict]:
    with api.store.begin() as conn:
        return [dict(r) for r in conn.execute(select(decisions).where(
            decisions.c.recommendation_id == recommendation_id)).mappings()]


# ---------------------------------------------------------------------------------------------
# Content negotiation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "html_wanted"), [
    (BROWSER["Accept"], True),                                              # Chromium, Firefox
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # Safari
    ("text/html", True),
    ("text/html, */*", True),                                               # named beats the wildcard
    ("text/*;q=0.9, application/json;q=0.5", True),
    (None, False), ("", False), ("*/*", False), ("application/json", False),
    ("application/json, text/html", False),                                 # a tie keeps JSON
    ("text/html;q=0.5, application/json", False),
    ("text/html;q=0, */*", False),                                          # HTML refused outright
    ("application/*, text/html;q=0.9", False),
    ("garbage, ,;;q=x", False),
])
def test_wants_html(accept, html_wanted):
    assert portal.wants_html(accept) is html_wanted


def test_a_browser_gets_the_page_and_it_changes_nothing(api):
    token = link(api, "REC-1", "approve")
    before = api.audit_count()
    for _ in range(3):  # a mail scanner rendering it, the advisor opening it twice
        text = page_text(browse(api, token), 200, "Approve these trades?", "Proposed trades (2)",
                         "Account ••••CC-1", "HH-1", "20 Nov 2026", "Medium", "$2,000.00", "pending",
                         "Drift", "Equity", "+10.00%", "±5.00%", "Outside band",
                         "Tax impact", "Estimated tax", "$20.00", "Long-term gain", "$100.00",
                         "IPS and model", "2026.11-2+test", "What this link does: approve the proposed trades",
                         "approval gate", "Approve these trades")
    assert api.audit_count() == before and used_count(api) == 0 and api.status_of("REC-1") == "pending"
    # The trades table, row by row (sells first), and exactly one form: one button, posting back here.
    rows = re.findall(r"<tr>\s*<td>(Sell|Buy)</td>\s*<td class=\"num\">([\d,.]+)</td>\s*<td><strong>(\w+)</strong>",
                      browse(api, token).text)
    assert rows == [("Sell", "10", "VTI"), ("Buy", "20", "BND")]
    page = browse(api, token).text
    assert page.count("<form") == 1 and re.search(r'<form class="decision" method="post"', page)
    assert " action=" not in page  # the form posts to the URL it was served from (the token stays out of the page)
    assert token not in page and page.count("<button") == 1 and "<textarea" not in page
    # The unmasked account id is not on the page.
    assert "ACC-1" not in text


def test_api_clients_still_get_json(api):
    token = link(api, "REC-1", "approve")
    bodies = []
    for accept in (None, {"Accept": "application/json"}, {"Accept": "*/*"}, {"Accept": "application/json, text/html"}):
        with api.client() as c:
            response = c.get(f"/links/{token}", headers=accept or {})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert response.headers["vary"] == "Accept"
        bodies.append(response.json())
    assert all(b == bodies[0] for b in bodies)
    assert set(bodies[0]) == {"action", "recommendation_id", "advisor_id", "expires_at", "would", "needs_reason",
                              "recommendation", "package"}
    assert bodies[0]["would"] == "approve the proposed trades" and bodies[0]["package"] is None
    # JSON POST: as before (201, DecisionResult), even from a client that would take HTML.
    with api.client() as c:
        used = c.post(f"/links/{token}", json={}, headers={"Accept": "application/json"})
    assert used.status_code == 201 and used.json()["decision"]["via"] == "link"
    assert_error(api.post(None, f"/links/{token}"), 410, "already been used")


def test_the_openapi_document_does_not_show_the_form_route(api):
    doc = api.get(None, "/openapi.json").json()
    post = doc["paths"]["/links/{token}"]["post"]
    assert list(post["requestBody"]["content"]) == ["application/json"]
    assert all(list(r.get("content", {"application/json": 0})) == ["application/json"]
               for r in post["responses"].values())
    assert list(doc["paths"]["/links/{token}"]) == ["get", "post"]


# ---------------------------------------------------------------------------------------------
# The form
# ---------------------------------------------------------------------------------------------


def test_approve_form_records_the_decision_once(api):
    token = link(api, "REC-1", "approve")
    done = submit(api, token)
    text = page_text(done, 201, APPROVED, "REC-1", "Account ••••CC-1", "approved", "as ADV-1", "2 ($2,000.00)")
    assert "already recorded" not in text
    assert api.status_of("REC-1") == "approved"
    [row] = decision_rows(api, "REC-1")
    assert (row["action"], row["actor_id"], row["via"]) == ("approve", "ADV-1", "link")
    with api.store.begin() as conn:
        assert audit.verify(conn).ok
    # Used: posting again, or opening it again, is a page saying so (410), for a browser.
    page_text(submit(api, token), 410, "This link has already been used")
    page_text(browse(api, token), 410, "This link has already been used.", "Nothing was recorded")
    assert len(decision_rows(api, "REC-1")) == 1 and used_count(api) == 1


def test_defer_form_needs_a_reason_then_defers_until_the_day(api):
    token = link(api, "REC-5", "defer")
    page = browse(api, token)
    page_text(page, 200, "Defer this recommendation", "Reason", "Defer until")
    assert re.search(r'<textarea id="reason" name="reason" required maxlength="2000"', page.text)
    # The defer days offered: tomorrow (New York) to a year ahead.
    assert 'type="date" id="deferred_until" name="deferred_until" min="2026-11-21" max="2027-11-21"' in page.text
    for fields in ({}, {"reason": ""}, {"reason": "  \r\n "}):
        refused = submit(api, token, **fields)
        page_text(refused, 422, "Nothing was recorded", "Defer needs a reason.", "Defer this recommendation",
                  "Proposed trades (2)")
        assert 'role="alert"' in refused.text and 'aria-invalid="true"' in refused.text
        assert "<form" in refused.text
    bad_date = submit(api, token, reason="client on holiday", deferred_until="25/11/2026")
    page_text(bad_date, 422, "Defer until: not a date")
    assert ">client on holiday</textarea>" in bad_date.text  # what was typed is kept
    page_text(submit(api, token, reason="x", deferred_until="2026-11-20"), 422,
              "The defer-until day must be in the future.")
    page_text(submit(api, token, reason="x", deferred_until="2028-01-01"), 422,
              "The defer-until day may be at most 366 days ahead.")
    page_text(submit(api, token, reason="x" * 2001), 422, "Reason: at most 2000 characters")
    assert api.status_of("REC-5") == "pending" and used_count(api) == 0 and decision_rows(api, "REC-5") == []
    # With a reason (and a day): deferred until the start of that day, New York time.
    done = submit(api, token, reason="Client travelling <until> the 24th", deferred_until="2026-11-25")
    page_text(done, 201, "Deferred until 25 Nov 2026 00:00 EST", "Client travelling <until> the 24th")
    assert "<until>" not in done.text and "&lt;until&gt;" in done.text  # escaped
    assert api.status_of("REC-5") == "deferred"
    [row] = decision_rows(api, "REC-5")
    assert (row["action"], row["via"], row["reason"]) == ("defer", "link", "Client travelling <until> the 24th")
    with api.store.begin() as conn:
        until = conn.execute(select(recommendations.c.deferred_until).where(
            recommendations.c.recommendation_id == "REC-5")).scalar_one()
    assert (until if until.tzinfo else until.replace(tzinfo=timezone.utc)) == datetime(2026, 11, 25, 5, 0,
                                                                                       tzinfo=timezone.utc)
    page_text(submit(api, token, reason="again"), 410, "already been used")


def test_defer_form_without_a_day_uses_the_default(api):
    done = submit(api, link(api, "REC-4", "defer"), reason="waiting for the client's call", deferred_until="")
    # The store's default: 5 days after the decision (22:30 UTC = 17:30 New York).
    page_text(done, 201, "Deferred until 25 Nov 2026 17:30 EST")


def test_escalate_form(api):
    token = link(api, "REC-4", "escalate")
    page_text(browse(api, token), 200, "Escalate to compliance", "Reason")
    page_text(submit(api, token, reason=""), 422, "Escalate needs a reason.")
    page_text(submit(api, token, reason="IPS question: is the bond sleeve still right?"), 201,
              "Escalated to compliance", "IPS question: is the bond sleeve still right?", "escalated")
    assert api.status_of("REC-4") == "escalated"


def qty_inputs(page: str) -> dict[str, str]:
    """The review form's quantity fields: name -> value."""
    return dict(re.findall(r'<input type="number" id="(qty_\d+)" name="\1" min="0" step="any"[^>]*? value="([^"]*)"',
                           page))


def test_review_page_offers_the_quantities_form(api):
    token = link(api, "REC-1", "review")
    before = api.audit_count()
    page = browse(api, token)
    text = page_text(page, 200, "Review the recommendation", "Proposed trades (2)", "Tax impact", "Change quantities",
                     "Record these quantities", "what you changed and why", "0 drops a trade",
                     "record them, once, as a modified approval",
                     "What this link does: it opens the recommendation for review")
    # One row per proposed trade, named by its index in the package, prefilled with the proposed quantity.
    assert qty_inputs(page.text) == {"qty_0": "10", "qty_1": "20"}
    rows = re.findall(r"<tr>\s*<td>(••••CC-1)</td>\s*<td>(Sell|Buy)</td>\s*<td><strong>(\w+)</strong></td>\s*"
                      r"<td class=\"num\">([$\d,.]+)</td>\s*<td class=\"num\">([\d,.]+)</td>", page.text)
    assert rows == [("••••CC-1", "Sell", "VTI", "$100.00", "10"), ("••••CC-1", "Buy", "BND", "$50.00", "20")]
    assert page.text.count("<form") == 1 and " action=" not in page.text and token not in page.text
    assert '<textarea id="reason" name="reason" maxlength="2000">' in page.text  # optional
    assert page.text.count("<button") == 1 and "ACC-1" not in text
    # Opening it changes nothing, and it opens again.
    page_text(browse(api, token), 200, "Change quantities")
    assert api.audit_count() == before and used_count(api) == 0 and api.status_of("REC-1") == "pending"
    # The JSON API is as before: GET shows the package, a JSON POST records nothing (422).
    with api.client() as c:
        view = c.get(f"/links/{token}")
        assert view.status_code == 200 and view.json()["package"]["recommendation_id"] == "REC-1"
        assert view.json()["would"] == "nothing: this link opens the recommendation for review"
        assert_error(c.post(f"/links/{token}", json={}), 422, "records no decision")
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0


def test_review_form_records_a_modification_once(api):
    token = link(api, "REC-1", "review")
    done = submit(api, token, qty_0="8", qty_1="16", reason="Smaller step <for now>")
    text = page_text(done, 201, MODIFIED, "Modified", "REC-1", "modified", "as ADV-1", "Smaller step <for now>",
                     "Trades recorded (2)", "Bands after these trades", "Equity", "62.00%", "Fixed income", "38.00%",
                     "Inside band", "every asset class ends inside its band", "it still opens the recommendation")
    assert "Outside band" not in text and "already recorded" not in text and "ACC-1" not in text
    assert "<for now>" not in done.text  # escaped
    rows = re.findall(r"<tr>\s*<td>••••CC-1</td>\s*<td>(Sell|Buy)</td>\s*<td><strong>(\w+)</strong></td>\s*"
                      r"<td class=\"num\">([\d,.]+)</td>\s*<td class=\"num\">([\d,.]+)</td>", done.text)
    assert rows == [("Sell", "VTI", "10", "8"), ("Buy", "BND", "20", "16")]
    assert api.status_of("REC-1") == "modified"
    [row] = decision_rows(api, "REC-1")
    assert (row["action"], row["actor_id"], row["via"], row["reason"]) == ("modify", "ADV-1", "link",
                                                                           "Smaller step <for now>")
    payload = json.loads(row["payload"])
    assert sorted((t["account_id"], t["side"], t["symbol"], t["quantity"]) for t in payload["trades"]) == [
        ("ACC-1", "buy", "BND", 16), ("ACC-1", "sell", "VTI", 8)]
    assert payload["inside_bands"] is True
    with api.store.begin() as conn:
        assert audit.verify(conn).ok
        [used] = conn.execute(select(used_links)).mappings().all()
    assert (used["recommendation_id"], used["action"]) == ("REC-1", "review")
    # One modification per review link: posting again is 410; reading it still works, without the form.
    page_text(submit(api, token, qty_0="9", qty_1="18"), 410, "This link has already been used")
    again = browse(api, token)
    page_text(again, 200, "Review the recommendation", "modified",
              "Quantities cannot be changed here: This link has already recorded a modification")
    assert "<form" not in again.text
    # Another review link (a later email) repeating the same quantities: recorded once, said so (200).
    repeat = submit(api, link(api, "REC-1", "review"), qty_1="16", qty_0="8")
    page_text(repeat, 200, MODIFIED, "already recorded this decision")
    assert len(decision_rows(api, "REC-1")) == 1


def test_review_form_fractional_and_dropped_trades_outside_the_bands(api):
    done = submit(api, link(api, "REC-5", "review"), qty_0="2.5", qty_1="0", reason="")
    text = page_text(done, 201, MODIFIED, "Trades recorded (1)", "Dropped", "2.5", "Outside band",
                     "Not every class ends inside its band: Equity, Fixed income stay outside")
    assert "Reason" not in text
    [row] = decision_rows(api, "REC-5")
    assert row["reason"] is None and row["via"] == "link"
    assert [(t["symbol"], t["quantity"]) for t in json.loads(row["payload"])["trades"]] == [("VTI", 2.5)]


def test_review_form_oversell_comes_back_with_the_errors(api):
    token = link(api, "REC-1", "review")
    refused = submit(api, token, qty_0="100", qty_1="20", reason="sell it all")
    text = page_text(refused, 422, "Nothing was recorded", "The modified trades cannot be accepted.",
                     "••••CC-1 sell VTI 100: only 70 held (no overselling)", "Change quantities")
    assert "ACC-1" not in text  # the API's messages name the account: masked on the page
    assert 'role="alert"' in refused.text
    assert qty_inputs(refused.text) == {"qty_0": "100", "qty_1": "20"}  # what was typed is kept
    assert ">sell it all</textarea>" in refused.text
    # Buys the sells cannot pay for.
    page_text(submit(api, token, qty_0="10", qty_1="30"), 422, "the buys need $500.00 more cash")
    # Dropping everything is no modification.
    page_text(submit(api, token, qty_0="0", qty_1="0"), 422, "The modification leaves no trade")
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0 and decision_rows(api, "REC-1") == []
    # The link was not used up by the refusals.
    page_text(submit(api, token, qty_0="10", qty_1="18"), 201, MODIFIED)


@pytest.mark.parametrize(("fields", "message"), [
    ({"qty_0": "8", "qty_2": "1"}, "Field qty_2: not a trade of this recommendation"),
    ({"qty_0": "8", "qty_01": "1"}, "Field qty_01: not a trade of this recommendation"),
    ({"qty_x": "1"}, "Field qty_x: not a trade of this recommendation"),
    ({"qty_-1": "1"}, "Field qty_-1: not a trade of this recommendation"),
    ({"qty_0": "-1", "qty_1": "20"}, "Sell VTI (••••CC-1): the quantity cannot be negative"),
    ({"qty_0": "ten", "qty_1": "20"}, "Sell VTI (••••CC-1): not a number"),
    ({"qty_0": "1,5"}, "Sell VTI (••••CC-1): not a number"),
    ({"qty_0": "nan"}, "Sell VTI (••••CC-1): not a number"),
    ({"qty_0": ""}, "Sell VTI (••••CC-1): enter a quantity"),
    ({"qty_1": "1e99"}, "Buy BND (••••CC-1): the quantity is too large"),
    ({}, "No quantities were sent"),
    ({"reason": "x", "account_0": "ACC-9", "symbol_0": "GME"}, "No quantities were sent"),
    ({"qty_0": "8", "deferred_until": "2026-11-25"}, "The defer-until day applies to defer links only"),
])
def test_review_form_refuses_unknown_rows_and_bad_numbers(api, fields, message):
    token = link(api, "REC-1", "review")
    refused = submit(api, token, **fields)
    text = page_text(refused, 422, "Nothing was recorded", message, "Change quantities")
    assert "<form" in refused.text and "ACC-1" not in text
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0 and decision_rows(api, "REC-1") == []


def test_review_form_marks_the_wrong_field(api):
    refused = submit(api, link(api, "REC-1", "review"), qty_0="abc", qty_1="16")
    assert re.search(r'id="qty_0"[^>]*value="abc"[^>]*aria-invalid="true"', refused.text)
    assert not re.search(r'id="qty_1"[^>]*aria-invalid', refused.text)


def test_decision_links_take_no_quantities(api):
    """An approve link decides the trades as proposed: quantities posted to it are refused, not ignored."""
    token = link(api, "REC-1", "approve")
    page_text(submit(api, token, qty_0="1"), 422, "Quantities can be changed on the review page only")
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0


def test_review_link_shows_no_form_when_the_advisor_may_not_decide(api):
    assert api.decide("ADV-1", "REC-1", action="approve").status_code == 201
    token = link(api, "REC-1", "review")
    page = browse(api, token)
    page_text(page, 200, "Review the recommendation", "This recommendation is already approved",
              "Quantities cannot be changed here: The recommendation is already approved.",
              "The decision buttons are in the email")
    assert "<form" not in page.text and "<button" not in page.text and "<input" not in page.text
    # Posted anyway: the lifecycle's conflict (409), nothing recorded, the link not used.
    page_text(submit(api, token, qty_0="8", qty_1="16"), 409, "A decision is already recorded",
              "Recommendation is approved; a modify cannot be recorded on it")
    assert len(decision_rows(api, "REC-1")) == 1 and used_count(api) == 0
    # Someone who may read but not decide (operations): the page, no form, and why; a post is 403.
    ops = link(api, "REC-4", "review", advisor_id="OPS-1")
    page = browse(api, ops)
    page_text(page, 200, "Quantities cannot be changed here: You may act only on recommendations for your own "
                         "clients.")
    assert "<form" not in page.text
    page_text(submit(api, ops, qty_0="8", qty_1="16"), 403, "You may act only on recommendations for your own clients")
    assert api.status_of("REC-4") == "pending" and used_count(api) == 0


def test_repeat_of_a_portal_decision(api):
    """Approved through the API first: the approve link's form repeats it (200), says so."""
    assert api.decide("ADV-1", "REC-1", action="approve").status_code == 201
    text = page_text(browse(api, link(api, "REC-1", "approve")), 200, "This recommendation is already")
    assert "approved" in text
    page_text(submit(api, link(api, "REC-1", "approve")), 200, APPROVED, "already recorded this decision")
    # A different decision: the conflict page (409), nothing recorded.
    page_text(submit(api, link(api, "REC-1", "defer"), reason="wait"), 409,
              "A decision is already recorded", "Recommendation is approved; a defer cannot be recorded on it")
    assert len(decision_rows(api, "REC-1")) == 1


# ---------------------------------------------------------------------------------------------
# Error pages: the JSON's status and message, as a page for a browser
# ---------------------------------------------------------------------------------------------


def test_expired_and_forged_links(api):
    token = link(api, "REC-1", "approve")
    forged = make_link_token(b"an-attacker-guessed-this-secret!!", "REC-1", "ADV-1", "approve",
                             api.clock.now + timedelta(hours=1))
    page_text(browse(api, forged), 401, "This link cannot be used", "This link is not valid.")
    page_text(submit(api, forged), 401, "This link is not valid.")
    page_text(browse(api, "garbage!"), 401, "This link is not valid.")
    page_text(browse(api, "a" * 1025), 422, "The request is not valid")
    assert_error(api.get(None, f"/links/{forged}"), 401, "not valid")  # JSON for API clients, as before
    api.clock.advance(hours=72)
    page_text(browse(api, token), 401, "This link has expired; use the links of a newer email about this recommendation, or the approval API.")
    page_text(submit(api, token), 401, "expired")
    assert_error(api.post(None, f"/links/{token}"), 401, "expired")
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0


def test_wrong_advisor_pages(api):
    page_text(browse(api, link(api, "REC-1", "approve", advisor_id="ADV-2")), 403, "not yours to use",
              "You may act only on recommendations for your own clients.")
    token = link(api, "REC-3", "approve", advisor_id="ADV-3")
    page_text(browse(api, token), 200)
    leave_team(api)
    page_text(submit(api, token), 403, "You may act only on recommendations for your own clients.")
    assert_error(api.post(None, f"/links/{token}"), 403)
    assert api.status_of("REC-3") == "pending"


def test_other_errors_on_link_urls_are_pages_for_a_browser(api):
    token = link(api, "REC-1", "approve")
    with api.client() as c:
        page_text(c.put(f"/links/{token}", headers=BROWSER), 405, "Method not allowed.")
        assert_error(c.put(f"/links/{token}"), 405)
        # An unreadable form (not UTF-8): 400, nothing recorded.
        bad = c.post(f"/links/{token}", content=b"reason=%ff%fe", headers={**BROWSER, "Content-Type": FORM})
        page_text(bad, 400, "The form could not be read")
        # A JSON body still goes to the JSON route, whatever the Accept header.
        assert c.post(f"/links/{token}", json={"reason": 5}).status_code == 422
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0


def test_the_token_stays_out_of_the_logs(api, caplog):
    caplog.set_level(logging.DEBUG)
    token = link(api, "REC-5", "defer")
    browse(api, token)
    submit(api, token, reason="")
    submit(api, token, reason="client on holiday")
    submit(api, token, reason="again")
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "POST /links/{token} 201" in text and "GET /links/{token} 200" in text
    assert "decision recorded recommendation=REC-5 action=defer actor=ADV-1 via=link" in text
    assert token not in text and token.split(".")[1] not in text and "client on holiday" not in text


# ---------------------------------------------------------------------------------------------
# Rendering on its own: a household with several accounts
# ---------------------------------------------------------------------------------------------


def test_a_household_page_masks_every_account():
    base = package("REC-9", "ACC-0042")
    pkg = base.model_copy(update={
        "scope": "household", "scope_id": "HH-0007", "household_id": "HH-0007", "account_ids": ["ACC-0042", "ACC-0043"],
        "trades": [*base.trades, factories.trade("ACC-0043", "BND", "fixed_income", "buy", 10, 50, reason="location")],
        "unresolved": "<b>cash</b> short by $12",
    })
    summary = RecommendationSummary(
        recommendation_id="REC-9", advisor_id="ADV-1", as_of=pkg.as_of, scope="household", scope_id="HH-0007",
        kind="rebalance", urgency="high", delivery="within_24h", status="pending", trade_value=2500.0,
        clock_started_at=PUBLISHED_AT)
    claims = LinkClaims(recommendation_id="REC-9", advisor_id="ADV-1", action="approve",
                               expires_at=PUBLISHED_AT + timedelta(hours=72), link_id="L" * 20)
    page = portal.link_page(claims=claims, summary=summary, package=pkg, would="approve the proposed trades",
                            advisor_name="Dana <Advisor>", now=PUBLISHED_AT)
    body = page.body.decode()
    text = visible_text(body)
    assert "Household (2 accounts: ••••0042, ••••0043)" in text and "<th scope=\"col\">Account</th>" in body
    assert "ACC-0042" not in text and "ACC-0043" not in text
    assert "Asset location" in text and "For Dana <Advisor>" in text and "<b>cash</b>" not in body
    assert "Not every class gets back inside its band:" in text and "3 proposed trades" in text
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP


# ---------------------------------------------------------------------------------------------
# In a real browser: Debian's chromium, headless, driven by Playwright
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def page(chromium):
    """A fresh browser tab (its own context: no cookies or cache shared between tests)."""
    OUTPUT.mkdir(exist_ok=True)
    context = chromium.new_context(viewport={"width": 1100, "height": 900}, locale="en-US")
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        context.close()


class Watch:
    """What a page did: every request it made, and console errors (a CSP violation is one)."""

    def __init__(self, page):
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append((r.method, r.url)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def posts(self) -> int:
        return sum(1 for method, _ in self.requests if method == "POST")


def _alert_email_html(api, recommendation_id: str) -> str:
    """The advisor's alert email for the recommendation, its links pointing at this server."""
    from rebal_pipeline.comms import emails
    from rebal_pipeline.comms.smtp import make_message_id

    with api.store.begin() as conn:
        stored = conn.execute(select(recommendations.c.package).where(
            recommendations.c.recommendation_id == recommendation_id)).scalar_one()
    pkg = RecommendationPackage.model_validate_json(stored)
    links = {a: f"{api.url}/links/{t}" for a, t in api.app.state.issue_links(recommendation_id, "ADV-1").items()}
    message = emails.advisor_alert(pkg, client_name="Jordan Client", links=links, sender="rebal@example-ria.com",
                                   to="dana@example-ria.com",
                                   message_id=make_message_id("portal-test", "example-ria.com"),
                                   chart_png=b"\x89PNG\r\n\x1a\n")  # the chart is not what is tested
    return message.get_body(("html",)).get_content()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_in_the_browser_approve_from_the_email(api, page):
    from playwright.sync_api import expect

    # The email, as the advisor's mail client shows it; they click Approve.
    page.set_content(_alert_email_html(api, "REC-1"))
    watch = Watch(page)
    with page.expect_navigation():
        page.get_by_role("link", name="Approve", exact=True).first.click()
    approve_url = page.url
    assert approve_url.startswith(f"{api.url}/links/")
    expect(page.get_by_role("heading", name="Approve these trades?")).to_be_visible()
    trades = page.locator("#trades + table tbody tr")
    expect(trades).to_have_count(2)
    expect(trades.nth(0)).to_contain_text("Sell")
    expect(trades.nth(0)).to_contain_text("VTI")
    expect(trades.nth(1)).to_contain_text("Buy")
    expect(trades.nth(1)).to_contain_text("BND")
    expect(page.get_by_text("Account ••••CC-1")).to_be_visible()
    expect(page.locator("#drift + table")).to_contain_text("Outside band")
    expect(page.locator("#tax + table")).to_contain_text("$20.00")
    button = page.get_by_role("button", name="Approve these trades")
    expect(button).to_be_visible()
    # The inline styles apply under the page's CSP (green button), and nothing was refused.
    assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(26, 127, 55)"
    page.screenshot(path=str(OUTPUT / "approve_page.png"), full_page=True)
    assert api.status_of("REC-1") == "pending"  # opening it changed nothing

    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        button.click()
    assert posted.value.status == 201
    expect(page.get_by_role("status")).to_have_text(APPROVED + ".")
    expect(page.get_by_role("heading", name="Approved")).to_be_visible()
    page.screenshot(path=str(OUTPUT / "approve_confirmation.png"), full_page=True)
    assert api.status_of("REC-1") == "approved"
    [row] = decision_rows(api, "REC-1")
    assert (row["action"], row["actor_id"], row["via"]) == ("approve", "ADV-1", "link")

    # Opened again (or reloaded): already used.
    again = page.goto(approve_url)
    assert again.status == 410
    expect(page.get_by_role("heading", name="This link has already been used")).to_be_visible()
    expect(page.get_by_role("alert")).to_have_text("This link has already been used.")
    page.screenshot(path=str(OUTPUT / "approve_link_already_used.png"), full_page=True)
    assert len(decision_rows(api, "REC-1")) == 1

    assert all(url.startswith(api.url) for _, url in watch.requests if url.startswith("http")), watch.requests
    assert watch.posts() == 1
    assert not [e for e in watch.errors if "Content Security Policy" in e or "Refused" in e], watch.errors


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_in_the_browser_defer_needs_a_reason(api, page):
    from playwright.sync_api import expect

    watch = Watch(page)
    opened = page.goto(f"{api.url}/links/{link(api, 'REC-5', 'defer')}")
    assert opened.status == 200
    expect(page.get_by_role("heading", name="Defer this recommendation")).to_be_visible()
    reason = page.get_by_label("Reason")
    defer = page.get_by_role("button", name="Defer")

    # Empty: the browser itself refuses (required), nothing is sent.
    defer.click()
    assert reason.evaluate("t => t.validity.valueMissing") is True
    assert watch.posts() == 0

    # Blank (spaces pass `required`): the server refuses, the form comes back with the error.
    reason.fill("   ")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        defer.click()
    assert posted.value.status == 422
    expect(page.get_by_role("alert")).to_have_text("Defer needs a reason.")
    expect(page.get_by_label("Reason")).to_have_attribute("aria-invalid", "true")
    page.get_by_role("alert").scroll_into_view_if_needed()
    page.screenshot(path=str(OUTPUT / "defer_error.png"), full_page=True)
    assert api.status_of("REC-5") == "pending" and used_count(api) == 0

    page.get_by_label("Reason").fill("Client travelling; revisit after the holiday")
    page.get_by_label("Defer until").fill("2026-11-25")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Defer").click()
    assert posted.value.status == 201
    expect(page.get_by_role("heading", name="Deferred until 25 Nov 2026 00:00 EST")).to_be_visible()
    expect(page.get_by_text("Client travelling; revisit after the holiday")).to_be_visible()
    page.screenshot(path=str(OUTPUT / "defer_confirmation.png"), full_page=True)
    assert api.status_of("REC-5") == "deferred"
    [row] = decision_rows(api, "REC-5")
    assert (row["action"], row["via"], row["reason"]) == ("defer", "link",
                                                          "Client travelling; revisit after the holiday")
    assert not [e for e in watch.errors if "Content Security Policy" in e or "Refused" in e], watch.errors


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_in_the_browser_modify_from_the_review_link(api, page):
    from playwright.sync_api import expect

    # The email's "Review or modify" button opens the review link.
    page.set_content(_alert_email_html(api, "REC-1"))
    watch = Watch(page)
    with page.expect_navigation():
        page.get_by_role("link", name="Review or modify").first.click()
    review_url = page.url
    assert review_url.startswith(f"{api.url}/links/")
    expect(page.get_by_role("heading", name="Review the recommendation")).to_be_visible()
    expect(page.get_by_role("heading", name="Change quantities")).to_be_visible()
    sell = page.get_by_label("New quantity: Sell VTI")
    buy = page.get_by_label("New quantity: Buy BND")
    expect(sell).to_have_value("10")
    expect(buy).to_have_value("20")
    record = page.get_by_role("button", name="Record these quantities")

    # A negative quantity: the browser refuses it itself (min 0), nothing is sent.
    sell.fill("-3")
    record.click()
    assert sell.evaluate("i => i.validity.rangeUnderflow") is True
    assert watch.posts() == 0

    # An oversell: the server refuses it, the page comes back with the error and the typed values.
    sell.fill("100")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        record.click()
    assert posted.value.status == 422
    expect(page.get_by_role("alert")).to_contain_text("only 70 held (no overselling)")
    expect(page.get_by_label("New quantity: Sell VTI")).to_have_value("100")
    assert api.status_of("REC-1") == "pending" and used_count(api) == 0

    # Opened afresh from the email; one quantity changed: buy 16 BND instead of 20.
    assert page.goto(review_url).status == 200
    expect(page.get_by_label("New quantity: Sell VTI")).to_have_value("10")
    page.get_by_label("New quantity: Buy BND").fill("16")
    page.get_by_label("Reason").fill("Keep $200 in cash for the client's withdrawal")
    page.locator("#decision").scroll_into_view_if_needed()
    page.screenshot(path=str(OUTPUT / "review_modify_page.png"), full_page=True)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Record these quantities").click()
    assert posted.value.status == 201
    expect(page.get_by_role("heading", name="Modified", exact=True)).to_be_visible()
    expect(page.get_by_role("status")).to_have_text(MODIFIED + ".")
    recorded = page.locator("#modified-trades + table tbody tr")
    expect(recorded).to_have_count(2)
    expect(recorded.nth(1)).to_contain_text("BND")
    expect(recorded.nth(1)).to_contain_text("16")
    expect(recorded.nth(1)).to_contain_text("Changed")
    expect(page.locator("#band-report + table")).to_contain_text("Inside band")
    page.screenshot(path=str(OUTPUT / "modify_confirmation.png"), full_page=True)
    assert api.status_of("REC-1") == "modified"
    [row] = decision_rows(api, "REC-1")
    assert (row["action"], row["actor_id"], row["via"]) == ("modify", "ADV-1", "link")
    assert sorted((t["symbol"], t["quantity"]) for t in json.loads(row["payload"])["trades"]) == [
        ("BND", 16), ("VTI", 10)]

    # The review link opens again (read-only now).
    again = page.goto(review_url)
    assert again.status == 200
    expect(page.get_by_text("This link has already recorded a modification")).to_be_visible()
    expect(page.get_by_role("button")).to_have_count(0)

    assert all(url.startswith(api.url) for _, url in watch.requests if url.startswith("http")), watch.requests
    assert watch.posts() == 2
    assert not [e for e in watch.errors if "Content Security Policy" in e or "Refused" in e], watch.errors
