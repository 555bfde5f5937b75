"""The recommendation lifecycle: publish, supersede, resolve, decide, remind, escalate.

Plain functions over a SQLAlchemy connection (one transaction each, the caller's), with the
clock passed in (`now`), so the 24h/48h rules are tested with an injected clock. Every state
change appends its audit event in the same transaction: the record and the change commit or
fail together.

States:   pending ──approve/modify──▶ approved/modified ──gate passes──▶ executed | partially_executed
             │                                  │                        | cancelled (ledger.py)
             │                                  ╰──gate refuses──▶ pending again (escalated if compliance
             │                                     decided it; superseded if a newer one exists)
             │  ╰──defer──▶ deferred (until a date; reminders wait for it)
             │  ╰──escalate / 48h──▶ escalated (compliance decides)
             ╰──(a later day)──▶ superseded (the new one keeps the escalation clock)
             ╰──(back inside bands)──▶ resolved_by_market
          discretionary micro-trade rule ──▶ auto_approved (voided and superseded when the day is
                                             re-published before the gate passed it)
          an account with open orders ──▶ blocked_by_open_orders (not routed; final)
          an older day's run ──▶ historical (not routed; final)

History stays history: a run of a day older than the newest day published (a re-run, a
backfill) never supersedes, resolves or reopens a newer day's recommendations; what it publishes
is `historical`, with no alert, reminder or auto-approval. Final states: executed,
partially_executed, cancelled, superseded, resolved_by_market, blocked_by_open_orders,
historical. Every other state is decidable by someone (pending, deferred: the advisor of record
or their team; escalated: compliance), and approved / modified / auto_approved wait for the gate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Callable

from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit, authority
from rebal_pipeline.workflow.schema import advisor_team, decisions, notifications, recommendations, users

OPEN = ("pending", "deferred", "escalated")  # waiting for a human
APPROVED = ("approved", "modified", "auto_approved")
ACTIONS = authority.ACTIONS  # who may take which: authority.py


@dataclass(frozen=True)
class LifecyclePolicy:
    reminder_hours: float = 24
    escalation_hours: float = 48
    default_defer_days: int = 5  # a deferral without a date ends after this: nothing waits forever
    # Discretionary micro-trade rule: discretionary account, trades under this many dollars and
    # zero realised gain → auto-approved by policy (recorded as the approver, with its version).
    micro_trade_limit: float = 5000.0
    micro_trade_rule_version: str = "discretionary-micro-trade/1"


def lifecycle_policy(drift_policy=None, rebal_settings=None) -> LifecyclePolicy:
    """The LifecyclePolicy of the drift policy in force (`drift_policy`, else the file
    REBAL_DRIFT_POLICY names or the shipped one), with the settings' reminder / escalation hours
    (REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS) applied on top. The one home of that override:
    the escalation sensor, the publication and the mailer all ask here. `rebal_settings`: a
    `RebalSettings` (default: the process environment's, read now)."""
    from rebal_pipeline import settings
    from rebal_pipeline.core.policy import load_policy

    config = rebal_settings if rebal_settings is not None else settings.current()
    rule = (drift_policy or load_policy(config.policy_file())).approval
    hours = {"reminder_hours": float(rule.reminder_hours), "escalation_hours": float(rule.escalation_hours)}
    # The settings validated the values (numbers of hours, positive) when they were loaded.
    for field in ("reminder_hours", "escalation_hours"):
        if getattr(config, field) is not None:
            hours[field] = float(getattr(config, field))
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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def lineage_of(scope: str, scope_id: str, kind: str) -> str:
    return f"{scope}:{scope_id}:{kind}"


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


AdvisorsOfRecord = dict[tuple[str, str], str] | Callable[[list[tuple[str, str]]], dict[tuple[str, str], str]]


def sync_users(conn: Connection, rows: list[dict], now: datetime,
               advisors_of_record: AdvisorsOfRecord | None = None) -> int:
    """Bring the users up to date with the feed (users.csv, the whole file): name, email, role,
    team routing (`team_of`: the advisor whose clients this user also works on) and the team's
    alert setting (`team_alerts` on the advisor's row). Tokens are kept.

    People come and go (issue 12): a user no longer in users.csv is deactivated from this moment
    (tokens and links refused; audit event `user_deactivated`; their API token digest is dropped,
    so coming back means a new token). A user deactivated by a person (`rebal users deactivate`)
    stays deactivated even while users.csv still lists them. The open recommendations of inactive
    advisors are re-routed to the advisor of record in today's feed (`advisors_of_record`:
    (scope, scope_id) → advisor_id, or a function answering that for the scopes asked about;
    audit event `recommendation_rerouted`; the new advisor gets a
    new alert, message key alert:<recommendation>:<advisor>). Returns the users changed."""
    now = _utc(now)
    if not rows:
        # users.csv is required and never empty (the feed contract): an empty list is a broken
        # feed, and must not lock every person out.
        raise ValueError("users.csv lists nobody: refusing to deactivate every user")
    changed = 0
    _sync_teams(conn, rows, now)
    listed = set()
    for row in rows:
        listed.add(row["user_id"])
        existing = conn.execute(select(users).where(users.c.user_id == row["user_id"])).mappings().first()
        values = {"name": row["name"], "email": row["email"], "role": row["role"],
                  "team_alerts": _flag(row.get("team_alerts"))}
        kept_out = existing is not None and not existing["active"] and existing["deactivated_by"] not in (None, FEED)
        if not kept_out:
            values["active"] = True
        if existing is None:
            conn.execute(insert(users).values(user_id=row["user_id"], **values))
        elif any(existing[k] != v for k, v in values.items()):
            if values.get("active") and not existing["active"]:
                values.update(deactivated_at=None, deactivated_by=None, deactivation_reason=None)
            conn.execute(update(users).where(users.c.user_id == row["user_id"]).values(**values))
        else:
            continue
        changed += 1
        audited = {k: v for k, v in values.items() if k not in ("deactivated_at", "deactivated_by", "deactivation_reason")}
        back = existing is not None and not existing["active"] and values.get("active")
        audit.append(conn, f"user:{row['user_id']}:{_sha(json.dumps(audited, sort_keys=True))[:16]}"
                           + (f":back:{now.isoformat()}" if back else ""), "user_synced",
                     "rebal:feed", now, row["user_id"], {"role": row["role"], "active": values.get("active", False)})
    gone = conn.execute(select(users.c.user_id).where(and_(users.c.active, users.c.user_id.not_in(listed)))
                        .order_by(users.c.user_id)).scalars().all()
    for user_id in gone:
        deactivate_user(conn, user_id, FEED, "no longer in users.csv", now)
        changed += 1
    if advisors_of_record is not None:
        reroute_open_recommendations(conn, advisors_of_record, now)
    return changed


FEED = "rebal:feed"


def _flag(value) -> bool | None:
    """users.csv booleans are `true` / `false` (empty: not set)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text == "true" else False if text == "false" else None


def deactivate_user(conn: Connection, user_id: str, by: str, reason: str, now: datetime) -> bool:
    """Deactivate a user now: their API token and their links are refused from this transaction's
    commit (the token digest is dropped), their team memberships end, and the audit event
    `user_deactivated` says who did it and why. False: no such user, or already inactive."""
    now = _utc(now)
    done = conn.execute(update(users).where(and_(users.c.user_id == user_id, users.c.active)).values(
        active=False, api_token_sha256=None, deactivated_at=now, deactivated_by=by, deactivation_reason=reason))
    if done.rowcount != 1:
        return False
    conn.execute(advisor_team.delete().where(advisor_team.c.member_user_id == user_id))
    audit.append(conn, f"user-deactivated:{user_id}:{now.isoformat()}", "user_deactivated", by, now, user_id,
                 {"reason": reason})
    return True


def reroute_open_recommendations(conn: Connection, advisors_of_record: AdvisorsOfRecord,
                                 now: datetime) -> dict[str, str]:
    """Hand every open recommendation (pending, deferred, escalated, or approved/modified and
    waiting for the gate) whose advisor is no longer
    an active user to the advisor of record in today's feed ((scope, scope_id) → advisor_id),
    when that one is active. Each re-route: the advisor changes, `rerouted_at` is set (the
    advisor_alerts sensor alerts the new advisor once), audit event `recommendation_rerouted`.
    One whose scope has no active advisor in the feed stays where it is (compliance can still
    act on it once escalated) and is named in the audit event `recommendation_not_rerouted`.
    Returns recommendation_id → new advisor."""
    now = _utc(now)
    active = select(users.c.user_id).where(users.c.active)
    stranded = conn.execute(select(recommendations.c.recommendation_id, recommendations.c.scope,
                                   recommendations.c.scope_id, recommendations.c.advisor_id).where(and_(
        # Approved or modified but not yet through the gate count too: the gate refuses a departed
        # advisor's decision and hands the recommendation back to its advisor of record, who must
        # then be someone who can still decide it (found by the execution property test).
        recommendations.c.status.in_((*OPEN, "approved", "modified")), recommendations.c.advisor_id.is_not(None),
        recommendations.c.advisor_id.not_in(active))).order_by(recommendations.c.recommendation_id)).all()
    if not stranded:
        return {}
    if callable(advisors_of_record):  # asked for the stranded scopes only (one warehouse query)
        advisors_of_record = advisors_of_record(sorted({(r.scope, r.scope_id) for r in stranded}))
    live = {r.user_id for r in conn.execute(select(users.c.user_id).where(and_(users.c.active,
                                                                               users.c.role == "advisor")))}
    moved: dict[str, str] = {}
    for rec in stranded:
        new = advisors_of_record.get((rec.scope, rec.scope_id))
        if new is None or new not in live or new == rec.advisor_id:
            audit.append(conn, f"not-rerouted:{rec.recommendation_id}:{rec.advisor_id}", "recommendation_not_rerouted",
                         FEED, now, rec.recommendation_id,
                         {"from": rec.advisor_id, "reason": "no active advisor of record for it in today's feed"})
            continue
        done = conn.execute(update(recommendations).where(and_(
            recommendations.c.recommendation_id == rec.recommendation_id,
            recommendations.c.advisor_id == rec.advisor_id)).values(advisor_id=new, rerouted_at=now, updated_at=now))
        if done.rowcount != 1:
            continue
        audit.append(conn, f"rerouted:{rec.recommendation_id}:{new}", "recommendation_rerouted", FEED, now,
                     rec.recommendation_id, {"from": rec.advisor_id, "to": new, "reason": "advisor no longer active"})
        moved[rec.recommendation_id] = new
    return moved


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
    """Store the SHA-256 of a user's API token (the token itself is shown once, never stored).
    An inactive user gets none (409): their tokens are refused anyway."""
    row = conn.execute(select(users.c.active).where(users.c.user_id == user_id)).first()
    if row is None:
        raise DecisionError(404, f"no user {user_id}")
    if not row.active:
        raise DecisionError(409, f"{user_id} is deactivated: no API token is issued to an inactive user")
    conn.execute(update(users).where(users.c.user_id == user_id).values(api_token_sha256=_sha(token)))
    audit.append(conn, f"token:{user_id}:{_sha(token)[:16]}", "api_token_issued", "rebal:operations", now, user_id, {})


def user_for_token(conn: Connection, token: str) -> dict | None:
    """The active user of an API token (None: unknown, or the user is deactivated)."""
    row = conn.execute(select(users).where(and_(users.c.api_token_sha256 == _sha(token), users.c.active))).mappings().first()
    return dict(row) if row else None


def compliance_officer(conn: Connection) -> str | None:
    return authority.compliance_officer(conn)


def may_act_for(conn: Connection, user: dict, advisor_id: str | None) -> bool:
    """The advisor of record, or a member of their team."""
    return authority.acts_for(conn, user, advisor_id)


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
    historical: int = 0  # published for a day older than the newest one: history, not routed
    held: int = 0  # not routed: an account has open orders (blocked_by_open_orders)
    voided: int = 0  # auto-approvals voided because the day was re-published with changed inputs


HISTORICAL = "historical"
HELD = "blocked_by_open_orders"


def _newest_day(conn: Connection):
    return conn.execute(select(func.max(recommendations.c.as_of)).where(
        recommendations.c.status != HISTORICAL)).scalar()


def publish_day(conn: Connection, as_of: date, recs: list[dict], inside_lineages: set[str], now: datetime,
                policy: LifecyclePolicy = LifecyclePolicy()) -> PublishResult:
    """Write one day's recommendations. Idempotent: a recommendation already stored is left
    alone, so re-running the day writes nothing new. A new recommendation for a lineage with an
    open one supersedes it and keeps its escalation clock (and its reminder/escalation state).
    Open recommendations of lineages scanned today that need nothing any more
    (`inside_lineages`: back inside their bands, or no harvest left) are closed as
    resolved_by_market.

    Execution safety (issue 12):
      - History stays history: a day older than the newest day already published (a re-run or
        a backfill of an older session) publishes its recommendations as `historical`: no alert,
        no reminder, no auto-approval, never decidable; it supersedes, resolves and reopens
        nothing (audit event `recommendation_historical`).
      - Open orders hold the account: a recommendation any of whose accounts has an open order
        set (workflow/ledger.py: staged or submitted and not yet seen filled or cancelled) is
        stored `blocked_by_open_orders`, not routed (audit event `recommendation_held` naming
        the decisions), and supersedes the open one of its lineage: the next day's scan after
        the orders fill (or the desk cancels them) recommends again.
      - A re-publish of the day with changed inputs supersedes an auto-approved recommendation
        the gate has not passed yet like a pending one: its auto-approval is voided (the
        decision's gate verdict `voided`, audit event `auto_approval_voided`), so it is never
        executed next to the new one. One the gate passed holds its accounts (above).
      - A recommendation whose package needs compliance review is published escalated and
        routed to compliance (authority.initial_status / route_to_compliance), never
        auto-approved.

    recs: dicts with recommendation_id, scope, scope_id, kind, household_id, advisor_id, tier,
    urgency, delivery, discretionary, trade_value, realized_gain, policy_version,
    positions_fingerprint, package (dict)."""
    from rebal_pipeline.workflow import ledger

    now = _utc(now)
    created = superseded = resolved = auto = unchanged = historical = held = voided = 0
    newest = _newest_day(conn)
    history = newest is not None and as_of < (newest if isinstance(newest, date) else date.fromisoformat(str(newest)))
    # Read once for the whole day, not once per recommendation: publishing opens no order set, and
    # only this loop's own auto-approvals add a lineage with an unsubmitted auto-approval.
    open_orders = ledger.accounts_with_open_orders(conn)
    unsubmitted = _lineages_with_unsubmitted_auto_approvals(conn, as_of)
    recs = sorted(recs, key=lambda r: r["recommendation_id"])
    # Set-based reads (issue #17): which ids are stored, each lineage's open recommendation and
    # each advisor's team, in a few queries for the whole day instead of three per recommendation.
    stored = _stored_ids(conn, [r["recommendation_id"] for r in recs])
    lineages = {r["recommendation_id"]: lineage_of(r["scope"], r["scope_id"], r["kind"]) for r in recs}
    open_by_lineage = {} if history else _open_by_lineage(conn, sorted(set(lineages.values())))
    teams = _teams(conn, sorted({r.get("advisor_id") for r in recs if r.get("advisor_id")}))
    # Writes are buffered and flushed in bulk, in the order the loop makes them (the audit chain's
    # order is the same as one write at a time); a step that writes for itself (voiding,
    # compliance routing) flushes first, so it sees every row before it.
    writes = _Writes(conn)
    for rec in recs:
        rec_id = rec["recommendation_id"]
        if rec_id in stored:
            unchanged += 1
            continue
        stored.add(rec_id)
        lineage = lineages[rec_id]
        if history:
            writes.recommendation(rec, lineage, as_of, now, HISTORICAL, {}, None)
            writes.event(f"recommendation:{rec_id}", "recommendation_historical", now, rec_id, {
                "as_of": as_of, "newest_day": newest, "scope": rec["scope"], "scope_id": rec["scope_id"],
                "kind": rec["kind"], "reason": f"{as_of.isoformat()} is older than the newest day "
                                              "published: history, not routed for decision"})
            historical += 1
            continue
        previous = open_by_lineage.get(lineage)
        if lineage in unsubmitted:
            writes.flush()
            voided += _void_unsubmitted_auto_approvals(conn, lineage, rec_id, as_of, now)
        accounts = list((rec.get("package") or {}).get("account_ids") or [rec["scope_id"]])
        blocking = {a: open_orders[a] for a in sorted(set(accounts)) if a in open_orders}
        carried: dict[str, Any] = {}
        if previous is not None:
            # A later scan supersedes without restarting the escalation clock.
            carried = {k: previous[k] for k in ("clock_started_at", "reminder_sent_at", "escalated_at",
                                                 "escalated_to", "deferred_until")}
            carried["status"] = previous["status"]
            writes.supersede(previous["recommendation_id"], rec_id, now)
            writes.event(f"superseded:{previous['recommendation_id']}", "recommendation_superseded", now,
                         previous["recommendation_id"], {"superseded_by": rec_id, "as_of": as_of})
            superseded += 1
        if blocking:
            writes.recommendation(rec, lineage, as_of, now, HELD, {}, previous)
            writes.event(f"recommendation:{rec_id}", "recommendation_held", now, rec_id, {
                "as_of": as_of, "scope": rec["scope"], "scope_id": rec["scope_id"], "kind": rec["kind"],
                "reason": "open orders", "open_orders": blocking,
                "supersedes": previous["recommendation_id"] if previous is not None else None})
            open_by_lineage.pop(lineage, None)
            held += 1
            continue
        status = authority.initial_status(rec, carried.get("status"))
        row = writes.recommendation(rec, lineage, as_of, now, status, carried, previous)
        writes.event(f"recommendation:{rec_id}", "recommendation_alerted", now, rec_id, {
            "as_of": as_of, "scope": rec["scope"], "scope_id": rec["scope_id"], "kind": rec["kind"],
            "routed_to": rec.get("advisor_id"), "team": teams.get(rec.get("advisor_id"), []),
            "urgency": rec.get("urgency"), "delivery": rec.get("delivery"), "policy_version": rec.get("policy_version"),
            "trade_value": rec.get("trade_value"), "supersedes": carried and previous["recommendation_id"],
        })
        created += 1
        open_by_lineage[lineage] = row
        if status == "escalated" and carried.get("status") != "escalated":
            writes.flush()
            authority.route_to_compliance(conn, rec, now)
            open_by_lineage[lineage] = {**row, "status": "escalated"}
        elif _micro_trade(rec, policy) and status == "pending":
            writes.auto_approve(rec, now, policy)
            open_by_lineage.pop(lineage, None)  # auto_approved: no longer waiting for a person
            unsubmitted.add(lineage)
            auto += 1
    writes.flush()
    # Back inside the bands today: close what was waiting (never from an older day's run).
    if inside_lineages and not history:
        stale = conn.execute(select(recommendations.c.recommendation_id, recommendations.c.lineage).where(and_(
            recommendations.c.status.in_(OPEN), recommendations.c.as_of < as_of))).all()
        closing = sorted(row.recommendation_id for row in stale if row.lineage in inside_lineages)
        if closing:  # one update and one chain append for all of them
            conn.execute(update(recommendations).where(recommendations.c.recommendation_id == bindparam("b_id"))
                         .values(status="resolved_by_market", updated_at=now), [{"b_id": r} for r in closing])
            audit.append_many(conn, [{"event_id": f"resolved:{r}", "kind": "recommendation_resolved_by_market",
                                      "actor": "rebal:daily_scan", "occurred_at": now, "subject_id": r,
                                      "payload": {"as_of": as_of}} for r in closing])
            resolved += len(closing)
    return PublishResult(created, superseded, resolved, auto, unchanged, historical, held, voided)


def _recommendation_row(rec: dict, lineage: str, as_of: date, now: datetime, status: str, carried: dict,
                        previous) -> dict:
    return dict(
        recommendation_id=rec["recommendation_id"], lineage=lineage, as_of=as_of, scope=rec["scope"],
        scope_id=rec["scope_id"], kind=rec["kind"], household_id=rec.get("household_id"),
        advisor_id=rec.get("advisor_id"), tier=rec.get("tier"), urgency=rec.get("urgency"),
        delivery=rec.get("delivery"), discretionary=bool(rec.get("discretionary")),
        trade_value=float(rec.get("trade_value") or 0), realized_gain=float(rec.get("realized_gain") or 0),
        policy_version=rec.get("policy_version"), positions_fingerprint=rec.get("positions_fingerprint"),
        package=audit.canonical_json(rec["package"]),
        status=status,
        clock_started_at=carried.get("clock_started_at") or now, created_at=now, updated_at=now,
        supersedes=previous["recommendation_id"] if previous is not None else None,
        deferred_until=carried.get("deferred_until"), reminder_sent_at=carried.get("reminder_sent_at"),
        escalated_at=carried.get("escalated_at"), escalated_to=carried.get("escalated_to"),
    )


def _stored_ids(conn: Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        found |= set(conn.execute(select(recommendations.c.recommendation_id).where(
            recommendations.c.recommendation_id.in_(ids[start:start + 500]))).scalars())
    return found


_CARRIED = ("recommendation_id", "status", "as_of", "clock_started_at", "reminder_sent_at", "escalated_at",
            "escalated_to", "deferred_until")


def _open_by_lineage(conn: Connection, lineages: list[str]) -> dict[str, dict]:
    """Each lineage's open recommendation (the newest day's, as publish_day supersedes it)."""
    found: dict[str, dict] = {}
    for start in range(0, len(lineages), 500):
        rows = conn.execute(select(recommendations.c.lineage, *(recommendations.c[c] for c in _CARRIED)).where(and_(
            recommendations.c.lineage.in_(lineages[start:start + 500]), recommendations.c.status.in_(OPEN)))
            .order_by(recommendations.c.as_of.desc(), recommendations.c.recommendation_id)).mappings()
        for row in rows:
            found.setdefault(row["lineage"], {c: row[c] for c in _CARRIED})
    return found


def _teams(conn: Connection, advisor_ids: list[str]) -> dict[str, list[str]]:
    teams: dict[str, list[str]] = {}
    for start in range(0, len(advisor_ids), 500):
        for advisor_id, member in conn.execute(select(advisor_team.c.advisor_id, advisor_team.c.member_user_id).where(
                advisor_team.c.advisor_id.in_(advisor_ids[start:start + 500]))):
            teams.setdefault(advisor_id, []).append(member)
    return teams


class _Writes:
    """publish_day's writes, in bulk: recommendation rows (executemany), supersedes (one
    executemany), micro-trade auto-approvals (executemany) and audit events (one
    audit.append_many), flushed in that order."""

    def __init__(self, conn: Connection):
        self.conn, self.rows, self.superseded, self.decisions, self.events = conn, [], [], [], []

    def recommendation(self, rec: dict, lineage: str, as_of: date, now: datetime, status: str, carried: dict,
                       previous) -> dict:
        row = _recommendation_row(rec, lineage, as_of, now, status, carried, previous)
        self.rows.append(row)
        return {c: row.get(c) for c in _CARRIED}

    def auto_approve(self, rec: dict, now: datetime, policy: LifecyclePolicy) -> None:
        """The micro-trade rule approves the recommendation just buffered: stored auto_approved,
        with its decision row and event (after the recommendation's own event, as decided)."""
        row = self.rows[-1]
        if row["recommendation_id"] != rec["recommendation_id"]:
            raise RuntimeError(f"auto-approval of {rec['recommendation_id']} before its row was buffered")
        row["status"] = "auto_approved"
        decision, event = _auto_approval(rec, row["package"], now, policy)
        self.decisions.append(decision)
        self.events.append(event)

    def supersede(self, recommendation_id: str, by: str, now: datetime) -> None:
        self.superseded.append({"b_id": recommendation_id, "b_by": by, "b_now": now})

    def event(self, event_id: str, kind: str, now: datetime, subject_id: str, payload: dict) -> None:
        self.events.append({"event_id": event_id, "kind": kind, "actor": "rebal:daily_scan", "occurred_at": now,
                            "subject_id": subject_id, "payload": payload})

    def flush(self) -> None:
        # Rows first: a supersede may name a row of this same flush (two of a lineage in one day).
        for start in range(0, len(self.rows), 1000):
            self.conn.execute(insert(recommendations), self.rows[start:start + 1000])
        self.rows = []
        if self.superseded:
            self.conn.execute(update(recommendations).where(recommendations.c.recommendation_id == bindparam("b_id"))
                              .values(status="superseded", superseded_by=bindparam("b_by"),
                                      updated_at=bindparam("b_now")), self.superseded)
            self.superseded = []
        if self.decisions:  # in the day's order: the decision sensor reads them by decision_seq
            self.conn.execute(insert(decisions), self.decisions)
            self.decisions = []
        if self.events:
            audit.append_many(self.conn, self.events)
            self.events = []


def _unsubmitted_auto_approvals(as_of: date):
    return and_(recommendations.c.status == "auto_approved", recommendations.c.as_of <= as_of,
                decisions.c.action == "auto_approve", decisions.c.gate_verdict.is_(None))


def _lineages_with_unsubmitted_auto_approvals(conn: Connection, as_of: date) -> set[str]:
    return {row.lineage for row in conn.execute(
        select(recommendations.c.lineage).distinct()
        .join(decisions, decisions.c.recommendation_id == recommendations.c.recommendation_id)
        .where(_unsubmitted_auto_approvals(as_of)))}


def _void_unsubmitted_auto_approvals(conn: Connection, lineage: str, new_id: str, as_of: date, now: datetime) -> int:
    """Supersede the lineage's auto-approved recommendations the gate has not passed (their
    auto-approval voided): the day's inputs changed under them. Returns how many."""
    rows = conn.execute(
        select(recommendations.c.recommendation_id, decisions.c.decision_id)
        .join(decisions, decisions.c.recommendation_id == recommendations.c.recommendation_id)
        .where(and_(recommendations.c.lineage == lineage, _unsubmitted_auto_approvals(as_of)))
        .order_by(recommendations.c.recommendation_id)).all()
    for row in rows:
        reason = f"superseded by {new_id} (the day was re-published with changed inputs) before the gate passed it"
        conn.execute(update(decisions).where(and_(decisions.c.decision_id == row.decision_id,
                                                  decisions.c.gate_verdict.is_(None)))
                     .values(gate_verdict="voided", gate_reason=reason, gate_checked_at=now))
        conn.execute(update(recommendations).where(recommendations.c.recommendation_id == row.recommendation_id)
                     .values(status="superseded", superseded_by=new_id, updated_at=now))
        # The decision's verdict event (every gate verdict has one: audit.verify checks it).
        audit.append(conn, f"gate:{row.decision_id}", "gate_voided", "rebal:daily_scan", now, row.recommendation_id,
                     {"decision_id": row.decision_id, "reason": reason})
        audit.append(conn, f"voided:{row.decision_id}", "auto_approval_voided", "rebal:daily_scan", now,
                     row.recommendation_id, {"decision_id": row.decision_id, "superseded_by": new_id,
                                             "as_of": as_of, "reason": reason})
        audit.append(conn, f"superseded:{row.recommendation_id}", "recommendation_superseded", "rebal:daily_scan",
                     now, row.recommendation_id, {"superseded_by": new_id, "as_of": as_of})
    return len(rows)


def _micro_trade(rec: dict, policy: LifecyclePolicy) -> bool:
    return (policy.micro_trade_limit > 0 and bool(rec.get("discretionary")) and rec["kind"] == "rebalance"
            and 0 < float(rec.get("trade_value") or 0) < policy.micro_trade_limit
            and float(rec.get("realized_gain") or 0) == 0.0)


def _auto_approval(rec: dict, package_json: str, now: datetime, policy: LifecyclePolicy) -> tuple[dict, dict]:
    """The micro-trade rule's decision on a recommendation just published (its row and its audit
    event): written by publish_day with the day's other rows, the recommendation stored
    `auto_approved`."""
    actor = f"policy:{policy.micro_trade_rule_version}"
    payload = {"rule": policy.micro_trade_rule_version, "limit": policy.micro_trade_limit,
               "trade_value": rec.get("trade_value"), "realized_gain": rec.get("realized_gain")}
    return _decision_record(rec["recommendation_id"], "auto_approve", actor, "policy",
                            f"discretionary account: trades under ${policy.micro_trade_limit:,.0f} with zero "
                            "realised gain", payload, now, package_json)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


def _decision_id(recommendation_id: str, action: str, actor: str, payload_json: str) -> str:
    return _sha(f"{recommendation_id}|{action}|{actor}|{payload_json}")[:32]


def _decision_record(recommendation_id: str, action: str, actor: str, via: str, reason: str | None, payload: dict,
                     now: datetime, package_json: str, identity: str | None = None) -> tuple[dict, dict]:
    """A decision's row and its audit event. The record covers what was decided: the SHA-256 of
    the stored package and of the trades decided on (audit.decision_hashes), checked by the gate
    and by `rebal audit verify`."""
    body = audit.canonical_json(payload)
    decision_id = _decision_id(recommendation_id, action, actor, identity if identity is not None else body)
    row = {"decision_id": decision_id, "recommendation_id": recommendation_id, "action": action, "actor_id": actor,
           "via": via, "reason": reason, "payload": body, "created_at": now}
    event = {"event_id": f"decision:{decision_id}", "kind": f"decision_{action}", "actor": actor, "occurred_at": now,
             "subject_id": recommendation_id,
             "payload": {"reason": reason, "via": via, **payload, **audit.decision_hashes(action, payload, package_json)}}
    return row, event


def _insert_decision(conn: Connection, recommendation_id: str, action: str, actor: str, via: str,
                     reason: str | None, payload: dict, now: datetime, identity: str | None = None) -> dict:
    package_json = conn.execute(select(recommendations.c.package).where(
        recommendations.c.recommendation_id == recommendation_id)).scalar_one()
    row, event = _decision_record(recommendation_id, action, actor, via, reason, payload, now, package_json, identity)
    conn.execute(insert(decisions).values(**row))
    audit.append_many(conn, [event])
    return dict(conn.execute(select(decisions).where(decisions.c.decision_id == row["decision_id"])).mappings().one())


def decide(conn: Connection, recommendation_id: str, user: dict, action: str, now: datetime, *,
           reason: str | None = None, payload: dict | None = None, via: str = "api",
           policy: LifecyclePolicy = LifecyclePolicy()) -> tuple[dict, bool]:
    """Record a decision. Returns (decision, created). The same decision repeated by the same
    person is idempotent (created False); a different decision on a recommendation already
    decided is a conflict (409). Who may take which action on which recommendation is
    authority.py's rule (403 / 409 from there). A `comment` is recorded and audited and changes
    nothing; `return_to_advisor` (compliance) puts an escalated recommendation back to pending;
    an `escalate` records the escalation email to the compliance officer in this transaction."""
    now = _utc(now)
    if action not in authority.ACTIONS:
        raise DecisionError(422, f"unknown action {action!r}; one of {', '.join(authority.ACTIONS)}")
    payload = dict(payload or {})
    if action in authority.NEEDS_REASON and not (reason and reason.strip()):
        raise DecisionError(422, f"{action} needs a reason" if action != "comment" else "a comment needs its text")
    rec = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == recommendation_id)
                       ).mappings().first()
    if rec is None:
        raise DecisionError(404, f"no recommendation {recommendation_id}")
    # The decision's identity is what was asked (a default deferral date filled in below does not
    # make a repeated "defer" a new decision). The same person repeating it gets it back, even
    # after the recommendation moved on because of it. A comment is identified by its text.
    asked = audit.canonical_json({"comment": reason.strip()} if action == "comment" else payload)
    asked += decision_round(conn, recommendation_id)  # issue 12: a gate refusal opens a new round
    repeat = conn.execute(select(decisions).where(decisions.c.decision_id == _decision_id(
        recommendation_id, action, user["user_id"], asked))).mappings().first()
    if repeat is not None:
        return dict(repeat), False
    refused = authority.refusal(conn, user, dict(rec), action)
    if refused is not None:
        raise DecisionError(refused.status, refused.message)
    if action == "comment":
        return _insert_decision(conn, recommendation_id, action, user["user_id"], via, reason.strip(), payload, now,
                                identity=asked), True
    if action == "defer":
        until = payload.get("deferred_until")
        payload["deferred_until"] = (_utc(datetime.fromisoformat(until)) if isinstance(until, str)
                                     else _utc(until) if until else now + timedelta(days=policy.default_defer_days))
        if payload["deferred_until"] <= now:
            raise DecisionError(422, "deferred_until must be in the future")
    officer = None
    if action == "escalate":
        officer = compliance_officer(conn)
        if officer is None:
            raise DecisionError(409, "no active compliance officer to escalate to (users.csv role compliance)")
    # The state change is conditional on the status read above: of two concurrent deciders, one wins.
    values: dict[str, Any] = {"status": authority.NEW_STATUS[action], "updated_at": now}
    if action == "defer":
        values["deferred_until"] = payload["deferred_until"]
    if action == "escalate":
        values.update(escalated_at=now, escalated_to=officer)
    done = conn.execute(update(recommendations).where(and_(
        recommendations.c.recommendation_id == recommendation_id, recommendations.c.status == rec["status"]))
        .values(**values))
    if done.rowcount != 1:
        raise DecisionError(409, "the recommendation changed while this decision was being recorded")
    decision = _insert_decision(conn, recommendation_id, action, user["user_id"], via, reason, payload, now,
                                identity=asked)
    if action == "escalate":
        # Emailed like the 48h escalation: the same kind of wf_notifications row, keyed on this
        # decision (exactly once: a repeat of the decision returns above).
        authority.record_escalation(conn, dict(rec), f"escalation:{recommendation_id}:{decision['decision_id']}",
                                    officer, now, user["user_id"], reason=reason)
    return decision, True


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


