"""What the review portal lists, read from the workflow store: the queue, the compliance view, the
operations view. SQL does the choosing, the filtering, the sorting and the paging (bound
parameters); Python formats only the rows of the page shown.

The queue:
- who sees what: authority.may_read's rule written as a WHERE clause (an advisor: their own and
  their team's recommendations; compliance, operations and the trading desk: every one), so a
  person is listed exactly what the API would let them read;
- order: urgency (high, medium, low), then severity — the largest |drift| ÷ band of the
  package's bands (1.0 = at the band's edge; no band: 0) — largest first, then age (the
  escalation clock's start, oldest first), then the id;
- filters: tier, kind (rebalance | harvest), household, status (`open` = pending, deferred or
  escalated: waiting for a person), batch (a market-event batch, `mev-YYYYMMDD`: only its members,
  in the same order, under the same who-sees-what rule; an unknown batch lists nothing).
The severity is computed in SQL from the stored package's `bands` (SQLite json_each, Postgres
json_array_elements): wf_recommendations has no column for it.

Market-event batches (issue 16, the store's tables of migration 0007): every market event of a
New York trading day re-scans every account, and the recommendations it publishes join that day's
batch. The queue shows, per batch, what the person may read of it:
- the header of a batch-filtered queue (batch_header): the day, each event (New York time, source,
  who declared it, the reason, the basket's move), and the members the person may read counted
  once each as waiting for a person (open), approved and held for the batch's release (approved,
  modified or auto-approved, no decision of it in a release of the batch yet), released (a
  decision of it is in one of the batch's releases), or closed otherwise (superseded, resolved by
  the market, …); and when the held decisions go out (release_due_at);
- the "Market events" box of the unfiltered queue (recent_market_batches): the latest batches
  the person has members in (compliance and operations: every batch), each with its open count;
- a row's batch (its badge): the batch it joined, if any (a recommendation is in one batch only:
  the members table's primary key).
Counts and lists are read-only and done in SQL; nothing here changes the store. An event's reason
is typed by a person (operations or compliance): any account of the batch's members named in it is
masked, like every account on a page.

Escalation clock: the time left until the 48h rule (lifecycle_policy().escalation_hours after the
clock's start) escalates a pending recommendation to compliance; weekly-batch recommendations are
not chased one by one, deferred ones wait for their date, escalated ones show when.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, desc, func, literal_column, or_, select

from rebal_pipeline.approval_api.links import ID_PATTERN
from rebal_pipeline.approval_api.models import STATUSES
from rebal_pipeline.comms import emails
from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.money import tax_effect
from rebal_pipeline.core.pii import masker
from rebal_pipeline.workflow import authority, lifecycle
from rebal_pipeline.workflow.lifecycle import LifecyclePolicy
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.package import worst_band as package_worst_band
from rebal_pipeline.workflow.schema import (
    advisor_team, audit_events, batch_recommendations, batch_release_decisions, batch_releases, decisions,
    market_batches, market_events, notifications, recommendations, users,
)

PAGE_SIZE = 100
KINDS = ("rebalance", "harvest")
STATUS_CHOICES = ("open", *STATUSES)
_ID = re.compile(ID_PATTERN)
_TIER = re.compile(r"^[a-z0-9_]{1,32}$")
# A market-event batch is named by its New York trading day (market_batches.batch_id).
_BATCH = re.compile(r"^mev-[0-9]{8}$")
_URGENCY_RANK = case({"high": 0, "medium": 1, "low": 2}, value=recommendations.c.urgency, else_=3)

_SEVERITY_SQL = {
    "sqlite": "(select max(abs(json_extract(b.value, '$.drift')) / nullif(json_extract(b.value, '$.band'), 0)) "
              "from json_each(wf_recommendations.package, '$.bands') as b)",
    "postgresql": "(select max(abs((b.value ->> 'drift')::float) / nullif((b.value ->> 'band')::float, 0)) "
                  "from json_array_elements((wf_recommendations.package)::json -> 'bands') as b)",
}


class QueryError(ValueError):
    """A filter value the queue does not take (a 422 page naming it)."""


@dataclass(frozen=True)
class Filters:
    status: str = "open"
    tier: str = ""
    kind: str = ""
    household: str = ""
    page: int = 1
    batch: str = ""  # a market-event batch id (mev-YYYYMMDD), or every recommendation

    def query(self, **changes) -> dict[str, str]:
        """The query string of these filters with `changes` (a page link keeps every filter)."""
        values = {"status": self.status, "tier": self.tier, "kind": self.kind, "household": self.household,
                  "batch": self.batch, "page": str(self.page), **changes}
        return {k: v for k, v in values.items() if v and not (k == "page" and v == "1")}


def read_filters(params: dict[str, str], default_status: str = "open") -> Filters:
    """The queue's query string, checked: unknown parameters and bad values are refused (422)."""
    unknown = sorted(set(params) - {"status", "tier", "kind", "household", "batch", "page"})
    if unknown:
        raise QueryError(f"unknown filter {unknown[0][:40]!r}; the queue filters on status, tier, kind, household "
                         "and batch")
    status = params.get("status", "") or default_status
    if status not in STATUS_CHOICES:
        raise QueryError(f"status must be one of: {', '.join(STATUS_CHOICES)}")
    tier = params.get("tier", "")
    if tier and not _TIER.match(tier):
        raise QueryError("tier: lower-case letters, digits and _ only (e.g. standard)")
    kind = params.get("kind", "")
    if kind and kind not in KINDS:
        raise QueryError("kind must be rebalance or harvest")
    household = params.get("household", "")
    if household and not _ID.match(household):
        raise QueryError("household: not a household id (letters, digits, . _ : -)")
    batch = params.get("batch", "")
    if batch and not _BATCH.match(batch):
        raise QueryError("batch: not a market-event batch id (mev- and the trading day's eight digits, "
                         "e.g. mev-20261120)")
    page_text = params.get("page", "") or "1"
    if not page_text.isdigit() or not 1 <= int(page_text) <= 10_000:
        raise QueryError("page must be a whole number from 1 to 10000")
    return Filters(status=status, tier=tier, kind=kind, household=household, page=int(page_text), batch=batch)


