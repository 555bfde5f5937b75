"""Custodian connections: which firm gets which custodian's files, how, and by when.

One YAML file (REBAL_CONNECTIONS, default $REBAL_HOME/connections.yaml; `connections_file`)
lists the connections; secrets are never in it — it names the environment variables that hold
them (read by name in connections/credentials.py). Validated here at
the boundary (pydantic): a typo fails loudly with the file and the field.

    connections:
      - name: schwab-main
        firm: example-ria
        custodian: schwab
        dialect: schwab              # canonical | schwab | fidelity | pershing
        kind: sftp                   # sftp | oauth_api | drop_folder
        expected_by: "07:30"         # New York time on NYSE sessions: later = operations alert
        sftp:
          host: sftp.custodian.example
          port: 22
          username: rebal-example-ria
          private_key_file_env: REBAL_SCHWAB_SFTP_KEY_FILE
          known_hosts_file: /etc/rebal/known_hosts   # the custodian's host key, pinned
          remote_dir: /outbound
          pattern: "*.csv"
      - name: fidelity-api
        firm: example-ria
        custodian: fidelity
        dialect: canonical           # the custodian-style v1 API maps field for field (oauth_api.py)
        kind: oauth_api
        expected_by: "07:30"
        oauth:
          base_url: https://api.custodian.example
          token_url: https://api.custodian.example/oauth/token
          authorize_url: https://api.custodian.example/oauth/authorize
          redirect_uri: https://rebal.example-ria.com/oauth/callback
          client_id_env: REBAL_FIDELITY_CLIENT_ID
          client_secret_env: REBAL_FIDELITY_CLIENT_SECRET
          token_file: /var/lib/rebal/tokens/fidelity-api.bin   # encrypted (REBAL_TOKEN_KEY)
          available_from: "05:00"    # New York time, the morning after the as-of session

One deployment serves one firm: every connection names the same firm, whose own files (users,
households, accounts, models, IPS, restrictions, securities) live in $REBAL_HOME/reference/<firm>/.
A firm with accounts at several custodians lists one connection per custodian; the day's
canonical feed is assembled from all of them (connections/ingest.py). A drop folder delivers the
whole canonical feed itself, so it is the only connection when used.
"""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rebal_pipeline import settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SftpSettings(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    username: str = Field(min_length=1)
    # Names of environment variables, never the secrets themselves.
    private_key_file_env: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    private_key_passphrase_env: str | None = Field(default=None, pattern=r"^[A-Z][A-Z0-9_]*$")
    known_hosts_file: str = Field(min_length=1)
    remote_dir: str = "."
    pattern: str = "*"


class OAuthSettings(_Strict):
    base_url: str = Field(pattern=r"^https?://")
    token_url: str = Field(pattern=r"^https?://")
    client_id_env: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    client_secret_env: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    token_file: str = Field(min_length=1)  # encrypted at rest (REBAL_TOKEN_KEY)
    authorize_url: str = Field(default="", pattern=r"^(https?://.*)?$")
    redirect_uri: str = Field(default="", pattern=r"^(https?://.*)?$")
    scope: str = ""
    page_size: int = Field(default=500, ge=1, le=100_000)
    # The custodian publishes a session's data overnight: pulls for an as-of date start at this
    # New York time on the next calendar day, and are retried every `retry_minutes` until complete.
    available_from: time = time(5, 0)
    retry_minutes: int = Field(default=30, ge=5, le=24 * 60)


class Connection(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    firm: str = Field(min_length=1)
    custodian: str = Field(pattern=r"^[a-z0-9_]+$")
    dialect: Literal["canonical", "schwab", "fidelity", "pershing"]
    kind: Literal["sftp", "oauth_api", "drop_folder"]
    expected_by: time = time(7, 30)
    sftp: SftpSettings | None = None
    oauth: OAuthSettings | None = None

    @model_validator(mode="after")
    def _settings_for_kind(self) -> "Connection":
        if self.kind == "sftp" and self.sftp is None:
            raise ValueError(f"connection {self.name}: kind sftp needs an sftp section")
        if self.kind == "oauth_api" and self.oauth is None:
            raise ValueError(f"connection {self.name}: kind oauth_api needs an oauth section")
        if self.kind == "sftp" and self.dialect == "canonical":
            raise ValueError(f"connection {self.name}: an SFTP connection needs a custodian dialect "
                             "(schwab, fidelity or pershing); canonical files go in the drop folder")
        if self.kind == "oauth_api" and self.dialect != "canonical":
            raise ValueError(f"connection {self.name}: the custodian API (v1) maps onto the canonical feed "
                             "directly: dialect must be canonical")
        return self


class Connections(_Strict):
    connections: list[Connection] = []

    @model_validator(mode="after")
    def _unique_names(self) -> "Connections":
        names = [c.name for c in self.connections]
        if len(names) != len(set(names)):
            raise ValueError(f"connection names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
        firms = sorted({c.firm for c in self.connections})
        if len(firms) > 1:
            raise ValueError(f"one deployment serves one firm, but connections name {', '.join(firms)}: "
                             "give each firm its own REBAL_HOME")
        if len(self.connections) > 1 and any(c.kind == "drop_folder" for c in self.connections):
            raise ValueError("a drop folder delivers the whole canonical feed: it cannot be combined with "
                             "other connections")
        return self

    @property
    def custodian_connections(self) -> list[Connection]:
        """The connections whose deliveries are assembled into the canonical feed (not a drop folder)."""
        return [c for c in self.connections if c.kind != "drop_folder"]


class ConnectionsFileError(ValueError):
    pass


def connections_file(config: settings.RebalSettings | None = None) -> Path:
    """REBAL_CONNECTIONS, else $REBAL_HOME/connections.yaml (`config` default: the settings now)."""
    config = settings.current() if config is None else config
    return Path(config.connections_file or config.rebal_home() / "connections.yaml")


def load_connections(path: Path | None = None) -> Connections:
    """The connections file (default: `connections_file()`); no file = no connections (the drop
    folder alone)."""
    path = path or connections_file()
    if not path.exists():
        return Connections()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Connections.model_validate(document)
    except yaml.YAMLError as error:
        raise ConnectionsFileError(f"{path}: not valid YAML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConnectionsFileError(f"{path}: {problems}") from None


def inbound_dir(connection: Connection) -> Path:
    """Where a connection's raw files land before they become the canonical feed."""
    return settings.rebal_home() / "inbound" / connection.name


def part_dir(connection: Connection, as_of) -> Path:
    """A connection's share of one day's canonical feed (positions, lots, transactions, prices),
    complete or absent: the folder appears by an atomic rename."""
    return inbound_dir(connection) / "canonical" / as_of.isoformat()
