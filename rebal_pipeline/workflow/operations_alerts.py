"""Operations alerts: something the operations team has to act on — a custodian's files are late,
an OAuth custodian connection needs to be re-authorized, … — recorded once and emailed once.

`raise_operations_alert` records the alert in the caller's transaction: a `wf_notifications` row
(kind "operations_alert", the caller's deterministic key, unique) and an audit event. The
detection that calls it (a sensor, a connection run) may see the same problem on every tick; the
unique key makes the second and later calls write nothing. Emailing is not done here: the
`operations_alerts` sensor (defs/comms/sensors.py) finds recorded alerts with no wf_messages row
and launches `send_notification`, which emails the operations team through the outbox
(comms/outbound.py), exactly once, retried when the relay is down.

Keys are chosen by the caller, by convention `<alert>:<connection>:<date>` (e.g.
`feed_late:schwab-main:2026-11-20`): one alert per problem and day. What an alert carries
(summary, connection, as-of date, details) goes into an email and the audit chain: account ids
and plain words only, never a secret (token, password, key) or client PII.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy import Connection, and_, insert, select
from sqlalchemy.exc import IntegrityError

# SQLite hands DateTime(timezone=True) back naive; the store writes UTC (core/clock.py).
from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import notifications, users

KIND = "operations_alert"
ACTOR = "rebal:operations"
# Whom to send to when no operations user is on file yet (wf_notifications.recipient_id is required).
FALLBACK_RECIPIENT = "operations"
# The key is also the email's message key in wf_messages (comms/outbound.py MAX_KEY_CHARS).
MAX_KEY_CHARS = 160
# The alert code is the audit event's kind (wf_audit_events.kind holds 48 characters).
_ALERT_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


@dataclass(frozen=True)
class OperationsAlert:
    """A recorded operations alert, as the mailer reads it back."""

    key: str
    alert: str
    summary: str
    recipient_id: str
    created_at: datetime
    connection: str | None = None
    as_of: date | None = None
    details: dict = field(default_factory=dict)


def operations_recipient(conn: Connection) -> str | None:
    """The operations user who receives operations alerts: the first active one by user_id."""
    return conn.execute(select(users.c.user_id).where(and_(users.c.role == "operations", users.c.active))
                        .order_by(users.c.user_id).limit(1)).scalar()


def raise_operations_alert(conn: Connection, *, key: str, alert: str, summary: str, details: dict, now: datetime,
                           connection: str | None = None, as_of: date | None = None) -> bool:
    """Record an operations alert once: a `notifications` row (kind "operations_alert",
    notification_key=key, recipient = the first active user with role "operations" ordered by
    user_id, else "operations"), payload = canonical JSON of {alert, summary, connection, as_of,
    details}, and an audit event (event type = alert, e.g. "feed_late", actor "rebal:operations").
    Returns False (and writes nothing) if the key was already recorded. `conn` is a SQLAlchemy
    Connection inside a transaction.

    alert: a short code ("feed_late", "reauthorization_needed"), lower case; summary: one plain
    sentence for a human (no secrets, no PII beyond account ids); details: JSON-able values
    (dates allowed), shown as a small table in the email."""
    if not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"an operations alert needs a key of 1 to {MAX_KEY_CHARS} characters")
    if not _ALERT_CODE.match(alert or ""):
        raise ValueError(f"alert must be a short lower-case code like 'feed_late', not {alert!r}")
    # One line: the summary becomes the email's subject, where a line break is not allowed.
    summary = " ".join((summary or "").split())
    if not summary:
        raise ValueError("an operations alert needs a summary")
    now = _utc(now)
    recipient = operations_recipient(conn)
    body = {"alert": alert, "summary": summary, "connection": connection, "as_of": as_of, "details": details or {}}
    payload = audit.canonical_json(body)  # also refuses details that are not JSON-able, before writing
    try:
        # A savepoint: a duplicate key undoes only this insert, not the caller's transaction.
        with conn.begin_nested():
            conn.execute(insert(notifications).values(
                notification_key=key, kind=KIND, recommendation_id=None,
                recipient_id=recipient or FALLBACK_RECIPIENT, created_at=now, payload=payload))
    except IntegrityError:
        return False
    audit.append(conn, f"{KIND}:{key}", alert, ACTOR, now, connection or key, {**body, "recipient": recipient})
    return True


def read_operations_alert(conn: Connection, key: str) -> OperationsAlert | None:
    """The recorded alert with this key; None when the key is not an operations alert."""
    row = conn.execute(select(notifications).where(and_(
        notifications.c.notification_key == key, notifications.c.kind == KIND))).mappings().first()
    if row is None:
        return None
    body = json.loads(row["payload"])
    return OperationsAlert(
        key=row["notification_key"], alert=body["alert"], summary=body["summary"], recipient_id=row["recipient_id"],
        created_at=_utc(row["created_at"]), connection=body.get("connection"),
        as_of=date.fromisoformat(body["as_of"]) if body.get("as_of") else None, details=body.get("details") or {})
