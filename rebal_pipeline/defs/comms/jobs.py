"""Runs launched by the comms sensors: each sends what one subject owes, once (issue #6).

    send_advisor_alert     the advisor's alert for one pending recommendation (email with the
                           package, drift chart, masked accounts and signed one-click links) and
                           a CRM task for the pending approval
    send_notification      one reminder, escalation or weekly digest recorded in the workflow
                           store by the approval runs (wf_notifications: who, which
                           recommendations, when), or one operations alert (wf_notifications, kind
                           operations_alert: workflow/operations_alerts.py) to the operations team.
                           The store is the hand-off: the copy the approval run writes under
                           outbox/notifications/ is for people and is never read here (issue #12)
    communicate_execution  after a decision's orders are all done (wf_submissions): the client
                           confirmation per account and the CRM note (date, rationale, trades)

Every message goes through `comms.outbound.deliver` under a deterministic key (listed there), so
a run re-executed, a retry launched by `outbound_retries`, or two ticks asking for the same thing
send nothing twice: a `sent` key is never sent again, and a re-send after a crash carries the same
Message-ID / Idempotency-Key. A peer that is down never fails a run and never blocks anything
else: the message is left `retry` in wf_messages and the `outbound_retries` sensor hands it back
to its job when it is due. A run fails only for what nobody can retry (no such recommendation /
decision / recorded notification / operations alert, orders not all done) or for an unexpected error (a
bug), after recording it.

What the messages need beyond the workflow store is read when they are rendered, inside the send
(so a busy warehouse makes a retry, not a lost message): client names and email addresses from
the warehouse (`stg_feed_accounts`, the latest row of each account) — client PII is used to
address and fill the email and never goes to a log, an audit event or a run's metadata.

Environment (read by the run, at send time):

| variable | default | meaning |
|---|---|---|
| `REBAL_SMTP_*` | — | the relay (comms/smtp.py: host, port, STARTTLS, login, From) |
| `REBAL_LINK_SECRET` | — (required for alerts, reminders, escalations, digests) | signs the one-click links (≥ 32 bytes, the approval API's secret) |
| `REBAL_PUBLIC_URL` | `http://127.0.0.1:8000` | the approval API as advisors reach it; links are `<url>/links/<token>` |
| `REBAL_LINK_TTL_HOURS` | `72` | how long a link in an email stays valid, from the message's first attempt |
| `REBAL_CLIENT_CONFIRMATION` | `simple` | `simple` or `detailed` (the trades, at the package's estimated prices) |
| `REBAL_FIRM_NAME` | the From display name | the firm's name in client confirmations |
| `REBAL_CRM` | from which CRM is configured | `wealthbox`, `redtail` or `none` |
| `REBAL_WEALTHBOX_*` / `REBAL_REDTAIL_*` | — | the CRM connection (comms/crm.py); none set = no CRM, tasks and notes are skipped (audit event `<kind>_skipped`), not an error |
| `REBAL_CRM_MAX_ATTEMPTS` | `5` | attempts within one run before the note/task is left for `outbound_retries` |

Link identity: the link ids in an email are derived (HMAC with the link secret) from the message
key and the action, and the expiry from the message's first attempt, so a re-sent email carries
the same links as the first one — a duplicate on the wire is the same message in every byte that
matters. Each link is still single-use at the API.
"""


import base64
import hashlib
import hmac
import json
import logging
import os
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Callable

import duckdb
from dagster import Config, Failure, MetadataValue, OpExecutionContext, Output, job, op
from pydantic import Field
from sqlalchemy import and_, func, or_, select

from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.comms import emails, outbound, smtp
from rebal_pipeline.comms.chart import class_label
from rebal_pipeline.comms.crm import RedtailStyleClient, RetryPolicy, WealthboxStyleClient
from rebal_pipeline.comms.keys import alert_key, confirmation_key, crm_note_key, crm_task_key
from rebal_pipeline.comms.outbound import Delivery, Permanent, Transient
from rebal_pipeline.core.clock import run_time, utc as _utc
from rebal_pipeline.core.pii import mask_account
from rebal_pipeline.resources import Warehouse, WorkflowStoreResource
from rebal_pipeline.workflow import authority, operations_alerts
from rebal_pipeline.workflow.operations_alerts import OperationsAlert
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import decisions, messages, notifications, recommendations, submissions, users
from rebal_pipeline.workflow.store import WorkflowStore

log = logging.getLogger("rebal.comms.jobs")

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
# Recorded by the approval runs in wf_notifications (defs/approvals/jobs.py notify_recommendation).
OUTBOX_KINDS = ("reminder", "escalation", "weekly_digest")
OPERATIONS_ALERT = operations_alerts.KIND
# Everything send_notification sends, under its notification key.
NOTIFICATION_KINDS = (*OUTBOX_KINDS, OPERATIONS_ALERT)
CONFIRMATION_STYLES = ("simple", "detailed")
# Recommendation states in which a reminder / escalation / digest is still worth sending. An
# operations alert is about no recommendation: it is always still due, never skipped.
STILL_WAITING = {"reminder": ("pending", "deferred"), "escalation": ("escalated", "pending", "deferred"),
                 "weekly_digest": ("pending", "deferred")}


