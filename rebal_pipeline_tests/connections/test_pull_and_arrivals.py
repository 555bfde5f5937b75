"""The connection sensors' decisions (connections/arrivals.py) and one connection's pull
(connections/pull.py), without Dagster: when an API day is due and in which retry slot, when a
re-authorization is still awaited, which feed folders are complete and changed, and what a pull
that needs a person records."""

import contextlib
import os
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from rebal_pipeline.connections import arrivals, pull
from rebal_pipeline.core import clock
from rebal_pipeline.connections.config import Connection, Connections, OAuthSettings, connections_file
from rebal_pipeline.connections.credentials import custodian_secret
from rebal_pipeline.connections.ingest import Assembly, Delivery
from rebal_pipeline.connections.oauth_api import ReauthorizationNeeded
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline.workflow.schema import notifications
from rebal_pipeline_tests.approvals.conftest import store  # noqa: F401 (fixture)

NY = ZoneInfo("America/New_York")
TUESDAY_0500 = datetime(2026, 11, 24, 5, 0, tzinfo=NY)  # = 10:00 UTC; Monday 2026-11-23 is published


def api_connection(tmp_path, retry_minutes=30) -> Connection:
    return Connection(
        name="fidelity-api", firm="example-ria", custodian="fidelity", dialect="canonical", kind="oauth_api",
        oauth=OAuthSettings(base_url="https://api.custodian.example", token_url="https://api.custodian.example/t",
                            client_id_env="REBAL_TEST_CLIENT_ID", client_secret_env="REBAL_TEST_CLIENT_SECRET",
                            token_file=str(tmp_path / "tokens" / "fidelity-api.bin"), available_from="05:00",
                            retry_minutes=retry_minutes))


def test_an_api_day_is_due_from_its_available_from_time_the_next_morning(tmp_path):
    connection = api_connection(tmp_path)
    assert arrivals.api_pull_due(connection, datetime(2026, 11, 24, 4, 59, tzinfo=NY)) is None
    assert arrivals.api_pull_due(connection, TUESDAY_0500) == date(2026, 11, 23)
    # Saturday morning: Friday's session is the one published (2026-11-20).
    assert arrivals.api_pull_due(connection, datetime(2026, 11, 21, 9, 0, tzinfo=NY)) == date(2026, 11, 20)


def test_one_pull_per_retry_slot_and_none_while_a_reauthorization_is_awaited(store, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))  # connections/ reads the inbound parts' folder there
    connection = api_connection(tmp_path)
    with store.begin() as conn:
        [due], quiet = arrivals.api_pulls_due(conn, [connection], TUESDAY_0500)
        # 2026-11-24T10:00Z is 1 795 514 400 s after the epoch: slot 1 795 514 400 // 1800 = 997 508.
        assert (due.connection.name, due.as_of, due.slot, quiet) == ("fidelity-api", date(2026, 11, 23), 997_508, [])
        [same] = arrivals.api_pulls_due(conn, [connection], datetime(2026, 11, 24, 10, 29, 59, tzinfo=timezone.utc))[0]
        [next_slot] = arrivals.api_pulls_due(conn, [connection], datetime(2026, 11, 24, 10, 30, tzinfo=timezone.utc))[0]
        assert (same.slot, next_slot.slot) == (997_508, 997_509)

        raise_operations_alert(conn, key="reauthorization_needed:fidelity-api:2026-11-23",
                               alert="reauthorization_needed", summary="authorize again", details={},
                               now=TUESDAY_0500, connection="fidelity-api", as_of=date(2026, 11, 23))
        # No token file at all, then one older than the alert: still waiting.
        assert arrivals.api_pulls_due(conn, [connection], TUESDAY_0500) == (
            [], ["fidelity-api: waiting for re-authorization"])
        token_file = tmp_path / "tokens" / "fidelity-api.bin"
        token_file.parent.mkdir()
        token_file.write_bytes(b"encrypted")
        before = TUESDAY_0500.timestamp() - 60
        os.utime(token_file, (before, before))
        assert arrivals.waiting_for_reauthorization(conn, connection, date(2026, 11, 23)) is True
        # An operator authorized again after the alert: the day is pulled again.
        after = TUESDAY_0500.timestamp() + 60
        os.utime(token_file, (after, after))
        assert arrivals.waiting_for_reauthorization(conn, connection, date(2026, 11, 23)) is False
        assert [p.as_of for p in arrivals.api_pulls_due(conn, [connection], TUESDAY_0500)[0]] == [date(2026, 11, 23)]


def test_an_api_day_not_published_yet_is_named_in_the_quiet_lines(store, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))  # connections/ reads the inbound parts' folder there
    with store.begin() as conn:
        assert arrivals.api_pulls_due(conn, [api_connection(tmp_path)], datetime(2026, 11, 24, 4, 0, tzinfo=NY)) == (
            [], ["fidelity-api: not published yet"])


def _complete_folder(root, as_of):
    folder = root / as_of
    folder.mkdir(parents=True)
    for spec in FEED_FILES.values():
        if not spec.optional_file:
            (folder / spec.filename).write_text("header\n")
    return folder


