"""CRM notes and tasks after a decision or an execution: a Wealthbox-style and a Redtail-style client
over httpx, with bounded retries (tenacity) and idempotency keys.

"-style": the request shapes follow those CRMs' public REST conventions closely enough to adapt
in one place, they are not a certified integration. What is sent:

Wealthbox-style (OAuth 2.0 bearer token; `base_url` e.g. https://api.crmworkspace.com/v1):
    Authorization: Bearer <access token>
    POST {base}/notes  {"content": "<note text>", "linked_to": [{"id": "<ref>", "type": "Contact"}],
                        "tags": ["rebalance"]}
    POST {base}/tasks  {"name": title, "due_date": "<ISO 8601>", "assigned_to": "<assignee>",
                        "description": "<description>"}          (+ "linked_to" when a ref is given)
    A 401 whose `WWW-Authenticate` says `error="invalid_token"` (RFC 6750 §3.1) or whose JSON body has
    error invalid_token / token_expired / expired_token means the access token expired: the client
    refreshes it once (RFC 6749 §6: POST token_url, form grant_type=refresh_token&refresh_token=…,
    client id and secret by HTTP Basic), hands the new tokens to `on_tokens` (the refresh token may
    rotate: persist it), and repeats the request once. Any other 401, or a second one, is CrmRejected.

Redtail-style (API key + user key; `base_url` e.g. https://api2.redtailtechnology.com/crm/v1/rest):
    Authorization: Userkeyauth <base64("<api key>:<user key>")>
    POST {base}/contacts/{ref}/notes  {"note_date": "YYYY-MM-DD", "category": "Rebalance",
                                       "body": "<note text>"}
    POST {base}/activities            {"subject": title, "due_date": "<ISO 8601>", "assigned_to": "<assignee>",
                                       "activity_type": "Task", "description": "<description>"}
                                                                 (+ "contact_id" when a ref is given)

Both send `Idempotency-Key: rebal-<sha256(operation, caller's key)[:48]>` — the same on every retry
and every later replay of the same call, so a CRM that honours it creates the note once.

The contract with the caller (the execute job's CRM step, an outbox worker):
- success returns a `CrmRecord` (the CRM's id of the note/task when it answers one);
- `CrmUnavailable`: 429, 5xx, timeouts or connection errors persisted through the bounded retries
  (RetryPolicy: attempts and total time; a Retry-After longer than the time left ends the retries
  at once and is reported in `.retry_after`). Queue the call and replay it later with the same
  idempotency key;
- `CrmRejected`: the CRM refused the call (4xx other than 429, or credentials that do not work
  even after a refresh). Replaying the same call will not help: queue it for a person.
- Both are `CrmError`. A CRM outage must never block trading: the caller catches CrmError, records
  it (audit event + outbox row) and carries on with the execution.

Secrets (tokens, keys, client secret) come from `RebalSettings` (`from_settings`), are never logged and
are kept out of reprs; nothing of the note's text or the contact reference is logged either.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Callable, Mapping
from urllib.parse import quote, urlsplit

import httpx

from rebal_pipeline.core.retry_after import retry_after_seconds
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay

if TYPE_CHECKING:
    from rebal_pipeline.settings import RebalSettings

log = logging.getLogger("rebal.comms.crm")


# ---------------------------------------------------------------------------------------------
# Errors and policy
# ---------------------------------------------------------------------------------------------


class CrmError(Exception):
    """A CRM call did not succeed. operation: record_note/open_task; status: the last HTTP status
    (None for a network error); retry_after: seconds the CRM asked to wait (429/503), if any."""

    def __init__(self, message: str, *, operation: str, status: int | None = None, attempts: int = 1,
                 retry_after: float | None = None):
        super().__init__(message)
        self.operation, self.status, self.attempts, self.retry_after = operation, status, attempts, retry_after


class CrmUnavailable(CrmError):
    """Transient failure after the last attempt: queue the call, replay later with the same key."""


class CrmRejected(CrmError):
    """The CRM refused the call; replaying it unchanged will not help."""


class _Transient(Exception):
    def __init__(self, status: int | None, retry_after: float | None, detail: str):
        super().__init__(detail)
        self.status, self.retry_after, self.detail = status, retry_after, detail


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: wait initial_backoff × 2^(n-1) (capped at max_backoff) plus up to
    `jitter` seconds after the n-th failed attempt, at least the Retry-After the CRM sent; at most
    max_attempts attempts, and no wait that would end after max_total_seconds from the first one."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_total_seconds: float = 30.0
    jitter: float = 0.25
    request_timeout: float = 10.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("RetryPolicy: attempts ≥ 1 and non-negative waits")
        if self.max_total_seconds <= 0 or self.request_timeout <= 0:
            raise ValueError("RetryPolicy: max_total_seconds and request_timeout must be positive")


@dataclass(frozen=True)
class CrmRecord:
    """What the CRM answered: its id of the note or task (when it returns one), the HTTP status,
    the Idempotency-Key sent and the number of attempts it took."""

    id: str | None
    status: int
    idempotency_key: str
    attempts: int


def idempotency_key(operation: str, key: str) -> str:
    """The Idempotency-Key header for the caller's key: stable, opaque, URL- and header-safe."""
    if not key:
        raise ValueError("an idempotency key is required")
    return "rebal-" + hashlib.sha256(f"rebal-crm/v1\x00{operation}\x00{key}".encode()).hexdigest()[:48]


