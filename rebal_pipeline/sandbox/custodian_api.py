"""A sandbox custodian REST API on loopback: the custodian-style v1 API of
`rebal_pipeline.connections.oauth_api`, serving a canonical sandbox book.

Real HTTP (the standard library's ThreadingHTTPServer), real OAuth 2.0 authorization-code flow:

- ``GET /oauth/authorize?response_type=code&client_id&redirect_uri&state`` approves at once (a
  sandbox has no person to sign in) and redirects (302) to ``redirect_uri?code=..&state=..``;
- ``POST /oauth/token`` (HTTP Basic client authentication) for ``authorization_code`` and
  ``refresh_token`` grants; refresh tokens rotate; `revoke_refresh_tokens()` makes the next
  refresh fail with ``invalid_grant`` (what a custodian answers once a refresh token expired);
- ``GET /v1/positions | /v1/lots | /v1/transactions | /v1/prices`` with a bearer token,
  ``asOf`` (must be the book's date), cursor pagination (``pageSize``, ``cursor``).

Numbers are sent as JSON numbers written from the book's decimal text, so nothing is rounded on
the way. Used by `rebal drill --via-custodians` and the connection tests; no production code
imports it.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import secrets
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from rebal_pipeline.core.feed_contract import FEED_FILES

# canonical column → (API field, JSON type)
_FIELDS = {
    "positions": [("account_id", "accountNumber", "text"), ("symbol", "symbol", "text"),
                  ("quantity", "quantity", "number")],
    "lots": [("account_id", "accountNumber", "text"), ("symbol", "symbol", "text"), ("lot_id", "lotId", "text"),
             ("open_date", "openDate", "text"), ("quantity", "quantity", "number"),
             ("cost_basis", "costBasis", "number"), ("wash_sale_adjusted", "washSaleAdjusted", "bool")],
    "transactions": [("account_id", "accountNumber", "text"), ("symbol", "symbol", "text"),
                     ("trade_date", "tradeDate", "text"), ("type", "type", "upper"),
                     ("quantity", "quantity", "number"), ("price", "price", "number"),
                     ("cost_basis", "costBasis", "number"), ("acquired_date", "acquiredDate", "text")],
    "prices": [("symbol", "symbol", "text"), ("close", "close", "number")],
}


def _json_item(file: str, row: dict[str, str]) -> str:
    """One item as JSON text; empty optional cells are left out, numbers written verbatim."""
    parts = []
    for column, api_field, kind in _FIELDS[file]:
        value = row.get(column) or ""
        if value == "":
            continue
        if kind == "number":
            Decimal(value)  # a sandbox book is clean: anything else is a bug here
            text = value
        elif kind == "bool":
            text = "true" if value.lower() == "true" else "false"
        elif kind == "upper":
            text = json.dumps(value.upper())
        else:
            text = json.dumps(value)
        parts.append(f"{json.dumps(api_field)}: {text}")
    return "{" + ", ".join(parts) + "}"


class SandboxCustodianApi:
    """Serve the custodian rows of a canonical feed folder (optionally only some accounts)."""

    def __init__(self, feed_dir: Path, *, client_id: str, client_secret: str,
                 account_ids: set[str] | None = None, expires_in: int = 3600):
        self.feed_dir = Path(feed_dir)
        self.as_of = dt.date.fromisoformat(self.feed_dir.name)
        self.client_id, self.client_secret = client_id, client_secret
        self.expires_in = expires_in
        self.lock = threading.Lock()
        self.codes: set[str] = set()
        self.access_tokens: set[str] = set()
        self.refresh_tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.items = {name: self._load(name, account_ids) for name in _FIELDS}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _load(self, name: str, account_ids: set[str] | None) -> list[str]:
        with open(self.feed_dir / FEED_FILES[name].filename, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if account_ids is not None and name != "prices":
            # Prices stay whole: a custodian prices its whole security master.
            rows = [r for r in rows if r["account_id"] in account_ids]
        return [_json_item(name, r) for r in rows]

    # -- lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "SandboxCustodianApi":
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                api._handle(self, "GET")

            def do_POST(self):
                api._handle(self, "POST")

            def log_message(self, *args):  # quiet: a sandbox
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def revoke_refresh_tokens(self) -> None:
        with self.lock:
            self.refresh_tokens.clear()

    # -- requests
    def _issue(self) -> dict:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.access_tokens.add(access)
        self.refresh_tokens.add(refresh)
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in,
                "refresh_token": refresh, "scope": "read"}

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append((method, parts.path))
        if method == "GET" and parts.path == "/oauth/authorize":
            if query.get("client_id") != self.client_id or not query.get("redirect_uri"):
                return self._send(handler, 400, {"error": "invalid_request"})
            code = secrets.token_urlsafe(16)
            with self.lock:
                self.codes.add(code)
            location = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}"
            return self._send(handler, 302, {}, headers={"Location": location})
        if method == "POST" and parts.path == "/oauth/token":
            length = int(handler.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(handler.rfile.read(length).decode()).items()}
            basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
            if handler.headers.get("Authorization") != f"Basic {basic}":
                return self._send(handler, 401, {"error": "invalid_client"})
            with self.lock:
                if form.get("grant_type") == "authorization_code" and form.get("code") in self.codes:
                    self.codes.discard(form["code"])
                    return self._send(handler, 200, self._issue())
                if form.get("grant_type") == "refresh_token" and form.get("refresh_token") in self.refresh_tokens:
                    self.refresh_tokens.discard(form["refresh_token"])  # rotation
                    return self._send(handler, 200, self._issue())
            return self._send(handler, 400, {"error": "invalid_grant"})
        name = parts.path.removeprefix("/v1/")
        if method == "GET" and name in self.items:
            token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
            with self.lock:
                if token not in self.access_tokens:
                    return self._send(handler, 401, {"error": "invalid_token"})
            if query.get("asOf") != self.as_of.isoformat():
                return self._send(handler, 404, {"error": "no data for that date"})
            size = max(1, min(int(query.get("pageSize", "500")), 10_000))
            start = int(query.get("cursor", "0"))
            page = self.items[name][start:start + size]
            next_cursor = json.dumps(str(start + size)) if start + size < len(self.items[name]) else "null"
            body = (f'{{"asOf": "{self.as_of.isoformat()}", "data": [{", ".join(page)}], '
                    f'"nextCursor": {next_cursor}}}').encode()
            return self._send_raw(handler, 200, body)
        return self._send(handler, 404, {"error": "not_found"})

    def _send(self, handler, status: int, body: dict, headers: dict | None = None) -> None:
        self._send_raw(handler, status, json.dumps(body).encode(), headers)

    @staticmethod
    def _send_raw(handler, status: int, raw: bytes, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(raw)
