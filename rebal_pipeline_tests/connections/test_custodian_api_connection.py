"""An OAuth API connection wired end to end, beside an SFTP one, against real local peers.

The operator authorizes rebal (rebal connections authorize: authorization-code grant with a
checked state); the custodian_api_pulls sensor asks for the day once the custodian publishes it;
the run pulls it from a real local HTTP API (SandboxCustodianApi) into the connection's part; the
day's canonical feed is assembled only when the Schwab-style SFTP part is in too, and the daily
scan reads it whole. An expired refresh token raises one operations alert, fails the run, and the
sensor waits for a new authorization instead of failing every slot.
"""

from __future__ import annotations

import csv
import os
import shutil
from datetime import datetime
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from cryptography.fernet import Fernet
from dagster import DagsterInstance, build_sensor_context
from sqlalchemy import select

from rebal_pipeline.connections.authorize import AuthorizationError, finish_authorization, start_authorization
from rebal_pipeline.connections.config import load_connections
from rebal_pipeline.connections.dialects import REFERENCE_FILES
from rebal_pipeline.connections.pull import reauthorization_key
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.comms.sensors import build_operations_alerts_sensor
from rebal_pipeline.defs.connections.jobs import pull_custodian_files
from rebal_pipeline.defs.connections.sensors import build_custodian_api_pulls_sensor, custodian_files
from rebal_pipeline.resources import WorkflowStoreResource
from rebal_pipeline.sandbox.custodian_api import SandboxCustodianApi
from rebal_pipeline.sandbox.dialects import emit_dialect
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed
from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519
from rebal_pipeline.workflow.schema import audit_events, notifications
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.feedkit import AS_OF

NEW_YORK = ZoneInfo("America/New_York")
SATURDAY_4AM = datetime(2026, 11, 21, 4, 0, tzinfo=NEW_YORK)  # before the custodian publishes Friday
SATURDAY_6AM = datetime(2026, 11, 21, 6, 0, tzinfo=NEW_YORK)


def rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class Firm:
    """A firm whose Schwab accounts come by SFTP and the others through the custodian API."""

    def __init__(self, root, monkeypatch, expires_in=3600):
        self.root = root
        # The connection sensors and jobs read these from the environment when they run
        # (defs/connections, connections/); the connections name their secrets by variable.
        monkeypatch.setenv("REBAL_HOME", str(root / "home"))
        monkeypatch.setenv("REBAL_FEED_ROOT", str(root / "feeds"))
        monkeypatch.setenv("REBAL_TOKEN_KEY", Fernet.generate_key().decode())
        monkeypatch.setenv("REBAL_TEST_API_CLIENT_ID", "rebal-test")
        monkeypatch.setenv("REBAL_TEST_API_CLIENT_SECRET", "s3cret-client")
        generate_feed(SandboxConfig(as_of=AS_OF, households=20, seed=5), root / "book")
        self.canonical = root / "book" / AS_OF.isoformat()
        accounts = rows(self.canonical / "accounts.csv")
        self.schwab = {a["account_id"] for a in accounts if a["custodian"] == "schwab"}
        self.elsewhere = {a["account_id"] for a in accounts} - self.schwab
        assert self.schwab and self.elsewhere
        emit_dialect(self.canonical, "schwab", root / "sftp" / "schwab", account_ids=self.schwab)
        reference = root / "home" / "reference" / "example-ria"
        reference.mkdir(parents=True)
        for name in REFERENCE_FILES:
            shutil.copyfile(self.canonical / FEED_FILES[name].filename, reference / FEED_FILES[name].filename)
        host, client = make_ed25519(), make_ed25519()
        monkeypatch.setenv("REBAL_TEST_SFTP_KEY", str(client.write(root / "id_ed25519")))
        self.sftp = SftpTestServer(root / "sftp", host_key=host.pkey, client_key=client.pkey).start()
        (root / "known_hosts").write_text(self.sftp.known_hosts_line() + "\n")
        self.api = SandboxCustodianApi(self.canonical, client_id="rebal-test", client_secret="s3cret-client",
                                       account_ids=self.elsewhere, expires_in=expires_in).__enter__()
        self.token_file = root / "home" / "tokens" / "custodian-api.bin"
        (root / "connections.yaml").write_text(f"""connections:
  - name: schwab-main
    firm: example-ria
    custodian: schwab
    dialect: schwab
    kind: sftp
    sftp: {{host: 127.0.0.1, port: {self.sftp.port}, username: custodian, remote_dir: schwab,
           private_key_file_env: REBAL_TEST_SFTP_KEY, known_hosts_file: {root / 'known_hosts'}}}
  - name: custodian-api
    firm: example-ria
    custodian: fidelity
    dialect: canonical
    kind: oauth_api
    oauth:
      base_url: {self.api.url}
      token_url: {self.api.url}/oauth/token
      authorize_url: {self.api.url}/oauth/authorize
      redirect_uri: https://rebal.example-ria.com/oauth/callback
      client_id_env: REBAL_TEST_API_CLIENT_ID
      client_secret_env: REBAL_TEST_API_CLIENT_SECRET
      token_file: {self.token_file}
      page_size: 25
""")
        monkeypatch.setenv("REBAL_CONNECTIONS", str(root / "connections.yaml"))
        self.store_url = f"sqlite:///{root / 'workflow.sqlite'}"
        self.resources = {"workflow_store": WorkflowStoreResource(url=self.store_url)}

    @property
    def api_connection(self):
        return next(c for c in load_connections().connections if c.name == "custodian-api")

    def authorize(self):
        """What the operator does: open the address, approve, pass the redirect's code and state."""
        url = start_authorization(self.api_connection)
        redirect = httpx.get(url, follow_redirects=False)
        assert redirect.status_code == 302
        answer = {k: v[0] for k, v in parse_qs(urlsplit(redirect.headers["location"]).query).items()}
        return finish_authorization(self.api_connection, answer["code"], answer["state"])

    def api_sensor(self, now):
        sensor = build_custodian_api_pulls_sensor(clock=lambda: now)
        return sensor(build_sensor_context(resources=self.resources))

    def run(self, run_config):
        return pull_custodian_files.execute_in_process(run_config=run_config, instance=DagsterInstance.ephemeral(),
                                                       resources=self.resources, raise_on_error=False)

    def close(self):
        self.api.__exit__(None, None, None)
        self.sftp.stop()


