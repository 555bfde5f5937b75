"""The comms sensors and runs end to end, with Dagster's sensor daemon ticking in this process
(so run keys are deduplicated as in a deployment, with an injected clock), runs executed in
process, and real peers: an SMTP server (aiosmtpd), a CRM HTTP server and the approval API
(uvicorn) on 127.0.0.1; the workflow store on SQLite and on Postgres; client names and emails in a
DuckDB warehouse.

What a user would see: the emails received (who, what numbers, links that work), the notes and
tasks at the CRM, the rows of wf_messages and the audit chain."""

import json
import logging
from datetime import datetime, timedelta, timezone

import duckdb
import httpx
import pytest
from dagster import DagsterInstance, Definitions, EnvVar, in_process_executor, instance_for_test
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.dagster_run import DagsterRun, RunsFilter
from dagster._core.storage.tags import SENSOR_NAME_TAG
from dagster._core.test_utils import (
    InProcessTestWorkspaceLoadTarget, create_test_daemon_workspace_context, freeze_time, load_remote_repo,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.sensor import execute_sensor_iteration
from sqlalchemy import insert, select, update

from rebal_pipeline import settings
from rebal_pipeline.approval_api.app import create_app
from rebal_pipeline.approval_api.testing import running_server
from rebal_pipeline.comms.emails import SIMPLE_CONFIRMATION
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline.defs.approvals.jobs import NotificationConfig, notify_recommendation
from rebal_pipeline.defs.comms import defs as comms_defs
from rebal_pipeline.defs.comms.jobs import communicate_execution, send_advisor_alert, send_notification
from rebal_pipeline.defs.comms.sensors import (
    build_advisor_alerts_sensor, build_executed_recommendations_sensor, build_mailer_outbox_sensor,
    build_outbound_retries_sensor,
)
from rebal_pipeline.resources import (
    ApprovalClockResource, CrmResource, DriftPolicySource, EmailResource, LinksResource, Warehouse,
    WorkflowStoreResource, resources_for,
)
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events, messages, recommendations, submissions
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, USERS, package, publish
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.comms.peers import CrmPeer, Reply, crm_server, smtp_server
from rebal_pipeline_tests.comms.reading import parse, read_html

STORE_URL_VAR = "REBAL_TEST_COMMS_STORE_URL"
WAREHOUSE_VAR = "REBAL_TEST_COMMS_WAREHOUSE"
SECRET = "a-comms-test-link-secret-of-at-least-32-bytes"
DOMAIN = "example-ria.com"
ACCOUNT = "ACC-87654321"  # shown as ••••4321
CLIENT = "Avery & Jordan Client"
CLIENT_EMAIL = "avery.client@example.net"
ADVISOR, COMPLIANCE = USERS[0], USERS[2]

CLOCK: dict[str, datetime] = {}

COMMS_JOBS = [send_advisor_alert, send_notification, communicate_execution]

# The code location the in-process daemon loads (this module, by name): the comms jobs and sensors
# with the injected clock; the store and the warehouse the sensors read from the test's
# environment. The runs get their resources from the test's settings (SensorDaemon.execute).
comms_definitions = Definitions(
    jobs=COMMS_JOBS,
    sensors=[build_advisor_alerts_sensor(clock=lambda: CLOCK["now"]),
             build_mailer_outbox_sensor(clock=lambda: CLOCK["now"]),
             build_executed_recommendations_sensor(clock=lambda: CLOCK["now"]),
             build_outbound_retries_sensor(clock=lambda: CLOCK["now"])],
    resources={"workflow_store": WorkflowStoreResource(url=EnvVar(STORE_URL_VAR)),
               "warehouse": Warehouse(database=EnvVar(WAREHOUSE_VAR)),
               "email": EmailResource(), "crm": CrmResource(), "links": LinksResource(),
               "approval_clock": ApprovalClockResource(), "drift_policy_source": DriftPolicySource()},
    executor=in_process_executor,
)


class SensorDaemon:
    """Dagster's sensor daemon, one tick at a time, as `dagster-daemon` runs it: it evaluates the
    started sensors, skips run keys it already launched, queues new runs; `execute` runs one as
    the run worker would, with the resources `resources_for` chooses for `settings` (the REBAL_*
    variables of the deployment under test: tests change them here, never in os.environ)."""

    def __init__(self, instance: DagsterInstance, workspace, settings: dict[str, str] | None = None):
        self.instance, self.workspace = instance, workspace
        self.repo = load_remote_repo(workspace, "__repository__")
        self._wall = datetime.now(timezone.utc)
        self.settings: dict[str, str] = dict(settings or {})

    def start(self, *names: str) -> None:
        for name in names:
            self.instance.start_sensor(self.repo.get_sensor(name))

    def tick(self, at: datetime, sensor_name: str):
        CLOCK["now"] = at
        self._wall += timedelta(hours=1)  # past any minimum interval
        with freeze_time(self._wall):
            list(execute_sensor_iteration(self.workspace, logging.getLogger("test_comms_daemon"), None, None))
        sensor = self.repo.get_sensor(sensor_name)
        return self.instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id, limit=1)[0]

    def runs(self, sensor_name: str) -> list[DagsterRun]:
        return sorted(self.instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: sensor_name})),
                      key=lambda r: r.tags["dagster/run_key"])

    def execute(self, run: DagsterRun):
        resources = resources_for(settings.load_settings(self.settings))
        definitions = Definitions(jobs=COMMS_JOBS, resources=resources, executor=in_process_executor)
        job = definitions.resolve_job_def(run.job_name)
        return job.execute_in_process(run_config=run.run_config, instance=self.instance)


