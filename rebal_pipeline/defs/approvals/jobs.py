"""Runs launched by the approval sensors: `execute_rebalance` (approval gate → prepared trades →
order tickets → staged or submitted, exactly once per order) and `notify_recommendation` (a
reminder, an escalation or a weekly digest, recorded once).

Neither op waits for anybody: the human part happened before the run (a decision recorded in the
workflow store, or a due time passed), so a run is seconds long and can be re-executed safely.

Thin shell: each op validates its config, calls one domain function (workflow/gate.py,
workflow/outbox.py, workflow/ticketing.py, workflow/anchoring.py, execution/submit.py) and
reports what it did.

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

Copies for people are files, written once, never read back (workflow/outbox.py: their
locations under <REBAL_HOME>/outbox/, the write-once protocol, the notification records).
Notifications are handed to the mailer through the workflow store only (issue #12): the `wf_notifications` row committed with the state change
is what defs/comms reads (and `wf_messages` makes the email exactly-once); the notification file
is a copy for people, written after the commit (see `record_and_post_notification`,
`outbox.record_notification_once`).

Approved trades are handed to ticketing through the workflow store only (issue #12): the
decision, its `passed` gate verdict and the trades it approved (`gate.passed_trades`). The
outbox/approved/<decision_id>.json file is a copy for people, never read back; a temporary
dot-file a killed write left next to it is removed by the next run (`core.write_once.remove_abandoned_temps`).

After the hand-off, two ops turn the approved trades into orders (rebal_pipeline/execution):
  build_order_tickets     the decision and its approved trades (store) + the reference data of the
                          gate's trading day (warehouse: stg_feed_securities, stg_feed_accounts,
                          latest as_of on or before it) → orders and blocks placed at the gate's
                          time, each routed `staged` or `submitted` (its `execution`
                          resource: REBAL_AUTO_SUBMIT_DISCRETIONARY, default false: all staged;
                          REBAL_TRADING_DESK_ID, who places staged orders)
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


from datetime import datetime
from typing import Callable

import duckdb
from dagster import (
    Backoff, Config, Failure, In, Jitter, MetadataValue, Nothing, OpExecutionContext, Out, Output, RetryPolicy, job,
    op,
)
from pydantic import Field

from rebal_pipeline import settings
from rebal_pipeline.core.clock import utc, utc_now
from rebal_pipeline.core.pii import masker
from rebal_pipeline.core.write_once import remove_abandoned_temps
from rebal_pipeline.execution import submit
from rebal_pipeline.resources import (
    WAREHOUSE_POOL, AuditResource, ExecutionResource, FeedLocation, FixSessionResource, Warehouse,
    WorkflowStoreResource, settings_of,
)
from rebal_pipeline.market_events import batches
from rebal_pipeline.workflow import anchoring, gate, ledger, outbox, ticketing

GATE_VERDICT_TAG = "rebal/gate_verdict"


# ---------------------------------------------------------------------------------------------
# execute_rebalance: approval_gate → prepare_approved_trades → build_order_tickets →
# stage_or_submit_orders → anchor_audit_chain
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
    decision_id: str = Field(default="", description="wf_decisions.decision_id (the decision sensor sets it)")
    release_id: str = Field(default="", description="A market-event batch's release, mev-YYYYMMDD-r<n> (the "
                                                    "market_event_batches sensor sets it): its held decisions, "
                                                    "each gated, their orders blocked together")


HELD_FOR_BATCH = "held_for_batch"


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
    if bool(config.decision_id) == bool(config.release_id):
        raise Failure(description="give exactly one of decision_id and release_id", allow_retries=False)
    if config.release_id:
        yield from _gate_release(context, config.release_id, workflow_store, warehouse)
        return
    try:
        outbox.check_decision_id(config.decision_id)
    except outbox.OutboxError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    with workflow_store.open() as store, store.begin() as conn:
        batch_id = batches.goes_with_batch(conn, config.decision_id)
    if batch_id is not None:
        # A batch member's decision goes out with the batch's release (market_events/batches.py
        # E5): no verdict is recorded here, so the release's gate checks it.
        context.instance.add_run_tags(context.run_id, {GATE_VERDICT_TAG: HELD_FOR_BATCH})
        context.log.info(f"decision {config.decision_id} belongs to market-event batch {batch_id}: it goes out "
                         "with the batch's release (market_event_batches sensor), not alone")
        yield Output({"decision_id": config.decision_id, "verdict": HELD_FOR_BATCH, "batch_id": batch_id},
                     "verdict", metadata={"verdict": HELD_FOR_BATCH, "batch_id": batch_id})
        return
    try:
        with workflow_store.open() as store, store.begin() as conn:
            verdict = gate.gate_decision(conn, config.decision_id, gate.warehouse_positions(warehouse.connect),
                                         utc_now())
            # The reason names accounts: the log and the metadata show their last four characters only.
            mask = masker(gate.accounts_of(conn, verdict.recommendation_id))
    except gate.GateCannotCheck as exc:
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
            "positions_as_of": gate._iso(verdict.positions_as_of) if verdict.positions_as_of else "",
            "trades": len(verdict.trades),
        },
    )
    if verdict.passed:
        yield Output(verdict.handoff, "approved_trades", metadata={"trades": len(verdict.trades)})


def _gate_release(context: OpExecutionContext, release_id: str, workflow_store: WorkflowStoreResource,
                  warehouse: Warehouse):
    """A batch release: claim it once (its held decisions), gate each decision as if it went
    alone (one transaction each: a refusal refuses that decision only), hand the passed ones on."""
    try:
        with workflow_store.open() as store:
            with store.begin() as conn:
                decision_ids = batches.claim_release(conn, release_id, context.run_id, utc_now())
            positions = gate.warehouse_positions(warehouse.connect)
            verdicts = []
            for decision_id in decision_ids:
                with store.begin() as conn:
                    verdict = gate.gate_decision(conn, decision_id, positions, utc_now())
                    mask = masker(gate.accounts_of(conn, verdict.recommendation_id))
                verdicts.append((verdict, mask))
    except batches.BatchError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    except gate.GateCannotCheck as exc:
        raise Failure(description=f"the approval gate could not check release {release_id}: {exc}",
                      allow_retries=isinstance(exc.__cause__, duckdb.Error)) from None
    passed = [v for v, _ in verdicts if v.passed]
    for verdict, mask in verdicts:
        if not verdict.passed:
            context.log.warning(f"decision {verdict.decision_id} of {release_id} refused by the gate: "
                                f"{mask(verdict.reason)}")
    outcome = f"passed={len(passed)},refused={len(verdicts) - len(passed)}"
    context.instance.add_run_tags(context.run_id, {GATE_VERDICT_TAG: outcome, "rebal/release": release_id})
    yield Output(
        {"release_id": release_id, "verdict": outcome,
         "decisions": [{"decision_id": v.decision_id, "verdict": "passed" if v.passed else "refused",
                        "reason": v.reason} for v, _ in verdicts]},
        "verdict",
        metadata={"release_id": release_id, "verdict": outcome, "decisions": len(verdicts),
                  "refused": MetadataValue.md("\n".join(f"- {v.decision_id}: {m(v.reason)}" for v, m in verdicts
                                                         if not v.passed) or "none")})
    if passed:
        yield Output({"release_id": release_id, "decision_ids": [v.decision_id for v in passed],
                      "handoffs": [v.handoff for v in passed]}, "approved_trades",
                     metadata={"decisions": len(passed), "trades": sum(len(v.trades) for v in passed)})


def _remove_abandoned_temps(context: OpExecutionContext, folder) -> list[str]:
    removed = remove_abandoned_temps(folder)
    if removed:
        context.log.warning(f"removed {len(removed)} temporary file(s) left by a killed write: {', '.join(removed)}")
    return removed


@op(ins={"approved_trades": In(dict)}, out=Out(str, description="The decision id, for ticketing."),
    description="Write a copy of the approved trades for people to outbox/approved/ (once per decision); "
                "ticketing reads them from the workflow store.")
def prepare_approved_trades(context: OpExecutionContext, approved_trades: dict):
    # A release: one copy per decision it carries, as if each went alone.
    handoffs = approved_trades.get("handoffs") or [approved_trades]
    label = approved_trades.get("release_id") or approved_trades["decision_id"]
    paths, written, removed = [], 0, []
    for handoff in handoffs:
        path = outbox.approved_trades_path(settings.outbox_root(), handoff["decision_id"])
        removed += _remove_abandoned_temps(context, path.parent)
        if outbox.write_copy_for_people(path, {**handoff, "prepared_by_run": context.run_id}):
            written += 1
        else:
            context.log.info(f"{path.name} was already prepared: left as it is")
        paths.append(path)
    yield Output(label, metadata={
        "path": MetadataValue.path(str(paths[0])) if len(paths) == 1 else MetadataValue.json([str(p) for p in paths]),
        "written_by_this_run": written, "trades": sum(len(h["trades"]) for h in handoffs),
        "removed_temp_files": len(removed)})


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
                        warehouse: Warehouse, execution: ExecutionResource):
    decision_id = prepared
    release = batches.is_release_id(decision_id)  # a batch release: blocks across its passed decisions
    label = f"release {decision_id}" if release else f"decision {decision_id}"
    try:
        # The run's execution settings (resources_for chose them), validated: a malformed value
        # fails the step at once, naming the variable; no retry can fix it.
        chosen = settings_of(execution)
        auto_submit, desk_id = submit.auto_submit_discretionary(chosen), submit.trading_desk_id(chosen)
    except settings.SettingsError as exc:
        raise Failure(description=f"{label}: no orders staged or submitted: {exc}",
                      allow_retries=False) from None
    try:
        with workflow_store.open() as store:
            if release:
                with store.begin() as conn:
                    passed = batches.passed_decisions(conn, decision_id)
                result = ticketing.release_tickets(store, warehouse.connect, decision_id, passed,
                                                   auto_submit=auto_submit, desk_id=desk_id)
            else:
                result = ticketing.order_tickets(store, warehouse.connect, decision_id, auto_submit=auto_submit,
                                                 desk_id=desk_id)
    except ticketing.WarehouseUnreadable as exc:  # retried by WAREHOUSE_READ_RETRY
        raise Failure(description=str(exc)) from None
    except ticketing.TicketsRefused as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    if result.orders_done:
        context.instance.add_run_tags(context.run_id, {TICKETS_TAG: "already_done"})
        context.log.info(f"{label}: all {result.orders_done} orders were staged or submitted by an "
                         "earlier run (the day's reference data has changed since): nothing left to do")
        return
    if result.tickets is None:
        context.instance.add_run_tags(context.run_id, {TICKETS_TAG: "no_reference_data"})
        context.log.warning(
            f"{label}: the warehouse has no {' / '.join(submit.REFERENCE_TABLES)} (the "
            f"daily scan never built them): no orders staged or submitted; the approved trades "
            f"stay in the workflow store (and outbox/approved/"
            f"{'<decision id>.json of each decision' if release else decision_id + '.json'}) for the trading desk")
        return
    tickets = result.tickets
    yield Output(tickets.to_document(), metadata={
        "decision_id": decision_id, "orders": len(tickets.batch.orders), "blocks": len(tickets.batch.blocks),
        "staged": tickets.count(submit.STAGED), "submitted": tickets.count(submit.SUBMITTED),
        "placed_at": (submit.release_placed_at(result.approved) if tickets.is_release
                      else result.approved.gate_checked_at).isoformat(),
        "reference_day": result.reference_day.isoformat(),
    })


@op(ins={"tickets": In(dict)}, out=Out(dict, description="What this run staged, submitted or found done."),
    description="Stage (trading desk folder) or submit (custodian drop) every order exactly once, with its "
                "wf_submissions row and audit event.")
def stage_or_submit_orders(context: OpExecutionContext, tickets: dict, workflow_store: WorkflowStoreResource,
                           fix_session: FixSessionResource):
    orders = submit.Tickets.from_document(tickets)
    try:
        with workflow_store.open() as store:
            outcome = submit.stage_and_submit(store, orders, session=fix_session.session(), now=utc_now,
                                              outbox=settings.outbox_root(), after_write=after_delivery)
    except submit.ExecutionError as exc:
        raise Failure(description=f"{orders.label}: "
                                  f"{masker(o.account_id for o in orders.batch.orders)(str(exc))}") from None
    with workflow_store.open() as store, store.begin() as conn:  # all submitted: the story ends (ledger L6)
        for decision_id in orders.covers:  # a release: each decision it carries
            ledger.record_outcome(conn, decision_id, utc_now())
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


@op(ins={"after": In(Nothing)}, description="Verify the audit chain and anchor its head outside the database.")
def anchor_audit_chain(context: OpExecutionContext, workflow_store: WorkflowStoreResource, feed: FeedLocation,
                       audit: AuditResource) -> dict:
    # The archive is the feed resource's (the daily audit_anchor asset anchors there too); the keys
    # and REBAL_AUDIT_ANCHOR_DIR are the audit resource's, validated here.
    try:
        audit_settings = settings_of(audit)
    except settings.SettingsError as exc:
        raise Failure(description=f"the audit chain was not anchored: {exc}", allow_retries=False) from None
    with workflow_store.open() as store, store.begin() as conn:
        try:
            document = anchoring.anchor_chain(conn, utc_now(), feed.archive_root, audit_settings)
        except anchoring.AnchorRefused as refused:
            raise Failure(description=str(refused)) from None
    summary = anchoring.anchor_summary(document)
    if "anchor_file" in summary:
        summary["anchor_file"] = MetadataValue.path(summary["anchor_file"])
    context.add_output_metadata(summary)
    return anchoring.without_signature(document)


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


@op(description="Record a reminder, escalation or weekly digest exactly once in the workflow store (the mailer's "
                "hand-off), then write a copy for people to outbox/notifications/.")
def record_and_post_notification(context: OpExecutionContext, config: NotificationConfig,
                                 workflow_store: WorkflowStoreResource):
    try:
        outbox.check_notification_kind(config.kind)
    except outbox.OutboxError as exc:
        raise Failure(description=str(exc)) from None
    now = utc(datetime.fromisoformat(config.due_at))
    path = outbox.notification_path(settings.outbox_root(), config.notification_key)
    removed = _remove_abandoned_temps(context, path.parent)
    try:
        with workflow_store.open() as store, store.begin() as conn:
            outcome = outbox.record_notification_once(
                conn, config.kind, config.notification_key, now, recommendation_id=config.recommendation_id,
                advisor_id=config.advisor_id, recommendation_ids=config.recommendation_ids)
            document = outbox.notification_document(conn, config.notification_key)
    except outbox.OutboxError as exc:
        raise Failure(description=str(exc)) from None
    # After the commit: the copy never shows what the store does not hold.
    written = outbox.write_copy_for_people(path, document) if document is not None else False
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