# ---------------------------------------------------------------------------------------------
# Settings from the environment (read at send time: a fix to the environment applies to retries)
# ---------------------------------------------------------------------------------------------


def smtp_settings() -> smtp.SmtpSettings:
    return smtp.SmtpSettings.from_env()


def link_secret() -> bytes:
    raw = os.environ.get("REBAL_LINK_SECRET", "").encode("utf-8")
    if len(raw) < link_tokens.MIN_SECRET_BYTES:
        # Fixed on our side, after which the queued emails go out: a retry, not a rejection.
        raise Transient(f"REBAL_LINK_SECRET is not set to a secret of at least {link_tokens.MIN_SECRET_BYTES} "
                        "bytes: the one-click links cannot be signed")
    return raw


def public_url() -> str:
    return (os.environ.get("REBAL_PUBLIC_URL") or DEFAULT_PUBLIC_URL).rstrip("/")


def link_ttl() -> timedelta:
    raw = os.environ.get("REBAL_LINK_TTL_HOURS", "").strip()
    try:
        hours = float(raw) if raw else 72.0
    except ValueError:
        raise Transient(f"REBAL_LINK_TTL_HOURS={raw!r} is not a number of hours") from None
    if hours <= 0:
        raise Transient("REBAL_LINK_TTL_HOURS must be positive")
    return timedelta(hours=hours)


def confirmation_style() -> str:
    style = (os.environ.get("REBAL_CLIENT_CONFIRMATION") or "simple").strip().lower()
    if style not in CONFIRMATION_STYLES:
        raise Transient(f"REBAL_CLIENT_CONFIRMATION must be simple or detailed, not {style!r}")
    return style


def firm_name(smtp_from: str) -> str:
    """REBAL_FIRM_NAME, else the display name of the From address, else its domain."""
    name = (os.environ.get("REBAL_FIRM_NAME") or "").strip()
    if name:
        return name
    display, address = parseaddr(smtp_from)
    return display.strip() or address.rsplit("@", 1)[-1]


CrmClient = WealthboxStyleClient | RedtailStyleClient
_CRM_MARKERS = ("REBAL_WEALTHBOX_BASE_URL", "REBAL_REDTAIL_BASE_URL")


def crm_style(environ: dict | None = None) -> str | None:
    """Which CRM is configured: REBAL_CRM (wealthbox | redtail | none), else the one whose base URL
    is set; None when none is. Both set without REBAL_CRM is ambiguous: an error (retried)."""
    env = os.environ if environ is None else environ
    chosen = (env.get("REBAL_CRM") or "").strip().lower()
    if chosen in ("none", "off"):
        return None
    if chosen:
        if chosen not in ("wealthbox", "redtail"):
            raise Transient(f"REBAL_CRM must be wealthbox, redtail or none, not {chosen!r}")
        return chosen
    present = [m for m in _CRM_MARKERS if env.get(m)]
    if len(present) > 1:
        raise Transient("both REBAL_WEALTHBOX_BASE_URL and REBAL_REDTAIL_BASE_URL are set: choose one with REBAL_CRM")
    if not present:
        return None
    return "wealthbox" if present[0] == "REBAL_WEALTHBOX_BASE_URL" else "redtail"


def crm_from_env(environ: dict | None = None) -> CrmClient | None:
    """The configured CRM client (None: no CRM). Its in-run retries are bounded by
    REBAL_CRM_MAX_ATTEMPTS (default 5); beyond them the outbox retries later."""
    env = os.environ if environ is None else environ
    style = crm_style(env)
    if style is None:
        return None
    raw = (env.get("REBAL_CRM_MAX_ATTEMPTS") or "").strip()
    try:
        retry = RetryPolicy(max_attempts=int(raw)) if raw else RetryPolicy()
    except ValueError:
        raise Transient(f"REBAL_CRM_MAX_ATTEMPTS={raw!r} is not a whole number ≥ 1") from None
    try:
        if style == "wealthbox":
            return WealthboxStyleClient.from_env(env, retry=retry)
        return RedtailStyleClient.from_env(env, retry=retry)
    except ValueError as exc:  # missing or malformed settings; the messages name variables, never values
        raise Transient(f"the {style} CRM settings are not usable: {exc}") from None


def crm_configured() -> bool:
    """A CRM is meant to be used (even if its settings turn out to be broken: then it is retried)."""
    try:
        return crm_style() is not None
    except Transient:
        return True


# ---------------------------------------------------------------------------------------------
# Reading what the messages need
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientContact:
    account_id: str
    household_id: str | None
    client_name: str | None
    client_email: str | None
    confirmation_style: str | None = None  # the household's setting (households.csv), None = firm default


_CONTACTS = """
select a.account_id, a.household_id, a.client_name, a.client_email, h.confirmation_style
from stg_feed_accounts a
left join stg_feed_households h on h.household_id = a.household_id and h.as_of = a.as_of
where list_contains($accounts, a.account_id)
qualify row_number() over (partition by a.account_id order by a.as_of desc) = 1
"""


