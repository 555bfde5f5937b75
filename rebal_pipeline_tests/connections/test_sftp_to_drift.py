"""The custodian path end to end: a Schwab-style delivery on a real SFTP server (pinned host
key, key auth) → pulled and archived → translated into the canonical feed → the daily scan."""

import shutil

import pytest

from rebal_pipeline import settings
from rebal_pipeline.connections.config import Connection, SftpSettings
from rebal_pipeline.connections.dialects import REFERENCE_FILES
from rebal_pipeline.connections.ingest import pull_and_convert
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.sandbox.dialects import emit_dialect
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed
from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519
from rebal_pipeline_tests.feedkit import AS_OF


@pytest.mark.parametrize("dialect", ["schwab", "fidelity", "pershing"])
def test_a_custodian_delivery_over_sftp_reaches_the_daily_scan(dialect, workspace, dagster_instance, tmp_path,
                                                                monkeypatch):
    # pull_and_convert reads the firm's reference files and parts under REBAL_HOME (connections/).
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    generate_feed(SandboxConfig(as_of=AS_OF, households=20, seed=1), tmp_path / "book")
    canonical = tmp_path / "book" / AS_OF.isoformat()
    custodian = tmp_path / "custodian"
    emit_dialect(canonical, dialect, custodian)
    reference = settings.rebal_home() / "reference" / "example-ria"
    reference.mkdir(parents=True)
    for name in REFERENCE_FILES:
        shutil.copyfile(canonical / FEED_FILES[name].filename, reference / FEED_FILES[name].filename)
    host, client = make_ed25519(), make_ed25519()
    monkeypatch.setenv("REBAL_TEST_SFTP_KEY", str(client.write(tmp_path / "id_ed25519")))  # named by the connection

    with SftpTestServer(custodian, host_key=host.pkey, client_key=client.pkey) as server:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(server.known_hosts_line() + "\n")
        connection = Connection(
            name=f"{dialect}-main", firm="example-ria", custodian=dialect, dialect=dialect, kind="sftp",
            sftp=SftpSettings(host="127.0.0.1", port=server.port, username="custodian",
                              private_key_file_env="REBAL_TEST_SFTP_KEY", known_hosts_file=str(known_hosts)))
        [delivery] = pull_and_convert(connection, workspace.feed_root)
        assert pull_and_convert(connection, workspace.feed_root) == []  # nothing new: nothing redone

    assert delivery.as_of == AS_OF
    # Every raw file is in the write-once archive under its SHA-256.
    for sha in delivery.raw_files.values():
        assert (settings.archive_root() / "sha256" / sha[:2] / sha).exists()
    assert workspace.run_day(instance=dagster_instance).success
    assert workspace.table("rejects").height == 0
    positions = workspace.table("stg_feed_positions").height
    assert positions == sum(1 for _ in (canonical / "positions.csv").open()) - 1
    assert workspace.table("drift_alerts").height > 0


def test_the_newest_re_delivery_of_a_file_is_the_one_translated(tmp_path):
    from rebal_pipeline.connections.ingest import _newest_version

    raw = tmp_path
    for name in ("prices_20261120.csv", "prices_20261120.20261121T101500Z-907.csv",
                 "prices_20261120.20261121T093000Z-905.csv", "prices_20261120.csv.part"):
        (raw / name).write_text("x")
    assert _newest_version(raw, "prices_20261120.csv").name == "prices_20261120.20261121T101500Z-907.csv"
    assert _newest_version(raw, "positions_20261120.csv").name == "positions_20261120.csv"
