"""Producing the supervisory review report: files, the audit record, the emails to compliance.

    produce(store, period, ...)   build → render → write the three files → record → (email)

- **Files**: `<out_dir>/supervisory_report_<from>_<to>.html|.pdf|.csv`, 0600 in a 0700 folder
  (advisor names and reasons), written atomically; writing the same period again writes the same
  bytes.
- **Audit record** (`record_report`): one event `supervisory_report_generated`, id
  `supervisory_report:<from>:<to>:csv+html+pdf`, with each file's SHA-256 — exactly once per
  period and set of formats (audit.append is idempotent on the id). When the period is produced
  again the event is not repeated; `Recorded.matches` says whether today's bytes are the ones
  recorded (they are, unless the period's facts changed: a period that had not ended yet, or a
  chain broken since).
- **Emails** (`email_report`): to every active compliance user, through `comms.outbound.deliver`
  under the key `supervisory_report:<from>:<to>:<user_id>` (kind `supervisory_report`, smtp):
  sent once per user, retried by the outbox when the relay is down. Plain text with the figures
  and the SHA-256s; the PDF and the CSV attached. Same input, same bytes (Message-ID from the key,
  MIME boundaries from the Message-ID; the Date header is stamped by smtp.send).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import Connection, and_, select

from rebal_pipeline.comms import outbound
from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.private_files import PRIVATE_FILE_MODE, private_dir
from rebal_pipeline.core.write_once import fsync_dir, temp_path
from rebal_pipeline.supervision.render import render_all
from rebal_pipeline.supervision.report import Period, SupervisoryReport, build_report
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import audit_events, users

EVENT_KIND = "supervisory_report_generated"
MESSAGE_KIND = "supervisory_report"
ACTOR = "rebal:supervision"
_MIME = {"pdf": ("application", "pdf"), "csv": ("text", "csv"), "html": ("text", "html")}
ATTACHED = ("pdf", "csv")


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {fmt: hashlib.sha256(body).hexdigest() for fmt, body in sorted(files.items())}


def file_name(period: Period, fmt: str) -> str:
    return f"supervisory_report_{period.folder_name}.{fmt}"


def write_files(folder: Path, period: Period, files: dict[str, bytes]) -> dict[str, Path]:
    """Each format to `folder` (0700), atomically (a temporary dot-file as core/write_once.py names
    it, fsync, rename, the folder fsynced), 0600. A regenerated report replaces its files (the same
    bytes for a period that has ended)."""
    folder = private_dir(Path(folder))
    written = {}
    for fmt, body in sorted(files.items()):
        path = folder / file_name(period, fmt)
        tmp = temp_path(path)
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        with os.fdopen(descriptor, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, PRIVATE_FILE_MODE)
        os.replace(tmp, path)
        written[fmt] = path
    fsync_dir(folder)  # the new directory entries survive a crash too
    return written


# ---------------------------------------------------------------------------------------------
# The audit record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    event_id: str
    created: bool  # recorded by this call (False: it was recorded before)
    sha256: dict[str, str]  # what the chain holds for this period and set of formats
    matches: bool  # the bytes produced now are the ones recorded


def event_id_of(period: Period, formats) -> str:
    return f"supervisory_report:{period.key}:{'+'.join(sorted(formats))}"


def record_report(conn: Connection, report: SupervisoryReport, files: dict[str, bytes], now: datetime) -> Recorded:
    """The report's SHA-256s as one audit event, in the caller's transaction, once per period and
    set of formats."""
    digests = sha256s(files)
    event_id = event_id_of(report.period, files)
    payload = {"from": report.period.start, "to": report.period.end, "formats": sorted(files),
               "sha256": digests, "recommendations": len(report.recommendations),
               "decisions": len(report.decisions), "exceptions": len(report.exceptions),
               "chain_verified": report.chain.verified, "chain_head_seq": report.chain.head_seq,
               "chain_head_hash": report.chain.head_hash}
    created = audit.append(conn, event_id, EVENT_KIND, ACTOR, utc(now), report.period.key, payload)
    if created:
        return Recorded(event_id, True, digests, True)
    stored = conn.execute(select(audit_events.c.payload).where(audit_events.c.event_id == event_id)).scalar_one()
    recorded = json.loads(stored).get("sha256") or {}
    return Recorded(event_id, False, recorded, recorded == digests)


# ---------------------------------------------------------------------------------------------
# The email
# ---------------------------------------------------------------------------------------------


def message_key(period: Period, user_id: str) -> str:
    return f"{MESSAGE_KIND}:{period.key}:{user_id}"


def compliance_recipients(conn: Connection) -> list[dict]:
    """Every active compliance user, by user_id."""
    return [dict(r) for r in conn.execute(select(users.c.user_id, users.c.name, users.c.email).where(and_(
        users.c.role == "compliance", users.c.active)).order_by(users.c.user_id)).mappings()]


def report_email(report: SupervisoryReport, files: dict[str, bytes], *, sender: str, to: str, message_id: str,
                 recipient_name: str | None = None) -> EmailMessage:
    """The email to a compliance user: the figures in plain text, the PDF and the CSV attached."""
    from rebal_pipeline.supervision.render import view

    v = view(report)
    digests = sha256s(files)
    lines = [f"Dear {recipient_name}," if recipient_name else "Hello,", "",
             f"The supervisory review report for {v['period']} (New York time, {v['frequency']}) is attached "
             "as PDF and CSV.", ""]
    lines += [f"  {s['label']}: {s['value']}" for s in v["summary"]]
    lines += ["", "Outcomes at the end of the period:"]
    lines += [f"  {o['label']}: {o['count']}" for o in v["outcomes"]] or ["  none"]
    lines += ["", "Exceptions:"] + [f"  {e['label']}: {e['count']}" for e in v["exception_counts"]]
    lines += ["", f"Audit chain: {v['chain']['words']}", f"Anchor: {v['chain']['anchor']}", "",
              "SHA-256 of the report files (also recorded in the audit chain):"]
    lines += [f"  {file_name(report.period, fmt)}: {digest}" for fmt, digest in digests.items()]
    lines += ["", "-- ", "rebal supervision (an automated message)", ""]
    msg = EmailMessage()
    msg["Subject"] = (f"Supervisory review report {v['period_key']}: {len(report.recommendations)} recommendations, "
                      f"{len(report.exceptions)} exceptions")
    msg["From"] = sender
    msg["To"] = to
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Rebal-Reference"] = f"{MESSAGE_KIND}:{report.period.key}"
    msg.set_content("\n".join(lines), subtype="plain", charset="utf-8", cte="quoted-printable")
    for fmt in ATTACHED:
        if fmt in files:
            maintype, subtype = _MIME[fmt]
            # Base64 keeps the bytes (and the CSV's CRLF line ends) exactly as hashed.
            msg.add_attachment(files[fmt], maintype=maintype, subtype=subtype, filename=file_name(report.period, fmt),
                               params={"charset": "utf-8"} if maintype == "text" else None)
    # MIME boundaries from the Message-ID (the email package picks random ones): same input, same bytes.
    seed = hashlib.sha256(f"boundary\x00{message_id}".encode()).hexdigest()[:24]
    for number, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"==rebal-{seed}-{number}==")
    return msg


def email_report(store, report: SupervisoryReport, files: dict[str, bytes], comms, now: datetime
                 ) -> list[outbound.Delivery]:
    """Email the report to every active compliance user, once each (comms: a CommsSettings)."""
    with store.begin() as conn:
        recipients = compliance_recipients(conn)
    outcomes = []
    for person in recipients:
        def send(key: str, person=person) -> str:
            if not (person["email"] or "").strip():
                raise outbound.Permanent(f"no email address on file for {person['user_id']}")
            relay = comms.relay()
            return outbound.email_sender(lambda message_id: report_email(
                report, files, sender=relay.sender, to=person["email"], message_id=message_id,
                recipient_name=person["name"]), relay)(key)

        outcomes.append(outbound.deliver(store.begin, message_key(report.period, person["user_id"]), MESSAGE_KIND,
                                         "smtp", send, now, recipient_id=person["user_id"]))
    return outcomes


# ---------------------------------------------------------------------------------------------
# The whole production
# ---------------------------------------------------------------------------------------------


def default_folder(rebal_settings, period: Period) -> Path:
    """<REBAL_HOME>/outbox/supervision/<from>_<to>/ (copies for people, like the rest of outbox/)."""
    return Path(rebal_settings.rebal_home()) / "outbox" / "supervision" / period.folder_name


@dataclass(frozen=True)
class ReportRules:
    """What the report is measured against: the approval policy in force."""

    frequency: str
    review_window_hours: float
    micro_trade_limit: float


def report_rules(drift_policy, rebal_settings) -> ReportRules:
    """The policy's supervision frequency, and the review window and micro-trade limit of the
    approval clock (lifecycle.lifecycle_policy: the policy with REBAL_ESCALATION_HOURS on top)."""
    from rebal_pipeline.workflow.lifecycle import lifecycle_policy

    clock = lifecycle_policy(drift_policy, rebal_settings)
    return ReportRules(drift_policy.supervision.frequency, float(clock.escalation_hours),
                       float(clock.micro_trade_limit))


@dataclass(frozen=True)
class Produced:
    report: SupervisoryReport
    files: dict[str, Path]
    sha256: dict[str, str]
    recorded: Recorded
    deliveries: tuple[outbound.Delivery, ...] = ()


def produce(store, period: Period, *, out_dir: Path, now: datetime, review_window_hours: float = 48.0,
            micro_trade_limit: float = 5000.0, frequency: str | None = None, anchors: Path | None = None,
            wash_sale_overrides: Path | None = None, comms=None) -> Produced:
    """Build the period's report, write its three files, record their SHA-256s (once) and, with
    `comms` (a CommsSettings), email it to the compliance users (once each)."""
    with store.begin() as conn:
        report = build_report(conn, period, review_window_hours=review_window_hours,
                              micro_trade_limit=micro_trade_limit, anchors=anchors,
                              wash_sale_overrides=wash_sale_overrides, frequency=frequency)
    files = render_all(report)
    paths = write_files(out_dir, period, files)
    with store.begin() as conn:
        recorded = record_report(conn, report, files, now)
    deliveries = tuple(email_report(store, report, files, comms, now)) if comms is not None else ()
    return Produced(report, paths, sha256s(files), recorded, deliveries)
