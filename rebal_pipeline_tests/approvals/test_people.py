"""People come and go (issue 12, item 7): a user no longer in users.csv is deactivated at the next
users sync (token 401 and links 403 from that moment, audit event), their open recommendations
go to the new advisor of record (audit event, a new alert email, once), `rebal users deactivate`
revokes at once between feeds, and a team that asked for it (users.csv `team_alerts`) receives its
advisor's alerts. Through the real API (uvicorn), the comms sensors and runs (Dagster's sensor
daemon in process) and an SMTP server (aiosmtpd), on SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta

import pytest
from dagster._core.scheduler.instigation import TickStatus
from sqlalchemy import select

from rebal_pipeline import cli
from rebal_pipeline.approval_api.links import read_link_token
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events, recommendations, users
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, USERS, package, publish
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture: SQLite and Postgres)
from rebal_pipeline_tests.approvals.test_api import TEAM_MEMBER, api, assert_error  # noqa: F401 (fixture)
from rebal_pipeline_tests.comms.test_comms_jobs import (  # noqa: F401 (fixtures)
    ACCOUNT, COMPLIANCE, SECRET, daemon, mails, message_rows, smtp_peer, statuses,
)
from rebal_pipeline_tests.comms.reading import read_html

ADV_1, ADV_2 = USERS[0], USERS[1]
WITHOUT_ADV_1 = [u for u in USERS if u["user_id"] != "ADV-1"]
# Today's feed: ADV-1's accounts now belong to ADV-2 (accounts.csv / households.csv advisor_id).
NEW_ADVISORS = {("account", f"ACC-{n}"): "ADV-2" for n in (1, 2, 4, 5)} | {("account", ACCOUNT): "ADV-2"}


def link(api, recommendation_id: str, advisor_id: str, action: str) -> str:
    return api.app.state.issue_links(recommendation_id, advisor_id, actions=(action,))[action]


def events(store, kind: str) -> list[dict]:
    with store.begin() as conn:
        assert audit.verify(conn).ok
        return [dict(r) for r in conn.execute(select(audit_events).where(audit_events.c.kind == kind)
                                              .order_by(audit_events.c.seq)).mappings()]


def advisor_of(store, recommendation_id: str) -> str:
    with store.begin() as conn:
        return conn.execute(select(recommendations.c.advisor_id).where(
            recommendations.c.recommendation_id == recommendation_id)).scalar_one()


# ---------------------------------------------------------------------------------------------
# Removed from users.csv
# ---------------------------------------------------------------------------------------------


def test_a_user_removed_from_users_csv_is_locked_out_and_their_recommendations_go_to_the_new_advisor(api):
    approve_link = link(api, "REC-1", "ADV-1", "approve")
    assert api.get(None, f"/links/{approve_link}").status_code == 200
    assert api.get("ADV-1", "/recommendations").status_code == 200
    assert_error(api.decide("ADV-2", "REC-1", action="approve"), 403)  # not theirs yet
    assert api.decide("ADV-1", "REC-2", action="defer", reason="client on holiday").status_code == 201
    assert api.decide("ADV-1", "REC-4", action="escalate", reason="trust question").status_code == 201
    # Approved but not through the gate yet: the gate will refuse a departed advisor's approval and
    # hand it back, so it is re-routed too (else it would come back to nobody).
    assert api.decide("ADV-1", "REC-5", action="approve").status_code == 201

    # The next feed's users.csv no longer lists ADV-1; their accounts are ADV-2's now.
    later = api.clock.now + timedelta(hours=1)
    with api.store.begin() as conn:
        lifecycle.sync_users(conn, [*WITHOUT_ADV_1, {**TEAM_MEMBER, "team_of": "ADV-2"}], later,
                             advisors_of_record=NEW_ADVISORS)

    # From that moment: the token is refused, and so is every link of theirs.
    assert_error(api.get("ADV-1", "/recommendations"), 401, "not valid")
    assert_error(api.decide("ADV-1", "REC-1", action="approve"), 401)
    refused = assert_error(api.post(None, f"/links/{approve_link}"), 403, "no longer an active user")
    assert "ADV-2" in refused["error"]  # where it went
    assert_error(api.get(None, f"/links/{approve_link}"), 403, "no longer an active user")

    # Their open recommendations are ADV-2's: listed, and ADV-2 may decide them.
    assert [advisor_of(api.store, r) for r in ("REC-1", "REC-2", "REC-4", "REC-5")] == [
        "ADV-2", "ADV-2", "ADV-2", "ADV-2"]
    assert {"REC-1", "REC-3"} <= {i["recommendation_id"] for i in api.get("ADV-2", "/recommendations").json()["items"]}
    assert api.decide("ADV-2", "REC-1", action="approve", reason="taking over the book").status_code == 201
    new_link = link(api, "REC-2", "ADV-2", "approve")
    assert api.post(None, f"/links/{new_link}").status_code == 201  # the new advisor's link is not 403'd
    # REC-4 was escalated by ADV-1: still compliance's, whoever the advisor is now.
    assert_error(api.decide("ADV-2", "REC-4", action="approve"), 403, "escalated to compliance")

    [gone] = events(api.store, "user_deactivated")
    assert (gone["subject_id"], gone["actor"], gone["payload"]) == ("ADV-1", "rebal:feed",
                                                                   '{"reason":"no longer in users.csv"}')
    rerouted = events(api.store, "recommendation_rerouted")
    assert [(e["subject_id"], e["payload"]) for e in rerouted] == [
        (r, '{"from":"ADV-1","reason":"advisor no longer active","to":"ADV-2"}') for r in ("REC-1", "REC-2", "REC-4", "REC-5")]

    # The same feed again changes nothing (no second deactivation or re-route).
    with api.store.begin() as conn:
        lifecycle.sync_users(conn, [*WITHOUT_ADV_1, {**TEAM_MEMBER, "team_of": "ADV-2"}], later + timedelta(days=1),
                             advisors_of_record=NEW_ADVISORS)
    assert len(events(api.store, "user_deactivated")) == 1 and len(events(api.store, "recommendation_rerouted")) == 4

    # Back in users.csv later: active again, but the old token stays dead (a new one is issued).
    with api.store.begin() as conn:
        lifecycle.sync_users(conn, USERS, later + timedelta(days=2))
        row = conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one()
    assert row["active"] and row["api_token_sha256"] is None and row["deactivated_at"] is None
    assert_error(api.get("ADV-1", "/recommendations"), 401)


def test_an_empty_users_list_locks_nobody_out(store):
    publish(store, package("REC-1"))
    with store.begin() as conn, pytest.raises(ValueError, match="users.csv lists nobody"):
        lifecycle.sync_users(conn, [], PUBLISHED_AT)
    with store.begin() as conn:
        assert conn.execute(select(users.c.user_id).where(~users.c.active)).first() is None


# ---------------------------------------------------------------------------------------------
# rebal users deactivate / list
# ---------------------------------------------------------------------------------------------


def test_rebal_users_deactivate_revokes_at_once_and_the_feed_does_not_undo_it(api, monkeypatch, capsys):
    monkeypatch.setenv("REBAL_WORKFLOW_DB_URL", api.store.url)  # `rebal users` (cli.main) reads the environment
    approve_link = link(api, "REC-1", "ADV-1", "approve")
    assert cli.main(["users", "deactivate", "ADV-1", "--reason", "short"]) == 2  # a reason that says why
    assert api.get("ADV-1", "/recommendations").status_code == 200

    assert cli.main(["users", "deactivate", "ADV-1", "--reason", "left the firm today", "--by", "OPS-1"]) == 0
    assert "ADV-1 deactivated" in capsys.readouterr().out
    assert_error(api.get("ADV-1", "/recommendations"), 401)  # at once: no feed in between
    assert_error(api.post(None, f"/links/{approve_link}"), 403, "no longer an active user")
    assert cli.main(["users", "deactivate", "ADV-1", "--reason", "left the firm today"]) == 1  # already
    [event] = events(api.store, "user_deactivated")
    assert (event["actor"], event["payload"]) == ("operations:OPS-1", '{"reason":"left the firm today"}')

    # The next users.csv still lists ADV-1 (HR is slow): they stay out.
    with api.store.begin() as conn:
        lifecycle.sync_users(conn, [*USERS, TEAM_MEMBER], api.clock.now + timedelta(hours=1))
        assert not conn.execute(select(users.c.active).where(users.c.user_id == "ADV-1")).scalar_one()

    capsys.readouterr()
    assert cli.main(["users", "list"]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "INACTIVE" in listing["ADV-1"] and "by operations:OPS-1: left the firm today" in listing["ADV-1"]
    assert " active " in listing["ADV-2"] and "INACTIVE" not in listing["ADV-2"]


# ---------------------------------------------------------------------------------------------
# The emails: the new advisor's alert, the team's copies, the manual escalation
# ---------------------------------------------------------------------------------------------


def test_a_rerouted_recommendation_alerts_its_new_advisor_once(store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    daemon.start("advisor_alerts")
    daemon.tick(PUBLISHED_AT + timedelta(minutes=1), "advisor_alerts")
    [first] = daemon.runs("advisor_alerts")
    assert statuses(daemon.execute(first))[0] == "sent"

    with store.begin() as conn:
        lifecycle.sync_users(conn, WITHOUT_ADV_1, PUBLISHED_AT + timedelta(hours=2), advisors_of_record=NEW_ADVISORS)
    for minutes in (1, 2):  # two ticks, one run
        daemon.tick(PUBLISHED_AT + timedelta(hours=2, minutes=minutes), "advisor_alerts")
    runs = daemon.runs("advisor_alerts")
    assert [r.tags["dagster/run_key"] for r in runs] == ["alert:REC-1", "alert:REC-1:ADV-2"]
    assert [statuses(daemon.execute(runs[1]))[0] for _ in range(2)] == ["sent", "already_sent"]
    assert daemon.tick(PUBLISHED_AT + timedelta(hours=3), "advisor_alerts").status == TickStatus.SKIPPED

    assert [m.rcpt_tos for m in smtp_peer.messages] == [[ADV_1["email"]], [ADV_2["email"]]]
    assert mails(smtp_peer)[1]["To"] == ADV_2["email"]
    rows = message_rows(store)
    assert rows["alert:REC-1:ADV-2"]["status"] == "sent" and rows["alert:REC-1:ADV-2"]["attempts"] == 1


@pytest.mark.parametrize("team_alerts", ["true", "false"])
def test_a_team_that_asked_for_alerts_gets_its_own_copy(store, daemon, smtp_peer, team_alerts):
    publish(store, package("REC-1", account_id=ACCOUNT))
    with store.begin() as conn:
        lifecycle.sync_users(conn, [{**ADV_1, "team_alerts": team_alerts}, *USERS[1:],
                                    {**TEAM_MEMBER, "team_of": "ADV-1"}], PUBLISHED_AT)
    daemon.start("advisor_alerts")
    daemon.tick(PUBLISHED_AT + timedelta(minutes=1), "advisor_alerts")
    [run] = daemon.runs("advisor_alerts")
    assert run.tags["dagster/run_key"] == "alert:REC-1"
    sent = statuses(daemon.execute(run))
    again = statuses(daemon.execute(run))  # re-executed (from the UI): nothing is sent twice
    if team_alerts == "true":
        assert (sent, again) == (["sent", "sent", "skipped"], ["already_sent", "already_sent", "skipped"])
        assert [m.rcpt_tos for m in smtp_peer.messages] == [[ADV_1["email"]], [TEAM_MEMBER["email"]]]
        assert set(message_rows(store)) == {"alert:REC-1:ADV-1", "alert:REC-1:ADV-3"}
        # Each copy carries its reader's own links (a link acts as the person it was sent to).
        advisor_mail, member_mail = mails(smtp_peer)
        assert member_mail["To"] == TEAM_MEMBER["email"] and advisor_mail["To"] == ADV_1["email"]
        for mail, reader in ((advisor_mail, "ADV-1"), (member_mail, "ADV-3")):
            tokens = {url.rsplit("/links/", 1)[1] for url in read_html(mail.get_body(("html",)).get_content()).links}
            assert len(tokens) == 4 and {read_link_token(SECRET.encode(), t, PUBLISHED_AT).advisor_id
                                         for t in tokens} == {reader}
    else:
        assert (sent, again) == (["sent", "skipped"], ["already_sent", "skipped"])
        assert [m.rcpt_tos for m in smtp_peer.messages] == [[ADV_1["email"]]]
        assert set(message_rows(store)) == {"alert:REC-1:ADV-1"}


def test_a_manual_escalation_emails_the_compliance_officer_once(store, daemon, smtp_peer):
    publish(store, package("REC-1", account_id=ACCOUNT))
    escalated_at = PUBLISHED_AT + timedelta(hours=3)
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, "REC-1", ADV_1, "escalate", escalated_at,
                                       reason="client disputes the bond sleeve")
    daemon.start("mailer_outbox")
    for minutes in (1, 2):
        daemon.tick(escalated_at + timedelta(minutes=minutes), "mailer_outbox")
    [run] = daemon.runs("mailer_outbox")
    key = f"escalation:REC-1:{decision['decision_id']}"
    assert run.tags["dagster/run_key"] == key
    assert [statuses(daemon.execute(run)) for _ in range(2)] == [["sent"], ["already_sent"]]
    assert daemon.tick(escalated_at + timedelta(hours=1), "mailer_outbox").status == TickStatus.SKIPPED
    [mail] = mails(smtp_peer)
    assert smtp_peer.messages[0].rcpt_tos == [COMPLIANCE["email"]]
    assert mail["Subject"].startswith("Escalation from Dana Advisor (ADV-1): ")
    assert "client disputes the bond sleeve" in mail.get_body(("plain",)).get_content()


# ---------------------------------------------------------------------------------------------
# Through the daily run: users.csv (team_alerts, a user gone) → the workflow store
# ---------------------------------------------------------------------------------------------


def test_the_daily_run_reads_team_alerts_and_deactivates_who_left_users_csv(workspace, dagster_instance):
    from datetime import date

    from sqlalchemy import create_engine

    from rebal_pipeline_tests.feedkit import AS_OF, FeedBuilder

    def book(as_of: date, advisor: str, with_adv_1: bool) -> FeedBuilder:
        b = FeedBuilder(as_of=as_of)
        b.rows["users"] = [u for u in b.rows["users"] if with_adv_1 or u["user_id"] != "ADV-1"]
        for u in b.rows["users"]:
            if u["user_id"] == "ADV-1":
                u["team_alerts"] = "true"
        b.add("users", user_id="ASSOC-1", name="Ari Associate", email="ari@example-ria.com", role="advisor",
              team_of="ADV-1" if with_adv_1 else "ADV-2")
        b.household("HH-1", advisor_id=advisor)
        b.account("ACC-1")
        b.position("ACC-1", "VTI", 90)
        b.position("ACC-1", "BND", 20)
        return b

    book(AS_OF, "ADV-1", with_adv_1=True).write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    engine = create_engine(workspace.workflow_url)
    with engine.begin() as conn:
        people = {r.user_id: r for r in conn.execute(select(users))}
    assert people["ADV-1"].active and people["ADV-1"].team_alerts is True
    assert people["ADV-2"].team_alerts is None  # not set: off
    with engine.begin() as conn:
        friday = conn.execute(select(recommendations.c.recommendation_id, recommendations.c.advisor_id,
                                     recommendations.c.status)).all()
    assert [(r.advisor_id, r.status) for r in friday] == [("ADV-1", "pending")]  # 90/10 on a 60/40 model

    monday = date(2026, 11, 23)
    book(monday, "ADV-2", with_adv_1=False).write(workspace.feed_root)
    assert workspace.run_day(monday, instance=dagster_instance).success
    with engine.begin() as conn:
        adv_1 = conn.execute(select(users).where(users.c.user_id == "ADV-1")).mappings().one()
        open_recs = conn.execute(select(recommendations.c.advisor_id).where(
            recommendations.c.status.in_(lifecycle.OPEN))).scalars().all()
        kinds = [r.kind for r in conn.execute(select(audit_events.c.kind))]
    engine.dispose()
    assert not adv_1["active"] and adv_1["deactivated_by"] == "rebal:feed"
    assert "user_deactivated" in kinds and "ADV-1" not in open_recs
    # Friday's recommendation went to Monday's advisor of record before Monday's superseded it.
    assert "recommendation_rerouted" in kinds and open_recs == ["ADV-2"]