def test_only_complete_as_of_folders_count_and_a_touched_file_changes_the_digest(tmp_path):
    assert arrivals.complete_feed_folders(tmp_path / "no-feeds-yet") == {}
    folder = _complete_folder(tmp_path, "2026-11-20")
    incomplete = _complete_folder(tmp_path, "2026-11-23")
    (incomplete / FEED_FILES["positions"].filename).unlink()
    (tmp_path / "not-a-date").mkdir()
    first = arrivals.complete_feed_folders(tmp_path)
    assert list(first) == ["2026-11-20"] and len(first["2026-11-20"]) == 16
    assert arrivals.complete_feed_folders(tmp_path) == first
    assert arrivals.changed_feed_folders(first, first) == {}
    os.utime(folder / FEED_FILES["prices"].filename, ns=(1, 1))
    second = arrivals.complete_feed_folders(tmp_path)
    assert second["2026-11-20"] != first["2026-11-20"]
    assert arrivals.changed_feed_folders(first, second) == second
    assert arrivals.changed_feed_folders({}, first) == first


def test_the_run_time_is_the_ticks_time_in_utc_else_the_wall_clock():
    assert clock.run_time("2026-11-24T05:00:00-05:00") == datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    assert clock.run_time("2026-11-24T10:00:00") == datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    before = datetime.now(timezone.utc)
    assert before <= clock.run_time("") <= datetime.now(timezone.utc)


def test_an_unknown_connection_is_named(tmp_path):
    with pytest.raises(pull.UnknownConnection, match=r"^no connection named 'nope' in the connections file$"):
        pull.pull_connection("nope", connections=Connections(connections=[api_connection(tmp_path)]),
                             feed_root=tmp_path, clock=lambda: TUESDAY_0500, open_store=None)


def test_a_pull_that_needs_a_person_raises_one_alert_for_the_day(store, tmp_path, monkeypatch):  # noqa: F811
    connection = api_connection(tmp_path)

    def rejected(connection, as_of, feed_root, siblings):
        raise ReauthorizationNeeded(connection.name, "the custodian rejected the stored refresh token")

    monkeypatch.setattr(pull, "pull_from_api", rejected)
    arguments = dict(connections=Connections(connections=[connection]), feed_root=tmp_path,
                     clock=lambda: TUESDAY_0500, open_store=lambda: contextlib.nullcontext(store))
    with pytest.raises(pull.ReauthorizationPending) as first:
        pull.pull_connection("fidelity-api", **arguments)  # no as_of: Monday, the last closed session
    with pytest.raises(pull.ReauthorizationPending) as again:
        pull.pull_connection("fidelity-api", "2026-11-23", **arguments)
    sentence = ("The custodian API connection 'fidelity-api' needs to be authorized again: the custodian rejected "
                "the stored refresh token. Until an operator signs in at the custodian and approves rebal's access, "
                "no positions, lots or transactions can be pulled from it.")
    assert str(first.value) == sentence
    assert first.value.log_line == sentence + " (operations alert raised)"
    assert again.value.log_line == sentence + " (operations alert already raised)"
    with store.begin() as conn:
        keys = conn.execute(select(notifications.c.notification_key)).scalars().all()
    assert keys == ["reauthorization_needed:fidelity-api:2026-11-23"]


def test_the_summary_shows_days_pulled_feeds_assembled_and_what_a_day_waits_for(tmp_path):
    monday, tuesday = date(2026, 11, 23), date(2026, 11, 24)
    deliveries = [
        Delivery("schwab-main", monday, tmp_path / "a", {"p.csv": "ab"}, Assembly(monday, tmp_path / "f", changed=True)),
        Delivery("schwab-main", tuesday, tmp_path / "b", {}, Assembly(tuesday, None, ("fidelity-api",))),
    ]
    assert pull.pull_summary(deliveries) == {"dates_pulled": ["2026-11-23", "2026-11-24"],
                                             "feeds_assembled": ["2026-11-23"], "waiting_for": ["fidelity-api"]}
    assert pull.describe(deliveries[1]) == (f"schwab-main: 2026-11-24 part in {tmp_path / 'b'}; "
                                            "feed waits for fidelity-api (0 raw files archived)")


def test_the_connections_file_comes_from_the_settings(tmp_path):
    assert connections_file(load_settings({"REBAL_HOME": str(tmp_path)})) == tmp_path.resolve() / "connections.yaml"
    chosen = load_settings({"REBAL_HOME": str(tmp_path), "REBAL_CONNECTIONS": "/etc/rebal/connections.yaml"})
    assert connections_file(chosen).as_posix() == "/etc/rebal/connections.yaml"


def test_a_custodian_secret_is_read_by_the_name_the_connection_gives():
    assert custodian_secret("REBAL_TEST_CLIENT_ID", {"REBAL_TEST_CLIENT_ID": "rebal-test"}) == "rebal-test"
    assert custodian_secret("REBAL_TEST_CLIENT_ID", {"REBAL_TEST_CLIENT_ID": ""}) == ""
    assert custodian_secret("REBAL_TEST_CLIENT_ID", {}) is None