def note_text(on: date, rationale: str, trades_summary: str) -> str:
    """The note's text: the date, the rationale and the trades, in that order."""
    return f"Portfolio rebalanced on {on.isoformat()}.\nRationale: {rationale.strip()}\nTrades: {trades_summary.strip()}"


def _iso(due: date | datetime) -> str:
    if isinstance(due, datetime):
        if due.tzinfo is None:
            due = due.replace(tzinfo=timezone.utc)
        return due.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return due.isoformat()


def _secret(value) -> str | None:
    """A SecretStr's value (None when not set); kept out of every message and repr."""
    return (value.get_secret_value() or None) if value is not None else None


def _load(environ: Mapping[str, str] | None) -> "RebalSettings":
    from rebal_pipeline.settings import SettingsError, load_settings

    try:
        return load_settings(environ)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None


def _check_base_url(base_url: str) -> str:
    """Credentials travel in headers: https only, plain http only to a loopback test peer."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError(f"CRM URL must be https (http only for a loopback host): {parts.scheme}://{host}")
    return base_url.rstrip("/")


# ---------------------------------------------------------------------------------------------
# The shared client
# ---------------------------------------------------------------------------------------------


class _CrmClient:
    crm = "crm"

    def __init__(self, base_url: str, *, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = _check_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, timeout=self.retry.request_timeout,
                                  headers={"Accept": "application/json", "User-Agent": "rebal-crm/1"})

    # -- to be provided by each CRM style --
    def _auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _refresh_after(self, response: httpx.Response) -> bool:
        """Called on a 401: True when the credentials were renewed and the request may be repeated."""
        return False

    # -- the calls --
    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, operation: str, path: str, body: dict, key: str) -> CrmRecord:
        header_key = idempotency_key(operation, key)
        policy = self.retry
        attempts = 0

        def attempt() -> CrmRecord:
            nonlocal attempts
            attempts += 1
            return self._attempt(operation, path, body, header_key, attempts)

        def wait(state: RetryCallState) -> float:
            backoff = min(policy.max_backoff, policy.initial_backoff * 2 ** (state.attempt_number - 1))
            backoff += random.uniform(0, policy.jitter) if policy.jitter else 0.0
            failure = state.outcome.exception() if state.outcome else None
            retry_after = getattr(failure, "retry_after", None)
            return max(backoff, retry_after or 0.0)

        def before_sleep(state: RetryCallState) -> None:
            failure = state.outcome.exception()
            log.warning("%s %s: attempt %d failed (%s), retrying in %.2fs [%s]", self.crm, operation,
                        state.attempt_number, failure, state.upcoming_sleep, header_key[:18])

        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(policy.max_total_seconds),
            wait=wait, retry=retry_if_exception_type(_Transient), sleep=self._sleep,
            before_sleep=before_sleep, reraise=False,
        )
        try:
            return retrying(attempt)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            log.error("%s %s: unavailable after %d attempt(s) (%s) [%s]", self.crm, operation, attempts, last,
                      header_key[:18])
            raise CrmUnavailable(
                f"{self.crm} {operation}: unavailable after {attempts} attempt(s): {last}",
                operation=operation, status=getattr(last, "status", None), attempts=attempts,
                retry_after=getattr(last, "retry_after", None),
            ) from last

    def _attempt(self, operation: str, path: str, body: dict, header_key: str, attempt: int) -> CrmRecord:
        refreshed = False
        while True:
            headers = {"Idempotency-Key": header_key, **self._auth_headers()}
            try:
                response = self._http.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                raise _Transient(None, None, type(exc).__name__) from None
            status = response.status_code
            if status == 401 and not refreshed and self._refresh_after(response):
                refreshed = True  # a refreshed token gets one more try, never a loop
                continue
            break
        if 200 <= status < 300:
            try:
                payload = response.json() if response.content else {}
            except ValueError:
                payload = {}
            record_id = payload.get("id") if isinstance(payload, dict) else None
            log.info("%s %s: created (HTTP %d, attempt %d) [%s]", self.crm, operation, status, attempt,
                     header_key[:18])
            return CrmRecord(id=None if record_id is None else str(record_id), status=status,
                             idempotency_key=header_key, attempts=attempt)
        if status == 429 or status >= 500:
            raise _Transient(status, retry_after_seconds(response.headers.get("Retry-After")), f"HTTP {status}")
        raise CrmRejected(f"{self.crm} {operation}: refused with HTTP {status}", operation=operation, status=status,
                          attempts=attempt)


# ---------------------------------------------------------------------------------------------
# Wealthbox-style: OAuth bearer token with refresh
# ---------------------------------------------------------------------------------------------

_EXPIRED_ERRORS = {"invalid_token", "token_expired", "expired_token"}


def _says_token_expired(response: httpx.Response) -> bool:
    if "invalid_token" in response.headers.get("WWW-Authenticate", ""):
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("error", "")).lower() in _EXPIRED_ERRORS


class WealthboxStyleClient(_CrmClient):
    crm = "wealthbox"

    def __init__(self, base_url: str, *, access_token: str, token_url: str | None = None,
                 refresh_token: str | None = None, client_id: str | None = None, client_secret: str | None = None,
                 on_tokens: Callable[[str, str | None], None] | None = None, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(base_url, retry=retry, sleep=sleep)
        self._access_token = access_token
        self._refresh_token = refresh_token
        self._token_url = _check_base_url(token_url) if token_url else None
        self._client_id, self._client_secret = client_id, client_secret
        self._on_tokens = on_tokens
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WealthboxStyleClient({self.base_url!r})"

    @classmethod
    def from_settings(cls, settings: "RebalSettings", **kwargs) -> "WealthboxStyleClient":
        """REBAL_WEALTHBOX_BASE_URL, REBAL_WEALTHBOX_ACCESS_TOKEN (required); REBAL_WEALTHBOX_TOKEN_URL,
        REBAL_WEALTHBOX_REFRESH_TOKEN, REBAL_WEALTHBOX_CLIENT_ID, REBAL_WEALTHBOX_CLIENT_SECRET (for refresh)."""
        token = _secret(settings.wealthbox_access_token)
        missing = [n for n, v in (("REBAL_WEALTHBOX_BASE_URL", settings.wealthbox_base_url),
                                  ("REBAL_WEALTHBOX_ACCESS_TOKEN", token)) if not v]
        if missing:
            raise ValueError(f"set {', '.join(missing)}")
        return cls(settings.wealthbox_base_url, access_token=token,
                   token_url=settings.wealthbox_token_url or None,
                   refresh_token=_secret(settings.wealthbox_refresh_token),
                   client_id=settings.wealthbox_client_id or None,
                   client_secret=_secret(settings.wealthbox_client_secret), **kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs) -> "WealthboxStyleClient":
        """`from_settings` of the settings in `environ` (default: the process environment)."""
        return cls.from_settings(_load(environ), **kwargs)

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._access_token}"}

    def _refresh_after(self, response: httpx.Response) -> bool:
        if not (_says_token_expired(response) and self._token_url and self._refresh_token):
            return False
        stale = response.request.headers.get("Authorization", "")
        with self._lock:
            if stale != f"Bearer {self._access_token}":
                return True  # another thread refreshed it meanwhile
            auth = (self._client_id, self._client_secret or "") if self._client_id else None
            try:
                answer = self._http.post(self._token_url, auth=auth, data={
                    "grant_type": "refresh_token", "refresh_token": self._refresh_token})
            except httpx.TransportError as exc:
                raise _Transient(None, None, f"token refresh: {type(exc).__name__}") from None
            if answer.status_code == 429 or answer.status_code >= 500:
                raise _Transient(answer.status_code, retry_after_seconds(answer.headers.get("Retry-After")),
                                 f"token refresh: HTTP {answer.status_code}")
            try:
                tokens = answer.json()
            except ValueError:
                tokens = {}
            if answer.status_code != 200 or not tokens.get("access_token"):
                raise CrmRejected(f"{self.crm}: the refresh token was refused (HTTP {answer.status_code}); "
                                  "re-authorise the CRM connection", operation="refresh_token",
                                  status=answer.status_code)
            self._access_token = tokens["access_token"]
            self._refresh_token = tokens.get("refresh_token") or self._refresh_token
            log.info("%s: access token refreshed", self.crm)
            if self._on_tokens:
                self._on_tokens(self._access_token, self._refresh_token)
        return True

    def record_note(self, contact_or_account_ref: str, date: date, rationale: str, trades_summary: str, *,
                    idempotency_key: str) -> CrmRecord:
        """A note on the contact: date, rationale and trades (e.g. after execution)."""
        return self._post("record_note", "/notes", {
            "content": note_text(date, rationale, trades_summary),
            "linked_to": [{"id": str(contact_or_account_ref), "type": "Contact"}],
            "tags": ["rebalance"],
        }, idempotency_key)

    def open_task(self, title: str, due: date | datetime, assignee: str, *, idempotency_key: str,
                  contact_or_account_ref: str | None = None, description: str = "") -> CrmRecord:
        """A task for `assignee` (the CRM's user id), due at `due`."""
        body = {"name": title, "due_date": _iso(due), "assigned_to": str(assignee), "description": description}
        if contact_or_account_ref:
            body["linked_to"] = [{"id": str(contact_or_account_ref), "type": "Contact"}]
        return self._post("open_task", "/tasks", body, idempotency_key)


# ---------------------------------------------------------------------------------------------
# Redtail-style: API key + user key
# ---------------------------------------------------------------------------------------------


class RedtailStyleClient(_CrmClient):
    crm = "redtail"

    def __init__(self, base_url: str, *, api_key: str, user_key: str, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(base_url, retry=retry, sleep=sleep)
        if not api_key or not user_key:
            raise ValueError("RedtailStyleClient: api_key and user_key are required")
        self._authorization = "Userkeyauth " + base64.b64encode(f"{api_key}:{user_key}".encode()).decode("ascii")

    def __repr__(self) -> str:
        return f"RedtailStyleClient({self.base_url!r})"

    @classmethod
    def from_settings(cls, settings: "RebalSettings", **kwargs) -> "RedtailStyleClient":
        """REBAL_REDTAIL_BASE_URL, REBAL_REDTAIL_API_KEY, REBAL_REDTAIL_USER_KEY (all required)."""
        values = {"REBAL_REDTAIL_BASE_URL": settings.redtail_base_url,
                  "REBAL_REDTAIL_API_KEY": _secret(settings.redtail_api_key),
                  "REBAL_REDTAIL_USER_KEY": _secret(settings.redtail_user_key)}
        missing = [n for n, v in values.items() if not v]
        if missing:
            raise ValueError(f"set {', '.join(missing)}")
        return cls(values["REBAL_REDTAIL_BASE_URL"], api_key=values["REBAL_REDTAIL_API_KEY"],
                   user_key=values["REBAL_REDTAIL_USER_KEY"], **kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs) -> "RedtailStyleClient":
        """`from_settings` of the settings in `environ` (default: the process environment)."""
        return cls.from_settings(_load(environ), **kwargs)

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": self._authorization}

    def record_note(self, contact_or_account_ref: str, date: date, rationale: str, trades_summary: str, *,
                    idempotency_key: str) -> CrmRecord:
        """A note on the contact: date, rationale and trades (e.g. after execution)."""
        path = f"/contacts/{quote(str(contact_or_account_ref), safe='')}/notes"
        return self._post("record_note", path, {
            "note_date": date.isoformat(), "category": "Rebalance",
            "body": note_text(date, rationale, trades_summary),
        }, idempotency_key)

    def open_task(self, title: str, due: date | datetime, assignee: str, *, idempotency_key: str,
                  contact_or_account_ref: str | None = None, description: str = "") -> CrmRecord:
        """An activity of type Task for `assignee` (the CRM's user id), due at `due`."""
        body = {"subject": title, "due_date": _iso(due), "assigned_to": str(assignee), "activity_type": "Task",
                "description": description}
        if contact_or_account_ref:
            body["contact_id"] = str(contact_or_account_ref)
        return self._post("open_task", "/activities", body, idempotency_key)
