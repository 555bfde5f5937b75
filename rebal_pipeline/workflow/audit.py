"""The audit chain: append-only, keyed (HMAC-SHA256), anchored outside the database
(SEC Rule 204-2, 17a-4(f) audit-trail alternative).

Invariants (tested in rebal_pipeline_tests/approvals/test_audit_record.py, SQLite and Postgres):
  1. Every event carries the previous event's hash; its own hash is HMAC-SHA256 under the audit
     key over that and a canonical JSON encoding of the event (sorted keys, no whitespace,
     ISO-8601 UTC times, the key id included). Editing any field of any event, deleting one,
     reordering them, or appending one without the key breaks the chain at a named place: whoever
     can rewrite rows but does not hold the key cannot recompute the chain.
  2. Sequence numbers are previous + 1 from 1: a deleted event is a visible gap.
  3. After every run that appends, the head (seq, hash, count) is written down outside the
     database, in a write-once anchor file (0440) in the archive, signed with the key. `verify`
     compares the chain with every anchor: a deleted tail or a wiped table is named even though
     the rows that would show it are gone.
  4. A decision's event carries the SHA-256 of the exact package and trades decided on; `verify`
     checks every `wf_decisions` row and every decided package against its event, and
     `decision_record_problems` lets the approval gate refuse a decision whose record no longer
     matches.
  5. Appending is idempotent: each event has a deterministic `event_id` (e.g.
     "alert:<recommendation>"); appending an id already in the chain does nothing, so re-running
     a day writes no duplicate event.

The key: REBAL_AUDIT_KEY (at least 32 characters), required. Only with REBAL_SANDBOX=1 (the
drill, local experiments) is a built-in sandbox key used instead; it is public, so events it
signed are refused by any verify that is not itself in the sandbox. Rotation: each event stores the
id of the key that signed it (`key_id`, derived from the key); old keys stay verifiable through
REBAL_AUDIT_KEYS (comma-separated). See docs/audit.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Connection, func, insert, select, text

from rebal_pipeline.workflow.schema import audit_events, decisions, recommendations
from rebal_pipeline.core.clock import utc as _utc

GENESIS = "0" * 64
HASH_ALGORITHM = "HMAC-SHA256"
ANCHOR_FORMAT = "rebal.audit_anchor/1"
EXPORT_FORMAT = "rebal.audit_export/1"
SANDBOX_KEY_ID = "sandbox"
# Public by design: only for REBAL_SANDBOX=1. Events signed with it are not evidence.
_SANDBOX_KEY = hashlib.sha256(b"rebal sandbox audit key - public, never for production").hexdigest().encode()
MIN_KEY_LENGTH = 32
# Postgres: one appender at a time per database (the lock ends with the transaction).
_PG_LOCK_KEY = 0x7265_6261_6C41  # "rebalA"
# Decision-event fields that are not the decision's own payload.
_DECISION_META = ("reason", "via", "package_sha256", "trades_sha256")
_MAX_PROBLEMS = 25


class AuditKeyError(RuntimeError):
    """No usable audit key in the environment."""


class AuditBroken(ValueError):
    """The chain does not verify: nothing is anchored or exported on top of it."""


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def _settings(rebal_settings=None):
    """The settings given, else the process environment's (settings.py validates them)."""
    if rebal_settings is not None:
        return rebal_settings
    from rebal_pipeline import settings

    return settings.current()


def _secret(value) -> str:
    return value.get_secret_value() if value is not None else ""


def sandbox(rebal_settings=None) -> bool:
    return _settings(rebal_settings).sandbox


def key_id_of(key: bytes) -> str:
    """A key's public id: derived from the key, so a keyring needs no separate ids."""
    return "k" + hmac.new(key, b"rebal audit key id", hashlib.sha256).hexdigest()[:15]


