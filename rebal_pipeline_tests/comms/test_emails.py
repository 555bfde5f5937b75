"""What each email says, read as the recipient's mail client reads it (MIME parts, HTML text and
links): reminder, escalation, weekly digest, client confirmation (simple and detailed), the
formatting of numbers, masking, escaping of text from the data, and link validation."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from rebal_pipeline.comms import emails
from rebal_pipeline.comms.emails import (
    DigestItem, ExecutedTrade, SIMPLE_CONFIRMATION, band_percent, mask_account, money, percent, quantity,
    signed_percent,
)
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.comms.fixtures import (
    ACCOUNT_ID, ACCOUNT_NUMBER, CLIENT_NAME, LINKS, PUBLISHED_AT, make_package,
)
from rebal_pipeline_tests.comms.reading import parse, read_html

DOMAIN = "example-ria.com"
SENDER = f"rebal <alerts@{DOMAIN}>"


def read(message):
    """The message as received: bytes on the wire, parsed back."""
    mail = parse(message.as_bytes())
    text = mail.get_body(("plain",)).get_content()
    page = read_html(mail.get_body(("html",)).get_content())
    return mail, text, page


def test_numbers_are_formatted_one_way():
    assert [money(v) for v in (1234.5, -1234.5, 0.004, -0.004, None)] == \
        ["$1,234.50", "-$1,234.50", "$0.00", "$0.00", "—"]
    assert [percent(v) for v in (0.1234, 0.025729, -0.00001, 1)] == ["12.34%", "2.57%", "0.00%", "100.00%"]
    assert [signed_percent(v) for v in (0.074, -0.031, 0.0)] == ["+7.40%", "-3.10%", "0.00%"]
    assert band_percent(0.05) == "±5.00%"
    assert [quantity(v) for v in (120, 412.3456, 1200.0, 0.5)] == ["120", "412.3456", "1,200", "0.5"]
    assert [mask_account(n) for n in ("87654321", "ACC-0042", "123")] == ["••••4321", "••••0042", "••••"]


def test_the_rendering_is_deterministic():
    def render():
        return emails.advisor_alert(make_package(), client_name=CLIENT_NAME, links=LINKS, sender=SENDER,
                                    to="dana@example-ria.com", message_id=make_message_id("k", DOMAIN)).as_bytes()
    assert render() == render()


def test_text_from_the_data_is_escaped_in_the_html():
    package = make_package(unresolved='<script>alert("x")</script> cash short')
    message = emails.advisor_alert(package, client_name="<b>Eve</b>", links=LINKS, sender=SENDER,
                                   to="dana@example-ria.com", message_id=make_message_id("k", DOMAIN))
    html = message.get_body(("html",)).get_content()
    assert "<script>" not in html and "<b>Eve</b>" not in html
    assert "&lt;script&gt;" in html and "&lt;b&gt;Eve&lt;/b&gt;" in html
    assert "<b>Eve</b>" in message.get_body(("plain",)).get_content()  # plain text is not HTML


def test_links_must_be_the_four_https_links():
    send = dict(client_name=CLIENT_NAME, sender=SENDER, to="dana@example-ria.com",
                message_id=make_message_id("k", DOMAIN))
    with pytest.raises(ValueError, match="missing"):
        emails.advisor_alert(make_package(), links={k: v for k, v in LINKS.items() if k != "defer"}, **send)
    with pytest.raises(ValueError, match="not an https"):
        emails.advisor_alert(make_package(), links={**LINKS, "approve": "javascript:alert(1)"}, **send)
    with pytest.raises(ValueError, match="not an https"):
        emails.advisor_alert(make_package(), links={**LINKS, "approve": "http://rebal.example-ria.com/l/a"}, **send)
    local = {k: f"http://127.0.0.1:8000/l/{k}" for k in LINKS}  # a local drill's API
    emails.advisor_alert(make_package(), links=local, **send)
    with pytest.raises(ValueError, match="unknown"):
        emails.advisor_alert(make_package(), links={**LINKS, "delete": "https://x.example/d"}, **send)


def test_a_household_alert_masks_every_account_and_says_which_account_trades():
    package = make_package(
        scope="household", scope_id="HH-0007", account_ids=["ACC-0042", "ACC-0043"],
        trades=[*make_package().trades, factories.trade("ACC-0043", "BND", "fixed_income", "buy", 10, 72.8,
                                                         reason="location")],
    )
    message = emails.advisor_alert(package, client_name=CLIENT_NAME, links=LINKS, sender=SENDER,
                                   to="dana@example-ria.com", message_id=make_message_id("k", DOMAIN),
                                   account_numbers={"ACC-0042": "87654321", "ACC-0043": "11112222"})
    _, text, page = read(message)
    assert "Household (2 accounts: ••••4321, ••••2222)" in page.text
    assert "••••2222 | Buy | 10 | BND | $728.00 | Asset location |" in page.text.splitlines()
    assert "11112222" not in text and "11112222" not in page.text


def test_a_harvest_without_drift_has_no_chart():
    package = make_package(kind="harvest", bands=[], tax={})
    message = emails.advisor_alert(package, client_name=CLIENT_NAME, links=LINKS, sender=SENDER,
                                   to="dana@example-ria.com", message_id=make_message_id("k", DOMAIN))
    mail, text, page = read(message)
    assert mail["Subject"].startswith("Tax-loss harvest available")
    assert not [p for p in mail.walk() if p.get_content_type() == "image/png"] and page.images == []
    assert "No tax estimate is available" in text


def test_the_reminder_threads_under_the_alert_and_says_when_it_escalates():
    alert_id = make_message_id("alert:REC-1:ADV-1", DOMAIN)
    message = emails.reminder(
        make_package(), client_name=CLIENT_NAME, links=LINKS, alerted_at=PUBLISHED_AT,
        escalates_at=datetime(2026, 11, 22, 21, 30, tzinfo=timezone.utc), sender=SENDER, to="dana@example-ria.com",
        message_id=make_message_id("reminder:REC-1", DOMAIN), account_numbers={ACCOUNT_ID: ACCOUNT_NUMBER},
        in_reply_to=alert_id,
    )
    mail, text, page = read(message)
    assert mail["In-Reply-To"] == alert_id and mail["References"] == alert_id
    assert mail["Subject"].startswith("Reminder")
    for body in (text, page.text):
        assert "Alerted 20 Nov 2026 21:30 UTC" in body
        assert "22 Nov 2026 21:30 UTC" in body
        assert "4 trades, $67,371.76 traded, estimated tax $1,733.42 (2.57% of trade value)" in body
    assert sorted(page.links) == sorted(LINKS.values())


def test_the_escalation_tells_compliance_who_since_when_and_the_package():
    message = emails.escalation(
        make_package(), client_name=CLIENT_NAME, advisor_name="Dana Advisor", advisor_id="ADV-1",
        pending_since=PUBLISHED_AT, escalated_at=datetime(2026, 11, 22, 21, 30, tzinfo=timezone.utc),
        links={"review": LINKS["review"]}, sender=SENDER, to="cco@example-ria.com",
        message_id=make_message_id("escalation:REC-1", DOMAIN), account_numbers={ACCOUNT_ID: ACCOUNT_NUMBER},
        compliance_name="Chris Compliance",
    )
    mail, text, page = read(message)
    assert "48h" in mail["Subject"] and "Dana Advisor (ADV-1)" in mail["Subject"]
    for body in (text, page.text):
        assert "No decision for 48 hours" in body
        assert "Dana Advisor (ADV-1)" in body and "20 Nov 2026 21:30 UTC" in body
        assert "••••4321" in body and "+11.54%" in body and "$1,733.42" in body and "VTI" in body
    assert page.links == [LINKS["review"]]


def test_the_weekly_digest_lists_each_recommendation_with_its_review_link():
    items = [
        DigestItem(make_package(), CLIENT_NAME, "https://rebal.example-ria.com/l/review?t=one",
                   {ACCOUNT_ID: ACCOUNT_NUMBER}),
        DigestItem(make_package(recommendation_id="REC-2", scope_id="ACC-0099", account_ids=["ACC-0099"]),
                   "Morgan Client", "https://rebal.example-ria.com/l/review?t=two"),
    ]
    message = emails.weekly_digest(items, advisor_name="Dana Advisor", week_ending=date(2026, 11, 20),
                                   sender=SENDER, to="dana@example-ria.com",
                                   message_id=make_message_id("digest:ADV-1:2026-W47", DOMAIN))
    mail, text, page = read(message)
    assert mail["Subject"] == "Weekly rebalancing digest — 2 recommendations, week ending 20 Nov 2026"
    assert page.links == ["https://rebal.example-ria.com/l/review?t=one", "https://rebal.example-ria.com/l/review?t=two"]
    rows = page.text.splitlines()  # the client's name, then its account on a line of its own
    first = rows.index(CLIENT_NAME)
    assert rows[first + 1] == "••••4321 | Equity +11.54% vs. ±5.00% band | 4 | $67,371.76 | $1,733.42 | Review |"
    second = rows.index("Morgan Client")
    assert rows[second + 1] == "••••0099 | Equity +11.54% vs. ±5.00% band | 4 | $67,371.76 | $1,733.42 | Review |"
    assert "Review: https://rebal.example-ria.com/l/review?t=two" in text


def test_the_simple_client_confirmation_says_only_that_the_portfolio_was_rebalanced():
    message = emails.client_confirmation(
        client_name=CLIENT_NAME, account_number=ACCOUNT_NUMBER, executed_on=date(2026, 11, 23), style="simple",
        trades=[ExecutedTrade.from_package(t) for t in make_package().trades], sender=SENDER,
        to="client@example.com", message_id=make_message_id("client:EXE-1", DOMAIN),
        firm_name="Example RIA", advisor_name="Dana Advisor",
    )
    mail, text, page = read(message)
    for body in (text, page.text):
        assert SIMPLE_CONFIRMATION in body
        assert "VTI" not in body and "$" not in body
        assert "••••4321" in body and ACCOUNT_NUMBER not in body
    assert page.links == [] and page.images == []


def test_the_detailed_client_confirmation_lists_the_trades():
    trades = [ExecutedTrade("sell", 120, "VTI", 251.31, 30157.20, "Vanguard Total Stock Market ETF"),
              ExecutedTrade("buy", 412.3456, "BND", 72.79, 30014.64, "Vanguard Total Bond Market ETF")]
    message = emails.client_confirmation(
        client_name=CLIENT_NAME, account_number=ACCOUNT_NUMBER, executed_on=date(2026, 11, 23), style="detailed",
        trades=trades, sender=SENDER, to="client@example.com", message_id=make_message_id("client:EXE-1", DOMAIN),
        firm_name="Example RIA",
    )
    _, text, page = read(message)
    rows = page.text.splitlines()
    # Each security's name under its symbol, on a line of its own.
    assert rows[rows.index("Sold | 120 | VTI") + 1] == "Vanguard Total Stock Market ETF | $251.31 | $30,157.20 |"
    assert rows[rows.index("Bought | 412.3456 | BND") + 1] == "Vanguard Total Bond Market ETF | $72.79 | $30,014.64 |"
    assert "Total sold | $30,157.20 |" in rows and "Total bought | $30,014.64 |" in rows
    assert "- Sold 120 VTI (Vanguard Total Stock Market ETF) at $251.31: $30,157.20" in text
    assert SIMPLE_CONFIRMATION in text
    with pytest.raises(ValueError):
        emails.client_confirmation(client_name="x", account_number="1", executed_on=date(2026, 11, 23),
                                   style="detailed", sender=SENDER, to="c@example.com",
                                   message_id=make_message_id("k", DOMAIN), firm_name="Example RIA")
