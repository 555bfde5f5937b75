"""The supervisory review report: what happened to the firm's recommendations in one period, as
the chief compliance officer reviews it (SEC Rule 206(4)-7 annual review, Rule 204-2 records).

`build_report(conn, period, ...)` reads the workflow store with a fixed number of set-based
queries (no query per recommendation) and returns a frozen `SupervisoryReport`:

- every recommendation published in the period (as-of date in [from, to]) with its outcome;
- every decision recorded in the period: who, when, how (API, link, policy), the reason, and
  the gate's verdict; the modifications, deferrals and escalations among them with their
  reasons; the advisors' wash-sale overrides of the period's days (the append-only override
  file, core/overrides.py);
- exceptions: alerts past their review window, recommendations still outside their bands,
  auto-approvals under the discretionary micro-trade rule, suspended accounts and data-quality
  holds;
- per advisor: recommendations, decided, time to decision (median, mean, longest), the share
  deferred and the share escalated;
- the audit chain: verified, its head at the end of the period and the anchor that covers it.

The period is [from, to] in the firm's time zone (America/New_York, as the NYSE sessions):
it starts at 00:00 New York on `from` and ends at 00:00 New York on the day after `to`.

Reproducible: every fact is taken **as recorded by the end of the period**. An outcome is the
last state change the audit chain recorded for the recommendation before the period ended
(the chain is append-only, so a past period reads back the same whatever happened since); a
decision, a notification, an override or an event recorded later is not in it. The same period
therefore gives the same report, and the same bytes (render.py), until the period itself
changes — which it cannot once it has ended, except by a re-run publishing into it. The one
fact of "now" is whether the chain still verifies: a chain broken since says so.

Definitions (in the report's own words, render.py prints them):
- *time to decision*: from the first alert of the account's drift (the escalation clock, which
  a later day's recommendation carries over) to the first decision by a person (approve,
  modify, defer, escalate); an auto-approval is not a person's decision.
- *review window*: `escalation_hours` of the approval policy (48h) from the first alert;
  7 days for the base tier's weekly batch. Past it: no person's decision inside the window
  while the recommendation was still open at its end.
- *share deferred / escalated*: of the advisor's recommendations of the period, those deferred
  at least once / escalated by any route (the advisor, compliance taking it over, the 48h
  rule, compliance review from the start) before the period ended.

Account numbers are masked to their last four characters (core/pii.py), in reasons too.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, func, or_, select

from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.pii import mask_account, masker
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import audit_events, decisions, notifications, recommendations, users

FIRM_TIMEZONE = ZoneInfo("America/New_York")
FREQUENCIES = ("weekly", "monthly", "quarterly")
WEEKLY_BATCH_WINDOW_HOURS = 7 * 24.0
POLICY_ACTOR = "policy:"
PERSON_ACTIONS = ("approve", "modify", "defer", "escalate")
OPEN = ("pending", "deferred", "escalated")

# Outcomes in the order the report lists them (workflow/lifecycle.py's states).
OUTCOMES = ("pending", "deferred", "escalated", "approved", "modified", "auto_approved", "executed",
            "partially_executed", "cancelled", "superseded", "resolved_by_market", "blocked_by_open_orders",
            "historical")
OUTCOME_LABELS = {
    "pending": "Waiting for the advisor", "deferred": "Deferred", "escalated": "With compliance (escalated)",
    "approved": "Approved", "modified": "Modified and approved", "auto_approved": "Auto-approved (micro-trade rule)",
    "executed": "Executed", "partially_executed": "Partially executed", "cancelled": "Orders cancelled",
    "superseded": "Superseded by a later day", "resolved_by_market": "Back inside bands (market)",
    "blocked_by_open_orders": "Held: open orders", "historical": "Historical (re-run of an older day)",
}
EXCEPTION_KINDS = ("past_review_window", "outside_bands", "micro_trade_auto_approval", "suspended_account",
                   "data_quality_hold")
EXCEPTION_LABELS = {
    "past_review_window": "Alert past its review window", "outside_bands": "Still outside its bands",
    "micro_trade_auto_approval": "Auto-approved under the micro-trade rule",
    "suspended_account": "Suspended account", "data_quality_hold": "Data-quality hold",
}

# The audit events that change a recommendation's state (workflow/lifecycle.py, authority.py,
# ledger.py), and the state after each; None: read from the event (see _state_after).
_STATE_EVENTS = {
    "recommendation_alerted": None, "recommendation_historical": "historical",
    "recommendation_held": "blocked_by_open_orders", "recommendation_routed_to_compliance": "escalated",
    "recommendation_escalation": "escalated", "recommendation_superseded": "superseded",
    "recommendation_resolved_by_market": "resolved_by_market",
    "decision_approve": "approved", "decision_modify": "modified", "decision_defer": "deferred",
    "decision_escalate": "escalated", "decision_auto_approve": "auto_approved",
    "decision_return_to_advisor": "pending", "gate_refused": None,
    "recommendation_executed": "executed", "recommendation_partially_executed": "partially_executed",
    "recommendation_cancelled": "cancelled",
}
_SUSPENSION_EVENTS = ("account_suspended", "account_resumed")
_DATA_QUALITY_PREFIX = "feed_data_quality:"


# ---------------------------------------------------------------------------------------------
# The period
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """[start, end], whole days in the firm's time zone."""

    start: date
    end: date

    def __post_init__(self):
        if self.end < self.start:
            raise ValueError(f"the period ends ({self.end}) before it starts ({self.start})")

    @property
    def starts_at(self) -> datetime:
        return datetime.combine(self.start, time(), FIRM_TIMEZONE).astimezone(timezone.utc)

    @property
    def ends_at(self) -> datetime:
        """00:00 New York on the day after `end` (exclusive)."""
        return datetime.combine(self.end + timedelta(days=1), time(), FIRM_TIMEZONE).astimezone(timezone.utc)

    @property
    def key(self) -> str:
        return f"{self.start.isoformat()}:{self.end.isoformat()}"

    @property
    def folder_name(self) -> str:
        return f"{self.start.isoformat()}_{self.end.isoformat()}"

    def ended_by(self, moment: datetime) -> bool:
        return utc(moment) >= self.ends_at


