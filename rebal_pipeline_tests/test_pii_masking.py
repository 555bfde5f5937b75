"""Account numbers outside the warehouse are masked to their last four characters (core/pii.py):
the masking function itself, and a small daily run whose Dagster event log (messages, asset
and check metadata) must not carry any account number of the book whole."""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import date

import pytest
from dagster import DagsterInstance, instance_for_test, serialize_value

from rebal_pipeline.comms import emails
from rebal_pipeline.core.pii import MASK, mask_account, mask_accounts_in, masker
from rebal_pipeline.drill import summarize_day
from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder

NEXT_SESSION = date(2026, 11, 23)  # the Monday after AS_OF (a Friday)

# Custodian-style numbers: what must never leave the warehouse whole.
DRIFTED, HELD_OUT, STUCK, SHRUNK, CALM = "87650001", "87650002", "SCH-4417-0003", "87650004", "87650005"
BOOK = (DRIFTED, HELD_OUT, STUCK, SHRUNK, CALM)


def test_mask_account_shows_the_last_four_characters_only():
    assert MASK == "\u2022" * 4
    assert mask_account("87654321") == "••••4321"
    assert mask_account(" SCH-4417-0003 ") == "••••0003"  # the custodian's padding is not a character of it
    assert mask_account("12345") == "••••2345"
    assert [mask_account(n) for n in ("1234", "123", "", None)] == ["••••"] * 4  # short: nothing of it shown
    assert mask_account(87654321) == "••••4321"
    # The emails use the same function (one home for it).
    assert emails.mask_account is mask_account


def test_masking_account_numbers_inside_a_text():
    text = "87650001: lots.csv line 4; 876500011 is another number; see 87650001, and HH-1 (87650002)"
    assert mask_accounts_in(text, ["87650001", "87650002"]) == (
        "••••0001: lots.csv line 4; 876500011 is another number; see ••••0001, and HH-1 (••••0002)")
    # Whole ids only, the longest first: ACC-12 inside ACC-123 is ACC-123's.
    assert masker(["ACC-12", "ACC-123"])("ACC-123 and ACC-12 and ACC-1234") == "••••-123 and ••••C-12 and ACC-1234"
    assert masker([])("87650001") == "87650001" and masker([None, " "])("x") == "x"
    assert masker([" 87650001 "])("'87650001 ' was rejected") == "'••••0001 ' was rejected"


def _day_one() -> FeedBuilder:
    feed = FeedBuilder()
    feed.household("HH-1", advisor_id="ADV-1")
    for account in BOOK:
        feed.account(account, household_id="HH-1")
    feed.position(DRIFTED, "VTI", 70)  # 70/30 on a 60/40 model: an alert, trades
    feed.position(DRIFTED, "BND", 60)
    feed.position(HELD_OUT, "VTI", 70)
    feed.position(HELD_OUT, "BOGUS", 10, lots=False)  # unknown symbol: a reject, held out for data quality
    feed.position(STUCK, "VTI", 70)  # may buy no bond: cannot get back inside the bands
    feed.position(STUCK, "BND", 60)
    feed.add("restrictions", account_id=STUCK, kind="no_buy_symbol", value="BND")
    feed.add("restrictions", account_id=STUCK, kind="no_buy_symbol", value="VBTLX")
    feed.position(SHRUNK, "VTI", 60)
    feed.position(SHRUNK, "BND", 80)
    feed.position(CALM, "VTI", 60)
    feed.position(CALM, "BND", 80)
    return feed


def _day_two() -> FeedBuilder:
    feed = _day_one()
    feed.as_of = NEXT_SESSION
    # SHRUNK's VTI fell from 60 to 20 shares with no transaction: a reconciliation alert.
    for row in feed.rows["positions"] + feed.rows["lots"]:
        if row["account_id"] == SHRUNK and row["symbol"] == "VTI":
            row["quantity"] = "20"
            if "cost_basis" in row:
                row["cost_basis"] = "1800"
    return feed


def _event_text(instance: DagsterInstance, run_id: str) -> str:
    """Everything the run's event log holds: messages, metadata, check results, failures."""
    # Serialised whole (as the instance stores it), then read back so that ••••1234 reads as itself.
    return "\n".join(json.dumps(json.loads(serialize_value(entry)), ensure_ascii=False)
                     for entry in instance.all_logs(run_id))


@pytest.fixture
def audit_key(monkeypatch):
    # The daily run publishes to the workflow store, whose audit chain is signed with a key.
    if not os.environ.get("REBAL_AUDIT_KEY", "").strip() and os.environ.get("REBAL_SANDBOX") != "1":
        monkeypatch.setenv("REBAL_AUDIT_KEY", secrets.token_urlsafe(32))


def test_a_daily_run_logs_and_describes_accounts_by_their_last_four_characters(workspace, audit_key):
    texts = {}
    with instance_for_test() as instance:
        for feed in (_day_one(), _day_two()):
            feed.write(workspace.feed_root)
            result = workspace.run_day(as_of=feed.as_of, instance=instance)
            assert result.success
            texts[feed.as_of] = _event_text(instance, result.run_id)
    every_event = "\n".join(texts.values())
    # The run still says which accounts it means: by the last four characters …
    assert "••••0002" in texts[AS_OF]  # held out for data quality (check metadata)
    assert "••••0003" in texts[AS_OF]  # could not reach its bands (trade_proposals metadata)
    assert "••••0004" in texts[NEXT_SESSION]  # the unexplained change (reconciliation check metadata)
    # … and never by the whole number.
    for account in BOOK:
        found = [m.start() for m in re.finditer(re.escape(account), every_event)]
        context = [every_event[max(0, i - 80): i + 40] for i in found[:3]]
        assert not found, f"{account} appears whole in the run's events: {context}"

    # The drill's printed summary of the same warehouse: masked too.
    summary = summarize_day(workspace.warehouse_path, AS_OF).text
    assert "••••0002" in summary or "••••0001" in summary
    for account in BOOK:
        assert account not in summary, summary


# The approval gate's refusal names the account: its log line and its metadata show ••••CC-1.
from rebal_pipeline_tests.execution.test_execution_safety import (  # noqa: E402,F401 (fixtures and helpers)
    NEXT, REBALANCE, api, decide, holdings, home, instance, make_package, publish as publish_packages, run, store, wh,
)


def test_a_gate_refusal_names_the_account_by_its_last_four_characters(store, api, wh, instance, home):
    publish_packages(store, make_package("R-1", "ACC-1", REBALANCE))
    first = decide(api, "ADV-1", "R-1", action="approve", reason="go")
    holdings(wh, NEXT, "ACC-1", {"VTI": 6, "BND": 60, "CASH": 4500})  # the sell of 10 no longer fits
    verdict = run(store, wh, instance, first.json()["decision"]["decision_id"])
    assert verdict["verdict"] == "refused"
    [gate_run] = instance.get_runs()
    text = _event_text(instance, gate_run.run_id)
    assert "approval refused by the gate: ••••CC-1 sell VTI 10: only 6 held (no overselling)" in text
    assert "ACC-1" not in text
