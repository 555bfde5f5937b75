"""Issue 14, item 7: a saving is labelled a saving everywhere — emails, portal, API package, drill —
never printed as a negative tax ("$-121", "-$121"); this year's figure applies the IRC §1211(b)
limit and shows the §1212(b) carry-forward."""

from __future__ import annotations

import json
from datetime import date

import polars as pl
from sqlalchemy import select

from rebal_pipeline.approval_api import portal
from rebal_pipeline.comms import emails
from rebal_pipeline.comms.emails import DigestItem
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline.drill import summarize_day
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import recommendations
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.comms.fixtures import CLIENT_NAME, LINKS, PUBLISHED_AT, make_package
from rebal_pipeline_tests.comms.reading import parse, read_html
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder

SENDER = "rebal <alerts@example-ria.com>"
# A harvest-like rebalance: $3,600 of sells realising a $605 short-term loss → 605 × 20% = $121
# saved (under the $3,000 limit, so all of it this year).
SAVING = {"trade_value": 7191.0, "sell_value": 3600.0, "st_gain": 0.0, "lt_gain": 0.0, "realized_loss": 605.0,
          "wash_sale_disallowed": 0.0, "est_tax": -121.0, "est_tax_this_year": -121.0, "loss_carryforward": 0.0,
          "net_tax_pct": -0.016827, "tax_effect_words": "estimated tax saving $121.00"}


def _bodies(message):
    mail = parse(message.as_bytes())
    return mail.get_body(("plain",)).get_content(), read_html(mail.get_body(("html",)).get_content()).text


def _no_negative_money(text: str) -> None:
    assert "$-" not in text and "-$" not in text, text


def test_the_advisor_alert_calls_a_negative_tax_a_saving():
    message = emails.advisor_alert(make_package(tax=SAVING), client_name=CLIENT_NAME, links=LINKS, sender=SENDER,
                                   to="dana@example-ria.com", message_id=make_message_id("a", "example-ria.com"))
    for body in _bodies(message):
        assert "Estimated tax saving this year" in body and "$121.00" in body
        assert "Net tax saving, % of trade value" in body and "1.68%" in body
        assert "$3,000 of ordinary income" in body and "§1211(b)" in body
        _no_negative_money(body)


def test_a_loss_beyond_the_limit_shows_the_carry_forward_and_the_household():
    # $10,000 net short-term loss: 3,000 × 37% = $1,110 saved this year, $7,000 carried forward
    # (IRC §1211(b), §1212(b)); the household (two such sales today) carries $17,000.
    tax = {**SAVING, "realized_loss": 10000.0, "est_tax": -3700.0, "est_tax_this_year": -1110.0,
           "loss_carryforward": 7000.0, "household_est_tax_this_year": -1110.0,
           "household_loss_carryforward": 17000.0, "net_tax_pct": -0.154359}
    message = emails.advisor_alert(make_package(tax=tax), client_name=CLIENT_NAME, links=LINKS, sender=SENDER,
                                   to="dana@example-ria.com", message_id=make_message_id("b", "example-ria.com"))
    for body in _bodies(message):
        assert "$1,110.00" in body and "Estimated tax saving this year" in body
        assert "$7,000.00 of net capital loss carried forward to later years (IRC §1212(b)" in body
        assert ("Household: estimated tax saving $1,110.00 this year for the household (all of today's "
                "recommendations); $17,000.00 of net capital loss carried forward") in " ".join(body.split())
        _no_negative_money(body)


def test_the_reminder_and_the_digest_say_saving():
    package = make_package(tax=SAVING)
    reminder = emails.reminder(package, client_name=CLIENT_NAME, links=LINKS, alerted_at=PUBLISHED_AT,
                               sender=SENDER, to="dana@example-ria.com", message_id=make_message_id("r", "x.com"))
    for body in _bodies(reminder):
        assert "estimated tax saving $121.00 (1.68% of trade value)" in body
        _no_negative_money(body)
    digest = emails.weekly_digest([DigestItem(package, CLIENT_NAME, "https://rebal.example-ria.com/l/review?t=1")],
                                  advisor_name="Dana Advisor", week_ending=date(2026, 11, 20), sender=SENDER,
                                  to="dana@example-ria.com", message_id=make_message_id("d", "x.com"))
    text, page = _bodies(digest)
    assert "estimated tax saving $121.00" in text and "saving $121.00" in page
    _no_negative_money(text)
    _no_negative_money(page)


def test_the_portal_calls_a_negative_tax_a_saving():
    tax_macro = portal._ENV.get_template("_package.html.j2").module.tax
    html = str(tax_macro({"tax": emails._tax_view(make_package(tax=SAVING))}))
    text = " ".join(read_html(html).text.split())
    assert "Estimated tax saving this year | $121.00" in text
    _no_negative_money(text)


def test_the_day_run_words_a_saving_in_the_package_the_api_serves_and_in_the_drill(workspace, dagster_instance):
    # One taxable account, 60/40 model: 800 VTI at $100 (bought at $120, long-term) and 400 BND
    # at $50: equity 80%. The sizer sells 200 VTI ($20,000) at a $4,000 long-term loss and buys
    # 400 BND. §1222: a $4,000 net loss; §1211(b): $3,000 × (32% + 5%) = $1,110 saved this year,
    # $1,000 carried forward (§1212(b)); est_tax keeps the old figure, 4,000 × 20% = $800.
    b = FeedBuilder()
    b.household("HH-1")
    b.account("ACC-LOSS", "HH-1")
    b.position("ACC-LOSS", "VTI", 800, cost_basis=800 * 120); b.position("ACC-LOSS", "BND", 400)
    b.position("ACC-LOSS", "CASH", "0")
    b.write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    summary = workspace.table("recommendation_summary").filter(pl.col("kind") == "rebalance").row(0, named=True)
    assert (summary["realized_loss"], summary["est_tax"], summary["est_tax_this_year"], summary["loss_carryforward"],
            summary["tax_effect_words"]) == (4000.0, -800.0, -1110.0, 1000.0, "estimated tax saving $1,110.00")

    # The package the approval API serves (GET /recommendations/{id}) carries the same words.
    store = WorkflowStore(workspace.workflow_url)
    with store.begin() as conn:
        row = conn.execute(select(recommendations.c.package).where(
            recommendations.c.recommendation_id == summary["recommendation_id"])).scalar_one()
    store.dispose()
    tax = RecommendationPackage.model_validate(json.loads(row)).tax
    assert (tax["est_tax_this_year"], tax["loss_carryforward"], tax["tax_effect_words"]) == (
        -1110.0, 1000.0, "estimated tax saving $1,110.00")

    text = summarize_day(workspace.warehouse_path, AS_OF).text
    # $40,000 traded (20,000 of sells + 20,000 of buys): 1,110 / 40,000 = 2.775%, shown to two
    # places as 2.77% (2.775 is a hair below in binary floating point).
    assert ("estimated tax saving $1,110 this year (2.77% of $40,000 traded); $1,000 of net capital losses "
            "carried forward (IRC §1211(b) limit)") in text
    _no_negative_money(text)
