"""The settings object: malformed values name the variable, secrets are never echoed, defaults,
and REBAL_HOME moves every embedded file under it."""

from datetime import timedelta
from pathlib import Path

import pytest
from dagster import EnvVar

from rebal_pipeline.comms.outbound import Transient
from rebal_pipeline.comms.settings import CommsSettings
from rebal_pipeline.comms.smtp import SmtpConfigError
from rebal_pipeline.resources import FixSessionResource, comms_settings, resources_for
from rebal_pipeline.settings import SettingsError, load_settings


def test_a_malformed_value_names_the_variable():
    with pytest.raises(SettingsError) as error:
        load_settings({"REBAL_LINK_TTL_HOURS": "abc"})
    assert str(error.value).startswith("REBAL_LINK_TTL_HOURS='abc': ")


def test_a_secret_is_never_echoed_in_the_error():
    with pytest.raises(SettingsError) as error:
        load_settings({"REBAL_LINK_SECRET": "short-but-secret", "REBAL_SMTP_PORT": "70000"})
    assert "REBAL_SMTP_PORT='70000'" in str(error.value)
    with pytest.raises(SettingsError) as error:
        load_settings({"REBAL_LINK_SECRET": "short-but-secret"}).link_secret()
    assert "REBAL_LINK_SECRET" in str(error.value)
    assert "short-but-secret" not in str(error.value)
    assert "16 bytes" in str(error.value)


def test_defaults():
    empty = load_settings({})
    assert empty.link_ttl_hours == 72.0
    assert empty.duckdb_memory_limit == "4GB"
    assert empty.sandbox is False
    assert empty.client_confirmation == "simple"
    assert empty.smtp_starttls is True
    assert empty.auto_submit_discretionary is False
    assert empty.crm is None
    # an empty string counts as not set
    assert load_settings({"REBAL_LINK_TTL_HOURS": ""}).link_ttl_hours == 72.0


def test_rebal_home_moves_everything_under_it(tmp_path):
    home = tmp_path / "home"
    s = load_settings({"REBAL_HOME": str(home)})
    assert s.feed_root() == home / "feeds"
    assert s.archive_root() == home / "archive"
    assert s.warehouse_path() == home / "warehouse.duckdb"
    assert s.dagster_home() == home / "dagster_home"
    assert s.outbox_root() == home / "outbox"
    assert s.wash_sale_overrides_path() == home / "overrides" / "wash_sale_overrides.csv"
    assert s.workflow_db_url() == f"sqlite:///{home / 'workflow.sqlite'}"


def test_resources_for_the_sandbox_follow_the_settings(tmp_path):
    s = load_settings({"REBAL_HOME": str(tmp_path), "REBAL_DUCKDB_MEMORY_LIMIT": "1GB",
                       "REBAL_FIX_SENDER_COMP_ID": "REBAL", "REBAL_FIX_FIRST_SEQ_NUM": "7"})
    chosen = resources_for(s)
    assert chosen["warehouse"].database == str(tmp_path / "warehouse.duckdb")
    assert chosen["warehouse"].memory_limit == "1GB"
    assert chosen["workflow_store"].url == f"sqlite:///{Path(tmp_path) / 'workflow.sqlite'}"
    assert chosen["fix_session"] == FixSessionResource(sender_comp_id="REBAL", first_seq_num=7)


def test_the_cli_validates_at_start_and_names_the_variable(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "REBAL_HOME": str(tmp_path), "REBAL_SMTP_PORT": "not-a-port"}
    done = subprocess.run([sys.executable, "-m", "rebal_pipeline.cli", "summary"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("rebal: REBAL_SMTP_PORT='not-a-port': ")
    assert "Traceback" not in done.stderr


def test_the_sandbox_and_auto_submit_flags_read_as_before():
    assert load_settings({"REBAL_SANDBOX": "1"}).sandbox is True
    assert load_settings({"REBAL_SANDBOX": "Yes"}).sandbox is True
    assert load_settings({"REBAL_SANDBOX": "on"}).sandbox is False
    assert load_settings({"REBAL_AUTO_SUBMIT_DISCRETIONARY": "TRUE"}).auto_submit_discretionary is True
    with pytest.raises(SettingsError, match="^REBAL_AUTO_SUBMIT_DISCRETIONARY='yes': .*must be true or false"):
        load_settings({"REBAL_AUTO_SUBMIT_DISCRETIONARY": "yes"})


def test_the_message_resources_carry_the_settings_to_the_senders(tmp_path):
    s = load_settings({"REBAL_HOME": str(tmp_path), "REBAL_SMTP_HOST": "relay.example-ria.com",
                       "REBAL_SMTP_FROM": "Harbor RIA <alerts@example-ria.com>", "REBAL_SMTP_STARTTLS": "no",
                       "REBAL_LINK_SECRET": "l" * 40, "REBAL_PUBLIC_URL": "https://rebal.example-ria.com/",
                       "REBAL_LINK_TTL_HOURS": "12", "REBAL_REDTAIL_BASE_URL": "https://crm.example.com/api",
                       "REBAL_REDTAIL_API_KEY": "k", "REBAL_REDTAIL_USER_KEY": "u", "REBAL_REMINDER_HOURS": "4",
                       "REBAL_ESCALATION_HOURS": "8", "REBAL_CLIENT_CONFIRMATION": "detailed"})
    chosen = resources_for(s)
    comms = comms_settings(chosen["email"], chosen["crm"], chosen["links"], chosen["approval_clock"],
                           chosen["drift_policy_source"])
    relay = comms.relay()
    assert (relay.host, relay.port, relay.starttls, relay.sender) == (
        "relay.example-ria.com", 25, False, "Harbor RIA <alerts@example-ria.com>")
    assert comms.link_secret() == b"l" * 40 and comms.link_ttl == timedelta(hours=12)
    assert comms.public_url == "https://rebal.example-ria.com"
    assert comms.crm_style() == "redtail" and comms.confirmation_style == "detailed"
    assert comms.firm_name(relay.sender) == "Harbor RIA"
    clock = comms.approval_clock()
    assert (clock.reminder_hours, clock.escalation_hours) == (4.0, 8.0)


def test_a_secret_reaches_dagster_as_the_name_of_its_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("REBAL_LINK_SECRET", "s" * 40)  # a deployment's environment
    monkeypatch.setenv("REBAL_HOME", str(tmp_path))
    links = resources_for(load_settings())["links"]
    assert isinstance(links.link_secret_value, EnvVar) and links.link_secret_value == "REBAL_LINK_SECRET"


def test_what_cannot_be_sent_with_is_a_retry_that_names_the_variable():
    comms = CommsSettings.from_settings(load_settings({"REBAL_WEALTHBOX_BASE_URL": "https://a.example.com",
                                                       "REBAL_REDTAIL_BASE_URL": "https://b.example.com"}))
    with pytest.raises(Transient, match="REBAL_LINK_SECRET must be set"):
        comms.link_secret()
    with pytest.raises(SmtpConfigError, match="set REBAL_SMTP_HOST, REBAL_SMTP_FROM"):
        comms.relay()
    with pytest.raises(Transient, match="choose one with REBAL_CRM"):
        comms.crm_style()
    assert comms.crm_configured()  # meant to be used: its messages wait for the fix
