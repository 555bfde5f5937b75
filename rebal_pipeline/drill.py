"""The sandbox drill: a synthetic RIA book through the real daily asset graph, end to end.

It uses the embedded default set-up: a Dagster instance on SQLite under a project-local
DAGSTER_HOME and the DuckDB warehouse file, so the run is visible in the Dagster UI afterwards.

Contract:
- A drill starts from an empty home (`start_drill_home`): the REBAL_HOME folder (default
  <repo>/.rebal) holds only this drill's book, warehouse, Dagster instance and workflow store, so
  every count in the summary is this drill's. What an earlier drill left there is moved aside
  into <home>/previous_drills/<UTC time>/ (the three most recent drills are kept; older ones
  are removed, and only if they carry the drill's mark file). Nothing is deleted that is not a
  drill's: a REBAL_HOME the user set that holds other files, or a location variable pointing
  outside the home (DAGSTER_HOME, REBAL_WAREHOUSE, …), is refused with `DrillHomeRefused` and
  a message saying what to do. `keep=True` (`rebal drill --keep`) runs on top of what is there.
- `materialize_day` runs the daily job in process and shows its progress on stderr from the
  run's own event stream (rebal_pipeline/progress.py); stdout carries only the summary.
- `summarize_day` / `workflow_summary` say in the advisor's words what the day found: every
  count with its noun through `plural` (1 account, 2 accounts), every row naming what it counts,
  a tax saving worded as a saving, suspended accounts counted apart from the scanned ones.
- `run_loop` (after the scan, unless `rebal drill --no-loop`) runs the rest of the story with
  rebal's own jobs on the same instance, against local servers it starts and stops (an SMTP sink,
  a Redtail-style CRM stand-in, the approval API: rebal_pipeline/sandbox/): the advisor's alerts,
  one approval by its emailed link and one modification in the portal, the gate and the staged
  FIX / custodian files, the desk's confirmation, the client confirmation and the CRM note. Each
  run is the one the sensor would request, for what the sensor's queue says is owed; the emails
  received are saved as <home>/drill/mail/NN-<kind>.eml. Running it again on the same home
  sends and records nothing new, and says so.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb

from rebal_pipeline import settings
from rebal_pipeline.core.money import dollars, tax_effect_words
from rebal_pipeline.core.pii import mask_account, masker

LOCAL_INSTANCE_YAML = Path(__file__).resolve().parent / "instance" / "local_dagster.yaml"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """A count with its noun: "1 account", "2 accounts", "1,250 lots", "0 trades";
    `plural_form` for the words that do not just take an s ("1 household is", "2 households are")."""
    words = singular if count == 1 else (plural_form if plural_form is not None else f"{singular}s")
    return f"{count:,} {words}"


# --- the drill's home ---------------------------------------------------------------------------

DRILL_MARK = ".rebal-drill"  # this file in a folder says: the folder is a drill's home
PREVIOUS_DRILLS = "previous_drills"
KEEP_PREVIOUS_DRILLS = 3


class DrillHomeRefused(Exception):
    """A fresh drill would have to move or shadow data that is not a drill's; the message says
    what to do instead."""


@dataclass(frozen=True)
class DrillHome:
    path: Path
    kept: bool  # --keep: what earlier drills left in the home is still there and counts
    moved_to: Path | None  # where the previous drill's files went, if there were any
    moved_a_drill: bool = True  # False: what was moved carried no drill mark (e.g. a .rebal from before marks)

    def describe(self) -> str:
        if self.kept:
            return f"Drill home: {self.path} (--keep: what earlier drills left there counts too)"
        if self.moved_to is not None and self.moved_a_drill:
            return f"Drill home: {self.path} (fresh; the previous drill was moved to {self.moved_to})"
        if self.moved_to is not None:
            return f"Drill home: {self.path} (fresh; the files that were there were moved to {self.moved_to})"
        return f"Drill home: {self.path} (fresh)"


def _home_contents(home: Path) -> list[Path]:
    """What is in the home besides the earlier drills already moved aside."""
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if p.name != PREVIOUS_DRILLS)


def _mark(home: Path) -> None:
    from rebal_pipeline.core.private_files import private_dir

    private_dir(home)  # run logs and the workflow store hold client data: 0700 when created here
    (home / DRILL_MARK).write_text(
        f"rebal drill home, started {datetime.now(timezone.utc).isoformat(timespec='seconds')}.\n"
        f"The next `rebal drill` (without --keep) moves this folder's files into {PREVIOUS_DRILLS}/.\n",
        encoding="utf-8")


def _outside_the_home(config: settings.RebalSettings, home: Path) -> list[str]:
    """The location variables set to somewhere outside the home: a fresh home would not make
    those fresh, so earlier runs' data there would count."""
    def outside(path: Path | None) -> bool:
        return path is not None and not Path(path).resolve().is_relative_to(home)

    found = [f"{name}={path}" for name, path in (
        ("DAGSTER_HOME", config.dagster_home_dir), ("REBAL_WAREHOUSE", config.warehouse_file),
        ("REBAL_FEED_ROOT", config.feed_root_dir), ("REBAL_ARCHIVE_ROOT", config.archive_root_dir),
        ("REBAL_WASH_SALE_OVERRIDES", config.wash_sale_overrides_file),
        ("REBAL_AUDIT_ANCHOR_DIR", config.audit_anchor_dir)) if outside(path)]
    if config.workflow_db is not None:
        url = config.workflow_db.get_secret_value()
        if not (url.startswith("sqlite:///") and not outside(Path(url.removeprefix("sqlite:///")))):
            found.append("REBAL_WORKFLOW_DB_URL")  # its value may hold a password: named, not shown
    return found


def _move_aside(home: Path) -> Path:
    """Move the home's files (the previous drill) into previous_drills/<UTC time>/; the mark
    last, so an interrupted move leaves the rest still marked as a drill's."""
    from rebal_pipeline.core.private_files import private_dir

    previous = home / PREVIOUS_DRILLS
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = previous / stamp, 1
    while target.exists():
        target, n = previous / f"{stamp}-{n}", n + 1
    private_dir(target)
    contents = _home_contents(home)
    for entry in sorted(contents, key=lambda p: p.name == DRILL_MARK):
        entry.rename(target / entry.name)
    # Only drills carrying the mark are ever removed: an unmarked folder moved aside (e.g. a
    # .rebal from before drills were marked) may hold the user's own files and stays.
    # Oldest first by when each drill started (its mark file was written then and moved with it).
    marked = sorted((p for p in previous.iterdir() if (p / DRILL_MARK).is_file()),
                    key=lambda p: ((p / DRILL_MARK).stat().st_mtime_ns, p.name))
    for old in marked[:-KEEP_PREVIOUS_DRILLS]:
        shutil.rmtree(old)
    return target