def is_batch_id(text: str) -> bool:
    """Whether `text` has the form of a market-event batch id (mev-YYYYMMDD)."""
    return bool(_BATCH.match(text or ""))


def readable_by(user: dict):
    """authority.may_read as a WHERE clause (see the module docstring)."""
    r = recommendations.c
    if user["role"] == "advisor":
        teams = select(advisor_team.c.advisor_id).where(advisor_team.c.member_user_id == user["user_id"])
        return or_(r.advisor_id == user["user_id"], r.advisor_id.in_(teams))
    if user["role"] in ("compliance", "operations", "trading_desk"):
        return r.recommendation_id.is_not(None)
    return r.recommendation_id.is_(None)  # nobody else reads anything


def severity(conn: Connection):
    return func.coalesce(literal_column(_SEVERITY_SQL[conn.dialect.name]), 0.0)


def _status_clause(status: str):
    r = recommendations.c
    return r.status.in_(lifecycle.OPEN) if status == "open" else r.status == status


def queue(conn: Connection, user: dict, filters: Filters, now: datetime, policy: LifecyclePolicy) -> dict:
    """One page of the person's queue (rows formatted for the page), whether there is a next page,
    and the filter choices (the tiers and households of what they may read)."""
    r = recommendations.c
    where = [readable_by(user), _status_clause(filters.status)]
    if filters.tier:
        where.append(r.tier == filters.tier)
    if filters.kind:
        where.append(r.kind == filters.kind)
    if filters.household:
        where.append(r.household_id == filters.household)
    if filters.batch:
        where.append(r.recommendation_id.in_(select(batch_recommendations.c.recommendation_id)
                                             .where(batch_recommendations.c.batch_id == filters.batch)))
    weight = severity(conn).label("severity")
    offset = (filters.page - 1) * PAGE_SIZE
    member = batch_recommendations.c
    rows = conn.execute(
        select(r.recommendation_id, r.advisor_id, r.as_of, r.scope, r.scope_id, r.kind, r.household_id, r.tier,
               r.urgency, r.delivery, r.status, r.trade_value, r.clock_started_at, r.deferred_until, r.escalated_at,
               r.package, weight, member.batch_id.label("market_batch"))
        .select_from(recommendations.outerjoin(batch_recommendations,
                                               member.recommendation_id == r.recommendation_id))
        .where(and_(*where))
        .order_by(_URGENCY_RANK, desc(weight), r.clock_started_at, r.recommendation_id)
        .limit(PAGE_SIZE + 1).offset(offset)).mappings().all()
    total = conn.execute(select(func.count()).select_from(recommendations).where(and_(*where))).scalar_one()
    seen = readable_by(user)
    tiers = conn.execute(select(r.tier).where(and_(seen, r.tier.is_not(None))).distinct().order_by(r.tier)
                         .limit(50)).scalars().all()
    households = conn.execute(select(r.household_id).where(and_(seen, _status_clause(filters.status),
                                                                r.household_id.is_not(None)))
                              .distinct().order_by(r.household_id).limit(500)).scalars().all()
    shown = []
    for row in rows[:PAGE_SIZE]:
        rec = dict(row)
        market_batch = rec.pop("market_batch")
        item = row_view(rec, now, policy)
        # The batch's checkbox: only where authority's rule lets this person approve now.
        item["may_decide"] = authority.refusal(conn, user, rec, "approve") is None
        item["market_batch"] = {"batch_id": market_batch, "day": _day_of(market_batch)} if market_batch else None
        shown.append(item)
    return {"rows": shown,
            "more": len(rows) > PAGE_SIZE, "total": total, "first": offset + 1 if rows else 0,
            "last": offset + min(len(rows), PAGE_SIZE), "tiers": tiers, "households": households}


