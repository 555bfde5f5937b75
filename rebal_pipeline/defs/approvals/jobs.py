"""Runs launched by the approval sensors: `execute_rebalance` (approval gate → prepared trades →
order tickets → staged or submitted, exactly once per order) and `notify_recommendation` (a
reminder, an escalation or a weekly digest, recorded once).

Neither op waits for anybody: the human part happened before the run (a decision recorded in the
workflow store, or a due time passed), so a run is seconds long and can be re-executed safely.

The gate (`approval_gate`) re-verifies a decision before anything is prepared:
  - the decision exists and may lead to execution (approve, modify, auto_approve);
  - its recommendation is in the matching approved state (approved / modified / auto_approved),
    not superseded, and no later scan has produced a newer recommendation for the same account or
    household (an approval of yesterday's trades must not run next to today's);
  - the decider was allowed: the advisor of record or a member of their team (still an active
    user now), compliance only on a recommendation escalated before it decided, or the
    discretionary micro-trade rule in force (and the recommendation still meets it);
  - the approved trades (the decision's modified trades for `modify`, else the package's) still
    fit today's positions: the latest `holdings` partition of the warehouse for the
    recommendation's accounts (`package.trades_still_fit`: no overselling, no cash shortfall, no
    restricted trade).
Its verdict is recorded once with `lifecycle.record_gate_verdict` (audit event `gate_passed` /
`gate_refused` in the same transaction; a refusal moves the recommendation to `refused_by_gate`).
A refusal is a normal outcome, not an error: the run SUCCEEDS, the `verdict` output's metadata and
the run tag `rebal/gate_verdict=refused` say why, and `prepare_approved_trades` is skipped. The run
FAILS (verdict left unrecorded, so a re-execution checks again) only when the gate cannot check:
no such decision, the warehouse is busy/unreadable, or it has no holdings as recent as the
recommendation. A verdict is final: re-running the job reports the recorded verdict.

Hand-offs to issue #6 are files, independent of the workflow store, written once (temporary file,
then a hard link, which fails instead of replacing an existing file):
  <REBAL_HOME>/outbox/approved/<decision_id>.json          format rebal.approved_trades/1
  <REBAL_HOME>/outbox/notifications/<sha256(key)>.json     format rebal.notification/1
Readers ignore dot-files (the temporary files). A notification file is written whenever it is
missing after its record is committed, so a crash between the two is repaired by a re-run: the
mailer must therefore key what it has sent on `notification_key`, not on the file's presence.

After the hand-off, two ops turn the approved trades into orders (rebal_pipeline/execution):
  build_order_tickets     the decision (store) + the hand-off's trades + the reference data of the
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
import os
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable

import duckdb
from dagster import Config, Failure, In, MetadataValue, OpExecutionContext, Out, Output, job, op
from pydantic import Field, ValidationError
from sqlalchemy import Connection, and_, select

from rebal_pipeline import settings
from rebal_pipeline.execution import submit
from rebal_pipeline.resources import Warehouse, WorkflowStoreResource
from rebal_pipeline.tickets import FixSession, TicketError
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.package import (
    PackageTrade, RecommendationPackage, TradeChange, apply_modification, trades_still_fit,
)
from rebal_pipeline.workflow.schema import decisions, notifications, recommendations, users

# The decisions that may lead to execution, and the recommendation state each one leaves behind.
EXECUTABLE = {"approve": "approved", "modify": "modified", "auto_approve": "auto_approved"}
APPROVED_TRADES_FORMAT = "rebal.approved_trades/1"
NOTIFICATION_FORMAT = "rebal.notification/1"
NOTIFICATION_KINDS = ("reminder", "escalation", "weekly_digest")
GATE_VERDICT_TAG = "rebal/gate_verdict"
# Decision ids are hex digests; anything else in a launchpad config is refused before it names a file.
_DECISION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(moment: datetime) -> datetime:
    # SQLite hands DateTime(timezone=True) back naive; the store writes UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


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


def write_once(path: Path, document: dict) -> bool:
    """Write `document` as JSON to `path` unless the file exists; True when this call wrote it.
    Atomic: readers see no file or the whole file (a temporary dot-file, fsynced, then hard-linked
    into place; the link fails instead of overwriting when another writer got there first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new directory entry survives a crash too
    finally:
        os.close(directory)
    return True


# ---------------------------------------------------------------------------------------------
# The approval gate: plain functions over the store's connection (testable without Dagster)
# ---------------------------------------------------------------------------------------------


class GateCannotCheck(RuntimeError):
    """The gate could not check a decision (not a refusal): the run fails, no verdict is recorded."""


Positions = dict[tuple[str, str], float]
PositionsLoader = Callable[[list[str]], tuple[date, Positions]]


@dataclass(frozen=True)
class GateVerdict:
    decision_id: str
    recommendation_id: str
    passed: bool
    reason: str
    recorded_by_this_run: bool  # False: an earlier run had recorded it (the verdict is final)
    trades: tuple[PackageTrade, ...] = ()
    positions_as_of: date | None = None
    handoff: dict | None = None  # the approved-trades document, when passed


def latest_positions(con: duckdb.DuckDBPyConnection, account_ids: list[str]) -> tuple[date, Positions]:
    """Today's positions: the latest `holdings` partition, for these accounts only."""
    if con.execute("select 1 from information_schema.tables where table_name = 'holdings'").fetchone() is None:
        raise GateCannotCheck("the warehouse has no holdings table: the daily drift scan has not run on it")
    as_of = con.execute("select max(as_of) from holdings").fetchone()[0]
    if as_of is None:
        raise GateCannotCheck("the warehouse's holdings table is empty")
    rows = con.execute(
        "select account_id, symbol, sum(quantity)::double from holdings "
        "where as_of = $as_of and list_contains($accounts, account_id) group by account_id, symbol",
        {"as_of": as_of, "accounts": list(account_ids)},
    ).fetchall()
    return as_of, {(account, symbol): float(quantity) for account, symbol, quantity in rows}


def _decider_problems(conn: Connection, decision: dict, rec: dict, policy: lifecycle.LifecyclePolicy) -> list[str]:
    actor = decision["actor_id"]
    if decision["action"] == "auto_approve":
        rule = f"policy:{policy.micro_trade_rule_version}"
        if actor != rule or decision["via"] != "policy":
            return [f"auto-approved by {actor!r}, not by the micro-trade rule in force ({rule})"]
        value, gain = float(rec["trade_value"] or 0), float(rec["realized_gain"] or 0)
        if not (rec["discretionary"] and rec["kind"] == "rebalance" and 0 < value < policy.micro_trade_limit
                and gain == 0.0):
            return [f"the micro-trade rule does not apply (discretionary={bool(rec['discretionary'])}, "
                    f"kind={rec['kind']}, trades ${value:,.2f} against a ${policy.micro_trade_limit:,.0f} limit, "
                    f"realised gain ${gain:,.2f})"]
        return []
    user = conn.execute(select(users).where(users.c.user_id == actor)).mappings().first()
    if user is None or not user["active"]:
        return [f"the decider {actor} is not an active user"]
    if user["role"] == "advisor":
        if not lifecycle.may_act_for(conn, dict(user), rec["advisor_id"]):
            return [f"the decider {actor} is neither the advisor of record ({rec['advisor_id']}) nor on their team"]
        return []
    if user["role"] == "compliance":
        escalated_at = rec["escalated_at"]
        if escalated_at is None or _utc(escalated_at) > _utc(decision["created_at"]):
            return [f"the decider {actor} (compliance) decided a recommendation that had not been escalated"]
        return []
    return [f"the decider {actor} ({user['role']}) may not approve trades"]


def _state_problems(conn: Connection, decision: dict, rec: dict) -> list[str]:
    expected = EXECUTABLE.get(decision["action"])
    if expected is None:
        return [f"a {decision['action']} decision does not lead to execution"]
    problems = []
    if rec["status"] == "superseded" or rec["superseded_by"]:
        problems.append(f"the recommendation was superseded by {rec['superseded_by']}")
    elif rec["status"] != expected:
        problems.append(f"the recommendation is {rec['status']}, not {expected}")
    later = conn.execute(
        select(recommendations.c.recommendation_id, recommendations.c.as_of)
        .where(and_(recommendations.c.lineage == rec["lineage"], recommendations.c.as_of > rec["as_of"]))
        .order_by(recommendations.c.as_of.desc()).limit(1)
    ).first()
    if later is not None:
        problems.append(f"a later scan ({_iso(later.as_of)}) produced recommendation {later.recommendation_id} "
                        f"for {rec['lineage']}: the approved trades are out of date")
    return problems


def approved_trades(decision: dict, package: RecommendationPackage) -> tuple[list[PackageTrade], list[str]]:
    """The trades the decision approved, and why they cannot be used (empty: they can).
    modify: the decision payload's `trades` (the modified trade list, as `apply_modification`
    returned it), or else its `changes` (TradeChange lines) applied to the package again."""
    if decision["action"] != "modify":
        return list(package.trades), []
    payload = json.loads(decision["payload"] or "{}")
    try:
        if "trades" in payload:
            trades = [PackageTrade.model_validate(t) for t in payload["trades"]]
        elif "changes" in payload:
            check = apply_modification(package, [TradeChange.model_validate(c) for c in payload["changes"]])
            if check.errors:
                return [], [f"the modification no longer validates: {error}" for error in check.errors]
            trades = check.trades
        else:
            return [], ["the modify decision does not carry its modified trades (payload 'trades' or 'changes')"]
    except ValidationError as exc:
        return [], [f"the modified trades in the decision cannot be read ({exc.error_count()} invalid fields)"]
    strangers = sorted({t.account_id for t in trades} - set(package.account_ids))
    return trades, [f"{a}: not an account of this recommendation" for a in strangers]


def gate_decision(conn: Connection, decision_id: str, positions_for: PositionsLoader, now: datetime,
                  policy: lifecycle.LifecyclePolicy = lifecycle.LifecyclePolicy()) -> GateVerdict:
    """Re-verify a decision and record the verdict (once), in the caller's transaction.
    Cheap store checks come first; the warehouse is read only for a decision that passed them."""
    now = _utc(now)
    decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
    if decision is None:
        raise GateCannotCheck(f"no decision {decision_id} in the workflow store")
    rec = conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == decision["recommendation_id"])).mappings().one()
    package = RecommendationPackage.model_validate_json(rec["package"])
    if decision["gate_verdict"] is not None:
        return _verdict(dict(decision), dict(rec), package, recorded_by_this_run=False)

    problems = _state_problems(conn, decision, rec) + _decider_problems(conn, decision, rec, policy)
    trades: list[PackageTrade] = []
    as_of = None
    if not problems:
        trades, problems = approved_trades(decision, package)
    if not problems and not trades:
        problems = ["the approved trade list is empty: nothing to execute"]
    if not problems:
        as_of, today = positions_for(package.account_ids)
        if as_of < rec["as_of"]:
            raise GateCannotCheck(f"the warehouse's latest holdings are of {as_of}, older than the recommendation "
                                  f"({_iso(rec['as_of'])}): is this the warehouse it came from?")
        held = {account for account, _ in today}
        problems = [f"{a}: no positions in the latest holdings ({as_of}): held out for data quality or closed"
                    for a in package.account_ids if a not in held]
        problems = problems or trades_still_fit(package, trades, today)
    if problems:
        reason = "; ".join(problems)
    else:
        reason = (f"{decision['action']} by {decision['actor_id']} re-verified: {len(trades)} trades fit the "
                  f"positions of {as_of}")
    lifecycle.record_gate_verdict(conn, decision_id, not problems, reason, now)
    stored = dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one())
    # Two runs of one decision at once: the first verdict stands and both report it.
    mine = stored["gate_reason"] == reason and _utc(stored["gate_checked_at"]) == now
    return _verdict(stored, dict(rec), package, recorded_by_this_run=mine, positions_as_of=as_of)


