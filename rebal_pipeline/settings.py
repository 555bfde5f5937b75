"""rebal's settings: one typed object read from the REBAL_* environment variables.

`RebalSettings` names every variable rebal reads (the field's alias is the variable). It is built
by `load_settings()` (from the environment, or from a mapping in tests) and validated there: a
malformed value is a `SettingsError` naming the variable and saying what it must be. Whether a
setting is *required* depends on what is done (the drill sends no email; the mailer needs SMTP):
the code that needs it asks for it through the accessors below, which raise `SettingsError` with
the variable's name when it is missing. Nothing else in rebal reads `os.environ` for a REBAL_*
setting; tests build a `RebalSettings` instead of setting variables.

Where rebal keeps its files. Everything is under one project-local folder by default.

REBAL_HOME (default: <repo>/.rebal) holds the embedded set-up the drill uses:
  feeds/<as_of>/*.csv      the canonical feed (the sandbox writes here; a firm may drop files)
  archive/sha256/..        raw feed files, content-addressed, write-once
  warehouse.duckdb         the DuckDB warehouse
  dagster_home/            DAGSTER_HOME for the embedded SQLite Dagster instance
  workflow.sqlite          the workflow store (recommendations, decisions, audit chain)
  outbox/                  files handed on and copies for people (approved trades, order files)
  overrides/               advisors' documented overrides of the tax engine
Each can be moved on its own with the variables below (production points them elsewhere).
"""

from __future__ import annotations

import os
from functools import lru_cache
from collections.abc import Mapping
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """A REBAL_* variable is missing where it is needed, or malformed. The message names it."""