# ---------------------------------------------------------------------------------------------
# Market-event batches
# ---------------------------------------------------------------------------------------------

MARKET_BATCHES_SHOWN = 5
# Everyone else sees a batch only when it holds one of the recommendations they may read.
_EVERY_BATCH_ROLES = ("compliance", "operations")
_SOURCE_WORDS = {"prices": "Intraday prices", "operator": "Declared by a person"}
_AUTOMATIC = "rebal:market_events"  # market_events.declared_by of an event seen in the prices
_MAX_MASKED_MEMBERS = 10_000
_NEW_YORK = ZoneInfo("America/New_York")  # the batch's trading day and its times (portal.NEW_YORK)


def _day_of(batch_id: str) -> str:
    """mev-20261120 → 20 Nov 2026 (the batch's trading day, from its id)."""
    digits = batch_id.removeprefix("mev-")
    return emails.day(f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}") if _BATCH.match(batch_id) else batch_id


def signed_move(move: float | None) -> str:
    """The reference basket's move as the advisor reads it: −3.1%, +2.4%, 0.0% (one decimal, a
    true minus sign); a dash for an event declared without prices."""
    if move is None:
        return "\u2014"
    text = f"{abs(move) * 100:.1f}%"
    if text == "0.0%":
        return text
    return ("\u2212" if move < 0 else "+") + text


def _new_york_time(moment, day) -> str:
    """13:35 on the batch's own trading day; 23 Nov 2026 09:31 on another day (New York time)."""
    local = utc(moment).astimezone(_NEW_YORK)
    return f"{local:%H:%M}" if local.date() == day else f"{emails.day(local.date())} {local:%H:%M}"


def _members_of(batch_id):
    return batch_recommendations.c.batch_id == batch_id


def _released(batch_id):
    """Whether a decision on the row's recommendation is in one of this batch's releases."""
    return (select(decisions.c.decision_id)
            .join(batch_release_decisions, batch_release_decisions.c.decision_id == decisions.c.decision_id)
            .join(batch_releases, batch_releases.c.release_id == batch_release_decisions.c.release_id)
            .where(decisions.c.recommendation_id == recommendations.c.recommendation_id,
                   batch_releases.c.batch_id == batch_id)
            .exists())