def client_contacts(warehouse: Warehouse, account_ids: list[str]) -> dict[str, ClientContact]:
    """The latest client name and email of each account (stg_feed_accounts). PII: never logged."""
    if not Path(warehouse.database).exists():
        raise Transient("the warehouse has no stg_feed_accounts table yet: the daily scan has not run on it")
    try:
        # Read-only: alert and confirmation runs read side by side (they are not in the warehouse
        # pool); while a pooled run writes, the open fails and the message is retried.
        with warehouse.connect(read_only=True) as con:
            rows = con.execute(_CONTACTS, {"accounts": list(account_ids)}).fetchall()
    except duckdb.CatalogException:
        raise Transient("the warehouse has no stg_feed_accounts table yet: the daily scan has not run on it") from None
    except duckdb.Error as exc:  # e.g. the daily run holds the file's write lock
        raise Transient(f"the warehouse cannot be read now ({type(exc).__name__})") from None
    return {r[0]: ClientContact(r[0], r[1], r[2], r[3], r[4]) for r in rows}


def client_name_of(contacts: dict[str, ClientContact], account_ids: list[str]) -> str:
    """The client(s) of the accounts as the advisor knows them ("A & B" for a household held by
    two people)."""
    names = sorted({c.client_name.strip() for a in account_ids if (c := contacts.get(a)) and c.client_name
                    and c.client_name.strip()})
    return " & ".join(names) if names else "(client name not on file)"


def _recommendation(conn, recommendation_id: str) -> dict | None:
    row = conn.execute(select(recommendations).where(recommendations.c.recommendation_id == recommendation_id)
                       ).mappings().first()
    return dict(row) if row else None


def _user(conn, user_id: str | None) -> dict | None:
    if not user_id:
        return None
    row = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().first()
    return dict(row) if row else None


def _message(conn, message_key: str) -> dict | None:
    row = conn.execute(select(messages).where(messages.c.message_key == message_key)).mappings().first()
    return dict(row) if row else None


def signed_links(secret: bytes, message_key: str, recommendation_id: str, user_id: str, issued_at: datetime,
                 actions: tuple[str, ...]) -> dict[str, str]:
    """The one-click links of one email: `<REBAL_PUBLIC_URL>/links/<token>`, one per action,
    bound to the recommendation and the recipient. Deterministic for a message key (see the
    module docstring): link id = HMAC(secret, key, action), expiry = first attempt + TTL."""
    expires_at = _utc(issued_at) + link_ttl()
    base = public_url()
    urls = {}
    for action in actions:
        mac = hmac.new(secret, f"rebal-link-id/v1\x00{message_key}\x00{action}".encode(), hashlib.sha256).digest()
        link_id = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")[:24]
        token = link_tokens.make_link_token(secret, recommendation_id, user_id, action, expires_at, link_id=link_id)
        urls[action] = f"{base}/links/{token}"
    return urls


def _first_attempt_at(store: WorkflowStore, message_key: str, fallback: datetime) -> datetime:
    with store.begin() as conn:
        row = _message(conn, message_key)
    return _utc(row["created_at"]) if row else fallback


def _recipient_email(user: dict | None, who: str) -> tuple[str, str | None]:
    if user is None or not user.get("active", True):
        raise Permanent(f"the {who} is not an active user in the workflow store")
    address = (user.get("email") or "").strip()
    if "@" not in address:
        raise Permanent(f"the {who} has no email address in the workflow store")
    return address, user.get("name")


def _email_send(build: Callable[[str, smtp.SmtpSettings], Any]) -> outbound.SendFn:
    """A send function that reads the SMTP settings at send time (a broken setting is a retry)."""

    def send(message_key: str) -> str:
        relay = smtp_settings()
        return outbound.email_sender(lambda message_id: build(message_id, relay), relay)(message_key)

    return send


