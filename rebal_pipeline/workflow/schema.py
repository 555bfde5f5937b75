"""Tables of the workflow store (SQLAlchemy Core). Changed only through migrations/."""

from sqlalchemy import (
    Boolean, Column, Date, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint,
)

metadata = MetaData()

ROLES = ("advisor", "compliance", "trading_desk", "operations")

users = Table(
    "wf_users", metadata,
    Column("user_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False),
    Column("role", String(32), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    # API tokens are stored as SHA-256 digests only: a leaked table grants nothing.
    Column("api_token_sha256", String(64), unique=True),
)

# Team routing: members may act on (and are notified of) the advisor's recommendations.
advisor_team = Table(
    "wf_advisor_team", metadata,
    Column("advisor_id", String(64), primary_key=True),
    Column("member_user_id", String(64), primary_key=True),
)

recommendations = Table(
    "wf_recommendations", metadata,
    Column("recommendation_id", String(64), primary_key=True),
    # scope:scope_id:kind — the same account's recommendation from day to day.
    Column("lineage", String(200), nullable=False),
    Column("as_of", Date, nullable=False),
    Column("scope", String(16), nullable=False),
    Column("scope_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("household_id", String(64)),
    Column("advisor_id", String(64)),
    Column("tier", String(32)),
    Column("urgency", String(16)),
    Column("delivery", String(32)),
    Column("discretionary", Boolean, nullable=False, default=False),
    Column("trade_value", Float, nullable=False, default=0.0),
    Column("realized_gain", Float, nullable=False, default=0.0),
    Column("policy_version", String(64)),
    Column("positions_fingerprint", String(64)),
    Column("package", Text, nullable=False),  # canonical JSON: drift, trades, tax summary, IPS/model
    # pending → approved / modified / deferred / escalated / auto_approved → executed / refused_by_gate;
    # pending → superseded / resolved_by_market.
    Column("status", String(32), nullable=False),
    # The escalation clock: set when first alerted, carried over when a later day supersedes.
    Column("clock_started_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("supersedes", String(64)),
    Column("superseded_by", String(64)),
    Column("deferred_until", DateTime(timezone=True)),
    Column("reminder_sent_at", DateTime(timezone=True)),
    Column("escalated_at", DateTime(timezone=True)),
    Column("escalated_to", String(64)),
    Index("ix_wf_recommendations_lineage_status", "lineage", "status"),
    Index("ix_wf_recommendations_advisor_status", "advisor_id", "status"),
)

decisions = Table(
    "wf_decisions", metadata,
    # The decision sensor's cursor. Monotonic at insert; on Postgres a lower number may commit
    # after a higher one (sequences are not transactional): the sensor waits for such gaps.
    Column("decision_seq", Integer, primary_key=True, autoincrement=True),
    Column("decision_id", String(64), nullable=False, unique=True),
    Column("recommendation_id", String(64), ForeignKey("wf_recommendations.recommendation_id"), nullable=False),
    Column("action", String(16), nullable=False),  # approve, modify, defer, escalate, auto_approve
    Column("actor_id", String(64), nullable=False),
    Column("via", String(16), nullable=False),  # api, link, policy
    Column("reason", Text),
    Column("payload", Text, nullable=False),  # canonical JSON (modified trades, deferred_until, band check)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("gate_verdict", String(16)),  # passed / refused
    Column("gate_reason", Text),
    Column("gate_checked_at", DateTime(timezone=True)),
)

# One-click links are single-use: the link's id is recorded when used.
used_links = Table(
    "wf_used_links", metadata,
    Column("link_id", String(64), primary_key=True),
    Column("used_at", DateTime(timezone=True), nullable=False),
    Column("recommendation_id", String(64), nullable=False),
    Column("action", String(16), nullable=False),
)

# Exactly-once notifications: the key (e.g. reminder:<recommendation lineage>:<clock start>) is
# inserted in the same transaction as the state change; a second insert fails.
notifications = Table(
    "wf_notifications", metadata,
    Column("notification_key", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),  # reminder, escalation, weekly_digest
    Column("recommendation_id", String(64)),
    Column("recipient_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("payload", Text, nullable=False),
)

# Append-only, hash-chained (audit.py). Postgres and SQLite triggers refuse UPDATE and DELETE.
audit_events = Table(
    "wf_audit_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # previous + 1, no gaps
    Column("event_id", String(200), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(48), nullable=False),
    Column("subject_id", String(200)),
    Column("actor", String(128), nullable=False),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("event_id", name="uq_wf_audit_events_event_id"),
)

# Orders that left (or are leaving) the building: one row per ClOrdID, inserted before the file
# is written and completed after, so a crash between the two is finished, not repeated, on re-run.
submissions = Table(
    "wf_submissions", metadata,
    Column("cl_ord_id", String(32), primary_key=True),
    Column("decision_id", String(64), nullable=False),
    Column("recommendation_id", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("custodian", String(32)),
    Column("symbol", String(32), nullable=False),
    Column("side", String(8), nullable=False),
    Column("quantity", Float),
    Column("cash_amount", Float),
    Column("block_id", String(32)),
    Column("channel", String(16), nullable=False),  # staged (trading desk) | submitted (auto, discretionary)
    Column("destination", Text),
    Column("status", String(16), nullable=False),  # pending | done
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Index("ix_wf_submissions_decision", "decision_id"),
)

# Outbound messages (emails, CRM notes and tasks): one row per idempotency key; a message is sent
# at most once with the same Message-ID / Idempotency-Key, retried later when the peer is down.
messages = Table(
    "wf_messages", metadata,
    Column("message_key", String(200), primary_key=True),
    Column("kind", String(48), nullable=False),  # alert, reminder, escalation, weekly_digest, confirmation, crm_note, crm_task
    Column("channel", String(16), nullable=False),  # smtp | crm
    Column("recipient_id", String(64)),
    Column("recommendation_id", String(64)),
    Column("external_id", String(200)),  # the email's Message-ID, the CRM's record id
    Column("status", String(24), nullable=False),  # pending | sent | retry | rejected
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),  # plain words, never PII or secrets
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True)),
    Index("ix_wf_messages_status", "status", "next_attempt_at"),
)
