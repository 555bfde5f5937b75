"""Fixtures of the review portal's tests: a real uvicorn server (running_server) over the real
workflow store (SQLite, and Postgres under CI=true: the approvals' `store` fixture), a real SMTP
server (aiosmtpd) receiving the sign-in emails, and a book that exercises the queue's order.

The book (ADV-1's, unless said):
    Q-HIGH-A   high    |drift|/band 3.0   HH-A  premium   rebalance   ACC-11
    Q-HIGH-B   high    1.5                HH-B  standard  harvest     ACC-12
    Q-MED-OLD  medium  2.0                HH-A  standard  rebalance   ACC-13  (alerted 30 h before the others)
    Q-MED-NEW  medium  2.0                HH-C  standard  rebalance   ACC-14
    Q-LOW      low     4.0                HH-C  standard  rebalance   ACC-15
    Q-OTHER    medium  2.0                HH-Z  standard  rebalance   ACC-21  ADV-2's (ADV-3 on ADV-2's team)
"""

from __future__ import annotations

import email
import email.policy
import html
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from rebal_pipeline.approval_api import create_app
from rebal_pipeline.approval_api.signin import PortalSettings
from rebal_pipeline.approval_api.testing import running_server
from rebal_pipeline.comms.smtp import SmtpSettings
from rebal_pipeline.workflow.lifecycle import LifecyclePolicy
from rebal_pipeline.workflow.package import PackageBand
from rebal_pipeline.workflow.schema import recommendations
from rebal_pipeline_tests.approvals.conftest import AS_OF, PUBLISHED_AT, publish, store  # noqa: F401 (fixture)
from rebal_pipeline_tests.approvals.test_api import SECRET, Clock
from rebal_pipeline_tests.browser import chromium  # noqa: F401 (fixture: Debian's chromium)
from rebal_pipeline_tests.comms.peers import smtp_server
from rebal_pipeline_tests.factories import DESK, USERS, holding, make_package, trade, user

TEAM_MEMBER = user("ADV-3", name="Pat Associate", email="pat@example-ria.com")
PEOPLE = [*USERS, {**TEAM_MEMBER, "team_of": "ADV-2"}, DESK]
SENDER = "rebal <rebal@example-ria.com>"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
ORDER = ["Q-HIGH-A", "Q-HIGH-B", "Q-MED-OLD", "Q-MED-NEW", "Q-LOW"]


def book_package(rid: str, account: str, *, urgency: str, drift: float, band: float = 0.05, household: str,
                 tier: str = "standard", kind: str = "rebalance", advisor: str = "ADV-1", est_tax: float = 20.0):
    """A $10,000 account: sell 10 VTI, buy 20 BND; equity drifted `drift` against a ±`band` band."""
    holdings = [holding(account, "VTI", "equity", 70, 100), holding(account, "BND", "fixed_income", 60, 50),
                holding(account, "CASH", "cash", 0, 1)]
    trades = [trade(account, "VTI", "equity", "sell", 10, 100), trade(account, "BND", "fixed_income", "buy", 20, 50)]
    return make_package(
        recommendation_id=rid, as_of=AS_OF, scope_id=account, advisor_id=advisor, account_ids=[account],
        household_id=household, tier=tier, urgency=urgency, delivery="within_48h", kind=kind, trades=trades,
        holdings=holdings,
        bands=[PackageBand(asset_class="equity", target_weight=0.6, band=band, current_weight=0.6 + drift, drift=drift),
               PackageBand(asset_class="fixed_income", target_weight=0.4, band=band, current_weight=0.4 - drift,
                           drift=-drift)],
        tax={"st_gain": 0.0, "lt_gain": 100.0, "est_tax": est_tax}, inside_bands=True)


BOOK = [
    book_package("Q-HIGH-A", "ACC-11", urgency="high", drift=0.15, household="HH-A", tier="premium"),
    book_package("Q-HIGH-B", "ACC-12", urgency="high", drift=0.075, household="HH-B", kind="harvest", est_tax=-310.5),
    book_package("Q-MED-OLD", "ACC-13", urgency="medium", drift=0.10, household="HH-A"),
    book_package("Q-MED-NEW", "ACC-14", urgency="medium", drift=0.10, household="HH-C"),
    book_package("Q-LOW", "ACC-15", urgency="low", drift=0.20, household="HH-C"),
    book_package("Q-OTHER", "ACC-21", urgency="medium", drift=0.10, household="HH-Z", advisor="ADV-2"),
]