def _crm_send(call: Callable[[CrmClient, str], Any]) -> outbound.SendFn:
    def send(message_key: str) -> str | None:
        client = crm_from_env()
        if client is None:
            raise Permanent("no CRM is configured any more")
        with closing(client):
            record = call(client, message_key)
        return record.id

    return send


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A message deliberately not sent (no row in wf_messages, an audit event)."""

    message_key: str
    kind: str
    reason: str
    status: str = "skipped"
    unexpected: bool = False


Outcome = Delivery | Skipped


def outbound_state(store: WorkflowStore, message_key: str) -> Delivery:
    """A message that was sent earlier, reported as such (nothing is sent now)."""
    with store.begin() as conn:
        row = _message(conn, message_key)
    return Delivery(message_key=message_key, kind=row["kind"], channel=row["channel"], status="already_sent",
                    attempts=row["attempts"], external_id=row["external_id"])


def _key_for_people(key: str) -> str:
    """A message key as logs and run metadata show it: a confirmation's account number masked to
    its last four characters (core/pii.py); the store keeps the key whole."""
    kind, _, rest = key.partition(":")
    decision, sep, account = rest.rpartition(":")
    return f"{kind}:{decision}:{mask_account(account)}" if kind == "confirmation" and sep else key


def _describe(outcome: Outcome) -> dict:
    if isinstance(outcome, Skipped):
        return {"key": _key_for_people(outcome.message_key), "kind": outcome.kind, "status": "skipped",
                "reason": outcome.reason}
    return {"key": _key_for_people(outcome.message_key), "kind": outcome.kind, "status": outcome.status,
            "attempts": outcome.attempts, "external_id": outcome.external_id, "error": outcome.error,
            "next_attempt_at": outcome.next_attempt_at.isoformat() if outcome.next_attempt_at else None}


def _skip(store: WorkflowStore, key: str, kind: str, reason: str, now: datetime, *,
          recommendation_id: str | None = None, recipient_id: str | None = None,
          record_if_absent: bool = True) -> Skipped | None:
    """Not sending `key`: a row queued earlier (a retry) is withdrawn; without a row, the skip is
    recorded as an audit event (unless record_if_absent is False: then nothing happens)."""
    with store.begin() as conn:
        row = _message(conn, key)
        if row is not None:
            if row["status"] == "sent":
                return None
            outbound.withdraw(conn, key, reason, now)
        elif record_if_absent:
            outbound.record_skipped(conn, key, kind, reason, now, recommendation_id=recommendation_id,
                                    recipient_id=recipient_id)
        else:
            return None
    return Skipped(key, kind, reason)


def _report(context: OpExecutionContext, what: str, outcomes: list[Outcome]):
    described = [_describe(o) for o in outcomes]
    for item in described:
        line = f"{item['kind']} {item['key']}: {item['status']}"
        if item.get("error") and item["status"] in ("retry", "rejected"):
            line += f" ({item['error']})"
        (context.log.warning if item["status"] in ("retry", "rejected") else context.log.info)(line)
    broken = [_key_for_people(o.message_key) for o in outcomes if o.unexpected]
    counts: dict[str, int] = {}
    for item in described:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    metadata = {"messages": MetadataValue.json(described), **{f"count_{k}": v for k, v in sorted(counts.items())}}
    if broken:
        # Recorded (retry) first; the run fails so that the unexpected error is seen and fixed.
        raise Failure(description=f"{what}: unexpected error while sending {', '.join(broken)}; they are queued "
                                  "for a retry (see the log)", metadata=metadata)
    return Output(described, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# The advisor's alert (and the CRM task)
# ---------------------------------------------------------------------------------------------


def _crm_task(store: WorkflowStore, rec: dict, package: RecommendationPackage, now: datetime) -> Outcome:
    key = crm_task_key(rec["recommendation_id"])
    if not crm_configured():
        skipped = _skip(store, key, "crm_task", "no CRM is configured", now,
                        recommendation_id=rec["recommendation_id"])
        return skipped or outbound_state(store, key)
    from rebal_pipeline.workflow.lifecycle import lifecycle_policy

    def call(client: CrmClient, message_key: str):
        try:
            reminder_hours = lifecycle_policy().reminder_hours
        except ValueError as exc:
            raise Transient(str(exc)) from None
        due = _utc(rec["clock_started_at"]) + timedelta(hours=reminder_hours)
        description = (f"{headline(package)}. "
                       f"{len(package.trades)} proposed trades; urgency {rec['urgency'] or '-'}. "
                       f"Review: {public_url()}/recommendations/{rec['recommendation_id']}")
        return client.open_task(f"Review rebalancing recommendation {rec['recommendation_id']}", due,
                                rec["advisor_id"], idempotency_key=message_key,
                                contact_or_account_ref=package.household_id or package.scope_id,
                                description=description)

    return outbound.deliver(store.begin, key, "crm_task", "crm", _crm_send(call), now,
                            recipient_id=rec["advisor_id"], recommendation_id=rec["recommendation_id"])


def send_alert(store: WorkflowStore, warehouse: Warehouse, recommendation_id: str, now: datetime) -> list[Outcome]:
    """The advisor's alert email and the CRM task for one recommendation, each once."""
    with store.begin() as conn:
        rec = _recommendation(conn, recommendation_id)
    if rec is None:
        raise Failure(description=f"no recommendation {recommendation_id} in the workflow store")
    key = alert_key(recommendation_id, rec["advisor_id"])
    reason = ("weekly-batch delivery: the weekly digest covers it" if rec["delivery"] == "weekly_batch"
              else f"the recommendation is {rec['status']}" if rec["status"] != "pending" else None)
    if reason:
        # Also ends a CRM task still queued for a retry: the approval it asked for is no longer open.
        alert = _skip(store, key, "alert", reason, now, recommendation_id=recommendation_id)
        task = _skip(store, crm_task_key(recommendation_id), "crm_task", reason, now,
                     recommendation_id=recommendation_id, record_if_absent=False)
        return [alert or outbound_state(store, key), *([task] if task else [])]
    package = RecommendationPackage.model_validate_json(rec["package"])
    # Who hears of it is authority.py's rule: the advisor, then their team when the team asked for
    # it (users.csv team_alerts). Each person gets their own email and links (a link acts as the
    # person it was sent to), under their own key alert:<recommendation>:<user>.
    with store.begin() as conn:
        recipients = [u["user_id"] for u in authority.alert_recipients(conn, rec["advisor_id"])] or [rec["advisor_id"]]

    def build(message_id: str, relay: smtp.SmtpSettings, user_id: str, key: str):
        with store.begin() as conn:
            to, advisor_name = _recipient_email(
                _user(conn, user_id), "advisor of record" if user_id == rec["advisor_id"] else "team member")
        contacts = client_contacts(warehouse, package.account_ids)
        links = signed_links(link_secret(), key, recommendation_id, user_id,
                             _first_attempt_at(store, key, now), emails.ALERT_ACTIONS)
        return emails.advisor_alert(package, client_name=client_name_of(contacts, package.account_ids), links=links,
                                    sender=relay.sender, to=to, message_id=message_id, advisor_name=advisor_name)

    alerts = [outbound.deliver(store.begin, alert_key(recommendation_id, user_id), "alert", "smtp",
                               _email_send(lambda message_id, relay, user_id=user_id: build(
                                   message_id, relay, user_id, alert_key(recommendation_id, user_id))),
                               now, recipient_id=user_id, recommendation_id=recommendation_id)
              for user_id in recipients]
    return [*alerts, _crm_task(store, rec, package, now)]