def _boolean(value, true_words: tuple[str, ...], false_words: tuple[str, ...]) -> bool:
    """A flag given as text: one of `true_words` or `false_words` (any case); anything else is
    refused with "must be true or false"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in true_words or text in false_words:
        return text in true_words
    raise ValueError("must be true or false")


def _var(name: str, default=None, **kwargs):
    """A field read from the environment variable `name` (and only from it)."""
    return Field(default, validation_alias=AliasChoices(name), **kwargs)


class RebalSettings(BaseSettings):
    """Every REBAL_* variable rebal reads, typed. Empty strings count as not set."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True,
                                      populate_by_name=False, case_sensitive=True)

    # --- where things live -------------------------------------------------------------------
    home: Path | None = _var("REBAL_HOME")
    feed_root_dir: Path | None = _var("REBAL_FEED_ROOT")
    archive_root_dir: Path | None = _var("REBAL_ARCHIVE_ROOT")
    warehouse_file: Path | None = _var("REBAL_WAREHOUSE")
    duckdb_memory_limit: str = _var("REBAL_DUCKDB_MEMORY_LIMIT", "4GB")
    dagster_home_dir: Path | None = _var("DAGSTER_HOME")
    sql_models_dir: Path | None = _var("REBAL_SQL_DIR")
    drift_policy_file: Path | None = _var("REBAL_DRIFT_POLICY")
    wash_sale_overrides_file: Path | None = _var("REBAL_WASH_SALE_OVERRIDES")
    workflow_db: SecretStr | None = _var("REBAL_WORKFLOW_DB_URL")
    connections_file: Path | None = _var("REBAL_CONNECTIONS")
    audit_anchor_dir: Path | None = _var("REBAL_AUDIT_ANCHOR_DIR")

    # --- the sandbox and the compliance record -------------------------------------------------
    sandbox: bool = _var("REBAL_SANDBOX", False)
    audit_key: SecretStr | None = _var("REBAL_AUDIT_KEY")
    audit_keys: SecretStr | None = _var("REBAL_AUDIT_KEYS")

    # --- links in emails and the approval API --------------------------------------------------
    link_secret_value: SecretStr | None = _var("REBAL_LINK_SECRET")
    link_ttl_hours: float = _var("REBAL_LINK_TTL_HOURS", 72.0, gt=0)
    public_url: str | None = _var("REBAL_PUBLIC_URL")
    portal_idle_minutes: float = _var("REBAL_PORTAL_IDLE_MINUTES", 30.0, gt=0)

    # --- the approval clock (override the drift policy's approval section) -----------------------
    reminder_hours: float | None = _var("REBAL_REMINDER_HOURS", gt=0)
    escalation_hours: float | None = _var("REBAL_ESCALATION_HOURS", gt=0)

    # --- messages ------------------------------------------------------------------------------
    firm_name: str | None = _var("REBAL_FIRM_NAME")
    client_confirmation: str = _var("REBAL_CLIENT_CONFIRMATION", "simple")
    smtp_host: str | None = _var("REBAL_SMTP_HOST")
    smtp_from: str | None = _var("REBAL_SMTP_FROM")
    smtp_port: int | None = _var("REBAL_SMTP_PORT", gt=0, lt=65536)
    smtp_username: str | None = _var("REBAL_SMTP_USERNAME")
    smtp_password: SecretStr | None = _var("REBAL_SMTP_PASSWORD")
    smtp_starttls: bool = _var("REBAL_SMTP_STARTTLS", True)
    smtp_timeout: float = _var("REBAL_SMTP_TIMEOUT", 30.0, gt=0)
    smtp_ca_file: str | None = _var("REBAL_SMTP_CA_FILE")

    # --- the CRM -------------------------------------------------------------------------------
    crm: str | None = _var("REBAL_CRM")
    crm_max_attempts: int | None = _var("REBAL_CRM_MAX_ATTEMPTS", ge=1)
    wealthbox_base_url: str | None = _var("REBAL_WEALTHBOX_BASE_URL")
    wealthbox_access_token: SecretStr | None = _var("REBAL_WEALTHBOX_ACCESS_TOKEN")
    wealthbox_token_url: str | None = _var("REBAL_WEALTHBOX_TOKEN_URL")
    wealthbox_client_id: str | None = _var("REBAL_WEALTHBOX_CLIENT_ID")
    wealthbox_client_secret: SecretStr | None = _var("REBAL_WEALTHBOX_CLIENT_SECRET")
    wealthbox_refresh_token: SecretStr | None = _var("REBAL_WEALTHBOX_REFRESH_TOKEN")
    redtail_base_url: str | None = _var("REBAL_REDTAIL_BASE_URL")
    redtail_api_key: SecretStr | None = _var("REBAL_REDTAIL_API_KEY")
    redtail_user_key: SecretStr | None = _var("REBAL_REDTAIL_USER_KEY")

    # --- execution -----------------------------------------------------------------------------
    auto_submit_discretionary: bool = _var("REBAL_AUTO_SUBMIT_DISCRETIONARY", False)
    trading_desk_id: str | None = _var("REBAL_TRADING_DESK_ID")
    fix_sender_comp_id: str | None = _var("REBAL_FIX_SENDER_COMP_ID")
    fix_target_comp_id: str | None = _var("REBAL_FIX_TARGET_COMP_ID")
    fix_first_seq_num: int | None = _var("REBAL_FIX_FIRST_SEQ_NUM", ge=1)

    # --- custodian connections ----------------------------------------------------------------
    token_key: SecretStr | None = _var("REBAL_TOKEN_KEY")

    @field_validator("sandbox", mode="before")
    @classmethod
    def _sandbox(cls, value) -> bool:
        # As rebal has always read it: 1/true/yes is a sandbox, anything else is not.
        return str(value).strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)

    @field_validator("smtp_starttls", mode="before")
    @classmethod
    def _flag(cls, value) -> bool:
        # The relay's flag as rebal has always read it: 1/true/yes/on or 0/false/no/off.
        return _boolean(value, ("1", "true", "yes", "on"), ("0", "false", "no", "off"))

    @field_validator("auto_submit_discretionary", mode="before")
    @classmethod
    def _true_or_false(cls, value) -> bool:
        # Orders reach the desk on this flag: anything but true/false is refused, not guessed.
        return _boolean(value, ("true",), ("false",))

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Only what load_settings passes counts: it reads the environment (or a test's mapping)
        # itself, so a test's settings never mix with the process environment, and no .env file.
        return (init_settings,)

    @field_validator("client_confirmation")
    @classmethod
    def _style(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("simple", "detailed"):
            raise ValueError("must be simple or detailed")
        return value

    @field_validator("crm")
    @classmethod
    def _crm(cls, value: str | None) -> str | None:
        value = (value or "").strip().lower()
        if value in ("", "none", "off"):
            return None if value == "" else "none"
        if value not in ("wealthbox", "redtail"):
            raise ValueError("must be wealthbox, redtail or none")
        return value

    # --- where things live, resolved ------------------------------------------------------------
    def rebal_home(self) -> Path:
        return Path(self.home or REPO_ROOT / ".rebal").resolve()

    def feed_root(self) -> Path:
        return Path(self.feed_root_dir or self.rebal_home() / "feeds")

    def archive_root(self) -> Path:
        return Path(self.archive_root_dir or self.rebal_home() / "archive")

    def warehouse_path(self) -> Path:
        return Path(self.warehouse_file or self.rebal_home() / "warehouse.duckdb")

    def dagster_home(self) -> Path:
        return Path(self.dagster_home_dir or self.rebal_home() / "dagster_home")

    def sql_dir(self) -> Path:
        return Path(self.sql_models_dir or REPO_ROOT / "dbt_like_sql")

    def policy_file(self) -> Path | None:
        return self.drift_policy_file

    def wash_sale_overrides_path(self) -> Path:
        return Path(self.wash_sale_overrides_file or self.rebal_home() / "overrides" / "wash_sale_overrides.csv")

    def workflow_db_url(self) -> str:
        if self.workflow_db is not None:
            return self.workflow_db.get_secret_value()
        return f"sqlite:///{self.rebal_home() / 'workflow.sqlite'}"

    def outbox_root(self) -> Path:
        """Files handed on and copies for people: approved trades, notifications, order files."""
        return self.rebal_home() / "outbox"

    def link_secret(self) -> bytes:
        """The secret that signs one-click links (the approval API's and the emails'): at least
        32 bytes, never logged."""
        from rebal_pipeline.approval_api.links import MIN_SECRET_BYTES

        value = self.link_secret_value.get_secret_value() if self.link_secret_value else ""
        raw = value.encode("utf-8")
        if len(raw) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"REBAL_LINK_SECRET must be set to a random secret of at least {MIN_SECRET_BYTES} bytes "
                "(it signs the one-click approval links), e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`. "
                + ("It is not set." if not value else f"It is only {len(raw)} bytes long."))
        return raw


def load_settings(environ: Mapping[str, str] | None = None) -> RebalSettings:
    """The settings of `environ` (default: the process environment), validated. A malformed value
    is a SettingsError naming each variable at fault and what it must be."""
    source = dict(os.environ if environ is None else environ)
    fields = RebalSettings.model_fields
    by_alias = {}
    for name, info in fields.items():
        alias = info.validation_alias.choices[0]  # type: ignore[union-attr]
        value = source.get(alias)
        if value is not None and value.strip() != "":
            by_alias[alias] = value
    return _validated(tuple(sorted(by_alias.items())))


@lru_cache(maxsize=64)
def _validated(variables: tuple[tuple[str, str], ...]) -> RebalSettings:
    """The settings of these variables, validated once per distinct set (RebalSettings is frozen:
    sharing one is safe). Hot paths read the settings thousands of times a run (every audit
    append reads its signing key); the environment's values are still read on every call."""
    try:
        # Only the given mapping counts (no second read of os.environ, no .env file).
        return RebalSettings.model_validate(dict(variables))
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(error) for error in exc.errors())) from None


