"""Market-event batches in the workflow store: the rules, and the one home of each.

A market event is a move of the policy's reference basket of at least its threshold since the
last scan (`market_events` sensor over the intraday prices drop file, market_events/prices.py),
or one an operator declares (`rebal market-event --reason …`). Each event launches an
out-of-cycle scan of every account at the event's prices (market_events/scanning.py); the
alerts it publishes form one *batch* for the New York trading day, and the decisions on them go
out together as block orders per custodian and symbol (execute_rebalance, one run per
*release*: execution/submit.build_release_tickets).

Invariants (tested in rebal_pipeline_tests/market_events/test_batches.py, SQLite and Postgres):
  E1. An event is recorded once. Its key is unique: `prices:<SHA-256 of the prices file>`, or
      `operator:<day>:<digest of who, reason and prices>`. A re-run, a second sensor tick or a
      second command finds the recorded event and records nothing.
  E2. One batch per trading day. The day's first event opens it (`mev-YYYYMMDD`); every later
      event of the day extends it (event seq n+1). The release time moves to the latest event's
      time + `release_after_minutes`, never earlier.
  E3. A prices event is measured again under the batch's lock, against the basket prices of the
      day's latest event (before the first: the last session's closes). A snapshot that moved less
      than the threshold since then is absorbed: no event, no scan. So two ticks that both saw a
      move since the same reference make one event, not two.
  E4. A recommendation joins at most one batch (primary key), and only while it waits for a
      person (pending, deferred or escalated, re-read under a row lock), or as an auto-approval
      published by the same scan transaction (its decision has not been seen by anybody).
  E5. A member's executable decision (approve, modify, auto_approve) goes out in exactly one
      release (primary key on the decision), never alone: the decision sensor does not launch it
      (workflow/approval_watch.py) and the gate leaves it unrecorded if it is launched alone
      (defs/approvals/jobs.py), so the release's gate sees it unchecked.
  E6. A release is claimed once. `<batch>-r<n>` is the batch's n-th; claiming writes the release
      and its decisions (those held at that moment) in one transaction. A re-run of the release
      reads the same decisions; a stale id (n is not the next one) is refused.
Locks: Postgres `SELECT … FOR UPDATE` on the batch row and on the member recommendations; on
SQLite the store's BEGIN IMMEDIATE already serialises writers (workflow/store.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Iterable, Mapping, Sequence

from sqlalchemy import Connection, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.core.clock import utc
from rebal_pipeline.market_events.prices import basket_move, exceeds
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.gate import EXECUTABLE
from rebal_pipeline.workflow.package import RecommendationPackage, worst_band
from rebal_pipeline.workflow.schema import (
    batch_recommendations, batch_release_decisions, batch_releases, decisions, market_batches, market_events,
    recommendations, users,
)

ACTOR = "rebal:market_events"
PRICES, OPERATOR = "prices", "operator"
# Who may declare a market event: the people who watch the markets and the firm's risk.
DECLARERS = ("operations", "compliance")
MAX_REASON = 500
_BATCH_ID = re.compile(r"^mev-(\d{8})$")
_RELEASE_ID = re.compile(r"^(mev-\d{8})-r([1-9]\d{0,5})$")
_EVENT_ID = re.compile(r"^(mev-\d{8})-e([1-9]\d{0,5})$")


class BatchError(ValueError):
    """A market-event request the rules refuse; the message says why."""


def batch_id_for(day: date) -> str:
    return f"mev-{day:%Y%m%d}"


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id or ""):
        raise BatchError(f"{batch_id!r} is not a market-event batch id (mev-YYYYMMDD)")
    return batch_id


def check_event_id(event_id: str) -> str:
    if not _EVENT_ID.match(event_id or ""):
        raise BatchError(f"{event_id!r} is not a market-event id (mev-YYYYMMDD-e<n>)")
    return event_id


def parse_release_id(release_id: str) -> tuple[str, int]:
    found = _RELEASE_ID.match(release_id or "")
    if not found:
        raise BatchError(f"{release_id!r} is not a batch release id (mev-YYYYMMDD-r<n>)")
    return found.group(1), int(found.group(2))


def is_release_id(text: str) -> bool:
    return bool(_RELEASE_ID.match(text or ""))


def _lock(conn: Connection, statement):
    return statement.with_for_update() if conn.dialect.name == "postgresql" else statement


def _canonical(document: Mapping) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)


def _prices_json(prices: Mapping[str, Decimal] | None) -> dict[str, str] | None:
    return None if prices is None else {s: format(Decimal(p), "f") for s, p in sorted(prices.items())}


# ---------------------------------------------------------------------------------------------
# Events and the day's batch (E1–E3)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    event_id: str
    batch_id: str
    seq: int
    source: str
    declared_by: str
    reason: str
    move: float | None
    reference: dict
    detected_at: datetime
    scanned_at: datetime | None
    recommendations: int | None
    recorded_now: bool = False  # recorded by this call (False: found recorded)


def _event(row, recorded_now: bool = False) -> Event:
    return Event(row["event_id"], row["batch_id"], row["seq"], row["source"], row["declared_by"], row["reason"],
                 row["move"], json.loads(row["reference"]), utc(row["detected_at"]),
                 utc(row["scanned_at"]) if row["scanned_at"] else None, row["recommendations"], recorded_now)


def event(conn: Connection, event_id: str) -> Event | None:
    row = conn.execute(select(market_events).where(market_events.c.event_id == event_id)).mappings().first()
    return _event(row) if row else None


def event_by_key(conn: Connection, event_key: str) -> Event | None:
    row = conn.execute(select(market_events).where(market_events.c.event_key == event_key)).mappings().first()
    return _event(row) if row else None


def latest_basket_prices(conn: Connection, day: date) -> dict[str, Decimal] | None:
    """The basket prices of the day's latest event that had prices (the reference of the next
    move), or None before the day's first."""
    rows = conn.execute(select(market_events.c.reference).where(
        market_events.c.batch_id == batch_id_for(day)).order_by(market_events.c.seq.desc())).scalars()
    for reference in rows:
        basket_prices = json.loads(reference).get("basket_prices")
        if basket_prices:
            return {s: Decimal(p) for s, p in basket_prices.items()}
    return None


