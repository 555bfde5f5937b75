"""Runs launched by the approval sensors: `execute_rebalance` (approval gate → prepared trades →
order tickets → staged or submitted, exactly once per order) and `notify_recommendation` (a
reminder, an escalation or a weekly digest, recorded once).

Neither op waits for anybody: the human part happened before the run (a decision recorded in the
workflow store, or a due time passed), so a run is seconds long and can be re-executed safely.

The gate (`approval_gate`) re-verifies a decision before anything is prepared: the rules and the
order ledger it commits the accounts to are in rebal_pipeline/workflow/gate.py and ledger.py
(the state of the decision and its recommendation, who decided, the decision's record, and the
trades against the latest `holdings` partition NET of every open order of the accounts, one gate
per account at a time). Its verdict is recorded once with `lifecycle.record_gate_verdict` (audit
event `gate_passed` / `gate_refused` in the same transaction; a refusal hands the recommendation
back to whoever decides it now: pending, or escalated when it was with compliance).
A refusal is a normal outcome, not an error: the run SUCCEEDS, the `verdict` output's metadata and
the run tag `rebal/gate_verdict=refused` say why, and `prepare_approved_trades` is skipped. The run
FAILS (verdict left unrecorded, so a re-execution checks again) only when the gate cannot check:
no such decision, the warehouse is busy/unreadable, or it has no holdings as recent as the
recommendation. A verdict is final: re-running the job reports the recorded verdict.

Copies for people are files, written once (temporary file, then a hard link, which fails
instead of replacing an existing file); no step reads them back:
  <REBAL_HOME>/outbox/approved/<decision_id>.json          format rebal.approved_trades/1
  <REBAL_HOME>/outbox/notifications/<sha256(key)>.json     format rebal.notification/1
Readers ignore dot-files (the temporary files). Notifications are handed to the mailer through
the workflow store only (issue #12): the `wf_notifications` row committed with the state change
is what defs/comms reads (and `wf_messages` makes the email exactly-once); the notification file
is a copy for people, written after the commit (see `record_and_post_notification`).

Approved trades are handed to ticketing through the workflow store only (issue #12): the
decision, its `passed` gate verdict and the trades it approved (`gate.passed_trades`). The
outbox/approved/<decision_id>.json file is a copy for people, never read back; a temporary
dot-file a killed write left next to it is removed by the next run (`core.write_once.remove_abandoned_temps`).

After the hand-off, two ops turn the approved trades into orders (rebal_pipeline/execution):
  build_order_tickets     the decision and its approved trades (store) + the reference data of the
                          gate's trading day (warehouse: stg_feed_securities, stg_feed_accounts,
                          latest as_of on or before it) → orders and blocks placed at the gate's
                          time, each routed `staged` or `submitted`
                          (REBAL_AUTO_SUBMIT_DISCRETIONARY, default false: all staged)
  stage_or_submit_orders  the exactly-once protocol of execution/submit.py (wf_submissions rows
                          pending → files → done + audit events):
  <REBAL_HOME>/outbox/staged/<decision_id>/orders.fix + <custodian>_orders_<YYYYMMDD>.<csv|txt>
  <REBAL_HOME>/outbox/submitted/<custodian>/<custodian>_orders_<YYYYMMDD>_<decision_id>.<csv|txt>
The custodian drop folder is where submission ends today: the upload to the custodian (SFTP /
OAuth API) is issue #7. A trade that cannot be an order (no reference data for its symbol or
account, a bond, a fractional quantity of a whole-share security) fails the run before anything
is recorded or written; re-execute once the feed is fixed. A warehouse without the reference
tables at all (never built by the daily scan) tickets nothing: the run succeeds with the run tag
`rebal/tickets=no_reference_data` and a warning, and the hand-off file stays for the desk.
"""


import hashlib
import json
import re
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable

import duckdb
from dagster import (
    Backoff, Config, Failure, In, Jitter, MetadataValue, OpExecutionContext, Out, Output, RetryPolicy, job, op,
)
from pydantic import Field
from sqlalchemy import Connection, and_, select

from rebal_pipeline import settings
from rebal_pipeline.core.pii import masker
from rebal_pipeline.core.write_once import remove_abandoned_temps, write_file_once
from rebal_pipeline.execution import submit
from rebal_pipeline.resources import WAREHOUSE_POOL, Warehouse, WorkflowStoreResource
from rebal_pipeline.tickets import FixSession, TicketError
from rebal_pipeline.workflow import ledger, lifecycle
from rebal_pipeline.defs.workflow.anchor import anchor_audit_chain
from rebal_pipeline.workflow.schema import notifications, recommendations, users
# The gate's domain code lives in workflow/gate.py (EXECUTABLE is also the decision sensor's).
from rebal_pipeline.workflow.gate import (  # noqa: F401
    EXECUTABLE, GateCannotCheck, Positions, _iso, _utc, gate_decision, latest_positions, passed_trades,
)

