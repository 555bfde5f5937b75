"""The recommendation lifecycle: publish, supersede, resolve, decide, remind, escalate.

Plain functions over a SQLAlchemy connection (one transaction each, the caller's), with the
clock passed in (`now`), so the 24h/48h rules are tested with an injected clock. Every state
change appends its audit event in the same transaction: the record and the change commit or
fail together.

States:   pending ──approve/modify──▶ approved/modified ──gate──▶ executed | refused_by_gate
             │  ╰──defer──▶ deferred (until a date; reminders wait for it)
             │  ╰──escalate / 48h──▶ escalated (compliance decides)
             ╰──(a later day)──▶ superseded (the new one keeps the escalation clock)
             ╰──(back inside bands)──▶ resolved_by_market
          discretionary micro-trade rule ──▶ auto_approved
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import advisor_team, decisions, notifications, recommendations, users

OPEN = ("pending", "deferred", "escalated")  # waiting for a human
APPROVED = ("approved", "modified", "auto_approved")
ACTIONS = ("approve", "modify", "defer", "escalate")


@dataclass(frozen=True)
class LifecyclePolicy:
    reminder_hours: float = 24
    escalation_hours: float = 48
    default_defer_days: int = 5  # a deferral without a date ends after this: nothing waits forever
    # Discretionary micro-trade rule: discretionary account, trades under this many dollars and
    # zero realised gain → auto-approved by policy (recorded as the approver, with its version).
    micro_trade_limit: float = 5000.0
    micro_trade_rule_version: str = "discretionary-micro-trade/1"


def lifecycle_policy(drift_policy=None) -> LifecyclePolicy:
    """The LifecyclePolicy of the drift policy file in force (REBAL_DRIFT_POLICY or the shipped
    one), with REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS applied on top."""
    import os

    from rebal_pipeline import settings
    from rebal_pipeline.core.policy import load_policy

    rule = (drift_policy or load_policy(settings.policy_file())).approval
    hours = {"reminder_hours": float(rule.reminder_hours), "escalation_hours": float(rule.escalation_hours)}
    for variable, field in (("REBAL_REMINDER_HOURS", "reminder_hours"), ("REBAL_ESCALATION_HOURS", "escalation_hours")):
        raw = os.environ.get(variable, "").strip()
        if raw:
            try:
                hours[field] = float(raw)
            except ValueError:
                raise ValueError(f"{variable}={raw!r} is not a number of hours") from None
            if hours[field] <= 0:
                raise ValueError(f"{variable} must be positive, not {raw}")
    if hours["reminder_hours"] >= hours["escalation_hours"]:
        raise ValueError(f"the reminder ({hours['reminder_hours']}h) must come before the escalation "
                         f"({hours['escalation_hours']}h): check the policy's approval section and "
                         "REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS")
    return LifecyclePolicy(**hours, default_defer_days=rule.default_defer_days,
                           micro_trade_limit=float(rule.micro_trade_limit))


class DecisionError(Exception):
    """A decision the store refuses: status is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def lineage_of(scope: str, scope_id: str, kind: str) -> str:
    return f"{scope}:{scope_id}:{kind}"


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


def sync_users(conn: Connection, rows: list[dict], now: datetime) -> int:
    """Upsert users from the feed (users.csv): name, email, role, and team routing (`team_of`:
    the advisor whose clients this user also works on). Tokens are kept."""
    changed = 0
    _sync_teams(conn, rows, now)
    for row in rows:
        existing = conn.execute(select(users).where(users.c.user_id == row["user_id"])).mappings().first()
        values = {"name": row["name"], "email": row["email"], "role": row["role"], "active": True}
        if existing is None:
            conn.execute(insert(users).values(user_id=row["user_id"], **values))
        elif any(existing[k] != v for k, v in values.items()):
            conn.execute(update(users).where(users.c.user_id == row["user_id"]).values(**values))
        else:
            continue
        changed += 1
        audit.append(conn, f"user:{row['user_id']}:{_sha(json.dumps(values, sort_keys=True))[:16]}", "user_synced",
                     "rebal:feed", now, row["user_id"], {"role": row["role"]})
    return changed


