"""Progress of a Dagster run on the terminal, from the run's own event stream.

While a command runs a job in process (`rebal drill`, the benchmark's "through Dagster" part),
the operator sees which step is executing and how long everything has taken, instead of
silence:

    [drill] 00:01 generating the sandbox book …
    [drill] 00:04 run 1f2e3d4c started
    [drill] 00:04 step 2/36 land_feed started
    [drill] 00:05 step 2/36 land_feed done (0.6 s)
    [drill] 00:17 step 34/36 propose_trades still running (10 s so far)
    [drill] 00:41 run 1f2e3d4c succeeded: 36 steps in 37.0 s

Contract:
- Every line goes to the stream given (stderr by default), never to stdout: a command's stdout
  summary reads the same with or without progress.
- Lines are `[<label>] <mm:ss> …`; mm:ss is the time since the `RunProgress` was made, so a
  command that makes it at its start shows its own elapsed time.
- One line when a step starts and one when it finishes (done / failed / skipped / up for retry,
  with the step's own seconds), one when the run starts and ends.
- The heartbeat runs while the RunProgress is entered (`with progress:`; entering again inside,
  as `execute_with_progress` does, is allowed).
- No silence longer than `heartbeat` seconds (default 10) while entered: a heartbeat line names
  the step still running and for how long, or says the run is between steps, or (outside a
  run's steps) what the command said it is doing.
- `RunProgress.say(text)` adds a line of the command's own (e.g. "generating the sandbox book");
  `RunProgress.doing(text)` only tells the heartbeat.
- `RunProgress.on_event(entry)` takes one Dagster event log entry, as handed to the callback
  of `DagsterInstance.add_event_listener(run_id, callback)` (called by the instance as each
  event of that run is stored, on the thread that executes the step).
- `execute_with_progress(job, instance, progress, **execute_in_process_kwargs)` runs
  `job.execute_in_process` under a run id chosen here, so the listener is attached before the
  run's first event, and returns its result.

This module imports nothing from Dagster: it reads the entry's `dagster_event.event_type_value`
and `step_key`, and calls the methods of the instance and job it is handed (rebal's Dagster code
stays in the modules that define or launch runs).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TextIO

from rebal_pipeline.drill import plural

HEARTBEAT_SECONDS = 10.0

# Dagster's event type values (DagsterEventType) that progress reports, in the operator's words.
STEP_STARTED = "STEP_START"
STEP_FINISHED = {
    "STEP_SUCCESS": "done",
    "STEP_FAILURE": "failed",
    "STEP_SKIPPED": "skipped",
    "STEP_UP_FOR_RETRY": "failed, up for retry",
}
RUN_STARTED = "PIPELINE_START"
RUN_FINISHED = {"PIPELINE_SUCCESS": "succeeded", "PIPELINE_FAILURE": "failed", "PIPELINE_CANCELED": "was cancelled"}


def elapsed_words(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on: 00:07, 12:34, 1:02:03."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class RunProgress:
    """Prints a run's progress (see the module docstring). Use as a context manager around the
    run: entering starts the heartbeat, leaving stops it."""

    def __init__(self, label: str, stream: TextIO | None = None, heartbeat: float = HEARTBEAT_SECONDS,
                 total_steps: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.stream = stream
        self.heartbeat = heartbeat
        self.total_steps = total_steps
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._running: dict[str, tuple[float, int]] = {}  # step key → (started at, its number)
        self._steps_started = 0
        self._run_started: float | None = None
        self._run_id = ""
        self._last_line = self._started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._depth = 0  # entered this many times: a command may hold it around a run that holds it too
        self._activity = ("working", self._started)  # what a heartbeat outside a run's steps says, since when

    # --- lines -------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """One progress line, stamped with the elapsed time; until the next one, a heartbeat outside
        a run's steps says the command is still doing this ("generating the sandbox book …")."""
        with self._lock:
            self._write(text)
            self._activity = (text.rstrip(" …."), self._last_line)

    def doing(self, activity: str) -> None:
        """What a heartbeat says is going on from now, without a line of its own."""
        with self._lock:
            self._activity = (activity, self._clock())

    def _write(self, text: str) -> None:  # the caller holds the lock
        now = self._clock()
        self._last_line = now
        stream = self.stream if self.stream is not None else sys.stderr  # sys.stderr as it is now (tests swap it)
        print(f"[{self.label}] {elapsed_words(now - self._started)} {text}", file=stream, flush=True)

    def _number(self, number: int) -> str:
        return f"{number}/{self.total_steps}" if self.total_steps else str(number)

    # --- Dagster's event stream --------------------------------------------------------------
    def on_event(self, entry) -> None:
        """One event log entry of the run (an instance event listener's callback)."""
        event = getattr(entry, "dagster_event", None)
        if event is None:  # a plain log message: not progress
            return
        kind, step = event.event_type_value, event.step_key
        with self._lock:
            now = self._clock()
            if kind == STEP_STARTED and step:
                self._steps_started += 1
                self._running[step] = (now, self._steps_started)
                self._write(f"step {self._number(self._steps_started)} {step} started")
            elif kind in STEP_FINISHED and step:
                since, number = self._running.pop(step, (now, self._steps_started))
                self._write(f"step {self._number(number)} {step} {STEP_FINISHED[kind]} ({now - since:.1f} s)")
            elif kind == RUN_STARTED:
                self._run_started = now
                self._run_id = getattr(entry, "run_id", "") or ""
                self._write(f"run {self._run_id[:8]} started")
            elif kind in RUN_FINISHED:
                took = now - (self._run_started if self._run_started is not None else self._started)
                self._write(f"run {self._run_id[:8]} {RUN_FINISHED[kind]}: {plural(self._steps_started, 'step')} "
                            f"in {took:.1f} s")
                self._run_started = None
                self._activity = ("finishing the run", now)

    # --- the heartbeat -----------------------------------------------------------------------
    def beat(self) -> None:
        """A heartbeat line if nothing was said for `heartbeat` seconds (the thread calls this)."""
        with self._lock:
            now = self._clock()
            if now - self._last_line < self.heartbeat:
                return
            if self._running:
                step, (since, number) = max(self._running.items(), key=lambda item: item[1][0])
                self._write(f"step {self._number(number)} {step} still running ({now - since:.0f} s so far)")
            elif self._run_started is not None:
                self._write(f"run {self._run_id[:8]} still running, between steps "
                            f"({plural(self._steps_started, 'step')} done so far)")
            else:
                activity, since = self._activity
                self._write(f"still {activity} ({now - since:.0f} s so far)")

    def _beat_until_stopped(self) -> None:
        # Checks several times per heartbeat so a line comes at most a fraction of it late.
        while not self._stop.wait(min(1.0, self.heartbeat / 4)):
            self.beat()

    def __enter__(self) -> RunProgress:
        self._depth += 1
        if self._depth == 1:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat_until_stopped, name=f"{self.label}-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def execute_with_progress(job, instance, progress: RunProgress, **kwargs):
    """`job.execute_in_process(instance=instance, **kwargs)` with `progress` fed by the run's
    events (an event listener on the instance for the run id chosen here)."""
    run_id = kwargs.pop("run_id", None) or str(uuid.uuid4())
    instance.add_event_listener(run_id, progress.on_event)
    if progress.total_steps is None:
        progress.total_steps = step_count(job)
    with progress:
        progress.doing("starting the Dagster run")
        return job.execute_in_process(instance=instance, run_id=run_id, **kwargs)


def step_count(job) -> int | None:
    """The number of steps an in-process run of `job` executes: one per op (node) of its graph,
    as the in-process executor runs them; None if the job does not say."""
    try:
        return len(job.graph.nodes) or None
    except AttributeError:
        return None