class AlertConfig(Config):
    recommendation_id: str = Field(description="wf_recommendations.recommendation_id (the sensor sets it)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="Send the advisor's alert for one pending recommendation (email with package, chart and signed "
                "links) and open the CRM task, each once.")
def deliver_advisor_alert(context: OpExecutionContext, config: AlertConfig, workflow_store: WorkflowStoreResource,
                          warehouse: Warehouse):
    with workflow_store.open() as store:
        outcomes = send_alert(store, warehouse, config.recommendation_id, run_time(config.now))
    yield _report(context, f"alert for {config.recommendation_id}", outcomes)


@job(description="The advisor's alert for one recommendation (launched by the advisor_alerts sensor, run_key "
                 "alert:<recommendation_id>, and by outbound_retries).", tags={"rebal/workflow": "comms"})
def send_advisor_alert():
    deliver_advisor_alert()


# ---------------------------------------------------------------------------------------------
# Reminders, escalations, weekly digests (recorded in the workflow store by the approval runs)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedNotification:
    """A reminder, escalation or weekly digest as the approval run recorded it (wf_notifications):
    the row, committed with the recommendation's state change, is the whole hand-off."""

    notification_key: str
    kind: str
    recipient_id: str
    recommendation_ids: tuple[str, ...]
    recorded_at: datetime


def read_notification(conn, notification_key: str) -> RecordedNotification:
    row = conn.execute(select(notifications).where(notifications.c.notification_key == notification_key)
                       ).mappings().first()
    if row is None:
        raise Failure(description=f"no notification {notification_key} recorded in the workflow store "
                                  "(wf_notifications)", allow_retries=False)
    if row["kind"] not in OUTBOX_KINDS:
        raise Failure(description=f"notification {notification_key}: unknown kind {row['kind']!r}",
                      allow_retries=False)
    if row["recommendation_id"]:
        wanted: list[str] = [row["recommendation_id"]]
    else:  # a weekly digest: its recommendations are in the payload (lifecycle.record_weekly_digest)
        wanted = list(json.loads(row["payload"] or "{}").get("recommendations", []))
    return RecordedNotification(notification_key, row["kind"], row["recipient_id"], tuple(wanted),
                                _utc(row["created_at"]))


def _operations_address(conn, recipient_id: str) -> tuple[str, str | None]:
    """The operations user recorded with the alert, else (gone, inactive, or none was on file
    when it was raised) the operations user on file now."""
    user = _user(conn, recipient_id)
    if user is None or not user["active"] or user["role"] != "operations":
        user = _user(conn, operations_alerts.operations_recipient(conn))
    if user is None:
        # Fixed on our side (users.csv), after which the alert goes out: a retry, not a rejection.
        raise Transient("no active operations user in the workflow store (users.csv role operations)")
    return _recipient_email(user, "operations recipient")


def send_operations_alert_email(store: WorkflowStore, alert: OperationsAlert, now: datetime) -> list[Outcome]:
    """One operations alert to the operations team, once (key = the alert's notification key)."""

    def build(message_id: str, relay: smtp.SmtpSettings):
        with store.begin() as conn:
            to, name = _operations_address(conn, alert.recipient_id)
        return emails.operations_alert(
            alert=alert.alert, summary=alert.summary, raised_at=alert.created_at, sender=relay.sender, to=to,
            message_id=message_id, connection=alert.connection, as_of=alert.as_of, details=alert.details,
            recipient_name=name, reference=alert.key)

    return [outbound.deliver(store.begin, alert.key, OPERATIONS_ALERT, "smtp", _email_send(build), now,
                             recipient_id=alert.recipient_id)]