def _sync_teams(conn: Connection, rows: list[dict], now: datetime) -> None:
    wanted = {(r["team_of"], r["user_id"]) for r in rows if r.get("team_of")}
    current = {(r.advisor_id, r.member_user_id) for r in conn.execute(select(advisor_team))}
    for advisor_id, member in sorted(wanted - current):
        conn.execute(insert(advisor_team).values(advisor_id=advisor_id, member_user_id=member))
        audit.append(conn, f"team:{advisor_id}:{member}:{now.isoformat()}", "team_member_added", "rebal:feed", now,
                     member, {"advisor_id": advisor_id})
    for advisor_id, member in sorted(current - wanted):
        conn.execute(advisor_team.delete().where(and_(advisor_team.c.advisor_id == advisor_id,
                                                      advisor_team.c.member_user_id == member)))
        audit.append(conn, f"team-removed:{advisor_id}:{member}:{now.isoformat()}", "team_member_removed",
                     "rebal:feed", now, member, {"advisor_id": advisor_id})


def issue_api_token(conn: Connection, user_id: str, token: str, now: datetime) -> None:
    """Store the SHA-256 of a user's API token (the token itself is shown once, never stored)."""
    done = conn.execute(update(users).where(users.c.user_id == user_id).values(api_token_sha256=_sha(token)))
    if done.rowcount != 1:
        raise DecisionError(404, f"no user {user_id}")
    audit.append(conn, f"token:{user_id}:{_sha(token)[:16]}", "api_token_issued", "rebal:operations", now, user_id, {})


def user_for_token(conn: Connection, token: str) -> dict | None:
    row = conn.execute(select(users).where(and_(users.c.api_token_sha256 == _sha(token), users.c.active))).mappings().first()
    return dict(row) if row else None


def compliance_officer(conn: Connection) -> str | None:
    row = conn.execute(select(users.c.user_id).where(and_(users.c.role == "compliance", users.c.active))
                       .order_by(users.c.user_id).limit(1)).first()
    return row.user_id if row else None


def may_act_for(conn: Connection, user: dict, advisor_id: str | None) -> bool:
    """The advisor of record, or a member of their team."""
    if user["user_id"] == advisor_id:
        return True
    return conn.execute(select(advisor_team).where(and_(
        advisor_team.c.advisor_id == advisor_id, advisor_team.c.member_user_id == user["user_id"]))).first() is not None


# ---------------------------------------------------------------------------------------------
# Publishing a day's recommendations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    created: int
    superseded: int
    resolved: int
    auto_approved: int
    unchanged: int