def write_clients(path, rows: list[tuple[str, str, str, str]], confirmation_style: str | None = None) -> None:
    """stg_feed_accounts and stg_feed_households as the daily run materialises them (the columns
    comms reads)."""
    con = duckdb.connect(str(path))
    try:
        con.execute("create table if not exists stg_feed_accounts (as_of date, _line integer, account_id varchar, "
                    "household_id varchar, client_name varchar, client_email varchar)")
        con.execute("create table if not exists stg_feed_households (as_of date, household_id varchar, "
                    "confirmation_style varchar)")
        con.executemany("insert into stg_feed_accounts values (?, 1, ?, ?, ?, ?)",
                        [[PUBLISHED_AT.date(), *r] for r in rows])
        con.execute("delete from stg_feed_households")
        con.executemany("insert into stg_feed_households values (?, ?, ?)",
                        [[PUBLISHED_AT.date(), h, confirmation_style] for h in sorted({r[1] for r in rows})])
    finally:
        con.close()


@pytest.fixture
def smtp_peer():
    with smtp_server() as peer:
        yield peer


@pytest.fixture
def daemon(store, tmp_path, monkeypatch, smtp_peer):
    warehouse = tmp_path / "warehouse.duckdb"
    write_clients(warehouse, [(ACCOUNT, "HH-1", CLIENT, CLIENT_EMAIL),
                              ("ACC-2", "HH-2", "Sam Client", "sam.client@example.net")])
    # The sensors' code location reads the store and the warehouse from these two test variables;
    # the approval runs (notify) keep their outbox copies under REBAL_HOME.
    for name, value in {STORE_URL_VAR: store.url, WAREHOUSE_VAR: str(warehouse),
                        "REBAL_HOME": str(tmp_path / "rebal_home")}.items():
        monkeypatch.setenv(name, value)
    deployment = {"REBAL_HOME": str(tmp_path / "rebal_home"), "REBAL_WORKFLOW_DB_URL": store.url,
                  "REBAL_WAREHOUSE": str(warehouse), "REBAL_SMTP_HOST": smtp_peer.host,
                  "REBAL_SMTP_PORT": str(smtp_peer.port), "REBAL_SMTP_STARTTLS": "false",
                  "REBAL_SMTP_FROM": f"Example RIA <alerts@{DOMAIN}>", "REBAL_SMTP_TIMEOUT": "5",
                  "REBAL_LINK_SECRET": SECRET}
    with instance_for_test() as instance:
        target = InProcessTestWorkspaceLoadTarget(InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name=__name__, attribute="comms_definitions",
                                 working_directory=str(settings.REPO_ROOT)),
            location_name="comms_test"))
        with create_test_daemon_workspace_context(target, instance) as workspace:
            yield SensorDaemon(instance, workspace, deployment)


