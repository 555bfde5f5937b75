"""Operations alerts end to end: recorded once in the workflow store (workflow/operations_alerts.py),
found by the `operations_alerts` sensor under Dagster's sensor daemon ticking in this process
(run keys deduplicated as in a deployment, injected clock), emailed by the `send_notification`
run to a real SMTP server (aiosmtpd on 127.0.0.1), exactly once; the workflow store on SQLite and
on Postgres.

What a user would see: the email the operations team receives (to whom, what it says, what to
do), the rows of wf_notifications and wf_messages, and the audit chain."""

import json
import logging
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from dagster import Definitions, EnvVar, in_process_executor, instance_for_test
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget, create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from sqlalchemy import select

from rebal_pipeline import settings
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline.connections.config import Connection
from rebal_pipeline.connections.deadlines import late_feeds, record_late_feed
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.comms.jobs import communicate_execution, send_advisor_alert, send_notification
from rebal_pipeline.defs.comms.sensors import build_operations_alerts_sensor, build_outbound_retries_sensor
from rebal_pipeline.resources import (
    ApprovalClockResource, CrmResource, DriftPolicySource, EmailResource, LinksResource, Warehouse,
    WorkflowStoreResource,
)
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert, read_operations_alert
from rebal_pipeline.workflow.schema import audit_events, notifications
from rebal_pipeline_tests.approvals.conftest import USERS
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.comms.peers import smtp_server
from rebal_pipeline_tests.comms.reading import read_html
from rebal_pipeline_tests.comms.test_artefacts import OUTPUT, _write
from rebal_pipeline_tests.comms.test_comms_jobs import (
    CLOCK, DOMAIN, STORE_URL_VAR, WAREHOUSE_VAR, SensorDaemon, audit_kinds, mails, message_rows, statuses,
)

NY = ZoneInfo("America/New_York")
OPERATIONS = next(u for u in USERS if u["role"] == "operations")  # OPS-1, ops@example-ria.com
SCHWAB = Connection(name="schwab-main", firm="example-ria", custodian="schwab", dialect="canonical",
                    kind="drop_folder", expected_by="07:30")
MONDAY_0800 = datetime(2026, 11, 23, 8, 0, tzinfo=NY)  # the files of Friday 2026-11-20 are due
ARRIVED = ("lots.csv", "prices.csv")  # everything else of the day's feed is in the folder

# The code location the in-process daemon loads (this module, by name): the operations alerts
# sensor and the retries sensor with the injected clock (SensorDaemon.tick sets CLOCK["now"]).
operations_definitions = Definitions(
    jobs=[send_advisor_alert, send_notification, communicate_execution],
    sensors=[build_operations_alerts_sensor(clock=lambda: CLOCK["now"]),
             build_outbound_retries_sensor(clock=lambda: CLOCK["now"])],
    resources={"workflow_store": WorkflowStoreResource(url=EnvVar(STORE_URL_VAR)),
               "warehouse": Warehouse(database=EnvVar(WAREHOUSE_VAR)),
               "email": EmailResource(), "crm": CrmResource(), "links": LinksResource(),
               "approval_clock": ApprovalClockResource(), "drift_policy_source": DriftPolicySource()},
    executor=in_process_executor,
)


@pytest.fixture
def smtp_peer():
    with smtp_server() as peer:
        yield peer


@pytest.fixture
def daemon(store, tmp_path, monkeypatch, smtp_peer):  # noqa: F811
    # The sensors' code location reads the store and the warehouse from these two test variables.
    for name, value in {STORE_URL_VAR: store.url, WAREHOUSE_VAR: str(tmp_path / "warehouse.duckdb")}.items():
        monkeypatch.setenv(name, value)
    deployment = {"REBAL_HOME": str(tmp_path / "rebal_home"), "REBAL_WORKFLOW_DB_URL": store.url,
                  "REBAL_WAREHOUSE": str(tmp_path / "warehouse.duckdb"), "REBAL_SMTP_HOST": smtp_peer.host,
                  "REBAL_SMTP_PORT": str(smtp_peer.port), "REBAL_SMTP_STARTTLS": "false",
                  "REBAL_SMTP_FROM": f"Example RIA <alerts@{DOMAIN}>", "REBAL_SMTP_TIMEOUT": "5"}
    with instance_for_test() as instance:
        target = InProcessTestWorkspaceLoadTarget(InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name=__name__, attribute="operations_definitions",
                                 working_directory=str(settings.REPO_ROOT)),
            location_name="operations_alerts_test"))
        with create_test_daemon_workspace_context(target, instance) as workspace:
            yield SensorDaemon(instance, workspace, deployment)