def _open_batch(conn: Connection, day: date, session_as_of: date, now: datetime) -> dict:
    """The day's batch, locked (created by the day's first event)."""
    batch_id = batch_id_for(day)
    query = _lock(conn, select(market_batches).where(market_batches.c.batch_id == batch_id))
    row = conn.execute(query).mappings().first()
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(market_batches).values(
                    batch_id=batch_id, trading_day=day, session_as_of=session_as_of, opened_at=now,
                    release_due_at=now, events=0))
        except IntegrityError:  # another writer opened it first: use theirs
            pass
        row = conn.execute(query).mappings().one()
    return dict(row)


def record_event(conn: Connection, *, event_key: str, source: str, declared_by: str, reason: str,
                 day: date, session_as_of: date, detected_at: datetime, now: datetime, basket: Sequence,
                 threshold: Decimal, release_after: timedelta, basket_prices: Mapping[str, Decimal] | None,
                 session_closes: Mapping[str, Decimal] | None, extra: Mapping | None = None) -> Event | None:
    """Record an event once (E1), in the day's batch (E2), measured again under the batch's lock
    (E3). Returns the event (found or recorded), or None when a prices snapshot is absorbed.

    basket: [(symbol, weight)]; basket_prices: the event's prices of the basket's symbols (None: an
    operator's declaration without prices); session_closes: the last session's closes (the
    reference before the day's first event)."""
    now, detected_at = utc(now), utc(detected_at)
    if source not in (PRICES, OPERATOR):
        raise BatchError(f"unknown event source {source!r}")
    found = event_by_key(conn, event_key)
    if found is not None:
        return found
    batch = _open_batch(conn, day, session_as_of, now)
    found = event_by_key(conn, event_key)  # again, under the lock
    if found is not None:
        return found
    since_event = latest_basket_prices(conn, day)
    reference = since_event if since_event is not None else (dict(session_closes) if session_closes else None)
    move = basket_move(basket, reference, basket_prices) if (reference and basket_prices) else None
    if source == PRICES and not exceeds(move, threshold):
        return None  # E3: absorbed
    seq = int(batch["events"]) + 1
    event_id = f"{batch['batch_id']}-e{seq}"
    document = {
        "basket": [[s, format(Decimal(w), "f")] for s, w in basket], "threshold": format(threshold, "f"),
        "basket_prices": _prices_json(basket_prices),
        "reference_prices": _prices_json({s: reference[s] for s, _ in basket if s in reference}) if reference else None,
        "reference_is": "the day's previous event" if since_event is not None else "the last session's closes",
        "session_as_of": session_as_of.isoformat(), **(extra or {}),
    }
    conn.execute(insert(market_events).values(
        event_id=event_id, event_key=event_key, batch_id=batch["batch_id"], seq=seq, source=source,
        declared_by=declared_by, reason=reason, move=float(move) if move is not None else None,
        reference=_canonical(document), detected_at=detected_at, scanned_at=None, scan_run_id=None,
        recommendations=None))
    due = max(utc(batch["release_due_at"]), now + release_after)
    conn.execute(update(market_batches).where(market_batches.c.batch_id == batch["batch_id"]).values(
        events=seq, release_due_at=due))
    audit.append(conn, f"market_event:{event_id}", "market_event_recorded", declared_by, now, event_id, {
        "event_id": event_id, "batch_id": batch["batch_id"], "source": source, "reason": reason,
        "move": format(move, "f") if move is not None else None, "event_key": event_key,
        "extends_batch": seq > 1, "release_due_at": due, "reference": document})
    return _event(conn.execute(select(market_events).where(market_events.c.event_id == event_id))
                  .mappings().one(), recorded_now=True)


