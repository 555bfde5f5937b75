"""`rebal audit verify` / `rebal audit export` / `rebal issue-token` as an operator runs them."""

import json
from datetime import date

import pytest
from sqlalchemy import text

from rebal_pipeline.cli import main
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.approvals.conftest import package, publish


@pytest.fixture
def cli_store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'workflow.sqlite'}"
    monkeypatch.setenv("REBAL_WORKFLOW_DB_URL", url)  # the tests drive cli.main: the environment is its interface
    store = WorkflowStore(url)
    store.migrate()
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"))
    yield store
    store.dispose()


def test_verify_says_intact_then_names_the_edited_event(cli_store, capsys):
    assert main(["audit", "verify"]) == 0
    assert "audit chain intact" in capsys.readouterr().out
    with cli_store.begin() as conn:
        conn.execute(text("drop trigger wf_audit_events_no_update"))
        conn.execute(text("update wf_audit_events set actor = 'mallory' where event_id = 'recommendation:REC-1'"))
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "recommendation:REC-1" in out


def test_export_writes_the_events_and_a_manifest_with_the_head_hash(cli_store, tmp_path, capsys):
    assert main(["audit", "export", "--out", str(tmp_path / "exports")]) == 0
    folder = tmp_path / "exports" / f"audit-{date.today().isoformat()}"
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = (folder / "events.jsonl").read_text().splitlines()
    assert manifest["events"] == len(lines) and manifest["verified"] is True
    assert json.loads(lines[-1])["hash"] == manifest["head_hash"]


def test_issue_token_prints_a_token_that_authenticates_and_stores_only_its_hash(cli_store, capsys):
    assert main(["issue-token", "ADV-1"]) == 0
    token = capsys.readouterr().out.strip()
    with cli_store.begin() as conn:
        assert lifecycle.user_for_token(conn, token)["user_id"] == "ADV-1"
        stored = conn.execute(text("select api_token_sha256 from wf_users where user_id = 'ADV-1'")).scalar()
    assert token not in stored and len(stored) == 64
    assert main(["issue-token", "NOBODY"]) == 1