def gate_refusals(conn: Connection, recommendation_id: str) -> int:
    """How many of the recommendation's decisions the gate refused."""
    return int(conn.execute(select(func.count()).select_from(decisions).where(and_(
        decisions.c.recommendation_id == recommendation_id, decisions.c.gate_verdict == "refused"))).scalar())


def decision_round(conn: Connection, recommendation_id: str) -> str:
    """Part of a decision's identity: after a gate refusal the same person taking the same
    decision again records a new decision (checked again by the gate), not the refused one."""
    refused = gate_refusals(conn, recommendation_id)
    return f"|after-gate-refusal-{refused}" if refused else ""


def record_gate_verdict(conn: Connection, decision_id: str, passed: bool, reason: str, now: datetime) -> None:
    """The approval gate's verdict on a decision (once: a second verdict is ignored).

    A refusal never leaves the recommendation stuck: it goes back to whoever decides it now,
    `escalated` when compliance took the refused decision, else `pending` (the advisor of
    record; an auto-approval refused needs a person), so a new decision can be recorded; or
    `superseded` when a newer recommendation of its lineage exists (that one is decided
    instead). The reason is in the decision's gate_reason, the API's `last_gate_refusal`, the
    portal page and the audit event `gate_refused` (with where the recommendation went)."""
    now = _utc(now)
    done = conn.execute(update(decisions).where(and_(decisions.c.decision_id == decision_id,
                                                     decisions.c.gate_verdict.is_(None)))
                        .values(gate_verdict="passed" if passed else "refused", gate_reason=reason, gate_checked_at=now))
    if done.rowcount != 1:
        return
    decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one()
    rec_id = decision["recommendation_id"]
    payload: dict[str, Any] = {"decision_id": decision_id, "reason": reason}
    if not passed:
        rec = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == rec_id)
                           ).mappings().one()
        if rec["status"] in APPROVED:
            r = recommendations.c
            newer = conn.execute(select(r.recommendation_id).where(and_(
                r.lineage == rec["lineage"], r.recommendation_id != rec_id, r.status != HISTORICAL,
                or_(r.as_of > rec["as_of"], and_(r.as_of == rec["as_of"], r.created_at > rec["created_at"]))))
                .order_by(r.as_of.desc(), r.created_at.desc()).limit(1)).scalar()
            role = conn.execute(select(users.c.role).where(users.c.user_id == decision["actor_id"])).scalar()
            values: dict[str, Any] = {"updated_at": now}
            if newer is not None:
                values.update(status="superseded", superseded_by=newer)
            else:
                values["status"] = "escalated" if role == "compliance" else "pending"
            conn.execute(update(recommendations).where(and_(r.recommendation_id == rec_id, r.status == rec["status"]))
                         .values(**values))
            payload["returned_to"] = values["status"]
    audit.append(conn, f"gate:{decision_id}", "gate_passed" if passed else "gate_refused", "rebal:approval_gate", now,
                 rec_id, payload)