def _describe(error) -> str:
    variable = error["loc"][0] if error.get("loc") else "?"
    given = error.get("input")
    shown = "" if _secret(str(variable)) else f"={given!r}"
    return f"{variable}{shown}: {error['msg']}"


def _secret(variable: str) -> bool:
    return any(word in variable for word in ("SECRET", "KEY", "TOKEN", "PASSWORD", "DB_URL"))


def current() -> RebalSettings:
    """The settings of the process environment now (read each call, so a fix to the environment
    applies to the next run without a restart; validated once per distinct set of values)."""
    return load_settings()


# Module-level accessors kept for the many callers that only need a path.
def rebal_home() -> Path:
    return current().rebal_home()


def feed_root() -> Path:
    return current().feed_root()


def archive_root() -> Path:
    return current().archive_root()


def warehouse_path() -> Path:
    return current().warehouse_path()


def dagster_home() -> Path:
    return current().dagster_home()


def sql_dir() -> Path:
    return current().sql_dir()


def policy_file() -> Path | None:
    return current().policy_file()


def wash_sale_overrides_path() -> Path:
    """Advisors' documented "keep this buy although it washes a loss" decisions (append-only CSV)."""
    return current().wash_sale_overrides_path()


def workflow_db_url() -> str:
    """The workflow store: REBAL_WORKFLOW_DB_URL (e.g. postgresql+psycopg2://user@host/db), else an
    embedded SQLite file. A URL may carry a password: it is never logged."""
    return current().workflow_db_url()


def outbox_root() -> Path:
    return current().outbox_root()