def use_redtail(daemon: SensorDaemon, peer: CrmPeer, attempts: int = 1) -> None:
    daemon.settings.update({"REBAL_REDTAIL_BASE_URL": peer.url + "/crm/v1/rest", "REBAL_REDTAIL_API_KEY": "api-key-123",
                            "REBAL_REDTAIL_USER_KEY": "user-key-456", "REBAL_CRM_MAX_ATTEMPTS": str(attempts)})


def mails(peer) -> list:
    return [parse(m.data) for m in peer.messages]


def message_rows(store) -> dict[str, dict]:
    with store.begin() as conn:
        return {r["message_key"]: dict(r) for r in conn.execute(select(messages)).mappings()}


def audit_kinds(store) -> list[str]:
    with store.begin() as conn:
        assert audit.verify(conn).ok
        return [r.kind for r in conn.execute(select(audit_events.c.kind).order_by(audit_events.c.seq))]


def statuses(result) -> list[str]:
    [output] = [e for e in result.all_node_events if e.is_successful_output]
    return [m["status"] for m in output.step_output_data.metadata["messages"].value]


def notify(store, kind: str, key: str, due_at: datetime, **ids) -> None:
    """The approval run that records a notification and posts it to the outbox (defs/approvals)."""
    config = NotificationConfig(kind=kind, notification_key=key, due_at=due_at.isoformat(), **ids)
    result = notify_recommendation.execute_in_process(
        run_config={"ops": {"record_and_post_notification": {"config": config.model_dump()}}},
        resources={"workflow_store": WorkflowStoreResource(url=store.url)})
    assert result.success


def approve_and_execute(store, recommendation_id: str, orders: list[tuple[str, str, str, float]], done: bool,
                        at: datetime, channel: str = "submitted") -> str:
    """An approval, and its orders in wf_submissions as ticketing writes them (one row per ClOrdID)."""
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, recommendation_id, ADVISOR, "approve", at,
                                       reason="trades match the IPS; client agreed")
        for number, (account, side, symbol, quantity) in enumerate(orders, 1):
            conn.execute(insert(submissions).values(
                cl_ord_id=f"{decision['decision_id'][:8]}-{number}", decision_id=decision["decision_id"],
                recommendation_id=recommendation_id, account_id=account, custodian="schwab", symbol=symbol, side=side,
                quantity=quantity, channel=channel, status="done" if done else "pending", created_at=at,
                completed_at=at + timedelta(minutes=5) if done else None))
    return decision["decision_id"]


# ---------------------------------------------------------------------------------------------
# The advisor's alert
# ---------------------------------------------------------------------------------------------


