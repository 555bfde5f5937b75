"""Late custodian files raise one operations alert per connection and date, on session days,
after the connection's deadline (New York time)."""

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select

from rebal_pipeline.connections.config import Connection
from rebal_pipeline.connections.deadlines import late_feeds, record_late_feed
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events, notifications
from rebal_pipeline_tests.approvals.conftest import USERS, store  # noqa: F401 (fixture)

NY = ZoneInfo("America/New_York")
SCHWAB = Connection(name="schwab-main", firm="example-ria", custodian="schwab", dialect="canonical",
                    kind="drop_folder", expected_by="07:30")
MONDAY_0800 = datetime(2026, 11, 23, 8, 0, tzinfo=NY)  # the files of Friday 2026-11-20 are due


def test_missing_files_after_the_deadline_are_late_and_name_the_date(tmp_path):
    [late] = late_feeds([SCHWAB], tmp_path, MONDAY_0800)
    assert (late.connection, late.as_of.isoformat()) == ("schwab-main", "2026-11-20")
    assert late.describe() == "schwab-main: the files for 2026-11-20 are late (nothing delivered)"


def test_nothing_is_late_before_the_deadline_on_a_weekend_or_when_the_folder_is_complete(tmp_path):
    assert late_feeds([SCHWAB], tmp_path, datetime(2026, 11, 23, 7, 29, tzinfo=NY)) == []
    assert late_feeds([SCHWAB], tmp_path, datetime(2026, 11, 22, 9, 0, tzinfo=NY)) == []  # Sunday
    folder = tmp_path / "2026-11-20"
    folder.mkdir()
    for spec in FEED_FILES.values():
        (folder / spec.filename).write_text("header\n")
    assert late_feeds([SCHWAB], tmp_path, MONDAY_0800) == []
    (folder / "lots.csv").unlink()
    [late] = late_feeds([SCHWAB], tmp_path, MONDAY_0800)
    assert late.missing == ["lots.csv"] and "missing lots.csv" in late.describe()


def test_a_custodian_connection_is_late_for_its_own_part_even_when_another_delivered(tmp_path, monkeypatch):
    from rebal_pipeline.connections.config import SftpSettings, part_dir

    monkeypatch.setenv("REBAL_HOME", str(tmp_path / "home"))  # part_dir (connections/config.py) reads it
    sftp = SftpSettings(host="h", username="u", private_key_file_env="K", known_hosts_file="k")
    schwab, pershing = (Connection(name=f"{d}-main", firm="example-ria", custodian=d, dialect=d, kind="sftp",
                                   sftp=sftp) for d in ("schwab", "pershing"))
    part = part_dir(schwab, MONDAY_0800.date().replace(day=20))
    part.mkdir(parents=True)
    for name in ("positions.csv", "lots.csv", "transactions.csv", "prices.csv"):
        (part / name).write_text("header\n")
    late = late_feeds([schwab, pershing], tmp_path / "feeds", MONDAY_0800)
    # Schwab delivered (its part is in; the day's feed waits for Pershing): only Pershing is late.
    assert [x.describe() for x in late] == ["pershing-main: the files for 2026-11-20 are late (nothing delivered)"]
    (part / "prices.csv").unlink()
    assert [x.describe() for x in late_feeds([schwab], tmp_path / "feeds", MONDAY_0800)] == [
        "schwab-main: the files for 2026-11-20 are late (missing prices.csv)"]


def test_the_operations_alert_is_recorded_once_with_an_audit_event(store, tmp_path):  # noqa: F811
    [late] = late_feeds([SCHWAB], tmp_path, MONDAY_0800)
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, MONDAY_0800)
        assert record_late_feed(conn, late, MONDAY_0800)
        assert not record_late_feed(conn, late, MONDAY_0800.replace(hour=9))
        rows = conn.execute(select(notifications.c.kind, notifications.c.recipient_id)).all()
        assert [tuple(r) for r in rows] == [("operations_alert", "OPS-1")]
        events = conn.execute(select(audit_events.c.kind, audit_events.c.actor)
                              .where(audit_events.c.kind == "feed_late")).all()
        assert [tuple(e) for e in events] == [("feed_late", "rebal:operations")]
        assert audit.verify(conn).ok


def test_the_sensor_raises_the_alert_once_across_ticks(store, tmp_path, monkeypatch):  # noqa: F811
    from dagster import build_sensor_context

    from rebal_pipeline.defs.connections.sensors import build_feed_deadlines_sensor
    from rebal_pipeline.resources import WorkflowStoreResource

    (tmp_path / "connections.yaml").write_text(
        "connections:\n  - {name: schwab-main, firm: example-ria, custodian: schwab, dialect: canonical,"
        " kind: drop_folder, expected_by: '07:30'}\n")
    # The sensor reads both from the environment at each tick (defs/connections/sensors.py).
    monkeypatch.setenv("REBAL_CONNECTIONS", str(tmp_path / "connections.yaml"))
    monkeypatch.setenv("REBAL_FEED_ROOT", str(tmp_path / "feeds"))
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS, MONDAY_0800)
    sensor = build_feed_deadlines_sensor(clock=lambda: MONDAY_0800)
    resources = {"workflow_store": WorkflowStoreResource(url=store.url)}
    first = sensor(build_sensor_context(resources=resources))
    second = sensor(build_sensor_context(resources=resources))
    assert "schwab-main: the files for 2026-11-20 are late (nothing delivered)" in first.skip_message
    assert second.skip_message == "1 late feed(s) already alerted"
