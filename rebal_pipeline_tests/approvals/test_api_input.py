"""Hostile request bodies against the approval API as it is deployed: `python -m
rebal_pipeline.approval_api` (uvicorn) in its own process on 127.0.0.1, so chunked streaming is
real and the server's memory can be read from /proc/<pid>/status. The client is a raw socket
that keeps reading while it sends, as curl does: it sees the 413 the moment the server answers,
and counts how much of the body it had sent by then.

Also: the queue (GET /recommendations) reads summaries only and sorts by urgency then age, on
SQLite and Postgres (the `store` fixture).
"""

from __future__ import annotations

import json
import os
import select
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import event, func, select as sql_select, update

from rebal_pipeline.approval_api import create_app
from rebal_pipeline.approval_api.request_body import MAX_BODY_BYTES
from rebal_pipeline.approval_api.testing import running_server
from rebal_pipeline.sandbox.local_peers import free_port
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.schema import audit_events, decisions, recommendations
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, package, publish

MB = 1024 * 1024
STREAMED = 64 * MB


def _proc_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass
class Server:
    url: str
    port: int
    pid: int
    store: WorkflowStore
    token: str
    link: str

    def recorded(self) -> tuple[int, int]:
        """(decisions, audit events) in the workflow store."""
        with self.store.begin() as conn:
            return (conn.execute(sql_select(func.count()).select_from(decisions)).scalar_one(),
                    conn.execute(sql_select(func.count()).select_from(audit_events)).scalar_one())

    def post(self, path: str, raw: bytes, token: bool = True) -> httpx.Response:
        headers = {"content-type": "application/json", **({"Authorization": f"Bearer {self.token}"} if token else {})}
        with httpx.Client(base_url=self.url, timeout=30) as c:
            return c.post(path, content=raw, headers=headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-input")
    url_db = f"sqlite:///{folder / 'workflow.sqlite'}"
    secret = secrets.token_urlsafe(48)
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("REBAL_AUDIT_KEY", "").strip() and os.environ.get("REBAL_SANDBOX") != "1":
            # The store signs its events with it, and the API server (a subprocess) reads it from
            # the environment it inherits: the environment is the interface here.
            mp.setenv("REBAL_AUDIT_KEY", secrets.token_urlsafe(32))
        store = WorkflowStore(url_db)
        store.migrate()
        publish(store, package("REC-1", "ACC-1"), package("REC-2", "ACC-2"), package("REC-3", "ACC-3"))
        token = secrets.token_urlsafe(32)
        with store.begin() as conn:
            lifecycle.issue_api_token(conn, "ADV-1", token, PUBLISHED_AT)
        link_app = create_app(store, secret.encode())  # only to sign a link with the server's secret
        link = link_app.state.issue_links("REC-2", "ADV-1", actions=("approve",))["approve"]
        port = free_port()
        env = {**os.environ, "REBAL_LINK_SECRET": secret, "REBAL_WORKFLOW_DB_URL": url_db}
        log_file = open(folder / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "rebal_pipeline.approval_api", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-migrate"], env=env, stdout=log_file, stderr=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise AssertionError("the API server exited: " + (folder / "server.log").read_text()[-2000:])
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("the API server did not start: " + (folder / "server.log").read_text()[-2000:])
                time.sleep(0.1)
            yield Server(url=url, port=port, pid=proc.pid, store=store, token=token, link=link)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log_file.close()
            store.dispose()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client had sent when the answer arrived

    def json(self) -> dict:
        return json.loads(self.body)


def stream_chunked(port: int, path: str, total: int, token: str | None = None, chunk: int = 64 * 1024,
                   head_only_length: int | None = None, timeout: float = 60) -> Answer:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length), reading while
    sending: stop sending as soon as the server answers. With head_only_length: send only the
    headers with that Content-Length and wait for the answer."""
    headers = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    headers += [f"Content-Length: {head_only_length}"] if head_only_length is not None else ["Transfer-Encoding: chunked"]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    pending = ("\r\n".join(headers) + "\r\n\r\n").encode()
    # JSON-looking bytes: the content is beside the point, the size is.
    frame = b"%x\r\n" % chunk + b'{"reason":"' + b"x" * (chunk - 11) + b"\r\n"
    sent, answer, sending = 0, b"", True
    if head_only_length is not None:
        total = 0
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    break
                answer += data
                sending = False  # the server has answered: a real client stops sending
                if _complete(answer):
                    break
            elif writable:
                if not pending:
                    if head_only_length is not None:
                        sending = False
                        continue
                    if sent >= total:
                        pending, sending = b"0\r\n\r\n", False
                    else:
                        pending, sent = frame, sent + chunk
                try:
                    pending = pending[sock.send(pending):]
                except (BrokenPipeError, ConnectionResetError):
                    sending = False
                if not sending and pending:  # the terminator, blocking is fine
                    try:
                        sock.setblocking(True)
                        sock.sendall(pending)
                        sock.setblocking(False)
                    except OSError:
                        pass
        else:
            raise AssertionError(f"no answer within {timeout}s ({sent} bytes sent)")
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return Answer(status=status, headers=parsed, body=body, sent=sent)


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def assert_refused(answer: Answer, status: int, words: str) -> dict:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "detail"} and words in body["error"], body
    return body


def assert_error(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and words in body["error"], body
    return body


# ---------------------------------------------------------------------------------------------
# The body limit, on the stream and before authentication
# ---------------------------------------------------------------------------------------------


def test_a_chunked_64mb_body_is_refused_at_the_limit_and_the_server_stays_small(server):
    # Warm up (imports, pools, the store's connection), then take the baseline.
    assert server.post("/recommendations/REC-1/decisions", b'{"action":"nonsense"}').status_code == 422
    assert httpx.get(server.url + "/recommendations", headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
    rss_before, peak_before = _proc_kb(server.pid, "VmRSS"), _proc_kb(server.pid, "VmHWM")
    recorded = server.recorded()

    answer = stream_chunked(server.port, "/recommendations/REC-1/decisions", STREAMED, token=server.token)

    grown_rss = (_proc_kb(server.pid, "VmRSS") - rss_before) / 1024
    grown_peak = (_proc_kb(server.pid, "VmHWM") - peak_before) / 1024  # the peak: freed memory counts too
    assert answer.sent < 16 * MB, f"the answer came only after {answer.sent} of {STREAMED} bytes"
    assert grown_peak < 50 and grown_rss < 50, f"the server grew by {grown_peak:.0f} MB at peak, {grown_rss:.0f} MB now"
    body = assert_refused(answer, 413, "larger than 2097152 bytes")
    assert body["detail"] == {"limit_bytes": MAX_BODY_BYTES}
    assert answer.headers["connection"] == "close"  # the server stops reading the rest
    assert server.recorded() == recorded
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_an_oversized_stream_without_a_token_is_413_not_read_to_the_end(server):
    recorded = server.recorded()
    for path in ("/recommendations/REC-1/decisions", "/decisions/batch", f"/links/{server.link}"):
        answer = stream_chunked(server.port, path, STREAMED)
        assert_refused(answer, 413, "larger than")  # not 401: refused before authentication
        assert answer.sent < 16 * MB, f"{path}: the answer came only after {answer.sent} of {STREAMED} bytes"
    assert server.recorded() == recorded


def test_a_declared_content_length_over_the_limit_is_refused_before_any_byte_is_read(server):
    # Only the headers are sent: the 413 must come without waiting for the 300 MB.
    answer = stream_chunked(server.port, "/recommendations/REC-1/decisions", 0, head_only_length=300 * MB, timeout=15)
    assert_refused(answer, 413, "larger than")
    assert answer.headers["connection"] == "close"
    # Just under the limit is read (and judged on its content).
    near = b'{"action":"approve","reason":"' + b"x" * (MAX_BODY_BYTES - 40) + b'"}'
    assert len(near) <= MAX_BODY_BYTES
    assert_error(server.post("/recommendations/REC-1/decisions", near), 422, "not valid")


# ---------------------------------------------------------------------------------------------
# JSON read strictly: repeated keys 422, not UTF-8 400; nothing recorded
# ---------------------------------------------------------------------------------------------


def test_a_repeated_key_is_refused_with_422_and_nothing_recorded(server):
    recorded = server.recorded()
    # The last `action` would have won: an escalation the advisor's tool never meant to send.
    body = assert_error(server.post("/recommendations/REC-1/decisions",
                                    b'{"action":"approve","action":"escalate","reason":"x"}'), 422, 'repeats the key "action"')
    assert body["detail"] == [{"loc": ["body"], "msg": 'duplicate key "action"', "type": "duplicate_key"}]
    nested = b'{"action":"modify","trades":[{"account_id":"ACC-1","symbol":"VTI","side":"sell","quantity":8,"quantity":80}]}'
    assert_error(server.post("/recommendations/REC-1/decisions", nested), 422, 'repeats the key "quantity"')
    batch = b'{"items":[{"recommendation_id":"REC-1","recommendation_id":"REC-3","action":"approve"}]}'
    assert_error(server.post("/decisions/batch", batch), 422, 'repeats the key "recommendation_id"')
    assert_error(server.post(f"/links/{server.link}", b'{"reason":"a","reason":"b"}', token=False), 422, "repeats the key")
    assert_error(server.post("/recommendations/REC-1/decisions", b'{"action":"approve","reason":NaN}'), 422,
                 "NaN is not a JSON number")
    assert server.recorded() == recorded
    with server.store.begin() as conn:
        assert {r.status for r in conn.execute(sql_select(recommendations.c.status))} == {"pending"}


@pytest.mark.parametrize("raw, words", [
    ('{"action": "approve"}'.encode("utf-16"), "UTF-16"),  # with its byte order mark
    ('{"action": "approve"}'.encode("utf-16-le"), "UTF-16-LE"),  # without
    ('{"action": "approve"}'.encode("utf-32"), "UTF-32"),
    ('{"action": "approve"}'.encode("utf-8-sig"), "byte order mark"),
    (b'{"action": "approve", "reason": "caf\xe9"}', "byte 36 is not UTF-8"),  # Latin-1 é at offset 36
    (b'{"action": "approve", "reason": "\xed\xa0\x80"}', "is not UTF-8"),  # an encoded surrogate
], ids=["utf16-bom", "utf16le", "utf32", "utf8-bom", "latin1", "surrogate"])
def test_a_body_that_is_not_utf8_json_is_400_and_nothing_recorded(server, raw, words):
    recorded = server.recorded()
    for path in ("/recommendations/REC-1/decisions", "/decisions/batch"):
        assert_error(server.post(path, raw), 400, words)
    assert_error(server.post(f"/links/{server.link}", raw, token=False), 400, words)
    assert server.recorded() == recorded


def test_a_well_formed_body_is_still_decided(server):
    recorded = server.recorded()
    response = server.post("/recommendations/REC-3/decisions", '{"action": "approve", "reason": "café ✓"}'.encode())
    assert response.status_code == 201, response.text
    assert response.json()["decision"]["reason"] == "café ✓"
    assert server.recorded() == (recorded[0] + 1, recorded[1] + 1)


def test_the_openapi_document_describes_the_body_answers(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/recommendations/{recommendation_id}/decisions", "/decisions/batch", "/links/{token}"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "UTF-8" in responses["400"]["description"] and "UTF-16" in responses["400"]["description"], path
        assert str(MAX_BODY_BYTES) in responses["413"]["description"], path
        assert "repeated" in responses["422"]["description"], path
        for status in ("400", "413", "422"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


# ---------------------------------------------------------------------------------------------
# The queue: summaries only, most urgent first, then oldest
# ---------------------------------------------------------------------------------------------


def test_the_queue_reads_summaries_only_sorted_by_urgency_then_age(store):
    def urgent(recommendation_id, account_id, urgency):
        return package(recommendation_id, account_id).model_copy(update={"urgency": urgency})

    publish(store, urgent("REC-L", "ACC-L", "low"), urgent("REC-M1", "ACC-M1", "medium"),
            urgent("REC-H1", "ACC-H1", "high"), urgent("REC-M2", "ACC-M2", "medium"),
            urgent("REC-H2", "ACC-H2", "high"))
    started = {"REC-H1": 1, "REC-H2": 3, "REC-M1": 2, "REC-M2": 5, "REC-L": 9}  # days before publication
    token = secrets.token_urlsafe(32)
    with store.begin() as conn:
        for rid, days in started.items():
            conn.execute(update(recommendations).where(recommendations.c.recommendation_id == rid)
                         .values(clock_started_at=PUBLISHED_AT - timedelta(days=days)))
        lifecycle.issue_api_token(conn, "ADV-1", token, PUBLISHED_AT)
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "wf_recommendations" in statement:
            statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        app = create_app(store, secrets.token_bytes(32), clock=lambda: PUBLISHED_AT + timedelta(hours=1))
        with running_server(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            listing = c.get("/recommendations")
            page = c.get("/recommendations", params={"limit": 2, "offset": 2}).json()
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert listing.status_code == 200, listing.text
    items = listing.json()["items"]
    # high before medium before low; within one urgency, the oldest (longest waiting) first
    assert [i["recommendation_id"] for i in items] == ["REC-H2", "REC-H1", "REC-M2", "REC-M1", "REC-L"]
    assert [i["urgency"] for i in items] == ["high", "high", "medium", "medium", "low"]
    assert all("package" not in i and "trades" not in i for i in items)
    assert [i["recommendation_id"] for i in page["items"]] == ["REC-M2", "REC-M1"] and page["next_offset"] == 4
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert reads and not any("package" in s for s in reads), reads