def publish_day(conn: Connection, as_of: date, recs: list[dict], inside_lineages: set[str], now: datetime,
                policy: LifecyclePolicy = LifecyclePolicy()) -> PublishResult:
    """Write one day's recommendations. Idempotent: a recommendation already stored is left
    alone, so re-running the day writes nothing new. A new recommendation for a lineage with an
    open one supersedes it and keeps its escalation clock (and its reminder/escalation state).
    Open recommendations of lineages scanned today that need nothing any more
    (`inside_lineages`: back inside their bands, or no harvest left) are closed as
    resolved_by_market.

    recs: dicts with recommendation_id, scope, scope_id, kind, household_id, advisor_id, tier,
    urgency, delivery, discretionary, trade_value, realized_gain, policy_version,
    positions_fingerprint, package (dict)."""
    now = _utc(now)
    created = superseded = resolved = auto = unchanged = 0
    for rec in sorted(recs, key=lambda r: r["recommendation_id"]):
        if conn.execute(select(recommendations.c.recommendation_id)
                        .where(recommendations.c.recommendation_id == rec["recommendation_id"])).first():
            unchanged += 1
            continue
        lineage = lineage_of(rec["scope"], rec["scope_id"], rec["kind"])
        previous = conn.execute(
            select(recommendations).where(and_(recommendations.c.lineage == lineage,
                                               recommendations.c.status.in_(OPEN)))
            .order_by(recommendations.c.as_of.desc())
        ).mappings().first()
        carried = {}
        if previous is not None:
            # A later scan supersedes without restarting the escalation clock.
            carried = {k: previous[k] for k in ("clock_started_at", "reminder_sent_at", "escalated_at",
                                                 "escalated_to", "deferred_until")}
            carried["status"] = previous["status"]
            conn.execute(update(recommendations).where(
                recommendations.c.recommendation_id == previous["recommendation_id"]).values(
                status="superseded", superseded_by=rec["recommendation_id"], updated_at=now))
            audit.append(conn, f"superseded:{previous['recommendation_id']}", "recommendation_superseded",
                         "rebal:daily_scan", now, previous["recommendation_id"],
                         {"superseded_by": rec["recommendation_id"], "as_of": as_of})
            superseded += 1
        conn.execute(insert(recommendations).values(
            recommendation_id=rec["recommendation_id"], lineage=lineage, as_of=as_of, scope=rec["scope"],
            scope_id=rec["scope_id"], kind=rec["kind"], household_id=rec.get("household_id"),
            advisor_id=rec.get("advisor_id"), tier=rec.get("tier"), urgency=rec.get("urgency"),
            delivery=rec.get("delivery"), discretionary=bool(rec.get("discretionary")),
            trade_value=float(rec.get("trade_value") or 0), realized_gain=float(rec.get("realized_gain") or 0),
            policy_version=rec.get("policy_version"), positions_fingerprint=rec.get("positions_fingerprint"),
            package=audit.canonical_json(rec["package"]),
            status=carried.get("status", "pending"),
            clock_started_at=carried.get("clock_started_at") or now, created_at=now, updated_at=now,
            supersedes=previous["recommendation_id"] if previous is not None else None,
            deferred_until=carried.get("deferred_until"), reminder_sent_at=carried.get("reminder_sent_at"),
            escalated_at=carried.get("escalated_at"), escalated_to=carried.get("escalated_to"),
        ))
        team = [r.member_user_id for r in conn.execute(
            select(advisor_team.c.member_user_id).where(advisor_team.c.advisor_id == rec.get("advisor_id")))]
        audit.append(conn, f"recommendation:{rec['recommendation_id']}", "recommendation_alerted", "rebal:daily_scan",
                     now, rec["recommendation_id"], {
                         "as_of": as_of, "scope": rec["scope"], "scope_id": rec["scope_id"], "kind": rec["kind"],
                         "routed_to": rec.get("advisor_id"), "team": team, "urgency": rec.get("urgency"),
                         "delivery": rec.get("delivery"), "policy_version": rec.get("policy_version"),
                         "trade_value": rec.get("trade_value"), "supersedes": carried and previous["recommendation_id"],
                     })
        created += 1
        if _micro_trade(rec, policy) and carried.get("status", "pending") == "pending":
            _auto_approve(conn, rec, now, policy)
            auto += 1
    # Back inside the bands today: close what was waiting.
    if inside_lineages:
        stale = conn.execute(select(recommendations.c.recommendation_id, recommendations.c.lineage).where(and_(
            recommendations.c.status.in_(OPEN), recommendations.c.as_of < as_of))).all()
        for row in stale:
            if row.lineage not in inside_lineages:
                continue
            conn.execute(update(recommendations).where(recommendations.c.recommendation_id == row.recommendation_id)
                         .values(status="resolved_by_market", updated_at=now))
            audit.append(conn, f"resolved:{row.recommendation_id}", "recommendation_resolved_by_market",
                         "rebal:daily_scan", now, row.recommendation_id, {"as_of": as_of})
            resolved += 1
    return PublishResult(created, superseded, resolved, auto, unchanged)


def _micro_trade(rec: dict, policy: LifecyclePolicy) -> bool:
    return (policy.micro_trade_limit > 0 and bool(rec.get("discretionary")) and rec["kind"] == "rebalance"
            and 0 < float(rec.get("trade_value") or 0) < policy.micro_trade_limit
            and float(rec.get("realized_gain") or 0) == 0.0)


