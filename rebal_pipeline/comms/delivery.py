"""Sending what one subject owes, once: the advisor's alert, a recorded notification, the
messages after execution (issue #6). The Dagster runs that call these are in defs/comms/jobs.py.

    send_alert                   the advisor's alert for one pending recommendation (email with the
                                 package, drift chart, masked accounts and signed one-click links,
                                 one per recipient: the advisor, then their team when it asked) and a
                                 CRM task for the pending approval
    send_notification_email      one reminder, escalation or weekly digest recorded in the workflow
                                 store by the approval runs (wf_notifications: who, which
                                 recommendations, when), or one operations alert
                                 (workflow/operations_alerts.py) to the operations team. The store is
                                 the hand-off: the copy the approval run writes under
                                 outbox/notifications/ is for people and is never read here (issue #12)
    send_execution_messages      after a decision's orders are all done (wf_submissions): the client
                                 confirmation per account and the CRM note (date, rationale, trades)

Every message goes through `comms.outbound.deliver` under a deterministic key (comms/keys.py), so
a run re-executed, a retry launched by `outbound_retries`, or two ticks asking for the same thing
send nothing twice: a `sent` key is never sent again, and a re-send after a crash carries the same
Message-ID / Idempotency-Key. A peer that is down never fails a run and never blocks anything
else: the message is left `retry` in wf_messages and the `outbound_retries` sensor hands it back
to its job when it is due. `CannotSend` is raised only for what nobody can retry (no such
recommendation / decision / recorded notification, orders not all done); the run fails on it.

What the messages are sent with (relay, link secret and URL, CRM, confirmation style) is a
`CommsSettings` (comms/settings.py) the caller passes; what they need beyond the workflow store is
read when they are rendered, inside the send (so a busy warehouse makes a retry, not a lost
message): client names and email addresses from the warehouse (`stg_feed_accounts`, the latest
row of each account) — client PII is used to address and fill the email and never goes to a log,
an audit event or a run's metadata.

Link identity: the link ids in an email are derived (HMAC with the link secret) from the message
key and the action, and the expiry from the message's first attempt (+ REBAL_LINK_TTL_HOURS), so a
re-sent email carries the same links as the first one — a duplicate on the wire is the same
message in every byte that matters. Each link is still single-use at the API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import duckdb
from sqlalchemy import select

from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.comms import emails, outbound, smtp
from rebal_pipeline.comms.chart import class_label
from rebal_pipeline.comms.keys import alert_key, confirmation_key, crm_note_key, crm_task_key, key_for_people
from rebal_pipeline.comms.outbound import Delivery, Permanent, Transient
from rebal_pipeline.comms.settings import CommsSettings, CrmClient
from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import authority, operations_alerts
from rebal_pipeline.workflow.operations_alerts import OperationsAlert
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import decisions, messages, notifications, recommendations, submissions, users
from rebal_pipeline.workflow.store import WorkflowStore

if TYPE_CHECKING:
    from rebal_pipeline.resources import Warehouse

# Recorded by the approval runs in wf_notifications (workflow/publishing.py, notify_recommendation).
OUTBOX_KINDS = ("reminder", "escalation", "weekly_digest")
OPERATIONS_ALERT = operations_alerts.KIND
# Everything send_notification_email sends, under its notification key.
NOTIFICATION_KINDS = (*OUTBOX_KINDS, OPERATIONS_ALERT)
# Recommendation states in which a reminder / escalation / digest is still worth sending. An
# operations alert is about no recommendation: it is always still due, never skipped.
STILL_WAITING = {"reminder": ("pending", "deferred"), "escalation": ("escalated", "pending", "deferred"),
                 "weekly_digest": ("pending", "deferred")}


class CannotSend(Exception):
    """Nothing can be sent for this subject and no retry will change that (it does not exist, or
    its orders are not all done). `allow_retries`: whether re-running the same run may help."""

    def __init__(self, message: str, allow_retries: bool = True):
        super().__init__(message)
        self.allow_retries = allow_retries


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


def signed_links(comms: CommsSettings, secret: bytes, message_key: str, recommendation_id: str, user_id: str,
                 issued_at: datetime, actions: tuple[str, ...]) -> dict[str, str]:
    """The one-click links of one email: `<REBAL_PUBLIC_URL>/links/<token>`, one per action,
    bound to the recommendation and the recipient. Deterministic for a message key (see the
    module docstring): link id = HMAC(secret, key, action), expiry = first attempt + TTL."""
    expires_at = _utc(issued_at) + comms.link_ttl
    base = comms.public_url
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


def _email_send(comms: CommsSettings, build: Callable[[str, smtp.SmtpSettings], Any]) -> outbound.SendFn:
    """A send function that reads the SMTP settings at send time (a broken setting is a retry)."""

    def send(message_key: str) -> str:
        relay = comms.relay()
        return outbound.email_sender(lambda message_id: build(message_id, relay), relay)(message_key)

    return send


def _crm_send(comms: CommsSettings, call: Callable[[CrmClient, str], Any]) -> outbound.SendFn:
    def send(message_key: str) -> str | None:
        client = comms.crm_client()
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


def describe(outcome: Outcome) -> dict:
    """An outcome as logs and run metadata show it (keys masked: `key_for_people`)."""
    if isinstance(outcome, Skipped):
        return {"key": key_for_people(outcome.message_key), "kind": outcome.kind, "status": "skipped",
                "reason": outcome.reason}
    return {"key": key_for_people(outcome.message_key), "kind": outcome.kind, "status": outcome.status,
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



# ---------------------------------------------------------------------------------------------
# The advisor's alert (and the CRM task)
# ---------------------------------------------------------------------------------------------


def _crm_task(store: WorkflowStore, rec: dict, package: RecommendationPackage, now: datetime,
              comms: CommsSettings) -> Outcome:
    key = crm_task_key(rec["recommendation_id"])
    if not comms.crm_configured():
        skipped = _skip(store, key, "crm_task", "no CRM is configured", now,
                        recommendation_id=rec["recommendation_id"])
        return skipped or outbound_state(store, key)
    def call(client: CrmClient, message_key: str):
        reminder_hours = comms.approval_clock().reminder_hours
        due = _utc(rec["clock_started_at"]) + timedelta(hours=reminder_hours)
        description = (f"{headline(package)}. "
                       f"{len(package.trades)} proposed trades; urgency {rec['urgency'] or '-'}. "
                       f"Review: {comms.public_url}/recommendations/{rec['recommendation_id']}")
        return client.open_task(f"Review rebalancing recommendation {rec['recommendation_id']}", due,
                                rec["advisor_id"], idempotency_key=message_key,
                                contact_or_account_ref=package.household_id or package.scope_id,
                                description=description)

    return outbound.deliver(store.begin, key, "crm_task", "crm", _crm_send(comms, call), now,
                            recipient_id=rec["advisor_id"], recommendation_id=rec["recommendation_id"])


def send_alert(store: WorkflowStore, warehouse: Warehouse, recommendation_id: str, now: datetime, *,
               comms: CommsSettings) -> list[Outcome]:
    """The advisor's alert email and the CRM task for one recommendation, each once."""
    with store.begin() as conn:
        rec = _recommendation(conn, recommendation_id)
    if rec is None:
        raise CannotSend(f"no recommendation {recommendation_id} in the workflow store")
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
        links = signed_links(comms, comms.link_secret(), key, recommendation_id, user_id,
                             _first_attempt_at(store, key, now), emails.ALERT_ACTIONS)
        return emails.advisor_alert(package, client_name=client_name_of(contacts, package.account_ids), links=links,
                                    sender=relay.sender, to=to, message_id=message_id, advisor_name=advisor_name)

    alerts = [outbound.deliver(store.begin, alert_key(recommendation_id, user_id), "alert", "smtp",
                               _email_send(comms, lambda message_id, relay, user_id=user_id: build(
                                   message_id, relay, user_id, alert_key(recommendation_id, user_id))),
                               now, recipient_id=user_id, recommendation_id=recommendation_id)
              for user_id in recipients]
    return [*alerts, _crm_task(store, rec, package, now, comms)]



