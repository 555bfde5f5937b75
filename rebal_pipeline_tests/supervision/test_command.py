"""`rebal supervisory-report` as the compliance officer runs it: an empty period of a new store
still gives the three files, their SHA-256s printed and recorded once."""

import hashlib

from rebal_pipeline import cli


def test_the_command_writes_the_three_files_and_prints_their_digests(tmp_path, monkeypatch, capsys):
    # The CLI reads its settings from the process environment: that is its interface.
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REBAL_SANDBOX", "1")
    out = tmp_path / "report"
    args = ["supervisory-report", "--from", "2026-11-16", "--to", "2026-11-22", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".csv", ".html", ".pdf"]
    for f in files:
        assert f"{f}  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()}" in printed
    assert "Recorded in the audit chain as supervisory_report:2026-11-16:2026-11-22:csv+html+pdf." in printed
    first = {f.name: f.read_bytes() for f in files}
    assert cli.main(args) == 0  # regenerated for the same period: the same bytes
    assert {f.name: f.read_bytes() for f in sorted(out.iterdir())} == first


def test_a_period_that_ends_before_it_starts_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REBAL_SANDBOX", "1")
    assert cli.main(["supervisory-report", "--from", "2026-11-22", "--to", "2026-11-16"]) == 2
    assert capsys.readouterr().err.startswith("rebal: ")
