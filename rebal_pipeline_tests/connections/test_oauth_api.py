"""The OAuth custodian API client against a real local HTTP server with scripted answers."""

from __future__ import annotations

import base64
import csv
import json
import logging
import threading
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.fernet import Fernet

from rebal_pipeline.connections.oauth_api import (
    ApiRequestError,
    CustodianApi,
    OAuthApiConfig,
    ReauthorizationNeeded,
    Tokens,
    TokenStore,
    pull_day,
)

AS_OF = date(2026, 11, 20)
NOW = datetime(2026, 11, 20, 6, 0, tzinfo=timezone.utc)


class FakeCustodian:
    """A custodian-style v1 API: token endpoint, three cursor-paginated endpoints, scripted faults."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.faults: list[dict] = []
        self.codes = {"good-code"}
        self.refresh_tokens: set[str] = set()
        self.access_tokens: set[str] = set()
        self.serial = count(1)
        self.data = {
            "/v1/positions": [{"accountNumber": "ACC-1", "symbol": "VTI", "quantity": 10 + i} for i in range(5)],
            "/v1/lots": [{"accountNumber": "ACC-1", "symbol": "VTI", "lotId": f"L{i}", "openDate": "2024-01-02",
                          "quantity": 10 + i, "costBasis": 900.5} for i in range(5)],
            "/v1/transactions": [{"accountNumber": "ACC-1", "symbol": "VTI", "tradeDate": "2026-11-19",
                                  "type": "BUY", "quantity": 2, "price": 101.25}],
            "/v1/prices": [{"symbol": "VTI", "close": 250.125}, {"symbol": "CASH", "close": 1}],
        }

    def fault(self, path, status, times=1, headers=None, body=None, cursor=None):
        self.faults.append({"path": path, "status": status, "times": times, "headers": headers or {},
                            "body": body or {"error": "scripted"}, "cursor": cursor})

    def issue(self) -> dict:
        n = next(self.serial)
        access, refresh = f"access-{n}-secretvalue", f"refresh-{n}-secretvalue"
        self.access_tokens.add(access)
        self.refresh_tokens.add(refresh)
        return {"access_token": access, "token_type": "Bearer", "expires_in": 3600,
                "refresh_token": refresh, "scope": "read"}

    def handle(self, method, path, query, headers, form):
        with self.lock:
            self.requests.append({"method": method, "path": path, "query": query,
                                  "auth": headers.get("Authorization"), "form": form})
            for f in self.faults:
                if f["path"] == path and f["times"] > 0 and f["cursor"] in (None, query.get("cursor")):
                    f["times"] -= 1
                    return f["status"], f["headers"], f["body"]
            if path == "/oauth/token":
                basic = base64.b64encode(b"client-1:s3cret").decode()
                if headers.get("Authorization") != f"Basic {basic}":
                    return 401, {}, {"error": "invalid_client"}
                if form.get("grant_type") == "authorization_code" and form.get("code") in self.codes:
                    self.codes.discard(form["code"])
                    return 200, {}, self.issue()
                if form.get("grant_type") == "refresh_token" and form.get("refresh_token") in self.refresh_tokens:
                    self.refresh_tokens.discard(form["refresh_token"])  # rotation
                    return 200, {}, self.issue()
                return 400, {}, {"error": "invalid_grant"}
            if path in self.data:
                token = (headers.get("Authorization") or "").removeprefix("Bearer ")
                if token not in self.access_tokens:
                    return 401, {}, {"error": "invalid_token"}
                size = int(query.get("pageSize", "2"))
                start = int(query.get("cursor", "0"))
                rows = self.data[path][start:start + size]
                nxt = str(start + size) if start + size < len(self.data[path]) else None
                return 200, {}, {"asOf": query.get("asOf"), "data": rows, "nextCursor": nxt}
            return 404, {}, {"error": "not_found"}

    def paths(self, path):
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture
def custodian():
    fake = FakeCustodian()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method):
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()} if length else {}
            status, headers, body = fake.handle(method, parts.path, query, dict(self.headers), form)
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def key(monkeypatch):
    k = Fernet.generate_key().decode()
    monkeypatch.setenv("REBAL_TOKEN_KEY", k)  # connections/oauth_api.py reads the token key from the environment
    return k


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


def make_api(custodian, tmp_path, clock=None, sleeps=None, page_size=2, **kw) -> CustodianApi:
    config = OAuthApiConfig(
        name="schwab-main", base_url=custodian.url, token_url=f"{custodian.url}/oauth/token",
        client_id="client-1", client_secret="s3cret", token_file=tmp_path / "tokens" / "schwab-main.bin",
        authorize_url=f"{custodian.url}/oauth/authorize", redirect_uri="https://rebal.example/callback",
        page_size=page_size, backoff_initial=0.5, **kw)
    record = sleeps if sleeps is not None else []
    return CustodianApi(config, now=clock or Clock(), sleep=record.append)


def authorized(custodian, tmp_path, **kw) -> CustodianApi:
    api = make_api(custodian, tmp_path, **kw)
    api.exchange_code("good-code")
    return api


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------
def test_authorization_code_grant_and_token_file_is_encrypted(custodian, tmp_path, key):
    api = make_api(custodian, tmp_path)
    url = api.authorization_url("state-xyz")
    assert url.startswith(f"{custodian.url}/oauth/authorize?response_type=code&client_id=client-1")
    assert "state=state-xyz" in url and "redirect_uri=https%3A%2F%2Frebal.example%2Fcallback" in url

    tokens = api.exchange_code("good-code")
    form = custodian.paths("/oauth/token")[0]["form"]
    assert form == {"grant_type": "authorization_code", "code": "good-code",
                    "redirect_uri": "https://rebal.example/callback"}

    path = tmp_path / "tokens" / "schwab-main.bin"
    raw = path.read_bytes()
    assert b"secretvalue" not in raw and b"access_token" not in raw and b"refresh" not in raw
    assert path.stat().st_mode & 0o777 == 0o600
    stored = Tokens.from_json(Fernet(key.encode()).decrypt(raw))
    assert stored.access_token == tokens.access_token == "access-1-secretvalue"
    assert stored.expires_at == NOW + timedelta(hours=1)
    assert "secretvalue" not in repr(tokens) and "s3cret" not in repr(api.config)
    # A wrong key cannot read it.
    with pytest.raises(Exception, match="cannot be decrypted"):
        TokenStore(path, key=Fernet.generate_key()).load()


def test_refresh_before_expiry_and_tokens_never_logged(custodian, tmp_path, key, caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    api = authorized(custodian, tmp_path, clock=clock)
    out = tmp_path / "feed" / "schwab-main" / AS_OF.isoformat()

    clock.now = NOW + timedelta(minutes=50)  # 10 minutes left: no refresh
    pull_day(api, AS_OF, out)
    assert len(custodian.paths("/oauth/token")) == 1
    assert {r["auth"] for r in custodian.requests if r["path"].startswith("/v1/")} == {"Bearer access-1-secretvalue"}

    clock.now = NOW + timedelta(minutes=56)  # 4 minutes left: refreshed before any data request
    custodian.requests.clear()
    pull_day(api, AS_OF, out)
    first = custodian.requests[0]
    assert first["path"] == "/oauth/token"
    assert first["form"] == {"grant_type": "refresh_token", "refresh_token": "refresh-1-secretvalue"}
    assert {r["auth"] for r in custodian.requests[1:]} == {"Bearer access-2-secretvalue"}
    assert api.tokens.load().refresh_token == "refresh-2-secretvalue"  # rotated and stored
    assert api.tokens.load().expires_at == clock.now + timedelta(hours=1)
    assert "secretvalue" not in caplog.text and "s3cret" not in caplog.text


def test_rate_limit_waits_retry_after_then_succeeds(custodian, tmp_path, key):
    sleeps: list[float] = []
    api = authorized(custodian, tmp_path, sleeps=sleeps)
    custodian.fault("/v1/positions", 429, headers={"Retry-After": "7"})
    result = pull_day(api, AS_OF, tmp_path / "out")
    assert sleeps == [7.0]
    assert len(custodian.paths("/v1/positions")) == 1 + 3  # the 429, then 3 pages
    assert result.rows["positions"] == 5


def test_retry_after_beyond_limit_fails_without_waiting(custodian, tmp_path, key):
    sleeps: list[float] = []
    api = authorized(custodian, tmp_path, sleeps=sleeps, max_retry_after=60)
    custodian.fault("/v1/positions", 429, headers={"Retry-After": "3600"})
    with pytest.raises(ApiRequestError, match="Retry-After 3600s"):
        pull_day(api, AS_OF, tmp_path / "out")
    assert sleeps == [] and not (tmp_path / "out").exists()


def test_server_errors_are_retried_with_exponential_backoff(custodian, tmp_path, key):
    sleeps: list[float] = []
    api = authorized(custodian, tmp_path, sleeps=sleeps)
    custodian.fault("/v1/lots", 503, times=2)
    result = pull_day(api, AS_OF, tmp_path / "out")
    assert sleeps == [0.5, 1.0]
    assert result.rows["lots"] == 5


def test_server_errors_are_bounded(custodian, tmp_path, key):
    sleeps: list[float] = []
    api = authorized(custodian, tmp_path, sleeps=sleeps, max_attempts=3)
    custodian.fault("/v1/positions", 503, times=99)
    with pytest.raises(ApiRequestError, match="server error 503.*gave up after 3 attempts"):
        pull_day(api, AS_OF, tmp_path / "out")
    assert len(sleeps) == 2 and len(custodian.paths("/v1/positions")) == 3


def test_pagination_across_three_pages_writes_canonical_csv(custodian, tmp_path, key):
    api = authorized(custodian, tmp_path)
    out = tmp_path / "out"
    result = pull_day(api, AS_OF, out)
    cursors = [r["query"].get("cursor") for r in custodian.paths("/v1/positions")]
    assert cursors == [None, "2", "4"]
    assert result.pages == {"positions": 3, "lots": 3, "transactions": 1, "prices": 1}
    assert result.rows == {"positions": 5, "lots": 5, "transactions": 1, "prices": 2}
    assert all(r["query"]["asOf"] == "2026-11-20" and r["query"]["pageSize"] == "2"
               for r in custodian.requests if r["path"].startswith("/v1/"))
    txq = custodian.paths("/v1/transactions")[0]["query"]
    # Issue 14: the contract's 61-day look-back (a loss sold 30 days ago is washed by a purchase up to
    # 30 days before it): 2026-11-20 − 61 days.
    assert txq["fromDate"] == "2026-09-20" and txq["toDate"] == "2026-11-20"

    positions = read_csv(out / "positions.csv")
    assert [p["quantity"] for p in positions] == ["10", "11", "12", "13", "14"]
    assert list(positions[0]) == ["account_id", "symbol", "quantity"]
    lots = read_csv(out / "lots.csv")
    assert lots[0] == {"account_id": "ACC-1", "symbol": "VTI", "lot_id": "L0", "open_date": "2024-01-02",
                       "quantity": "10", "cost_basis": "900.5", "wash_sale_adjusted": ""}
    assert read_csv(out / "transactions.csv") == [
        {"account_id": "ACC-1", "symbol": "VTI", "trade_date": "2026-11-19", "type": "buy",
         "quantity": "2", "price": "101.25", "cost_basis": "", "acquired_date": ""}]
    assert read_csv(out / "prices.csv") == [{"symbol": "VTI", "close": "250.125"}, {"symbol": "CASH", "close": "1"}]
    assert sorted(p.name for p in out.iterdir()) == [".pull_manifest.json", "lots.csv", "positions.csv",
                                                     "prices.csv", "raw", "transactions.csv"]
    # Every page's body is kept byte for byte for the archive, in the order it was read.
    raw = sorted(p.name for p in (out / "raw").iterdir())
    assert raw == ["lots-00001.json", "lots-00002.json", "lots-00003.json", "positions-00001.json",
                   "positions-00002.json", "positions-00003.json", "prices-00001.json", "transactions-00001.json"]
    assert json.loads((out / "raw" / "positions-00002.json").read_bytes())["data"][0]["quantity"] == 12
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_expired_refresh_token_needs_reauthorization(custodian, tmp_path, key):
    clock = Clock()
    api = authorized(custodian, tmp_path, clock=clock)
    custodian.refresh_tokens.clear()  # revoked / expired at the custodian
    clock.now = NOW + timedelta(hours=2)
    with pytest.raises(ReauthorizationNeeded) as caught:
        pull_day(api, AS_OF, tmp_path / "out")
    message = caught.value.alert_message
    assert "'schwab-main' needs to be authorized again" in message and "expired or revoked" in message
    assert "secretvalue" not in message
    assert str(caught.value) == message
    assert len(custodian.paths("/oauth/token")) == 2  # not retried
    assert custodian.paths("/v1/positions") == []
    assert not (tmp_path / "out").exists()


def test_no_stored_tokens_needs_authorization(custodian, tmp_path, key):
    with pytest.raises(ReauthorizationNeeded, match="no tokens are stored"):
        pull_day(make_api(custodian, tmp_path), AS_OF, tmp_path / "out")


def test_failure_on_page_two_leaves_the_previous_complete_pull_untouched(custodian, tmp_path, key):
    api = authorized(custodian, tmp_path, max_attempts=2)
    out = tmp_path / "out"
    pull_day(api, AS_OF, out)
    before = {p.name: p.read_bytes() for p in out.rglob('*') if p.is_file()}

    # The custodian now has other numbers, but page 2 of lots keeps failing.
    custodian.data["/v1/positions"][0]["quantity"] = 999
    custodian.fault("/v1/lots", 500, times=99, cursor="2")
    with pytest.raises(ApiRequestError, match="server error 500"):
        pull_day(api, AS_OF, out)
    assert {p.name: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    # A non-retryable failure on page 2 of a first pull leaves nothing behind either.
    fresh = tmp_path / "fresh"
    custodian.faults.clear()
    custodian.fault("/v1/positions", 403, cursor="2")
    with pytest.raises(ApiRequestError, match="HTTP 403"):
        pull_day(api, AS_OF, fresh)
    assert not fresh.exists()

    # Once the custodian recovers, the new pull replaces the old one.
    pull_day(api, AS_OF, out)
    assert read_csv(out / "positions.csv")[0]["quantity"] == "999"


def test_refuses_to_replace_a_folder_it_does_not_own(custodian, tmp_path, key):
    api = authorized(custodian, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "holdings.csv").write_text("account_id,symbol\n")
    with pytest.raises(Exception, match="does not own"):
        pull_day(api, AS_OF, out)
    assert (out / "holdings.csv").exists()


def test_stale_as_of_fails_the_pull(custodian, tmp_path, key):
    api = authorized(custodian, tmp_path)
    custodian.fault("/v1/positions", 200, body={"asOf": "2026-11-19", "data": [], "nextCursor": None})
    with pytest.raises(ApiRequestError, match="asOf 2026-11-19"):
        pull_day(api, AS_OF, tmp_path / "out")


def test_a_401_forces_one_refresh(custodian, tmp_path, key):
    api = authorized(custodian, tmp_path)
    custodian.access_tokens.clear()  # the custodian revoked the access token early
    pull_day(api, AS_OF, tmp_path / "out")
    grants = [r["form"]["grant_type"] for r in custodian.paths("/oauth/token")]
    assert grants == ["authorization_code", "refresh_token"]