def late_schwab_feed(feed_root):
    """Friday's folder with every file but lots.csv and prices.csv, past the 07:30 deadline."""
    folder = feed_root / "2026-11-20"
    folder.mkdir(parents=True)
    for spec in FEED_FILES.values():
        if spec.filename not in ARRIVED:
            (folder / spec.filename).write_text("header\n")
    [late] = late_feeds([SCHWAB], feed_root, MONDAY_0800)
    return late


def save_rendered(name: str, mail) -> None:
    """For checking by eye, next to the other rendered emails (output/ is git-ignored)."""
    OUTPUT.mkdir(exist_ok=True)
    _write(OUTPUT / f"{name}.eml", mail.as_bytes())
    _write(OUTPUT / f"{name}.html", mail.get_body(("html",)).get_content().encode("utf-8"))
    _write(OUTPUT / f"{name}.txt", mail.get_body(("plain",)).get_content().encode("utf-8"))


def bodies(mail) -> tuple[str, str]:
    """(plain text, the HTML's visible text as a mail client shows it)."""
    return mail.get_body(("plain",)).get_content(), read_html(mail.get_body(("html",)).get_content()).text


def test_a_late_feed_is_emailed_once_to_operations_with_the_connection_date_and_missing_files(
        store, daemon, smtp_peer, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="rebal")
    late = late_schwab_feed(tmp_path / "feeds")
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, MONDAY_0800)
        assert record_late_feed(conn, late, MONDAY_0800)  # what the feed_deadlines sensor does
    key = "feed_late:schwab-main:2026-11-20"

    daemon.start("operations_alerts", "outbound_retries")
    first = daemon.tick(MONDAY_0800 + timedelta(minutes=1), "operations_alerts")
    again = daemon.tick(MONDAY_0800 + timedelta(minutes=2), "operations_alerts")
    [run] = daemon.runs("operations_alerts")
    assert run.tags["dagster/run_key"] == key and run.job_name == "send_notification"
    assert run.tags["rebal/message"] == "operations_alert"
    assert len(first.run_ids) == 1 and again.status == TickStatus.SKIPPED and again.run_keys == [key]

    # Executed twice (a re-execution from the UI): one email.
    results = [daemon.execute(run) for _ in range(2)]
    assert [statuses(r) for r in results] == [["sent"], ["already_sent"]]
    [mail] = mails(smtp_peer)
    save_rendered("operations_alert_feed_late", mail)
    assert smtp_peer.messages[0].rcpt_tos == [OPERATIONS["email"]]
    assert mail["Subject"] == ("[rebal operations] schwab-main: the files for 2026-11-20 are late "
                               "(missing lots.csv, prices.csv)")
    assert mail["Message-ID"] == make_message_id(key, DOMAIN) and mail["X-Rebal-Reference"] == key
    text, page = bodies(mail)
    for body in (text, page):
        assert "Custodian files are late" in body and OPERATIONS["name"] in body
        assert "schwab-main" in body and "20 Nov 2026" in body
        assert "lots.csv, prices.csv" in body and "positions.csv" not in body
        assert "SFTP" in body and "re-authorize" not in body.lower()
    assert "Missing files: lots.csv, prices.csv" in text.splitlines()
    assert "Missing files | lots.csv, prices.csv |" in page.splitlines()
    assert "Connection | schwab-main |" in page.splitlines() and "As-of date | 20 Nov 2026 |" in page.splitlines()

    # Sent: later ticks of either sensor ask for nothing, and nothing more reaches the relay.
    assert daemon.tick(MONDAY_0800 + timedelta(hours=1), "operations_alerts").status == TickStatus.SKIPPED
    assert daemon.tick(MONDAY_0800 + timedelta(hours=1), "outbound_retries").status == TickStatus.SKIPPED
    assert statuses(daemon.execute(run)) == ["already_sent"]
    assert len(daemon.runs("operations_alerts")) == 1 and len(smtp_peer.messages) == 1

    row = message_rows(store)[key]
    assert (row["kind"], row["status"], row["attempts"], row["recipient_id"]) == \
        ("operations_alert", "sent", 1, "OPS-1")
    assert row["external_id"] == mail["Message-ID"]
    kinds = audit_kinds(store)
    assert kinds.count("feed_late") == 1 and kinds.count("operations_alert_sent") == 1
    # The operations user's address went to the relay only: not to a log or the run's record.
    metadata = json.dumps([str(e) for r in results for e in r.all_events])
    assert key in caplog.text and key in metadata
    assert OPERATIONS["email"] not in caplog.text and OPERATIONS["email"] not in metadata


