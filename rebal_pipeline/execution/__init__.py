"""Execution (stage 5): the orders of an approved decision staged for the trading desk or
submitted to the custodian's drop, exactly once per order (see `submit.py` and
docs/custodian_orders.md, "Staging and submission"), one decision at a time or a market-event
batch's release at once (blocks across its decisions: docs/market_events.md). No Dagster here: the `execute_rebalance`
job (defs/approvals/jobs.py) calls these functions."""

from rebal_pipeline.execution.submit import (
    AUTO_SUBMIT_ENV, EXECUTOR, SUBMITTED, STAGED, TRADING_DESK_ENV, ApprovedDecision, Destination, ExecutionError,
    SubmissionOutcome, Tickets, auto_submit_discretionary, build_release_tickets, build_tickets,
    confirm_release_executed, destinations, has_reference_tables, load_approved_decision, read_reference,
    release_orders_all_done, release_placed_at, stage_and_submit, trading_day, trading_desk_id,
)

__all__ = [
    "AUTO_SUBMIT_ENV", "EXECUTOR", "SUBMITTED", "STAGED", "TRADING_DESK_ENV", "ApprovedDecision", "Destination",
    "ExecutionError", "SubmissionOutcome", "Tickets", "auto_submit_discretionary", "build_release_tickets",
    "build_tickets", "confirm_release_executed", "destinations", "release_orders_all_done", "release_placed_at",
    "has_reference_tables", "load_approved_decision", "read_reference", "stage_and_submit", "trading_day",
    "trading_desk_id",
]
