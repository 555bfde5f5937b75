"""Sending each outbound message once: the outbox protocol over `wf_messages` (no Dagster here).

Every email and CRM call rebal makes has a deterministic message key, e.g.

    alert:<recommendation_id>:<advisor_id>      the advisor's alert                (smtp)
    crm_task:<recommendation_id>                 the CRM task for the pending approval (crm)
    <notification_key>                           reminder / escalation / weekly digest (smtp)
    confirmation:<decision_id>:<account_id>      the client's confirmation            (smtp)
    crm_note:<decision_id>                       the CRM note after execution         (crm)

and `deliver()` moves its row in `wf_messages` through

    (no row) ──claim──▶ pending ──peer accepted──▶ sent                       (final: never sent again)
                          │  ╰──peer refused for good──▶ rejected           (final: a person decides)
                          ╰──peer unreachable / busy──▶ retry ──due──▶ pending (claimed again)
    pending whose lease ran out (the sender crashed mid-send) ──claim──▶ pending (sent again, same identity)

1. **claim** (one transaction): insert the key as `pending`, or take over a `retry` row that is
   due or a `pending` row whose lease has run out; `attempts` + 1, `next_attempt_at` = now + lease.
   A `sent` or `rejected` row is never claimed; a `pending` row inside its lease is another
   sender's attempt in flight (`in_flight`), a `retry` row not yet due is left alone (`not_due`).
   The claim is a conditional update on the attempts count read, so of two concurrent claimers one wins.
2. **send**, outside any transaction: `send_fn(message_key)` builds the message and hands it to
   the peer with an identity derived from the key only — the email's Message-ID
   (`smtp.make_message_id(key, domain)`, see `email_sender`) or the CRM's Idempotency-Key
   (`crm.idempotency_key(operation, key)`, the CRM clients derive it from the key they are given).
3. **record** (one transaction): `sent` with the external id (Message-ID, CRM record id) and the
   audit event `<kind>_sent:<key>`; or `retry` with `next_attempt_at` (exponential backoff,
   capped, at least the peer's Retry-After) and `last_error` in plain words, audit event
   `<kind>_retry:<key>:<attempt>`; or `rejected` with audit event `<kind>_rejected:<key>`.
   Audit payloads carry ids only (message key, recipient and recommendation ids, Message-ID / CRM
   id, attempts, the error in plain words): never a name, an address or an amount.

Delivery guarantee: **at least once on the wire, effectively once for the recipient.** A crash
after the peer accepted and before step 3 committed leaves the row `pending`; once its lease
runs out the next claim sends it again — with the same Message-ID / Idempotency-Key, so the CRM
creates nothing new and mail stores and clients recognise the duplicate by its Message-ID. No
protocol can do better over SMTP (which has no idempotent send); what this one guarantees is
that a `sent` row is never sent again, that a message is never silently lost (every row ends
`sent` or `rejected`, or is still to be retried), and that each send of a key is the same message.

Errors, classified by `classify`:
- retry (transient): `CrmUnavailable`; socket errors, timeouts, TLS failures (`OSError`); SMTP 4xx
  replies; a relay that disconnects; our own configuration problems (login refused, STARTTLS
  missing, `SmtpConfigError`) — they are fixed on our side, after which the queued messages go
  out by themselves; `Transient` (raised by a send function, e.g. the warehouse is busy).
- rejected (permanent): `CrmRejected` (the CRM refused this call); SMTP 5xx for the recipients
  or the data (no such mailbox, message refused); `Permanent` (raised by a send function, e.g.
  no email address on file); and any message still failing after `max_attempts`.
- anything else is unexpected (a bug): recorded as retry like a transient error (whether the
  peer got the message is unknown, so a re-send with the same identity is right) and flagged
  `unexpected` on the result, so that the run reporting it can fail visibly.

`withdraw` ends a row that is no longer wanted (e.g. the recommendation was decided before its
alert could go out) as `rejected` with the reason; `requeue` puts a rejected row back for a retry
after a person fixed the cause; `record_skipped` writes the audit event of a message deliberately
not sent (e.g. no CRM is configured) without a row, so nothing ever retries it.
"""

from __future__ import annotations

import logging
import smtplib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Callable, Literal

