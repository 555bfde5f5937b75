"""Progress of a Dagster run from its event stream (rebal_pipeline/progress.py): a line per step
started and finished, the run's start and end, a heartbeat during a long step — on stderr."""

import io
import re
import time
from types import SimpleNamespace

from dagster import DagsterInstance, job, op

from rebal_pipeline.progress import RunProgress, elapsed_words, execute_with_progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _entry(kind: str, step: str | None = None, run_id: str = "0123456789abcdef"):
    return SimpleNamespace(run_id=run_id, dagster_event=SimpleNamespace(event_type_value=kind, step_key=step))


def test_each_step_start_and_finish_is_one_line_with_the_elapsed_time():
    clock, out = FakeClock(), io.StringIO()
    progress = RunProgress("drill", stream=out, total_steps=2, clock=clock)
    clock.now += 4
    progress.on_event(_entry("PIPELINE_START"))
    progress.on_event(_entry("STEP_START", "holdings"))
    clock.now += 3.14
    progress.on_event(_entry("STEP_SUCCESS", "holdings"))
    progress.on_event(SimpleNamespace(run_id="0123456789abcdef", dagster_event=None))  # a log message: no line
    progress.on_event(_entry("STEP_START", "drift"))
    clock.now += 61
    progress.on_event(_entry("STEP_FAILURE", "drift"))
    progress.on_event(_entry("PIPELINE_FAILURE"))
    assert out.getvalue().splitlines() == [
        "[drill] 00:04 run 01234567 started",
        "[drill] 00:04 step 1/2 holdings started",
        "[drill] 00:07 step 1/2 holdings done (3.1 s)",
        "[drill] 00:07 step 2/2 drift started",
        "[drill] 01:08 step 2/2 drift failed (61.0 s)",
        "[drill] 01:08 run 01234567 failed: 2 steps in 64.1 s",
    ]


def test_a_heartbeat_names_the_running_step_when_nothing_was_said_for_a_while():
    clock, out = FakeClock(), io.StringIO()
    progress = RunProgress("benchmark", stream=out, heartbeat=10, clock=clock)
    progress.on_event(_entry("PIPELINE_START"))
    progress.on_event(_entry("STEP_START", "propose_trades"))
    clock.now += 9
    progress.beat()  # said something 9 s ago: quiet
    clock.now += 3
    progress.beat()
    clock.now += 5
    progress.beat()  # the heartbeat itself was 5 s ago: quiet
    clock.now += 6
    progress.beat()
    progress.on_event(_entry("STEP_SUCCESS", "propose_trades"))
    clock.now += 10
    progress.beat()
    assert out.getvalue().splitlines() == [
        "[benchmark] 00:00 run 01234567 started",
        "[benchmark] 00:00 step 1 propose_trades started",
        "[benchmark] 00:12 step 1 propose_trades still running (12 s so far)",
        "[benchmark] 00:23 step 1 propose_trades still running (23 s so far)",
        "[benchmark] 00:23 step 1 propose_trades done (23.0 s)",
        "[benchmark] 00:33 run 01234567 still running, between steps (1 step done so far)",
    ]


def test_elapsed_time_is_minutes_and_seconds_then_hours():
    assert [elapsed_words(s) for s in (0, 7.9, 754, 3723)] == ["00:00", "00:07", "12:34", "1:02:03"]


@op
def load_book():
    return 1


@op
def slow_step(book):
    time.sleep(1.2)
    return book


@job
def two_steps():
    slow_step(load_book())


def test_a_real_run_reports_its_steps_and_beats_during_a_slow_one_on_stderr(capsys):
    progress = RunProgress("drill", heartbeat=0.4)
    with DagsterInstance.ephemeral() as instance:
        result = execute_with_progress(two_steps, instance, progress, raise_on_error=False,
                                       run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("[drill] ")]
    shapes = [re.sub(r"^\[drill\] \d\d:\d\d ", "", line) for line in lines]
    said = [s for s in shapes if "still" not in s]  # heartbeats aside (one may come before the run starts)
    assert said[0] == f"run {result.run_id[:8]} started"
    assert said[1] == "step 1/2 load_book started" and said[3] == "step 2/2 slow_step started"
    assert re.fullmatch(r"step 1/2 load_book done \(\d+\.\d s\)", said[2])
    assert re.fullmatch(r"step 2/2 slow_step done \(1\.\d s\)", said[4])
    assert re.fullmatch(rf"run {result.run_id[:8]} succeeded: 2 steps in \d+\.\d s", said[5]) and len(said) == 6
    # During the slow step (1.2 s, heartbeat 0.4 s) the heartbeat names it.
    during = shapes[shapes.index(said[3]) + 1:shapes.index(said[4])]
    assert during and all(re.fullmatch(r"step 2/2 slow_step still running \(\d+ s so far\)", s) for s in during)


def test_outside_a_run_the_heartbeat_says_what_the_command_is_doing():
    clock, out = FakeClock(), io.StringIO()
    progress = RunProgress("drill", stream=out, heartbeat=10, clock=clock)
    clock.now += 1
    progress.say("generating the sandbox book …")
    clock.now += 10
    progress.beat()
    progress.doing("starting the Dagster run")
    clock.now += 10
    progress.beat()
    assert out.getvalue().splitlines() == [
        "[drill] 00:01 generating the sandbox book …",
        "[drill] 00:11 still generating the sandbox book (10 s so far)",
        "[drill] 00:21 still starting the Dagster run (10 s so far)",
    ]
