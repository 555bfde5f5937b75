"""Every configuration change is an audit event, once, when first seen (issue 13, Rule 204-2).

The daily run reads the day's configuration from the warehouse's staging tables and the drift
policy in force (`read_snapshot`), and `record_configuration` compares it with the last-seen
snapshot in the workflow store (`wf_config_snapshots`: one content hash per kind and scope):

  policy_version_adopted     a drift-policy version not seen before; its exact file content is
                             stored in `wf_policy_versions` (and in the event), so any past day's
                             alerts can be explained from the store alone
  ips_targets_changed        an account's or household's IPS targets (first seen, or different
                             from the last feed that had them)       ips_targets_removed
  model_weights_changed      a model's security weights                model_removed
  account_suspended          an account suspended (with the reason), or its reason changed
  account_resumed            a suspended account trading again
Users added, changed or deactivated are recorded by lifecycle.sync_users (not repeated here).

Invariants (test_audit_record.py): one event per change; re-running a day, or a later day with
the same configuration, appends nothing (the snapshot is updated in the same transaction as the
events, and event ids carry the day and the content hash). Hashes are computed per scope in
DuckDB, the snapshot is read and written in bulk, the events appended with audit.append_many.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from sqlalchemy import Connection, and_, delete, insert, select

from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import config_snapshots, policy_versions

ACTOR = "rebal:configuration"
KINDS = ("ips_targets", "model_weights", "suspension")
# The staging tables the snapshot is read from (dbt_like_sql/staging).
INPUTS = ("stg_feed_ips_targets", "stg_feed_models", "stg_feed_accounts")

# One row per scope: a canonical text of its configuration and that text's SHA-256.
SNAPSHOT_SQL = {
    "ips_targets": """
        select scope || ':' || scope_id as scope_key,
               string_agg(asset_class || '=' || cast(target_weight as varchar), ',' order by asset_class) as content
        from stg_feed_ips_targets where as_of = $as_of group by all""",
    "model_weights": """
        select model_id as scope_key,
               string_agg(symbol || '=' || cast(weight as varchar), ',' order by symbol) as content
        from stg_feed_models where as_of = $as_of group by all""",
    "suspension": """
        select account_id as scope_key,
               case when suspended then 'suspended|' || coalesce(suspended_reason, '') else 'active|' end as content
        from stg_feed_accounts where as_of = $as_of""",
}


@dataclass(frozen=True)
class PolicyVersion:
    version_id: str
    version: str
    content: str  # the policy file, exactly

    @property
    def content_sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass
class ConfigurationSnapshot:
    """The day's configuration: kind → scope → (sha256, canonical content)."""

    as_of: date
    scopes: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    policy: PolicyVersion | None = None


def policy_version(policy, policy_file: str | Path | None) -> PolicyVersion:
    """The drift policy in force (core.policy.DriftPolicy) with its file's content."""
    from rebal_pipeline.core.policy import DEFAULT_POLICY_FILE

    path = Path(policy_file) if policy_file else DEFAULT_POLICY_FILE
    return PolicyVersion(policy.version_id, policy.version, path.read_bytes().decode("utf-8"))


def read_snapshot(con, as_of: date, policy: PolicyVersion | None = None) -> ConfigurationSnapshot:
    """Read the day's configuration from the warehouse (one grouped query per kind; hashes in
    DuckDB). A staging table the warehouse does not have yet is left out (nothing compared)."""
    import duckdb

    snapshot = ConfigurationSnapshot(as_of=as_of, policy=policy)
    for kind, sql in SNAPSHOT_SQL.items():
        try:
            rows = con.execute(f"select scope_key, sha256(content), content from ({sql})", {"as_of": as_of}).fetchall()
        except duckdb.CatalogException:
            continue
        snapshot.scopes[kind] = {key: (digest, content) for key, digest, content in rows}
    return snapshot


def _pairs(content: str) -> dict[str, float]:
    out = {}
    for part in filter(None, content.split(",")):
        name, _, value = part.rpartition("=")
        out[name] = float(value)
    return out