from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.comms import smtp
from rebal_pipeline.comms.crm import CrmRejected, CrmUnavailable
from rebal_pipeline.comms.keys import key_for_people
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import messages
from rebal_pipeline.core.clock import utc as _utc

log = logging.getLogger("rebal.comms.outbound")

Channel = Literal["smtp", "crm"]
ConnFactory = Callable[[], AbstractContextManager[Connection]]
# Called with the message key; hands the message to the peer and returns the peer's id of it
# (the email's Message-ID, the CRM's record id) or None when the peer answers none.
SendFn = Callable[[str], "str | None"]

CHANNELS = ("smtp", "crm")
# wf_messages.message_key holds 200; audit event ids (200) add "<kind>_<event>:" and ":<attempt>".
MAX_KEY_CHARS = 160
ACTORS = {"smtp": "rebal:mailer", "crm": "rebal:crm"}


class Transient(Exception):
    """Raised by a send function: not now, try again later (the message is plain words, no PII)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(Exception):
    """Raised by a send function: this message can never be sent as it is (plain words, no PII)."""


@dataclass(frozen=True)
class OutboundPolicy:
    """Backoff between attempts: first_retry × 2^(attempt-1), at most max_retry (and at least
    the peer's Retry-After, within max_retry). lease: how long a claimed attempt may take before
    another sender may take it over (the SMTP and CRM clients give up well within it)."""

    first_retry: timedelta = timedelta(minutes=5)
    max_retry: timedelta = timedelta(hours=6)
    lease: timedelta = timedelta(minutes=15)
    # 5 min, 10, 20, … then every 6 h: 20 attempts is about four days of trying.
    max_attempts: int = 20

    def __post_init__(self):
        if self.first_retry <= timedelta(0) or self.max_retry < self.first_retry or self.lease <= timedelta(0):
            raise ValueError("OutboundPolicy: positive first_retry and lease, max_retry ≥ first_retry")
        if self.max_attempts < 1:
            raise ValueError("OutboundPolicy: max_attempts ≥ 1")

    def backoff(self, attempts: int, retry_after: float | None = None) -> timedelta:
        wait = self.first_retry * (2 ** min(max(attempts - 1, 0), 30))
        if retry_after:
            wait = max(wait, timedelta(seconds=retry_after))
        return min(wait, self.max_retry)


DEFAULT_POLICY = OutboundPolicy()

Status = Literal["sent", "already_sent", "retry", "rejected", "in_flight", "not_due"]


@dataclass(frozen=True)
class Delivery:
    """What `deliver` did with a message key.

    status: sent (by this call) | already_sent (an earlier call sent it: nothing was sent now) |
    retry (failed now or earlier; next_attempt_at says when) | rejected (final) |
    in_flight (another sender's attempt holds the lease) | not_due (a retry waits for its time)."""

    message_key: str
    kind: str
    channel: str
    status: Status
    attempts: int
    external_id: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    unexpected: bool = False  # the failure was not a known transient or permanent one: a bug to look at

    @property
    def sent_now(self) -> bool:
        return self.status == "sent"


@dataclass(frozen=True)
class Failure:
    outcome: Literal["retry", "rejected"]
    reason: str  # plain words, no PII, no secrets
    retry_after: float | None = None
    unexpected: bool = False


# ---------------------------------------------------------------------------------------------
# Classification of failures
# ---------------------------------------------------------------------------------------------


def classify(exc: BaseException) -> Failure:
    """Retry or reject, with the reason in plain words (never the peer's free text, which may
    echo an address, nor a secret)."""
    if isinstance(exc, Transient):
        return Failure("retry", str(exc), exc.retry_after)
    if isinstance(exc, Permanent):
        return Failure("rejected", str(exc))
    if isinstance(exc, CrmUnavailable):
        # CrmError messages name the CRM style, the operation, the attempts and the HTTP status.
        return Failure("retry", f"the CRM is unavailable: {exc}", exc.retry_after)
    if isinstance(exc, CrmRejected):
        return Failure("rejected", f"the CRM refused the call: {exc}")
    if isinstance(exc, smtp.SmtpConfigError):
        return Failure("retry", f"the SMTP settings are not usable: {exc}")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _text in exc.recipients.values()})
        if codes and all(500 <= c < 600 for c in codes):
            return Failure("rejected", f"the mail relay refused the recipient (SMTP {', '.join(map(str, codes))})")
        return Failure("retry", f"the mail relay deferred the recipient (SMTP {', '.join(map(str, codes))})")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return Failure("retry", f"the mail relay refused our login (SMTP {exc.smtp_code}): "
                                "check REBAL_SMTP_USERNAME / REBAL_SMTP_PASSWORD")
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return Failure("retry", f"the mail relay refused the sender address (SMTP {exc.smtp_code}): "
                                "check REBAL_SMTP_FROM")
    if isinstance(exc, smtplib.SMTPDataError) and 500 <= exc.smtp_code < 600:
        return Failure("rejected", f"the mail relay refused the message (SMTP {exc.smtp_code})")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Failure("retry", "the mail relay does not offer STARTTLS (required by REBAL_SMTP_STARTTLS)")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Failure("retry", "the mail relay closed the connection")
    if isinstance(exc, smtplib.SMTPResponseException):
        return Failure("retry", f"the mail relay answered SMTP {exc.smtp_code}")
    if isinstance(exc, smtplib.SMTPException):
        return Failure("retry", f"SMTP error ({type(exc).__name__})")
    if isinstance(exc, OSError):  # refused, reset, timed out, name resolution, TLS verification
        return Failure("retry", f"could not reach the peer ({type(exc).__name__})")
    return Failure("retry", f"unexpected {type(exc).__name__} while sending (see the run's log)", unexpected=True)


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


