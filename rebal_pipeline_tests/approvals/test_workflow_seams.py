"""The approval stage's domain seams moved out of the Dagster shell (issue #15): the one home of
the reminder / escalation hours, the outbox's locations, the anchor's summary. Plain functions,
no Dagster, hand-computed expectations."""

from pathlib import Path

import pytest

from rebal_pipeline.core.policy import load_policy
from rebal_pipeline.settings import SettingsError, load_settings
from rebal_pipeline.workflow import anchoring, outbox
from rebal_pipeline.workflow.lifecycle import lifecycle_policy

SHIPPED = load_policy(None)  # approval: reminder 24h, escalation 48h, defer 5 days, micro-trades $5000


def test_the_hours_come_from_the_policy_unless_the_settings_override_them():
    plain = lifecycle_policy(SHIPPED, load_settings({}))
    assert (plain.reminder_hours, plain.escalation_hours) == (24.0, 48.0)
    assert (plain.default_defer_days, plain.micro_trade_limit) == (5, 5000.0)

    both = lifecycle_policy(SHIPPED, load_settings({"REBAL_REMINDER_HOURS": "4", "REBAL_ESCALATION_HOURS": "8"}))
    assert (both.reminder_hours, both.escalation_hours) == (4.0, 8.0)

    reminder_only = lifecycle_policy(SHIPPED, load_settings({"REBAL_REMINDER_HOURS": "12.5"}))
    assert (reminder_only.reminder_hours, reminder_only.escalation_hours) == (12.5, 48.0)


def test_a_reminder_after_the_escalation_is_refused_naming_both_variables():
    with pytest.raises(ValueError, match="must come before the escalation") as refused:
        lifecycle_policy(SHIPPED, load_settings({"REBAL_REMINDER_HOURS": "72"}))
    assert str(refused.value) == ("the reminder (72.0h) must come before the escalation (48.0h): check the "
                                  "policy's approval section and REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS")


def test_hours_that_are_not_positive_numbers_are_refused_by_the_settings():
    with pytest.raises(SettingsError, match="REBAL_REMINDER_HOURS"):
        load_settings({"REBAL_REMINDER_HOURS": "soon"})
    with pytest.raises(SettingsError, match="REBAL_ESCALATION_HOURS"):
        load_settings({"REBAL_ESCALATION_HOURS": "0"})


def test_the_outbox_locations():
    root = Path("/srv/rebal/outbox")
    assert outbox.approved_trades_path(root, "d3adb33f") == root / "approved" / "d3adb33f.json"
    # sha256("reminder:REC-1:2026-01-01"), computed by hand with hashlib
    assert outbox.notification_path(root, "reminder:REC-1:2026-01-01") == (
        root / "notifications" / "c01ea719c57a78cb78f15eb89226ddd73751f6411c2fbae24721dd1035419cde.json")


def test_a_decision_id_that_could_name_another_file_is_refused():
    assert outbox.check_decision_id("abc_DEF-123") == "abc_DEF-123"
    for bad in ("../etc/passwd", "", "a" * 65, "x y"):
        with pytest.raises(outbox.OutboxError, match="is not a decision id"):
            outbox.check_decision_id(bad)
    with pytest.raises(outbox.OutboxError, match="unknown notification kind 'sms'; one of reminder, escalation, "
                                                 "weekly_digest"):
        outbox.check_notification_kind("sms")


def test_a_copy_for_people_is_written_once(tmp_path):
    path = tmp_path / "approved" / "d1.json"
    assert outbox.write_copy_for_people(path, {"b": 1, "a": "é"}) is True
    assert outbox.write_copy_for_people(path, {"b": 2}) is False
    assert path.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'


def test_the_anchor_summary_shows_the_head_and_never_the_signature():
    assert anchoring.anchor_summary(None) == {"events": 0}
    assert anchoring.without_signature(None) == {}
    document = {"seq": 7, "hash": "ab" * 32, "events": 7, "key_id": "k1", "anchored_at": "2026-01-02T03:04:05+00:00",
                "file": "/a/anchor-7.json", "signature": "s"}
    assert anchoring.anchor_summary(document) == {
        "seq": 7, "head_hash": "ab" * 32, "events": 7, "key_id": "k1", "anchored_at": "2026-01-02T03:04:05+00:00",
        "anchor_file": "/a/anchor-7.json"}
    assert "signature" not in anchoring.without_signature(document)
    assert anchoring.without_signature(document)["seq"] == 7