def _auto_approve(conn: Connection, rec: dict, now: datetime, policy: LifecyclePolicy) -> None:
    actor = f"policy:{policy.micro_trade_rule_version}"
    payload = {"rule": policy.micro_trade_rule_version, "limit": policy.micro_trade_limit,
               "trade_value": rec.get("trade_value"), "realized_gain": rec.get("realized_gain")}
    _insert_decision(conn, rec["recommendation_id"], "auto_approve", actor, "policy",
                     f"discretionary account: trades under ${policy.micro_trade_limit:,.0f} with zero realised gain",
                     payload, now)
    conn.execute(update(recommendations).where(recommendations.c.recommendation_id == rec["recommendation_id"])
                 .values(status="auto_approved", updated_at=now))


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


def _decision_id(recommendation_id: str, action: str, actor: str, payload_json: str) -> str:
    return _sha(f"{recommendation_id}|{action}|{actor}|{payload_json}")[:32]


def _insert_decision(conn: Connection, recommendation_id: str, action: str, actor: str, via: str,
                     reason: str | None, payload: dict, now: datetime, identity: str | None = None) -> dict:
    body = audit.canonical_json(payload)
    decision_id = _decision_id(recommendation_id, action, actor, identity if identity is not None else body)
    conn.execute(insert(decisions).values(
        decision_id=decision_id, recommendation_id=recommendation_id, action=action, actor_id=actor, via=via,
        reason=reason, payload=body, created_at=now))
    audit.append(conn, f"decision:{decision_id}", f"decision_{action}", actor, now, recommendation_id,
                 {"reason": reason, "via": via, **payload})
    return dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one())


_NEW_STATUS = {"approve": "approved", "modify": "modified", "defer": "deferred", "escalate": "escalated"}


def decide(conn: Connection, recommendation_id: str, user: dict, action: str, now: datetime, *,
           reason: str | None = None, payload: dict | None = None, via: str = "api",
           policy: LifecyclePolicy = LifecyclePolicy()) -> tuple[dict, bool]:
    """Record a decision. Returns (decision, created). The same decision repeated by the same
    person is idempotent (created False); a different decision on a recommendation already
    decided is a conflict (409). Role rules: the advisor of record or their team act on their
    own recommendations; compliance acts on escalated ones; nobody else decides."""
    now = _utc(now)
    if action not in ACTIONS:
        raise DecisionError(422, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    payload = dict(payload or {})
    if action in ("defer", "escalate") and not (reason and reason.strip()):
        raise DecisionError(422, f"{action} needs a reason")
    rec = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == recommendation_id)
                       ).mappings().first()
    if rec is None:
        raise DecisionError(404, f"no recommendation {recommendation_id}")
    # The decision's identity is what was asked (a default deferral date filled in below does not
    # make a repeated "defer" a new decision). The same person repeating it gets it back, even
    # after the recommendation moved on because of it.
    asked = audit.canonical_json(payload)
    repeat = conn.execute(select(decisions).where(decisions.c.decision_id == _decision_id(
        recommendation_id, action, user["user_id"], asked))).mappings().first()
    if repeat is not None:
        return dict(repeat), False
    if user["role"] == "compliance":
        if rec["status"] != "escalated" and action != "escalate":
            raise DecisionError(403, "compliance decides escalated recommendations only")
    elif user["role"] != "advisor" or not may_act_for(conn, user, rec["advisor_id"]):
        raise DecisionError(403, "you may act only on recommendations for your own clients")
    if action == "defer":
        until = payload.get("deferred_until")
        payload["deferred_until"] = (_utc(datetime.fromisoformat(until)) if isinstance(until, str)
                                     else _utc(until) if until else now + timedelta(days=policy.default_defer_days))
        if payload["deferred_until"] <= now:
            raise DecisionError(422, "deferred_until must be in the future")
    allowed = ("escalated",) if user["role"] == "compliance" and action != "escalate" else ("pending", "deferred", "escalated")
    if action == "escalate" and rec["status"] == "escalated":
        allowed = ()
    if rec["status"] not in allowed:
        raise DecisionError(409, f"recommendation is {rec['status']}; a {action} cannot be recorded on it")
    # The state change is conditional on the status read above: of two concurrent deciders, one wins.
    values: dict[str, Any] = {"status": _NEW_STATUS[action], "updated_at": now}
    if action == "defer":
        values["deferred_until"] = payload["deferred_until"]
    if action == "escalate":
        values.update(escalated_at=now, escalated_to=compliance_officer(conn))
    done = conn.execute(update(recommendations).where(and_(
        recommendations.c.recommendation_id == recommendation_id, recommendations.c.status == rec["status"]))
        .values(**values))
    if done.rowcount != 1:
        raise DecisionError(409, "the recommendation changed while this decision was being recorded")
    return _insert_decision(conn, recommendation_id, action, user["user_id"], via, reason, payload, now,
                            identity=asked), True