@pytest.fixture
def firm(tmp_path, monkeypatch):
    f = Firm(tmp_path, monkeypatch)
    yield f
    f.close()


def test_an_api_part_and_an_sftp_part_assemble_into_one_feed_the_scan_reads_whole(firm, workspace):
    firm.authorize()
    assert oct(firm.token_file.stat().st_mode & 0o777) == "0o600"
    assert b"access_token" not in firm.token_file.read_bytes()  # encrypted at rest

    assert "not published yet" in firm.api_sensor(SATURDAY_4AM).skip_message
    [request] = firm.api_sensor(SATURDAY_6AM)
    assert request.run_key.startswith(f"api:custodian-api:{AS_OF}:")
    result = firm.run(request.run_config)
    assert result.success
    feed = firm.root / "feeds" / AS_OF.isoformat()
    assert not feed.exists()  # the API part is in, the Schwab part is not: no half feed
    assert "custodian-api: 2026-11-20 pulled" in firm.api_sensor(SATURDAY_6AM).skip_message

    [pull] = custodian_files(build_sensor_context())
    assert firm.run(pull.run_config).success
    assert feed.is_dir()

    # Every account's positions, from whichever custodian holds it, exactly once.
    book = rows(firm.canonical / "positions.csv")
    assembled = rows(feed / "positions.csv")
    assert sorted(map(lambda r: (r["account_id"], r["symbol"]), assembled)) == \
        sorted(map(lambda r: (r["account_id"], r["symbol"]), book))
    assert {r["account_id"] for r in assembled} == firm.schwab | firm.elsewhere
    # Both custodians priced every security identically: one row each.
    assert len(rows(feed / "prices.csv")) == len(rows(firm.canonical / "prices.csv"))

    assert feed == workspace.feed_root / AS_OF.isoformat()  # the scan's workspace is the same folder
    assert workspace.run_day().success
    assert workspace.table("rejects").height == 0
    assert workspace.table("stg_feed_positions").height == len(book)
    assert workspace.table("drift_alerts").height > 0


def test_an_expired_refresh_token_raises_one_operations_alert_and_the_sensor_waits(tmp_path, monkeypatch):
    firm = Firm(tmp_path, monkeypatch, expires_in=60)  # < 5 min left: every pull refreshes first
    try:
        firm.authorize()
        old = SATURDAY_4AM.timestamp()
        os.utime(firm.token_file, (old, old))  # authorized long before the failure
        firm.api.revoke_refresh_tokens()  # the refresh token expired at the custodian

        [request] = firm.api_sensor(SATURDAY_6AM)
        failed = firm.run(request.run_config)
        assert not failed.success
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
        assert "'custodian-api' needs to be authorized again" in failure.event_specific_data.error.message
        assert not (firm.root / "feeds" / AS_OF.isoformat()).exists()
        assert firm.run(request.run_config).success is False  # tried again: still one alert

        store = WorkflowStore(firm.store_url)
        try:
            with store.begin() as conn:
                alerts = conn.execute(select(notifications).where(
                    notifications.c.notification_key == reauthorization_key("custodian-api", AS_OF))).mappings().all()
                events = conn.execute(select(audit_events.c.kind).where(
                    audit_events.c.subject_id == "custodian-api")).scalars().all()
        finally:
            store.dispose()
        assert len(alerts) == 1 and alerts[0]["kind"] == "operations_alert"
        assert "secret" not in alerts[0]["payload"] and "s3cret" not in alerts[0]["payload"]
        assert events.count("reauthorization_needed") == 1
        # The comms sensors email it to operations (tested in comms/test_operations_alerts.py).
        mailer = build_operations_alerts_sensor(clock=lambda: SATURDAY_6AM)
        assert [r.run_key for r in mailer(build_sensor_context(resources=firm.resources)).run_requests] == [
            reauthorization_key("custodian-api", AS_OF)]

        assert "waiting for re-authorization" in firm.api_sensor(SATURDAY_6AM).skip_message
        firm.authorize()  # the operator signs in again: a new token file
        [again] = firm.api_sensor(SATURDAY_6AM)
        assert firm.run(again.run_config).success
        assert (firm.root / "home" / "inbound" / "custodian-api" / "canonical" / AS_OF.isoformat()).is_dir()
    finally:
        firm.close()


def test_an_authorization_answer_must_carry_the_pending_state_once(firm):
    url = start_authorization(firm.api_connection)
    code = parse_qs(urlsplit(httpx.get(url, follow_redirects=False).headers["location"]).query)["code"][0]
    with pytest.raises(AuthorizationError, match="state does not match"):
        finish_authorization(firm.api_connection, code, "forged-state")
    state = parse_qs(urlsplit(url).query)["state"][0]
    finish_authorization(firm.api_connection, code, state)
    with pytest.raises(AuthorizationError, match="no authorization of custodian-api is pending"):
        finish_authorization(firm.api_connection, code, state)  # the state is used once