# ---------------------------------------------------------------------------------------------
# Reminders, escalations, weekly digests, operations alerts
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
        raise CannotSend(f"no notification {notification_key} recorded in the workflow store (wf_notifications)",
                         allow_retries=False)
    if row["kind"] not in OUTBOX_KINDS:
        raise CannotSend(f"notification {notification_key}: unknown kind {row['kind']!r}", allow_retries=False)
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


def send_operations_alert_email(store: WorkflowStore, alert: OperationsAlert, now: datetime, *,
                                comms: CommsSettings) -> list[Outcome]:
    """One operations alert to the operations team, once (key = the alert's notification key)."""

    def build(message_id: str, relay: smtp.SmtpSettings):
        with store.begin() as conn:
            to, name = _operations_address(conn, alert.recipient_id)
        return emails.operations_alert(
            alert=alert.alert, summary=alert.summary, raised_at=alert.created_at, sender=relay.sender, to=to,
            message_id=message_id, connection=alert.connection, as_of=alert.as_of, details=alert.details,
            recipient_name=name, reference=alert.key)

    return [outbound.deliver(store.begin, alert.key, OPERATIONS_ALERT, "smtp", _email_send(comms, build), now,
                             recipient_id=alert.recipient_id)]


def send_notification_email(store: WorkflowStore, warehouse: Warehouse, notification_key: str,
                            now: datetime, *, comms: CommsSettings) -> list[Outcome]:
    """One reminder, escalation or weekly digest to its recipient, one operations alert to the
    operations team, or one market-event batch email to an advisor, once (key = the notification key)."""
    # Operations alerts live in the workflow store only (no outbox file): the row is the document.
    with store.begin() as conn:
        alert = operations_alerts.read_operations_alert(conn, notification_key)
    if alert is not None:
        return send_operations_alert_email(store, alert, now, comms=comms)
    from rebal_pipeline.market_events import report as market_event_report

    if notification_key.startswith(f"{market_event_report.MESSAGE_KIND}:"):
        # A market-event batch's email to an advisor, sent by its scan's run; here when a send
        # failed for a passing reason and outbound_retries asks again (market_events/report.py).
        return market_event_report.send_advisor_email(store, notification_key, now, comms=comms)
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
        secret = comms.link_secret()
        issued_at = _first_attempt_at(store, notification_key, now)
        if kind == "weekly_digest":
            items = [emails.DigestItem(
                package=packages[r], client_name=client_name_of(contacts, packages[r].account_ids),
                review_link=signed_links(comms, secret, notification_key, r, recipient_id, issued_at, ("review",))["review"])
                for r in waiting]
            return emails.weekly_digest(items, advisor_name=name, week_ending=recorded_at.date(), sender=relay.sender,
                                        to=to, message_id=message_id)
        rec, package = recs[single], packages[single]
        client_name = client_name_of(contacts, package.account_ids)
        if kind == "reminder":
            escalation_hours = comms.approval_clock().escalation_hours
            started = _utc(rec["clock_started_at"])
            in_reply_to = alert_row["external_id"] if alert_row and alert_row["status"] == "sent" else None
            return emails.reminder(
                package, client_name=client_name, alerted_at=started, sender=relay.sender, to=to,
                links=signed_links(comms, secret, notification_key, single, recipient_id, issued_at,
                                   emails.ALERT_ACTIONS),
                message_id=message_id, advisor_name=name, escalates_at=started + timedelta(hours=escalation_hours),
                in_reply_to=in_reply_to)
        advisor = advisors[single] or {}
        return emails.escalation(
            package, client_name=client_name, advisor_name=advisor.get("name") or rec["advisor_id"] or "-",
            advisor_id=rec["advisor_id"] or "-", pending_since=_utc(rec["clock_started_at"]),
            escalated_at=_utc(rec["escalated_at"]) if rec["escalated_at"] else recorded_at,
            # Compliance approves, modifies (review page) or hands it back; it does not defer
            # (authority.py), so the email carries no defer link.
            links=signed_links(comms, secret, notification_key, single, recipient_id, issued_at, ("review", "approve")),
            sender=relay.sender, to=to, message_id=message_id, compliance_name=name,
            reason=_escalation_reason(store, notification_key))

    return [outbound.deliver(store.begin, notification_key, kind, "smtp", _email_send(comms, build), now,
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
                            now: datetime, *, comms: CommsSettings) -> list[Outcome]:
    """The client confirmation of each traded account and the CRM note, each once."""
    with store.begin() as conn:
        decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
        if decision is None:
            raise CannotSend(f"no decision {decision_id} in the workflow store")
        decision = dict(decision)
        rec = _recommendation(conn, decision["recommendation_id"])
        orders = execution_orders(conn, decision_id)
        advisor = _user(conn, rec["advisor_id"])
    # Left the building: submitted to the custodian, or staged and confirmed placed by the desk.
    pending = [o for o in orders if not ((o["status"] == "done" and o["channel"] == "submitted")
                                         or o["status"] == "executed")]
    if not orders or pending:
        raise CannotSend(f"decision {decision_id} is not executed: {len(orders) - len(pending)} of "
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
            style = contact.confirmation_style or comms.confirmation_style
            return emails.client_confirmation(
                client_name=(contact.client_name or "").strip() or "Client", account_number=account_id,
                executed_on=executed_on, style=style, sender=relay.sender, to=address, message_id=message_id,
                firm_name=comms.firm_name(relay.sender), advisor_name=(advisor or {}).get("name"),
                trades=_executed_trades(account_orders, package), reference=decision_id)

        outcomes.append(outbound.deliver(store.begin, key, "confirmation", "smtp", _email_send(comms, build), now,
                                         recipient_id=account_id, recommendation_id=recommendation_id))

    key = crm_note_key(decision_id)
    if not comms.crm_configured():
        skipped = _skip(store, key, "crm_note", "no CRM is configured", now, recommendation_id=recommendation_id)
        outcomes.append(skipped or outbound_state(store, key))
        return outcomes
    accounts = {o["account_id"] for o in orders}

    def call(client: CrmClient, message_key: str):
        return client.record_note(package.household_id or package.scope_id, executed_on, rationale(decision, package),
                                  trades_summary(orders, by_account=len(accounts) > 1), idempotency_key=message_key)

    outcomes.append(outbound.deliver(store.begin, key, "crm_note", "crm", _crm_send(comms, call), now,
                                     recipient_id=rec["advisor_id"], recommendation_id=recommendation_id))
    return outcomes


