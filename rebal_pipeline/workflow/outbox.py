"""The outbox: copies for people, written once, never read back, and the notifications they copy.

Locations, under the outbox root (`RebalSettings.outbox_root()`, <REBAL_HOME>/outbox):
  approved/<decision_id>.json          format rebal.approved_trades/1 (the gate's hand-off)
  notifications/<sha256(key)>.json     format rebal.notification/1
Each file is written once (temporary dot-file, then a hard link that fails instead of replacing:
core/write_once.py); readers ignore dot-files. The hand-offs themselves are the workflow store's
rows (issue #12): `record_notification_once` records a reminder, escalation or weekly digest in
`wf_notifications`, where the mailer (defs/comms) finds it, and `notification_document` builds
the copy for people from that record, so that a re-run writes the same message.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, select

from rebal_pipeline.core.write_once import write_file_once
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.gate import _iso
from rebal_pipeline.workflow.schema import notifications, recommendations, users

NOTIFICATION_FORMAT = "rebal.notification/1"
NOTIFICATION_KINDS = ("reminder", "escalation", "weekly_digest")
# Decision ids are hex digests; anything else in a launchpad config is refused before it names a file.
_DECISION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class OutboxError(ValueError):
    """A request the outbox refuses (not a decision id, an unknown kind, no such recommendation)."""


def check_decision_id(decision_id: str) -> str:
    if not _DECISION_ID.fullmatch(decision_id):
        raise OutboxError(f"{decision_id!r} is not a decision id")
    return decision_id


def check_notification_kind(kind: str) -> str:
    if kind not in NOTIFICATION_KINDS:
        raise OutboxError(f"unknown notification kind {kind!r}; one of {', '.join(NOTIFICATION_KINDS)}")
    return kind


def approved_trades_path(outbox_root: Path, decision_id: str) -> Path:
    return outbox_root / "approved" / f"{decision_id}.json"


def notification_path(outbox_root: Path, notification_key: str) -> Path:
    # Keys contain ':' and ISO times: the file is named by the key's digest, the key is inside.
    return outbox_root / "notifications" / f"{hashlib.sha256(notification_key.encode()).hexdigest()}.json"


def write_copy_for_people(path: Path, document: dict) -> bool:
    """Write `document` as JSON to `path` once (False: the file was there), by the outbox's
    write-once protocol (core/write_once.py). A writer holds an exclusive lock on its temporary
    dot-file while writing it; the kernel drops the lock when the process dies, so a dot-file
    nobody holds a lock on is the remains of a killed write, and the next run removes it
    (`core.write_once.remove_abandoned_temps`)."""
    return write_file_once(path, (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def record_notification_once(conn: Connection, kind: str, notification_key: str, now: datetime, *,
                             recommendation_id: str = "", advisor_id: str = "",
                             recommendation_ids: list[str] | tuple[str, ...] = ()) -> str:
    """Record the notification unless it is recorded already or no longer due. Returns what happened.
    reminder / escalation: `recommendation_id`; weekly_digest: `advisor_id`, `recommendation_ids`."""
    if conn.execute(select(notifications.c.notification_key).where(
            notifications.c.notification_key == notification_key)).first() is not None:
        return "already recorded"
    if kind in ("reminder", "escalation"):
        rec = conn.execute(select(recommendations.c.status).where(
            recommendations.c.recommendation_id == recommendation_id)).first()
        if rec is None:
            raise OutboxError(f"no recommendation {recommendation_id}")
        # Decided between the sensor's tick and this run: nothing to chase (and an escalation must
        # not move an approved recommendation back to escalated).
        if rec.status not in ("pending", "deferred"):
            return f"no longer due: the recommendation is {rec.status}"
        done = lifecycle.record_notification(conn, kind, recommendation_id, notification_key, now)
        return "recorded" if done else "already recorded"
    waiting = [r.recommendation_id for r in conn.execute(select(recommendations.c.recommendation_id).where(and_(
        recommendations.c.recommendation_id.in_(list(recommendation_ids)), recommendations.c.status == "pending"))
        .order_by(recommendations.c.recommendation_id))]
    if not waiting:
        return "no longer due: none of its recommendations is still pending"
    done = lifecycle.record_weekly_digest(conn, advisor_id, notification_key, waiting, now)
    return "recorded" if done else "already recorded"


def notification_document(conn: Connection, notification_key: str) -> dict | None:
    """The outbox document of a recorded notification (None: not recorded), built from the store's
    record so that a re-run writes the same message."""
    row = conn.execute(select(notifications).where(notifications.c.notification_key == notification_key)
                       ).mappings().first()
    if row is None:
        return None
    recipient = conn.execute(select(users.c.user_id, users.c.name, users.c.email, users.c.role)
                             .where(users.c.user_id == row["recipient_id"])).mappings().first()
    document: dict[str, Any] = {
        "format": NOTIFICATION_FORMAT,
        "notification_key": notification_key,
        "kind": row["kind"],
        "recorded_at": _iso(row["created_at"]),
        "recipient": dict(recipient) if recipient else {"user_id": row["recipient_id"]},
    }
    wanted = ([row["recommendation_id"]] if row["recommendation_id"]
              else json.loads(row["payload"]).get("recommendations", []))
    recs = conn.execute(select(recommendations).where(recommendations.c.recommendation_id.in_(wanted))
                        .order_by(recommendations.c.recommendation_id)).mappings().all()
    summaries = [{
        "recommendation_id": r["recommendation_id"], "as_of": _iso(r["as_of"]), "scope": r["scope"],
        "scope_id": r["scope_id"], "kind": r["kind"], "advisor_id": r["advisor_id"],
        "household_id": r["household_id"], "tier": r["tier"], "urgency": r["urgency"], "delivery": r["delivery"],
        "trade_value": r["trade_value"], "waiting_since": _iso(r["clock_started_at"]),
        "deferred_until": _iso(r["deferred_until"]),
    } for r in recs]
    if row["kind"] == "weekly_digest":
        document["recommendations"] = summaries
    else:
        document["recommendation"] = summaries[0] if summaries else {"recommendation_id": row["recommendation_id"]}
    return document