NOTIFICATION_FORMAT = "rebal.notification/1"
NOTIFICATION_KINDS = ("reminder", "escalation", "weekly_digest")
GATE_VERDICT_TAG = "rebal/gate_verdict"
# Decision ids are hex digests; anything else in a launchpad config is refused before it names a file.
_DECISION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------
# The outbox: files handed to issue #6 (trade tickets, mailer), written once
# ---------------------------------------------------------------------------------------------


def outbox_root() -> Path:
    return settings.rebal_home() / "outbox"


def approved_trades_path(decision_id: str) -> Path:
    return outbox_root() / "approved" / f"{decision_id}.json"


def notification_path(notification_key: str) -> Path:
    # Keys contain ':' and ISO times: the file is named by the key's digest, the key is inside.
    return outbox_root() / "notifications" / f"{hashlib.sha256(notification_key.encode()).hexdigest()}.json"


# ---------------------------------------------------------------------------------------------
# The approval gate: its domain code is workflow/gate.py (plain functions over the store's
# connection); the names stay importable from here for the op shells and their callers.
# ---------------------------------------------------------------------------------------------



# ---------------------------------------------------------------------------------------------
# execute_rebalance: approval_gate → prepare_approved_trades
# ---------------------------------------------------------------------------------------------


# The warehouse reads of an approval run (the gate's positions, the tickets' reference data) are
# in the warehouse pool: with the shipped instance configs (granularity: run, limit 1) the run
# waits in the queue while a daily scan or a backfill holds the warehouse, and starts on a
# finished day; it never meets the write lock there. What is left transient (the warehouse
# opened by something outside the run queue: a drill, a person's read-write DuckDB shell, an
# in-process `dagster asset materialize`) fails the step with a retryable Failure, which this
# policy re-runs after 15 s, 30 s, 60 s, 120 s (±jitter) — no person needed. Failures no retry
# can fix (no such decision, no holdings, a trade that cannot be an order) are raised with
# allow_retries=False and fail at once.
WAREHOUSE_READ_RETRY = RetryPolicy(max_retries=4, delay=15, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


class ApprovalGateConfig(Config):
    decision_id: str = Field(description="wf_decisions.decision_id (the decision sensor sets it)")


@op(
    out={
        "verdict": Out(dict, description="The gate's verdict on the decision (always emitted)."),
        "approved_trades": Out(dict, is_required=False,
                               description="The approved trades, emitted only when the gate passed."),
    },
    description="Re-verify an approval (who, what, still valid against today's positions) and record the verdict.",
    pool=WAREHOUSE_POOL,
    retry_policy=WAREHOUSE_READ_RETRY,
)
def approval_gate(context: OpExecutionContext, config: ApprovalGateConfig, workflow_store: WorkflowStoreResource,
                  warehouse: Warehouse):
    if not _DECISION_ID.fullmatch(config.decision_id):
        raise Failure(description=f"{config.decision_id!r} is not a decision id", allow_retries=False)

    def positions_for(account_ids: list[str]) -> tuple[date, Positions]:
        try:
            with warehouse.connect() as con:
                return latest_positions(con, account_ids)
        except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock: try again later
            raise GateCannotCheck(f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from exc

    try:
        with workflow_store.open() as store, store.begin() as conn:
            verdict = gate_decision(conn, config.decision_id, positions_for, utc_now())
            # The reason names accounts: the log and the metadata show their last four characters only.
            mask = masker(json.loads(conn.execute(select(recommendations.c.package).where(
                recommendations.c.recommendation_id == verdict.recommendation_id)).scalar_one()).get("account_ids", ()))
    except GateCannotCheck as exc:
        # Retried (WAREHOUSE_READ_RETRY) only when the warehouse could not be opened or read.
        raise Failure(description=f"the approval gate could not check decision {config.decision_id}: {exc}",
                      allow_retries=isinstance(exc.__cause__, duckdb.Error)) from None

    outcome = "passed" if verdict.passed else "refused"
    context.instance.add_run_tags(context.run_id, {GATE_VERDICT_TAG: outcome})
    if not verdict.passed:
        context.log.warning(f"approval refused by the gate: {mask(verdict.reason)}")
    yield Output(
        {"decision_id": verdict.decision_id, "recommendation_id": verdict.recommendation_id, "verdict": outcome,
         "reason": verdict.reason},
        "verdict",
        metadata={
            "verdict": outcome,
            "reason": mask(verdict.reason),
            "decision_id": verdict.decision_id,
            "recommendation_id": verdict.recommendation_id,
            "recorded_by_this_run": verdict.recorded_by_this_run,
            "positions_as_of": _iso(verdict.positions_as_of) if verdict.positions_as_of else "",
            "trades": len(verdict.trades),
        },
    )
    if verdict.passed:
        yield Output(verdict.handoff, "approved_trades", metadata={"trades": len(verdict.trades)})


@op(ins={"approved_trades": In(dict)}, out=Out(str, description="The decision id, for ticketing."),
    description="Write a copy of the approved trades for people to outbox/approved/ (once per decision); "
                "ticketing reads them from the workflow store.")
def prepare_approved_trades(context: OpExecutionContext, approved_trades: dict):
    path = approved_trades_path(approved_trades["decision_id"])
    removed = remove_abandoned_temps(path.parent)
    if removed:
        context.log.warning(f"removed {len(removed)} temporary file(s) left by a killed write: {', '.join(removed)}")
    written = _write_copy_for_people(path, {**approved_trades, "prepared_by_run": context.run_id})
    if not written:
        context.log.info(f"{path.name} was already prepared: left as it is")
    yield Output(approved_trades["decision_id"], metadata={
        "path": MetadataValue.path(str(path)), "written_by_this_run": written,
        "trades": len(approved_trades["trades"]), "removed_temp_files": len(removed)})


TICKETS_TAG = "rebal/tickets"
# The crash seam: called after a destination is on disk and before its orders are marked done
# (tests set it to raise, to play a crash between the two).
after_delivery: Callable[[submit.Destination], None] | None = None


@op(ins={"prepared": In(str, description="The decision id whose approved trades prepare_approved_trades "
                                         "copied for people (the trades are read from the store).")},
    out=Out(dict, is_required=False, description="The orders (rebal.tickets/1), emitted when they could be built."),
    description="Turn the approved trades into orders and blocks, placed at the gate's time, each routed to "
                "staging (trading desk) or submission (discretionary, when auto-submit is on).",
    pool=WAREHOUSE_POOL, retry_policy=WAREHOUSE_READ_RETRY)
def build_order_tickets(context: OpExecutionContext, prepared: str, workflow_store: WorkflowStoreResource,
                        warehouse: Warehouse):
    # The hand-off is the store: the decision, its gate verdict and the trades it approved
    # (outbox/approved/<id>.json is a copy for people and is never read back).
    decision_id = prepared
    trades: list = []  # (the accounts an error names are masked in the failure below)
    try:
        with workflow_store.open() as store, store.begin() as conn:
            approved = submit.load_approved_decision(conn, decision_id)
            try:
                _handoff, trades = passed_trades(conn, decision_id)
            except GateCannotCheck as exc:
                raise submit.ExecutionError(str(exc)) from None
        day = submit.trading_day(approved.gate_checked_at)
        try:
            with warehouse.connect() as con:
                if not submit.has_reference_tables(con):
                    context.instance.add_run_tags(context.run_id, {TICKETS_TAG: "no_reference_data"})
                    context.log.warning(
                        f"decision {decision_id}: the warehouse has no {' / '.join(submit.REFERENCE_TABLES)} (the "
                        f"daily scan never built them): no orders staged or submitted; the approved trades "
                        f"stay in the workflow store (and outbox/approved/{decision_id}.json) for the trading desk")
                    return
                securities, accounts = submit.read_reference(
                    con, {t.symbol for t in trades}, {t.account_id for t in trades}, day)
        except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock: re-execute later
            raise Failure(description=f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from None
        tickets = submit.build_tickets(approved, trades, securities, accounts,
                                       auto_submit=submit.auto_submit_discretionary(),
                                       desk_id=submit.trading_desk_id())
    except (TicketError, submit.ExecutionError) as exc:
        raise Failure(description=f"decision {decision_id}: no orders staged or submitted: "
                                  f"{masker(t.account_id for t in trades)(str(exc))}",
                      allow_retries=False) from None
    yield Output(tickets.to_document(), metadata={
        "decision_id": decision_id, "orders": len(tickets.batch.orders), "blocks": len(tickets.batch.blocks),
        "staged": tickets.count(submit.STAGED), "submitted": tickets.count(submit.SUBMITTED),
        "placed_at": approved.gate_checked_at.isoformat(), "reference_day": day.isoformat(),
    })


@op(ins={"tickets": In(dict)}, out=Out(dict, description="What this run staged, submitted or found done."),
    description="Stage (trading desk folder) or submit (custodian drop) every order exactly once, with its "
                "wf_submissions row and audit event.")
def stage_or_submit_orders(context: OpExecutionContext, tickets: dict, workflow_store: WorkflowStoreResource):
    orders = submit.Tickets.from_document(tickets)
    try:
        with workflow_store.open() as store:
            outcome = submit.stage_and_submit(store, orders, session=FixSession.from_env(), now=utc_now,
                                              outbox=outbox_root(), after_write=after_delivery)
    except submit.ExecutionError as exc:
        raise Failure(description=f"decision {orders.decision_id}: "
                                  f"{masker(o.account_id for o in orders.batch.orders)(str(exc))}") from None
    with workflow_store.open() as store, store.begin() as conn:  # all submitted: the story ends (ledger L6)
        ledger.record_outcome(conn, orders.decision_id, utc_now())
    staged, submitted = orders.count(submit.STAGED), orders.count(submit.SUBMITTED)
    context.instance.add_run_tags(context.run_id, {TICKETS_TAG: f"staged={staged},submitted={submitted}"})
    if outcome.already_done:
        context.log.info(f"{len(outcome.already_done)} of {outcome.orders} orders were done by an earlier run: "
                         "left as they are")
    yield Output(
        {"decision_id": orders.decision_id, "orders": outcome.orders, "completed": outcome.completed,
         "already_done": outcome.already_done, "written": outcome.written, "found_written": outcome.found_written,
         "files": outcome.sha256},
        metadata={
            "staged": staged, "submitted": submitted, "completed_by_this_run": len(outcome.completed),
            "already_done": len(outcome.already_done), "audit_events": outcome.events,
            "written_by_this_run": ", ".join(outcome.written), "found_written": ", ".join(outcome.found_written),
            "files": MetadataValue.json(outcome.sha256),
        },
    )


@job(
    description="Run for one approval decision (launched by the approval_decisions sensor): the gate re-verifies "
                "it and, only if it passes, the approved trades are prepared for ticketing, turned into orders and "
                "staged for the trading desk or submitted to the custodian drop, exactly once per order.",
    tags={"rebal/workflow": "approval"},
)
def execute_rebalance():
    verdict, trades = approval_gate()
    submitted = stage_or_submit_orders(build_order_tickets(prepare_approved_trades(trades)))
    # The gate's verdict and every order are audit events: anchor the chain's head outside the
    # database once they are written (after the verdict alone when the gate refused).
    anchor_audit_chain(after=[verdict, submitted])


# ---------------------------------------------------------------------------------------------
# notify_recommendation: a reminder, an escalation or a weekly digest, recorded once
# ---------------------------------------------------------------------------------------------


class NotificationConfig(Config):
    kind: str = Field(description="reminder, escalation or weekly_digest")
    notification_key: str = Field(description="The exactly-once key (also the run key)")
    due_at: str = Field(description="ISO-8601 time of the sensor tick that found it due; the notification's time")
    recommendation_id: str = ""  # reminder, escalation
    advisor_id: str = ""  # weekly_digest
    recommendation_ids: list[str] = []  # weekly_digest


def record_once(conn: Connection, config: NotificationConfig, now: datetime) -> str:
    """Record the notification unless it is recorded already or no longer due. Returns what happened."""
    if conn.execute(select(notifications.c.notification_key).where(
            notifications.c.notification_key == config.notification_key)).first() is not None:
        return "already recorded"
    if config.kind in ("reminder", "escalation"):
        rec = conn.execute(select(recommendations.c.status).where(
            recommendations.c.recommendation_id == config.recommendation_id)).first()
        if rec is None:
            raise Failure(description=f"no recommendation {config.recommendation_id}")
        # Decided between the sensor's tick and this run: nothing to chase (and an escalation must
        # not move an approved recommendation back to escalated).
        if rec.status not in ("pending", "deferred"):
            return f"no longer due: the recommendation is {rec.status}"
        done = lifecycle.record_notification(conn, config.kind, config.recommendation_id, config.notification_key, now)
        return "recorded" if done else "already recorded"
    waiting = [r.recommendation_id for r in conn.execute(select(recommendations.c.recommendation_id).where(and_(
        recommendations.c.recommendation_id.in_(config.recommendation_ids), recommendations.c.status == "pending"))
        .order_by(recommendations.c.recommendation_id))]
    if not waiting:
        return "no longer due: none of its recommendations is still pending"
    done = lifecycle.record_weekly_digest(conn, config.advisor_id, config.notification_key, waiting, now)
    return "recorded" if done else "already recorded"


def notification_document(conn: Connection, notification_key: str) -> dict | None:
    """The outbox document of a recorded notification (None: not recorded), built from the store's
    record so that a re-run writes the same message."""
    row = conn.execute(select(notifications).where(notifications.c.notification_key == notification_key)
                       ).mappings().first()
    if row is None:
        return None
    recipient = conn.execute(select(users.c.user_id, users.c.name, users.c.email, users.c.role)
                             .where(users.c.user_id == row["recipient_id"])).mappings().first()
    document: dict[str, Any] = {
        "format": NOTIFICATION_FORMAT,
        "notification_key": notification_key,
        "kind": row["kind"],
        "recorded_at": _iso(row["created_at"]),
        "recipient": dict(recipient) if recipient else {"user_id": row["recipient_id"]},
    }
    wanted = ([row["recommendation_id"]] if row["recommendation_id"]
              else json.loads(row["payload"]).get("recommendations", []))
    recs = conn.execute(select(recommendations).where(recommendations.c.recommendation_id.in_(wanted))
                        .order_by(recommendations.c.recommendation_id)).mappings().all()
    summaries = [{
        "recommendation_id": r["recommendation_id"], "as_of": _iso(r["as_of"]), "scope": r["scope"],
        "scope_id": r["scope_id"], "kind": r["kind"], "advisor_id": r["advisor_id"],
        "household_id": r["household_id"], "tier": r["tier"], "urgency": r["urgency"], "delivery": r["delivery"],
        "trade_value": r["trade_value"], "waiting_since": _iso(r["clock_started_at"]),
        "deferred_until": _iso(r["deferred_until"]),
    } for r in recs]
    if row["kind"] == "weekly_digest":
        document["recommendations"] = summaries
    else:
        document["recommendation"] = summaries[0] if summaries else {"recommendation_id": row["recommendation_id"]}
    return document


# The notification files are for people (what was sent to whom, readable without a database);
# nothing reads them to decide anything. A writer holds an exclusive lock on its temporary
# dot-file while writing it; the kernel drops the lock when the process dies, so a dot-file
# nobody holds a lock on is the remains of a killed write, and the next run removes it.


def _write_copy_for_people(path: Path, document: dict) -> bool:
    """Write `document` as JSON to `path` once (False: the file was there), by the outbox's
    write-once protocol (core/write_once.py)."""
    return write_file_once(path, (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


@op(description="Record a reminder, escalation or weekly digest exactly once in the workflow store (the mailer's "
                "hand-off), then write a copy for people to outbox/notifications/.")
def record_and_post_notification(context: OpExecutionContext, config: NotificationConfig,
                                 workflow_store: WorkflowStoreResource):
    if config.kind not in NOTIFICATION_KINDS:
        raise Failure(description=f"unknown notification kind {config.kind!r}; one of {', '.join(NOTIFICATION_KINDS)}")
    now = _utc(datetime.fromisoformat(config.due_at))
    path = notification_path(config.notification_key)
    removed = remove_abandoned_temps(path.parent)
    if removed:
        context.log.warning(f"removed {len(removed)} temporary file(s) left by a killed write: {', '.join(removed)}")
    with workflow_store.open() as store, store.begin() as conn:
        outcome = record_once(conn, config, now)
        document = notification_document(conn, config.notification_key)
    # After the commit: the copy never shows what the store does not hold.
    written = _write_copy_for_people(path, document) if document is not None else False
    context.log.info(f"{config.kind} {config.notification_key}: {outcome}; copy for people "
                     f"{'written' if written else 'not written'}")
    yield Output(str(path) if document is not None else "", metadata={
        "outcome": outcome, "kind": config.kind, "notification_key": config.notification_key,
        "outbox_file": MetadataValue.path(str(path)) if document is not None else "",
        "written_by_this_run": written, "removed_temp_files": len(removed),
    })


@job(
    description="Run for one due reminder, escalation or weekly digest (launched by the approval_escalations "
                "sensor): recorded once in the workflow store, where the mailer finds it (a copy for people is "
                "written to outbox/notifications/).",
    tags={"rebal/workflow": "notification"},
)
def notify_recommendation():
    record_and_post_notification()