def _row(conn: Connection, message_key: str, lock: bool = False):
    query = select(messages).where(messages.c.message_key == message_key)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).mappings().first()


def _result(row, status: Status, **extra) -> Delivery:
    values = dict(message_key=row["message_key"], kind=row["kind"], channel=row["channel"], status=status,
                  attempts=row["attempts"], external_id=row["external_id"], error=row["last_error"],
                  next_attempt_at=_utc(row["next_attempt_at"]) if row["next_attempt_at"] else None)
    values.update(extra)
    return Delivery(**values)


def _audit(conn: Connection, event: str, row: dict, now: datetime, **payload) -> None:
    """`<kind>_<event>` with ids only."""
    body = {"message_key": row["message_key"], "channel": row["channel"], "recipient_id": row["recipient_id"],
            "recommendation_id": row["recommendation_id"], **payload}
    suffix = f":{payload['attempts']}" if event == "retry" else ""
    audit.append(conn, f"{row['kind']}_{event}:{row['message_key']}{suffix}", f"{row['kind']}_{event}",
                 ACTORS.get(row["channel"], "rebal:outbound"), now,
                 row["recommendation_id"] or row["recipient_id"] or row["message_key"], body)


def claim(conn: Connection, message_key: str, kind: str, channel: str, now: datetime, *,
          recipient_id: str | None = None, recommendation_id: str | None = None,
          policy: OutboundPolicy = DEFAULT_POLICY) -> tuple[bool, Delivery]:
    """Step 1, in the caller's transaction: (True, the claimed attempt) or (False, why not)."""
    now = _utc(now)
    lease_end = now + policy.lease
    row = _row(conn, message_key, lock=True)
    if row is None:
        fresh = dict(message_key=message_key, kind=kind, channel=channel, recipient_id=recipient_id,
                     recommendation_id=recommendation_id, status="pending", attempts=1, created_at=now,
                     next_attempt_at=lease_end, external_id=None, last_error=None)
        try:
            with conn.begin_nested():
                conn.execute(insert(messages).values(**fresh))
        except IntegrityError:  # a concurrent sender inserted it first: theirs is in flight
            row = _row(conn, message_key)
            return False, _result(row, "in_flight")
        return True, _result(fresh, "pending")  # type: ignore[arg-type]
    if (row["kind"], row["channel"]) != (kind, channel):
        raise ValueError(f"message key {message_key} is a {row['kind']}/{row['channel']} message, "
                         f"not {kind}/{channel}")
    status = row["status"]
    if status == "sent":
        return False, _result(row, "already_sent")
    if status == "rejected":
        return False, _result(row, "rejected")
    due = row["next_attempt_at"] is None or _utc(row["next_attempt_at"]) <= now
    if not due:
        return False, _result(row, "in_flight" if status == "pending" else "not_due")
    taken = conn.execute(update(messages).where(and_(
        messages.c.message_key == message_key, messages.c.status == status,
        messages.c.attempts == row["attempts"])).values(
        status="pending", attempts=row["attempts"] + 1, next_attempt_at=lease_end))
    if taken.rowcount != 1:
        return False, _result(row, "in_flight")
    if status == "pending":
        log.warning("message %s: the attempt %d did not finish within its lease; sending again with the same "
                    "identity", key_for_people(message_key), row["attempts"])
    return True, _result(row, "pending", attempts=row["attempts"] + 1, next_attempt_at=lease_end)