def batch_header(conn: Connection, user: dict, batch_id: str, now: datetime) -> dict | None:
    """The header of a batch-filtered queue: the batch's day, its events (oldest first), the
    members this person may read counted by where they stand, and when the approved trades go
    out. None when no batch has this id."""
    b = market_batches.c
    batch = conn.execute(select(market_batches).where(b.batch_id == batch_id)).mappings().first()
    if batch is None:
        return None
    day = batch["trading_day"]
    e, u = market_events.c, users.c
    events = conn.execute(select(e.seq, e.source, e.declared_by, e.reason, e.move, e.detected_at, e.scanned_at,
                                 e.recommendations, u.name)
                          .select_from(market_events.outerjoin(users, u.user_id == e.declared_by))
                          .where(e.batch_id == batch_id).order_by(e.seq)).mappings().all()
    r, m = recommendations.c, batch_recommendations.c
    members = select(r.status.label("status"), case((_released(batch_id), 1), else_=0).label("released")) \
        .select_from(recommendations.join(batch_recommendations, m.recommendation_id == r.recommendation_id)) \
        .where(_members_of(batch_id), readable_by(user)).subquery()
    counts = {"members": 0, "waiting": 0, "held": 0, "released": 0, "closed": 0}
    closed: dict[str, int] = {}
    for status, released, n in conn.execute(select(members.c.status, members.c.released, func.count())
                                            .group_by(members.c.status, members.c.released)):
        counts["members"] += n
        if released:
            counts["released"] += n
        elif status in lifecycle.OPEN:
            counts["waiting"] += n
        elif status in lifecycle.APPROVED:
            counts["held"] += n
        else:
            counts["closed"] += n
            closed[status.replace("_", " ")] = closed.get(status.replace("_", " "), 0) + n
    releases = conn.execute(select(batch_releases.c.seq, batch_releases.c.claimed_at).where(
        batch_releases.c.batch_id == batch_id).order_by(batch_releases.c.seq)).mappings().all()
    # A reason is typed by a person: any account of the batch named in it is masked like every
    # account on a page.
    accounts: set[str] = set()
    for package in conn.execute(select(r.package).select_from(recommendations.join(
            batch_recommendations, m.recommendation_id == r.recommendation_id)).where(_members_of(batch_id))
            .limit(_MAX_MASKED_MEMBERS)).scalars():
        accounts.update(json.loads(package).get("account_ids") or ())
    mask = masker(accounts)
    due = utc(batch["release_due_at"])
    return {
        "batch_id": batch_id, "day": emails.day(day), "today": day == now.astimezone(_NEW_YORK).date(),
        "session": emails.day(batch["session_as_of"]),
        "events": [{"seq": ev["seq"], "at": _new_york_time(ev["detected_at"], day),
                    "source": _SOURCE_WORDS.get(ev["source"], ev["source"]),
                    "declared_by": "rebal, automatically" if ev["declared_by"] == _AUTOMATIC
                    else (ev["name"] or ev["declared_by"]),
                    "reason": mask(ev["reason"]), "move": signed_move(ev["move"]),
                    "scan": (f"re-scanned at {_new_york_time(ev['scanned_at'], day)}"
                             + (f": {ev['recommendations']} recommendation{'' if ev['recommendations'] == 1 else 's'}"
                                if ev["recommendations"] is not None else ""))
                    if ev["scanned_at"] else "re-scan under way"} for ev in events],
        **counts, "closed_by_status": sorted(closed.items()),
        "release_at": _new_york_time(due, day), "release_due": due > now,
        "release_in": span(due - now) if due > now else None,
        "releases": [{"seq": rel["seq"], "at": _new_york_time(rel["claimed_at"], day)} for rel in releases],
    }