def operator_event_key(day: date, user_id: str, reason: str, prices_sha256: str | None) -> str:
    digest = hashlib.sha256(f"{user_id}|{reason}|{prices_sha256 or ''}".encode("utf-8")).hexdigest()[:24]
    return f"operator:{day.isoformat()}:{digest}"


def check_declarer(conn: Connection, user_id: str) -> dict:
    """Only an active operations or compliance user may declare a market event."""
    user = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().first()
    if user is None or not user["active"]:
        raise BatchError(f"{user_id!r} is not an active user of the firm")
    if user["role"] not in DECLARERS:
        raise BatchError(f"{user_id} is {user['role']}: only operations or compliance may declare a market event")
    return dict(user)


def check_reason(reason: str) -> str:
    reason = " ".join((reason or "").split())
    if not reason:
        raise BatchError("a market event needs a reason (what happened), for the record")
    if len(reason) > MAX_REASON:
        raise BatchError(f"the reason is {len(reason)} characters; at most {MAX_REASON}")
    return reason


def unscanned_events(conn: Connection, limit: int = 50) -> list[Event]:
    """Recorded events whose scan has not published yet (the sensor launches their scans)."""
    rows = conn.execute(select(market_events).where(market_events.c.scanned_at.is_(None))
                        .order_by(market_events.c.detected_at, market_events.c.event_id).limit(limit)).mappings()
    return [_event(r) for r in rows]


# ---------------------------------------------------------------------------------------------
# Members (E4)
# ---------------------------------------------------------------------------------------------


def severity_of(package: RecommendationPackage) -> float:
    """The member's stored severity: package.worst_band's ratio (no band: 0), to 6 decimals."""
    worst = worst_band(package)
    return round(worst[1], 6) if worst else 0.0


def add_members(conn: Connection, event_id: str, recommendation_ids: Iterable[str], now: datetime) -> list[str]:
    """Add the scan's recommendations that wait for a person (E4) to the event's batch; returns
    those added now (ones in a batch already, or decided, are left out)."""
    now = utc(now)
    found = event(conn, event_id)
    if found is None:
        raise BatchError(f"no market event {event_id}")
    wanted = sorted(set(recommendation_ids))
    added: list[str] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        joinable = or_(recommendations.c.status.in_(lifecycle.OPEN),
                       and_(recommendations.c.status == "auto_approved", recommendations.c.created_at == now))
        # A row lock on Postgres (UPDATE … RETURNING re-reads the status after a concurrent
        # decision commits): a recommendation decided meanwhile does not join.
        locked = conn.execute(update(recommendations).where(and_(
            recommendations.c.recommendation_id.in_(chunk), joinable,
            recommendations.c.recommendation_id.notin_(select(batch_recommendations.c.recommendation_id))))
            .values(updated_at=recommendations.c.updated_at)
            .returning(recommendations.c.recommendation_id, recommendations.c.package)).all()
        rows = [{"recommendation_id": rid, "batch_id": found.batch_id, "event_id": event_id,
                 "severity": severity_of(RecommendationPackage.model_validate_json(package)), "added_at": now}
                for rid, package in sorted(locked)]
        if rows:
            conn.execute(insert(batch_recommendations), rows)
            audit.append_many(conn, [{
                "event_id": f"batched:{r['recommendation_id']}", "kind": "recommendation_batched", "actor": ACTOR,
                "occurred_at": now, "subject_id": r["recommendation_id"],
                "payload": {"batch_id": found.batch_id, "event_id": event_id, "severity": r["severity"]}}
                for r in rows])
            added += [r["recommendation_id"] for r in rows]
    return added


def mark_scanned(conn: Connection, event_id: str, run_id: str, now: datetime, joined: int) -> bool:
    """The event's scan published (set once); False when an earlier run did."""
    return conn.execute(update(market_events).where(and_(
        market_events.c.event_id == event_id, market_events.c.scanned_at.is_(None))).values(
        scanned_at=utc(now), scan_run_id=run_id, recommendations=joined)).rowcount == 1


def batch_of(conn: Connection, recommendation_id: str) -> str | None:
    """The batch a recommendation belongs to, if any."""
    return conn.execute(select(batch_recommendations.c.batch_id).where(
        batch_recommendations.c.recommendation_id == recommendation_id)).scalar()