def start_drill_home(keep: bool = False) -> DrillHome:
    """Make the drill's home ready: empty (the previous drill moved aside) unless `keep`.
    Raises DrillHomeRefused rather than move a folder that is not a drill's."""
    config = settings.current()
    home = config.rebal_home()
    contents = _home_contents(home)
    is_drills = not contents or (home / DRILL_MARK).is_file()
    if keep:
        if is_drills:
            _mark(home)
        return DrillHome(home, kept=True, moved_to=None)
    outside = _outside_the_home(config, home)
    if outside:
        raise DrillHomeRefused(
            f"the drill starts from an empty home ({home}), but {', '.join(outside)} "
            f"{'points' if len(outside) == 1 else 'point'} outside it, where earlier runs would still count. "
            "Unset it for the drill, or pass --keep to run on top of what is there.")
    # The default home (<repo>/.rebal) is the drill's own folder: moved aside, never deleted.
    if contents and not is_drills and config.home is not None:
        shown = ", ".join(p.name for p in contents[:5]) + (", …" if len(contents) > 5 else "")
        raise DrillHomeRefused(
            f"REBAL_HOME={home} holds files that are not a drill's ({shown}; no {DRILL_MARK} file), and a "
            "drill starts from an empty home. Point REBAL_HOME at an empty or new folder (or unset it for "
            "<repo>/.rebal), or pass --keep to run on top of what is there.")
    moved_to = _move_aside(home) if contents else None
    _mark(home)
    return DrillHome(home, kept=False, moved_to=moved_to, moved_a_drill=is_drills)