def _verdict(decision: dict, rec: dict, package: RecommendationPackage, recorded_by_this_run: bool,
             positions_as_of: date | None = None) -> GateVerdict:
    passed = decision["gate_verdict"] == "passed"
    trades = approved_trades(decision, package)[0] if passed else []
    handoff = None
    if passed:
        handoff = {
            "format": APPROVED_TRADES_FORMAT,
            "decision_id": decision["decision_id"],
            "decision_seq": decision["decision_seq"],
            "action": decision["action"],
            "decided_by": decision["actor_id"],
            "decided_via": decision["via"],
            "decided_at": _iso(decision["created_at"]),
            "decision_reason": decision["reason"],
            "gate": {"verdict": "passed", "reason": decision["gate_reason"],
                     "checked_at": _iso(decision["gate_checked_at"])},
            "recommendation": {
                "recommendation_id": rec["recommendation_id"], "as_of": _iso(rec["as_of"]), "scope": rec["scope"],
                "scope_id": rec["scope_id"], "kind": rec["kind"], "advisor_id": rec["advisor_id"],
                "household_id": rec["household_id"], "account_ids": list(package.account_ids),
                "discretionary": bool(rec["discretionary"]), "policy_version": rec["policy_version"],
                "model_version": package.model_version,
            },
            "trades": [t.model_dump(mode="json") for t in trades],
        }
    return GateVerdict(
        decision_id=decision["decision_id"], recommendation_id=rec["recommendation_id"], passed=passed,
        reason=decision["gate_reason"] or "", recorded_by_this_run=recorded_by_this_run, trades=tuple(trades),
        positions_as_of=positions_as_of, handoff=handoff,
    )


