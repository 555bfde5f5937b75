"""Reminders, escalations and weekly digests reach the mailer through the workflow store only
(issue #12, item 8): the `wf_notifications` row the approval run commits is what the
`mailer_outbox` sensor finds and `send_notification` sends (exactly once, through wf_messages).
The JSON copy under outbox/notifications/ is for people: no file, a stray file or the remains of a
killed write change nothing, and those remains are removed by the next approval run.

Same harness as test_comms_jobs.py: the sensor daemon ticking in process with an injected clock,
a real SMTP server (aiosmtpd), the store on SQLite and Postgres."""

import fcntl
import json
import shutil
import subprocess
import sys
from datetime import timedelta

from dagster._core.scheduler.instigation import TickStatus
from sqlalchemy import select

from rebal_pipeline import settings
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline.workflow import outbox
from rebal_pipeline.workflow.schema import messages
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, package, publish
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.comms.test_comms_jobs import (  # noqa: F401 (fixtures)
    ACCOUNT, ADVISOR, CLIENT, DOMAIN, daemon, mails, notify, smtp_peer, statuses,
)

REMINDER_KEY = f"reminder:account:{ACCOUNT}:rebalance:{PUBLISHED_AT.isoformat()}"


def outbox_folder():
    return settings.rebal_home() / "outbox" / "notifications"


def notification_path(notification_key: str):
    """Where the approval run writes a notification's copy for people (workflow/outbox.py), in the
    outbox of the REBAL_HOME the daemon fixture set for the runs."""
    return outbox.notification_path(settings.outbox_root(), notification_key)


def test_a_reminder_recorded_in_the_store_is_emailed_once_with_no_outbox_file(store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    notify(store, "reminder", REMINDER_KEY, PUBLISHED_AT + timedelta(hours=24), recommendation_id="REC-1")
    shutil.rmtree(outbox_folder())  # the copy for people is gone: the store still has the reminder

    daemon.start("mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=1), "mailer_outbox")
    [run] = daemon.runs("mailer_outbox")
    assert run.tags["dagster/run_key"] == REMINDER_KEY and run.job_name == "send_notification"
    assert [statuses(daemon.execute(run)) for _ in range(2)] == [["sent"], ["already_sent"]]
    # Sent: later ticks ask for nothing.
    assert daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=2), "mailer_outbox").status == TickStatus.SKIPPED

    [reminder] = mails(smtp_peer)
    assert smtp_peer.messages[0].rcpt_tos == [ADVISOR["email"]]
    assert reminder["Subject"] == f"Reminder — rebalance needed: {CLIENT}, ••••4321"
    assert reminder["Message-ID"] == make_message_id(REMINDER_KEY, DOMAIN)
    with store.begin() as conn:
        row = conn.execute(select(messages).where(messages.c.message_key == REMINDER_KEY)).mappings().one()
    assert (row["status"], row["attempts"], row["kind"]) == ("sent", 1, "reminder")
    assert not outbox_folder().exists()  # nothing was read from, or written to, the folder by the mailer


def test_a_file_in_the_outbox_that_the_store_does_not_hold_is_never_emailed(store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    forged = notification_path("reminder:account:ACC-2:rebalance:x")
    forged.parent.mkdir(parents=True)
    forged.write_text(json.dumps({"format": "rebal.notification/1", "notification_key": "reminder:account:ACC-2:rebalance:x",
                                  "kind": "reminder", "recorded_at": PUBLISHED_AT.isoformat(),
                                  "recipient": {"user_id": "ADV-1"}, "recommendation": {"recommendation_id": "REC-1"}}))
    daemon.start("mailer_outbox")
    tick = daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=1), "mailer_outbox")
    assert tick.status == TickStatus.SKIPPED and daemon.runs("mailer_outbox") == []
    assert smtp_peer.messages == []


def test_the_remains_of_a_killed_write_are_removed_by_the_next_run_and_never_sent(store, daemon, smtp_peer, tmp_path):
    publish(store, package("REC-1", account_id=ACCOUNT), package("REC-2", account_id="ACC-2"))
    folder = outbox_folder()
    folder.mkdir(parents=True)
    # A writer killed mid-write: its locked temporary dot-file, half written, and the process gone.
    abandoned = folder / f".{notification_path(REMINDER_KEY).name}.0123abcd.tmp"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(abandoned)!r}, 'x'); fcntl.flock(h.fileno(), fcntl.LOCK_EX); h.write('{{\"format\": \"reb')\n"
        "h.flush(); print('locked', flush=True); time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "locked"
    # A live writer's file (this process holds its lock): the clean-up must leave it alone.
    in_progress = folder / ".in-progress.json.feedbeef.tmp"
    live = open(in_progress, "x")
    fcntl.flock(live.fileno(), fcntl.LOCK_EX)
    writer.kill()
    writer.wait()

    try:
        # The next approval run (a reminder for another recommendation) removes the dead writer's file only.
        other_key = f"reminder:account:ACC-2:rebalance:{PUBLISHED_AT.isoformat()}"
        notify(store, "reminder", other_key, PUBLISHED_AT + timedelta(hours=24), recommendation_id="REC-2")
        assert not abandoned.exists() and in_progress.exists()
        assert json.loads(notification_path(other_key).read_text())["notification_key"] == other_key
    finally:
        live.close()

    # The mailer sends what the store holds (REC-2's reminder), nothing for the abandoned file.
    daemon.start("mailer_outbox")
    daemon.tick(PUBLISHED_AT + timedelta(hours=24, minutes=1), "mailer_outbox")
    assert [r.tags["dagster/run_key"] for r in daemon.runs("mailer_outbox")] == [other_key]
