"""Custodian connections: which firm gets which custodian's files, how, and by when.

One YAML file (REBAL_CONNECTIONS, default $REBAL_HOME/connections.yaml) lists the connections;
secrets are never in it — it names the environment variables that hold them. Validated here at
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
"""

from __future__ import annotations

import os
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
        return self


class Connections(_Strict):
    connections: list[Connection] = []

    @model_validator(mode="after")
    def _unique_names(self) -> "Connections":
        names = [c.name for c in self.connections]
        if len(names) != len(set(names)):
            raise ValueError(f"connection names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
        return self


class ConnectionsFileError(ValueError):
    pass


def connections_file() -> Path:
    return Path(os.environ.get("REBAL_CONNECTIONS") or settings.rebal_home() / "connections.yaml")


def load_connections(path: Path | None = None) -> Connections:
    """The connections file; no file = no connections (the drop folder alone)."""
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
