"""The settings object: malformed values name the variable, secrets are never echoed, defaults,
and REBAL_HOME moves every embedded file under it."""

from pathlib import Path

import pytest

from rebal_pipeline.resources import FixSessionResource, resources_for
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
