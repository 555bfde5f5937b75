"""Real network peers for the comms tests, all on 127.0.0.1: an SMTP server (aiosmtpd) that
collects what it receives, optionally requiring STARTTLS with a self-signed certificate made on
the spot, and a CRM HTTP server (http.server in a thread) that records requests and answers from
a script."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs

from rebal_pipeline.sandbox.local_peers import free_port  # the one free-port helper (tests import it from here too)


# ---------------------------------------------------------------------------------------------
# SMTP
# ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None


@dataclass
class SmtpPeer:
    host: str
    port: int
    messages: list[Received] = field(default_factory=list)


class _Collector:
    def __init__(self, peer: SmtpPeer):
        self.peer = peer

    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.decode() if isinstance(session.auth_data, bytes) else session.auth_data
        self.peer.messages.append(Received(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or envelope.content, tls=session.ssl is not None, login=login,
        ))
        return "250 Message accepted for delivery"


@contextmanager
def smtp_server(tls_context: ssl.SSLContext | None = None, users: dict[str, str] | None = None) -> Iterator[SmtpPeer]:
    """aiosmtpd on 127.0.0.1. With tls_context: STARTTLS offered and required before MAIL, and
    AUTH (LOGIN/PLAIN against `users`) only over TLS."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    peer = SmtpPeer("127.0.0.1", free_port())
    kwargs = {}
    if tls_context is not None:
        kwargs.update(tls_context=tls_context, require_starttls=True)
    if users is not None:
        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and users.get(auth_data.login.decode()) == \
                auth_data.password.decode()
            return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)
        kwargs.update(authenticator=authenticator, auth_require_tls=True)
    controller = Controller(_Collector(peer), hostname=peer.host, port=peer.port, ready_timeout=10, **kwargs)
    controller.start()
    try:
        yield peer
    finally:
        controller.stop()


@dataclass(frozen=True)
class SelfSignedCert:
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def make_self_signed_cert(folder: Path, common_name: str = "rebal-test-smtp") -> SelfSignedCert:
    """An EC P-256 certificate for 127.0.0.1 / localhost, valid for a day (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{common_name}.pem", folder / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return SelfSignedCert(cert_path, key_path)


# ---------------------------------------------------------------------------------------------
# CRM (HTTP)
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass
class Reply:
    status: int
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


class CrmPeer:
    """A CRM on 127.0.0.1 that records every request. Scripted replies per path are served first,
    in order; then, if `bearer` is set, a request without `Authorization: Bearer <bearer>` gets a
    401 saying the token expired (RFC 6750); then 201 with a new id. POST `token_path` is an OAuth
    token endpoint: the right client credentials and refresh token get a new access token (and a
    rotated refresh token)."""

    token_path = "/oauth/token"

    def __init__(self):
        self.requests: list[Request] = []
        self.replies: dict[str, deque[Reply]] = defaultdict(deque)
        self.bearer: str | None = None
        self.client = ("client-id", "client-secret")
        self.refresh_token = "refresh-1"
        self._ids = 0
        self._lock = threading.Lock()
        self.url = ""

    def script(self, path: str, *replies: Reply) -> None:
        self.replies[path].extend(replies)

    def on(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def _answer(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.replies[request.path]:
                return self.replies[request.path].popleft()
            if request.path == self.token_path:
                return self._token(request)
            if self.bearer is not None and request.headers.get("authorization") != f"Bearer {self.bearer}":
                return Reply(401, {"error": "invalid_token", "error_description": "The access token expired"},
                             {"WWW-Authenticate": 'Bearer realm="crm", error="invalid_token", '
                                                  'error_description="The access token expired"'})
            self._ids += 1
            return Reply(201, {"id": self._ids})

    def _token(self, request: Request) -> Reply:
        basic = "Basic " + base64.b64encode(":".join(self.client).encode()).decode()
        form = request.form()
        if request.headers.get("authorization") != basic:
            return Reply(401, {"error": "invalid_client"})
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.refresh_token:
            return Reply(400, {"error": "invalid_grant"})
        self.bearer = f"access-{len(self.requests)}"
        self.refresh_token = f"refresh-{len(self.requests)}"
        return Reply(200, {"access_token": self.bearer, "token_type": "Bearer", "expires_in": 7200,
                           "refresh_token": self.refresh_token})


@contextmanager
def crm_server(peer: CrmPeer | None = None) -> Iterator[CrmPeer]:
    peer = peer or CrmPeer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            reply = peer._answer(request)
            payload = json.dumps(reply.body).encode() if reply.body is not None else b""
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="crm-peer")
    thread.start()
    peer.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