# ---------------------------------------------------------------------------------------------
# execute_rebalance: approval_gate → prepare_approved_trades
# ---------------------------------------------------------------------------------------------


class ApprovalGateConfig(Config):
    decision_id: str = Field(description="wf_decisions.decision_id (the decision sensor sets it)")


@op(
    out={
        "verdict": Out(dict, description="The gate's verdict on the decision (always emitted)."),
        "approved_trades": Out(dict, is_required=False,
                               description="The approved trades, emitted only when the gate passed."),
    },
    description="Re-verify an approval (who, what, still valid against today's positions) and record the verdict.",
)
def approval_gate(context: OpExecutionContext, config: ApprovalGateConfig, workflow_store: WorkflowStoreResource,
                  warehouse: Warehouse):
    if not _DECISION_ID.fullmatch(config.decision_id):
        raise Failure(description=f"{config.decision_id!r} is not a decision id")

    def positions_for(account_ids: list[str]) -> tuple[date, Positions]:
        try:
            with warehouse.connect() as con:
                return latest_positions(con, account_ids)
        except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock: try again later
            raise GateCannotCheck(f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from exc

    try:
        with workflow_store.open() as store, store.begin() as conn:
            verdict = gate_decision(conn, config.decision_id, positions_for, utc_now())
    except GateCannotCheck as exc:
        raise Failure(description=f"the approval gate could not check decision {config.decision_id}: {exc}") from None

    outcome = "passed" if verdict.passed else "refused"
    context.instance.add_run_tags(context.run_id, {GATE_VERDICT_TAG: outcome})
    if not verdict.passed:
        context.log.warning(f"approval refused by the gate: {verdict.reason}")
    yield Output(
        {"decision_id": verdict.decision_id, "recommendation_id": verdict.recommendation_id, "verdict": outcome,
         "reason": verdict.reason},
        "verdict",
        metadata={
            "verdict": outcome,
            "reason": verdict.reason,
            "decision_id": verdict.decision_id,
            "recommendation_id": verdict.recommendation_id,
            "recorded_by_this_run": verdict.recorded_by_this_run,
            "positions_as_of": _iso(verdict.positions_as_of) if verdict.positions_as_of else "",
            "trades": len(verdict.trades),
        },
    )
    if verdict.passed:
        yield Output(verdict.handoff, "approved_trades", metadata={"trades": len(verdict.trades)})


@op(ins={"approved_trades": In(dict)}, out=Out(str, description="The hand-off file for trade tickets (#6)."),
    description="Write the approved trades to the outbox for ticketing, once per decision.")
def prepare_approved_trades(context: OpExecutionContext, approved_trades: dict):
    path = approved_trades_path(approved_trades["decision_id"])
    written = write_once(path, {**approved_trades, "prepared_by_run": context.run_id})
    if not written:
        context.log.info(f"{path.name} was already prepared: left as it is")
    yield Output(str(path), metadata={"path": MetadataValue.path(str(path)), "written_by_this_run": written,
                                      "trades": len(approved_trades["trades"])})


TICKETS_TAG = "rebal/tickets"
# The crash seam: called after a destination is on disk and before its orders are marked done
# (tests set it to raise, to play a crash between the two).
after_delivery: Callable[[submit.Destination], None] | None = None


@op(ins={"prepared": In(str, description="The hand-off file of prepare_approved_trades.")},
    out=Out(dict, is_required=False, description="The orders (rebal.tickets/1), emitted when they could be built."),
    description="Turn the approved trades into orders and blocks, placed at the gate's time, each routed to "
                "staging (trading desk) or submission (discretionary, when auto-submit is on).")
def build_order_tickets(context: OpExecutionContext, prepared: str, workflow_store: WorkflowStoreResource,
                        warehouse: Warehouse):
    handoff = json.loads(Path(prepared).read_text(encoding="utf-8"))
    decision_id = handoff["decision_id"]
    try:
        with workflow_store.open() as store, store.begin() as conn:
            approved = submit.load_approved_decision(conn, decision_id)
        trades = [PackageTrade.model_validate(t) for t in handoff["trades"]]
        day = submit.trading_day(approved.gate_checked_at)
        try:
            with warehouse.connect() as con:
                if not submit.has_reference_tables(con):
                    context.instance.add_run_tags(context.run_id, {TICKETS_TAG: "no_reference_data"})
                    context.log.warning(
                        f"decision {decision_id}: the warehouse has no {' / '.join(submit.REFERENCE_TABLES)} (the "
                        f"daily scan never built them): no orders staged or submitted; {Path(prepared).name} "
                        "stays in the outbox for the trading desk")
                    return
                securities, accounts = submit.read_reference(
                    con, {t.symbol for t in trades}, {t.account_id for t in trades}, day)
        except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock: re-execute later
            raise Failure(description=f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from None
        tickets = submit.build_tickets(approved, trades, securities, accounts,
                                       auto_submit=submit.auto_submit_discretionary(),
                                       desk_id=submit.trading_desk_id())
    except (TicketError, submit.ExecutionError) as exc:
        raise Failure(description=f"decision {decision_id}: no orders staged or submitted: {exc}") from None
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
        raise Failure(description=f"decision {orders.decision_id}: {exc}") from None
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
    _verdict_out, trades = approval_gate()
    stage_or_submit_orders(build_order_tickets(prepare_approved_trades(trades)))


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


@op(description="Record a reminder, escalation or weekly digest exactly once and post it to the mailer's outbox.")
def record_and_post_notification(context: OpExecutionContext, config: NotificationConfig,
                                 workflow_store: WorkflowStoreResource):
    if config.kind not in NOTIFICATION_KINDS:
        raise Failure(description=f"unknown notification kind {config.kind!r}; one of {', '.join(NOTIFICATION_KINDS)}")
    now = _utc(datetime.fromisoformat(config.due_at))
    with workflow_store.open() as store, store.begin() as conn:
        outcome = record_once(conn, config, now)
        document = notification_document(conn, config.notification_key)
    # After the commit: the outbox never announces what the store does not hold.
    path = notification_path(config.notification_key)
    written = write_once(path, document) if document is not None else False
    context.log.info(f"{config.kind} {config.notification_key}: {outcome}; outbox file "
                     f"{'written' if written else 'not written'}")
    yield Output(str(path) if document is not None else "", metadata={
        "outcome": outcome, "kind": config.kind, "notification_key": config.notification_key,
        "outbox_file": MetadataValue.path(str(path)) if document is not None else "",
        "written_by_this_run": written,
    })


@job(
    description="Run for one due reminder, escalation or weekly digest (launched by the approval_escalations "
                "sensor): recorded once in the workflow store, then posted to the mailer's outbox.",
    tags={"rebal/workflow": "notification"},
)
def notify_recommendation():
    record_and_post_notification()
