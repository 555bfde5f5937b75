"""What is owed a message: the comms sensors' queues, read from the workflow store.

Each query lists subjects with no wf_messages row for their key yet, so the filter is the state:
once a run has inserted its message's row the subject is not listed again, and until then Dagster
skips the run key (defs/comms/sensors.py). No cursor, nothing to lose on a restart.

    recommendations_waiting_for_alert      pending, published or re-routed since `since`, not weekly-batch
    notifications_waiting_for_email        reminders, escalations, weekly digests (wf_notifications)
    operations_alerts_waiting_for_email    operations alerts (wf_notifications kind operations_alert)
    executed_decisions                     decisions whose orders all left, with no client confirmation yet
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, case, func, or_, select

from rebal_pipeline.comms.delivery import OPERATIONS_ALERT, OUTBOX_KINDS
from rebal_pipeline.workflow.schema import batch_recommendations, messages, notifications, recommendations, submissions


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
        # A market-event batch's members are in the batch's email (market_events/report.py), one
        # per advisor and event, not one each; re-routed to a new advisor, one is alerted alone.
        or_(r.rerouted_at.is_not(None), r.recommendation_id.notin_(select(batch_recommendations.c.recommendation_id))),
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


def executed_decisions(conn, since: datetime, limit: int) -> list[dict]:
    """Decisions all of whose orders are done (the last completed since `since`) and that have no
    client confirmation row yet."""
    # Executed = every order submitted to the custodian, or staged and confirmed placed by the
    # trading desk (`rebal orders-executed`): a client is never told "rebalanced" before the
    # orders left.
    not_done = func.sum(case((and_(submissions.c.status == "done", submissions.c.channel == "submitted"), 0),
                             (submissions.c.status == "executed", 0), else_=1))
    last = func.max(func.coalesce(submissions.c.completed_at, submissions.c.created_at))
    rows = conn.execute(
        select(submissions.c.decision_id, submissions.c.recommendation_id, last.label("completed_at"))
        .group_by(submissions.c.decision_id, submissions.c.recommendation_id)
        .having(and_(not_done == 0, last >= since))
        .order_by(last, submissions.c.decision_id)
    ).mappings().all()
    if not rows:
        return []
    confirmed = {key.split(":")[1] for (key,) in conn.execute(
        select(messages.c.message_key).where(and_(
            messages.c.kind == "confirmation",
            messages.c.recommendation_id.in_({r["recommendation_id"] for r in rows}))))}
    return [dict(r) for r in rows if r["decision_id"] not in confirmed][:limit]
