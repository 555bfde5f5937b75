"""Resources, configured in one place per environment (see definitions.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import duckdb
from dagster import ConfigurableResource

from rebal_pipeline import settings
from rebal_pipeline.core.policy import DriftPolicy, load_policy

if TYPE_CHECKING:
    import polars as pl

    from rebal_pipeline.workflow.store import WorkflowStore


# The Dagster concurrency pool of every step that opens the warehouse read-write: the daily
# scan's assets (feed, warehouse, trades, workflow) and the approval run's warehouse reads
# (`approval_gate`, `build_order_tickets`). dagster.yaml and instance/local_dagster.yaml limit
# it to one run at a time (`concurrency: pools: granularity: run, default_limit: 1`).
WAREHOUSE_POOL = "rebal_warehouse"


def ensure_warehouse_pool(instance) -> bool:
    """Give the instance the warehouse pool's limit (one run) now, not on first use. With only
    `concurrency: pools: default_limit` in dagster.yaml, Dagster 1.13.27's run queue creates the
    pool's limit in the same dequeue pass that first sees a run needing it, after it has already
    read the configured pools: on a fresh instance that first pass launches every queued run at
    once (seen with a 3-session backfill: all three opened the warehouse together and failed on
    its lock). The drill and `rebal instance init` call this; it is idempotent. Returns True when
    it set the limit."""
    storage = instance.event_log_storage
    if WAREHOUSE_POOL in storage.get_concurrency_keys():
        return False
    storage.set_concurrency_slots(WAREHOUSE_POOL, 1)
    return True


class Warehouse(ConfigurableResource):
    """The DuckDB warehouse file. DuckDB lets one process open a file read-write (then no other
    process may open it at all) or several processes read-only. Runs that open it read-write are
    serialised by Dagster, not by retrying on the lock: their steps are in the `WAREHOUSE_POOL`
    concurrency pool, which the shipped instance configs limit to one run at a time, and the
    run queue (QueuedRunCoordinator, run by dagster-daemon) starts a queued run only when the
    pool is free. So a backfill of many sessions runs them one after another, and the approval
    gate's read waits in the queue until the daily run is done, then sees a finished day.

    Why a run-level pool and not a read-only connection with a bounded wait, or a snapshot copy:
    DuckDB refuses a read-only open while a writer holds the file, so a reader would have to
    sleep and retry (which the issue rules out) or read a copy that is stale by construction and
    doubles the disk at 1M accounts. An op-level pool would let two runs interleave their steps,
    so the gate could read holdings half-way through a day's run; a run-level one cannot.

    `read_only=True` is for readers outside the pool (the mailer's client contacts): they may
    run side by side, and fail fast while a pooled run writes (their callers retry through the
    outbox, comms/outbound.py)."""

    database: str
    # DuckDB's own cap (it spills to disk beyond it); keeps a 1M-account day within ~6 GB.
    memory_limit: str = "4GB"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        from rebal_pipeline.core.private_files import make_private, private_dir

        created = not Path(self.database).exists()
        if not read_only:
            private_dir(Path(self.database).parent)
        con = duckdb.connect(self.database, read_only=read_only, config={"memory_limit": self.memory_limit})
        if created and not read_only:
            make_private(self.database)  # client names and emails: 0600 when rebal creates it
        try:
            yield con
        finally:
            con.close()
            if created and not read_only:
                make_private(self.database, f"{self.database}.wal")


class FeedLocation(ConfigurableResource):
    """Where the canonical feed arrives and where raw files are archived."""

    feed_root: str
    archive_root: str

    def feed_dir(self, as_of: str) -> Path:
        return Path(self.feed_root) / as_of


class DriftPolicySource(ConfigurableResource):
    """The versioned drift policy file (empty = the policy shipped with rebal)."""

    policy_file: str = ""

    def load(self) -> DriftPolicy:
        return load_policy(self.policy_file or None)


class AdvisorOverrides(ConfigurableResource):
    """Advisors' documented overrides of the tax engine (core/overrides.py)."""

    wash_sale_file: str

    def wash_sale_overrides(self, as_of) -> "pl.DataFrame":
        from rebal_pipeline.core.overrides import read_overrides

        return read_overrides(Path(self.wash_sale_file), as_of)


class WorkflowStoreResource(ConfigurableResource):
    """The workflow store (rebal_pipeline/workflow): recommendations, decisions, audit chain.
    The URL may carry a password; it is never logged."""

    url: str

    @contextmanager
    def open(self) -> Iterator["WorkflowStore"]:
        from rebal_pipeline.workflow.store import WorkflowStore

        store = WorkflowStore(self.url)
        try:
            store.migrate()
            yield store
        finally:
            store.dispose()


class FixSessionResource(ConfigurableResource):
    """The FIX session's identity (REBAL_FIX_SENDER_COMP_ID / _TARGET_COMP_ID / _FIRST_SEQ_NUM);
    empty = tickets/fix.py's defaults. Not secret: CompIDs appear in every FIX message."""

    sender_comp_id: str = ""
    target_comp_id: str = ""
    first_seq_num: int = 0

    def session(self):
        """The tickets/fix.py session these values describe (its defaults for those not set)."""
        from rebal_pipeline.tickets.fix import FixSession

        values = {key: value for key, value in (("sender_comp_id", self.sender_comp_id),
                  ("target_comp_id", self.target_comp_id), ("first_seq_num", self.first_seq_num)) if value}
        return FixSession(**values)


def _setting(name: str):
    """A resource field that carries the RebalSettings field `name` as text (validated again by
    `load_settings` when the run uses it), described by its environment variable."""
    from pydantic import Field

    alias = settings.RebalSettings.model_fields[name].validation_alias.choices[0]  # type: ignore[union-attr]
    return Field(default="", description=f"{alias} (empty: not set)")


class SettingsPart(ConfigurableResource):
    """A part of the settings (rebal_pipeline/settings.py) as a Dagster resource: each field is
    named after a RebalSettings field and holds its value as text; a secret is an EnvVar naming
    its variable (the Dagster UI shows the name, never the value). `from_settings` is how
    resources_for builds one; `variables()` gives the values back under their variable names,
    for `load_settings` to validate and type again."""

    @classmethod
    def from_settings(cls, settings_: "settings.RebalSettings") -> "SettingsPart":
        from pydantic import SecretStr

        values = {}
        for name in cls.model_fields:
            value = getattr(settings_, name)
            if value is None:
                continue
            alias = settings.RebalSettings.model_fields[name].validation_alias.choices[0]  # type: ignore[union-attr]
            values[name] = (_secret_config(settings_, alias, value.get_secret_value())
                            if isinstance(value, SecretStr) else str(value))
        return cls(**values)

    def variables(self) -> dict[str, str]:
        fields = settings.RebalSettings.model_fields
        return {fields[name].validation_alias.choices[0]: value  # type: ignore[union-attr]
                for name in type(self).model_fields if (value := getattr(self, name))}


class EmailResource(SettingsPart):
    """The mail relay (REBAL_SMTP_*) and what client emails say about the firm."""

    smtp_host: str = _setting("smtp_host")
    smtp_from: str = _setting("smtp_from")
    smtp_port: str = _setting("smtp_port")
    smtp_username: str = _setting("smtp_username")
    smtp_password: str = _setting("smtp_password")
    smtp_starttls: str = _setting("smtp_starttls")
    smtp_timeout: str = _setting("smtp_timeout")
    smtp_ca_file: str = _setting("smtp_ca_file")
    firm_name: str = _setting("firm_name")
    client_confirmation: str = _setting("client_confirmation")


class CrmResource(SettingsPart):
    """The CRM connection (REBAL_CRM, REBAL_WEALTHBOX_* / REBAL_REDTAIL_*); none set = no CRM."""

    crm: str = _setting("crm")
    crm_max_attempts: str = _setting("crm_max_attempts")
    wealthbox_base_url: str = _setting("wealthbox_base_url")
    wealthbox_access_token: str = _setting("wealthbox_access_token")
    wealthbox_token_url: str = _setting("wealthbox_token_url")
    wealthbox_client_id: str = _setting("wealthbox_client_id")
    wealthbox_client_secret: str = _setting("wealthbox_client_secret")
    wealthbox_refresh_token: str = _setting("wealthbox_refresh_token")
    redtail_base_url: str = _setting("redtail_base_url")
    redtail_api_key: str = _setting("redtail_api_key")
    redtail_user_key: str = _setting("redtail_user_key")


class LinksResource(SettingsPart):
    """The one-click links in emails: the secret that signs them (the approval API's), where they
    point and how long they stay valid."""

    link_secret_value: str = _setting("link_secret_value")
    link_ttl_hours: str = _setting("link_ttl_hours")
    public_url: str = _setting("public_url")


class ApprovalClockResource(SettingsPart):
    """REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS over the drift policy's approval section."""

    reminder_hours: str = _setting("reminder_hours")
    escalation_hours: str = _setting("escalation_hours")


class ExecutionResource(SettingsPart):
    """Where approved orders go: REBAL_AUTO_SUBMIT_DISCRETIONARY (true: a discretionary account's
    orders are submitted to the custodian drop; false, the default: every order is staged for the
    desk) and REBAL_TRADING_DESK_ID (who places staged orders). Read by `build_order_tickets`."""

    auto_submit_discretionary: str = _setting("auto_submit_discretionary")
    trading_desk_id: str = _setting("trading_desk_id")


class AuditResource(SettingsPart):
    """The audit chain's keys and anchors: REBAL_AUDIT_KEY signs, REBAL_AUDIT_KEYS (old keys) still
    verify, REBAL_SANDBOX=1 allows the public sandbox key, REBAL_AUDIT_ANCHOR_DIR moves the anchor
    files out of the archive. Read by `anchor_audit_chain`."""

    audit_key: str = _setting("audit_key")
    audit_keys: str = _setting("audit_keys")
    sandbox: str = _setting("sandbox")
    audit_anchor_dir: str = _setting("audit_anchor_dir")


def settings_of(*parts: SettingsPart,
                drift_policy_source: DriftPolicySource | None = None) -> "settings.RebalSettings":
    """The RebalSettings that resources carry (validated again by load_settings: a malformed value
    is a SettingsError naming its variable). The run's settings are these, never the process
    environment's; settings no part names take their defaults."""
    variables: dict[str, str] = {}
    for part in parts:
        variables.update(part.variables())
    if drift_policy_source is not None and drift_policy_source.policy_file:
        variables["REBAL_DRIFT_POLICY"] = drift_policy_source.policy_file
    return settings.load_settings(variables)


def comms_settings(email: EmailResource, crm: CrmResource, links: LinksResource, clock: ApprovalClockResource,
                   drift_policy_source: DriftPolicySource):
    """The comms ops' resources as the one `CommsSettings` the senders take (comms/settings.py),
    validated by load_settings (a malformed value fails the run at its start, naming the variable)."""
    from rebal_pipeline.comms.settings import CommsSettings

    return CommsSettings.from_settings(settings_of(email, crm, links, clock, drift_policy_source=drift_policy_source))


def _secret_config(settings_: "settings.RebalSettings", variable: str, value: str):
    """A secret as resource config: an EnvVar when the process environment holds this very value
    (so the Dagster UI shows the variable's name, not the secret), else the value itself (settings
    built from a mapping in tests, where there is no variable to point at)."""
    from dagster import EnvVar

    if os.environ.get(variable) == value:
        return EnvVar(variable)
    return value


def resources_for(settings_: "settings.RebalSettings") -> dict:
    """The resources of the environment `settings_` describes -- the one place they are chosen.

    Environments, told apart by what the settings say:
      - the embedded sandbox (default): DuckDB and SQLite files under REBAL_HOME;
      - production: REBAL_WORKFLOW_DB_URL names a Postgres workflow store (its URL, which may
        carry a password, is passed as EnvVar so the Dagster UI never shows it), paths moved
        with REBAL_WAREHOUSE / REBAL_FEED_ROOT / REBAL_ARCHIVE_ROOT.
    SMTP, CRM, links, the approval clock, execution and the audit chain's keys are parts of the
    same settings (`SettingsPart`), their secrets EnvVars naming the variable."""
    policy = settings_.policy_file()
    if settings_.workflow_db is not None:
        store_url = _secret_config(settings_, "REBAL_WORKFLOW_DB_URL", settings_.workflow_db_url())
    else:
        store_url = settings_.workflow_db_url()
    chosen = {
        "warehouse": Warehouse(
            database=str(settings_.warehouse_path()), memory_limit=settings_.duckdb_memory_limit
        ),
        "feed": FeedLocation(
            feed_root=str(settings_.feed_root()), archive_root=str(settings_.archive_root())
        ),
        "drift_policy_source": DriftPolicySource(policy_file=str(policy) if policy else ""),
        "advisor_overrides": AdvisorOverrides(wash_sale_file=str(settings_.wash_sale_overrides_path())),
        "workflow_store": WorkflowStoreResource(url=store_url),
        "fix_session": FixSessionResource(
            sender_comp_id=settings_.fix_sender_comp_id or "",
            target_comp_id=settings_.fix_target_comp_id or "",
            first_seq_num=settings_.fix_first_seq_num or 0,
        ),
        "email": EmailResource.from_settings(settings_),
        "crm": CrmResource.from_settings(settings_),
        "links": LinksResource.from_settings(settings_),
        "approval_clock": ApprovalClockResource.from_settings(settings_),
        "execution": ExecutionResource.from_settings(settings_),
        "audit": AuditResource.from_settings(settings_),
    }
    return chosen


def local_resources() -> dict:
    """Kept for callers and tests: the resources of the process environment now."""
    return resources_for(settings.current())
