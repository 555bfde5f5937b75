"""Who may take which action on which recommendation: the one place the rule is written.

The approval API (its single, batch and link endpoints), the portal, `lifecycle.decide` and the
approval gate all ask this module; none of them carries a copy of the rule. Plain functions over a
SQLAlchemy connection (the caller's transaction).

The rule (who: the advisor of record, or a member of their team (`team_of` in users.csv);
compliance: a user with role compliance; everybody must be an active user):

| action              | advisor of record / team          | compliance                          | state after          |
|---------------------|-----------------------------------|-------------------------------------|----------------------|
| approve, modify     | pending, deferred                 | escalated                           | approved / modified  |
| defer               | pending, deferred                 | — (hands it back instead)           | deferred             |
| escalate            | pending, deferred                 | pending, deferred (takes it over)   | escalated            |
| return_to_advisor   | —                                 | escalated (a reason is required)    | pending              |
| comment             | any status (a reason = the text)  | any status                          | unchanged            |
| read                | their own and their team's        | every recommendation                | —                    |

Operations and the trading desk read every recommendation and decide nothing. A recommendation
is *escalated* — and then compliance's alone to approve, modify or hand back — whether the advisor
escalated it, compliance took it over, the 48h rule escalated it, or it was published escalated
because its package needs compliance review (an account holds a class its ERISA plan bars: the
trade sizing's `compliance_review`, `initial_status`). An advisor therefore never approves what
they escalated: until compliance returns it (`return_to_advisor`, back to pending, audited) the
advisor's only action on it is a comment.

Refusals: 403 when this person may not take this action on this recommendation (not theirs, not
their role, or it is with compliance), 409 when nobody may take it in the recommendation's current
state (already decided, already escalated).

A manual escalation (or a recommendation routed to compliance from the start) records the same
`wf_notifications` row as the 48h rule, kind `escalation`, in the same transaction, so the mailer
emails the compliance officer exactly once (`record_escalation`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import advisor_team, decisions, notifications, recommendations, users

if TYPE_CHECKING:  # lifecycle imports this module; only the type is needed here
    from rebal_pipeline.workflow.lifecycle import LifecyclePolicy

ACTIONS = ("approve", "modify", "defer", "escalate", "return_to_advisor", "comment")
# Actions that change nothing but must still say something.
NEEDS_REASON = ("defer", "escalate", "return_to_advisor", "comment")
ADVISOR_DECIDES = ("pending", "deferred")  # approve, modify, defer, escalate by the advisor
COMPLIANCE_DECIDES = ("escalated",)  # approve, modify, return_to_advisor by compliance
READ_ONLY_ROLES = ("operations", "trading_desk")


class Refusal(Exception):
    """An action this module refuses: status is the HTTP status (403 who, 409 state)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------
# Who is who
# ---------------------------------------------------------------------------------------------


def acts_for(conn: Connection, user: dict, advisor_id: str | None) -> bool:
    """The advisor of record, or a member of their team."""
    if advisor_id is None:
        return False
    if user["user_id"] == advisor_id:
        return True
    return conn.execute(select(advisor_team).where(and_(
        advisor_team.c.advisor_id == advisor_id, advisor_team.c.member_user_id == user["user_id"]))).first() is not None


def is_active(user: dict) -> bool:
    return bool(user.get("active", True))


def may_read(conn: Connection, user: dict, rec: dict) -> bool:
    # Compliance supervises everything; operations and the trading desk read, never decide.
    if not is_active(user):
        return False
    if user["role"] in ("compliance", *READ_ONLY_ROLES):
        return True
    return user["role"] == "advisor" and acts_for(conn, user, rec["advisor_id"])


def with_compliance(rec: dict) -> bool:
    """Compliance's alone to approve, modify or hand back (see the module docstring)."""
    return rec["status"] == "escalated"