def period_ending_before(frequency: str, day: date) -> Period:
    """The last complete period of `frequency` before `day`: weekly the Monday-to-Sunday week,
    monthly the calendar month, quarterly the calendar quarter."""
    if frequency == "weekly":
        end = day - timedelta(days=day.weekday() + 1)
        return Period(end - timedelta(days=6), end)
    if frequency == "monthly":
        end = day.replace(day=1) - timedelta(days=1)
        return Period(end.replace(day=1), end)
    if frequency == "quarterly":
        quarter_start = date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
        end = quarter_start - timedelta(days=1)
        return Period(date(end.year, 3 * ((end.month - 1) // 3) + 1, 1), end)
    raise ValueError(f"frequency must be one of {', '.join(FREQUENCIES)}, not {frequency!r}")


# ---------------------------------------------------------------------------------------------
# The report model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecommendationLine:
    recommendation_id: str
    as_of: date
    advisor_id: str | None
    subject: str  # masked account, or the household
    kind: str
    tier: str | None
    delivery: str | None
    trade_value: float
    outcome: str
    alerted_at: datetime  # the first alert of the drift (escalation clock)
    decided_at: datetime | None  # the first person's decision before the period ended
    decided_by: str | None
    first_action: str | None
    hours_to_decision: float | None
    inside_bands: bool | None


@dataclass(frozen=True)
class DecisionLine:
    decision_id: str
    recommendation_id: str
    advisor_id: str | None
    subject: str
    action: str
    actor_id: str
    actor_name: str
    via: str
    decided_at: datetime
    reason: str | None
    gate: str | None  # passed / refused / voided before the period ended, else None
    detail: str  # what was decided, in words (modified trades, deferral date, the rule)


@dataclass(frozen=True)
class EscalationLine:
    recommendation_id: str
    advisor_id: str | None
    subject: str
    escalated_at: datetime
    route: str  # the advisor | compliance took it over | no decision in time | compliance review
    by: str
    reason: str


@dataclass(frozen=True)
class WashSaleOverrideLine:
    as_of: date
    account: str  # masked
    symbol: str
    decided_by: str
    decided_at: datetime
    reason: str
    recommendation_id: str | None  # the period's recommendation that buys it, if any
    disallowed_loss: float | None


@dataclass(frozen=True)
class ExceptionLine:
    kind: str  # one of EXCEPTION_KINDS
    when: datetime | date
    subject: str
    advisor_id: str | None
    recommendation_id: str | None
    detail: str


@dataclass(frozen=True)
class AdvisorFigures:
    advisor_id: str
    name: str
    recommendations: int
    decided: int
    median_hours: float | None
    mean_hours: float | None
    longest_hours: float | None
    auto_approved: int
    deferred: int
    escalated: int

    @property
    def share_deferred(self) -> float:
        return self.deferred / self.recommendations if self.recommendations else 0.0

    @property
    def share_escalated(self) -> float:
        return self.escalated / self.recommendations if self.recommendations else 0.0


@dataclass(frozen=True)
class ChainCheck:
    verified: bool
    problem: str | None
    events_in_period: int
    events_to_period_end: int
    head_seq: int  # the last event recorded before the period ended
    head_hash: str
    anchor_file: str | None  # the first anchor covering that event (file name only)
    anchor_seq: int | None
    anchor_hash: str | None
    anchored_at: str | None


@dataclass(frozen=True)
class SupervisoryReport:
    period: Period
    frequency: str | None  # the policy's, for a scheduled report; None on demand
    review_window_hours: float
    micro_trade_limit: float
    policy_versions: tuple[str, ...]
    outcomes: tuple[tuple[str, int], ...]  # (outcome, count) in OUTCOMES order, zero counts left out
    recommendations: tuple[RecommendationLine, ...]
    decisions: tuple[DecisionLine, ...]
    escalations: tuple[EscalationLine, ...]
    wash_sale_overrides: tuple[WashSaleOverrideLine, ...]
    exceptions: tuple[ExceptionLine, ...]
    advisors: tuple[AdvisorFigures, ...]
    chain: ChainCheck

    @property
    def modifications(self) -> tuple[DecisionLine, ...]:
        return tuple(d for d in self.decisions if d.action == "modify")

    @property
    def deferrals(self) -> tuple[DecisionLine, ...]:
        return tuple(d for d in self.decisions if d.action == "defer")

    def exceptions_of(self, kind: str) -> tuple[ExceptionLine, ...]:
        return tuple(e for e in self.exceptions if e.kind == kind)

    def outcome_count(self, outcome: str) -> int:
        return dict(self.outcomes).get(outcome, 0)


# ---------------------------------------------------------------------------------------------
# Gathering
# ---------------------------------------------------------------------------------------------


def _json(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _hours(later: datetime, earlier: datetime) -> float:
    return round((utc(later) - utc(earlier)).total_seconds() / 3600, 4)


def _state_after(kind: str, payload: dict, before: str | None) -> str | None:
    state = _STATE_EVENTS[kind]
    if state is not None:
        return state
    if kind == "gate_refused":
        return payload.get("returned_to") or before
    return None  # recommendation_alerted: its initial state, see _timelines


def _timelines(events: list[dict], recs: dict[str, dict]) -> dict[str, list[tuple[datetime, str]]]:
    """Per recommendation, its states in chain order: (since, state). A recommendation published
    while its lineage's previous one was open starts in that one's state (lifecycle.publish_day
    carries it over: pending, deferred or escalated)."""
    states: dict[str, list[tuple[datetime, str]]] = {}
    for event in events:  # in seq order
        subject, kind, payload = event["subject_id"], event["kind"], _json(event["payload"])
        history = states.setdefault(subject, [])
        before = history[-1][1] if history else None
        if kind == "recommendation_alerted":
            carried = None
            previous = payload.get("supersedes") or (recs.get(subject) or {}).get("supersedes")
            if previous and states.get(previous):
                prior = [s for s in states[previous] if s[1] != "superseded"]
                carried = prior[-1][1] if prior else None
            state = carried if carried in OPEN else "pending"
        else:
            state = _state_after(kind, payload, before)
        if state is not None:
            history.append((utc(event["occurred_at"]), state))
    return states


def _state_at(history: list[tuple[datetime, str]], moment: datetime) -> str | None:
    state = None
    for since, value in history:
        if since <= moment:
            state = value
    return state


def _subject(scope: str, scope_id: str, household_id: str | None) -> str:
    return mask_account(scope_id) if scope == "account" else f"household {household_id or scope_id}"


def _money(value: float) -> str:
    return f"{'-' if value < 0 else ''}${abs(value):,.2f}"


def _trades_words(trades: list[dict]) -> str:
    value = sum(abs(float(t.get("est_value") or 0)) for t in trades)
    return f"{len(trades)} trade{'s' if len(trades) != 1 else ''}, {_money(value)}"


def _detail(action: str, payload: dict, package: dict, trade_value: float) -> str:
    if action == "modify":
        outside = sorted(b["asset_class"] for b in payload.get("band_report") or [] if not b.get("inside", True))
        words = f"{_trades_words(payload.get('trades') or [])} (proposed: {_trades_words(package.get('trades') or [])})"
        if "inside_bands" in payload:
            words += "; inside bands: yes" if payload["inside_bands"] else \
                f"; inside bands: no ({', '.join(c.replace('_', ' ') for c in outside) or 'see the band report'})"
        return words
    if action == "defer":
        until = payload.get("deferred_until")
        return f"deferred until {str(until)[:10]}" if until else "deferred"
    if action == "auto_approve":
        return (f"rule {payload.get('rule', '?')}: trades {_money(float(payload.get('trade_value') or trade_value))} "
                f"under {_money(float(payload.get('limit') or 0))}, zero realised gain")
    if action == "approve":
        return f"as proposed: {_trades_words(package.get('trades') or [])}"
    return ""


def build_report(conn: Connection, period: Period, *, review_window_hours: float = 48.0,
                 micro_trade_limit: float = 5000.0, anchors: Path | None = None,
                 wash_sale_overrides: Path | None = None, frequency: str | None = None) -> SupervisoryReport:
    """The period's report from the store behind `conn` (read only). review_window_hours /
    micro_trade_limit: the approval policy in force (lifecycle.lifecycle_policy); anchors: the
    anchor folder (default audit.anchor_dir); wash_sale_overrides: the override file
    (settings.wash_sale_overrides_path; None or missing: none)."""
    start, end = period.starts_at, period.ends_at
    facts = _read_facts(conn, period)
    mask = _masker_of(facts)

    def words(text: str | None) -> str | None:
        return None if text is None else mask(text)

    lines = _recommendation_lines(facts)
    decision_lines = _decision_lines(facts, start, end, words)
    escalation_lines = _escalation_lines(facts, review_window_hours, words)
    overrides = _wash_sale_overrides(wash_sale_overrides, period, facts.packages, mask)
    exceptions = _exceptions(facts, period, lines, decision_lines, review_window_hours, mask, words)
    advisors = _advisor_figures(facts, lines)
    counts = {o: 0 for o in OUTCOMES}
    for line in lines:
        counts[line.outcome] = counts.get(line.outcome, 0) + 1
    rec_rows = facts.rec_rows
    return SupervisoryReport(
        period=period, frequency=frequency, review_window_hours=float(review_window_hours),
        micro_trade_limit=float(micro_trade_limit),
        policy_versions=tuple(sorted({row["policy_version"] for row in rec_rows if row["policy_version"]})),
        outcomes=tuple((o, n) for o, n in counts.items() if n), recommendations=tuple(lines),
        decisions=tuple(decision_lines), escalations=tuple(escalation_lines), wash_sale_overrides=tuple(overrides),
        exceptions=tuple(exceptions), advisors=tuple(advisors), chain=_chain(conn, period, anchors))


@dataclass(frozen=True)
class _Facts:
    """What the report is made of, read from the store in a fixed number of set-based queries."""

    rec_rows: list[dict]
    recs: dict[str, dict]
    packages: dict[str, dict]
    timelines: dict
    decision_rows: list[dict]
    escalation_rows: list[dict]
    people: dict
    suspension_rows: list[dict]
    holds: list[dict]

    @property
    def decisions_by_recommendation(self) -> dict[str, list[dict]]:
        by_rec: dict[str, list[dict]] = {}
        for row in self.decision_rows:
            by_rec.setdefault(row["recommendation_id"], []).append(row)
        return by_rec


def _read_facts(conn: Connection, period: Period) -> _Facts:
    start, end = period.starts_at, period.ends_at
    r, d, e = recommendations.c, decisions.c, audit_events.c

    # 1. The period's recommendations (published on its days, before it ended).
    rec_rows = [dict(row) for row in conn.execute(select(
        r.recommendation_id, r.as_of, r.scope, r.scope_id, r.kind, r.household_id, r.advisor_id, r.tier,
        r.delivery, r.trade_value, r.policy_version, r.package, r.clock_started_at, r.created_at, r.supersedes,
    ).where(and_(r.as_of >= period.start, r.as_of <= period.end, r.created_at < end))).mappings()]
    recs = {row["recommendation_id"]: row for row in rec_rows}
    packages = {rid: _json(row["package"]) for rid, row in recs.items()}
    period_ids = select(r.recommendation_id).where(and_(r.as_of >= period.start, r.as_of <= period.end,
                                                        r.created_at < end))
    previous_ids = select(r.supersedes).where(and_(r.as_of >= period.start, r.as_of <= period.end,
                                                   r.created_at < end, r.supersedes.is_not(None)))

    # 2. Their state changes (and their predecessors', for a carried-over state), before the end.
    state_events = [dict(row) for row in conn.execute(select(e.seq, e.subject_id, e.kind, e.payload, e.occurred_at)
                    .where(and_(e.kind.in_(tuple(_STATE_EVENTS)), e.occurred_at < end,
                                or_(e.subject_id.in_(period_ids), e.subject_id.in_(previous_ids))))
                    .order_by(e.seq)).mappings()]
    timelines = _timelines(state_events, recs)

    # 3. Decisions: those recorded in the period, and every earlier one on its recommendations.
    decision_rows = [dict(row) for row in conn.execute(select(
        d.decision_id, d.recommendation_id, d.action, d.actor_id, d.via, d.reason, d.payload, d.created_at,
        d.gate_verdict, d.gate_checked_at, r.advisor_id, r.scope, r.scope_id, r.household_id, r.package,
        r.trade_value, users.c.name.label("actor_name"),
    ).join(recommendations, r.recommendation_id == d.recommendation_id)
        .outerjoin(users, users.c.user_id == d.actor_id)
        .where(and_(d.created_at < end, or_(d.created_at >= start, d.recommendation_id.in_(period_ids))))
        .order_by(d.created_at, d.decision_id)).mappings()]

    # 4. Escalations recorded in the period (every route records one: authority.record_escalation,
    #    lifecycle.record_notification).
    escalation_rows = [dict(row) for row in conn.execute(select(
        e.seq, e.subject_id, e.actor, e.payload, e.occurred_at, r.advisor_id, r.scope, r.scope_id, r.household_id,
        users.c.role.label("actor_role"),
    ).join(recommendations, r.recommendation_id == e.subject_id).outerjoin(users, users.c.user_id == e.actor)
        .where(and_(e.kind == "recommendation_escalation", e.occurred_at >= start, e.occurred_at < end))
        .order_by(e.seq)).mappings()]

    # 5. People, suspensions, data-quality holds.
    people = {row.user_id: row for row in conn.execute(select(users.c.user_id, users.c.name, users.c.role,
                                                                users.c.active))}
    suspension_rows = [dict(row) for row in conn.execute(select(e.subject_id, e.kind, e.payload, e.occurred_at)
                       .where(and_(e.kind.in_(_SUSPENSION_EVENTS), e.occurred_at < end)).order_by(e.seq)).mappings()]
    holds = [dict(row) for row in conn.execute(select(notifications.c.notification_key, notifications.c.payload,
                                                      notifications.c.created_at).where(and_(
        notifications.c.kind == "operations_alert", notifications.c.notification_key.like(f"{_DATA_QUALITY_PREFIX}%"),
        notifications.c.created_at >= start, notifications.c.created_at < end))
        .order_by(notifications.c.notification_key)).mappings()]

    return _Facts(rec_rows, recs, packages, timelines, decision_rows, escalation_rows, people, suspension_rows, holds)


def _masker_of(facts: _Facts):
    """Every account number the report could name, masked wherever it appears in a text."""
    packages, decision_rows, suspension_rows = facts.packages, facts.decision_rows, facts.suspension_rows
    known_accounts = {a for p in packages.values() for a in p.get("account_ids") or []}
    known_accounts |= {row["scope_id"] for row in decision_rows if row["scope"] == "account"}
    known_accounts |= {row["subject_id"] for row in suspension_rows if row["subject_id"]}
    mask = masker(known_accounts)

    return mask


def _recommendation_lines(facts: _Facts) -> list[RecommendationLine]:
    """One line per recommendation: its outcome as recorded by the period's end, the first
    decision by a person and the hours to it."""
    recs, packages, timelines = facts.recs, facts.packages, facts.timelines
    by_rec = facts.decisions_by_recommendation
    lines: list[RecommendationLine] = []
    for rid, row in recs.items():
        history = timelines.get(rid, [])
        outcome = history[-1][1] if history else "pending"
        first = next((x for x in by_rec.get(rid, []) if x["action"] in PERSON_ACTIONS
                      and not x["actor_id"].startswith(POLICY_ACTOR)), None)
        lines.append(RecommendationLine(
            recommendation_id=rid, as_of=row["as_of"], advisor_id=row["advisor_id"],
            subject=_subject(row["scope"], row["scope_id"], row["household_id"]), kind=row["kind"], tier=row["tier"],
            delivery=row["delivery"], trade_value=float(row["trade_value"] or 0), outcome=outcome,
            alerted_at=utc(row["clock_started_at"]), decided_at=utc(first["created_at"]) if first else None,
            decided_by=first["actor_id"] if first else None, first_action=first["action"] if first else None,
            hours_to_decision=_hours(first["created_at"], row["clock_started_at"]) if first else None,
            inside_bands=packages[rid].get("inside_bands")))
    lines.sort(key=lambda x: (x.as_of, x.advisor_id or "", x.recommendation_id))

    return lines


def _decision_lines(facts: _Facts, start: datetime, end: datetime, words) -> list[DecisionLine]:
    """The decisions recorded in the period, with who, when, why and the gate's verdict."""
    people = facts.people
    decision_lines = []
    for row in facts.decision_rows:
        if utc(row["created_at"]) < start:
            continue
        payload, package = _json(row["payload"]), _json(row["package"])
        gate = row["gate_verdict"] if row["gate_checked_at"] is not None and utc(row["gate_checked_at"]) < end else None
        person = people.get(row["actor_id"])
        decision_lines.append(DecisionLine(
            decision_id=row["decision_id"], recommendation_id=row["recommendation_id"], advisor_id=row["advisor_id"],
            subject=_subject(row["scope"], row["scope_id"], row["household_id"]), action=row["action"],
            actor_id=row["actor_id"], actor_name=person.name if person else row["actor_id"], via=row["via"],
            decided_at=utc(row["created_at"]), reason=words(row["reason"]), gate=gate,
            detail=words(_detail(row["action"], payload, package, float(row["trade_value"] or 0))) or ""))
    decision_lines.sort(key=lambda x: (x.decided_at, x.decision_id))

    return decision_lines


def _escalation_lines(facts: _Facts, review_window_hours: float, words) -> list[EscalationLine]:
    """The escalations recorded in the period, by route and reason."""
    people = facts.people
    escalation_lines = []
    for row in facts.escalation_rows:
        payload = _json(row["payload"])
        actor = row["actor"]
        if actor == "rebal:escalation_sensor":
            route, reason = "no decision in time", f"no decision within {review_window_hours:g}h of the first alert"
        elif actor.startswith("rebal:"):
            route, reason = "compliance review", payload.get("reason") or "needs compliance review"
        elif row["actor_role"] == "compliance":
            route, reason = "compliance took it over", payload.get("reason") or ""
        else:
            route, reason = "the advisor", payload.get("reason") or ""
        person = people.get(actor)
        escalation_lines.append(EscalationLine(  # `by`: the person's name, or rebal's actor id
            recommendation_id=row["subject_id"], advisor_id=row["advisor_id"],
            subject=_subject(row["scope"], row["scope_id"], row["household_id"]), escalated_at=utc(row["occurred_at"]),
            route=route, by=person.name if person else actor, reason=words(reason) or ""))
    escalation_lines.sort(key=lambda x: (x.escalated_at, x.recommendation_id))

    return escalation_lines


def _exceptions(facts: _Facts, period: Period, lines: list[RecommendationLine], decision_lines: list[DecisionLine],
                review_window_hours: float, mask, words) -> list[ExceptionLine]:
    """Alerts past their review window, recommendations still outside their bands, micro-trade
    auto-approvals, suspended accounts and data-quality holds, in the report's order."""
    start, end = period.starts_at, period.ends_at
    recs, packages, timelines, holds = facts.recs, facts.packages, facts.timelines, facts.holds
    by_rec = facts.decisions_by_recommendation
    exceptions: list[ExceptionLine] = []
    for line in lines:
        row = recs[line.recommendation_id]
        history = timelines.get(line.recommendation_id, [])
        if not history or history[0][1] in ("historical", "blocked_by_open_orders"):
            continue
        window = WEEKLY_BATCH_WINDOW_HOURS if row["delivery"] == "weekly_batch" else review_window_hours
        window_end = line.alerted_at + timedelta(hours=window)
        if window_end <= end and _state_at(history, window_end) in OPEN and (
                line.decided_at is None or line.decided_at > window_end):
            late = (f"decided {_hours(line.decided_at, line.alerted_at):.1f}h after the first alert "
                    f"({line.first_action} by {line.decided_by})" if line.decided_at is not None
                    else f"no decision by the end of the period ({line.outcome.replace('_', ' ')})")
            exceptions.append(ExceptionLine("past_review_window", window_end, line.subject, line.advisor_id,
                                            line.recommendation_id, f"review window {window:g}h; {late}"))
        package = packages[line.recommendation_id]
        modified = [x for x in by_rec.get(line.recommendation_id, []) if x["action"] == "modify"]
        last_modify = _json(modified[-1]["payload"]) if modified else None
        if line.outcome in ("superseded", "resolved_by_market", "historical", "blocked_by_open_orders"):
            continue
        if last_modify is not None and last_modify.get("inside_bands") is False:
            outside = sorted(b["asset_class"] for b in last_modify.get("band_report") or [] if not b.get("inside", True))
            classes = ", ".join(c.replace("_", " ") for c in outside) or "a class"
            exceptions.append(ExceptionLine("outside_bands", line.as_of, line.subject, line.advisor_id,
                                            line.recommendation_id, f"the modified trades leave {classes} outside "
                                            f"{'its band' if len(outside) == 1 else 'their bands'}"))
        elif last_modify is None and package.get("inside_bands") is False:
            exceptions.append(ExceptionLine("outside_bands", line.as_of, line.subject, line.advisor_id,
                                            line.recommendation_id, "the proposed trades do not bring it inside "
                                            f"its bands: {words(package.get('unresolved')) or 'no reason recorded'}"))
        elif line.outcome == "deferred":
            deferrals = [x for x in by_rec.get(line.recommendation_id, []) if x["action"] == "defer"]
            until = _json(deferrals[-1]["payload"]).get("deferred_until") if deferrals else None
            exceptions.append(ExceptionLine("outside_bands", line.as_of, line.subject, line.advisor_id,
                                            line.recommendation_id, "deferred at the end of the period: still "
                                            f"outside its bands{' until ' + str(until)[:10] if until else ''}"))
    for decision in decision_lines:
        if decision.action == "auto_approve":
            exceptions.append(ExceptionLine("micro_trade_auto_approval", decision.decided_at, decision.subject,
                                            decision.advisor_id, decision.recommendation_id, decision.detail))
    exceptions += _suspensions(facts.suspension_rows, start, mask)
    for hold in holds:  # keys feed_data_quality:<as_of> (core/feed_data_quality.py), one per feed day
        payload = _json(hold["payload"])
        details = payload.get("details") or {}
        try:
            day = date.fromisoformat(payload.get("as_of") or hold["notification_key"][len(_DATA_QUALITY_PREFIX):])
        except ValueError:
            continue
        if not period.start <= day <= period.end:
            continue
        held = ", ".join(details.get("held_out_accounts") or [])
        exceptions.append(ExceptionLine(
            "data_quality_hold", day, f"{details.get('accounts_held_out', 0)} account(s) held out", None, None,
            f"{details.get('rejected_rows', 0)} rejected feed row(s)" + (f"; held out: {held}" if held else "")))
    order = {k: i for i, k in enumerate(EXCEPTION_KINDS)}
    exceptions.sort(key=lambda x: (order[x.kind], _sort_moment(x.when), x.subject, x.recommendation_id or ""))

    return exceptions


def _advisor_figures(facts: _Facts, lines: list[RecommendationLine]) -> list[AdvisorFigures]:
    """Per advisor: recommendations routed, decided, time to decision, auto-approved, deferred, escalated."""
    timelines, people = facts.timelines, facts.people
    by_rec = facts.decisions_by_recommendation
    advisors = []
    routed = [x for x in lines if x.advisor_id and timelines.get(x.recommendation_id)
              and timelines[x.recommendation_id][0][1] not in ("historical", "blocked_by_open_orders")]
    for advisor_id in sorted({x.advisor_id for x in routed}):
        mine = [x for x in routed if x.advisor_id == advisor_id]
        hours = [x.hours_to_decision for x in mine if x.hours_to_decision is not None]
        states = [{s for _, s in timelines[x.recommendation_id]} for x in mine]
        deferred = sum(1 for x in mine if any(y["action"] == "defer" for y in by_rec.get(x.recommendation_id, [])))
        person = people.get(advisor_id)
        advisors.append(AdvisorFigures(
            advisor_id=advisor_id, name=person.name if person else advisor_id, recommendations=len(mine),
            decided=len(hours), median_hours=round(statistics.median(hours), 4) if hours else None,
            mean_hours=round(statistics.fmean(hours), 4) if hours else None,
            longest_hours=max(hours) if hours else None,
            auto_approved=sum(1 for s in states if "auto_approved" in s), deferred=deferred,
            escalated=sum(1 for s in states if "escalated" in s)))

    return advisors


def _sort_moment(value: datetime | date) -> datetime:
    if isinstance(value, datetime):
        return utc(value)
    return datetime.combine(value, time(), FIRM_TIMEZONE).astimezone(timezone.utc)


def _suspensions(rows: list[dict], start: datetime, mask) -> list[ExceptionLine]:
    """Accounts suspended at any time in the period: suspended when it began, or during it."""
    by_account: dict[str, list[dict]] = {}
    for row in rows:
        by_account.setdefault(row["subject_id"], []).append(row)
    out = []
    for account, events in by_account.items():
        before = [x for x in events if utc(x["occurred_at"]) < start]
        during = [x for x in events if utc(x["occurred_at"]) >= start]
        suspended_at_start = bool(before) and before[-1]["kind"] == "account_suspended"
        if not suspended_at_start and not any(x["kind"] == "account_suspended" for x in during):
            continue
        last_suspension = [x for x in events if x["kind"] == "account_suspended"][-1]
        payload = _json(last_suspension["payload"])
        since = payload.get("as_of") or str(last_suspension["occurred_at"])[:10]
        detail = f"suspended since {since}: {mask(payload.get('reason') or 'no reason given')}"
        resumed = [x for x in during if x["kind"] == "account_resumed"]
        if resumed and events[-1]["kind"] == "account_resumed":
            detail += f"; trading again from {_json(resumed[-1]['payload']).get('as_of') or ''}"
        when = date.fromisoformat(str(since)[:10]) if since else utc(last_suspension["occurred_at"])
        out.append(ExceptionLine("suspended_account", when, mask_account(account), None, None, detail))
    return out


def _wash_sale_overrides(path: Path | None, period: Period, packages: dict[str, dict], mask) -> list[WashSaleOverrideLine]:
    """The period's overrides from the append-only file (a later row for the same day, account
    and symbol wins, as the tax engine reads it), recorded before the period ended."""
    from rebal_pipeline.core.overrides import OverrideFileError, WashSaleOverride

    if path is None or not Path(path).exists():
        return []
    latest: dict[tuple, WashSaleOverride] = {}
    with Path(path).open(newline="", encoding="utf-8") as src:
        for number, row in enumerate(csv.DictReader(src), start=2):
            try:
                override = WashSaleOverride.model_validate(row)
            except ValueError as error:
                raise OverrideFileError(f"{path} line {number}: {error}") from None
            if period.start <= override.as_of <= period.end and utc(override.decided_at) < period.ends_at:
                latest[(override.as_of, override.account_id, override.symbol)] = override
    buys: dict[tuple, tuple[str, float]] = {}
    for rid, package in sorted(packages.items()):
        as_of = str(package.get("as_of", ""))[:10]
        for t in package.get("trades") or []:
            if t.get("side") == "buy":
                buys.setdefault((as_of, t.get("account_id"), t.get("symbol")),
                                (rid, float(t.get("wash_sale_disallowed") or 0)))
    out = []
    for (as_of, account, symbol), o in sorted(latest.items()):
        found = buys.get((as_of.isoformat(), account, symbol))
        out.append(WashSaleOverrideLine(
            as_of=as_of, account=mask_account(account), symbol=symbol, decided_by=o.decided_by,
            decided_at=utc(o.decided_at), reason=mask(o.reason), recommendation_id=found[0] if found else None,
            disallowed_loss=found[1] if found else None))
    return out


def _chain(conn: Connection, period: Period, folder: Path | None) -> ChainCheck:
    """Verified now (the whole chain, its decisions and every anchor); the head as it stood at
    the end of the period; the first anchor that covers that head."""
    e = audit_events.c
    folder = audit.anchor_dir(conn) if folder is None else Path(folder)
    checked = audit.verify(conn, anchors=folder)
    head = conn.execute(select(e.seq, e.hash).where(e.occurred_at < period.ends_at).order_by(e.seq.desc())
                        .limit(1)).first()
    to_end = int(conn.execute(select(func.count()).select_from(audit_events)
                              .where(e.occurred_at < period.ends_at)).scalar())
    in_period = int(conn.execute(select(func.count()).select_from(audit_events).where(and_(
        e.occurred_at >= period.starts_at, e.occurred_at < period.ends_at))).scalar())
    head_seq, head_hash = (int(head.seq), head.hash) if head else (0, audit.GENESIS)
    # audit.py reads its anchor files in one place; the report uses that reader as is.
    covering = sorted((a for a in audit._read_anchors(folder) if isinstance(a.get("seq"), int)
                       and a["seq"] >= head_seq and head_seq > 0), key=lambda a: (a["seq"], a["file"]))
    first = covering[0] if covering else None
    return ChainCheck(
        verified=checked.ok, problem=None if checked.ok else checked.problem, events_in_period=in_period,
        events_to_period_end=to_end, head_seq=head_seq, head_hash=head_hash,
        anchor_file=Path(first["file"]).name if first else None, anchor_seq=first["seq"] if first else None,
        anchor_hash=first.get("hash") if first else None, anchored_at=first.get("anchored_at") if first else None)