def record_sent(conn: Connection, message_key: str, external_id: str | None, now: datetime) -> Delivery:
    """Step 3 after success: sent, with the peer's id and the audit event (idempotent)."""
    now = _utc(now)
    row = _row(conn, message_key, lock=True)
    if row["status"] != "sent":
        conn.execute(update(messages).where(messages.c.message_key == message_key).values(
            status="sent", external_id=external_id, sent_at=now, next_attempt_at=None, last_error=None))
        row = _row(conn, message_key)
        _audit(conn, "sent", row, now, external_id=external_id, attempts=row["attempts"])
    return _result(row, "sent")


def record_failure(conn: Connection, message_key: str, attempt: int, failure: Failure, now: datetime,
                   policy: OutboundPolicy = DEFAULT_POLICY) -> Delivery:
    """Step 3 after a failure: retry (with the next attempt's time) or rejected, with the audit
    event. Ignored (the current state returned) when the row moved on meanwhile: sent by another
    sender, or claimed again after this attempt's lease ran out."""
    now = _utc(now)
    row = _row(conn, message_key, lock=True)
    if row["status"] != "pending" or row["attempts"] != attempt:
        moved_on = {"sent": "already_sent", "pending": "in_flight"}
        return _result(row, moved_on.get(row["status"], row["status"]))
    outcome, reason = failure.outcome, failure.reason
    if outcome == "retry" and attempt >= policy.max_attempts:
        outcome, reason = "rejected", f"gave up after {attempt} attempts; the last one failed: {reason}"
    if outcome == "retry":
        next_at = now + policy.backoff(attempt, failure.retry_after)
        conn.execute(update(messages).where(messages.c.message_key == message_key).values(
            status="retry", last_error=reason, next_attempt_at=next_at))
        row = _row(conn, message_key)
        _audit(conn, "retry", row, now, attempts=attempt, error=reason, next_attempt_at=next_at)
        log.warning("message %s (%s): attempt %d failed, retry at %s: %s", key_for_people(message_key), row["kind"],
                    attempt, next_at.isoformat(), reason)
        return _result(row, "retry", unexpected=failure.unexpected)
    conn.execute(update(messages).where(messages.c.message_key == message_key).values(
        status="rejected", last_error=reason, next_attempt_at=None))
    row = _row(conn, message_key)
    _audit(conn, "rejected", row, now, attempts=attempt, error=reason)
    log.error("message %s (%s): rejected after attempt %d: %s", key_for_people(message_key), row["kind"], attempt,
              reason)
    return _result(row, "rejected", unexpected=failure.unexpected)


