"""Pull positions, lots and transactions from a custodian's OAuth 2.0 REST API (httpx). No Dagster.

The API ("custodian-style v1", documented here; adapters for a real custodian map its field names
onto this shape or subclass `CustodianApi`)
-------------------------------------------------------------------------------------------------
Auth: OAuth 2.0 authorization-code grant (RFC 6749 §4.1), client authentication by HTTP Basic
(`client_secret_basic`), bearer access tokens (RFC 6750).

- An operator opens `CustodianApi.authorization_url(state)` (``GET <authorize_url>?response_type=code
  &client_id=..&redirect_uri=..&state=..[&scope=..]``), signs in at the custodian and approves; the
  custodian redirects to `redirect_uri?code=..&state=..`; `exchange_code(code)` POSTs
  ``grant_type=authorization_code&code=..&redirect_uri=..`` to the token URL.
- Token response: ``{"access_token", "token_type": "Bearer", "expires_in": <s>, "refresh_token",
  "scope"}``. The refresh token may rotate: a response without one keeps the old one.
- Before every data request the access token is refreshed when less than `refresh_margin`
  (5 minutes) of its life is left (``grant_type=refresh_token&refresh_token=..``), and once more
  if a data endpoint still answers 401. A refresh answered ``400 {"error": "invalid_grant"}``
  (refresh token expired or revoked) raises `ReauthorizationNeeded`, whose message is a plain
  sentence for the operations alert; the caller records it. No token → the same exception.

Data endpoints (GET, ``Authorization: Bearer <access token>``, JSON):

    /v1/positions     ?asOf=YYYY-MM-DD&pageSize=N[&cursor=C]
    /v1/lots          ?asOf=YYYY-MM-DD&pageSize=N[&cursor=C]
    /v1/transactions  ?asOf=YYYY-MM-DD&fromDate=YYYY-MM-DD&toDate=YYYY-MM-DD&pageSize=N[&cursor=C]
    /v1/prices        ?asOf=YYYY-MM-DD&pageSize=N[&cursor=C]

Every page: ``{"asOf": "YYYY-MM-DD", "data": [ {...}, ... ], "nextCursor": "<opaque>" | null}``;
cursor pagination: the next page is requested with ``cursor=<nextCursor>`` until it is null (a
cursor seen twice is an error, not an endless loop). An `asOf` different from the one asked for
fails the pull (stale data is never written under another date). Items, mapped onto the canonical
feed columns (docs/feed_contract.md):

    positions     accountNumber, symbol, quantity
    lots          accountNumber, symbol, lotId, openDate, quantity, costBasis, [washSaleAdjusted]
    transactions  accountNumber, symbol, tradeDate, type (BUY SELL REINVEST TRANSFER_IN
                  TRANSFER_OUT, written lower case), quantity, price, [costBasis, acquiredDate]
    prices        symbol, close (the as-of date's close of every security held; cash is "CASH", 1)

Numbers are read as exact decimals (never floats) and written as plain decimal text. Values are
otherwise not corrected: a bad value reaches the feed as delivered and is rejected there, visibly.

Transport: 429 waits exactly the `Retry-After` (seconds or HTTP date; without it, the backoff
below) unless that is longer than `max_retry_after`, which fails at once; 5xx and network errors
are retried with exponential backoff (tenacity); both bounded by `max_attempts` per request.
Other 4xx fail at once.

Secrets: tokens live only in the token file, encrypted with Fernet (key: `REBAL_TOKEN_KEY`, read
through `settings.RebalSettings.token_key`, a urlsafe-base64 32-byte key, `Fernet.generate_key()`),
written atomically with mode 0600. The client id and secret come from the environment variables the
connection names (connections/credentials.py). The client secret and tokens are never in a repr, a
log line or an exception message.

`pull_day(api, as_of, out_dir)` writes positions.csv, lots.csv, transactions.csv and prices.csv
into a temporary sibling of `out_dir` and renames it into place only once every endpoint and
every page completed: a failed pull leaves an earlier complete `out_dir` untouched. Every page's
response body is kept byte for byte under `out_dir/raw/` (for the write-once archive: the raw
input of a decision stays recoverable). `out_dir` belongs to the pull (it holds only those files,
`raw/` and a hidden `.pull_manifest.json`); a folder holding anything else is refused rather than
replaced.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlencode

import httpx
from cryptography.fernet import Fernet, InvalidToken
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from rebal_pipeline import settings
from rebal_pipeline.connections.credentials import custodian_secret
from rebal_pipeline.core.clock import utc_now
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.folders import swap_in
from rebal_pipeline.core.retry_after import retry_after_seconds
from rebal_pipeline.core.write_once import fsync_dir

log = logging.getLogger(__name__)

TOKEN_KEY_ENV = "REBAL_TOKEN_KEY"
PULLED_FILES = ("positions", "lots", "transactions", "prices")
RAW_PAGES = "raw"
MANIFEST_NAME = ".pull_manifest.json"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class OAuthApiError(Exception):
    """The custodian API could not be used (message safe to log: no tokens, no secrets)."""


class ReauthorizationNeeded(OAuthApiError):
    """The refresh token is expired, revoked or missing: a person must authorize rebal again.

    `str(exc)` / `exc.alert_message` is a plain sentence for the operations alert.
    """

    def __init__(self, connection: str, detail: str):
        self.connection = connection
        self.alert_message = (
            f"The custodian API connection '{connection}' needs to be authorized again: {detail}. "
            f"Until an operator signs in at the custodian and approves rebal's access, no positions, "
            f"lots or transactions can be pulled from it."
        )
        super().__init__(self.alert_message)


class TokenKeyError(OAuthApiError):
    """REBAL_TOKEN_KEY is missing or wrong for the token file."""


class ApiRequestError(OAuthApiError):
    """A request failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class _Retryable(Exception):
    """Internal: a response worth retrying (5xx or 429)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Tokens, encrypted at rest
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: datetime  # timezone-aware UTC
    scope: str = ""

    def to_json(self) -> bytes:
        return json.dumps({
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at.isoformat(),
            "scope": self.scope,
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Tokens":
        data = json.loads(raw)
        return cls(data["access_token"], data["refresh_token"],
                   datetime.fromisoformat(data["expires_at"]), data.get("scope", ""))


class TokenStore:
    """The token file: Fernet-encrypted JSON, written atomically, mode 0600. Without a `key`, the
    key is REBAL_TOKEN_KEY of the settings at the moment the file is read or written."""

    def __init__(self, path: str | os.PathLike, key: str | bytes | None = None):
        self.path = Path(path)
        self._key = key

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r})"

    def _fernet(self) -> Fernet:
        key = self._key if self._key is not None else _token_key()
        if not key:
            raise TokenKeyError(f"{TOKEN_KEY_ENV} is not set: the token file {self.path} cannot be "
                                f"read or written (generate a key with Fernet.generate_key())")
        try:
            return Fernet(key)
        except (ValueError, TypeError):
            raise TokenKeyError(f"{TOKEN_KEY_ENV} is not a valid Fernet key (32 url-safe base64 bytes)") from None

    def load(self) -> Tokens | None:
        if not self.path.exists():
            return None
        try:
            return Tokens.from_json(self._fernet().decrypt(self.path.read_bytes()))
        except InvalidToken:
            raise TokenKeyError(f"the token file {self.path} cannot be decrypted with {TOKEN_KEY_ENV} "
                                f"(wrong key, or the file was altered)") from None

    def save(self, tokens: Tokens) -> None:
        blob = self._fernet().encrypt(tokens.to_json())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OAuthApiConfig:
    name: str                      # the connection's name (for messages and alerts)
    base_url: str                  # e.g. https://api.custodian.example
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    token_file: str | os.PathLike = ""
    authorize_url: str = ""
    redirect_uri: str = ""
    scope: str = ""
    page_size: int = 500
    refresh_margin: timedelta = timedelta(minutes=5)
    max_attempts: int = 5          # per request, first try included
    backoff_initial: float = 1.0   # seconds; doubles per retry
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    timeout: float = 30.0
    # The contract asks for at least the last 61 days (issue 14): a loss sold 30 days ago is
    # washed by a purchase up to 30 days before that sale (IRC §1091(a)).
    transactions_lookback_days: int = 61

    @classmethod
    def from_connection(cls, connection, *, environ=None, **overrides) -> "OAuthApiConfig":
        """From a `config.Connection` of kind oauth_api; secrets read from the env vars it names
        (`environ` replaces the process environment)."""
        o = connection.oauth
        client_id, client_secret = (custodian_secret(o.client_id_env, environ),
                                    custodian_secret(o.client_secret_env, environ))
        missing = [n for n, value in ((o.client_id_env, client_id), (o.client_secret_env, client_secret))
                   if not value]
        if missing:
            raise OAuthApiError(f"connection {connection.name}: environment variable(s) "
                                f"{', '.join(missing)} not set")
        return cls(name=connection.name, base_url=o.base_url, token_url=o.token_url,
                   client_id=client_id, client_secret=client_secret,
                   token_file=o.token_file, **{"authorize_url": o.authorize_url, "redirect_uri": o.redirect_uri,
                                               "scope": o.scope, "page_size": o.page_size, **overrides})


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------
class CustodianApi:
    """One custodian API connection. Use as a context manager (closes the HTTP client)."""

    def __init__(self, config: OAuthApiConfig, *, token_store: TokenStore | None = None,
                 now: Callable[[], datetime] = utc_now,
                 sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None):
        self.config = config
        self.tokens = token_store or TokenStore(config.token_file)
        self._now = now
        self._sleep = sleep
        self._http = httpx.Client(timeout=config.timeout, transport=transport, follow_redirects=False)
        # Called with (endpoint path, response bytes) for every data page read (pull_day keeps them).
        self.raw_sink: Callable[[str, bytes], None] | None = None

    def __repr__(self) -> str:
        return f"CustodianApi({self.config.name!r}, {self.config.base_url!r})"

    def __enter__(self) -> "CustodianApi":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- transport with retries ---------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return wait_exponential(multiplier=self.config.backoff_initial, min=self.config.backoff_initial,
                                max=self.config.backoff_max)(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception()
        log.warning("%s: %s; retry %d of %d in %.2fs", self.config.name, exc, state.attempt_number,
                    self.config.max_attempts - 1, state.next_action.sleep if state.next_action else 0)

    def _send(self, what: str, build: Callable[[], httpx.Response]) -> httpx.Response:
        """Send with retries on 429 / 5xx / network errors. Returns any other response."""

        def attempt() -> httpx.Response:
            try:
                response = build()
            except httpx.TransportError as exc:
                raise _Retryable(f"{what}: network error ({type(exc).__name__})", 0) from None
            if response.status_code == 429:
                wait = retry_after_seconds(response.headers.get("Retry-After"), self._now())
                if wait is not None and wait > self.config.max_retry_after:
                    raise ApiRequestError(f"{what}: rate limited, Retry-After {wait:.0f}s is beyond "
                                          f"the {self.config.max_retry_after:.0f}s limit", 429)
                raise _Retryable(f"{what}: 429 rate limited", 429, wait)
            if response.status_code >= 500:
                raise _Retryable(f"{what}: server error {response.status_code}", response.status_code)
            return response

        retrying = Retrying(
            stop=stop_after_attempt(self.config.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Retryable as exc:
            raise ApiRequestError(f"{exc} (gave up after {self.config.max_attempts} attempts)",
                                  exc.status or None) from None

    # ---- OAuth --------------------------------------------------------------------------
    def authorization_url(self, state: str) -> str:
        """Where an operator signs in and approves rebal (authorization-code grant, step 1)."""
        if not self.config.authorize_url or not self.config.redirect_uri:
            raise OAuthApiError(f"connection {self.config.name}: authorize_url and redirect_uri are needed")
        params = {"response_type": "code", "client_id": self.config.client_id,
                  "redirect_uri": self.config.redirect_uri, "state": state}
        if self.config.scope:
            params["scope"] = self.config.scope
        return f"{self.config.authorize_url}?{urlencode(params)}"

    def exchange_code(self, code: str) -> Tokens:
        """Step 2: trade the authorization code for tokens and store them (encrypted)."""
        form = {"grant_type": "authorization_code", "code": code}
        if self.config.redirect_uri:
            form["redirect_uri"] = self.config.redirect_uri
        tokens = self._token_request(form, previous=None)
        log.info("%s: authorized; access token valid until %s", self.config.name, tokens.expires_at.isoformat())
        return tokens

    def _token_request(self, form: dict, previous: Tokens | None) -> Tokens:
        what = f"{self.config.name} token endpoint ({form['grant_type']})"
        response = self._send(what, lambda: self._http.post(
            self.config.token_url, data=form, auth=(self.config.client_id, self.config.client_secret),
            headers={"Accept": "application/json"}))
        try:
            body = response.json()
        except ValueError:
            body = {}
        error = body.get("error") if isinstance(body, dict) else None
        if response.status_code == 400 and error == "invalid_grant":
            detail = ("the custodian rejected the stored refresh token (expired or revoked)"
                      if form["grant_type"] == "refresh_token"
                      else "the custodian rejected the authorization code (expired or already used)")
            raise ReauthorizationNeeded(self.config.name, detail)
        if response.status_code != 200:
            # Only the OAuth error code is repeated: the body of a token response is never logged.
            raise ApiRequestError(f"{what}: HTTP {response.status_code}"
                                  + (f" ({error})" if isinstance(error, str) else ""), response.status_code)
        try:
            access = body["access_token"]
            expires_in = float(body.get("expires_in", 3600))
        except (KeyError, TypeError, ValueError):
            raise ApiRequestError(f"{what}: malformed token response") from None
        refresh = body.get("refresh_token") or (previous.refresh_token if previous else None)
        if not refresh:
            raise ApiRequestError(f"{what}: no refresh token issued (ask for offline access)")
        tokens = Tokens(access, refresh, self._now() + timedelta(seconds=expires_in),
                        body.get("scope", previous.scope if previous else ""))
        self.tokens.save(tokens)
        return tokens

    def _refresh(self, tokens: Tokens) -> Tokens:
        log.info("%s: refreshing the access token (expires %s)", self.config.name, tokens.expires_at.isoformat())
        return self._token_request({"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                                   previous=tokens)

    def access_token(self, force_refresh: bool = False) -> str:
        """A valid access token, refreshed first when less than `refresh_margin` is left."""
        tokens = self.tokens.load()
        if tokens is None:
            raise ReauthorizationNeeded(self.config.name, "no tokens are stored for it yet")
        if force_refresh or tokens.expires_at - self._now() < self.config.refresh_margin:
            tokens = self._refresh(tokens)
        return tokens.access_token

    # ---- data ---------------------------------------------------------------------------
    def get_json(self, path: str, params: dict) -> dict:
        url = self.config.base_url.rstrip("/") + path
        what = f"{self.config.name} GET {path}"
        for refreshed in (False, True):
            token = self.access_token(force_refresh=refreshed)
            response = self._send(what, lambda: self._http.get(
                url, params=params, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}))
            if response.status_code == 401 and not refreshed:
                log.info("%s: 401, refreshing the access token once", what)
                continue
            if response.status_code != 200:
                raise ApiRequestError(f"{what}: HTTP {response.status_code}: {response.text[:200]}",
                                      response.status_code)
            try:
                body = json.loads(response.content, parse_float=Decimal)
            except ValueError:
                raise ApiRequestError(f"{what}: the response is not JSON") from None
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise ApiRequestError(f"{what}: the response has no 'data' list")
            if self.raw_sink is not None:
                self.raw_sink(path, response.content)
            return body
        raise AssertionError("unreachable")

    def iter_pages(self, path: str, params: dict, as_of: date | None = None) -> Iterator[list[dict]]:
        """Every page of an endpoint, following `nextCursor` until it is null."""
        cursor, seen, page = None, set(), 0
        while True:
            query = {**params, "pageSize": self.config.page_size}
            if cursor is not None:
                query["cursor"] = cursor
            body = self.get_json(path, query)
            page += 1
            if as_of is not None and body.get("asOf") not in (None, as_of.isoformat()):
                raise ApiRequestError(f"{self.config.name} GET {path}: page {page} is for asOf "
                                      f"{body.get('asOf')}, not {as_of.isoformat()}")
            log.info("%s GET %s: page %d, %d rows", self.config.name, path, page, len(body["data"]))
            yield body["data"]
            cursor = body.get("nextCursor")
            if cursor is None or cursor == "":
                return
            if cursor in seen:
                raise ApiRequestError(f"{self.config.name} GET {path}: cursor repeated on page {page}")
            seen.add(cursor)

    def positions(self, as_of: date) -> Iterator[list[dict]]:
        return self.iter_pages("/v1/positions", {"asOf": as_of.isoformat()}, as_of)

    def lots(self, as_of: date) -> Iterator[list[dict]]:
        return self.iter_pages("/v1/lots", {"asOf": as_of.isoformat()}, as_of)

    def prices(self, as_of: date) -> Iterator[list[dict]]:
        return self.iter_pages("/v1/prices", {"asOf": as_of.isoformat()}, as_of)

    def transactions(self, as_of: date) -> Iterator[list[dict]]:
        start = as_of - timedelta(days=self.config.transactions_lookback_days)
        return self.iter_pages("/v1/transactions", {"asOf": as_of.isoformat(), "fromDate": start.isoformat(),
                                                    "toDate": as_of.isoformat()}, as_of)


# --------------------------------------------------------------------------------------------
# Mapping onto the canonical feed, and the day's pull
# --------------------------------------------------------------------------------------------
FIELD_MAP: dict[str, dict[str, str]] = {
    "positions": {"account_id": "accountNumber", "symbol": "symbol", "quantity": "quantity"},
    "lots": {"account_id": "accountNumber", "symbol": "symbol", "lot_id": "lotId", "open_date": "openDate",
             "quantity": "quantity", "cost_basis": "costBasis", "wash_sale_adjusted": "washSaleAdjusted"},
    "transactions": {"account_id": "accountNumber", "symbol": "symbol", "trade_date": "tradeDate",
                     "type": "type", "quantity": "quantity", "price": "price", "cost_basis": "costBasis",
                     "acquired_date": "acquiredDate"},
    "prices": {"symbol": "symbol", "close": "close"},
}


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def canonical_row(file: str, item: dict) -> dict[str, str]:
    row = {column: _text(item.get(api_field)) for column, api_field in FIELD_MAP[file].items()}
    if file == "transactions":
        row["type"] = row["type"].lower()
    return row


@dataclass(frozen=True)
class PullResult:
    as_of: date
    out_dir: Path
    rows: dict[str, int]
    pages: dict[str, int]


def _check_owned(out_dir: Path) -> None:
    if out_dir.exists():
        allowed = {f"{n}.csv" for n in PULLED_FILES} | {MANIFEST_NAME, RAW_PAGES}
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in allowed)
        if foreign:
            raise OAuthApiError(f"{out_dir} holds files this pull does not own ({', '.join(foreign[:5])}); "
                                f"refusing to replace it")


def pull_day(api: CustodianApi, as_of: date, out_dir: str | os.PathLike) -> PullResult:
    """Pull the day's positions, lots and transactions into `out_dir`, all or nothing."""
    out_dir = Path(out_dir)
    _check_owned(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    rows: dict[str, int] = {}
    pages: dict[str, int] = {}
    (staging / RAW_PAGES).mkdir()
    page_numbers: dict[str, int] = {}

    def keep_raw(path: str, content: bytes) -> None:
        endpoint = path.rsplit("/", 1)[-1]
        page_numbers[endpoint] = page_numbers.get(endpoint, 0) + 1
        (staging / RAW_PAGES / f"{endpoint}-{page_numbers[endpoint]:05d}.json").write_bytes(content)

    previous_sink, api.raw_sink = api.raw_sink, keep_raw
    try:
        for name in PULLED_FILES:
            columns = FEED_FILES[name].column_names
            with (staging / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                rows[name] = pages[name] = 0
                for page in getattr(api, name)(as_of):
                    pages[name] += 1
                    for item in page:
                        if not isinstance(item, dict):
                            raise ApiRequestError(f"{api.config.name} {name}: page {pages[name]} holds a non-object item")
                        writer.writerow(canonical_row(name, item))
                        rows[name] += 1
                handle.flush()
                os.fsync(handle.fileno())
        manifest = {"connection": api.config.name, "as_of": as_of.isoformat(),
                    "pulled_at": utc_now().isoformat(), "rows": rows, "pages": pages}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        # Every endpoint and page completed: swap the new folder in.
        _check_owned(out_dir)
        swap_in(staging, out_dir)
        # Best effort: the folder is complete and in place; a filesystem that cannot fsync a
        # directory must not fail a pull that already succeeded.
        with contextlib.suppress(OSError):
            fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        api.raw_sink = previous_sink
    log.info("%s: pulled %s for %s into %s (%s)", api.config.name, ", ".join(PULLED_FILES),
             as_of.isoformat(), out_dir, ", ".join(f"{k} {v} rows" for k, v in rows.items()))
    return PullResult(as_of, out_dir, rows, pages)


def _token_key() -> str | None:
    key = settings.current().token_key
    return key.get_secret_value() if key is not None else None
