"""The review portal in a real browser: Debian's headless chromium driven by Playwright (no script
on the pages: it works as a browser without JavaScript would use it). Sign-in from the email,
the queue, a filter, a batch approval with a conflict, the compliance view, the operations view.
Screenshots go to rebal_pipeline_tests/portal/screenshots/ (looked at by eye when they change)."""

from __future__ import annotations


import pytest
from sqlalchemy import select

from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline.workflow.schema import users
from rebal_pipeline_tests.portal.conftest import AS_OF, ORDER, SCREENSHOTS


pytestmark = pytest.mark.parametrize("store", ["sqlite"], indirect=True)




def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(portal, page, address: str, screenshots: bool = False) -> None:
    from playwright.sync_api import expect

    page.goto(f"{portal.url}/portal/queue")
    expect(page.get_by_role("heading", name="Sign in to the review queue")).to_be_visible()
    page.get_by_label("Email address").fill(address)
    if screenshots:
        shot(page, "sign_in")
    page.get_by_role("button", name="Email me a sign-in link").click()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    if screenshots:
        shot(page, "sign_in_sent")
    page.goto(f"{portal.url}/portal/sign-in/{portal.latest_token(address)}")  # the link in the email
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    if screenshots:
        shot(page, "sign_in_confirm")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def _ids_without_script(page) -> list[str]:
    import re

    return re.findall(r'<tr data-id="([^"]+)"', page.content())


def test_in_the_browser_sign_in_queue_filter_and_batch_approve(portal, page):
    from playwright.sync_api import expect

    sign_in(portal, page, "dana@example-ria.com", screenshots=True)
    expect(page.get_by_role("heading", name="My queue")).to_be_visible()
    assert _ids_without_script(page) == ORDER
    expect(page.locator("#queue tbody tr").first).to_contain_text("+15.00%")
    expect(page.locator("#queue tbody tr").first).to_contain_text("escalates in 47 h 00 min")
    shot(page, "queue")

    # Filter: household HH-C.
    page.get_by_label("Household").select_option("HH-C")
    page.get_by_role("button", name="Apply filters").click()
    assert _ids_without_script(page) == ["Q-MED-NEW", "Q-LOW"]
    expect(page.get_by_role("heading", name="2 recommendations")).to_be_visible()
    shot(page, "queue_filtered")
    page.get_by_role("link", name="Clear filters").click()
    assert _ids_without_script(page) == ORDER

    # While the page is open, Q-MED-NEW is escalated and compliance approves it: Dana's stale
    # tick on it will be a 409 in her batch.
    with portal.store.begin() as conn:
        people = {r["user_id"]: dict(r) for r in conn.execute(select(users)).mappings()}
        lifecycle.decide(conn, "Q-MED-NEW", people["ADV-1"], "escalate", portal.clock.now, reason="unusual",
                         via="api")
        lifecycle.decide(conn, "Q-MED-NEW", people["CCO-1"], "approve", portal.clock.now, via="api")
    for rid in ("Q-HIGH-A", "Q-MED-NEW", "Q-LOW"):
        page.locator(f'tr[data-id="{rid}"] input[type=checkbox]').check()
    page.get_by_role("button", name="Approve selected").click()
    expect(page.get_by_role("heading", name="Review session: approve 3 recommendations")).to_be_visible()
    results = page.locator("#results tbody tr")
    expect(results).to_have_count(3)
    expect(page.locator('#results tr[data-id="Q-HIGH-A"]')).to_contain_text("201 recorded")
    expect(page.locator('#results tr[data-id="Q-MED-NEW"]')).to_contain_text("409 already decided")
    expect(page.locator('#results tr[data-id="Q-LOW"]')).to_contain_text("201 recorded")
    expect(page.get_by_role("status")).to_contain_text("2 recorded")
    expect(page.get_by_role("status")).to_contain_text("1 already decided")
    shot(page, "batch_result")
    assert (portal.status_of("Q-HIGH-A"), portal.status_of("Q-LOW")) == ("approved", "approved")

    # The package page of one row, then sign out.
    page.get_by_role("link", name="Back to the queue").click()
    page.locator('tr[data-id="Q-HIGH-B"] a').first.click()
    expect(page.get_by_role("button", name="Approve these trades")).to_be_visible()
    shot(page, "package")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="You are signed out")).to_be_visible()
    response = page.goto(f"{portal.url}/portal/queue")
    assert response.status == 401
    assert not page.errors  # nothing refused by the CSP


def test_in_the_browser_compliance_view(portal, page):
    from playwright.sync_api import expect

    from rebal_pipeline.workflow import authority

    with portal.store.begin() as conn:
        advisor = dict(conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one())
        lifecycle.decide(conn, "Q-LOW", advisor, "escalate", portal.clock.now, reason="the client asked for a "
                         "review of the bands", via="portal")
        authority.route_to_compliance(conn, {"recommendation_id": "Q-HIGH-B", "compliance_review":
                                             "ACC-12 holds fixed income its ERISA plan bars"}, portal.clock.now)
    portal.clock.advance(hours=3)
    sign_in(portal, page, "cco@example-ria.com")
    page.get_by_role("link", name="Compliance").click()
    expect(page.get_by_role("heading", name="Escalations and compliance reviews")).to_be_visible()
    expect(page.locator("#escalations tbody > tr")).to_have_count(2)
    page.locator("#escalations details").first.locator("summary").click()  # history opens without script
    expect(page.locator("#escalations details").first).to_contain_text("Routed to compliance at publication")
    page.locator("#escalations details").nth(1).locator("summary").click()
    expect(page.locator("#escalations details").nth(1)).to_contain_text("Decision: escalate (via portal)")
    shot(page, "compliance")
    assert not page.errors


def test_in_the_browser_operations_view(portal, page):
    from playwright.sync_api import expect

    with portal.store.begin() as conn:
        raise_operations_alert(conn, key="feed_late:schwab-main:2026-11-20", alert="feed_late",
                               summary="Custodian files for 20 Nov 2026 are late on schwab-main.",
                               details={"missing": ["positions.csv"]}, now=portal.clock.now, connection="schwab-main",
                               as_of=AS_OF)
        raise_operations_alert(conn, key="feed_data_quality:2026-11-20", alert="feed_data_quality",
                               summary="12 rows of the 20 Nov 2026 feed were rejected.",
                               details={"rejected_rows": 12, "accounts_held_out": 2}, now=portal.clock.now,
                               connection="fidelity-api", as_of=AS_OF)
    sign_in(portal, page, "ops@example-ria.com")
    page.get_by_role("link", name="Operations").click()
    expect(page.get_by_role("heading", name="Feed status per connection")).to_be_visible()
    expect(page.locator("#connections tbody tr")).to_have_count(2)
    shot(page, "operations")
    assert not page.errors
