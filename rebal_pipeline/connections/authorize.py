"""An operator authorizes rebal at a custodian's OAuth 2.0 API (authorization-code grant).

    rebal connections authorize <name>                          # step 1: prints the URL to open
    rebal connections authorize <name> --code C --state S       # step 2: after the custodian redirects

Step 1 draws a random `state` (RFC 6749 §10.12: it binds the answer to this request, so a code
injected from elsewhere is refused), keeps it with its time in $REBAL_HOME/inbound/<name>/
oauth_state.json (mode 0600) and prints the custodian's authorization URL. The operator signs in
there and approves; the custodian redirects to the connection's `redirect_uri` with `code` and
`state`, which the operator passes to step 2. Step 2 checks the state (same, at most
`STATE_TTL` old, used once), exchanges the code for tokens and stores them encrypted
(oauth_api.TokenStore). A new token file is what the custodian_api_pulls sensor waits for after a
"reauthorization needed" alert.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path

from rebal_pipeline.connections.config import Connection, inbound_dir
from rebal_pipeline.connections.oauth_api import CustodianApi, OAuthApiConfig, OAuthApiError, Tokens
from rebal_pipeline.core.clock import utc_now

STATE_TTL = timedelta(minutes=15)


class AuthorizationError(OAuthApiError):
    """The answer does not belong to a pending authorization of this connection."""


def _state_file(connection: Connection) -> Path:
    return inbound_dir(connection) / "oauth_state.json"


def _require_api(connection: Connection) -> None:
    if connection.kind != "oauth_api":
        raise AuthorizationError(f"connection {connection.name} is a {connection.kind} connection, not an OAuth API")
    if not connection.oauth.authorize_url or not connection.oauth.redirect_uri:
        raise AuthorizationError(f"connection {connection.name}: authorize_url and redirect_uri are needed in "
                                 "its oauth section")


def start_authorization(connection: Connection, now: datetime | None = None) -> str:
    """Step 1: the URL the operator opens (a fresh state is kept for step 2)."""
    _require_api(connection)
    now = now or utc_now()
    state = secrets.token_urlsafe(24)
    path = _state_file(connection)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"state": state, "created_at": now.isoformat()}, handle)
    os.replace(path.with_name(path.name + ".tmp"), path)
    with CustodianApi(OAuthApiConfig.from_connection(connection)) as api:
        return api.authorization_url(state)


def finish_authorization(connection: Connection, code: str, state: str, now: datetime | None = None,
                         **api_options) -> Tokens:
    """Step 2: check the state, exchange the code, store the tokens (encrypted)."""
    _require_api(connection)
    now = now or utc_now()
    path = _state_file(connection)
    try:
        pending = json.loads(path.read_text())
    except FileNotFoundError:
        raise AuthorizationError(f"no authorization of {connection.name} is pending: run step 1 first") from None
    if not hmac.compare_digest(str(pending.get("state", "")), state):
        raise AuthorizationError(f"the state does not match the pending authorization of {connection.name}")
    if now - datetime.fromisoformat(pending["created_at"]) > STATE_TTL:
        path.unlink(missing_ok=True)
        raise AuthorizationError(f"the pending authorization of {connection.name} expired "
                                 f"(older than {int(STATE_TTL.total_seconds() // 60)} minutes): start again")
    path.unlink()  # used once, whatever the custodian answers
    with CustodianApi(OAuthApiConfig.from_connection(connection), **api_options) as api:
        return api.exchange_code(code)