# ---------------------------------------------------------------------------------------------
# Reminders and escalations (the sensors ask what is due; the runs record it, once)
# ---------------------------------------------------------------------------------------------


def due_notifications(conn: Connection, now: datetime, policy: LifecyclePolicy = LifecyclePolicy()) -> list[dict]:
    """Recommendations owed a reminder (24h without a decision) or an escalation to compliance
    (48h), oldest first. Weekly-batch (base tier) recommendations are not chased one by one;
    deferred ones wait for their date. Each row: kind, recommendation_id, notification_key."""
    now = _utc(now)
    rows = conn.execute(select(recommendations).where(and_(
        recommendations.c.status.in_(("pending", "deferred")),
        or_(recommendations.c.delivery.is_(None), recommendations.c.delivery != "weekly_batch"),
    )).order_by(recommendations.c.clock_started_at, recommendations.c.recommendation_id)).mappings().all()
    due = []
    for rec in rows:
        if rec["deferred_until"] is not None and _utc(rec["deferred_until"]) > now:
            continue
        waited = now - _utc(rec["clock_started_at"])
        clock = _utc(rec["clock_started_at"]).isoformat()
        if waited >= timedelta(hours=policy.escalation_hours) and rec["escalated_at"] is None:
            due.append({"kind": "escalation", "recommendation_id": rec["recommendation_id"],
                        "notification_key": f"escalation:{rec['lineage']}:{clock}"})
        elif waited >= timedelta(hours=policy.reminder_hours) and rec["reminder_sent_at"] is None:
            due.append({"kind": "reminder", "recommendation_id": rec["recommendation_id"],
                        "notification_key": f"reminder:{rec['lineage']}:{clock}"})
    return due


def record_notification(conn: Connection, kind: str, recommendation_id: str, notification_key: str,
                        now: datetime) -> bool:
    """Record a reminder or an escalation exactly once (False: it was already recorded). The
    unique notification key and the conditional state change commit together."""
    now = _utc(now)
    rec = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == recommendation_id)
                       ).mappings().one()
    # Only a recommendation still waiting for its advisor is chased: one decided (or escalated)
    # since the sensor looked is left alone.
    already = rec["reminder_sent_at"] if kind == "reminder" else rec["escalated_at"]
    if rec["status"] not in ("pending", "deferred") or already is not None:
        return False
    recipient = rec["advisor_id"] if kind == "reminder" else compliance_officer(conn)
    if recipient is None:
        raise DecisionError(409, "no active compliance officer to escalate to (users.csv role compliance)")
    try:
        with conn.begin_nested():
            conn.execute(insert(notifications).values(
                notification_key=notification_key, kind=kind, recommendation_id=recommendation_id,
                recipient_id=recipient, created_at=now,
                payload=audit.canonical_json({"lineage": rec["lineage"], "as_of": rec["as_of"]})))
    except IntegrityError:
        return False
    waiting = and_(recommendations.c.recommendation_id == recommendation_id,
                   recommendations.c.status == rec["status"])
    if kind == "reminder":
        changed = conn.execute(update(recommendations).where(waiting).values(reminder_sent_at=now, updated_at=now))
    else:
        changed = conn.execute(update(recommendations).where(waiting).values(
            status="escalated", escalated_at=now, escalated_to=recipient, updated_at=now))
    if changed.rowcount != 1:  # decided concurrently: undo the notification record
        raise DecisionError(409, "the recommendation was decided while the notification was being recorded")
    audit.append(conn, f"{kind}:{notification_key}", f"recommendation_{kind}", "rebal:escalation_sensor", now,
                 recommendation_id, {"recipient": recipient, "waited_since": rec["clock_started_at"]})
    return True


