"""The audit chain: append-only, SHA-256 hash-chained events (SEC Rule 204-2, 17a-4(f) model).

Every event carries the previous event's hash; its own hash covers that and a canonical JSON
encoding of the event (sorted keys, no whitespace, ISO-8601 UTC times), so editing any field of
any event, deleting one, or reordering them breaks the chain at a named place. Sequence numbers
are assigned by the appender (previous + 1, no gaps) so a deleted row is also a visible hole.

Appending is idempotent: each event has a deterministic `event_id` (e.g. "alert:<recommendation>"),
and appending an id that is already in the chain does nothing. That is what makes re-running a
day produce no duplicate audit events.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import Connection, func, insert, select, text

from rebal_pipeline.workflow.schema import audit_events

GENESIS = "0" * 64
# Postgres: one appender at a time per database (the lock ends with the transaction).
_PG_LOCK_KEY = 0x7265_6261_6C41  # "rebalA"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_encode, ensure_ascii=False)


def _encode(value: Any) -> str:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON-serialisable in an audit event: {type(value).__name__}")


def _utc(moment: datetime) -> datetime:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def event_hash(prev_hash: str, seq: int, event_id: str, occurred_at: datetime, kind: str,
               subject_id: str | None, actor: str, payload: str) -> str:
    body = canonical_json({
        "seq": seq, "event_id": event_id, "occurred_at": _utc(occurred_at), "kind": kind,
        "subject_id": subject_id, "actor": actor, "payload": payload,
    })
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append(conn: Connection, event_id: str, kind: str, actor: str, occurred_at: datetime,
           subject_id: str | None = None, payload: dict | None = None) -> bool:
    """Append one event in the caller's transaction. Returns False (and writes nothing) when an
    event with this id is already in the chain."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("select pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    if conn.execute(select(audit_events.c.seq).where(audit_events.c.event_id == event_id)).first():
        return False
    last = conn.execute(
        select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last.seq + 1, last.hash) if last else (1, GENESIS)
    body = canonical_json(payload or {})
    occurred_at = _utc(occurred_at)
    conn.execute(insert(audit_events).values(
        seq=seq, event_id=event_id, occurred_at=occurred_at, kind=kind, subject_id=subject_id, actor=actor,
        payload=body, prev_hash=prev_hash,
        hash=event_hash(prev_hash, seq, event_id, occurred_at, kind, subject_id, actor, body),
    ))
    return True


@dataclass(frozen=True)
class Verification:
    ok: bool
    events: int
    problem: str | None = None  # the first broken link, in words
    seq: int | None = None  # the event where the chain breaks

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain intact: {self.events} events"
        return f"audit chain BROKEN at event {self.seq}: {self.problem}"


def verify(conn: Connection) -> Verification:
    """Recompute the chain from the first event; name the first event where it breaks."""
    expected_seq, prev_hash, count = 1, GENESIS, 0
    rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings()
    for row in rows:
        count += 1
        if row["seq"] != expected_seq:
            return Verification(False, count, f"events {expected_seq}..{row['seq'] - 1} are missing (deleted)",
                                expected_seq)
        if row["prev_hash"] != prev_hash:
            return Verification(False, count, f"event {row['event_id']!r} does not follow the event before it "
                                "(an event before it was removed or replaced)", row["seq"])
        recomputed = event_hash(prev_hash, row["seq"], row["event_id"], row["occurred_at"], row["kind"],
                                row["subject_id"], row["actor"], row["payload"])
        if recomputed != row["hash"]:
            return Verification(False, count, f"event {row['event_id']!r} ({row['kind']}) was altered after it "
                                "was written: its content no longer matches its hash", row["seq"])
        expected_seq, prev_hash = row["seq"] + 1, row["hash"]
    return Verification(True, count)


def head(conn: Connection) -> tuple[int, str]:
    """(events, hash of the last event): an anchor to write down elsewhere (exports, reports)."""
    last = conn.execute(select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)).first()
    return (0, GENESIS) if last is None else (int(conn.execute(select(func.count()).select_from(audit_events)).scalar()), last.hash)


def export(conn: Connection, out_dir, today: date) -> dict:
    """Write the whole chain as JSON lines plus a manifest (events, head hash, file SHA-256) into
    out_dir/audit-<today>/ — the archive handed to an examiner. Refuses to export a broken chain
    (the manifest would certify it): verify first and fix the cause."""
    from pathlib import Path

    checked = verify(conn)
    if not checked.ok:
        raise ValueError(str(checked))
    folder = Path(out_dir) / f"audit-{today.isoformat()}"
    folder.mkdir(parents=True, exist_ok=False)
    lines = folder / "events.jsonl"
    digest = hashlib.sha256()
    with lines.open("w", encoding="utf-8") as out:
        for row in conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings():
            line = canonical_json({k: (_utc(v) if isinstance(v, datetime) else v) for k, v in row.items()}) + "\n"
            digest.update(line.encode())
            out.write(line)
    count, last = head(conn)
    manifest = {"exported_on": today, "events": count, "head_hash": last, "events_sha256": digest.hexdigest(),
                "file": lines.name, "verified": True}
    (folder / "manifest.json").write_text(canonical_json(manifest) + "\n", encoding="utf-8")
    return {**manifest, "folder": str(folder)}