def prepare_local_instance() -> Path:
    """Point DAGSTER_HOME at the project-local embedded instance (created on first use)."""
    home = settings.dagster_home()
    from rebal_pipeline.core.private_files import private_dir
    private_dir(home)  # run logs and event metadata hold client data: 0700 when created here
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(LOCAL_INSTANCE_YAML, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    # The drill is a sandbox: without REBAL_AUDIT_KEY its audit chain is signed with the public
    # sandbox key (workflow/audit.py), which production verification refuses.
    os.environ.setdefault("REBAL_SANDBOX", "1")
    from dagster import DagsterInstance

    from rebal_pipeline.resources import ensure_warehouse_pool

    with DagsterInstance.get() as instance:
        ensure_warehouse_pool(instance)  # backfills from the UI of this instance run one at a time
    return home


def materialize_day(as_of: date, progress=None) -> bool:
    """Run the daily_drift_scan job for one as-of date on the configured Dagster instance, its
    progress on stderr (`progress`: a progress.RunProgress; default one labelled "drill")."""
    from dagster import DagsterInstance

    from rebal_pipeline.definitions import build_definitions
    from rebal_pipeline.progress import RunProgress, execute_with_progress

    job = build_definitions().resolve_job_def("daily_drift_scan")
    with DagsterInstance.get() as instance:
        result = execute_with_progress(
            job, instance, progress if progress is not None else RunProgress("drill"),
            partition_key=as_of.isoformat(),
            raise_on_error=False,
            # Step-by-step DEBUG events stay in the run's event log (see them in the UI);
            # the terminal shows warnings (e.g. ignored feed columns) and failures.
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"FAILED {event.step_key}: {event.step_failure_data.error.message.strip() if event.step_failure_data.error else ''}")
                user = event.step_failure_data.user_failure_data
                if user and user.description:
                    print(f"  {user.description}")
    return result.success


# skipped_accounts.reason_kind → the summary's row label and why those accounts were not scanned.
SKIPPED_WORDS = {
    "data_quality": ("held out for data quality", "rejected feed rows below; not scanned"),
    "suspended": ("suspended", "cannot be traded; not scanned"),
    "no_market_value": ("no market value", "nothing to rebalance; not scanned"),
}
# drift_alerts.delivery → how the advisor hears of the alert.
DELIVERY_WORDS = {"same_day": "delivered same day", "within_48h": "delivered within 48 h",
                  "weekly_batch": "in the weekly batch"}


@dataclass
class DaySummary:
    text: str
    alerts: int
    rejects: int


def summarize_day(warehouse: Path, as_of: date, top: int = 10) -> DaySummary:
    """What an advisor or operations lead wants to see after the scan, as plain text."""
    with duckdb.connect(str(warehouse), read_only=True) as con:
        q = lambda sql: con.execute(sql, [as_of]).fetchall()  # noqa: E731
        accounts_in_feed = q("select count(*) from stg_feed_accounts where as_of = ?")[0][0]
        # Scanned: drift was judged. Suspended accounts (they cannot be traded) and accounts with
        # nothing to rebalance are in skipped_accounts with their reason, and counted there only.
        scanned, aum = q(
            """select count(*), coalesce(sum(s.market_value), 0) from int_scanned_accounts s
               anti join skipped_accounts k on k.as_of = s.as_of and k.account_id = s.account_id
               where s.as_of = ?"""
        )[0]
        skipped = q(
            "select reason_kind, count(*) from skipped_accounts where as_of = ? group by all order by all"
        )
        by_tier = q(
            """select tier, urgency, delivery, count(*) filter (where status = 'alert'),
                      count(*) filter (where status = 'skipped'),
                      count(*) filter (where tlh_flag and status = 'alert')
               from drift_alerts where as_of = ? group by tier, urgency, delivery
               order by case tier when 'premium' then 0 when 'standard' then 1 else 2 end, urgency"""
        )
        scopes = q(
            "select scope, count(*) from drift_alerts where as_of = ? and status = 'alert' group by all order by all"
        )
        top_rows = con.execute(
            """select scope, scope_id, advisor_id, tier, urgency, max_abs_drift, breached_classes, market_value
               from drift_alerts where as_of = ? and status = 'alert'
               order by max_abs_drift desc, scope_id limit ?""",
            [as_of, top],
        ).fetchall()
        rejects = q("select file, line, \"column\", value, reason from rejects where as_of = ? order by file, line, \"column\"")
        # Every account number the summary could show (the book's and the rejected rows'): masked below.
        accounts = [a for (a,) in con.execute("select account_id from stg_feed_accounts where as_of = $1 union "
                                             "select account_id from rejects where as_of = $1", [as_of]).fetchall()]
        policy = q("select any_value(policy_version) from drift_policy where as_of = ?")[0][0]
        proposals = q(
            """select count(*), count(*) filter (where inside_bands), coalesce(sum(trade_count), 0),
                      count(*) filter (where compliance_review is not null),
                      count(*) filter (where scope = 'household')
               from trade_recommendations where as_of = ? and kind = 'rebalance'"""
        )[0]
        tax = q(
            """select coalesce(sum(st_gain), 0), coalesce(sum(lt_gain), 0), coalesce(sum(realized_loss), 0),
                      coalesce(sum(est_tax_this_year), 0), coalesce(sum(trade_value), 0),
                      count(*) filter (where wait_for_long_term),
                      coalesce(sum(tax_saved_by_waiting) filter (where wait_for_long_term), 0),
                      coalesce(sum(loss_carryforward), 0)
               from recommendation_summary where as_of = ? and kind = 'rebalance'"""
        )[0]
        harvests = q(
            """select count(*) filter (where status = 'proposed'), count(*),
                      coalesce(sum(unrealized_loss) filter (where status = 'proposed'), 0),
                      count(distinct recommendation_id) filter (where status = 'proposed'),
                      count(*) filter (where wash_sale_conflict)
               from tlh_candidates where as_of = ?"""
        )[0]
        # A day without any wash sale writes wash_sales with only as_of and sale_id: nothing to count.
        wash_columns = {row[0] for row in con.execute("describe wash_sales").fetchall()}
        washes = q(
            """select "when", count(*), coalesce(sum(disallowed_loss), 0),
                      count(*) filter (where loss_lost_permanently), count(*) filter (where disallowed_loss is null)
               from wash_sales where as_of = ? group by all order by all"""
        ) if "when" in wash_columns else []
        substituted = q(
            "select count(*) from trade_proposals where as_of = ? and reason = 'substitute' and replaces_symbol is not null"
        )[0][0]
        wait_examples = q(
            """select scope_id, wait_reason from recommendation_summary
               where as_of = ? and wait_for_long_term order by tax_saved_by_waiting desc, scope_id limit 3"""
        )

    alerts = sum(r[3] for r in by_tier)
    skipped_by_kind = dict(skipped)
    lines = [
        f"rebal daily drift scan — as of {as_of.isoformat()} (policy {policy})",
        "",
        f"Accounts in feed               {accounts_in_feed:>10,}",
    ]
    # Every account of the feed is in exactly one of these rows: held out, skipped, or scanned.
    for kind, count in skipped:
        label, why = SKIPPED_WORDS.get(kind, (kind.replace("_", " "), "not scanned"))
        lines.append(f"  {label:<29}{count:>10,}   ({why})")
    lines.append(f"Accounts scanned               {scanned:>10,}   (market value ${aum:,.0f})")

    by_scope = dict(scopes)
    lines += ["", f"Drift alerts: {alerts:,} ({plural(by_scope.get('account', 0), 'account alert')}, "
                  f"{plural(by_scope.get('household', 0), 'household alert')} for households rebalanced as one)"
              + "".join(f", {plural(n, f'{s} alert')}" for s, n in scopes if s not in ("account", "household"))]
    for tier, urgency, delivery, n_alert, n_skipped, n_tlh in by_tier:
        row = (f"  {tier + ' tier':<15}{urgency + ' urgency':<16}{DELIVERY_WORDS.get(delivery, delivery):<22}"
               f"{plural(n_alert, 'alert'):>11}")
        if n_tlh:
            row += f", {n_tlh:,} with a tax-loss harvest opportunity"
        if n_skipped:  # breaches kept with status 'skipped': on suspended accounts, not alerted
            row += (f"; {plural(n_skipped, 'breach on a suspended account', 'breaches on suspended accounts')}"
                    " not alerted")
        lines.append(row)
    if top_rows:
        lines += ["", f"Top {len(top_rows)} drifted: the largest drift from target first"]
    else:
        lines += ["", "No account or household drifted out of its bands."]
    for scope, scope_id, advisor, tier, _urgency, max_drift, classes, mv in top_rows:
        shown = mask_account(scope_id) if scope == "account" else scope_id
        lines.append(
            f"  {scope:<10}{shown:<14}advisor {advisor or '-':<10}{tier + ' tier':<15}"
            f"max drift {max_drift * 100:>5.1f}%   market value {'$' + format(mv, ',.0f'):>12}   breached: {classes}"
        )
    recs, inside, trade_count, reviews, households = proposals
    lines += [
        "",
        f"Trade proposals: {plural(recs, 'recommendation')} ({plural(recs - households, 'account')}, "
        f"{plural(households, 'household')} through the asset-location optimiser), {plural(trade_count, 'trade')}; "
        f"{inside:,} back inside every band after whole-share rounding, "
        f"{plural(recs - inside, 'explains the band it cannot reach', 'explain the bands they cannot reach')}; "
        f"{reviews:,} flagged for compliance review",
    ]
    st, lt, loss, est_tax, traded, waits, saved, carried = tax
    lots_proposed, lots_found, harvest_loss, harvest_recs, conflicts = harvests
    lines += [
        "",
        f"Tax impact of the rebalancing sells: short-term gain ${st:,.0f}, long-term gain ${lt:,.0f}, "
        # A saving is worded as one (core/money.py), never "$-121"; net losses beyond the IRC
        # §1211(b) limit are carried forward (§1212(b)), not counted as this year's saving.
        f"losses ${loss:,.0f}; {tax_effect_words(est_tax, places=0)} this year "
        f"({(abs(est_tax) / traded * 100) if traded else 0:.2f}% of ${traded:,.0f} traded)"
        + (f"; ${carried:,.0f} of net capital losses carried forward (IRC §1211(b) limit)" if carried >= 0.5 else ""),
        # What waiting would save is a saving too, and labelled as one.
        f"  wait for long-term advised on {plural(waits, 'recommendation')}"
        + (f" (estimated tax saving by waiting {dollars(saved, 0)})" if waits else ""),
    ]
    for scope_id, reason in wait_examples:
        lines.append(f"    {scope_id}: {reason}")
    lines.append(
        f"Tax-loss harvesting: {plural(lots_found, 'lot')} down at least the threshold; "
        f"{plural(harvest_recs, 'harvest recommendation')} selling {plural(lots_proposed, 'lot')} "
        f"(realising ${harvest_loss:,.0f} of losses) into their substitutes; "
        f"{plural(conflicts, 'lot')} blocked by a wash-sale conflict"
    )
    for when, count, disallowed, lost, unchecked in washes:
        if when == "past":
            lines.append(f"Wash sales in the last 30 days: {count - unchecked:,} found (${disallowed:,.0f} of losses "
                         f"disallowed, {lost:,} of them lost for good in an IRA); "
                         f"{plural(unchecked, 'sell')} not checkable (no basis reported)")
        else:
            lines.append(f"Wash sales the proposals would still cause: {count:,} (${disallowed:,.0f} of losses disallowed)")
    lines.append(f"Buys replaced by their substitute to avoid a wash sale: {substituted:,}")
    held = skipped_by_kind.get("data_quality", 0)
    lines += ["", f"Rejected feed rows: {len(rejects)} ({plural(held, 'account')} held out with a data-quality alert)"]
    for file, line, column, value, reason in rejects[:15]:
        lines.append(f"  {file}:{line} [{column}] {value!r}: {reason}")
    if len(rejects) > 15:
        lines.append(f"  … {plural(len(rejects) - 15, 'more row')} in table rejects")
    # Account numbers leave the warehouse as ••••1234 (core/pii.py); household ids stay as they are.
    return DaySummary(masker(accounts)("\n".join(lines)), alerts, len(rejects))


def workflow_summary(as_of: date) -> str:
    """What the day left for the advisors in the workflow store, and the audit chain's state."""
    from sqlalchemy import func, select

    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.schema import recommendations
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore.from_env()
    try:
        with store.begin() as conn:
            by_status = conn.execute(
                select(recommendations.c.status, recommendations.c.kind, func.count())
                .where(recommendations.c.as_of == as_of).group_by(recommendations.c.status, recommendations.c.kind)
                .order_by(recommendations.c.kind, recommendations.c.status)).all()
            advisors = conn.execute(select(func.count(func.distinct(recommendations.c.advisor_id)))
                                    .where(recommendations.c.as_of == as_of)).scalar()
            chain = audit.verify(conn)
    finally:
        store.dispose()
    kinds: dict[str, list[tuple[str, int]]] = {}
    for status, kind, n in by_status:
        kinds.setdefault(kind, []).append((status.replace("_", "-"), n))
    # One group per kind, saying what it counts: "65 rebalance recommendations (8 auto-approved, 57 pending)".
    parts = "; ".join(
        f"{plural(sum(n for _, n in found), f'{kind} recommendation')} "
        f"({', '.join(f'{n:,} {status}' for status, n in found)})" for kind, found in kinds.items()
    ) or "no recommendations"
    return (f"Workflow store ({settings.workflow_db_url().split('://')[0]}): {parts}; "
            f"routed to {plural(advisors, 'advisor')}\n"
            f"Audit: {chain}")


def deliver_over_sftp(book_dir: Path, as_of: date, dialect: str, firm: str = "sandbox-ria") -> list[str]:
    """The custodian's side of the drill: the sandbox book's custodian files in `dialect` on a real
    in-process SFTP server (its own host key, pinned in a known_hosts file; key auth), pulled and
    translated into the canonical feed exactly as a production connection would. Returns what
    happened, in lines for the drill's output."""
    import shutil

    from rebal_pipeline.connections.config import Connection, SftpSettings
    from rebal_pipeline.connections.dialects import REFERENCE_FILES
    from rebal_pipeline.connections.ingest import pull_and_convert, reference_dir
    from rebal_pipeline.core.feed_contract import FEED_FILES
    from rebal_pipeline.sandbox.dialects import emit_dialect
    from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519

    work = settings.rebal_home() / "sandbox_custodian"
    outbound = work / "outbound" / dialect
    if outbound.exists():
        shutil.rmtree(outbound)
    emitted = emit_dialect(book_dir / as_of.isoformat(), dialect, outbound)
    connection = Connection(name=f"sandbox-{dialect}", firm=firm, custodian=dialect, dialect=dialect, kind="sftp",
                            sftp=SftpSettings(host="127.0.0.1", port=22, username="custodian",
                                              private_key_file_env="REBAL_SANDBOX_SFTP_KEY",
                                              known_hosts_file=str(work / "known_hosts")))
    reference = reference_dir(connection)
    reference.mkdir(parents=True, exist_ok=True)
    for name in REFERENCE_FILES:
        shutil.copyfile(book_dir / as_of.isoformat() / FEED_FILES[name].filename, reference / FEED_FILES[name].filename)
    host, client = make_ed25519(), make_ed25519()
    (work / "keys").mkdir(parents=True, exist_ok=True)
    key_file = work / "keys" / "id_ed25519"
    key_file.unlink(missing_ok=True)
    os.environ["REBAL_SANDBOX_SFTP_KEY"] = str(client.write(key_file))
    with SftpTestServer(outbound, host_key=host.pkey, client_key=client.pkey) as server:
        (work / "known_hosts").write_text(server.known_hosts_line() + "\n")
        connection = connection.model_copy(update={"sftp": connection.sftp.model_copy(update={"port": server.port})})
        deliveries = pull_and_convert(connection, settings.feed_root())
        port = server.port
    lines = [f"Custodian delivery: {plural(len(emitted), f'{dialect}-style file')} on sftp://127.0.0.1:{port} "
             f"(host key pinned in {work / 'known_hosts'}, key authentication)"]
    for d in deliveries:
        lines.append(f"  pulled, archived by SHA-256 and translated for {d.as_of} → {d.feed_dir}")
    if not deliveries:
        lines.append("  nothing new to translate (already pulled and translated)")
    return lines


def deliver_by_custodian(book_dir: Path, as_of: date, firm: str = "sandbox-ria") -> list[str]:
    """A firm with accounts at three custodians, each delivering its own accounts its own way:
    Schwab-style files and Pershing-style files on a real in-process SFTP server (a folder each;
    host key pinned, key authentication), and Fidelity's accounts through the sandbox custodian
    OAuth 2.0 API (authorization-code grant, encrypted tokens, cursor pagination). Each pull
    becomes that connection's part; the day's canonical feed is assembled once all three are in.
    Returns what happened, in lines for the drill's output."""
    import csv
    import secrets
    from urllib.parse import parse_qs, urlsplit

    import httpx
    from cryptography.fernet import Fernet

    from rebal_pipeline.connections.config import Connection, Connections, OAuthSettings, SftpSettings
    from rebal_pipeline.connections.dialects import REFERENCE_FILES
    from rebal_pipeline.connections.ingest import pull_and_convert, pull_from_api, reference_dir
    from rebal_pipeline.connections.oauth_api import CustodianApi, OAuthApiConfig
    from rebal_pipeline.core.feed_contract import FEED_FILES
    from rebal_pipeline.sandbox.custodian_api import SandboxCustodianApi
    from rebal_pipeline.sandbox.dialects import emit_dialect
    from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519

    canonical = book_dir / as_of.isoformat()
    work = settings.rebal_home() / "sandbox_custodian"
    with open(canonical / FEED_FILES["accounts"].filename, newline="", encoding="utf-8") as handle:
        accounts_at: dict[str, set[str]] = {}
        for row in csv.DictReader(handle):
            accounts_at.setdefault(row["custodian"], set()).add(row["account_id"])
    outbound = work / "outbound" / "by_custodian"
    if outbound.exists():
        shutil.rmtree(outbound)
    emitted = {d: emit_dialect(canonical, d, outbound / d, account_ids=accounts_at.get(d, set()))
               for d in ("schwab", "pershing")}

    # Sandbox credentials, for this process only: a production deployment sets these in its env.
    os.environ.update({"REBAL_SANDBOX_SFTP_KEY": "", "REBAL_SANDBOX_API_CLIENT_ID": "rebal-sandbox",
                       "REBAL_SANDBOX_API_CLIENT_SECRET": secrets.token_urlsafe(24)})
    os.environ.setdefault("REBAL_TOKEN_KEY", Fernet.generate_key().decode())
    host, client = make_ed25519(), make_ed25519()
    (work / "keys").mkdir(parents=True, exist_ok=True)
    key_file = work / "keys" / "id_ed25519"
    key_file.unlink(missing_ok=True)
    os.environ["REBAL_SANDBOX_SFTP_KEY"] = str(client.write(key_file))
    token_file = work / "tokens" / "sandbox-fidelity-api.bin"
    token_file.unlink(missing_ok=True)

    lines = []
    with SftpTestServer(outbound, host_key=host.pkey, client_key=client.pkey) as sftp_server, \
            SandboxCustodianApi(canonical, client_id=os.environ["REBAL_SANDBOX_API_CLIENT_ID"],
                                client_secret=os.environ["REBAL_SANDBOX_API_CLIENT_SECRET"],
                                account_ids=accounts_at.get("fidelity", set())) as api_server:
        (work / "known_hosts").write_text(sftp_server.known_hosts_line() + "\n")
        sftp = [Connection(name=f"sandbox-{d}", firm=firm, custodian=d, dialect=d, kind="sftp",
                           sftp=SftpSettings(host="127.0.0.1", port=sftp_server.port, username="custodian",
                                             private_key_file_env="REBAL_SANDBOX_SFTP_KEY",
                                             known_hosts_file=str(work / "known_hosts"), remote_dir=d))
                for d in ("schwab", "pershing")]
        api = Connection(name="sandbox-fidelity-api", firm=firm, custodian="fidelity", dialect="canonical",
                         kind="oauth_api", oauth=OAuthSettings(
                             base_url=api_server.url, token_url=f"{api_server.url}/oauth/token",
                             authorize_url=f"{api_server.url}/oauth/authorize",
                             redirect_uri="http://127.0.0.1/rebal/oauth/callback",
                             client_id_env="REBAL_SANDBOX_API_CLIENT_ID",
                             client_secret_env="REBAL_SANDBOX_API_CLIENT_SECRET", token_file=str(token_file)))
        siblings = Connections(connections=[*sftp, api]).custodian_connections
        reference = reference_dir(api)
        reference.mkdir(parents=True, exist_ok=True)
        for name in REFERENCE_FILES:
            shutil.copyfile(canonical / FEED_FILES[name].filename, reference / FEED_FILES[name].filename)

        # The operator's one-time authorization (rebal connections authorize), done by a script here:
        # the sandbox custodian approves at once and redirects back with the code.
        with CustodianApi(OAuthApiConfig.from_connection(api)) as client_api:
            state = secrets.token_urlsafe(16)
            redirect = httpx.get(client_api.authorization_url(state), follow_redirects=False)
            answer = {k: v[0] for k, v in parse_qs(urlsplit(redirect.headers["location"]).query).items()}
            if answer.get("state") != state:
                raise RuntimeError("the sandbox custodian answered with another OAuth state")
            client_api.exchange_code(answer["code"])

        for connection in sftp:
            count = len(emitted[connection.custodian])
            lines.append(f"{connection.name}: {plural(count, f'{connection.dialect}-style file')} for "
                         f"{plural(len(accounts_at.get(connection.custodian, ())), 'account')} on "
                         f"sftp://127.0.0.1:{sftp_server.port}/{connection.sftp.remote_dir} (host key pinned)")
            for d in pull_and_convert(connection, settings.feed_root(), siblings):
                lines.append(f"  pulled, archived, translated: {d.as_of} part in; {d.assembly.describe()}")
        d = pull_from_api(api, as_of, settings.feed_root(), siblings)
        lines.append(f"{api.name}: {plural(len(accounts_at.get('fidelity', ())), 'account')} through the OAuth 2.0 "
                     f"API at {api_server.url} (authorization code → encrypted tokens; "
                     f"{plural(len(d.raw_files), 'page')} archived)")
        lines.append(f"  pulled: {d.as_of} part in; {d.assembly.describe()}")
    return lines


# --- the whole loop: alert → advisor → gate → orders → desk → client -----------------------------

LOOP_DIR = "drill"  # <REBAL_HOME>/drill/: the loop's emails (mail/NN-<kind>.eml), its subjects, its link secret
SANDBOX_FIRM = "Sandbox RIA"
SANDBOX_SENDER_DOMAIN = "sandbox-ria.example"
SANDBOX_SENDER = f"Sandbox RIA <alerts@{SANDBOX_SENDER_DOMAIN}>"
# Variables the loop sets itself for its local deployment: the ones a user's environment may hold
# for a real relay, CRM, public URL or desk are left out, so the drill never sends anywhere else.
LOOP_OWNS = ("REBAL_SMTP_", "REBAL_CRM", "REBAL_WEALTHBOX_", "REBAL_REDTAIL_", "REBAL_PUBLIC_URL", "REBAL_LINK_",
             "REBAL_AUTO_SUBMIT_DISCRETIONARY", "REBAL_TRADING_DESK_ID", "REBAL_FIRM_NAME",
             "REBAL_CLIENT_CONFIRMATION")
LOOP_STEPS = ("Loop 1/6", "Loop 2/6", "Loop 3/6", "Loop 4/6", "Loop 5/6", "Loop 6/6")


@dataclass
class LoopResult:
    lines: list[str]
    ok: bool
    emails: list[Path]  # the .eml copies this loop received, in order
    crm_records: list  # what the CRM stand-in recorded (sandbox.local_peers.CrmRecord)


def _loop_secret(folder: Path) -> str:
    """The sandbox's link secret, kept in the drill's home (0600) so a later loop on the same home
    (`--keep`) still opens the links of the emails it saved."""
    import secrets

    from rebal_pipeline.core.private_files import make_private, private_dir

    private_dir(folder)
    path = folder / "sandbox_link_secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48), encoding="utf-8")
        make_private(path)
    return path.read_text(encoding="utf-8").strip()


def _loop_subjects(conn, as_of: date, now: datetime, folder: Path) -> dict | None:
    """The two recommendations the drill's advisor acts on: chosen once per home and day (kept in
    loop_<as_of>.json, so running the loop again acts on the same two and finds each step done). Chosen
    from the advisor_alerts sensor's queue: one advisor's first two account-scope rebalance
    recommendations, the second with a buy that can be made smaller."""
    import json
    from datetime import timedelta

    from sqlalchemy import select

    from rebal_pipeline.comms.waiting import recommendations_waiting_for_alert
    from rebal_pipeline.workflow.package import RecommendationPackage
    from rebal_pipeline.workflow.schema import recommendations

    path = folder / f"loop_{as_of.isoformat()}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    waiting = recommendations_waiting_for_alert(conn, now, now - timedelta(days=3), 100_000)
    r = recommendations.c
    rows = {row["recommendation_id"]: row for row in conn.execute(
        select(r.recommendation_id, r.advisor_id, r.kind, r.scope, r.package)
        .where(r.as_of == as_of, r.recommendation_id.in_([w["recommendation_id"] for w in waiting]))).mappings()}
    by_advisor: dict[str, list[str]] = {}
    for w in waiting:
        row = rows.get(w["recommendation_id"])
        if row is None or row["kind"] != "rebalance" or row["scope"] != "account" or not row["advisor_id"]:
            continue
        package = RecommendationPackage.model_validate_json(row["package"])
        has_buy = any(t.side == "buy" and t.quantity >= 2 for t in package.trades)
        chosen = by_advisor.setdefault(row["advisor_id"], [])
        if not chosen or has_buy:
            chosen.append(row["recommendation_id"])
        if len(chosen) == 2:
            subjects = {"advisor_id": row["advisor_id"], "approve": chosen[0], "modify": chosen[1]}
            path.write_text(json.dumps(subjects, indent=2) + "\n", encoding="utf-8")
            return subjects
    return None


def _loop_deployment(home: Path, secret: str, sink, crm, api_url: str, desk_id: str) -> dict[str, str]:
    """The REBAL_* variables of the drill's local deployment: the process environment (the
    home, the store, the warehouse) with the relay, CRM, links and desk pointed at the loop's
    local peers."""
    deployment = {k: v for k, v in os.environ.items() if not k.startswith(LOOP_OWNS)}
    deployment.update({
        "REBAL_HOME": str(home), "REBAL_SANDBOX": "1",
        "REBAL_SMTP_HOST": sink.host, "REBAL_SMTP_PORT": str(sink.port), "REBAL_SMTP_STARTTLS": "false",
        "REBAL_SMTP_FROM": SANDBOX_SENDER, "REBAL_SMTP_TIMEOUT": "10", "REBAL_FIRM_NAME": SANDBOX_FIRM,
        "REBAL_LINK_SECRET": secret, "REBAL_PUBLIC_URL": api_url,
        "REBAL_CRM": "redtail", "REBAL_REDTAIL_BASE_URL": crm.url, "REBAL_REDTAIL_API_KEY": crm.api_key,
        "REBAL_REDTAIL_USER_KEY": crm.user_key, "REBAL_CRM_MAX_ATTEMPTS": "2",
        "REBAL_AUTO_SUBMIT_DISCRETIONARY": "false", "REBAL_TRADING_DESK_ID": desk_id,
    })
    return deployment


def _save_mail(mail_dir: Path, received, kind: str) -> Path:
    """A received email, byte for byte, as <mail_dir>/NN-<kind>.eml (NN continues the folder's count)."""
    from rebal_pipeline.core.private_files import make_private, private_dir

    private_dir(mail_dir)
    number = len(list(mail_dir.glob("*.eml"))) + 1
    path = mail_dir / f"{number:02d}-{kind}.eml"
    path.write_bytes(received.data)
    make_private(path)  # the client's name and address are in it
    return path


def run_loop(as_of: date, progress=None) -> LoopResult:
    """The rest of the story after the daily scan, on the drill's Dagster instance, with the
    servers a deployment would have started locally (an SMTP sink, a CRM stand-in, the approval
    API): the advisor's alerts (send_advisor_alert), the advisor approving one recommendation by
    its emailed link and modifying another in the portal, the gate and orders (execute_rebalance),
    the desk's confirmation (`rebal orders-executed`), the client confirmation and CRM note
    (communicate_execution). Each run is what the sensor would request (its RunRequest's config
    and tags). Everything is exactly once: running the loop again on the same home sends nothing
    new and says so. Printed lines show accounts as ••••1234 and no client name or address (those
    are in the saved emails only). The servers stop when it returns, also on an error."""
    import email
    import email.policy
    from datetime import timedelta

    import httpx
    from dagster import DagsterInstance, Definitions, in_process_executor
    from sqlalchemy import select

    from rebal_pipeline.approval_api.app import create_app
    from rebal_pipeline.approval_api.testing import running_server
    from rebal_pipeline.comms.delivery import client_contacts
    from rebal_pipeline.comms.keys import alert_key
    from rebal_pipeline.comms.smtp import make_message_id
    from rebal_pipeline.comms.waiting import executed_decisions, recommendations_waiting_for_alert
    from rebal_pipeline.core.clock import utc_now
    from rebal_pipeline.defs.approvals.jobs import execute_rebalance
    from rebal_pipeline.defs.approvals.sensors import decision_run_request
    from rebal_pipeline.defs.comms.jobs import communicate_execution, send_advisor_alert
    from rebal_pipeline.defs.comms.sensors import alert_run_request, execution_run_request
    from rebal_pipeline.execution.submit import ExecutionError, confirm_executed
    from rebal_pipeline.progress import RunProgress
    from rebal_pipeline.resources import resources_for
    from rebal_pipeline.sandbox import advisor
    from rebal_pipeline.sandbox.local_peers import CrmStandIn, SmtpSink
    from rebal_pipeline.workflow import audit
    from rebal_pipeline.workflow.schema import decisions, recommendations, submissions, users
    from rebal_pipeline.workflow.store import WorkflowStore

    progress = progress if progress is not None else RunProgress("drill")
    home = settings.rebal_home()
    folder = home / LOOP_DIR
    mail_dir = folder / "mail"
    secret = _loop_secret(folder)
    lines: list[str] = ["The whole loop, on local servers (started for this drill, stopped at its end):"]
    saved: list[Path] = []
    result = LoopResult(lines, False, saved, [])
    store = WorkflowStore(settings.workflow_db_url())
    store.migrate()
    try:
        with store.begin() as conn:
            subjects = _loop_subjects(conn, as_of, utc_now(), folder)
            desk = conn.execute(select(users.c.user_id, users.c.name).where(
                users.c.role == "trading_desk", users.c.active.is_(True)).order_by(users.c.user_id)).first()
            staff = {u.user_id: (u.name, u.email) for u in conn.execute(select(users.c.user_id, users.c.name,
                                                                             users.c.email))}
        if subjects is None:
            lines.append("  no advisor has two account recommendations waiting for an alert today: nothing to show "
                         "(try more households or another --seed)")
            result.ok = True  # a quiet day is not a failure
            return result
        if desk is None:
            lines.append("  no active trading-desk user in users.csv: the loop cannot confirm orders")
            result.ok = True  # the book's choice, not a failure
            return result
        ids = [subjects["approve"], subjects["modify"]]
        with store.begin() as conn:
            recs = {row.recommendation_id: row for row in conn.execute(
                select(recommendations.c.recommendation_id, recommendations.c.scope_id, recommendations.c.household_id,
                       recommendations.c.urgency).where(recommendations.c.recommendation_id.in_(ids)))}
        accounts = [recs[i].scope_id for i in ids]

        with SmtpSink() as sink, CrmStandIn(api_key="sandbox-api-key", user_key="sandbox-user-key") as crm, \
                running_server(create_app(store, secret.encode("utf-8"))) as api_url, \
                httpx.Client(timeout=30) as browser:
            deployment = _loop_deployment(home, secret, sink, crm, api_url, desk.user_id)
            loop_settings = settings.load_settings(deployment)
            definitions = Definitions(jobs=[send_advisor_alert, execute_rebalance, communicate_execution],
                                      resources=resources_for(loop_settings), executor=in_process_executor)
            contacts = client_contacts(definitions.resources["warehouse"], accounts)
            private = sorted({text for c in contacts.values() for text in (c.client_name, c.client_email) if text},
                             key=len, reverse=True)
            mask_accounts = masker(accounts)

            def shown(text: str) -> str:
                """A line for the terminal: accounts ••••1234, client names and addresses left out."""
                text = mask_accounts(str(text))
                for value in private:
                    text = text.replace(value, "[client]")
                return text

            lines.append(f"  SMTP sink smtp://{sink.host}:{sink.port} · CRM stand-in (Redtail-style) {crm.url} · "
                         f"approval API and portal {api_url}")

            def run(job_name: str, request, subject: str) -> dict | None:
                """One run as the sensor would request it; its messages' outcomes (None: it failed)."""
                job = definitions.resolve_job_def(job_name)
                progress.say(f"{job_name} for {subject} …")
                with DagsterInstance.get() as instance:
                    outcome = job.execute_in_process(
                        instance=instance, raise_on_error=False,
                        run_config={**request.run_config,
                                    "loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                        tags={**request.tags, "dagster/run_key": request.run_key, "rebal/drill": "loop"})
                if not outcome.success:
                    for event in outcome.all_events:
                        if event.is_step_failure and event.step_failure_data.error:
                            lines.append(f"  FAILED {job_name} {event.step_key}: "
                                         f"{shown(event.step_failure_data.error.message.strip())}")
                    return None
                outputs = [e for e in outcome.all_node_events if e.is_successful_output]
                messages = [m for e in outputs for m in (e.step_output_data.metadata.get("messages").value
                                                         if e.step_output_data.metadata.get("messages") else [])]
                return {"run_id": outcome.run_id, "messages": messages}

            def statuses(outcome: dict) -> str:
                found: dict[str, int] = {}
                for m in outcome["messages"]:
                    word = {"sent": "sent", "already_sent": "already sent before: nothing new"}.get(m["status"], m["status"])
                    found[f"{m['kind']} {word}"] = found.get(f"{m['kind']} {word}", 0) + 1
                return ", ".join(f"{k}" + (f" ×{n}" if n > 1 else "") for k, n in found.items()) or "nothing to send"

            # 1. Alerts: the advisor_alerts sensor's queue, and the two this drill's advisor acts on.
            now = utc_now()
            with store.begin() as conn:
                owed = recommendations_waiting_for_alert(conn, now, now - timedelta(days=3), 100_000)
            name, address = staff.get(subjects["advisor_id"], (subjects["advisor_id"], ""))
            lines += ["", f"{LOOP_STEPS[0]} Alert emails (send_advisor_alert, as the advisor_alerts sensor requests "
                          f"it): {plural(len(owed), 'recommendation')} waiting for an alert; this drill sends the "
                          f"two that {name} ({subjects['advisor_id']}) acts on below, the sensor the rest once started"]
            alert_mail: dict[str, Path] = {}
            owed_ids = {w["recommendation_id"] for w in owed}
            for rec_id in ids:
                if rec_id not in owed_ids:  # the sensor would not ask again: its alert row is there
                    lines.append(f"  {mask_account(recs[rec_id].scope_id)} recommendation {rec_id[:12]}…: "
                                 "alert already sent before: nothing new")
                else:
                    outcome = run(send_advisor_alert.name, alert_run_request(rec_id, utc_now(), recs[rec_id].urgency),
                                  mask_account(recs[rec_id].scope_id))
                    if outcome is None:
                        return result
                    lines.append(f"  {mask_account(recs[rec_id].scope_id)} recommendation {rec_id[:12]}…: "
                                 f"{statuses(outcome)}")
                for received in sink.take_new():
                    message = email.message_from_bytes(received.data, policy=email.policy.default)
                    path = _save_mail(mail_dir, received, "alert")
                    saved.append(path)
                    alert_mail[rec_id] = path
                    links = advisor.email_links(message)
                    lines.append(f"    email to {', '.join(received.recipients)}: \"{shown(message['Subject'])}\"")
                    lines.append(f"      buttons: {' · '.join(k for k in links if k)}; saved as {path}")
                if rec_id not in alert_mail:  # sent by an earlier loop on this home: its saved copy
                    wanted = make_message_id(alert_key(rec_id, subjects["advisor_id"]), SANDBOX_SENDER_DOMAIN)
                    for path in sorted(mail_dir.glob("*-alert.eml")) if mail_dir.is_dir() else []:
                        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                        if message["Message-ID"] == wanted:
                            alert_mail[rec_id] = path
                            break
            for record in crm.records:
                if record.kind == "task":
                    lines.append(f"  CRM task #{record.id} for {record.contact}: \"{shown(record.body.get('subject', ''))}\" "
                                 f"assigned to {record.body.get('assigned_to')}, due {record.body.get('due_date')}")

            # 2. The advisor: approve one by its emailed link, modify the other in the portal.
            lines += ["", f"{LOOP_STEPS[1]} {name} decides, in the browser, from the emails"]
            with store.begin() as conn:
                decided = {d.recommendation_id: d for d in conn.execute(
                    select(decisions).where(decisions.c.recommendation_id.in_(ids),
                                            decisions.c.action.in_(("approve", "modify")))
                    .order_by(decisions.c.decision_seq))}
            for rec_id, how in ((subjects["approve"], "approve"), (subjects["modify"], "modify")):
                masked = mask_account(recs[rec_id].scope_id)
                if rec_id in decided:
                    d = decided[rec_id]
                    lines.append(f"  {masked}: already decided ({d.action} by {d.actor_id} via {d.via} at "
                                 f"{d.created_at:%Y-%m-%d %H:%M} UTC): nothing new recorded")
                    continue
                path = alert_mail.get(rec_id)
                if path is None:
                    lines.append(f"  {masked}: the alert email is not in {mail_dir}: nothing to click")
                    return result
                links = advisor.email_links(email.message_from_bytes(path.read_bytes(), policy=email.policy.default))
                button = "Approve" if how == "approve" else "Review or modify"
                if button not in links:
                    lines.append(f"  {masked}: the alert email {path} has no \"{button}\" button: nothing to click")
                    return result
                if how == "approve":
                    visit = advisor.approve_by_link(browser, links["Approve"])
                    lines.append(f"  {masked}: opened \"Approve\" from the email → page \"{shown(visit.opened.said())}\"; "
                                 f"pressed \"Approve these trades\"")
                else:
                    visit = advisor.modify_in_portal(
                        browser, links["Review or modify"],
                        reason="Drill: a smaller buy than proposed, to keep cash for a planned withdrawal")
                    lines.append(f"  {masked}: opened \"Review or modify\" → page \"{shown(visit.opened.said())}\"; "
                                 f"changed {shown(visit.changed)}, pressed \"Record these quantities\"")
                lines.append(f"    the page said (HTTP {visit.result.status}): {shown(visit.result.said())}")
                if visit.result.status not in (200, 201):
                    return result

            # 3. The gate and the orders: one execute_rebalance run per decision (approval_decisions).
            lines += ["", f"{LOOP_STEPS[2]} Approval gate → order tickets → staged for the trading desk "
                          "(execute_rebalance, as the approval_decisions sensor requests it)"]
            with store.begin() as conn:
                made = list(conn.execute(select(decisions).where(
                    decisions.c.recommendation_id.in_(ids), decisions.c.action.in_(("approve", "modify")))
                    .order_by(decisions.c.decision_seq)))
            for d in made:
                # The sensor asks for decisions whose gate verdict is still empty, and only those.
                checked_before = d.gate_verdict is not None
                if not checked_before and run(
                        execute_rebalance.name, decision_run_request(d.decision_id, d.recommendation_id, d.action),
                        f"the {d.action} of {mask_account(recs[d.recommendation_id].scope_id)}") is None:
                    return result
                with store.begin() as conn:
                    verdict = conn.execute(select(decisions.c.gate_verdict, decisions.c.gate_reason)
                                           .where(decisions.c.decision_id == d.decision_id)).first()
                    orders = list(conn.execute(select(submissions).where(submissions.c.decision_id == d.decision_id)
                                               .order_by(submissions.c.cl_ord_id)))
                lines.append(f"  {d.action} {d.decision_id[:12]}… ({mask_account(recs[d.recommendation_id].scope_id)}): "
                             f"gate {verdict.gate_verdict}" + (f" ({shown(verdict.gate_reason)})"
                                                               if verdict.gate_verdict != "passed" else "")
                             + (" (recorded by an earlier run: nothing new)" if checked_before else "")
                             + f"; {plural(len(orders), 'order')} "
                             + ", ".join(f"{o.side} {fmt_quantity(o)} {o.symbol}" for o in orders))
                staged = settings.outbox_root() / "staged" / d.decision_id
                for path in sorted(staged.glob("*")) if staged.is_dir() else []:
                    if not path.name.startswith("."):
                        lines.append(f"    {path}")

            # 4. The desk places them and says so (rebal orders-executed).
            lines += ["", f"{LOOP_STEPS[3]} The trading desk ({desk.name}, {desk.user_id}) places the staged orders "
                          "and confirms (rebal orders-executed --decision D --by " + desk.user_id + ")"]
            for d in made:
                with store.begin() as conn:
                    passed = conn.execute(select(decisions.c.gate_verdict).where(
                        decisions.c.decision_id == d.decision_id)).scalar() == "passed"
                if not passed:  # refused by the gate: no order to place, nothing for the client
                    lines.append(f"  {d.decision_id[:12]}…: no orders (the gate refused it)")
                    continue
                try:
                    with store.begin() as conn:
                        count = confirm_executed(conn, d.decision_id, desk.user_id, utc_now())
                except ExecutionError as error:
                    lines.append(f"  {d.decision_id[:12]}…: {shown(error)}")
                    return result
                lines.append(f"  {d.decision_id[:12]}…: " + (f"{plural(count, 'order')} confirmed executed" if count
                                                             else "already confirmed: nothing new"))

            # 5. The client and the CRM (communicate_execution, as executed_recommendations requests it).
            with store.begin() as conn:
                owed_confirmations = executed_decisions(conn, utc_now() - timedelta(days=7), 500)
            lines += ["", f"{LOOP_STEPS[4]} Client confirmation and CRM note (communicate_execution, as the "
                          f"executed_recommendations sensor requests it): "
                          f"{plural(len(owed_confirmations), 'executed decision')} owed one"]
            if not owed_confirmations:
                lines.append("  nothing new: every executed decision's client confirmation was already sent")
            for row in owed_confirmations:
                outcome = run(communicate_execution.name,
                              execution_run_request(row["decision_id"], row["recommendation_id"], utc_now()),
                              f"decision {row['decision_id'][:12]}…")
                if outcome is None:
                    return result
                lines.append(f"  decision {row['decision_id'][:12]}…: {statuses(outcome)}")
                for received in sink.take_new():
                    message = email.message_from_bytes(received.data, policy=email.policy.default)
                    path = _save_mail(mail_dir, received, "confirmation")
                    saved.append(path)
                    lines.append(f"    email to the client ({plural(len(received.recipients), 'address')}, "
                                 f"not shown here): \"{shown(message['Subject'])}\" → {path}")
            for record in crm.records:
                if record.kind == "note":
                    lines.append(f"  CRM note #{record.id} on contact {record.contact} "
                                 f"({record.body.get('category')}, {record.body.get('note_date')}):")
                    lines += [f"    {shown(text)}" for text in str(record.body.get("body", "")).splitlines() if text]

            # 6. Where things stand.
            with store.begin() as conn:
                states = dict(conn.execute(select(recommendations.c.recommendation_id, recommendations.c.status)
                                           .where(recommendations.c.recommendation_id.in_(ids))).all())
                chain = audit.verify(conn)
            lines += ["", f"{LOOP_STEPS[5]} Where it ended: "
                      + "; ".join(f"{mask_account(recs[i].scope_id)} {states.get(i, '?').replace('_', ' ')}" for i in ids)
                      + f"; {plural(len(saved), 'email')} received by this loop, {plural(len(crm.records), 'CRM record')}",
                      f"  Audit: {chain}",
                      f"  Emails (.eml, open in any mail client): {mail_dir}"]
            result.crm_records = list(crm.records)
            result.ok = True
            return result
    finally:
        store.dispose()


def fmt_quantity(order) -> str:
    """An order's size as the desk reads it: 12 shares, 12.5 shares, or $1,000.00 for a fund bought by amount."""
    if order.quantity is not None:
        return f"{order.quantity:,.4f}".rstrip("0").rstrip(".")
    return dollars(order.cash_amount or 0.0)