def recent_market_batches(conn: Connection, user: dict, now: datetime, limit: int = MARKET_BATCHES_SHOWN) -> list[dict]:
    """The latest batches (by trading day, newest first) this person has members in — every batch
    for compliance and operations — each with how many of its members they may read and how many
    of those still wait for a person."""
    b, r, m = market_batches.c, recommendations.c, batch_recommendations.c
    mine = recommendations.join(batch_recommendations, m.recommendation_id == r.recommendation_id)
    members = select(func.count()).select_from(mine).where(m.batch_id == b.batch_id, readable_by(user)) \
        .correlate(market_batches).scalar_subquery()
    waiting = select(func.count()).select_from(mine).where(m.batch_id == b.batch_id, readable_by(user),
                                                          r.status.in_(lifecycle.OPEN)) \
        .correlate(market_batches).scalar_subquery()
    query = select(b.batch_id, b.trading_day, b.events, members.label("members"), waiting.label("waiting"))
    if user["role"] not in _EVERY_BATCH_ROLES:
        query = query.where(select(m.recommendation_id).select_from(mine)
                            .where(m.batch_id == b.batch_id, readable_by(user))
                            .correlate(market_batches).exists())
    today = now.astimezone(_NEW_YORK).date()
    rows = conn.execute(query.order_by(b.trading_day.desc()).limit(limit)).mappings().all()
    return [{"batch_id": row["batch_id"], "day": emails.day(row["trading_day"]), "today": row["trading_day"] == today,
             "events": row["events"], "members": row["members"], "waiting": row["waiting"]} for row in rows]


# ---------------------------------------------------------------------------------------------
# Formatting one row
# ---------------------------------------------------------------------------------------------


