"""The market-event batch report and the advisors' emails (issue #16 item 2; no Dagster here).

Every market event of a New York trading day re-scans every account; the recommendations its scan
publishes join the day's batch (market_events/batches.py, wf_batch_recommendations). This module
says what the batch looks like to people:

    batch_rows(conn, batch_id, advisor_id=None)      one row per member, most severe first
    batch_summary(conn, batch_id)                    the batch, its events, counts, per advisor, totals
    render_batch_report(summary, rows)               (HTML, CSV bytes): the report in the portal and on disk
    write_batch_report(conn, reports_root, batch_id, event_id, now)
                                                     the report after one event's scan: two files, written
                                                     once, and one audit event with their SHA-256
    email_advisors(conn, batch_id, event_id, now, portal_url=...)
                                                     one email per advisor with members added by the event,
                                                     queued once per (event, advisor)
    send_advisor_email(store, notification_key, now, comms=...)
                                                     sends one queued email through the outbox, once
    send_event_emails(store, event_id, now, comms=...)
                                                     sends every email queued for the event, each once

Rules (each has one home; this module only reads and formats):
- **Order**: severity (the member's worst |drift| ÷ band at the event's prices, recorded when it
  joined: batches.severity_of) largest first, then |trade value| largest first, then the
  recommendation id. Done in SQL, so every reader sees the same order.
- **Worst class**: the band with the largest |drift| ÷ band (the first on a tie), shown the way the
  review queue shows it (review_queue.worst_band); the estimated tax as the queue shows it (a
  saving worded as one, never a negative tax).
- **Masking**: accounts appear only as ••••1234 (core/pii.py), in the rows, the HTML, the CSV and the
  emails; an account of the batch named in an event's reason (typed by a person) is masked too.
- **Deterministic**: the report is a function of the store (no wall clock in it); rows are sorted
  with a total order; times print in New York time from the stored moments.
- **The report after an event** (`write_batch_report`) shows the events up to that one and the
  members they added (a later event's members are in the later event's report), with each
  member's status as it is when written. Files: <reports_root>/market-events/<batch_id>/
  after_<event_id>.html and .csv, in a 0700 folder, written once (core/write_once.py): a re-run
  that finds the recorded files writes nothing; a file that differs from what was recorded, or a
  missing one that can no longer be rendered with the recorded bytes (the store changed since),
  is an error (`ReportConflict`), never an overwrite. One audit event per event's report:
  `market_batch_report:<event_id>`, kind market_batch_report, actor rebal:market_events, payload
  the files' names and SHA-256 (ids and counts only, no account, no amount).
- **Emails** (`email_advisors`): for each advisor with members added by the event, one email with
  their part only (their rows, most severe first; the subject names the move and the count) and a
  link to <portal_url>/portal/queue?batch=<batch_id>. Who receives it is authority.alert_recipients'
  rule, as for the advisor's alert: the advisor, then — when the advisor's users.csv row says
  `team_alerts` — each active team member, each with their own message. Queued in the workflow
  store (wf_notifications, kind `market_event`), in the caller's transaction, exactly once per key:
      market_event:<event_id>:<advisor_id>                  the advisor's own
      market_event:<event_id>:<advisor_id>:<member_id>      a team member's copy
  (the member's id comes last: a member who is an advisor too keeps their own part under their
  own key). The key is also the wf_messages key `send_advisor_email` delivers under
  (comms/outbound.py: a `sent` key is never sent again; a relay that is down leaves it `retry`).
  The email is rendered when sent, from the store: the rows recorded with the notification,
  their status as it is then; the event's reason was masked when queued (with every account of
  the batch so far, once per event rather than once per email).
  Who sends it: the store is the hand-off, as for reminders and operations alerts — the comms
  runs (defs/comms: the mailer_outbox sensor lists wf_notifications rows without a wf_messages
  row; send_notification sends one; outbound_retries re-sends) hand a `market_event` key to
  `send_advisor_email`.
- `batch_rows` and `batch_summary` take `through_event=` (keyword): the batch as it stood after
  that event's scan, as `write_batch_report` writes it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy import Connection, and_, func, insert, select
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.approval_api.models import STATUSES
from rebal_pipeline.approval_api.review_queue import _tax_cell, signed_move, worst_band
from rebal_pipeline.comms import emails, outbound
from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.pii import mask_account, masker
from rebal_pipeline.core.private_files import PRIVATE_FILE_MODE, private_dir
from rebal_pipeline.core.write_once import write_file_once
from rebal_pipeline.market_events import batches
from rebal_pipeline.market_events.batches import BatchError
from rebal_pipeline.supervision.deliver import sha256s
from rebal_pipeline.supervision.render import moment as new_york_time
from rebal_pipeline.workflow import audit, authority, lifecycle
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.package import worst_band as package_worst_band
from rebal_pipeline.workflow.schema import (
    audit_events, batch_recommendations, market_batches, market_events, notifications, recommendations, users,
)

ACTOR = batches.ACTOR  # rebal:market_events
REPORT_EVENT_KIND = "market_batch_report"
MESSAGE_KIND = "market_event"  # wf_notifications.kind and wf_messages.kind of the advisors' emails
QUEUED_EVENT_KIND = "market_event_email_queued"
FOLDER = "market-events"
FORMATS = ("html", "csv")
DASH = "\u2014"
TITLE = "Market-event batch"
CSV_COLUMNS = ("batch_id", "event_id", "recommendation_id", "advisor_id", "household_id", "scope", "accounts", "kind",
               "tier", "status", "worst_class", "worst_drift", "band", "severity", "trade_value", "estimated_tax",
               "added_at")
_SOURCES = {batches.PRICES: "Intraday prices", batches.OPERATOR: "Declared by a person"}


class BatchNotFound(LookupError):
    """No market-event batch (or event of it) with this id in the workflow store."""


class ReportConflict(RuntimeError):
    """A written report file is not what this report is (the message names the file and why)."""


# ---------------------------------------------------------------------------------------------
# Reading the batch
# ---------------------------------------------------------------------------------------------


def _batch(conn: Connection, batch_id: str) -> dict:
    batches.check_batch_id(batch_id)
    row = conn.execute(select(market_batches).where(market_batches.c.batch_id == batch_id)).mappings().first()
    if row is None:
        raise BatchNotFound(f"no market-event batch {batch_id} in the workflow store")
    return dict(row)


def _event_of(conn: Connection, batch_id: str, event_id: str) -> dict:
    batches.check_event_id(event_id)
    row = conn.execute(select(market_events).where(and_(market_events.c.event_id == event_id,
                                                        market_events.c.batch_id == batch_id))).mappings().first()
    if row is None:
        raise BatchNotFound(f"no market event {event_id} in batch {batch_id}")
    return dict(row)


def _scanned(event: dict) -> dict:
    """The report and the emails are about what a scan published: an event not scanned yet has none."""
    if event["scanned_at"] is None:
        raise BatchError(f"{event['event_id']} has not been scanned yet: its report and emails follow its scan")
    return event


def _members(conn: Connection, batch_id: str, *, advisor_id: str | None = None, through_seq: int | None = None,
             added_by: str | None = None) -> list[tuple[dict, RecommendationPackage]]:
    """The members' rows and packages in the report's order (the module docstring): of one
    advisor, added by the events up to seq `through_seq`, added by one event."""
    r, m = recommendations.c, batch_recommendations.c
    where = [m.batch_id == batch_id]
    if advisor_id is not None:
        where.append(r.advisor_id == advisor_id)
    if added_by is not None:
        where.append(m.event_id == added_by)
    if through_seq is not None:
        where.append(m.event_id.in_(select(market_events.c.event_id).where(and_(
            market_events.c.batch_id == batch_id, market_events.c.seq <= through_seq))))
    rows = conn.execute(
        select(r.recommendation_id, m.event_id, r.advisor_id, r.household_id, r.scope, r.kind, r.tier, r.urgency,
               r.status, r.trade_value, r.package, m.severity, m.added_at)
        .select_from(batch_recommendations.join(recommendations, r.recommendation_id == m.recommendation_id))
        .where(and_(*where))
        .order_by(m.severity.desc(), func.abs(r.trade_value).desc(), r.recommendation_id)).mappings().all()
    return [(dict(row), RecommendationPackage.model_validate_json(row["package"])) for row in rows]


def _row(rec: dict, package: RecommendationPackage) -> dict:
    worst, _ratio = package_worst_band(package) or (None, 0.0)
    tax = (package.tax or {}).get("est_tax")
    return {
        "recommendation_id": rec["recommendation_id"], "event_id": rec["event_id"], "advisor_id": rec["advisor_id"],
        "household_id": rec["household_id"], "scope": rec["scope"],
        "accounts": [mask_account(a) for a in package.account_ids],
        "kind": rec["kind"], "tier": rec["tier"], "urgency": rec["urgency"], "status": rec["status"],
        "worst_class": worst.asset_class if worst else None, "worst_drift": worst.drift if worst else None,
        "band": worst.band if worst else None, "severity": float(rec["severity"]),
        "trade_value": float(rec["trade_value"] or 0.0),
        "estimated_tax": float(tax) if isinstance(tax, (int, float)) else None,
        "added_at": utc(rec["added_at"]),
        # As the review queue shows the worst class (label, drift, band, severity, outside).
        "worst": worst_band(package),
    }


def _through(conn: Connection, batch_id: str, through_event: str | None) -> int | None:
    return None if through_event is None else int(_event_of(conn, batch_id, through_event)["seq"])


def batch_rows(conn: Connection, batch_id: str, advisor_id: str | None = None, *,
               through_event: str | None = None) -> list[dict]:
    """One row per member of the batch (of one advisor's, when given): recommendation_id, event_id
    (the event whose scan added it), advisor_id, household_id, scope, accounts (masked), kind, tier,
    urgency, status (now), worst_class, worst_drift (signed), band, severity, trade_value,
    estimated_tax (None: the package has no estimate), added_at, and `worst` (the worst class as the
    review queue formats it). Sorted by severity, then |trade value|, largest first, then the id.
    through_event: only the members added by the events up to that one (the report after it)."""
    _batch(conn, batch_id)
    return [_row(rec, package) for rec, package in _members(
        conn, batch_id, advisor_id=advisor_id, through_seq=_through(conn, batch_id, through_event))]


def _status_order(status: str) -> tuple[int, str]:
    return (STATUSES.index(status) if status in STATUSES else len(STATUSES), status)


def _counts(rows: list[dict]) -> dict:
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    taxes = [row["estimated_tax"] for row in rows if row["estimated_tax"] is not None]
    return {"members": len(rows), "open": sum(1 for row in rows if row["status"] in lifecycle.OPEN),
            "by_status": dict(sorted(by_status.items(), key=lambda item: _status_order(item[0]))),
            "trade_value": round(sum(row["trade_value"] for row in rows), 2),
            "estimated_tax": round(sum(taxes), 2) if taxes else None}


def _events(conn: Connection, batch_id: str, condition=None) -> list[dict]:
    """The batch's events in order (with the declaring user's name); reasons as typed."""
    e, u = market_events.c, users.c
    where = [e.batch_id == batch_id] + ([condition] if condition is not None else [])
    rows = conn.execute(select(e.event_id, e.seq, e.detected_at, e.scanned_at, e.source, e.declared_by, e.reason,
                               e.move, e.recommendations, u.name)
                        .select_from(market_events.outerjoin(users, u.user_id == e.declared_by))
                        .where(and_(*where)).order_by(e.seq)).mappings().all()
    return [{"event_id": ev["event_id"], "seq": ev["seq"], "detected_at": utc(ev["detected_at"]),
             "scanned_at": utc(ev["scanned_at"]) if ev["scanned_at"] else None, "source": ev["source"],
             "declared_by": ev["declared_by"], "declared_by_name": ev["name"], "reason": ev["reason"],
             "move": ev["move"], "recommendations": ev["recommendations"]} for ev in rows]


def _reason_masker(members: list[tuple[dict, RecommendationPackage]]):
    """A reason is typed by a person: any account of the batch it names is masked like every other."""
    return masker({a for _, package in members for a in package.account_ids})


def batch_summary(conn: Connection, batch_id: str, *, through_event: str | None = None) -> dict:
    """The batch (id, trading day, session valued, opened, release due, events), its events in
    order (event_id, seq, detected_at, scanned_at, source, declared_by and their name, reason with
    the batch's accounts masked, move, how many joined), the members counted by status now, per
    advisor (members, open, by status, trade value, estimated tax) and in total.
    through_event: as it stands after that event's scan (its events and members only)."""
    batch = _batch(conn, batch_id)
    seq = _through(conn, batch_id, through_event)
    events = _events(conn, batch_id, market_events.c.seq <= seq if seq is not None else None)
    members = _members(conn, batch_id, through_seq=seq)
    rows = [_row(rec, package) for rec, package in members]
    mask = _reason_masker(members)
    u = users.c
    advisor_ids = sorted({row["advisor_id"] for row in rows if row["advisor_id"]})
    names = dict(conn.execute(select(u.user_id, u.name).where(u.user_id.in_(advisor_ids))).all()) if advisor_ids \
        else {}
    advisors = []
    for advisor_id in [*advisor_ids, *([None] if any(row["advisor_id"] is None for row in rows) else [])]:
        part = [row for row in rows if row["advisor_id"] == advisor_id]
        advisors.append({"advisor_id": advisor_id, "name": names.get(advisor_id), **_counts(part)})
    return {
        "batch": {"batch_id": batch["batch_id"], "trading_day": batch["trading_day"],
                  "session_as_of": batch["session_as_of"], "opened_at": utc(batch["opened_at"]),
                  "release_due_at": utc(batch["release_due_at"]), "events": int(batch["events"])},
        "through_event": through_event,
        "events": [{**ev, "reason": mask(ev["reason"])} for ev in events],
        "advisors": advisors,
        "totals": _counts(rows),
    }


# ---------------------------------------------------------------------------------------------
# Formatting: one view for the HTML report, the CSV and the emails
# ---------------------------------------------------------------------------------------------


def _who(event: dict) -> str:
    if event["declared_by"] == ACTOR:
        return "rebal, automatically"
    name = event.get("declared_by_name")
    return f"{name} ({event['declared_by']})" if name else event["declared_by"]


def _origin(event: dict) -> str:
    """How the event came about, in one phrase (the emails)."""
    if event["source"] == batches.PRICES:
        return "seen by rebal in the intraday prices"
    return f"declared by {_who(event)}"


def _event_view(event: dict) -> dict:
    return {"event_id": event["event_id"], "seq": event["seq"], "detected": new_york_time(event["detected_at"]),
            "scanned": new_york_time(event["scanned_at"]) if event["scanned_at"] else "not yet",
            "source": _SOURCES.get(event["source"], event["source"]), "who": _who(event), "origin": _origin(event),
            "reason": event["reason"],
            "move": signed_move(event["move"]),
            "joined": DASH if event["recommendations"] is None else f"{event['recommendations']:,}"}


def _row_view(rank: int, row: dict) -> dict:
    worst = row["worst"]
    return {"rank": rank, "recommendation_id": row["recommendation_id"], "event_id": row["event_id"],
            "advisor_id": row["advisor_id"] or DASH, "household": row["household_id"] or DASH,
            "accounts": ", ".join(row["accounts"]), "scope": row["scope"], "kind": row["kind"],
            "tier": (row["tier"] or DASH).replace("_", " "), "status": row["status"].replace("_", " "),
            "status_code": row["status"], "severity": worst["severity"] if worst else f"{row['severity']:.1f}\u00d7",
            "outside": bool(worst and worst["outside"]),
            "worst": f"{worst['label']} {worst['drift']} vs. {worst['band']}" if worst else DASH,
            "trade_value": emails.money(row["trade_value"]), "estimated_tax": _tax_cell(row["estimated_tax"])}


def _count_view(counts: dict) -> dict:
    return {"members": f"{counts['members']:,}", "open": f"{counts['open']:,}",
            "statuses": ", ".join(f"{n:,} {status.replace('_', ' ')}" for status, n in counts["by_status"].items())
            or DASH,
            "trade_value": emails.money(counts["trade_value"]), "estimated_tax": _tax_cell(counts["estimated_tax"])}


def _view(summary: dict, rows: list[dict]) -> dict:
    batch = summary["batch"]
    events = [_event_view(e) for e in summary["events"]]
    through = summary.get("through_event")
    return {
        "title": TITLE, "batch_id": batch["batch_id"], "day": emails.day(batch["trading_day"]),
        "session": emails.day(batch["session_as_of"]), "opened": new_york_time(batch["opened_at"]),
        "release_due": new_york_time(batch["release_due_at"]),
        "as_of": (f"after the scan of {through} (event {len(events)} of the day)" if through
                  else f"after the day's {len(events)} event{'s' if len(events) != 1 else ''}"),
        "events": events,
        "statuses": [{"status": status.replace("_", " "), "code": status, "count": f"{n:,}"}
                     for status, n in summary["totals"]["by_status"].items()],
        "totals": _count_view(summary["totals"]),
        "advisors": [{"advisor_id": a["advisor_id"] or DASH,
                      "advisor": f"{a['name']} ({a['advisor_id']})" if a["name"] else (a["advisor_id"] or "no advisor"),
                      **_count_view(a)} for a in summary["advisors"]],
        "rows": [_row_view(rank, row) for rank, row in enumerate(rows, start=1)],
    }


# Autoescape on for HTML (reasons, names and ids from the data are escaped); off for plain text,
# which is not HTML (escaping would show &amp; to the reader).
def _escape_html(name: str | None) -> bool:
    """Every template is escaped except the plain-text email part (a `.txt` template)."""
    return not (name or "").removesuffix(".j2").endswith(".txt")


_TEMPLATES = Environment(loader=PackageLoader("rebal_pipeline.market_events", "templates"),
                         autoescape=_escape_html,
                         undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_TEMPLATES.globals["css"] = emails._CSS  # the emails' inline styles: the batch email looks like the others


def _number(value, places: int) -> str:
    return "" if value is None else f"{value:.{places}f}"


def csv_report(summary: dict, rows: list[dict]) -> bytes:
    """One row per member in the report's order; values raw where a machine reads them (numbers
    with a dot, moments in New York time ISO-8601, accounts masked and space-separated)."""
    from rebal_pipeline.supervision.report import FIRM_TIMEZONE

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({
            "batch_id": summary["batch"]["batch_id"], "event_id": row["event_id"],
            "recommendation_id": row["recommendation_id"], "advisor_id": row["advisor_id"] or "",
            "household_id": row["household_id"] or "", "scope": row["scope"], "accounts": " ".join(row["accounts"]),
            "kind": row["kind"], "tier": row["tier"] or "", "status": row["status"],
            "worst_class": row["worst_class"] or "", "worst_drift": _number(row["worst_drift"], 6),
            "band": _number(row["band"], 6), "severity": _number(row["severity"], 6),
            "trade_value": _number(row["trade_value"], 2), "estimated_tax": _number(row["estimated_tax"], 2),
            "added_at": row["added_at"].astimezone(FIRM_TIMEZONE).isoformat()})
    return out.getvalue().encode("utf-8")


def render_batch_report(summary: dict, rows: list[dict]) -> tuple[str, bytes]:
    """(HTML, CSV bytes) of the batch: the same input gives the same text and bytes."""
    html = _TEMPLATES.get_template("batch_report.html.j2").render(r=_view(summary, rows))
    return html, csv_report(summary, rows)


# ---------------------------------------------------------------------------------------------
# The report after an event: files written once, one audit event
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchReport:
    batch_id: str
    event_id: str
    html_path: Path
    csv_path: Path
    sha256: dict[str, str]  # html / csv → SHA-256 of the file's bytes (as recorded in the audit chain)
    written: bool  # this call wrote a file (False: they were there, as recorded)


def report_event_id(event_id: str) -> str:
    return f"{REPORT_EVENT_KIND}:{event_id}"


def report_paths(reports_root: Path, batch_id: str, event_id: str) -> dict[str, Path]:
    """<reports_root>/market-events/<batch_id>/after_<event_id>.html and .csv"""
    folder = Path(reports_root) / FOLDER / batches.check_batch_id(batch_id)
    return {fmt: folder / f"after_{batches.check_event_id(event_id)}.{fmt}" for fmt in FORMATS}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def write_batch_report(conn: Connection, reports_root: Path, batch_id: str, event_id: str,
                       now: datetime) -> BatchReport:
    """The report as it stands after `event_id`'s scan, written once and recorded once (the module
    docstring). Idempotent: a re-run finds the recorded files and writes nothing. Raises
    ReportConflict for a file that is not what was recorded (or would be rendered now), BatchError
    for an event not scanned yet, BatchNotFound for an unknown batch or event."""
    _batch(conn, batch_id)
    _scanned(_event_of(conn, batch_id, event_id))
    paths = report_paths(reports_root, batch_id, event_id)
    audit_id = report_event_id(event_id)
    stored = conn.execute(select(audit_events.c.payload).where(audit_events.c.event_id == audit_id)).scalar()
    recorded = (json.loads(stored).get("sha256") or {}) if stored else None
    on_disk = {fmt: _digest(path) for fmt, path in paths.items()}
    if recorded is not None:
        for fmt, path in paths.items():
            if on_disk[fmt] is not None and on_disk[fmt] != recorded.get(fmt):
                raise ReportConflict(f"{path}: SHA-256 {on_disk[fmt]} is not the {recorded.get(fmt)} recorded in "
                                     f"audit event {audit_id}; the file was changed after it was written (it is "
                                     "never rewritten: restore it from a backup)")
        if all(on_disk.values()):
            return BatchReport(batch_id, event_id, paths["html"], paths["csv"], dict(recorded), False)
    rows = batch_rows(conn, batch_id, through_event=event_id)
    html, csv_bytes = render_batch_report(batch_summary(conn, batch_id, through_event=event_id), rows)
    files = {"html": html.encode("utf-8"), "csv": csv_bytes}
    digests = sha256s(files)
    if recorded is not None and recorded != digests:
        missing = [str(paths[fmt]) for fmt in FORMATS if on_disk[fmt] is None]
        raise ReportConflict(f"{', '.join(missing)}: missing, and the report after {event_id} no longer renders "
                             f"as recorded in audit event {audit_id} (the batch's members changed since); it "
                             "cannot be regenerated: restore the file from a backup")
    private_dir(paths["html"].parent)  # 0700: the report names households and advisors
    written = False
    for fmt in FORMATS:
        path, body = paths[fmt], files[fmt]
        if write_file_once(path, body):
            # write_file_once creates with the process umask; the folder is 0700 already.
            os.chmod(path, PRIVATE_FILE_MODE)
            written = True
        elif _digest(path) != digests[fmt]:
            raise ReportConflict(f"{path}: already written with other content (SHA-256 {_digest(path)}); the "
                                 f"report after {event_id} renders now as {digests[fmt]}. A written report is never "
                                 "replaced: move the file away if it is not the report of this event")
    audit.append(conn, audit_id, REPORT_EVENT_KIND, ACTOR, utc(now), batch_id, {
        "batch_id": batch_id, "event_id": event_id, "files": {fmt: paths[fmt].name for fmt in FORMATS},
        "sha256": digests, "members": len(rows)})
    return BatchReport(batch_id, event_id, paths["html"], paths["csv"], digests, written)


# ---------------------------------------------------------------------------------------------
# The advisors' emails: queued once per (event, advisor), sent once through the outbox
# ---------------------------------------------------------------------------------------------


def message_key(event_id: str, advisor_id: str, recipient_id: str | None = None) -> str:
    """market_event:<event>:<advisor> (the advisor's own), …:<advisor>:<member> (a team member's copy)."""
    key = f"{MESSAGE_KIND}:{event_id}:{advisor_id}"
    return key if recipient_id in (None, advisor_id) else f"{key}:{recipient_id}"


def queue_link(portal_url: str, batch_id: str) -> str:
    """<portal_url>/portal/queue?batch=<batch_id>, checked as the emails check every link (https;
    http only to a local server)."""
    link = f"{portal_url.rstrip('/')}/portal/queue?batch={batches.check_batch_id(batch_id)}"
    emails._check_links({"review": link}, ())
    return link


def email_advisors(conn: Connection, batch_id: str, event_id: str, now: datetime, *, portal_url: str) -> int:
    """Queue one email per advisor with members added by `event_id`'s scan (and a copy per team
    member who receives the team's alerts), in the caller's transaction, once per key (the module
    docstring). Members without an advisor are in the report only. Returns the messages queued
    now (0 on a re-run)."""
    now = utc(now)
    _batch(conn, batch_id)
    event = _scanned(_event_of(conn, batch_id, event_id))
    link = queue_link(portal_url, batch_id)
    members = _members(conn, batch_id, through_seq=int(event["seq"]))
    # Masked once here, with every account of the batch so far, not once per email sent.
    reason = _reason_masker(members)(event["reason"])
    parts: dict[str, list[str]] = {}
    for rec, _package in members:
        if rec["event_id"] == event_id and rec["advisor_id"]:
            parts.setdefault(rec["advisor_id"], []).append(rec["recommendation_id"])
    queued = 0
    for advisor_id, recommendation_ids in sorted(parts.items()):
        # authority's rule, as for the advisor's alert (comms/delivery.send_alert): an inactive
        # advisor is still queued, and the outbox records why it cannot be sent.
        recipients = [u["user_id"] for u in authority.alert_recipients(conn, advisor_id)] or [advisor_id]
        for recipient_id in recipients:
            key = message_key(event_id, advisor_id, recipient_id)
            body = {"batch_id": batch_id, "event_id": event_id, "advisor_id": advisor_id,
                    "recommendations": recommendation_ids, "link": link}
            try:
                with conn.begin_nested():
                    conn.execute(insert(notifications).values(
                        notification_key=key, kind=MESSAGE_KIND, recommendation_id=None, recipient_id=recipient_id,
                        created_at=now, payload=audit.canonical_json({**body, "reason": reason})))
            except IntegrityError:  # queued before (a re-run): exactly once
                continue
            audit.append(conn, f"{QUEUED_EVENT_KIND}:{key}", QUEUED_EVENT_KIND, ACTOR, now, advisor_id,
                         {"message_key": key, "recipient_id": recipient_id, **body})
            queued += 1
    return queued


def _queued(conn: Connection, notification_key: str) -> dict:
    row = conn.execute(select(notifications).where(and_(notifications.c.notification_key == notification_key,
                                                        notifications.c.kind == MESSAGE_KIND))).mappings().first()
    if row is None:
        raise BatchNotFound(f"no market-event email {notification_key} queued in the workflow store")
    return {**dict(row), "body": json.loads(row["payload"])}


def _assemble(*, subject: str, sender: str, to: str, message_id: str, reference: str, context: dict) -> EmailMessage:
    """Plain text and HTML alternatives, quoted-printable; same input, same bytes (as comms/emails.py)."""
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = to
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: out-of-office responders do not answer it
    msg["X-Rebal-Reference"] = reference
    msg.set_content(_TEMPLATES.get_template("advisor_email.txt.j2").render(context), subtype="plain",
                    charset="utf-8", cte="quoted-printable")
    msg.add_alternative(_TEMPLATES.get_template("advisor_email.html.j2").render(context), subtype="html",
                        charset="utf-8", cte="quoted-printable")
    # MIME boundaries from the Message-ID (the email package picks random ones).
    seed = hashlib.sha256(f"boundary\x00{message_id}".encode()).hexdigest()[:24]
    for number, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"==rebal-{seed}-{number}==")
    return msg


def advisor_email(conn: Connection, notification_key: str, *, sender: str, to: str, message_id: str,
                  recipient_name: str | None = None) -> EmailMessage:
    """The queued email, rendered from the store: the event, the advisor's rows it recorded (most
    severe first, their status now) and the link to the batch's queue."""
    queued = _queued(conn, notification_key)
    body = queued["body"]
    batch_id, event_id, advisor_id = body["batch_id"], body["event_id"], body["advisor_id"]
    wanted = set(body["recommendations"])
    rows = [_row(rec, package) for rec, package in _members(conn, batch_id, advisor_id=advisor_id, added_by=event_id)
            if rec["recommendation_id"] in wanted]
    batch = _batch(conn, batch_id)
    [event] = _events(conn, batch_id, market_events.c.event_id == event_id)
    event["reason"] = body["reason"]  # masked when queued (email_advisors)
    advisor_name = conn.execute(select(users.c.name).where(users.c.user_id == advisor_id)).scalar() or advisor_id
    team_copy = queued["recipient_id"] != advisor_id
    count = f"{len(rows)} recommendation{'s' if len(rows) != 1 else ''}"
    day = emails.day(batch["trading_day"])
    move = signed_move(event["move"])
    subject = (f"Market event {move} on {day}: {count} to review" if event["move"] is not None
               else f"Market event on {day} (declared): {count} to review")
    if team_copy:
        subject += f" for {advisor_name}"
    view = _event_view(event)
    context = {"event": view, "move": move if event["move"] is not None else "(declared)",
               "what": (f"a market move of {move}" if event["move"] is not None
                        else f"a market event {view['origin']}"), "day": day, "count": count, "batch_id": batch_id,
               "rows": [_row_view(rank, row) for rank, row in enumerate(rows, start=1)],
               "link": emails._check_links({"review": body["link"]}, ())["review"],
               "recipient_name": recipient_name, "advisor_name": advisor_name, "team_copy": team_copy,
               "release_due": new_york_time(utc(batch["release_due_at"]))}
    return _assemble(subject=subject, sender=sender, to=to, message_id=message_id,
                     reference=f"{MESSAGE_KIND}:{event_id}", context=context)


def send_advisor_email(store, notification_key: str, now: datetime, *, comms) -> list[outbound.Delivery]:
    """Send one queued email through the outbox, once (comms: a CommsSettings; the relay is read
    at send time, so a broken setting is a retry). The message key is the notification key."""
    from rebal_pipeline.comms import delivery

    with store.begin() as conn:
        recipient_id = _queued(conn, notification_key)["recipient_id"]

    def build(message_id: str, relay) -> EmailMessage:
        with store.begin() as conn:
            to, name = delivery._recipient_email(delivery._user(conn, recipient_id), "recipient")
            return advisor_email(conn, notification_key, sender=relay.sender, to=to, message_id=message_id,
                                 recipient_name=name)

    return [outbound.deliver(store.begin, notification_key, MESSAGE_KIND, "smtp", delivery._email_send(comms, build),
                             now, recipient_id=recipient_id)]


def event_message_keys(conn: Connection, event_id: str) -> list[str]:
    """The keys of the emails queued for an event, in order (advisor, then their team's copies)."""
    batches.check_event_id(event_id)
    prefix = f"{MESSAGE_KIND}:{event_id}:"
    return list(conn.execute(select(notifications.c.notification_key).where(and_(
        notifications.c.kind == MESSAGE_KIND, notifications.c.notification_key.startswith(prefix, autoescape=True)))
        .order_by(notifications.c.notification_key)).scalars())


def send_event_emails(store, event_id: str, now: datetime, *, comms) -> list[outbound.Delivery]:
    """Send every email queued for the event, each once (as supervision/deliver.email_report sends
    the supervisory report from its own run): a re-run sends only what is not sent yet."""
    with store.begin() as conn:
        keys = event_message_keys(conn, event_id)
    return [d for key in keys for d in send_advisor_email(store, key, now, comms=comms)]

