"""The connection sensors: new SFTP files launch a pull, a new or changed canonical folder
launches the daily scan for its date — each once."""

import shutil

from dagster import DagsterInstance, build_sensor_context

from rebal_pipeline import settings
from rebal_pipeline.connections.dialects import REFERENCE_FILES
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.connections.jobs import pull_custodian_files
from rebal_pipeline.defs.connections.sensors import custodian_files, feed_arrivals
from rebal_pipeline.sandbox.dialects import emit_dialect
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed
from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519
from rebal_pipeline.resources import WorkflowStoreResource
from rebal_pipeline_tests.feedkit import AS_OF


def test_a_complete_feed_folder_launches_the_scan_for_its_date_once_and_again_when_it_changes(tmp_path, monkeypatch):
    # feed_arrivals reads the feed root from the environment at each tick (defs/connections/sensors.py).
    monkeypatch.setenv("REBAL_FEED_ROOT", str(tmp_path / "feeds"))
    (tmp_path / "feeds" / "not-a-date").mkdir(parents=True)
    generate_feed(SandboxConfig(as_of=AS_OF, households=3, seed=1), tmp_path / "feeds")
    first = feed_arrivals(build_sensor_context(cursor=None))
    [request] = first
    assert request.partition_key == AS_OF.isoformat() and request.run_key.startswith(f"feed:{AS_OF}:")
    context = build_sensor_context(cursor=None)
    feed_arrivals(context)
    assert feed_arrivals(build_sensor_context(cursor=context.cursor)).skip_message == "no new or changed feed folder"
    (tmp_path / "feeds" / AS_OF.isoformat() / "prices.csv").write_text(
        (tmp_path / "feeds" / AS_OF.isoformat() / "prices.csv").read_text() + "")
    (tmp_path / "feeds" / AS_OF.isoformat() / "prices.csv").touch()
    [again] = feed_arrivals(build_sensor_context(cursor=context.cursor))
    assert again.run_key != request.run_key


def test_new_files_on_the_sftp_server_launch_one_pull_which_translates_them(tmp_path, monkeypatch):
    # The sensor and the pull run read REBAL_HOME (reference files, inbound parts), the feed root and
    # REBAL_CONNECTIONS from the environment when they run (defs/connections, connections/).
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REBAL_FEED_ROOT", str(tmp_path / "feeds"))
    generate_feed(SandboxConfig(as_of=AS_OF, households=5, seed=3), tmp_path / "book")
    canonical = tmp_path / "book" / AS_OF.isoformat()
    emit_dialect(canonical, "schwab", tmp_path / "custodian")
    reference = tmp_path / "home" / "reference" / "example-ria"
    reference.mkdir(parents=True)
    for name in REFERENCE_FILES:
        shutil.copyfile(canonical / FEED_FILES[name].filename, reference / FEED_FILES[name].filename)
    host, client = make_ed25519(), make_ed25519()
    monkeypatch.setenv("REBAL_TEST_SFTP_KEY", str(client.write(tmp_path / "id_ed25519")))  # named by the connection
    with SftpTestServer(tmp_path / "custodian", host_key=host.pkey, client_key=client.pkey) as server:
        (tmp_path / "known_hosts").write_text(server.known_hosts_line() + "\n")
        (tmp_path / "connections.yaml").write_text(
            "connections:\n  - name: schwab-main\n    firm: example-ria\n    custodian: schwab\n"
            "    dialect: schwab\n    kind: sftp\n    sftp:\n      host: 127.0.0.1\n"
            f"      port: {server.port}\n      username: custodian\n"
            "      private_key_file_env: REBAL_TEST_SFTP_KEY\n"
            f"      known_hosts_file: {tmp_path / 'known_hosts'}\n")
        monkeypatch.setenv("REBAL_CONNECTIONS", str(tmp_path / "connections.yaml"))
        [request] = custodian_files(build_sensor_context())
        assert request.run_key.startswith("pull:schwab-main:")
        result = pull_custodian_files.execute_in_process(
            run_config=request.run_config, instance=DagsterInstance.ephemeral(),
            resources={"workflow_store": WorkflowStoreResource(url=settings.workflow_db_url())})
        assert result.success and result.output_for_node("pull_connection") == [AS_OF.isoformat()]
        assert "no new files (schwab-main)" in custodian_files(build_sensor_context()).skip_message
    assert (tmp_path / "feeds" / AS_OF.isoformat() / "positions.csv").exists()