def span(delta: timedelta) -> str:
    """5 d 4 h, 47 h 10 min, 12 min: hours up to three days (the clocks count 24 h and 48 h)."""
    minutes = max(int(delta.total_seconds() // 60), 0)
    days, rest = divmod(minutes, 1440)
    if days >= 3:
        return f"{days} d {rest // 60} h"
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min"


def escalation_clock(rec: dict, now: datetime, policy: LifecyclePolicy) -> tuple[str, str]:
    """(text, tone) of the escalation clock: tone ok | soon (under a quarter of it left) | due | none."""
    started = utc(rec["clock_started_at"])
    if rec["status"] == "escalated":
        when = utc(rec["escalated_at"]) if rec["escalated_at"] else None
        return (f"with compliance since {span(now - when)}" if when else "with compliance"), "due"
    if rec["status"] not in ("pending", "deferred"):
        return "\u2014", "none"
    if rec["delivery"] == "weekly_batch":
        return "weekly digest (no clock)", "none"
    if rec["status"] == "deferred" and rec["deferred_until"] and utc(rec["deferred_until"]) > now:
        return f"deferred, {span(utc(rec['deferred_until']) - now)} left", "none"
    due = started + timedelta(hours=policy.escalation_hours)
    if due <= now:
        return "escalation due now", "due"
    left = due - now
    return f"escalates in {span(left)}", "soon" if left <= timedelta(hours=policy.escalation_hours / 4) else "ok"


def worst_band(package: RecommendationPackage) -> dict | None:
    worst = package_worst_band(package)
    if worst is None:
        return None
    band, ratio = worst
    from rebal_pipeline.comms.chart import class_label

    return {"label": class_label(band.asset_class), "drift": emails.signed_percent(band.drift),
            "band": emails.band_percent(band.band), "severity": f"{ratio:.1f}\u00d7", "outside": ratio > 1.0}


def _tax_cell(amount) -> str:
    """"$20.00", "$310.50 saving", or a dash when the package has no estimate."""
    if not isinstance(amount, (int, float)):
        return "\u2014"
    effect = tax_effect(amount)
    return f"{effect.amount} saving" if effect.saving else effect.amount


def row_view(rec: dict, now: datetime, policy: LifecyclePolicy) -> dict:
    package = RecommendationPackage.model_validate_json(rec["package"])
    masked = list(emails._accounts(package, None).values())
    tax = package.tax or {}
    est_tax = tax.get("est_tax")
    clock, tone = escalation_clock(rec, now, policy)
    return {
        "recommendation_id": rec["recommendation_id"], "advisor_id": rec["advisor_id"],
        "household": rec["household_id"] or "\u2014",
        "accounts": masked[0] if len(masked) == 1 else f"{len(masked)} accounts ({', '.join(masked[:3])}"
                                                        f"{', …' if len(masked) > 3 else ''})",
        "scope": rec["scope"], "kind": rec["kind"], "tier": (rec["tier"] or "\u2014").replace("_", " "),
        "urgency": rec["urgency"] or "\u2014", "status": rec["status"], "status_label": rec["status"].replace("_", " "),
        "worst": worst_band(package), "trade_value": emails.money(rec["trade_value"]),
        # A saving is labelled a saving (core/money.py), never shown as a negative tax.
        "est_tax": _tax_cell(est_tax),
        "age": span(now - utc(rec["clock_started_at"])), "clock": clock, "clock_tone": tone,
        "trade_count": len(package.trades),
    }


# ---------------------------------------------------------------------------------------------
# History and the compliance view
# ---------------------------------------------------------------------------------------------

_EVENT_WORDS = {
    "recommendation_alerted": "Published and alerted to the advisor", "recommendation_held":
    "Held: the account has open orders", "recommendation_historical": "Published as history (an older day)",
    "recommendation_resolved_by_market": "Resolved by the market (back inside its bands)",
    "recommendation_superseded": "Superseded by a later day",
    "recommendation_reminder": "Reminder sent (24h)", "recommendation_escalation": "Escalated to compliance",
    "recommendation_routed_to_compliance": "Routed to compliance at publication",
    "gate_passed": "Approval gate passed", "gate_refused": "Approval gate refused",
    "recommendation_rerouted": "Handed to a new advisor", "alert_sent": "Alert emailed",
}


def _event_text(kind: str, payload: dict) -> str:
    if kind.startswith("decision_"):
        words = kind.removeprefix("decision_").replace("_", " ")
        via = payload.get("via")
        return f"Decision: {words}" + (f" (via {via})" if via else "")
    text = _EVENT_WORDS.get(kind, kind.replace("_", " ").capitalize())
    if kind == "recommendation_escalation" and payload.get("manual"):
        text = "Escalation emailed to compliance"
    return text


def history(conn: Connection, recommendation_ids: list[str], limit_each: int = 60) -> dict[str, list[dict]]:
    """The audit trail of each recommendation (oldest first): when, who, what, and the reason."""
    if not recommendation_ids:
        return {}
    rows = conn.execute(select(audit_events.c.subject_id, audit_events.c.occurred_at, audit_events.c.kind,
                               audit_events.c.actor, audit_events.c.payload)
                        .where(audit_events.c.subject_id.in_(recommendation_ids))
                        .order_by(audit_events.c.seq)).mappings().all()
    out: dict[str, list[dict]] = {rid: [] for rid in recommendation_ids}
    for row in rows:
        payload = json.loads(row["payload"] or "{}")
        reason = payload.get("reason") or payload.get("compliance_review")
        entries = out[row["subject_id"]]
        if len(entries) < limit_each:
            entries.append({"at": row["occurred_at"], "actor": row["actor"], "what": _event_text(row["kind"], payload),
                            "reason": reason if isinstance(reason, str) else None})
    return out


def mask_history(events: list[dict], package: RecommendationPackage) -> list[dict]:
    from rebal_pipeline.approval_api.portal import _masking

    mask = _masking(package)
    return [{**e, "reason": mask(e["reason"]) if e["reason"] else e["reason"]} for e in events]


def compliance_items(conn: Connection, now: datetime, policy: LifecyclePolicy, limit: int = 200) -> dict:
    """Open escalations (status escalated: the advisor escalated, compliance took over, the 48h
    rule, or routed at publication for compliance review), most urgent and severe first, each
    with why it is with compliance and its history; and the escalations decided lately."""
    r = recommendations.c
    weight = severity(conn).label("severity")
    columns = (r.recommendation_id, r.advisor_id, r.as_of, r.scope, r.scope_id, r.kind, r.household_id, r.tier,
               r.urgency, r.delivery, r.status, r.trade_value, r.clock_started_at, r.deferred_until, r.escalated_at,
               r.package, weight)
    open_rows = conn.execute(select(*columns).where(r.status == "escalated")
                             .order_by(_URGENCY_RANK, desc(weight), r.escalated_at, r.recommendation_id)
                             .limit(limit)).mappings().all()
    decided = conn.execute(select(*columns).where(and_(r.escalated_at.is_not(None), r.status != "escalated"))
                           .order_by(r.updated_at.desc(), r.recommendation_id).limit(50)).mappings().all()
    ids = [row["recommendation_id"] for row in [*open_rows, *decided]]
    trail = history(conn, ids)
    routed = set(conn.execute(select(audit_events.c.subject_id).where(and_(
        audit_events.c.kind == "recommendation_routed_to_compliance", audit_events.c.subject_id.in_(ids)))).scalars()) \
        if ids else set()

    def view(row) -> dict:
        item = row_view(dict(row), now, policy)
        # Reasons may name account ids (a compliance review does): masked like every account on a page.
        events = mask_history(trail.get(row["recommendation_id"], []),
                              RecommendationPackage.model_validate_json(row["package"]))
        why = next((e for e in reversed(events) if e["what"].startswith(("Decision: escalate", "Routed", "Escalated"))),
                   None)
        item.update(history=events, compliance_review=row["recommendation_id"] in routed,
                    why=(why["what"] + (f": {why['reason']}" if why and why["reason"] else "")) if why else
                    "Escalated", why_actor=why["actor"] if why else None)
        return item

    return {"open": [view(row) for row in open_rows], "decided": [view(row) for row in decided]}


# ---------------------------------------------------------------------------------------------
# The operations view
# ---------------------------------------------------------------------------------------------

FAILED_RUN_ALERTS = ("run_failed", "job_failed", "run_failure")


def operations_view(conn: Connection, limit: int = 300) -> dict:
    """The recorded operations alerts (wf_notifications kind operations_alert), newest first; per
    connection, its latest alert; the failed-run alerts among them; emails that were not delivered."""
    from rebal_pipeline.workflow.operations_alerts import KIND
    from rebal_pipeline.workflow.schema import messages

    rows = conn.execute(select(notifications.c.notification_key, notifications.c.created_at,
                               notifications.c.payload).where(notifications.c.kind == KIND)
                        .order_by(notifications.c.created_at.desc(), notifications.c.notification_key)
                        .limit(limit)).mappings().all()
    alerts = []
    for row in rows:
        body = json.loads(row["payload"] or "{}")
        details = body.get("details") or {}
        alerts.append({"key": row["notification_key"], "at": row["created_at"], "alert": body.get("alert", "?"),
                       "title": emails.OPERATIONS_GUIDANCE.get(body.get("alert"), {}).get("title")
                       or str(body.get("alert", "?")).replace("_", " ").capitalize(),
                       "summary": body.get("summary", ""), "connection": body.get("connection") or "\u2014",
                       "as_of": body.get("as_of"),
                       "details": [{"label": emails._DETAIL_LABELS.get(k, k.replace("_", " ").capitalize()),
                                    "value": emails._detail_value(v)} for k, v in sorted(details.items())]})
    per_connection: dict[str, dict] = {}
    for alert in alerts:  # newest first: the first seen per connection is its latest
        if alert["connection"] != "\u2014":
            per_connection.setdefault(alert["connection"], alert)
    undelivered = conn.execute(select(messages.c.message_key, messages.c.kind, messages.c.status,
                                      messages.c.attempts, messages.c.last_error, messages.c.created_at)
                               .where(messages.c.status.in_(("retry", "rejected")))
                               .where(messages.c.kind != "sign_in")
                               .order_by(messages.c.created_at.desc()).limit(100)).mappings().all()
    return {"alerts": alerts, "connections": [per_connection[k] for k in sorted(per_connection)],
            "failed_runs": [a for a in alerts if a["alert"] in FAILED_RUN_ALERTS],
            "data_quality": [a for a in alerts if a["alert"] not in FAILED_RUN_ALERTS],
            "undelivered": [dict(m) for m in undelivered]}