def send_notification_email(store: WorkflowStore, warehouse: Warehouse, notification_key: str,
                            now: datetime) -> list[Outcome]:
    """One reminder, escalation or weekly digest to its recipient, or one operations alert to the
    operations team, once (key = the notification key)."""
    # Operations alerts live in the workflow store only (no outbox file): the row is the document.
    with store.begin() as conn:
        alert = operations_alerts.read_operations_alert(conn, notification_key)
    if alert is not None:
        return send_operations_alert_email(store, alert, now)
    with store.begin() as conn:
        recorded = read_notification(conn, notification_key)
        kind, recipient_id, wanted = recorded.kind, recorded.recipient_id, list(recorded.recommendation_ids)
        recs = {r: rec for r in wanted if (rec := _recommendation(conn, r)) is not None}
    waiting = [r for r in wanted if r in recs and recs[r]["status"] in STILL_WAITING[kind]]
    single = None if kind == "weekly_digest" else wanted[0]
    if not waiting:
        states = ", ".join(sorted({recs[r]["status"] for r in recs})) or "gone"
        skipped = _skip(store, notification_key, kind, f"no longer waiting for a decision ({states})", now,
                        recommendation_id=single, recipient_id=recipient_id)
        return [skipped] if skipped else [outbound_state(store, notification_key)]
    recorded_at = recorded.recorded_at

    def build(message_id: str, relay: smtp.SmtpSettings):
        with store.begin() as conn:
            to, name = _recipient_email(_user(conn, recipient_id), "recipient")
            advisors = {r: _user(conn, recs[r]["advisor_id"]) for r in waiting}
            alert_row = _message(conn, alert_key(waiting[0], recs[waiting[0]]["advisor_id"]))
        packages = {r: RecommendationPackage.model_validate_json(recs[r]["package"]) for r in waiting}
        contacts = client_contacts(warehouse, sorted({a for p in packages.values() for a in p.account_ids}))
        secret = link_secret()
        issued_at = _first_attempt_at(store, notification_key, now)
        if kind == "weekly_digest":
            items = [emails.DigestItem(
                package=packages[r], client_name=client_name_of(contacts, packages[r].account_ids),
                review_link=signed_links(secret, notification_key, r, recipient_id, issued_at, ("review",))["review"])
                for r in waiting]
            return emails.weekly_digest(items, advisor_name=name, week_ending=recorded_at.date(), sender=relay.sender,
                                        to=to, message_id=message_id)
        rec, package = recs[single], packages[single]
        client_name = client_name_of(contacts, package.account_ids)
        if kind == "reminder":
            try:
                from rebal_pipeline.workflow.lifecycle import lifecycle_policy
                escalation_hours = lifecycle_policy().escalation_hours
            except ValueError as exc:
                raise Transient(str(exc)) from None
            started = _utc(rec["clock_started_at"])
            in_reply_to = alert_row["external_id"] if alert_row and alert_row["status"] == "sent" else None
            return emails.reminder(
                package, client_name=client_name, alerted_at=started, sender=relay.sender, to=to,
                links=signed_links(secret, notification_key, single, recipient_id, issued_at, emails.ALERT_ACTIONS),
                message_id=message_id, advisor_name=name, escalates_at=started + timedelta(hours=escalation_hours),
                in_reply_to=in_reply_to)
        advisor = advisors[single] or {}
        return emails.escalation(
            package, client_name=client_name, advisor_name=advisor.get("name") or rec["advisor_id"] or "-",
            advisor_id=rec["advisor_id"] or "-", pending_since=_utc(rec["clock_started_at"]),
            escalated_at=_utc(rec["escalated_at"]) if rec["escalated_at"] else recorded_at,
            # Compliance approves, modifies (review page) or hands it back; it does not defer
            # (authority.py), so the email carries no defer link.
            links=signed_links(secret, notification_key, single, recipient_id, issued_at, ("review", "approve")),
            sender=relay.sender, to=to, message_id=message_id, compliance_name=name,
            reason=_escalation_reason(store, notification_key))

    return [outbound.deliver(store.begin, notification_key, kind, "smtp", _email_send(build), now,
                             recipient_id=recipient_id, recommendation_id=single)]


def _escalation_reason(store: WorkflowStore, notification_key: str) -> str | None:
    """The reason of an escalation recorded by a person or by routing at publication
    (authority.record_escalation); None for the 48h rule's own."""
    with store.begin() as conn:
        payload = conn.execute(select(notifications.c.payload).where(
            notifications.c.notification_key == notification_key)).scalar()
    try:
        reason = json.loads(payload or "{}").get("reason")
    except ValueError:
        return None
    return reason if isinstance(reason, str) and reason.strip() else None


class NotificationEmailConfig(Config):
    notification_key: str = Field(description="The notification's key (also the run key and the message key)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="Email one reminder, escalation or weekly digest recorded in the workflow store to its recipient, "
                "or one operations alert to the operations team, once.")
def deliver_notification(context: OpExecutionContext, config: NotificationEmailConfig,
                         workflow_store: WorkflowStoreResource, warehouse: Warehouse):
    with workflow_store.open() as store:
        outcomes = send_notification_email(store, warehouse, config.notification_key, run_time(config.now))
    yield _report(context, f"notification {config.notification_key}", outcomes)


@job(description="One reminder, escalation, weekly digest or operations alert email (launched by the mailer_outbox "
                 "and operations_alerts sensors, run_key = the notification key, and by outbound_retries).",
     tags={"rebal/workflow": "comms"})
def send_notification():
    deliver_notification()


# ---------------------------------------------------------------------------------------------
# After execution: client confirmation and CRM note
# ---------------------------------------------------------------------------------------------


def _side(side: str) -> str:
    return {"buy": "Buy", "sell": "Sell"}.get(side.lower(), side.capitalize())


def _quantity(value: float | None) -> str:
    return emails.quantity(value) if value is not None else "-"