def decidable_statuses(user: dict) -> tuple[str, ...]:
    """The statuses on which this user's role may approve or modify."""
    return COMPLIANCE_DECIDES if user["role"] == "compliance" else ADVISOR_DECIDES


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def refusal(conn: Connection, user: dict, rec: dict, action: str) -> Refusal | None:
    """Why `user` may not take `action` on `rec` now (None: they may). Who comes first (403),
    then the state (409), so that nothing about a recommendation's state reaches someone who may
    not act on it."""
    status = rec["status"]
    label = status.replace("_", " ")
    if not is_active(user):
        return Refusal(403, f"{user['user_id']} is no longer an active user and may not act on recommendations")
    if action not in ACTIONS:
        return Refusal(422, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    role = user["role"]
    if role == "compliance":
        if action == "comment":
            return None
        if action == "defer":
            return Refusal(403, "compliance does not defer: approve or modify the recommendation, or return it to "
                                "the advisor (return_to_advisor) with a reason")
        if action == "escalate":
            if status in ADVISOR_DECIDES:
                return None
            return Refusal(409, f"the recommendation is {label}; it cannot be escalated")
        if status not in COMPLIANCE_DECIDES:
            return Refusal(403, "compliance decides escalated recommendations only")
        return None
    if role != "advisor" or not acts_for(conn, user, rec["advisor_id"]):
        return Refusal(403, "you may act only on recommendations for your own clients")
    if action == "comment":
        return None
    if action == "return_to_advisor":
        return Refusal(403, "only compliance hands a recommendation back to the advisor")
    if with_compliance(rec):
        if action == "escalate":
            return Refusal(409, "the recommendation is already escalated to compliance")
        return Refusal(403, "the recommendation is escalated to compliance: only compliance may approve, modify or "
                            "return it; you may add a comment")
    if status not in ADVISOR_DECIDES:
        return Refusal(409, f"recommendation is {label}; a {action} cannot be recorded on it")
    return None


def check(conn: Connection, user: dict, rec: dict, action: str) -> None:
    """Raise the refusal, if any (a Refusal: callers map it to their own error type)."""
    problem = refusal(conn, user, rec, action)
    if problem is not None:
        raise problem


NEW_STATUS = {"approve": "approved", "modify": "modified", "defer": "deferred", "escalate": "escalated",
              "return_to_advisor": "pending"}  # comment: no state change


# ---------------------------------------------------------------------------------------------
# Routed to compliance from the start (ERISA-barred classes held)
# ---------------------------------------------------------------------------------------------


def compliance_review(rec: dict) -> str | None:
    """What needs compliance review in a recommendation to be published (None: nothing). The trade
    sizing flags every holding of a class the account's ERISA plan bars (`no_asset_class`
    restriction) in `compliance_review` (core/trade_sizing.py rule 4; per household in
    core/proposals.py); the publish step passes it as `rec["compliance_review"]` (or inside
    the package)."""
    text = rec.get("compliance_review")
    if text is None and isinstance(rec.get("package"), dict):
        text = rec["package"].get("compliance_review")
    text = (text or "").strip() if isinstance(text, str) else None
    return text or None


def initial_status(rec: dict, carried_status: str | None = None) -> str:
    """The status a new recommendation is published in: `escalated` when its package needs
    compliance review (it goes to compliance from the start; nobody else may approve it), else
    the status carried from the open recommendation it supersedes, else `pending`.

    Hook for `lifecycle.publish_day`: use it for the inserted status, and when it returns
    `escalated` for a recommendation that was not escalated already, call `route_to_compliance`
    after the insert (and never auto-approve it)."""
    if compliance_review(rec):
        return "escalated"
    return carried_status or "pending"


def route_to_compliance(conn: Connection, rec: dict, now: datetime, actor: str = "rebal:daily_scan") -> bool:
    """A recommendation just published `escalated` because it needs compliance review (`rec`: the
    publish dict, with recommendation_id and compliance_review): mark it escalated to the
    compliance officer now and record the escalation notification (emailed once) and the audit
    event `recommendation_routed_to_compliance`. publish_day calls it only when the status was not
    carried over as escalated (then compliance has it, and was told, already). False: nothing to
    do, or already routed."""
    now = _utc(now)
    review = compliance_review(rec)
    if review is None:
        return False
    stored = conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == rec["recommendation_id"])).mappings().one()
    officer = compliance_officer(conn)
    if not audit.append(conn, f"routed:{stored['recommendation_id']}", "recommendation_routed_to_compliance", actor,
                        now, stored["recommendation_id"], {"compliance_review": review, "recipient": officer}):
        return False
    conn.execute(update(recommendations).where(recommendations.c.recommendation_id == stored["recommendation_id"])
                 .values(status="escalated", escalated_at=now, escalated_to=officer, updated_at=now))
    if officer is not None:
        record_escalation(conn, dict(stored), f"escalation:{stored['recommendation_id']}:compliance_review", officer,
                          now, actor, reason=review)
    return True


# ---------------------------------------------------------------------------------------------
# Escalations email the compliance officer (the 48h path's row, recorded here for the others)
# ---------------------------------------------------------------------------------------------


def compliance_officer(conn: Connection) -> str | None:
    row = conn.execute(select(users.c.user_id).where(and_(users.c.role == "compliance", users.c.active))
                       .order_by(users.c.user_id).limit(1)).first()
    return row.user_id if row else None