@dataclass
class Portal:
    store: object
    app: object
    url: str
    clock: Clock
    mail: object  # the SMTP peer

    def client(self) -> httpx.Client:
        """A browser-like client: its own cookie jar, no redirects followed."""
        return httpx.Client(base_url=self.url, headers=BROWSER, timeout=30, follow_redirects=False)

    def status_of(self, rid: str) -> str:
        with self.store.begin() as conn:
            return conn.execute(select(recommendations.c.status).where(
                recommendations.c.recommendation_id == rid)).scalar_one()

    def emails_to(self, address: str) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(m.data, policy=email.policy.default) for m in self.mail.messages
                if address in m.rcpt_tos]

    def ask_link(self, client: httpx.Client, address: str) -> httpx.Response:
        form = client.get("/portal/sign-in")
        assert form.status_code == 200, form.text
        return client.post("/portal/sign-in", data={"email": address, "csrf": hidden(form.text, "csrf")})

    def wait_for_mail(self, address: str, count: int, timeout: float = 10.0) -> list:
        """The emails to `address` once there are `count` of them (the portal sends them after
        answering the request)."""
        deadline = time.monotonic() + timeout
        while len(found := self.emails_to(address)) < count:
            assert time.monotonic() < deadline, f"{count} emails to {address} expected, {len(found)} arrived"
            time.sleep(0.02)
        return found

    def latest_token(self, address: str) -> str:
        [*_, message] = self.wait_for_mail(address, 1)
        text = message.get_body(("plain",)).get_content()
        return re.search(r"/portal/sign-in/([A-Za-z0-9_\-]+)", text)[1]

    def sign_in(self, address: str, client: httpx.Client | None = None) -> httpx.Client:
        """The whole sign-in as a person does it: ask, open the emailed link, press Sign in."""
        client = client or self.client()
        before = len(self.emails_to(address))
        asked = self.ask_link(client, address)
        assert asked.status_code == 200, asked.text
        self.wait_for_mail(address, before + 1)
        token = self.latest_token(address)
        confirm = client.get(f"/portal/sign-in/{token}")
        assert confirm.status_code == 200, confirm.text
        done = client.post(f"/portal/sign-in/{token}", data={"csrf": hidden(confirm.text, "csrf")})
        assert done.status_code == 303 and done.headers["location"] == "/portal/queue", done.text
        return client


def hidden(page: str, name: str) -> str:
    found = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', page)
    assert found, page[:2000]
    return html.unescape(found[1])


def visible_text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def page_text(response: httpx.Response, status: int, *words: str) -> str:
    """The page's text after checking status, type, the CSP and that nothing external is referenced."""
    assert response.status_code == status, response.text[:3000]
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", response.text, re.I)
    assert "http://" not in response.text and "https://" not in response.text
    text = visible_text(response.text)
    for w in words:  # a message starts a sentence on the page (first letter up)
        assert w in text or w[:1].upper() + w[1:] in text, (w, text[:3000])
    return text


def queue_ids(response: httpx.Response) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)"', response.text)


@pytest.fixture
def portal(store):  # noqa: F811 (the approvals' store fixture)
    publish(store, *BOOK, users=PEOPLE)
    with store.begin() as conn:
        # Q-MED-OLD was alerted 30 hours before the rest (its clock runs since then).
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == "Q-MED-OLD")
                     .values(clock_started_at=PUBLISHED_AT - timedelta(hours=30)))
    clock = Clock(PUBLISHED_AT + timedelta(hours=1))
    with smtp_server() as mail:
        settings = PortalSettings(smtp=SmtpSettings(host=mail.host, port=mail.port, starttls=False, sender=SENDER,
                                                    timeout=10))
        app = create_app(store, SECRET, clock=clock, portal_settings=settings, policy=LifecyclePolicy())
        with running_server(app) as url:
            settings.public_url = url
            yield Portal(store=store, app=app, url=url, clock=clock, mail=mail)


# ---- In the browser: one page per test, script off (the portal works without it) ----

SCREENSHOTS = Path(__file__).parent / "screenshots"  # kept with the tests, checked by eye


@pytest.fixture
def page(chromium):
    SCREENSHOTS.mkdir(exist_ok=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, locale="en-US", java_script_enabled=False)
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    errors: list[str] = []
    # Console errors but the browser's note of a 4xx page it was sent (the 401 before signing in or after signing out).
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error"
           and not m.text.startswith("Failed to load resource") else None)
    tab.errors = errors
    try:
        yield tab
    finally:
        context.close()
