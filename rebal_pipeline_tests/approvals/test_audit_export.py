"""`rebal audit export --from D1 --to D2 --out DIR` as an operator runs it, checked by the
plain-Python verifier printed in docs/audit.md (extracted from the doc and run as an examiner
would, in a separate interpreter without rebal on its path)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import text

from rebal_pipeline import settings
from rebal_pipeline.cli import main
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, package, publish

DOC = settings.REPO_ROOT / "docs" / "audit.md"


def _documented_verifier() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/audit.md shows exactly one Python verifier"
    return blocks[0]


@pytest.fixture
def cli_store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'workflow.sqlite'}"
    # These tests drive `rebal audit ...` (cli.main): the environment is the CLI's interface.
    monkeypatch.setenv("REBAL_WORKFLOW_DB_URL", url)
    monkeypatch.setenv("REBAL_AUDIT_ANCHOR_DIR", str(tmp_path / "anchors"))
    store = WorkflowStore(url)
    store.migrate()
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"))
    with store.begin() as conn:
        lifecycle.decide(conn, "REC-1", {"user_id": "ADV-1", "role": "advisor"}, "approve",
                         PUBLISHED_AT + timedelta(hours=1), reason="back to the model")
    assert main(["audit", "anchor"]) == 0
    yield store
    store.dispose()


def _run_verifier(tmp_path, folder, keys: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "verify_export.py"
    script.write_text(_documented_verifier(), encoding="utf-8")
    # -I: isolated mode, no rebal, no site packages, no environment: plain Python only.
    return subprocess.run([sys.executable, "-I", str(script), str(folder), json.dumps(keys)],
                          capture_output=True, text=True, timeout=60)


def _keys() -> dict:
    key = os.environ["REBAL_AUDIT_KEY"]
    return {audit.key_id_of(key.encode()): key}


def test_the_documented_verifier_is_a_dozen_lines_or_so():
    lines = [line for line in _documented_verifier().splitlines() if line.strip()]
    assert len(lines) <= 20


def test_an_export_is_verified_by_the_documented_plain_python_verifier(cli_store, tmp_path, capsys):
    out = tmp_path / "exports"
    assert main(["audit", "export", "--from", "2026-11-20", "--to", "2026-11-20", "--out", str(out)]) == 0
    assert "Exported" in capsys.readouterr().out
    folder = out / "audit-2026-11-20_2026-11-20"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["hash_algorithm"] == "HMAC-SHA256" and manifest["manifest_hmac"]
    assert manifest["decisions"] == 1 and manifest["packages"] == 1 and len(manifest["anchors"]) == 1
    with cli_store.begin() as conn:
        total = conn.execute(text("select count(*) from wf_audit_events")).scalar()
    assert manifest["events"] == total and manifest["head"]["events"] == total
    for name in ("events.jsonl", "decisions.jsonl", "packages.jsonl", "manifest.json"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600, name
    done = _run_verifier(tmp_path, folder, _keys())
    assert done.returncode == 0, done.stderr
    assert f"export verified: {total} events, 1 packages decided on" in done.stdout


@pytest.mark.parametrize("tamper, says", [
    ("event", "events.jsonl altered"),
    ("package", "packages.jsonl altered"),
    ("manifest", "manifest altered"),
])
def test_the_documented_verifier_names_an_altered_export(cli_store, tmp_path, tamper, says):
    out = tmp_path / "exports"
    assert main(["audit", "export", "--out", str(out)]) == 0
    folder = next(out.iterdir())
    if tamper == "event":
        path = folder / "events.jsonl"
        path.write_text(path.read_text().replace('"actor":"ADV-1"', '"actor":"ADV-2"'))
    elif tamper == "package":
        path = folder / "packages.jsonl"
        path.write_text(path.read_text().replace('\\"quantity\\":20.0', '\\"quantity\\":286.0'))
    else:
        path = folder / "manifest.json"
        path.write_text(path.read_text().replace('"decisions":1', '"decisions":0'))
    done = _run_verifier(tmp_path, folder, _keys())
    assert done.returncode != 0 and says in done.stderr


def test_the_verifier_still_names_a_rewritten_export_whose_files_and_hashes_were_recomputed(cli_store, tmp_path):
    """An insider who edits an event and fixes the file digest cannot re-sign the manifest."""
    import hashlib

    out = tmp_path / "exports"
    assert main(["audit", "export", "--out", str(out)]) == 0
    folder = next(out.iterdir())
    events = folder / "events.jsonl"
    events.write_text(events.read_text().replace('"reason\\":\\"back to the model', '"reason\\":\\"client asked'))
    assert "client asked" in events.read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["events.jsonl"] = hashlib.sha256(events.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    done = _run_verifier(tmp_path, folder, _keys())
    assert done.returncode != 0 and "manifest altered" in done.stderr


def test_a_second_export_the_same_day_gets_a_new_versioned_folder(cli_store, tmp_path, capsys):
    out = tmp_path / "exports"
    args = ["audit", "export", "--from", "2026-11-01", "--to", "2026-11-30", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 0
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "audit-2026-11-01_2026-11-30", "audit-2026-11-01_2026-11-30-v2", "audit-2026-11-01_2026-11-30-v3"]
    assert _run_verifier(tmp_path, out / "audit-2026-11-01_2026-11-30-v2", _keys()).returncode == 0
    # The undated form (the whole chain into audit-<today>/) too.
    assert main(["audit", "export", "--out", str(out / "all")]) == 0
    assert main(["audit", "export", "--out", str(out / "all")]) == 0
    assert len(list((out / "all").iterdir())) == 2


def test_an_export_of_a_period_without_events_is_empty_and_still_verifies(cli_store, tmp_path):
    out = tmp_path / "exports"
    assert main(["audit", "export", "--from", "2025-01-01", "--to", "2025-01-31", "--out", str(out)]) == 0
    folder = out / "audit-2025-01-01_2025-01-31"
    assert json.loads((folder / "manifest.json").read_text())["events"] == 0
    assert _run_verifier(tmp_path, folder, _keys()).returncode == 0


def test_a_broken_chain_is_not_exported_and_verify_says_why(cli_store, tmp_path, capsys):
    with cli_store.begin() as conn:
        conn.execute(text("drop trigger wf_audit_events_no_delete"))
        conn.execute(text("delete from wf_audit_events where seq = (select max(seq) from wf_audit_events)"))
    assert main(["audit", "verify"]) == 1
    assert "missing tail" in capsys.readouterr().out
    assert main(["audit", "export", "--out", str(tmp_path / "exports")]) == 1
    assert "not exported" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_without_a_key_the_cli_says_how_to_set_one(cli_store, monkeypatch, capsys):
    monkeypatch.delenv("REBAL_AUDIT_KEY")
    monkeypatch.delenv("REBAL_SANDBOX", raising=False)
    assert main(["audit", "verify"]) == 2
    assert "REBAL_AUDIT_KEY is not set" in capsys.readouterr().err