def last_gate_refusal(conn: Connection, recommendation_id: str) -> dict | None:
    """The latest refused decision of a recommendation: decision_id, action, actor_id, reason,
    checked_at (None: the gate never refused one)."""
    row = conn.execute(select(decisions.c.decision_id, decisions.c.action, decisions.c.actor_id,
                              decisions.c.gate_reason, decisions.c.gate_checked_at).where(and_(
        decisions.c.recommendation_id == recommendation_id, decisions.c.gate_verdict == "refused"))
        .order_by(decisions.c.gate_checked_at.desc(), decisions.c.decision_seq.desc()).limit(1)).first()
    if row is None:
        return None
    return {"decision_id": row.decision_id, "action": row.action, "actor_id": row.actor_id,
            "reason": row.gate_reason, "checked_at": _utc(row.gate_checked_at)}


def decisions_after(conn: Connection, cursor: int, limit: int = 100) -> list[dict]:
    """Decisions that may lead to execution (approve, modify, auto_approve) after the cursor."""
    rows = conn.execute(select(decisions).where(and_(
        decisions.c.decision_seq > cursor, decisions.c.action.in_(("approve", "modify", "auto_approve"))))
        .order_by(decisions.c.decision_seq).limit(limit)).mappings().all()
    return [dict(r) for r in rows]
