"""What starts running on a new instance is what the README says: nothing, and every sensor and
schedule is in the README's table of when to turn it on."""

from dagster import DefaultScheduleStatus, DefaultSensorStatus

from rebal_pipeline import settings
from rebal_pipeline.definitions import defs


def _readme_table() -> str:
    text = (settings.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Sensors and the schedules", 1)[1].split("\n## ", 1)[0]


def test_every_sensor_and_schedule_starts_stopped_and_is_in_the_readme():
    table = _readme_table()
    sensors = list(defs.sensors)
    schedules = list(defs.schedules)
    assert len(sensors) == 13 and len(schedules) == 2
    for sensor in sensors:
        assert sensor.default_status == DefaultSensorStatus.STOPPED, sensor.name
        assert f"`{sensor.name}`" in table, sensor.name
    for schedule in schedules:
        assert schedule.default_status == DefaultScheduleStatus.STOPPED, schedule.name
        assert f"`{schedule.name}`" in table, schedule.name