def test_the_advisor_alert_arrives_once_with_its_numbers_and_links_that_approve_through_the_api(
        store, daemon, smtp_peer, caplog):
    caplog.set_level(logging.INFO, logger="rebal")
    publish(store, package("REC-1", account_id=ACCOUNT))
    app = create_app(store, SECRET.encode(), clock=lambda: PUBLISHED_AT + timedelta(hours=2))
    with crm_server() as crm, running_server(app) as api:
        use_redtail(daemon, crm)
        daemon.settings["REBAL_PUBLIC_URL"] = api
        daemon.start("advisor_alerts")
        first = daemon.tick(PUBLISHED_AT + timedelta(minutes=1), "advisor_alerts")
        again = daemon.tick(PUBLISHED_AT + timedelta(minutes=2), "advisor_alerts")
        [run] = daemon.runs("advisor_alerts")
        assert run.tags["dagster/run_key"] == "alert:REC-1" and run.job_name == "send_advisor_alert"
        assert len(first.run_ids) == 1 and again.status == TickStatus.SKIPPED and again.run_keys == ["alert:REC-1"]

        # Executed twice (a re-execution from the UI): one email, one CRM task.
        results = [daemon.execute(run) for _ in range(2)]
        assert [statuses(r) for r in results] == [["sent", "sent"], ["already_sent", "already_sent"]]
        [mail] = mails(smtp_peer)
        assert smtp_peer.messages[0].rcpt_tos == [ADVISOR["email"]]
        assert mail["Message-ID"] == make_message_id("alert:REC-1:ADV-1", DOMAIN)
        assert mail["Subject"] == f"Rebalance needed: {CLIENT}, ••••4321 (Equity +10.00% vs. ±5.00% band)"
        text = mail.get_body(("plain",)).get_content()
        page = read_html(mail.get_body(("html",)).get_content())
        for body in (text, page.text):
            assert CLIENT in body and "••••4321" in body and ACCOUNT not in body
            assert "70.00%" in body and "60.00%" in body and "+10.00%" in body and "-10.00%" in body
            assert "VTI" in body and "BND" in body and "$1,000.00" in body
        assert "Sell | 10 | VTI | $1,000.00 | Rebalance |" in page.text.splitlines()
        assert [p.get_content_type() for p in mail.walk()].count("image/png") == 1  # the drift chart

        # The links: the approval API's own, signed for this advisor and recommendation.
        links = sorted(set(page.links))
        assert len(links) == 4 and all(link.startswith(f"{api}/links/") for link in links)
        with httpx.Client(timeout=10) as client:
            views = {client.get(link).json()["action"]: link for link in links}
            assert set(views) == {"approve", "review", "defer", "escalate"}
            review = client.get(views["review"])
            assert review.status_code == 200 and review.json()["package"]["recommendation_id"] == "REC-1"
            approved = client.post(views["approve"])
            assert approved.status_code == 201
            assert approved.json()["decision"]["actor_id"] == "ADV-1" and approved.json()["decision"]["via"] == "link"
            assert client.post(views["approve"]).status_code == 410  # single use

        [task] = crm.on("/crm/v1/rest/activities")
        assert task.json()["assigned_to"] == "ADV-1" and task.json()["subject"] == \
            "Review rebalancing recommendation REC-1"
        assert task.json()["contact_id"] == "HH-1" and task.json()["due_date"] == "2026-11-21T21:30:00Z"

    rows = message_rows(store)
    assert {k: (r["status"], r["attempts"]) for k, r in rows.items()} == {
        "alert:REC-1:ADV-1": ("sent", 1), "crm_task:REC-1": ("sent", 1)}
    assert rows["alert:REC-1:ADV-1"]["external_id"] == mail["Message-ID"]
    assert [k for k in audit_kinds(store) if k.endswith("_sent")] == ["alert_sent", "crm_task_sent"]
    # Decided: the sensor asks for nothing more, and no client PII reached a log or the run's record.
    assert daemon.tick(PUBLISHED_AT + timedelta(hours=3), "advisor_alerts").status == TickStatus.SKIPPED
    metadata = json.dumps([str(e) for r in results for e in r.all_events])
    assert "alert:REC-1:ADV-1" in metadata and "alert:REC-1:ADV-1" in caplog.text  # both were looked at
    for secret in (CLIENT, CLIENT_EMAIL, ADVISOR["email"], SECRET):
        assert secret not in caplog.text and secret not in metadata


