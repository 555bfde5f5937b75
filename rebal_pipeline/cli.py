"""`rebal`: the command line. `rebal --help` lists the commands."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from rebal_pipeline import settings
from rebal_pipeline.core.pii import mask_account  # account numbers in CLI output: last four only


def _shock(text: str) -> dict[str, float]:
    """Parse 'equity=-0.12,alternatives=-0.05' into {asset_class: return}."""
    shock: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        asset_class, _, value = part.partition("=")
        try:
            shock[asset_class.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"shock must look like equity=-0.12, got {part!r}") from None
    return shock


def _as_of(text: str | None) -> date:
    from rebal_pipeline.core.market_calendar import latest_closed_session

    return date.fromisoformat(text) if text else latest_closed_session()


def _add_book_options(parser: argparse.ArgumentParser, households: int) -> None:
    parser.add_argument("--households", type=int, default=households, help="households in the book (default %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="random seed: same seed, same book (default %(default)s)")
    parser.add_argument("--as-of", help="as-of date YYYY-MM-DD (default: the latest closed NYSE session)")
    parser.add_argument("--shock", type=_shock, default={}, help="market shock on as-of closes, e.g. equity=-0.12")


def cmd_sandbox(args) -> int:
    from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed

    config = SandboxConfig(as_of=_as_of(args.as_of), households=args.households, seed=args.seed,
                           shock=args.shock, defects=args.defects)
    report = generate_feed(config, Path(args.out) if args.out else settings.feed_root())
    print(f"Wrote {report.feed_dir}: {report.households:,} households, {report.accounts:,} accounts, "
          f"{report.positions:,} positions, {report.lots:,} lots, {report.transactions:,} transactions")
    for defect in report.defects:
        print(f"  injected defect {defect.kind}: {defect.file} [{defect.column}] account {mask_account(defect.account_id)}")
    return 0


def cmd_drill(args) -> int:
    from rebal_pipeline.drill import (
        DrillHomeRefused,
        materialize_day,
        plural,
        prepare_local_instance,
        start_drill_home,
        summarize_day,
        workflow_summary,
    )
    from rebal_pipeline.progress import RunProgress
    from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed

    # A fresh home unless --keep: every count below is this drill's, not earlier drills' too.
    try:
        drill_home = start_drill_home(keep=args.keep)
    except DrillHomeRefused as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 2
    print(drill_home.describe())
    # Progress goes to stderr (the summary on stdout reads the same without it); its clock is the drill's.
    progress = RunProgress("drill")
    with progress:
        home = prepare_local_instance()
        as_of = _as_of(args.as_of)
        via_custodian = bool(args.via_sftp or args.via_custodians)
        config = SandboxConfig(as_of=as_of, households=args.households, seed=args.seed,
                               shock=args.shock, defects=not args.clean and not via_custodian)
        book_root = settings.rebal_home() / "sandbox_custodian" / "book" if via_custodian else settings.feed_root()
        progress.say("generating the sandbox book …")
        report = generate_feed(config, book_root)
        print(f"Sandbox book: {plural(report.households, 'household')}, {plural(report.accounts, 'account')} "
              f"→ {report.feed_dir}"
              + (f" (with {plural(len(report.defects), 'injected defect')}: see Rejected feed rows)"
                 if report.defects else ""))
        if args.via_sftp:
            from rebal_pipeline.drill import deliver_over_sftp

            progress.say(f"delivering the book as {args.via_sftp}-style files over SFTP …")
            for line in deliver_over_sftp(book_root, as_of, args.via_sftp):
                print(line)
        if args.via_custodians:
            from rebal_pipeline.drill import deliver_by_custodian

            progress.say("delivering the book through the three custodians …")
            for line in deliver_by_custodian(book_root, as_of):
                print(line)
        print(f"Materialising the daily asset graph for {as_of} on the Dagster instance at {home} …", flush=True)
        if not materialize_day(as_of, progress):
            print("The daily run failed; see above and the run in the Dagster UI.", file=sys.stderr)
            return 1
        progress.say("summarising the day …")
        summary = summarize_day(settings.warehouse_path(), as_of).text
        workflow = workflow_summary(as_of)
        loop = None
        if not args.no_loop:
            from rebal_pipeline.drill import run_loop

            progress.say("the whole loop: alerts, the advisor, the gate, orders, the desk, the client …")
            loop = run_loop(as_of, progress)
    print()
    print(summary)
    print()
    print(workflow)
    print()
    if loop is not None:
        print("\n".join(loop.lines))
        print()
        if not loop.ok:
            print("The loop stopped before its end; see above.", file=sys.stderr)
            return 1
    print("Open the Dagster UI to see the run, the lineage from custodian_feed to drift_alerts and the checks:")
    print(f"  DAGSTER_HOME={home} .venv/bin/dagster dev -w workspace.yaml   # then http://127.0.0.1:3000")
    print(f"Query the warehouse: .venv/bin/python -c \"import duckdb; print(duckdb.connect('{settings.warehouse_path()}', read_only=True).sql('from drift_alerts limit 5'))\"")
    return 0


def cmd_summary(args) -> int:
    from rebal_pipeline.drill import summarize_day

    print(summarize_day(settings.warehouse_path(), _as_of(args.as_of)).text)
    return 0


def cmd_benchmark(args) -> int:
    from rebal_pipeline.benchmark import run_benchmark

    sizes = [int(s) for s in args.accounts.split(",")]
    if args.million:
        sizes.append(1_000_000)
    return run_benchmark(sizes, Path(args.output), work_dir=Path(args.work_dir) if args.work_dir else None)


def cmd_keep_washing_buy(args) -> int:
    """Record an advisor's documented decision to keep a buy that washes a loss."""
    from pydantic import ValidationError

    from rebal_pipeline.core.overrides import WashSaleOverride, record_override

    try:
        override = WashSaleOverride(as_of=_as_of(args.as_of), account_id=args.account, symbol=args.symbol,
                                    reason=args.reason, decided_by=args.by)
    except ValidationError as error:
        for problem in error.errors():
            print(f"rebal: {'.'.join(map(str, problem['loc']))}: {problem['msg']}", file=sys.stderr)
        return 2
    path = settings.wash_sale_overrides_path()
    record_override(path, override)
    print(f"Recorded in {path}: {mask_account(override.account_id)} keeps its {override.symbol} buy on {override.as_of} "
          f"({override.decided_by}). Re-run the day to update the proposals.")
    return 0


