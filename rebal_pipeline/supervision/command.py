"""`rebal supervisory-report --from YYYY-MM-DD --to YYYY-MM-DD [--out DIR] [--email]`.

Writes the period's report as HTML, PDF and CSV into --out (default
<REBAL_HOME>/outbox/supervision/<from>_<to>/), records their SHA-256s in the audit chain (once
per period), prints where they are and their SHA-256s, and with --email sends them to every
active compliance user through the outbox (once each). Exit 0; 1 when the audit chain does not
verify (the report is still written and says so) or an email could not be sent (run the command
again later: a sent email is never sent twice); 2 for a usage or set-up error.

Wired into rebal_pipeline/cli.py by `add_arguments` and `run` (no Dagster here).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

HELP = "the supervisory review report for compliance: HTML, PDF and CSV for a period (optionally emailed)"


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="date_from", type=_day, required=True, help="first day of the period")
    parser.add_argument("--to", dest="date_to", type=_day, required=True, help="last day of the period (inclusive)")
    parser.add_argument("--out", default=None, help="folder for the files (default "
                                                    "<REBAL_HOME>/outbox/supervision/<from>_<to>/)")
    parser.add_argument("--email", action="store_true", help="email the PDF and CSV to every active compliance user")


def run(args) -> int:
    from rebal_pipeline import settings
    from rebal_pipeline.core.clock import utc_now
    from rebal_pipeline.core.policy import load_policy
    from rebal_pipeline.supervision.deliver import default_folder, produce, report_rules
    from rebal_pipeline.supervision.report import Period
    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.store import WorkflowStore

    try:
        period = Period(args.date_from, args.date_to)
    except ValueError as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 2
    current = settings.current()
    try:
        rules = report_rules(load_policy(current.policy_file()), current)
    except (OSError, ValueError) as error:
        print(f"rebal: the drift policy cannot be used: {error}", file=sys.stderr)
        return 2
    comms = None
    if args.email:
        from rebal_pipeline.comms.settings import CommsSettings

        comms = CommsSettings.from_settings(current)
    out = Path(args.out) if args.out else default_folder(current, period)
    now = utc_now()
    store = WorkflowStore.from_env()
    try:
        store.migrate()
        produced = produce(store, period, out_dir=out, now=now, review_window_hours=rules.review_window_hours,
                           micro_trade_limit=rules.micro_trade_limit,
                           wash_sale_overrides=current.wash_sale_overrides_path(), comms=comms)
    except audit.AuditKeyError as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"rebal: cannot write {getattr(error, 'filename', '') or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    report = produced.report
    print(f"Supervisory review report {period.start} to {period.end}: {len(report.recommendations)} recommendations, "
          f"{len(report.decisions)} decisions, {len(report.exceptions)} exceptions")
    for fmt, path in sorted(produced.files.items()):
        print(f"  {path}  sha256 {produced.sha256[fmt]}")
    recorded = produced.recorded
    if recorded.created:
        print(f"Recorded in the audit chain as {recorded.event_id}.")
    elif recorded.matches:
        print(f"Already recorded in the audit chain as {recorded.event_id} (the same bytes).")
    else:
        print(f"Note: the audit chain holds other SHA-256s for this period ({recorded.event_id}): its facts changed "
              "since it was first produced" + (" (the period has not ended yet)" if not period.ended_by(now) else ""))
    ok = report.chain.verified
    if not ok:
        print(f"rebal: the audit chain does NOT verify: {report.chain.problem}", file=sys.stderr)
    for delivery in produced.deliveries:
        who = delivery.message_key.rsplit(":", 1)[-1]
        print(f"Email to {who}: {delivery.status.replace('_', ' ')}"
              + (f" ({delivery.error})" if delivery.error and delivery.status in ("retry", "rejected") else ""))
        if delivery.status in ("retry", "rejected", "in_flight", "not_due"):
            ok = False
    if args.email and not produced.deliveries:
        print("rebal: no active compliance user to email (users.csv role compliance)", file=sys.stderr)
        ok = False
    return 0 if ok else 1