def record_escalation(conn: Connection, rec: dict, notification_key: str, recipient: str, now: datetime,
                      actor: str, reason: str | None = None) -> bool:
    """The `wf_notifications` row of an escalation (kind `escalation`, as the 48h rule records it,
    so the mailer sends it the same way: once, keyed on the notification key), with its audit
    event, in the caller's transaction. False: this key was recorded already."""
    now = _utc(now)
    try:
        with conn.begin_nested():
            conn.execute(insert(notifications).values(
                notification_key=notification_key, kind="escalation", recommendation_id=rec["recommendation_id"],
                recipient_id=recipient, created_at=now,
                payload=audit.canonical_json({"lineage": rec["lineage"], "as_of": rec["as_of"],
                                              "escalated_by": actor, "reason": reason})))
    except IntegrityError:
        return False
    audit.append(conn, f"escalation:{notification_key}", "recommendation_escalation", actor, now,
                 rec["recommendation_id"], {"recipient": recipient, "reason": reason, "manual": True})
    return True


# ---------------------------------------------------------------------------------------------
# The gate's re-check of who decided
# ---------------------------------------------------------------------------------------------


def with_compliance_when(conn: Connection, decision: dict, rec: dict) -> bool:
    """Was the recommendation with compliance when this decision was recorded? An escalation
    (an `escalate` decision anywhere in its lineage, or its escalated_at: the 48h rule, routing at
    publication, or an escalation carried over from the one it superseded) not followed by a
    `return_to_advisor` before the decision."""
    earlier = conn.execute(
        select(decisions.c.action, decisions.c.created_at, decisions.c.decision_seq)
        .select_from(decisions.join(recommendations,
                                    recommendations.c.recommendation_id == decisions.c.recommendation_id))
        .where(and_(recommendations.c.lineage == rec["lineage"],
                    decisions.c.action.in_(("escalate", "return_to_advisor")),
                    decisions.c.decision_seq < decision["decision_seq"]))
        .order_by(decisions.c.decision_seq.desc()).limit(1)).first()
    if earlier is not None and earlier.action == "escalate":
        return True
    escalated_at = rec["escalated_at"]
    if escalated_at is None or _utc(escalated_at) > _utc(decision["created_at"]):
        return False
    return earlier is None or _utc(escalated_at) > _utc(earlier.created_at)


def decider_problems(conn: Connection, decision: dict, rec: dict, policy: "LifecyclePolicy") -> list[str]:
    """Why the decider of an executable decision (approve, modify, auto_approve) was not allowed
    to take it, re-checked by the approval gate now (empty: they were, and still are):
      - auto_approve: recorded by the micro-trade rule in force, and the recommendation meets it;
      - the decider is an active user now (a user deactivated after deciding is refused);
      - an advisor: the advisor of record or their team, on a recommendation that was not with
        compliance when they decided (an advisor never approves what they escalated);
      - compliance: on a recommendation that was with compliance when they decided;
      - nobody else approves trades."""
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
        if not acts_for(conn, dict(user), rec["advisor_id"]):
            return [f"the decider {actor} is neither the advisor of record ({rec['advisor_id']}) nor on their team"]
        if with_compliance_when(conn, decision, rec):
            return [f"the decider {actor} (advisor) decided a recommendation that was escalated to compliance: only "
                    "compliance may approve it"]
        return []
    if user["role"] == "compliance":
        if not with_compliance_when(conn, decision, rec):
            return [f"the decider {actor} (compliance) decided a recommendation that had not been escalated"]
        return []
    return [f"the decider {actor} ({user['role']}) may not approve trades"]


# ---------------------------------------------------------------------------------------------
# Who hears of a recommendation
# ---------------------------------------------------------------------------------------------


def alert_recipients(conn: Connection, advisor_id: str | None) -> list[dict]:
    """Who gets the alert of an advisor's recommendation: the advisor (if active), then — when the
    advisor's row in users.csv says `team_alerts` true — the active members of their team, each
    with their own email (their own one-click links: a link acts as the person it was sent to).
    Each: user_id, name, email, role, active."""
    if advisor_id is None:
        return []
    cols = (users.c.user_id, users.c.name, users.c.email, users.c.role, users.c.active, users.c.team_alerts)
    advisor = conn.execute(select(*cols).where(users.c.user_id == advisor_id)).mappings().first()
    if advisor is None or not advisor["active"]:
        return []
    out = [dict(advisor)]
    if advisor["team_alerts"]:
        members = conn.execute(select(*cols).select_from(advisor_team.join(
            users, users.c.user_id == advisor_team.c.member_user_id)).where(and_(
                advisor_team.c.advisor_id == advisor_id, users.c.active, users.c.user_id != advisor_id))
            .order_by(users.c.user_id)).mappings().all()
        out += [dict(m) for m in members]
    return out