def trades_summary(orders: list[dict], by_account: bool) -> str:
    """"Sell 10 VTI; Buy 20 BND" (per account when there are several: "ACC-1: Sell 10 VTI; …")."""
    order = {"sell": 0, "buy": 1}
    rows = sorted(orders, key=lambda o: (o["account_id"], order.get(o["side"].lower(), 2), o["symbol"]))
    parts = []
    for o in rows:
        amount = (f"{_quantity(o['quantity'])} {o['symbol']}" if o["quantity"] is not None
                  else f"{emails.money(o['cash_amount'])} of {o['symbol']}")
        parts.append(f"{o['account_id'] + ': ' if by_account else ''}{_side(o['side'])} {amount}")
    return "; ".join(parts)


def headline(package: RecommendationPackage) -> str:
    """"Rebalance: Equity +10.00% vs. ±5.00% band" — the most drifted class over its band."""
    title = "Tax-loss harvest" if package.kind == "harvest" else "Rebalance"
    if not package.bands:
        return title
    worst = max(package.bands, key=lambda b: (abs(b.drift) - b.band, abs(b.drift)))
    return (f"{title}: {class_label(worst.asset_class)} {emails.signed_percent(worst.drift)} "
            f"vs. {emails.band_percent(worst.band)} band")


def rationale(decision: dict, package: RecommendationPackage) -> str:
    """Why the trades were made, for the CRM note: the recommendation's summary and the decision."""
    summary = headline(package)
    who = f"{decision['action'].replace('_', ' ')} by {decision['actor_id']} via {decision['via']}"
    reason = f": {decision['reason'].strip()}" if decision.get("reason") and decision["reason"].strip() else ""
    return f"{summary}; {who}{reason}. Recommendation {package.recommendation_id} of {package.as_of.isoformat()}."


def _executed_trades(orders: list[dict], package: RecommendationPackage) -> list[emails.ExecutedTrade]:
    """The account's orders, priced at the package's estimated prices (fills are not known here)."""
    prices = {h.symbol: h.price for h in package.holdings} | {t.symbol: t.est_price for t in package.trades}
    trades = []
    for o in orders:
        price = prices.get(o["symbol"])
        if o["quantity"] is not None:
            quantity = float(o["quantity"])
            amount = round(quantity * price, 2) if price else float(o["cash_amount"] or 0)
        else:
            amount = float(o["cash_amount"] or 0)
            quantity = round(amount / price, 4) if price else 0.0
        trades.append(emails.ExecutedTrade(side=o["side"].lower(), quantity=quantity, symbol=o["symbol"],
                                           price=price or 0.0, amount=amount))
    return trades


def execution_orders(conn, decision_id: str) -> list[dict]:
    return [dict(r) for r in conn.execute(select(submissions).where(submissions.c.decision_id == decision_id)
                                          .order_by(submissions.c.cl_ord_id)).mappings()]


def send_execution_messages(store: WorkflowStore, warehouse: Warehouse, decision_id: str,
                            now: datetime) -> list[Outcome]:
    """The client confirmation of each traded account and the CRM note, each once."""
    with store.begin() as conn:
        decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
        if decision is None:
            raise Failure(description=f"no decision {decision_id} in the workflow store")
        decision = dict(decision)
        rec = _recommendation(conn, decision["recommendation_id"])
        orders = execution_orders(conn, decision_id)
        advisor = _user(conn, rec["advisor_id"])
    # Left the building: submitted to the custodian, or staged and confirmed placed by the desk.
    pending = [o for o in orders if not ((o["status"] == "done" and o["channel"] == "submitted")
                                         or o["status"] == "executed")]
    if not orders or pending:
        raise Failure(description=f"decision {decision_id} is not executed: {len(orders) - len(pending)} of "
                                  f"{len(orders)} orders submitted or confirmed executed")
    package = RecommendationPackage.model_validate_json(rec["package"])
    executed_on = max(_utc(o["completed_at"] or o["created_at"]) for o in orders).date()
    recommendation_id = rec["recommendation_id"]
    outcomes: list[Outcome] = []

    for account_id in sorted({o["account_id"] for o in orders}):
        key = confirmation_key(decision_id, account_id)
        account_orders = [o for o in orders if o["account_id"] == account_id]

        def build(message_id: str, relay: smtp.SmtpSettings, account_id=account_id, account_orders=account_orders):
            contact = client_contacts(warehouse, [account_id]).get(account_id)
            address = (contact.client_email or "").strip() if contact else ""
            if "@" not in address:
                raise Permanent("no client email address on file for the account (stg_feed_accounts)")
            # The household's own setting wins over the firm's default.
            style = contact.confirmation_style or confirmation_style()
            return emails.client_confirmation(
                client_name=(contact.client_name or "").strip() or "Client", account_number=account_id,
                executed_on=executed_on, style=style, sender=relay.sender, to=address, message_id=message_id,
                firm_name=firm_name(relay.sender), advisor_name=(advisor or {}).get("name"),
                trades=_executed_trades(account_orders, package), reference=decision_id)

        outcomes.append(outbound.deliver(store.begin, key, "confirmation", "smtp", _email_send(build), now,
                                         recipient_id=account_id, recommendation_id=recommendation_id))

    key = crm_note_key(decision_id)
    if not crm_configured():
        skipped = _skip(store, key, "crm_note", "no CRM is configured", now, recommendation_id=recommendation_id)
        outcomes.append(skipped or outbound_state(store, key))
        return outcomes
    accounts = {o["account_id"] for o in orders}

    def call(client: CrmClient, message_key: str):
        return client.record_note(package.household_id or package.scope_id, executed_on, rationale(decision, package),
                                  trades_summary(orders, by_account=len(accounts) > 1), idempotency_key=message_key)

    outcomes.append(outbound.deliver(store.begin, key, "crm_note", "crm", _crm_send(call), now,
                                     recipient_id=rec["advisor_id"], recommendation_id=recommendation_id))
    return outcomes