def weekly_digest_due(conn: Connection, now: datetime) -> list[dict]:
    """Base-tier (weekly batch) recommendations still pending, grouped per advisor and ISO week:
    one digest each. Each row: advisor_id, notification_key, recommendation_ids."""
    now = _utc(now)
    year, week, _ = now.isocalendar()
    rows = conn.execute(select(recommendations.c.advisor_id, recommendations.c.recommendation_id).where(and_(
        recommendations.c.delivery == "weekly_batch",
        # A deferral of a weekly-batch recommendation ends in the next digest after its date.
        or_(recommendations.c.status == "pending",
            and_(recommendations.c.status == "deferred", recommendations.c.deferred_until <= now))))
        .order_by(recommendations.c.advisor_id, recommendations.c.recommendation_id)).all()
    sent = {r.notification_key for r in conn.execute(select(notifications.c.notification_key).where(
        notifications.c.kind == "weekly_digest"))}
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(row.advisor_id, []).append(row.recommendation_id)
    digests = [{"advisor_id": advisor, "notification_key": f"weekly_digest:{advisor}:{year}-W{week:02d}",
                "recommendation_ids": ids} for advisor, ids in grouped.items()]
    return [d for d in digests if d["notification_key"] not in sent]


def record_weekly_digest(conn: Connection, advisor_id: str, notification_key: str, recommendation_ids: list[str],
                         now: datetime) -> bool:
    now = _utc(now)
    try:
        with conn.begin_nested():
            conn.execute(insert(notifications).values(
                notification_key=notification_key, kind="weekly_digest", recommendation_id=None,
                recipient_id=advisor_id, created_at=now, payload=audit.canonical_json({"recommendations": recommendation_ids})))
    except IntegrityError:
        return False
    audit.append(conn, f"digest:{notification_key}", "weekly_digest", "rebal:escalation_sensor", now, advisor_id,
                 {"recommendations": recommendation_ids})
    return True


def record_gate_verdict(conn: Connection, decision_id: str, passed: bool, reason: str, now: datetime) -> None:
    """The approval gate's verdict on a decision (once: a second verdict is ignored)."""
    now = _utc(now)
    done = conn.execute(update(decisions).where(and_(decisions.c.decision_id == decision_id,
                                                     decisions.c.gate_verdict.is_(None)))
                        .values(gate_verdict="passed" if passed else "refused", gate_reason=reason, gate_checked_at=now))
    if done.rowcount != 1:
        return
    rec_id = conn.execute(select(decisions.c.recommendation_id).where(decisions.c.decision_id == decision_id)).scalar_one()
    if not passed:
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == rec_id)
                     .values(status="refused_by_gate", updated_at=now))
    audit.append(conn, f"gate:{decision_id}", "gate_passed" if passed else "gate_refused", "rebal:approval_gate", now,
                 rec_id, {"decision_id": decision_id, "reason": reason})


def decisions_after(conn: Connection, cursor: int, limit: int = 100) -> list[dict]:
    """Decisions that may lead to execution (approve, modify, auto_approve) after the cursor."""
    rows = conn.execute(select(decisions).where(and_(
        decisions.c.decision_seq > cursor, decisions.c.action.in_(("approve", "modify", "auto_approve"))))
        .order_by(decisions.c.decision_seq).limit(limit)).mappings().all()
    return [dict(r) for r in rows]