def member_recommendations():
    """A subquery of every batch member's id (for the sensors' and the mailer's filters)."""
    return select(batch_recommendations.c.recommendation_id)


# ---------------------------------------------------------------------------------------------
# Releases (E5, E6)
# ---------------------------------------------------------------------------------------------


def held_decisions(conn: Connection, batch_id: str) -> list[str]:
    """Executable decisions on the batch's members not checked by a gate and in no release yet,
    in the order they were made."""
    return list(conn.execute(
        select(decisions.c.decision_id)
        .join(batch_recommendations, batch_recommendations.c.recommendation_id == decisions.c.recommendation_id)
        .where(and_(batch_recommendations.c.batch_id == batch_id, decisions.c.action.in_(list(EXECUTABLE)),
                    decisions.c.gate_verdict.is_(None),
                    decisions.c.decision_id.notin_(select(batch_release_decisions.c.decision_id))))
        .order_by(decisions.c.decision_seq)).scalars())


@dataclass(frozen=True)
class DueRelease:
    release_id: str
    batch_id: str
    decisions: int


def due_releases(conn: Connection, now: datetime) -> list[DueRelease]:
    """Batches whose release time has come and that hold decisions: the next release of each."""
    due = []
    for batch_id in conn.execute(select(market_batches.c.batch_id).where(
            market_batches.c.release_due_at <= utc(now)).order_by(market_batches.c.batch_id)).scalars():
        held = held_decisions(conn, batch_id)
        if held:
            released = conn.execute(select(func.count()).where(batch_releases.c.batch_id == batch_id)).scalar_one()
            due.append(DueRelease(f"{batch_id}-r{released + 1}", batch_id, len(held)))
    return due


def release_decisions(conn: Connection, release_id: str) -> list[str]:
    return list(conn.execute(select(batch_release_decisions.c.decision_id).where(
        batch_release_decisions.c.release_id == release_id)
        .join(decisions, decisions.c.decision_id == batch_release_decisions.c.decision_id)
        .order_by(decisions.c.decision_seq)).scalars())


def claim_release(conn: Connection, release_id: str, run_id: str, now: datetime) -> list[str]:
    """Claim release `<batch>-r<n>` once (E6): its decisions (the held ones, at the first claim).
    Raises BatchError for an unknown batch or a stale release id."""
    batch_id, seq = parse_release_id(release_id)
    batch = conn.execute(_lock(conn, select(market_batches).where(market_batches.c.batch_id == batch_id))
                         ).mappings().first()
    if batch is None:
        raise BatchError(f"no market-event batch {batch_id}")
    if conn.execute(select(batch_releases.c.release_id).where(batch_releases.c.release_id == release_id)).first():
        return release_decisions(conn, release_id)
    released = conn.execute(select(func.count()).where(batch_releases.c.batch_id == batch_id)).scalar_one()
    if seq != released + 1:
        raise BatchError(f"{release_id} is not the next release of {batch_id} (it has {released}): nothing claimed")
    held = held_decisions(conn, batch_id)
    now = utc(now)
    conn.execute(insert(batch_releases).values(release_id=release_id, batch_id=batch_id, seq=seq, claimed_at=now,
                                               claimed_by_run=run_id))
    if held:
        conn.execute(insert(batch_release_decisions), [{"decision_id": d, "release_id": release_id} for d in held])
    audit.append(conn, f"batch_release:{release_id}", "market_batch_released", ACTOR, now, release_id,
                 {"release_id": release_id, "batch_id": batch_id, "decisions": held, "run_id": run_id})
    return held


def release_of(conn: Connection, decision_id: str) -> str | None:
    return conn.execute(select(batch_release_decisions.c.release_id).where(
        batch_release_decisions.c.decision_id == decision_id)).scalar()


def goes_with_batch(conn: Connection, decision_id: str) -> str | None:
    """The batch a decision goes out with (E5), or None when it goes alone."""
    return conn.execute(select(batch_recommendations.c.batch_id).join(
        decisions, decisions.c.recommendation_id == batch_recommendations.c.recommendation_id).where(
        decisions.c.decision_id == decision_id)).scalar()


def passed_decisions(conn: Connection, release_id: str) -> list[str]:
    """The release's decisions the gate passed (their orders go out together)."""
    return list(conn.execute(select(decisions.c.decision_id).join(
        batch_release_decisions, batch_release_decisions.c.decision_id == decisions.c.decision_id).where(and_(
        batch_release_decisions.c.release_id == release_id, decisions.c.gate_verdict == "passed"))
        .order_by(decisions.c.decision_seq)).scalars())