def test_a_weekly_batch_recommendation_gets_no_alert_of_its_own_and_the_digest_covers_it(
        store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT, delivery="weekly_batch"),
            package("REC-2", account_id="ACC-2"))
    daemon.start("advisor_alerts", "mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(minutes=1), "advisor_alerts")
    assert [r.tags["dagster/run_key"] for r in daemon.runs("advisor_alerts")] == ["alert:REC-2"]

    # Launched by hand anyway, the alert job sends nothing for it (and says why, in the audit trail).
    result = send_advisor_alert.execute_in_process(
        run_config={"ops": {"deliver_advisor_alert": {"config": {"recommendation_id": "REC-1"}}}},
        instance=daemon.instance, resources=comms_definitions.resources)
    assert statuses(result) == ["skipped"] and smtp_peer.messages == []
    assert "alert_skipped" in audit_kinds(store)

    # The weekly digest (approval_escalations → notify_recommendation → outbox file) is emailed once.
    notify(store, "weekly_digest", "weekly_digest:ADV-1:2026-W47", PUBLISHED_AT + timedelta(minutes=30),
           advisor_id="ADV-1", recommendation_ids=["REC-1"])
    daemon.tick(PUBLISHED_AT + timedelta(minutes=31), "mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(minutes=32), "mailer_outbox")
    [run] = daemon.runs("mailer_outbox")
    assert run.tags["dagster/run_key"] == "weekly_digest:ADV-1:2026-W47"
    assert [statuses(daemon.execute(run)) for _ in range(2)] == [["sent"], ["already_sent"]]
    [digest] = mails(smtp_peer)
    assert digest["To"] == ADVISOR["email"]
    assert digest["Subject"] == "Weekly rebalancing digest — 1 recommendation, week ending 20 Nov 2026"
    text = digest.get_body(("plain",)).get_content()
    assert CLIENT in text and "••••4321" in text and "Equity +10.00% vs. ±5.00% band" in text
    assert "/links/" in text


# ---------------------------------------------------------------------------------------------
# Reminders and escalations from the approval outbox
# ---------------------------------------------------------------------------------------------


def test_reminder_and_escalation_from_the_outbox_are_emailed_once_each_to_advisor_and_compliance(
        store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    daemon.start("advisor_alerts", "mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(minutes=1), "advisor_alerts")
    [alert_run] = daemon.runs("advisor_alerts")
    assert daemon.execute(alert_run).success

    clock = PUBLISHED_AT.isoformat()
    reminder_key, escalation_key = (f"reminder:account:{ACCOUNT}:rebalance:{clock}",
                                    f"escalation:account:{ACCOUNT}:rebalance:{clock}")
    notify(store, "reminder", reminder_key, PUBLISHED_AT + timedelta(hours=24), recommendation_id="REC-1")
    daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=1), "mailer_outbox")
    [reminder_run] = daemon.runs("mailer_outbox")
    assert reminder_run.tags["dagster/run_key"] == reminder_key
    assert [statuses(daemon.execute(reminder_run)) for _ in range(2)] == [["sent"], ["already_sent"]]

    notify(store, "escalation", escalation_key, PUBLISHED_AT + timedelta(hours=48), recommendation_id="REC-1")
    daemon.tick(PUBLISHED_AT + timedelta(hours=48, minutes=1), "mailer_outbox")
    escalation_run = next(r for r in daemon.runs("mailer_outbox") if r.tags["dagster/run_key"] == escalation_key)
    assert statuses(daemon.execute(escalation_run)) == ["sent"]
    # Both handled: later ticks request nothing.
    assert daemon.tick(PUBLISHED_AT + timedelta(hours=49), "mailer_outbox").status == TickStatus.SKIPPED
    assert len(daemon.runs("mailer_outbox")) == 2

    alert, reminder, escalation = mails(smtp_peer)
    assert [m["To"] for m in (alert, reminder, escalation)] == [ADVISOR["email"], ADVISOR["email"],
                                                                 COMPLIANCE["email"]]
    assert reminder["Subject"] == f"Reminder — rebalance needed: {CLIENT}, ••••4321"
    assert reminder["In-Reply-To"] == alert["Message-ID"]  # threads under the alert
    assert reminder["Message-ID"] == make_message_id(reminder_key, DOMAIN)
    reminder_text = reminder.get_body(("plain",)).get_content()
    assert "Alerted 20 Nov 2026 21:30 UTC" in reminder_text and "22 Nov 2026 21:30 UTC" in reminder_text
    reminder_links = set(read_html(reminder.get_body(("html",)).get_content()).links)
    alert_links = set(read_html(alert.get_body(("html",)).get_content()).links)
    assert len(reminder_links) == 4 and not reminder_links & alert_links  # fresh links: each is single-use
    assert escalation["Subject"] == (f"Escalation: no decision for 48h — Dana Advisor (ADV-1), {CLIENT}, ••••4321")
    escalation_text = escalation.get_body(("plain",)).get_content()
    assert "Chris Compliance" in escalation_text and "+10.00%" in escalation_text
    assert [k for k in audit_kinds(store) if k.endswith("_sent")] == ["alert_sent", "reminder_sent", "escalation_sent"]


def test_a_reminder_for_a_recommendation_decided_meanwhile_is_not_sent(store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    key = f"reminder:account:{ACCOUNT}:rebalance:{PUBLISHED_AT.isoformat()}"
    notify(store, "reminder", key, PUBLISHED_AT + timedelta(hours=24), recommendation_id="REC-1")
    with store.begin() as conn:
        lifecycle.decide(conn, "REC-1", ADVISOR, "approve", PUBLISHED_AT + timedelta(hours=24, minutes=1))
    daemon.start("mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=2), "mailer_outbox")
    [run] = daemon.runs("mailer_outbox")
    assert statuses(daemon.execute(run)) == ["skipped"]
    assert smtp_peer.messages == [] and "reminder_skipped" in audit_kinds(store)


# ---------------------------------------------------------------------------------------------
# After execution: client confirmation and CRM note
# ---------------------------------------------------------------------------------------------

ORDERS = [(ACCOUNT, "sell", "VTI", 10.0), (ACCOUNT, "buy", "BND", 20.0)]


def test_the_client_confirmation_goes_once_when_all_orders_are_done_and_no_crm_means_the_note_is_skipped(
        store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    approved_at = PUBLISHED_AT + timedelta(hours=2)
    decision_id = approve_and_execute(store, "REC-1", ORDERS, done=False, at=approved_at)
    daemon.start("executed_recommendations")
    # Orders staged but not all done: nothing yet.
    assert daemon.tick(approved_at + timedelta(minutes=10), "executed_recommendations").status == TickStatus.SKIPPED
    with store.begin() as conn:
        conn.execute(update(submissions).where(submissions.c.decision_id == decision_id).values(
            status="done", completed_at=approved_at + timedelta(minutes=20)))

    daemon.tick(approved_at + timedelta(minutes=21), "executed_recommendations")
    daemon.tick(approved_at + timedelta(minutes=22), "executed_recommendations")
    [run] = daemon.runs("executed_recommendations")
    assert run.tags["dagster/run_key"] == f"executed:{decision_id}"
    assert [statuses(daemon.execute(run)) for _ in range(2)] == [["sent", "skipped"], ["already_sent", "skipped"]]
    assert daemon.tick(approved_at + timedelta(hours=1), "executed_recommendations").status == TickStatus.SKIPPED

    [mail] = mails(smtp_peer)
    assert smtp_peer.messages[0].rcpt_tos == [CLIENT_EMAIL]
    assert mail["Subject"] == "Your Example RIA portfolio has been rebalanced"
    assert mail["Message-ID"] == make_message_id(f"confirmation:{decision_id}:{ACCOUNT}", DOMAIN)
    text = mail.get_body(("plain",)).get_content()
    assert SIMPLE_CONFIRMATION in text and f"Dear {CLIENT}" in text and "••••4321" in text
    assert ACCOUNT not in text and "VTI" not in text  # simple: no trades
    assert "Dana Advisor" in text and "20 Nov 2026" in text
    kinds = audit_kinds(store)
    assert kinds.count("confirmation_sent") == 1 and kinds.count("crm_note_skipped") == 1
    assert message_rows(store)[f"confirmation:{decision_id}:{ACCOUNT}"]["recipient_id"] == ACCOUNT


def test_a_detailed_confirmation_lists_the_trades_when_the_firm_asks_for_it(store, daemon, smtp_peer):
    daemon.settings.update({"REBAL_CLIENT_CONFIRMATION": "detailed", "REBAL_FIRM_NAME": "Harbor & Pine Wealth"})
    publish(store, package("REC-1", account_id=ACCOUNT))
    decision_id = approve_and_execute(store, "REC-1", ORDERS, done=True, at=PUBLISHED_AT + timedelta(hours=2))
    daemon.start("executed_recommendations")
    daemon.tick(PUBLISHED_AT + timedelta(hours=3), "executed_recommendations")
    [run] = daemon.runs("executed_recommendations")
    assert run.tags["dagster/run_key"] == f"executed:{decision_id}" and daemon.execute(run).success
    [mail] = mails(smtp_peer)
    assert mail["Subject"] == "Your Harbor & Pine Wealth portfolio has been rebalanced"
    text = mail.get_body(("plain",)).get_content()
    assert "- Sold 10 VTI at $100.00: $1,000.00" in text and "- Bought 20 BND at $50.00: $1,000.00" in text
    assert "Total sold: $1,000.00" in text


def test_a_crm_outage_leaves_the_note_for_a_retry_blocks_nothing_and_the_retry_writes_one_note(
        store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    executed_at = PUBLISHED_AT + timedelta(hours=2)
    decision_id = approve_and_execute(store, "REC-1", ORDERS, done=True, at=executed_at)
    note_key, notes_path = f"crm_note:{decision_id}", "/crm/v1/rest/contacts/HH-1/notes"
    with crm_server() as crm:
        use_redtail(daemon, crm)
        crm.script(notes_path, *[Reply(503, {"error": "maintenance"})] * 20)
        daemon.start("executed_recommendations", "outbound_retries")
        t = executed_at + timedelta(minutes=10)
        daemon.tick(t, "executed_recommendations")
        [run] = daemon.runs("executed_recommendations")
        result = daemon.execute(run)
        # The run succeeds: the client is told, the note waits; trading state is untouched.
        assert result.success and statuses(result) == ["sent", "retry"]
        note = message_rows(store)[note_key]
        assert (note["status"], note["attempts"]) == ("retry", 1)
        assert note["last_error"] == ("the CRM is unavailable: redtail record_note: unavailable after 1 attempt(s): "
                                      "HTTP 503")
        assert note["next_attempt_at"].replace(tzinfo=timezone.utc) == t + timedelta(minutes=5)
        with store.begin() as conn:
            assert {r.status for r in conn.execute(select(submissions.c.status))} == {"done"}
            assert conn.execute(select(recommendations.c.status)).scalar_one() == "approved"

        # Not due yet; then due while the CRM is still down: retried, and left for later again.
        assert daemon.tick(t + timedelta(minutes=4), "outbound_retries").status == TickStatus.SKIPPED
        daemon.tick(t + timedelta(minutes=5), "outbound_retries")
        [retry_1] = daemon.runs("outbound_retries")
        assert retry_1.tags["dagster/run_key"].startswith(f"retry:executed:{decision_id}:")
        assert statuses(daemon.execute(retry_1)) == ["already_sent", "retry"]
        assert message_rows(store)[note_key]["attempts"] == 2

        # The CRM is back: the next due retry writes the note, once.
        crm.replies[notes_path].clear()
        daemon.tick(t + timedelta(minutes=15), "outbound_retries")
        retry_2 = next(r for r in daemon.runs("outbound_retries") if r.run_id != retry_1.run_id)
        assert statuses(daemon.execute(retry_2)) == ["already_sent", "sent"]
        assert daemon.tick(t + timedelta(hours=8), "outbound_retries").status == TickStatus.SKIPPED

        attempts = crm.on(notes_path)
        assert len(attempts) == 3 and crm._ids == 1  # two refused while down, one note created
        assert len({r.headers["idempotency-key"] for r in attempts}) == 1  # one note, however often asked
        body = attempts[-1].json()
        assert body["note_date"] == "2026-11-20" and body["category"] == "Rebalance"
        assert "Rationale: Rebalance: Equity +10.00% vs. ±5.00% band; approve by ADV-1 via api: trades match " \
               "the IPS; client agreed." in body["body"]
        assert "Trades: Sell 10 VTI; Buy 20 BND" in body["body"]
    assert len(smtp_peer.messages) == 1  # the confirmation was not sent again by the retries
    assert message_rows(store)[note_key]["status"] == "sent"
    assert audit_kinds(store).count("crm_note_retry") == 2 and audit_kinds(store).count("crm_note_sent") == 1


def test_the_comms_definitions_load_with_the_local_resources(tmp_path):
    resources = resources_for(settings.load_settings({"REBAL_HOME": str(tmp_path)}))
    repo = Definitions(jobs=comms_defs.jobs, sensors=comms_defs.sensors, resources=resources).get_repository_def()
    assert set(repo.job_names) >= {"send_advisor_alert", "send_notification", "communicate_execution"}
    intervals = {s.name: s.minimum_interval_seconds for s in repo.sensor_defs}
    assert intervals == {"advisor_alerts": 30, "mailer_outbox": 30, "operations_alerts": 30,
                         "executed_recommendations": 30, "outbound_retries": 60}


def test_orders_only_staged_for_the_trading_desk_send_no_client_confirmation(store, daemon, smtp_peer):
    """Staged orders are placed by the desk later: the client hears nothing until they are."""
    publish(store, package("REC-1", account_id=ACCOUNT))
    approved_at = PUBLISHED_AT + timedelta(hours=2)
    decision_id = approve_and_execute(store, "REC-1", ORDERS, done=True, at=approved_at, channel="staged")
    daemon.start("executed_recommendations")
    assert daemon.tick(approved_at + timedelta(minutes=30), "executed_recommendations").status == TickStatus.SKIPPED
    assert daemon.runs("executed_recommendations") == [] and mails(smtp_peer) == []

    # The desk places them and says so: now the client hears, once.
    from rebal_pipeline.execution.submit import ExecutionError, confirm_executed

    with store.begin() as conn:
        lifecycle.sync_users(conn, [factories.user("TRD-1", "trading_desk", name="Tess Desk",
                                                   email="desk@example-ria.com")], approved_at)
    with pytest.raises(ExecutionError, match="not an active trading-desk"):
        with store.begin() as conn:
            confirm_executed(conn, decision_id, "ADV-1", approved_at + timedelta(hours=1))
    with store.begin() as conn:
        assert confirm_executed(conn, decision_id, "TRD-1", approved_at + timedelta(hours=1)) == 2
        assert confirm_executed(conn, decision_id, "TRD-1", approved_at + timedelta(hours=1)) == 0
    daemon.tick(approved_at + timedelta(hours=1, minutes=1), "executed_recommendations")
    [run] = daemon.runs("executed_recommendations")
    assert daemon.execute(run).success and len(mails(smtp_peer)) == 1


def test_a_household_that_asked_for_details_gets_them_whatever_the_firm_default(store, daemon, smtp_peer, tmp_path):
    assert "REBAL_CLIENT_CONFIRMATION" not in daemon.settings  # the firm default: simple
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    con.execute("update stg_feed_households set confirmation_style = 'detailed' where household_id = 'HH-1'")
    con.close()
    publish(store, package("REC-1", account_id=ACCOUNT))
    approve_and_execute(store, "REC-1", ORDERS, done=True, at=PUBLISHED_AT + timedelta(hours=2))
    daemon.start("executed_recommendations")
    daemon.tick(PUBLISHED_AT + timedelta(hours=3), "executed_recommendations")
    [run] = daemon.runs("executed_recommendations")
    assert daemon.execute(run).success
    [mail] = mails(smtp_peer)
    assert "- Sold 10 VTI at $100.00: $1,000.00" in mail.get_body(("plain",)).get_content()