def _checked(raw: str, variable: str) -> bytes:
    key = raw.strip().encode()
    if len(key) < MIN_KEY_LENGTH:
        raise AuditKeyError(f"{variable}: an audit key must be at least {MIN_KEY_LENGTH} characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


def signing_key(rebal_settings=None) -> tuple[str, bytes]:
    """(key id, key) that signs new events: REBAL_AUDIT_KEY, or the sandbox key with REBAL_SANDBOX=1."""
    current = _settings(rebal_settings)
    raw = _secret(current.audit_key)
    if raw.strip():
        key = _checked(raw, "REBAL_AUDIT_KEY")
        return key_id_of(key), key
    if current.sandbox:
        return SANDBOX_KEY_ID, _SANDBOX_KEY
    raise AuditKeyError("REBAL_AUDIT_KEY is not set: the audit chain is signed with a key from the environment "
                        "(at least 32 characters; keep it out of the database). Only a sandbox (REBAL_SANDBOX=1) "
                        "runs without one.")


def keyring(rebal_settings=None) -> dict[str, bytes]:
    """Every key that may verify: the current one and the old ones in REBAL_AUDIT_KEYS."""
    current = _settings(rebal_settings)
    keys: dict[str, bytes] = {}
    for raw in _secret(current.audit_keys).replace("\n", ",").split(","):
        if raw.strip():
            key = _checked(raw, "REBAL_AUDIT_KEYS")
            keys[key_id_of(key)] = key
    if _secret(current.audit_key).strip():
        key = _checked(_secret(current.audit_key), "REBAL_AUDIT_KEY")
        keys[key_id_of(key)] = key
    if current.sandbox:
        keys[SANDBOX_KEY_ID] = _SANDBOX_KEY
    if not keys:
        signing_key(current)  # raises the explanation
    return keys


def sign(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_encode, ensure_ascii=False)


def _encode(value: Any) -> str:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON-serialisable in an audit event: {type(value).__name__}")


def _moment(value: datetime | str) -> datetime:
    """A stored time as UTC (raw SQL on SQLite hands back ISO text)."""
    return _utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def event_hash(prev_hash: str, seq: int, event_id: str, occurred_at: datetime, kind: str,
               subject_id: str | None, actor: str, payload: str, *, key: bytes | None = None,
               key_id: str | None = None) -> str:
    """HMAC-SHA256 under `key` of prev_hash + the canonical event (its key id included). Without a
    key: the plain SHA-256 of the chain's first, unkeyed version (verification of old events only)."""
    fields = {"seq": seq, "event_id": event_id, "occurred_at": _utc(occurred_at), "kind": kind,
              "subject_id": subject_id, "actor": actor, "payload": payload}
    if key is None:
        return hashlib.sha256((prev_hash + canonical_json(fields)).encode()).hexdigest()
    return sign(key, prev_hash + canonical_json({**fields, "key_id": key_id}))


def append(conn: Connection, event_id: str, kind: str, actor: str, occurred_at: datetime,
           subject_id: str | None = None, payload: dict | None = None) -> bool:
    """Append one event in the caller's transaction. Returns False (and writes nothing) when an
    event with this id is already in the chain."""
    return append_many(conn, [{"event_id": event_id, "kind": kind, "actor": actor, "occurred_at": occurred_at,
                               "subject_id": subject_id, "payload": payload}]) == 1


def append_many(conn: Connection, events: Iterable[dict]) -> int:
    """Append events (dicts with event_id, kind, actor, occurred_at, subject_id, payload) in order,
    in the caller's transaction, with one existence query per 500 ids and one insert: for days
    that record thousands (the first configuration snapshot). Ids already in the chain, or repeated
    in `events`, are skipped. Returns how many were appended."""
    events = list(events)
    if not events:
        return 0
    key_id, key = signing_key()
    if conn.dialect.name == "postgresql":
        conn.execute(text("select pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    ids = [e["event_id"] for e in events]
    seen: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        seen |= set(conn.execute(select(audit_events.c.event_id).where(audit_events.c.event_id.in_(chunk))).scalars())
    last = conn.execute(
        select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last.seq, last.hash) if last else (0, GENESIS)
    rows = []
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        seq += 1
        body = canonical_json(event.get("payload") or {})
        occurred_at = _utc(event["occurred_at"])
        digest = event_hash(prev_hash, seq, event["event_id"], occurred_at, event["kind"], event.get("subject_id"),
                            event["actor"], body, key=key, key_id=key_id)
        rows.append({"seq": seq, "event_id": event["event_id"], "occurred_at": occurred_at, "kind": event["kind"],
                     "subject_id": event.get("subject_id"), "actor": event["actor"], "payload": body,
                     "prev_hash": prev_hash, "hash": digest, "key_id": key_id})
        prev_hash = digest
    if rows:
        conn.execute(insert(audit_events), rows)
    return len(rows)


def head(conn: Connection) -> tuple[int, str]:
    """(events, hash of the last event): an anchor to write down elsewhere (exports, reports)."""
    last = conn.execute(select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)).first()
    return (0, GENESIS) if last is None else (int(conn.execute(select(func.count()).select_from(audit_events)).scalar()), last.hash)


def _head_seq(conn: Connection) -> tuple[int, str, int]:
    last = conn.execute(select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)).first()
    count = int(conn.execute(select(func.count()).select_from(audit_events)).scalar())
    return (0, GENESIS, 0) if last is None else (int(last.seq), last.hash, count)


# ---------------------------------------------------------------------------------------------
# What was decided: the package and trades a decision's event covers
# ---------------------------------------------------------------------------------------------


def decided_trades(action: str, payload: dict, package_json: str) -> list:
    """The trade list a decision decided on: a modify's own `trades` (as the gate executes them),
    else the package's. A modify carrying only `changes` is covered by the package hash plus the
    changes in its event."""
    if action == "modify" and "trades" in payload:
        return json.loads(canonical_json(payload["trades"]))
    return json.loads(package_json).get("trades", [])


def decision_hashes(action: str, payload: dict, package_json: str) -> dict:
    """package_sha256 (the stored package text, byte for byte) and trades_sha256 (canonical JSON
    of the trades decided on): written into the decision's audit event."""
    return {"package_sha256": sha256_text(package_json),
            "trades_sha256": sha256_text(canonical_json(decided_trades(action, payload, package_json)))}


def _decision_problems(decision: dict, event: dict | None, package_json: str | None) -> list[str]:
    """How a wf_decisions row (and its recommendation's package) differs from its audit event."""
    did = decision["decision_id"]
    if event is None:
        return [f"decision {did} ({decision['action']} by {decision['actor_id']}) has no audit event "
                f"decision:{did}: it was inserted into wf_decisions outside rebal"]
    recorded = json.loads(event["payload"])
    problems = []
    differs = []
    if event["kind"] != f"decision_{decision['action']}":
        differs.append(f"action {decision['action']!r} (the event says {event['kind'].removeprefix('decision_')!r})")
    if event["actor"] != decision["actor_id"]:
        differs.append(f"decided by {decision['actor_id']!r} (the event says {event['actor']!r})")
    if event["subject_id"] != decision["recommendation_id"]:
        differs.append(f"recommendation {decision['recommendation_id']!r} (the event says {event['subject_id']!r})")
    if recorded.get("reason") != decision["reason"]:
        differs.append("reason")
    if recorded.get("via") != decision["via"]:
        differs.append(f"via {decision['via']!r} (the event says {recorded.get('via')!r})")
    own = {k: v for k, v in recorded.items() if k not in _DECISION_META}
    try:
        stored_payload = json.loads(decision["payload"] or "{}")
    except ValueError:
        stored_payload = None
    if stored_payload != own:
        differs.append("payload (e.g. the modified trades)")
    if _moment(decision["created_at"]) != _moment(event["occurred_at"]):
        differs.append("time")
    if differs:
        problems.append(f"decision {did} in wf_decisions was edited after it was recorded: " + ", ".join(differs)
                        + f" no longer match its audit event decision:{did}")
    if "package_sha256" in recorded:
        if package_json is None:
            problems.append(f"the recommendation {decision['recommendation_id']} decided by {did} is missing")
        elif sha256_text(package_json) != recorded["package_sha256"]:
            problems.append(f"the package of recommendation {decision['recommendation_id']} was changed after "
                            f"decision {did} ({decision['action']} by {decision['actor_id']}): its SHA-256 no "
                            "longer matches the decision's audit event")
        elif stored_payload is not None and "trades_sha256" in recorded and sha256_text(canonical_json(
                decided_trades(decision["action"], stored_payload, package_json))) != recorded["trades_sha256"]:
            problems.append(f"the trades of decision {did} no longer match the trades its audit event recorded")
    return problems


def decision_record_problems(conn: Connection, decision: dict, rec: dict) -> list[str]:
    """For the approval gate: why this decision's record cannot be trusted (empty: it can). The
    decision's audit event must exist and be signed, the wf_decisions row must match it, and the
    stored package and the trades to execute must be the ones decided on."""
    event = conn.execute(select(audit_events).where(
        audit_events.c.event_id == f"decision:{decision['decision_id']}")).mappings().first()
    if event is not None:
        problem = _signature_problem(dict(event), keyring())
        if problem:
            return [problem]
    return _decision_problems(dict(decision), dict(event) if event is not None else None, rec.get("package"))


# ---------------------------------------------------------------------------------------------
# Anchors: the head written down outside the database
# ---------------------------------------------------------------------------------------------


def store_identity(conn: Connection) -> str:
    """Which store an anchor belongs to (no password): the SQLite file, or host/port/database."""
    url = conn.engine.url
    if url.get_backend_name() == "sqlite":
        return f"sqlite:{Path(url.database).resolve()}" if url.database and url.database != ":memory:" else "sqlite:memory"
    return f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"


def anchor_dir(conn: Connection, archive_root: Path | str | None = None, rebal_settings=None) -> Path:
    """REBAL_AUDIT_ANCHOR_DIR, else <archive>/audit_anchors/<store digest>/, the archive being the
    one given (the Dagster feed resource's) or the settings' archive root (REBAL_ARCHIVE_ROOT).
    `rebal_settings`: a RebalSettings (default: the process environment's, read now)."""
    current = _settings(rebal_settings)
    if current.audit_anchor_dir is not None and str(current.audit_anchor_dir).strip():
        return Path(str(current.audit_anchor_dir).strip())
    if archive_root is None:
        archive_root = current.archive_root()
    return Path(archive_root) / "audit_anchors" / sha256_text(store_identity(conn))[:16]


def anchor(conn: Connection, now: datetime, folder: Path | None = None, rebal_settings=None) -> dict | None:
    """Write the head down in a write-once anchor file (0440), signed with the audit key: one per day
    and head (<day>_<seq>.json; nothing new while the head has not moved). Refuses to anchor a chain
    that does not verify. Returns the anchor (with its `file`), or None for an empty chain.
    `rebal_settings`: the keys and the anchor folder's settings (default: the process environment's)."""
    folder = Path(folder) if folder is not None else anchor_dir(conn, rebal_settings=rebal_settings)
    checked = verify(conn, anchors=folder, rebal_settings=rebal_settings)
    if not checked.ok:
        raise AuditBroken(str(checked))
    seq, last, count = _head_seq(conn)
    if seq == 0:
        return None
    now = _utc(now)
    existing = [a for a in _read_anchors(folder) if a.get("seq") == seq and a.get("hash") == last]
    if existing:
        return existing[0]
    key_id, key = signing_key(rebal_settings)
    document = {"format": ANCHOR_FORMAT, "store": store_identity(conn), "seq": seq, "hash": last, "events": count,
                "anchored_at": now, "hash_algorithm": HASH_ALGORITHM, "key_id": key_id}
    document = json.loads(canonical_json(document))
    document["signature"] = sign(key, canonical_json(document))
    path = folder / f"{now.date().isoformat()}_{seq:012d}.json"
    _write_once(path, canonical_json(document) + "\n", mode=0o440)
    return {**document, "file": str(path)}


def _write_once(path: Path, content: str, mode: int) -> bool:
    """Atomic and write-once: a temporary dot-file, then a hard link that fails when the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        return False
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, mode)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read_anchors(folder: Path) -> list[dict]:
    out = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            document = {"unreadable": str(exc)}
        out.append({**document, "file": str(path)})
    return out


def _anchor_problem(document: dict, keys: dict[str, bytes]) -> str | None:
    name = Path(document["file"]).name
    if "unreadable" in document:
        return f"anchor {name} cannot be read: {document['unreadable']}"
    body = {k: v for k, v in document.items() if k not in ("signature", "file")}
    key = keys.get(document.get("key_id"))
    if key is None:
        return f"anchor {name} is signed with key {document.get('key_id')!r}, which is not in REBAL_AUDIT_KEY/REBAL_AUDIT_KEYS"
    if not hmac.compare_digest(str(document.get("signature", "")), sign(key, canonical_json(body))):
        return f"anchor {name} is not signed by the audit key: it was altered or forged"
    return None


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    ok: bool
    events: int
    problem: str | None = None  # the first problem, in words
    seq: int | None = None  # the event where the chain breaks (None: not one event)
    problems: tuple[str, ...] = ()  # every problem found (the first ones, at most 25)
    anchor: str | None = None  # the latest anchor file checked
    legacy_events: int = 0  # unkeyed events from before the chain was keyed
    decisions: int = 0  # wf_decisions rows checked against the chain
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        if self.ok:
            parts = [f"audit chain intact: {self.events} events"]
            parts.append(f"matches the latest anchor {Path(self.anchor).name}" if self.anchor else "not anchored yet")
            if self.decisions:
                parts.append(f"{self.decisions} decisions match their events")
            if self.legacy_events:
                parts.append(f"the first {self.legacy_events} events predate the keyed chain (SHA-256 only)")
            return "; ".join(parts + list(self.notes))
        first = (f"audit chain BROKEN at event {self.seq}: {self.problem}" if self.seq is not None
                 else f"audit record BROKEN: {self.problem}")
        return "\n".join([first, *(f"  also: {p}" for p in self.problems[1:])])


def _signature_problem(row: dict, keys: dict[str, bytes]) -> str | None:
    key_id = row.get("key_id")
    args = (row["prev_hash"], row["seq"], row["event_id"], row["occurred_at"], row["kind"], row["subject_id"],
            row["actor"], row["payload"])
    if key_id is None:
        expected = event_hash(*args)
    elif key_id not in keys:
        return (f"event {row['event_id']!r} ({row['kind']}) is signed with key {key_id!r}, which is not in "
                "REBAL_AUDIT_KEY/REBAL_AUDIT_KEYS" + (" (the public sandbox key: not evidence outside the sandbox)"
                                                      if key_id == SANDBOX_KEY_ID else ""))
    else:
        expected = event_hash(*args, key=keys[key_id], key_id=key_id)
    if not hmac.compare_digest(expected, row["hash"]):
        return (f"event {row['event_id']!r} ({row['kind']}) was altered after it was written, or inserted without "
                "the audit key: its content no longer matches its signature")
    return None


def verify(conn: Connection, anchors: Path | None | bool = None, rebal_settings=None) -> Verification:
    """Recompute the chain from the first event and name where it breaks; compare it with every
    anchor (`anchors`: a folder, None for anchor_dir(conn), False to skip); check every
    wf_decisions row and decided package against its event. `rebal_settings`: the keys (and the
    anchor folder, for None) of these settings (default: the process environment's, read now)."""
    keys = keyring(rebal_settings)
    problems: list[tuple[int | None, str]] = []
    expected_seq, prev_hash, count, legacy, keyed_seen = 1, GENESIS, 0, 0, False
    hashes: dict[int, str] = {}
    decision_events: dict[str, dict] = {}
    gate_events: dict[str, dict] = {}
    for row in conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings():
        row = dict(row)
        count += 1
        if row["seq"] != expected_seq:
            problems.append((expected_seq, f"gap: events {expected_seq}..{row['seq'] - 1} are missing (deleted)"))
        elif row["prev_hash"] != prev_hash:
            problems.append((row["seq"], f"event {row['event_id']!r} does not follow the event before it "
                                         "(an event before it was removed, replaced or inserted)"))
        if row["key_id"] is None:
            if keyed_seen:
                problems.append((row["seq"], f"event {row['event_id']!r} ({row['kind']}) is unsigned although "
                                             "events before it are signed: inserted or forged"))
            legacy += 1
        else:
            keyed_seen = True
        problem = _signature_problem(row, keys)
        if problem:
            problems.append((row["seq"], problem))
        hashes[row["seq"]] = row["hash"]
        if row["event_id"].startswith("decision:"):
            decision_events[row["event_id"].removeprefix("decision:")] = row
        elif row["event_id"].startswith("gate:"):
            gate_events[row["event_id"].removeprefix("gate:")] = row
        expected_seq, prev_hash = row["seq"] + 1, row["hash"]

    latest = None
    if anchors is not False:
        folder = (anchor_dir(conn, rebal_settings=rebal_settings) if anchors is None or anchors is True
                  else Path(anchors))
        documents = _read_anchors(folder)
        good = []
        for document in documents:
            problem = _anchor_problem(document, keys)
            if problem:
                problems.append((None, problem))
            else:
                good.append(document)
        top = max(hashes, default=0)
        for document in sorted(good, key=lambda d: d["seq"]):
            name = Path(document["file"]).name
            seq = document["seq"]
            if count == 0:
                problems.append((None, f"full wipe: the store holds no audit events, but anchor {name} "
                                       f"(anchored {document['anchored_at']}) records {document['events']} events "
                                       f"ending in {document['hash'][:16]}…"))
                break
            if seq not in hashes:
                if seq > top:
                    problems.append((top + 1, f"missing tail: events {top + 1}..{seq} are gone; anchor {name} "
                                              f"(anchored {document['anchored_at']}) records {document['events']} "
                                              f"events ending in {document['hash'][:16]}…"))
                else:
                    problems.append((seq, f"event {seq}, anchored in {name}, is missing"))
            elif hashes[seq] != document["hash"]:
                problems.append((seq, f"event {seq} is not the event anchored in {name}: the chain was rewritten "
                                      "up to it"))
            elif sum(1 for s in hashes if s <= seq) != document["events"]:
                problems.append((seq, f"anchor {name} records {document['events']} events up to event {seq}"))
        latest = max(good, key=lambda d: d["seq"])["file"] if good else None

    checked_decisions = 0
    rows = [dict(r) for r in conn.execute(select(decisions)).mappings()]
    if rows or decision_events:
        packages = dict(conn.execute(select(recommendations.c.recommendation_id, recommendations.c.package).where(
            recommendations.c.recommendation_id.in_(select(decisions.c.recommendation_id)))).all())
        for decision in rows:
            checked_decisions += 1
            for problem in _decision_problems(decision, decision_events.pop(decision["decision_id"], None),
                                              packages.get(decision["recommendation_id"])):
                problems.append((None, problem))
            gate = gate_events.pop(decision["decision_id"], None)
            if decision["gate_verdict"] is not None:
                if gate is None:
                    problems.append((None, f"decision {decision['decision_id']} has a gate verdict "
                                           f"({decision['gate_verdict']}) with no audit event gate:{decision['decision_id']}"))
                elif (gate["kind"] != f"gate_{decision['gate_verdict']}"
                      or json.loads(gate["payload"]).get("reason") != decision["gate_reason"]):
                    problems.append((None, f"the gate verdict of decision {decision['decision_id']} in wf_decisions "
                                           f"was edited: it no longer matches its audit event gate:{decision['decision_id']}"))
            elif gate is not None:
                problems.append((None, f"decision {decision['decision_id']}'s gate verdict ({gate['kind']}) was "
                                       "removed from wf_decisions"))
        for decision_id, event in decision_events.items():
            problems.append((None, f"decision {decision_id} ({event['kind'].removeprefix('decision_')} by "
                                   f"{event['actor']} on {event['subject_id']}) is in the audit chain but was "
                                   "deleted from wf_decisions"))
    if problems:
        # The first problem named is the earliest event where the chain breaks, else the first found.
        located = [p for p in problems if p[0] is not None]
        first_seq = min(p[0] for p in located) if located else None
        ordered = sorted(problems, key=lambda p: (p[0] != first_seq, 0))
        texts = list(dict.fromkeys(p[1] for p in ordered))
        return Verification(False, count, texts[0], first_seq, tuple(texts[:_MAX_PROBLEMS]), latest, legacy,
                            checked_decisions)
    return Verification(True, count, anchor=latest, legacy_events=legacy, decisions=checked_decisions)


# ---------------------------------------------------------------------------------------------
# Export for an examiner
# ---------------------------------------------------------------------------------------------


def _new_folder(out_dir: Path, name: str) -> Path:
    """audit-…/, or audit-…-v2/, -v3/ … when an export of the same name exists (never overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    version = 1
    while True:
        folder = out_dir / (name if version == 1 else f"{name}-v{version}")
        try:
            folder.mkdir(mode=0o700)
            return folder
        except FileExistsError:
            version += 1


def _write_private(path: Path, lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        for line in lines:
            digest.update(line.encode())
            out.write(line)
    os.chmod(path, 0o600)
    return digest.hexdigest()


def _row_json(row: dict) -> str:
    return canonical_json({k: (_utc(v) if isinstance(v, datetime) else v) for k, v in row.items()}) + "\n"


def export(conn: Connection, out_dir, today: date, start: date | None = None, end: date | None = None,
           now: datetime | None = None) -> dict:
    """Write the chain (or the contiguous run of it from the first event dated `start` or later to
    the last dated `end` or earlier) as JSON lines, with the decisions among them, the packages
    they decided on, and a manifest (hash algorithm, counts, head, anchors, file SHA-256s) signed
    with the audit key, into out_dir/audit-<today>/ or audit-<start>_<end>/ (-v2, -v3 … when that
    exists). Files 0600. Refuses to export a broken chain (the manifest would certify it)."""
    checked = verify(conn)
    if not checked.ok:
        raise AuditBroken(str(checked))
    key_id, key = signing_key()
    now = _utc(now or datetime.now(timezone.utc))
    query = select(audit_events).order_by(audit_events.c.seq)
    if start is not None or end is not None:
        since = datetime.combine(start or date.min, datetime.min.time(), timezone.utc)
        first = conn.execute(select(func.min(audit_events.c.seq)).where(audit_events.c.occurred_at >= since)).scalar()
        last_query = select(func.max(audit_events.c.seq))
        if end is not None:
            until = datetime.combine(end, datetime.min.time(), timezone.utc) + timedelta(days=1)
            last_query = last_query.where(audit_events.c.occurred_at < until)
        last = conn.execute(last_query).scalar()
        if first is None or last is None or first > last:
            first, last = 1, 0  # nothing in the range: an empty, still signed, export
        query = query.where(audit_events.c.seq.between(first, last))
    name = (f"audit-{today.isoformat()}" if start is None and end is None
            else f"audit-{(start or date.min).isoformat()}_{(end or today).isoformat()}")
    folder = _new_folder(Path(out_dir), name)
    events = [dict(r) for r in conn.execute(query).mappings()]
    files = {"events.jsonl": _write_private(folder / "events.jsonl", (_row_json(r) for r in events))}
    decided = [e["event_id"].removeprefix("decision:") for e in events if e["event_id"].startswith("decision:")]
    decision_rows: list[dict] = []
    for offset in range(0, len(decided), 500):
        decision_rows += [dict(r) for r in conn.execute(select(decisions).where(
            decisions.c.decision_id.in_(decided[offset:offset + 500])).order_by(decisions.c.decision_seq)).mappings()]
    files["decisions.jsonl"] = _write_private(folder / "decisions.jsonl", (_row_json(r) for r in decision_rows))
    rec_ids = sorted({r["recommendation_id"] for r in decision_rows})
    package_rows: list[dict] = []
    for offset in range(0, len(rec_ids), 500):
        package_rows += [{"recommendation_id": r.recommendation_id, "package_sha256": sha256_text(r.package),
                          "package": r.package}
                         for r in conn.execute(select(recommendations.c.recommendation_id, recommendations.c.package)
                                               .where(recommendations.c.recommendation_id.in_(rec_ids[offset:offset + 500]))
                                               .order_by(recommendations.c.recommendation_id))]
    files["packages.jsonl"] = _write_private(folder / "packages.jsonl", (canonical_json(r) + "\n" for r in package_rows))
    head_seq, head_hash, head_count = _head_seq(conn)
    anchors = [{k: v for k, v in a.items() if k != "file"} | {"file": Path(a["file"]).name}
               for a in _read_anchors(anchor_dir(conn))]
    manifest = {
        "format": EXPORT_FORMAT, "hash_algorithm": HASH_ALGORITHM,
        "chain": "hash = HMAC-SHA256(key[key_id], prev_hash + canonical JSON of {seq, event_id, occurred_at, kind, "
                 "subject_id, actor, payload, key_id}); canonical = sorted keys, no whitespace, UTF-8",
        "manifest_signature": "HMAC-SHA256 of the canonical JSON of this manifest without manifest_hmac",
        "key_id": key_id, "exported_on": today, "exported_at": now, "from": start, "to": end,
        "events": len(events), "first_seq": events[0]["seq"] if events else None,
        "last_seq": events[-1]["seq"] if events else None,
        "start_prev_hash": events[0]["prev_hash"] if events else None,
        "last_hash": events[-1]["hash"] if events else None,
        "head_hash": head_hash, "head": {"seq": head_seq, "hash": head_hash, "events": head_count},
        "decisions": len(decision_rows), "packages": len(package_rows), "anchors": anchors,
        "files": files, "file": "events.jsonl", "verified": True,
    }
    manifest = json.loads(canonical_json(manifest))
    manifest["manifest_hmac"] = sign(key, canonical_json(manifest))
    _write_private(folder / "manifest.json", [canonical_json(manifest) + "\n"])
    return {**manifest, "folder": str(folder)}