def _event(kind: str, scope_key: str, as_of: date, now: datetime, digest: str, content: str,
           previous: str | None, previous_content: str | None = None) -> dict | None:
    base = {"as_of": as_of, "sha256": digest, "previous_sha256": previous}
    if kind == "ips_targets":
        scope, _, scope_id = scope_key.partition(":")
        return {"kind": "ips_targets_changed", "subject_id": scope_id,
                "payload": {**base, "scope": scope, "scope_id": scope_id, "targets": _pairs(content),
                            "first_seen": previous is None}}
    if kind == "model_weights":
        return {"kind": "model_weights_changed", "subject_id": scope_key,
                "payload": {**base, "model_id": scope_key, "weights": _pairs(content), "first_seen": previous is None}}
    status, _, reason = content.partition("|")
    was_suspended = (previous_content or "active|").startswith("suspended|")
    if status == "suspended":
        return {"kind": "account_suspended", "subject_id": scope_key,
                "payload": {**base, "account_id": scope_key, "reason": reason or None,
                            "reason_changed": was_suspended}}
    if was_suspended:
        return {"kind": "account_resumed", "subject_id": scope_key,
                "payload": {**base, "account_id": scope_key, "previous_reason": previous_content.partition("|")[2] or None}}
    return None  # an active account seen for the first time is not a change


REMOVED = {"ips_targets": "ips_targets_removed", "model_weights": "model_removed"}


@dataclass(frozen=True)
class ConfigurationChanges:
    events: int
    by_kind: dict[str, int]


def record_configuration(conn: Connection, as_of: date, snapshot: ConfigurationSnapshot,
                         now: datetime) -> ConfigurationChanges:
    """Append one audit event per configuration change since the last-seen snapshot, and store
    today's snapshot, in the caller's transaction. Idempotent for a day."""
    now = audit._utc(now)
    events: list[dict] = []
    if snapshot.policy is not None:
        p = snapshot.policy
        known = conn.execute(select(policy_versions.c.version_id, policy_versions.c.content_sha256).where(
            policy_versions.c.version_id == p.version_id)).first()
        if known is None:
            previous = conn.execute(select(policy_versions.c.version_id).order_by(
                policy_versions.c.first_seen_at.desc(), policy_versions.c.version_id.desc()).limit(1)).scalar()
            conn.execute(insert(policy_versions).values(
                version_id=p.version_id, version=p.version, content_sha256=p.content_sha256, content=p.content,
                first_seen_as_of=as_of, first_seen_at=now))
            events.append({"event_id": f"config:policy:{p.version_id}", "kind": "policy_version_adopted",
                           "subject_id": p.version_id, "payload": {
                               "version_id": p.version_id, "version": p.version, "as_of": as_of,
                               "content_sha256": p.content_sha256, "content": p.content, "previous": previous}})
    for kind in KINDS:
        today = snapshot.scopes.get(kind)
        if today is None:
            continue
        last = {r.scope_id: (r.content_sha256, r.content) for r in conn.execute(
            select(config_snapshots.c.scope_id, config_snapshots.c.content_sha256, config_snapshots.c.content)
            .where(config_snapshots.c.kind == kind))}
        changed = [key for key, (digest, _) in today.items() if key not in last or last[key][0] != digest]
        # Removed from a feed that still has this kind (a feed without any rows of it changes nothing).
        removed = [key for key in last if key not in today] if today and kind in REMOVED else []
        for key in sorted(changed):
            digest, content = today[key]
            before = last.get(key)
            event = _event(kind, key, as_of, now, digest, content, before and before[0], before and before[1])
            if event is not None:
                events.append({**event, "event_id": f"config:{kind}:{key}:{as_of.isoformat()}:{digest[:16]}"})
        for key in sorted(removed):
            subject = key.partition(":")[2] if kind == "ips_targets" else key
            events.append({"event_id": f"config:{kind}:{key}:{as_of.isoformat()}:removed", "kind": REMOVED[kind],
                           "subject_id": subject, "payload": {"as_of": as_of, "scope": key,
                                                              "previous_sha256": last[key][0]}})
        stale = changed + removed
        for offset in range(0, len(stale), 500):
            conn.execute(delete(config_snapshots).where(and_(
                config_snapshots.c.kind == kind, config_snapshots.c.scope_id.in_(stale[offset:offset + 500]))))
        if changed:
            conn.execute(insert(config_snapshots), [
                {"kind": kind, "scope_id": key, "content_sha256": today[key][0], "content": today[key][1],
                 "as_of": as_of, "seen_at": now} for key in changed])
    appended = audit.append_many(conn, [{**e, "actor": ACTOR, "occurred_at": now} for e in events])
    by_kind: dict[str, int] = {}
    for e in events:
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
    return ConfigurationChanges(appended, by_kind)