class ExecutionConfig(Config):
    decision_id: str = Field(description="wf_decisions.decision_id whose orders are all done (the sensor sets it)")
    now: str = Field(default="", description="ISO-8601 time of the sensor tick; empty: the wall clock")


@op(description="After a decision's orders are all done: the client confirmation (once per account) and the CRM "
                "note (once). A CRM or SMTP outage leaves the message queued for a retry; it fails nothing.")
def deliver_execution_messages(context: OpExecutionContext, config: ExecutionConfig,
                               workflow_store: WorkflowStoreResource, warehouse: Warehouse):
    with workflow_store.open() as store:
        outcomes = send_execution_messages(store, warehouse, config.decision_id, run_time(config.now))
    yield _report(context, f"execution of decision {config.decision_id}", outcomes)


@job(description="Client confirmation and CRM note for one executed decision (launched by the "
                 "executed_recommendations sensor, run_key executed:<decision_id>, and by outbound_retries).",
     tags={"rebal/workflow": "comms"})
def communicate_execution():
    deliver_execution_messages()


# ---------------------------------------------------------------------------------------------
# Which job re-sends a message (used by the outbound_retries sensor)
# ---------------------------------------------------------------------------------------------


def retry_target(row: dict) -> tuple[str, str, dict] | None:
    """(job name, subject, op config) that re-sends this wf_messages row; None for a kind no job
    here sends."""
    kind, key = row["kind"], row["message_key"]
    if kind in ("alert", "crm_task") and row["recommendation_id"]:
        return (send_advisor_alert.name, f"alert:{row['recommendation_id']}",
                {"deliver_advisor_alert": {"recommendation_id": row["recommendation_id"]}})
    if kind in NOTIFICATION_KINDS:  # reminders, escalations, digests and operations alerts
        return send_notification.name, key, {"deliver_notification": {"notification_key": key}}
    if kind in ("confirmation", "crm_note"):
        decision_id = key.split(":")[1] if key.count(":") >= 1 else ""
        if decision_id:
            return (communicate_execution.name, f"executed:{decision_id}",
                    {"deliver_execution_messages": {"decision_id": decision_id}})
    return None


def recommendations_waiting_for_alert(conn, now: datetime, since: datetime, limit: int) -> list[dict]:
    """Pending recommendations published (or re-routed to a new advisor: `rerouted_at`) since
    `since`, not weekly-batch, with no alert row yet for their advisor of record (key
    alert:<recommendation>:<advisor>: a re-routed one is alerted again, to its new advisor)."""
    r = recommendations.c
    alerted = select(messages.c.message_key).where(
        messages.c.message_key == "alert:" + r.recommendation_id + ":" + func.coalesce(r.advisor_id, "-")).exists()
    rows = conn.execute(select(recommendations.c.recommendation_id, recommendations.c.advisor_id,
                               recommendations.c.urgency, recommendations.c.rerouted_at).where(and_(
        recommendations.c.status == "pending",
        or_(and_(r.created_at >= since, r.created_at <= now), and_(r.rerouted_at >= since, r.rerouted_at <= now)),
        (recommendations.c.delivery.is_(None)) | (recommendations.c.delivery != "weekly_batch"),
        ~alerted,
    )).order_by(recommendations.c.created_at, recommendations.c.recommendation_id).limit(limit)).mappings().all()
    return [dict(r) for r in rows]




def notifications_waiting_for_email(conn, now: datetime, since: datetime, limit: int) -> list[dict]:
    """Reminders, escalations and weekly digests recorded since `since` (wf_notifications) with no
    wf_messages row for their key yet: the mailer's queue is the store, never a folder of files."""
    emailed = select(messages.c.message_key).where(messages.c.message_key == notifications.c.notification_key).exists()
    rows = conn.execute(select(notifications.c.notification_key, notifications.c.kind, notifications.c.created_at)
                        .where(and_(notifications.c.kind.in_(OUTBOX_KINDS),
                                    notifications.c.created_at >= since,
                                    notifications.c.created_at <= now,
                                    ~emailed))
                        .order_by(notifications.c.created_at, notifications.c.notification_key).limit(limit)
                        ).mappings().all()
    return [dict(r) for r in rows]


def operations_alerts_waiting_for_email(conn, now: datetime, since: datetime, limit: int) -> list[dict]:
    """Operations alerts recorded since `since` with no wf_messages row for their key yet."""
    emailed = select(messages.c.message_key).where(messages.c.message_key == notifications.c.notification_key).exists()
    rows = conn.execute(select(notifications.c.notification_key, notifications.c.created_at).where(and_(
        notifications.c.kind == OPERATIONS_ALERT,
        notifications.c.created_at >= since,
        notifications.c.created_at <= now,
        ~emailed,
    )).order_by(notifications.c.created_at, notifications.c.notification_key).limit(limit)).mappings().all()
    return [dict(r) for r in rows]