def deliver(conn_factory: ConnFactory, message_key: str, kind: str, channel: Channel, send_fn: SendFn,
            now: datetime, *, recipient_id: str | None = None, recommendation_id: str | None = None,
            policy: OutboundPolicy = DEFAULT_POLICY) -> Delivery:
    """Claim → send → record (see the module docstring). conn_factory opens one transaction
    (e.g. `store.begin`); it is entered twice, never held while the peer is called.
    Never raises for a failed send: the outcome is in the returned Delivery."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, not {channel!r}")
    if not message_key or len(message_key) > MAX_KEY_CHARS:
        raise ValueError(f"a message key is required (at most {MAX_KEY_CHARS} characters)")
    with conn_factory() as conn:
        claimed, attempt = claim(conn, message_key, kind, channel, now, recipient_id=recipient_id,
                                 recommendation_id=recommendation_id, policy=policy)
    if not claimed:
        log.info("message %s (%s): %s, nothing sent", key_for_people(message_key), kind,
                 attempt.status.replace("_", " "))
        return attempt
    try:
        external_id = send_fn(message_key)
    except Exception as exc:  # noqa: BLE001 — every failure is recorded; none leaves the row in limbo
        failure = classify(exc)
        if failure.unexpected:
            log.exception("message %s (%s): unexpected failure on attempt %d", key_for_people(message_key), kind,
                          attempt.attempts)
        with conn_factory() as conn:
            return record_failure(conn, message_key, attempt.attempts, failure, now, policy)
    with conn_factory() as conn:
        done = record_sent(conn, message_key, None if external_id is None else str(external_id), now)
    log.info("message %s (%s) sent on attempt %d as %s", key_for_people(message_key), kind, attempt.attempts,
             done.external_id)
    return done


# ---------------------------------------------------------------------------------------------
# Rows ended or restarted by decision, and messages deliberately not sent
# ---------------------------------------------------------------------------------------------


def withdraw(conn: Connection, message_key: str, reason: str, now: datetime) -> bool:
    """End an unsent row that is no longer wanted (rejected, last_error "withdrawn: <reason>").
    False when there is no such row or it was sent already."""
    now = _utc(now)
    row = _row(conn, message_key, lock=True)
    if row is None or row["status"] in ("sent", "rejected"):
        return False
    conn.execute(update(messages).where(messages.c.message_key == message_key).values(
        status="rejected", last_error=f"withdrawn: {reason}", next_attempt_at=None))
    _audit(conn, "withdrawn", dict(row), now, attempts=row["attempts"], reason=reason)
    return True


def requeue(conn: Connection, message_key: str, actor: str, now: datetime) -> bool:
    """Put a rejected row back for a retry now (a person fixed the cause: the address, the CRM
    contact, the credentials). Recorded as `<kind>_requeued` by `actor`."""
    now = _utc(now)
    row = _row(conn, message_key, lock=True)
    if row is None or row["status"] != "rejected":
        return False
    conn.execute(update(messages).where(messages.c.message_key == message_key).values(
        status="retry", next_attempt_at=now))
    audit.append(conn, f"{row['kind']}_requeued:{message_key}:{row['attempts']}", f"{row['kind']}_requeued", actor,
                 now, row["recommendation_id"] or row["recipient_id"] or message_key,
                 {"message_key": message_key, "attempts": row["attempts"], "previous_error": row["last_error"]})
    return True


def record_skipped(conn: Connection, message_key: str, kind: str, reason: str, now: datetime, *,
                   recommendation_id: str | None = None, recipient_id: str | None = None) -> bool:
    """The audit event of a message deliberately not sent (no row: nothing will retry it)."""
    return audit.append(conn, f"{kind}_skipped:{message_key}", f"{kind}_skipped", "rebal:outbound", _utc(now),
                        recommendation_id or recipient_id or message_key,
                        {"message_key": message_key, "reason": reason, "recipient_id": recipient_id,
                         "recommendation_id": recommendation_id})


def due(conn: Connection, now: datetime, limit: int = 500) -> list[dict]:
    """Rows a retry sensor should hand back to their jobs: `retry` rows whose time has come and
    `pending` rows whose lease ran out (their sender crashed mid-send). Oldest first."""
    now = _utc(now)
    rows = conn.execute(select(messages).where(and_(
        messages.c.status.in_(("retry", "pending")), messages.c.next_attempt_at <= now))
        .order_by(messages.c.next_attempt_at, messages.c.message_key).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


# ---------------------------------------------------------------------------------------------
# Send functions
# ---------------------------------------------------------------------------------------------


def sender_domain(settings: smtp.SmtpSettings) -> str:
    """The domain of the From address: the right-hand side of every Message-ID rebal makes."""
    address = parseaddr(settings.sender)[1]
    if "@" not in address:
        raise smtp.SmtpConfigError("REBAL_SMTP_FROM must be an address like alerts@example-ria.com")
    return address.rsplit("@", 1)[1]


def email_sender(build: Callable[[str], EmailMessage], settings: smtp.SmtpSettings) -> SendFn:
    """A send function for an email: `build(message_id)` renders it with the Message-ID derived
    from the message key; it goes out through the relay; the Message-ID is the external id."""

    def send(message_key: str) -> str:
        message_id = smtp.make_message_id(message_key, sender_domain(settings))
        return smtp.send(build(message_id), settings)

    return send
