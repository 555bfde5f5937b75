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
    Column("action", String(32), nullable=False),  # approve, modify, defer, escalate, auto_approve, return_to_advisor, comment (0004: 32)
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
    # Audit record (issue 13): the id of the HMAC key that signed the event (audit.py); NULL for
    # events written before the chain was keyed (plain SHA-256, accepted only as a prefix).
    Column("key_id", String(32)),
    UniqueConstraint("event_id", name="uq_wf_audit_events_event_id"),
)

# ---- Audit record (issue 13, migration 0005): policy versions and configuration snapshots ----
# Every drift-policy version the daily run has used, with the exact file content, so any past
# day's alerts can be explained from the store alone.
policy_versions = Table(
    "wf_policy_versions", metadata,
    Column("version_id", String(64), primary_key=True),  # <version>+<first 12 hex of the file SHA-256>
    Column("version", String(64), nullable=False),
    Column("content_sha256", String(64), nullable=False),
    Column("content", Text, nullable=False),
    Column("first_seen_as_of", Date, nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
)

# The last-seen configuration per scope (config_events.py): an IPS, a model, an account's
# suspension. A different hash on a later day is a change, recorded once as an audit event.
config_snapshots = Table(
    "wf_config_snapshots", metadata,
    Column("kind", String(32), primary_key=True),  # ips_targets | model_weights | suspension
    Column("scope_id", String(200), primary_key=True),
    Column("content_sha256", String(64), nullable=False),
    Column("content", Text, nullable=False),  # the canonical text hashed (names the previous value)
    Column("as_of", Date, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
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

# ---- People and authority (issue 12 items 6–7, migration 0004) ------------------------------
# Added to existing tables here, in one place, so the shared definitions above stay as they were.
# Users leave: `deactivated_*` say when, by whom (rebal:feed when users.csv no longer lists them,
# a person for `rebal users deactivate`) and why. A user deactivated by a person stays inactive
# whatever users.csv says until reactivated deliberately.
users.append_column(Column("deactivated_at", DateTime(timezone=True)))
users.append_column(Column("deactivated_by", String(128)))
users.append_column(Column("deactivation_reason", Text))
# On an advisor's row: their team (team_of) receives copies of their alerts (users.csv optional
# column team_alerts; NULL/false = only the advisor is alerted).
users.append_column(Column("team_alerts", Boolean))
# When the recommendation was last handed to another advisor of record (their predecessor left):
# the advisor_alerts sensor alerts the new advisor once (message key alert:<rec>:<advisor>).
recommendations.append_column(Column("rerouted_at", DateTime(timezone=True)))

# ---- Execution safety (issue 12, migration 0003): the order ledger (workflow/ledger.py) ----
# One order set per account and as-of date (the unique key is the store's own guarantee that no
# re-run, corrected feed or second decision trades an account twice for one day), opened by the
# approval gate in the transaction that records its verdict, and closed when a later day's
# holdings show every line filled or the desk cancels it.
order_sets = Table(
    "wf_order_sets", metadata,
    Column("decision_id", String(64), primary_key=True),
    Column("account_id", String(64), primary_key=True),
    Column("recommendation_id", String(64), nullable=False),
    Column("as_of", Date, nullable=False),  # the recommendation's as-of date
    Column("kind", String(16), nullable=False),  # rebalance | harvest
    Column("positions_as_of", Date, nullable=False),  # the holdings the gate checked the trades against
    Column("state", String(16), nullable=False),  # open | filled | cancelled | partially_filled
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    Column("closed_by", String(128)),
    Column("close_reason", Text),
    UniqueConstraint("account_id", "as_of", name="uq_wf_order_sets_account_as_of"),
    Index("ix_wf_order_sets_account_state", "account_id", "state"),
)

# The lines of an order set: one per account, symbol and side. base_quantity is the position the
# line starts from (the latest holdings net of the account's earlier open lines on the symbol):
# the line is filled once a later day's holdings have moved from it by the line's quantity.
ledger_orders = Table(
    "wf_ledger_orders", metadata,
    Column("decision_id", String(64), primary_key=True),
    Column("account_id", String(64), primary_key=True),
    Column("symbol", String(32), primary_key=True),
    Column("side", String(8), primary_key=True),
    Column("quantity", Float, nullable=False),
    Column("est_price", Float, nullable=False),
    Column("fund_at_nav", Boolean, nullable=False, default=False),  # ordered as dollars: shares struck at NAV
    Column("base_quantity", Float, nullable=False),
    Column("base_as_of", Date, nullable=False),
    Column("state", String(16), nullable=False),  # open | filled | cancelled
    Column("filled_on", Date),  # the holdings date that showed the fill
    Column("closed_at", DateTime(timezone=True)),
    Column("closed_by", String(128)),
    Column("close_reason", Text),
    Index("ix_wf_ledger_orders_account_state", "account_id", "state"),
)

# One row per account: the approval gate locks it (SELECT ... FOR UPDATE on Postgres; SQLite's
# BEGIN IMMEDIATE serialises writers already) so two gates never pass on one stale view.
account_locks = Table(
    "wf_account_locks", metadata,
    Column("account_id", String(64), primary_key=True),
)

# ---- The portal's sign-in (issue 16, migration 0006): sessions and single-use sign-in links ----
# workflow/sessions.py is the rule. Both tables hold SHA-256 digests of the secrets only (the
# cookie's session id, the emailed link's token): a leaked table signs nobody in.
portal_sessions = Table(
    "wf_portal_sessions", metadata,
    Column("session_sha256", String(64), primary_key=True),
    Column("user_id", String(64), nullable=False),
    # The session's CSRF token: the hidden field of every form the portal serves this session.
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),  # the idle timeout counts from here
    Column("expires_at", DateTime(timezone=True), nullable=False),  # the absolute lifetime
    Index("ix_wf_portal_sessions_user", "user_id"),
)

sign_in_links = Table(
    "wf_sign_in_links", metadata,
    Column("token_sha256", String(64), primary_key=True),
    # Public id of the link: the sign-in email's message key (sign_in:<link_id>), audit events.
    Column("link_id", String(32), nullable=False, unique=True),
    Column("user_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),  # set once, by the POST that signs in
    Index("ix_wf_sign_in_links_user_created", "user_id", "created_at"),
)

# ---- Market-event batch scans (issue 16, migration 0007) ----
# market_events/batches.py is the rule (invariants E1–E6 in its docstring). One batch per New York
# trading day; every market event of the day (a basket move seen in the intraday prices, or one an
# operator declared) extends it; the recommendations its scans published join it while they wait
# for a person; the decisions on them go out together in releases (block orders per custodian and
# symbol), each decision in exactly one release.
market_batches = Table(
    "wf_market_batches", metadata,
    Column("batch_id", String(32), primary_key=True),  # mev-YYYYMMDD: the trading day
    Column("trading_day", Date, nullable=False, unique=True),
    Column("session_as_of", Date, nullable=False),  # the closed session whose book the scans value
    Column("opened_at", DateTime(timezone=True), nullable=False),
    # When the held decisions go out: the latest event's time + the policy's release_after_minutes
    # (each event of the day moves it later), then at every tick while decisions are held.
    Column("release_due_at", DateTime(timezone=True), nullable=False),
    Column("events", Integer, nullable=False, default=0),
)

market_events = Table(
    "wf_market_events", metadata,
    Column("event_id", String(48), primary_key=True),  # <batch_id>-e<seq>
    # What makes the event once: prices:<SHA-256 of the prices file> or operator:<day>:<digest>.
    Column("event_key", String(200), nullable=False, unique=True),
    Column("batch_id", String(32), ForeignKey("wf_market_batches.batch_id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("source", String(16), nullable=False),  # prices | operator
    Column("declared_by", String(64), nullable=False),  # the operator's user id, or rebal:market_events
    Column("reason", Text, nullable=False),
    Column("move", Float),  # the basket's move since the reference (None: declared without prices)
    Column("reference", Text, nullable=False),  # canonical JSON: basket, prices, reference, archive
    Column("detected_at", DateTime(timezone=True), nullable=False),
    Column("scanned_at", DateTime(timezone=True)),  # set once, by the scan that published
    Column("scan_run_id", String(64)),
    Column("recommendations", Integer),  # how many joined the batch through this event's scan
    UniqueConstraint("batch_id", "seq", name="uq_wf_market_events_batch_seq"),
)

batch_recommendations = Table(
    "wf_batch_recommendations", metadata,
    Column("recommendation_id", String(64), ForeignKey("wf_recommendations.recommendation_id"), primary_key=True),
    Column("batch_id", String(32), ForeignKey("wf_market_batches.batch_id"), nullable=False),
    Column("event_id", String(48), ForeignKey("wf_market_events.event_id"), nullable=False),
    Column("severity", Float, nullable=False),  # worst |drift| ÷ band at the event's prices
    Column("added_at", DateTime(timezone=True), nullable=False),
    Index("ix_wf_batch_recommendations_batch", "batch_id"),
)

batch_releases = Table(
    "wf_batch_releases", metadata,
    Column("release_id", String(48), primary_key=True),  # <batch_id>-r<seq>
    Column("batch_id", String(32), ForeignKey("wf_market_batches.batch_id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
    Column("claimed_by_run", String(64), nullable=False),
    UniqueConstraint("batch_id", "seq", name="uq_wf_batch_releases_batch_seq"),
)

batch_release_decisions = Table(
    "wf_batch_release_decisions", metadata,
    # The primary key is the rule "each decision in one release only" (E5).
    Column("decision_id", String(64), ForeignKey("wf_decisions.decision_id"), primary_key=True),
    Column("release_id", String(48), ForeignKey("wf_batch_releases.release_id"), nullable=False),
    Index("ix_wf_batch_release_decisions_release", "release_id"),
)