def test_the_same_operations_alert_raised_twice_is_recorded_once(store):  # noqa: F811
    now = MONDAY_0800
    alert = dict(key="reauthorization_needed:fidelity-api:2026-11-23", alert="reauthorization_needed",
                 summary="fidelity-api: the custodian refused the refresh token; the connection must be "
                         "re-authorized.",
                 details={"token_endpoint": "https://api.custodian.example/oauth/token", "http_status": 400},
                 connection="fidelity-api", as_of=date(2026, 11, 20))
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, now)
        assert raise_operations_alert(conn, now=now, **alert) is True
        assert raise_operations_alert(conn, now=now + timedelta(minutes=10), **alert) is False
        [row] = conn.execute(select(notifications)).mappings().all()
        events = conn.execute(select(audit_events).where(audit_events.c.kind == "reauthorization_needed")).all()
        recorded = read_operations_alert(conn, alert["key"])
        assert audit.verify(conn).ok
    assert (row["kind"], row["recipient_id"], row["recommendation_id"]) == ("operations_alert", "OPS-1", None)
    assert json.loads(row["payload"]) == {
        "alert": "reauthorization_needed", "summary": alert["summary"], "connection": "fidelity-api",
        "as_of": "2026-11-20", "details": {"http_status": 400,
                                           "token_endpoint": "https://api.custodian.example/oauth/token"}}
    assert len(events) == 1 and events[0].actor == "rebal:operations" and events[0].subject_id == "fidelity-api"
    assert (recorded.alert, recorded.as_of, recorded.details["http_status"]) == ("reauthorization_needed",
                                                                                  date(2026, 11, 20), 400)


def test_a_reauthorization_alert_tells_operations_to_re_authorize_the_connection(
        store, daemon, smtp_peer):  # noqa: F811
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, MONDAY_0800)
        raise_operations_alert(
            conn, key="reauthorization_needed:fidelity-api:2026-11-23", alert="reauthorization_needed",
            summary="fidelity-api: the custodian no longer accepts the connection's refresh token.",
            details={"accounts_affected": 412}, now=MONDAY_0800, connection="fidelity-api")
    daemon.start("operations_alerts")
    daemon.tick(MONDAY_0800 + timedelta(minutes=1), "operations_alerts")
    [run] = daemon.runs("operations_alerts")
    assert statuses(daemon.execute(run)) == ["sent"]
    [mail] = mails(smtp_peer)
    save_rendered("operations_alert_reauthorization_needed", mail)
    assert mail["Subject"] == ("[rebal operations] fidelity-api: the custodian no longer accepts the connection's "
                               "refresh token.")
    for body in bodies(mail):
        assert "A custodian connection needs to be re-authorized" in body
        assert "rebal connections authorize <connection>" in body
        assert "Accounts affected" in body and "412" in body and "fidelity-api" in body
        assert "SFTP" not in body  # the late-feed guidance is not mixed in
    assert "As-of date: \u2014" in bodies(mail)[0].splitlines()  # no date given: shown as not applicable


def test_an_alert_raised_before_any_operations_user_is_on_file_waits_and_reaches_the_one_added_later(
        store, daemon, smtp_peer, tmp_path):  # noqa: F811
    late = late_schwab_feed(tmp_path / "feeds")
    with store.begin() as conn:
        lifecycle.sync_users(conn, [u for u in USERS if u["role"] != "operations"], MONDAY_0800)
        assert record_late_feed(conn, late, MONDAY_0800)
    daemon.start("operations_alerts", "outbound_retries")
    t = MONDAY_0800 + timedelta(minutes=1)
    daemon.tick(t, "operations_alerts")
    [run] = daemon.runs("operations_alerts")
    result = daemon.execute(run)
    assert result.success and statuses(result) == ["retry"] and smtp_peer.messages == []
    row = message_rows(store)[late.notification_key]
    assert row["last_error"] == "no active operations user in the workflow store (users.csv role operations)"

    # The operations user is added (users.csv); the retry, when due, sends to them.
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, t + timedelta(minutes=2))
    daemon.tick(t + timedelta(minutes=5), "outbound_retries")
    [retry] = daemon.runs("outbound_retries")
    assert retry.tags["dagster/run_key"].startswith(f"retry:{late.notification_key}:")
    assert statuses(daemon.execute(retry)) == ["sent"]
    assert smtp_peer.messages[0].rcpt_tos == [OPERATIONS["email"]] and len(smtp_peer.messages) == 1
    assert daemon.tick(t + timedelta(hours=1), "operations_alerts").status == TickStatus.SKIPPED


def test_an_alert_older_than_max_age_is_not_emailed(store, daemon, smtp_peer, tmp_path):  # noqa: F811
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, MONDAY_0800)
        assert record_late_feed(conn, late_schwab_feed(tmp_path / "feeds"), MONDAY_0800)
    daemon.start("operations_alerts")
    assert daemon.tick(MONDAY_0800 + timedelta(days=3, minutes=1), "operations_alerts").status == TickStatus.SKIPPED
    assert daemon.runs("operations_alerts") == [] and smtp_peer.messages == []
