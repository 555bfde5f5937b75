"""The day's canonical feed assembled from several custodian connections' parts: only when all
are in, whole or not at all, nothing picked silently, nothing rewritten for unchanged inputs."""

from __future__ import annotations

import csv

import pytest

from rebal_pipeline.connections.config import Connection, ConnectionsFileError, load_connections
from rebal_pipeline.connections.dialects import CUSTODIAN_FILES, REFERENCE_FILES, DialectError
from rebal_pipeline.connections.ingest import assemble_feed
from rebal_pipeline.connections.config import part_dir
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline_tests.feedkit import AS_OF

PARTS = {
    "schwab-main": {
        "positions": [["ACC-1", "VTI", "10"]],
        "lots": [["ACC-1", "VTI", "L1", "2024-01-02", "10", "2000", ""]],
        "transactions": [],
        "prices": [["VTI", "250.10"], ["BND", "72"], ["CASH", "1"]],
    },
    "fidelity-api": {
        "positions": [["ACC-2", "BND", "5"]],
        "lots": [["ACC-2", "BND", "L9", "2025-03-04", "5", "360", ""]],
        "transactions": [["ACC-2", "BND", "2026-11-19", "buy", "5", "72", "", ""]],
        "prices": [["VTI", "250.1"], ["BND", "72.00"], ["CASH", "1"], ["VXUS", "61.5"]],
    },
}


def connection(name: str) -> Connection:
    return Connection(name=name, firm="example-ria", custodian=name.split("-")[0], dialect="canonical",
                      kind="oauth_api", oauth={"base_url": "https://api.example", "token_url": "https://api.example/t",
                                               "client_id_env": "X_ID", "client_secret_env": "X_SECRET",
                                               "token_file": "/tmp/x"})


def write_part(name: str, data: dict) -> None:
    folder = part_dir(connection(name), AS_OF)
    folder.mkdir(parents=True, exist_ok=True)
    for file in CUSTODIAN_FILES:
        with open(folder / FEED_FILES[file].filename, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(FEED_FILES[file].column_names)
            writer.writerows(data[file])


def read(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def home(tmp_path, monkeypatch):
    # assemble_feed reads the parts and the firm's reference files under REBAL_HOME (connections/).
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    reference = tmp_path / "home" / "reference" / "example-ria"
    reference.mkdir(parents=True)
    for name in REFERENCE_FILES:
        (reference / FEED_FILES[name].filename).write_text(",".join(FEED_FILES[name].column_names) + "\n")
    return tmp_path


def test_the_feed_waits_for_every_part_then_holds_each_row_once(home):
    siblings = [connection("schwab-main"), connection("fidelity-api")]
    write_part("schwab-main", PARTS["schwab-main"])
    waiting = assemble_feed(siblings, AS_OF, home / "feeds")
    assert waiting.feed_dir is None and waiting.waiting_for == ("fidelity-api",)
    assert not (home / "feeds" / AS_OF.isoformat()).exists()

    write_part("fidelity-api", PARTS["fidelity-api"])
    done = assemble_feed(siblings, AS_OF, home / "feeds")
    assert done.changed and done.feed_dir == home / "feeds" / AS_OF.isoformat()
    assert [(r["account_id"], r["symbol"]) for r in read(done.feed_dir / "positions.csv")] == \
        [("ACC-1", "VTI"), ("ACC-2", "BND")]
    assert len(read(done.feed_dir / "transactions.csv")) == 1
    # The same close written two ways is one price; the first custodian's text is kept.
    assert read(done.feed_dir / "prices.csv") == [
        {"symbol": "VTI", "close": "250.10"}, {"symbol": "BND", "close": "72"}, {"symbol": "CASH", "close": "1"},
        {"symbol": "VXUS", "close": "61.5"}]
    assert sorted(p.name for p in done.feed_dir.iterdir()) == sorted(s.filename for s in FEED_FILES.values())
    assert [p.name for p in (home / "feeds").iterdir()] == [AS_OF.isoformat()]  # no staging left


def test_unchanged_parts_rewrite_nothing_and_a_changed_part_rewrites_the_day(home):
    siblings = [connection("schwab-main"), connection("fidelity-api")]
    for name, data in PARTS.items():
        write_part(name, data)
    first = assemble_feed(siblings, AS_OF, home / "feeds")
    stamp = (first.feed_dir / "positions.csv").stat().st_mtime_ns
    again = assemble_feed(siblings, AS_OF, home / "feeds")
    assert not again.changed and (again.feed_dir / "positions.csv").stat().st_mtime_ns == stamp

    corrected = {**PARTS["fidelity-api"], "positions": [["ACC-2", "BND", "6"]]}
    write_part("fidelity-api", corrected)
    assert assemble_feed(siblings, AS_OF, home / "feeds").changed
    assert read(first.feed_dir / "positions.csv")[1]["quantity"] == "6"


def test_two_custodians_disagreeing_on_a_price_keep_both_rows_for_the_feed_to_reject(home):
    siblings = [connection("schwab-main"), connection("fidelity-api")]
    write_part("schwab-main", PARTS["schwab-main"])
    write_part("fidelity-api", {**PARTS["fidelity-api"], "prices": [["VTI", "250.35"], ["CASH", "1"]]})
    done = assemble_feed(siblings, AS_OF, home / "feeds")
    assert [r["close"] for r in read(done.feed_dir / "prices.csv") if r["symbol"] == "VTI"] == ["250.10", "250.35"]


def test_a_missing_reference_file_fails_naming_it_and_leaves_the_previous_feed(home):
    siblings = [connection("schwab-main")]
    write_part("schwab-main", PARTS["schwab-main"])
    first = assemble_feed(siblings, AS_OF, home / "feeds")
    before = (first.feed_dir / "positions.csv").read_bytes()
    (home / "home" / "reference" / "example-ria" / "accounts.csv").unlink()
    write_part("schwab-main", {**PARTS["schwab-main"], "positions": [["ACC-1", "VTI", "11"]]})
    with pytest.raises(DialectError, match="accounts.csv.*reference file missing"):
        assemble_feed(siblings, AS_OF, home / "feeds")
    assert (first.feed_dir / "positions.csv").read_bytes() == before


@pytest.mark.parametrize("body, problem", [
    ("connections:\n  - {name: a, firm: one, custodian: c, dialect: canonical, kind: drop_folder}\n"
     "  - {name: b, firm: two, custodian: c, dialect: canonical, kind: drop_folder}\n", "one deployment serves one firm"),
    ("connections:\n  - {name: a, firm: f, custodian: c, dialect: canonical, kind: drop_folder}\n"
     "  - {name: b, firm: f, custodian: c, dialect: schwab, kind: sftp, sftp: {host: h, username: u, "
     "private_key_file_env: K, known_hosts_file: k}}\n", "cannot be combined"),
    ("connections:\n  - {name: b, firm: f, custodian: c, dialect: canonical, kind: sftp, sftp: {host: h, username: u, "
     "private_key_file_env: K, known_hosts_file: k}}\n", "needs a custodian dialect"),
    ("connections:\n  - {name: b, firm: f, custodian: c, dialect: schwab, kind: oauth_api, oauth: {base_url: 'https://a',"
     " token_url: 'https://a/t', client_id_env: I, client_secret_env: S, token_file: t}}\n", "dialect must be canonical"),
])
def test_connections_that_cannot_make_one_feed_are_refused_on_load(tmp_path, body, problem):
    path = tmp_path / "connections.yaml"
    path.write_text(body)
    with pytest.raises(ConnectionsFileError, match=problem):
        load_connections(path)
