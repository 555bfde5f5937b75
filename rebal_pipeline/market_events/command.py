"""`rebal market-event`: an operator declares a market event (an operations or compliance user).

    rebal market-event --reason "Fed surprise cut, equities -4% at 11:00" --by ops1 \
        [--prices intraday/2026-11-20/prices_110000.csv] [--scan]

The event is recorded once in the day's batch (market_events/batches.py E1, E2: the same person,
reason and prices make the same event; a second declaration of the day extends the batch). With
--prices (a drop file under the feed root) the scan values the book at those prices; without, at
the last session's closes (an out-of-cycle scan of every account as the book stands). --scan runs
the scan and the batch's report here and now (the embedded default, the drill); without it, the
`market_events` sensor launches the scan at its next tick.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

HELP = "declare a market event (operations or compliance): every account is scanned again, its alerts one batch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="what happened, for the record (at most 500 characters)")
    parser.add_argument("--by", required=True, help="your user id (an active operations or compliance user)")
    parser.add_argument("--prices", help="an intraday prices file under the feed root "
                                         "(intraday/<day>/prices_<HHMMSS>.csv) to value the book at")
    parser.add_argument("--scan", action="store_true", help="scan now, in this process, instead of at the "
                                                            "market_events sensor's next tick")


def run(args) -> int:
    from rebal_pipeline import settings
    from rebal_pipeline.core.clock import utc_now
    from rebal_pipeline.core.market_calendar import latest_closed_session
    from rebal_pipeline.core.policy import load_policy
    from rebal_pipeline.execution.submit import trading_day
    from rebal_pipeline.market_events import batches, prices, scan, scanning
    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.store import WorkflowStore

    current = settings.current()
    rule = load_policy(current.policy_file()).market_events
    now = utc_now()
    store = WorkflowStore.from_env()
    store.migrate()
    try:
        received = None
        if args.prices:
            relative = Path(args.prices)
            if relative.is_absolute():
                relative = relative.relative_to(current.feed_root())
            received = scanning.receive_snapshot(current.feed_root(), current.archive_root(), relative.as_posix())
        with scan.attached(current.warehouse_path()) as con:
            as_of = scan.newest_session(con, latest_closed_session(now))
            if as_of is None:
                raise scan.ScanError("the warehouse has no scanned session: run the daily scan first")
            closes = scanning.session_closes(con, as_of)
        basket = prices.basket_of(rule)
        day = received.snapshot.day if received else trading_day(now)
        with store.begin() as conn:
            batches.check_declarer(conn, args.by)
            reason = batches.check_reason(args.reason)
            snapshot = received.snapshot if received else None
            extra = ({"prices_file": snapshot.shown_as, "prices_sha256": snapshot.sha256,
                      "archived_as": str(received.archived), "rejected_rows": len(snapshot.rejects)}
                     if snapshot else {})
            event = batches.record_event(
                conn, event_key=batches.operator_event_key(day, args.by, reason, snapshot.sha256 if snapshot else None),
                source=batches.OPERATOR, declared_by=args.by, reason=reason, day=day, session_as_of=as_of,
                detected_at=snapshot.priced_at if snapshot else now, now=now, basket=basket,
                threshold=rule.threshold, release_after=timedelta(minutes=rule.release_after_minutes),
                basket_prices={s: snapshot.prices[s] for s, _ in basket if s in snapshot.prices} if snapshot else None,
                session_closes=closes, extra=extra)
    except (batches.BatchError, prices.PricesFileError, scanning.EventError, scan.ScanError, audit.AuditKeyError,
            ValueError) as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    move = f", basket {event.move:+.2%}" if event.move is not None else ""
    print(f"market event {event.event_id} {'recorded' if event.recorded_now else 'was recorded already'} "
          f"(batch {event.batch_id}{move})")
    if not args.scan:
        print("the market_events sensor scans it at its next tick (or run again with --scan)")
        return 0
    return _scan_now(event.event_id)


def _scan_now(event_id: str) -> int:
    from dagster import DagsterInstance

    from rebal_pipeline.definitions import build_definitions
    from rebal_pipeline.defs.market_events.defs import scan_request

    request = scan_request(event_id=event_id)
    job = build_definitions().resolve_job_def("market_event_scan")
    with DagsterInstance.get() as instance:
        # The run's own log stays in the run (the Dagster UI); this command prints what it did.
        run_config = {**request.run_config, "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
        outcome = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False,
                                         tags={**request.tags, "dagster/run_key": request.run_key})
    if not outcome.success:
        for event in outcome.all_events:
            if event.is_step_failure and event.step_failure_data.error:
                message = event.step_failure_data.error.message.strip().removeprefix(
                    "dagster._core.definitions.events.Failure: ")
                print(f"rebal: {event.step_key}: {message}", file=sys.stderr)
        return 1
    scanned = outcome.output_for_node("scan_market_event")
    report = outcome.output_for_node("report_market_event")
    print(f"scanned: batch {scanned.get('batch_id')}; report {report.get('html', '(none)')}")
    return 0