def cmd_audit(args) -> int:
    """Verify, anchor or export the audit record of the workflow store (workflow/audit.py)."""
    from datetime import datetime, timezone

    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    try:
        store.migrate()
        with store.begin() as conn:
            if args.audit_command == "verify":
                result = audit.verify(conn)
                print(result)
                return 0 if result.ok else 1
            if args.audit_command == "anchor":
                document = audit.anchor(conn, datetime.now(timezone.utc))
                if document is None:
                    print("The audit chain is empty: nothing to anchor.")
                else:
                    print(f"Anchored event {document['seq']} ({document['hash'][:16]}…, {document['events']} events) "
                          f"in {document['file']}")
                return 0
            start = date.fromisoformat(args.date_from) if args.date_from else None
            end = date.fromisoformat(args.date_to) if args.date_to else None
            if start and end and start > end:
                print(f"rebal: --from {start} is after --to {end}", file=sys.stderr)
                return 2
            manifest = audit.export(conn, Path(args.out), date.today(), start=start, end=end)
            print(f"Exported {manifest['events']} events, {manifest['decisions']} decisions and "
                  f"{manifest['packages']} packages to {manifest['folder']} "
                  f"(head {manifest['head_hash'][:16]}…, manifest signed with key {manifest['key_id']})")
            return 0
    except audit.AuditKeyError as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 2
    except audit.AuditBroken as error:
        print(f"rebal: not {'anchored' if args.audit_command == 'anchor' else 'exported'}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"rebal: cannot write {getattr(error, 'filename', '') or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    finally:
        store.dispose()


def _day(text: str) -> str:
    try:
        date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None
    return text


def cmd_issue_token(args) -> int:
    """Issue an API token for a user (printed once; only its SHA-256 is stored)."""
    import secrets
    from datetime import datetime, timezone

    from rebal_pipeline.workflow import lifecycle
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    store.migrate()
    token = secrets.token_urlsafe(32)
    try:
        with store.begin() as conn:
            lifecycle.issue_api_token(conn, args.user_id, token, datetime.now(timezone.utc))
    except lifecycle.DecisionError as error:
        print(f"rebal: {error.message} (users come from the feed's users.csv; run the day first)", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    print(token)
    return 0


def cmd_users_list(args) -> int:
    """Everyone in the workflow store: role, active or not (when, by whom, why), team, token."""
    from sqlalchemy import select

    from rebal_pipeline.workflow.schema import advisor_team, users
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    store.migrate()
    try:
        with store.begin() as conn:
            rows = conn.execute(select(users).order_by(users.c.user_id)).mappings().all()
            teams: dict[str, list[str]] = {}
            for t in conn.execute(select(advisor_team).order_by(advisor_team.c.member_user_id)):
                teams.setdefault(t.member_user_id, []).append(t.advisor_id)
    finally:
        store.dispose()
    if not rows:
        print("no users yet (they come from the feed's users.csv: run the day first)")
        return 0
    print(f"{'user':<16} {'role':<13} {'status':<9} {'team of':<16} {'team alerts':<11} {'token':<5} deactivated")
    for u in rows:
        gone = (f"{u['deactivated_at']:%Y-%m-%d %H:%M} by {u['deactivated_by']}: {u['deactivation_reason']}"
                if u["deactivated_at"] else "")
        print(f"{u['user_id']:<16} {u['role']:<13} {'active' if u['active'] else 'INACTIVE':<9} "
              f"{','.join(teams.get(u['user_id'], [])) or '-':<16} "
              f"{('on' if u['team_alerts'] else 'off') if u['role'] == 'advisor' else '-':<11} "
              f"{'yes' if u['api_token_sha256'] else 'no':<5} {gone}".rstrip())
    return 0


def cmd_users_deactivate(args) -> int:
    """Deactivate a user now, between feeds: their API token and links are refused at once."""
    import getpass
    from datetime import datetime, timezone

    from rebal_pipeline.workflow import lifecycle
    from rebal_pipeline.workflow.store import WorkflowStore

    reason = (args.reason or "").strip()
    if len(reason) < 10:
        print("rebal: --reason must say why in at least 10 characters (it is kept in the audit trail)", file=sys.stderr)
        return 2
    store = WorkflowStore.from_env()
    store.migrate()
    try:
        with store.begin() as conn:
            done = lifecycle.deactivate_user(conn, args.user_id, f"operations:{args.by or getpass.getuser()}", reason,
                                             datetime.now(timezone.utc))
    finally:
        store.dispose()
    if not done:
        print(f"rebal: no active user {args.user_id} (see `rebal users list`)", file=sys.stderr)
        return 1
    print(f"{args.user_id} deactivated: API token and links refused from now on. It stays deactivated even while "
          "users.csv lists it; its open recommendations go to the advisor of record in the next feed that names "
          "another one.")
    return 0


def cmd_connections_authorize(args) -> int:
    """Authorize rebal at a custodian's OAuth API (two steps; connections/authorize.py)."""
    from rebal_pipeline.connections.authorize import finish_authorization, start_authorization
    from rebal_pipeline.connections.config import ConnectionsFileError, load_connections
    from rebal_pipeline.connections.oauth_api import OAuthApiError

    try:
        matching = [c for c in load_connections().connections if c.name == args.name]
        if not matching:
            print(f"rebal: no connection named {args.name!r} in the connections file", file=sys.stderr)
            return 1
        if bool(args.code) != bool(args.state):
            print("rebal: step 2 needs both --code and --state (from the custodian's redirect)", file=sys.stderr)
            return 2
        if not args.code:
            url = start_authorization(matching[0])
            print("Open this address, sign in at the custodian and approve rebal's access:")
            print(f"  {url}")
            print("The custodian then redirects to the connection's redirect_uri with code=… and state=…; run:")
            print(f"  rebal connections authorize {args.name} --code <code> --state <state>")
            return 0
        tokens = finish_authorization(matching[0], args.code, args.state)
    except (ConnectionsFileError, OAuthApiError) as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}: authorized; tokens stored encrypted, access token valid until "
          f"{tokens.expires_at.isoformat(timespec='seconds')} (refreshed automatically)")
    return 0


def cmd_api(args) -> int:
    """Serve the approval API (FastAPI on uvicorn); OpenAPI at /openapi.json."""
    from rebal_pipeline.approval_api.app import serve

    serve(args.host, args.port)
    return 0


def cmd_orders_executed(args) -> int:
    """The trading desk confirms it placed a decision's staged orders (the client confirmation follows)."""
    from datetime import datetime, timezone

    from rebal_pipeline.execution.submit import ExecutionError, confirm_executed, confirm_release_executed
    from rebal_pipeline.market_events import batches
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    store.migrate()
    try:
        with store.begin() as conn:
            if batches.is_release_id(args.decision):  # a market-event batch's release: all its orders
                count = confirm_release_executed(conn, args.decision, batches.release_decisions(conn, args.decision),
                                                 args.by, datetime.now(timezone.utc))
            else:
                count = confirm_executed(conn, args.decision, args.by, datetime.now(timezone.utc))
    except ExecutionError as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    print(f"{count} staged orders of decision {args.decision} confirmed executed" if count
          else f"the staged orders of decision {args.decision} were already confirmed")
    return 0


def cmd_orders_cancel(args) -> int:
    """The trading desk cancels a decision's staged orders: the account's ledger is released."""
    from datetime import datetime, timezone

    from rebal_pipeline.workflow.ledger import LedgerError, cancel
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    store.migrate()
    try:
        with store.begin() as conn:
            count = cancel(conn, args.decision, args.by, args.reason, datetime.now(timezone.utc))
    except LedgerError as error:
        print(f"rebal: {error}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    print(f"{count} orders of decision {args.decision} cancelled; the account's ledger is released" if count
          else f"nothing left to cancel for decision {args.decision}")
    return 0


def cmd_instance_init(args) -> int:
    """Set up the Dagster instance in DAGSTER_HOME for rebal: the warehouse pool's limit of one
    run (resources.ensure_warehouse_pool), so a backfill from the UI runs its sessions in turn."""
    from dagster import DagsterInstance

    from rebal_pipeline.resources import WAREHOUSE_POOL, ensure_warehouse_pool

    with DagsterInstance.get() as instance:
        changed = ensure_warehouse_pool(instance)
    print(f"pool {WAREHOUSE_POOL}: limit 1 run {'set' if changed else '(already set)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    # Library chatter is not for the operator's terminal: Dagster's beta notices about its own
    # API, and paramiko's "socket closed" notes when the sandbox SFTP server shuts down.
    warnings.filterwarnings("ignore", message=r".*is currently in beta.*")
    logging.getLogger("paramiko").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="rebal", description="Portfolio-rebalancing alerts for RIAs.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sandbox", help="write a synthetic canonical feed for one as-of date")
    _add_book_options(p, households=200)
    p.add_argument("--defects", action="store_true", help="inject the documented bad rows (docs/sandbox.md)")
    p.add_argument("--out", help="feed root (default: $REBAL_FEED_ROOT or .rebal/feeds)")
    p.set_defaults(func=cmd_sandbox)

    p = commands.add_parser("drill", help="generate a sandbox book and run the full daily scan through Dagster")
    _add_book_options(p, households=200)
    p.add_argument("--clean", action="store_true", help="no injected bad rows")
    p.add_argument("--keep", action="store_true",
                   help="run on top of what earlier drills left in REBAL_HOME (their recommendations, runs and "
                        "audit events count too); by default each drill starts from an empty home, the previous "
                        "drill moved aside into <home>/previous_drills/")
    p.add_argument("--no-loop", action="store_true",
                   help="stop after the scan: no alert emails, advisor decisions, orders or client confirmations "
                        "(by default the drill runs the whole loop on local servers it starts and stops)")
    via = p.add_mutually_exclusive_group()
    via.add_argument("--via-sftp", choices=["schwab", "fidelity", "pershing"],
                     help="deliver the book as that custodian's files over a real local SFTP server, "
                          "then pull and translate them into the canonical feed (no injected bad rows)")
    via.add_argument("--via-custodians", action="store_true",
                     help="each account's custodian delivers it: Schwab- and Pershing-style files over a real "
                          "local SFTP server, Fidelity's accounts through a local OAuth 2.0 API; the day's feed "
                          "is assembled from the three (no injected bad rows)")
    p.set_defaults(func=cmd_drill)

    p = commands.add_parser("summary", help="print the scan summary of a day already materialised")
    p.add_argument("--as-of", help="as-of date YYYY-MM-DD (default: the latest closed NYSE session)")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("keep-washing-buy", help="advisor override: keep a proposed buy although it washes "
                            "a loss (instead of the substitute); a documented reason is required")
    p.add_argument("--account", required=True)
    p.add_argument("--symbol", required=True, help="the security to keep buying")
    p.add_argument("--reason", required=True, help="why (at least 10 characters; kept for compliance)")
    p.add_argument("--by", required=True, help="the advisor's user id")
    p.add_argument("--as-of", help="as-of date YYYY-MM-DD (default: the latest closed NYSE session)")
    p.set_defaults(func=cmd_keep_washing_buy)

    p = commands.add_parser("audit", help="verify or export the audit chain")
    audit_commands = p.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser("verify", help="check the keyed chain against its anchors, decisions and packages; "
                              "name what is missing, altered or inserted (exit 1)")
    audit_commands.add_parser("anchor", help="verify the chain and write its head to a write-once anchor file")
    e = audit_commands.add_parser("export", help="write an examiner's archive: events, decisions, packages and a "
                                  "signed manifest (docs/audit.md shows how to verify it without rebal)")
    e.add_argument("--out", required=True, help="folder to write audit-<from>_<to>/ (or audit-<today>/) into")
    e.add_argument("--from", dest="date_from", type=_day, help="first day YYYY-MM-DD (default: the first event)")
    e.add_argument("--to", dest="date_to", type=_day, help="last day YYYY-MM-DD (default: the last event)")
    p.set_defaults(func=cmd_audit)

    p = commands.add_parser("instance", help="set up the Dagster instance in DAGSTER_HOME for rebal")
    p.add_subparsers(dest="instance_command", required=True).add_parser(
        "init", help="limit the warehouse pool to one run (run once per instance; idempotent)"
    ).set_defaults(func=cmd_instance_init)

    p = commands.add_parser("api", help="serve the approval API (needs REBAL_LINK_SECRET, ≥ 32 bytes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)

    p = commands.add_parser("orders-executed", help="trading desk: confirm a decision's (or a market-event "
                                                "batch release's, mev-YYYYMMDD-r<n>) staged orders were placed")
    p.add_argument("--decision", required=True)
    p.add_argument("--by", required=True, help="the trading-desk user id")
    p.set_defaults(func=cmd_orders_executed)

    p = commands.add_parser("orders-cancel", help="trading desk: cancel a decision's staged orders (releases the "
                                                  "account for the next recommendation)")
    p.add_argument("--decision", required=True)
    p.add_argument("--by", required=True, help="the trading-desk or operations user id")
    p.add_argument("--reason", required=True, help="why the orders are cancelled (recorded in the audit trail)")
    p.set_defaults(func=cmd_orders_cancel)

    p = commands.add_parser("connections", help="custodian connections (connections.yaml)")
    connection_commands = p.add_subparsers(dest="connections_command", required=True)
    c = connection_commands.add_parser("authorize", help="authorize rebal at a custodian's OAuth API: without "
                                       "--code prints the address to open; with --code/--state stores the tokens")
    c.add_argument("name", help="the connection's name")
    c.add_argument("--code", help="the code from the custodian's redirect")
    c.add_argument("--state", help="the state from the custodian's redirect")
    c.set_defaults(func=cmd_connections_authorize)

    p = commands.add_parser("users", help="the people in the workflow store (from users.csv)")
    users_commands = p.add_subparsers(dest="users_command", required=True)
    u = users_commands.add_parser("list", help="everyone: role, active or not, team, token")
    u.set_defaults(func=cmd_users_list)
    u = users_commands.add_parser("deactivate", help="revoke a user at once (token and links refused), between feeds")
    u.add_argument("user_id")
    u.add_argument("--reason", required=True, help="why (at least 10 characters; kept in the audit trail)")
    u.add_argument("--by", help="who is doing it (default: the login name)")
    u.set_defaults(func=cmd_users_deactivate)

    p = commands.add_parser("issue-token", help="issue an approval-API token for a user (printed once)")
    p.add_argument("user_id")
    p.set_defaults(func=cmd_issue_token)

    p = commands.add_parser("benchmark", help="time each stage at 10k and 100k accounts; writes BENCHMARKS.md")
    p.add_argument("--accounts", default="10000,100000", help="comma-separated book sizes (default %(default)s)")
    p.add_argument("--million", action="store_true", help="also run 1,000,000 accounts")
    p.add_argument("--output", default=str(settings.REPO_ROOT / "BENCHMARKS.md"))
    p.add_argument("--work-dir", help="where feeds and warehouses go (default: a temp dir)")
    p.set_defaults(func=cmd_benchmark)

    from rebal_pipeline.market_events import command as market_event_command

    p = commands.add_parser("market-event", help=market_event_command.HELP)
    market_event_command.add_arguments(p)
    p.set_defaults(func=market_event_command.run)

    from rebal_pipeline.supervision import command as supervision_command

    p = commands.add_parser("supervisory-report", help=supervision_command.HELP)
    supervision_command.add_arguments(p)
    p.set_defaults(func=supervision_command.run)

    args = parser.parse_args(argv)
    try:  # validated at start: a malformed REBAL_* variable is one line naming it, exit 2
        settings.load_settings()
    except settings.SettingsError as exc:
        print(f"rebal: {exc}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
