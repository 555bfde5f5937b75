"""What the approval sensors look for in the workflow store (defs/approvals/sensors.py declares
them; docs/architecture.md, "Hand-offs").

Decisions waiting for the gate: `DecisionCursor` is the decision sensor's cursor, JSON
{"floor", "high", "hole_from", "hole_since"}. `floor` is the highest decision_seq below which
every sequence number has been seen; each tick reads the decisions above it
(`decisions_above`). Postgres assigns sequence numbers at insert, not at commit, so decision 10
may commit after decision 11 (both API transactions wait for the audit chain's lock, in either
order): a "high-water mark" cursor would step over 10 for ever. So the floor stops below a hole
(a number not visible while a higher one is) until the hole fills; a hole that stays open longer
than `hole_patience` was a rolled-back insert or a sequence jump after a server crash, and the
floor steps over it (`advance_cursor`). A plain integer cursor (the floor) is accepted too.

Notifications due: `notifications_due` lists the reminders and escalations due now
(`lifecycle.due_notifications`) and the weekly digests due and not yet recorded
(`lifecycle.weekly_digest_due` lists a digest all week long, recorded or not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, select

from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.gate import EXECUTABLE
from rebal_pipeline.workflow.schema import batch_recommendations, decisions, notifications


@dataclass(frozen=True)
class DecisionCursor:
    floor: int = 0  # every decision_seq <= floor has been seen (and requested if executable)
    high: int = 0  # the highest decision_seq seen (for the UI)
    hole_from: int | None = None  # floor + 1, when it is not visible while a higher seq is
    hole_since: str | None = None  # when that hole was first seen (ISO-8601, the sensor's clock)

    @classmethod
    def parse(cls, raw: str | None) -> "DecisionCursor":
        if not raw:
            return cls()
        if raw.strip().isdigit():
            return cls(floor=int(raw), high=int(raw))
        return cls(**json.loads(raw))

    def dump(self) -> str:
        return json.dumps({"floor": self.floor, "high": self.high, "hole_from": self.hole_from,
                           "hole_since": self.hole_since}, sort_keys=True)


def advance_cursor(cursor: DecisionCursor, seen: list[int], now: datetime, hole_patience: timedelta) -> DecisionCursor:
    """Move the floor over the contiguous sequence numbers seen above it (sorted), stopping at the
    first hole unless that same hole has been open for `hole_patience`."""
    floor, hole_from, hole_since = cursor.floor, None, None
    for seq in seen:
        if seq <= floor:
            continue
        if seq == floor + 1:
            floor = seq
            continue
        if cursor.hole_from == floor + 1 and cursor.hole_since:
            if now - datetime.fromisoformat(cursor.hole_since) >= hole_patience:
                floor = seq  # rolled back, or skipped by the sequence: nothing will ever fill it
                continue
            hole_from, hole_since = cursor.hole_from, cursor.hole_since
        else:
            hole_from, hole_since = floor + 1, now.isoformat()
        break
    return DecisionCursor(floor=floor, high=max([cursor.high, *seen]), hole_from=hole_from, hole_since=hole_since)


@dataclass(frozen=True)
class DecisionsSeen:
    waiting: list  # rows (decision_id, recommendation_id, action) that may execute, gate verdict empty
    cursor: DecisionCursor  # the cursor after this look


def decisions_above(conn: Connection, cursor: DecisionCursor, now: datetime, hole_patience: timedelta,
                    batch: int) -> DecisionsSeen:
    """The next `batch` decisions above the cursor's floor: those waiting for the gate, and the
    cursor moved over what was seen."""
    # A decision on a market-event batch's member goes out with the batch's release, never alone
    # (market_events/batches.py E5): seen here (the cursor moves over it), never requested.
    member = batch_recommendations.c.recommendation_id == decisions.c.recommendation_id
    rows = conn.execute(
        select(decisions.c.decision_seq, decisions.c.decision_id, decisions.c.recommendation_id,
               decisions.c.action, decisions.c.gate_verdict,
               select(batch_recommendations.c.batch_id).where(member).scalar_subquery().label("batch_id"))
        .where(decisions.c.decision_seq > cursor.floor)
        .order_by(decisions.c.decision_seq).limit(batch)
    ).all()
    waiting = [r for r in rows if r.action in EXECUTABLE and r.gate_verdict is None and r.batch_id is None]
    return DecisionsSeen(waiting, advance_cursor(cursor, [r.decision_seq for r in rows], now, hole_patience))


def notifications_due(conn: Connection, now: datetime, policy: lifecycle.LifecyclePolicy) -> tuple[list[dict], list[dict]]:
    """(reminders and escalations due, weekly digests due and not recorded yet) at `now`."""
    due = lifecycle.due_notifications(conn, now, policy)
    digests = lifecycle.weekly_digest_due(conn, now)
    keys = [d["notification_key"] for d in digests]
    recorded = {r.notification_key for r in conn.execute(select(notifications.c.notification_key)
                                                         .where(notifications.c.notification_key.in_(keys)))}
    return due, [d for d in digests if d["notification_key"] not in recorded]
