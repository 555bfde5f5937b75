"""The drill's local peers, on 127.0.0.1 for the length of one drill: an SMTP sink and a CRM stand-in.

Contract:
- `SmtpSink` is a real SMTP server (aiosmtpd) on a free port that accepts every message and
  keeps it; `take_new()` hands back what arrived since the last call, so the drill can say which
  step sent which email. Nothing is relayed anywhere.
- `CrmStandIn` is a tiny HTTP server (stdlib http.server in a thread) that answers the Redtail-style
  API rebal's CRM client speaks (comms/crm.py): POST {base}/contacts/{ref}/notes and POST
  {base}/activities with `Authorization: Userkeyauth <base64(api key:user key)>`; each new call
  is recorded and answered 201 with a new id; a call repeating an Idempotency-Key already
  answered gets the first record's id again and creates nothing (what a CRM honouring the key
  does). A wrong or missing key is 401.
- Both are context managers: entering starts the server, leaving stops it (also on an error).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

REDTAIL_BASE_PATH = "/crm/v1/rest"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- SMTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    recipients: list[str]
    data: bytes  # the message as it went over the wire


class SmtpSink:
    """aiosmtpd on 127.0.0.1 collecting every message (no TLS, no authentication: a local sink)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host, self.port = host, 0
        self._received: list[ReceivedMail] = []
        self._taken = 0
        self._lock = threading.Lock()
        self._controller = None

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler hook
        with self._lock:
            self._received.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos),
                                               envelope.original_content or envelope.content))
        return "250 Message accepted for delivery"

    def take_new(self) -> list[ReceivedMail]:
        """The messages received since the previous call, in order of arrival."""
        with self._lock:
            new = self._received[self._taken:]
            self._taken = len(self._received)
        return new

    def __enter__(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        self.port = free_port(self.host)
        self._controller = Controller(self, hostname=self.host, port=self.port, ready_timeout=10)
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


# --- CRM ------------------------------------------------------------------------------------------


@dataclass
class CrmRecord:
    id: int
    kind: str  # note | task
    contact: str | None
    body: dict
    idempotency_key: str | None


@dataclass
class CrmStandIn:
    """A Redtail-style CRM for the drill (see the module docstring)."""

    api_key: str
    user_key: str
    records: list[CrmRecord] = field(default_factory=list)
    url: str = ""  # the base URL rebal is configured with (REBAL_REDTAIL_BASE_URL), once started

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        expected = "Userkeyauth " + base64.b64encode(f"{self.api_key}:{self.user_key}".encode()).decode()
        if headers.get("authorization") != expected:
            return 401, {"error": "unauthorized"}
        if not path.startswith(REDTAIL_BASE_PATH + "/"):
            return 404, {"error": "not found"}
        route = path[len(REDTAIL_BASE_PATH):]
        try:
            document = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        parts = route.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "contacts" and parts[2] == "notes":
            kind, contact = "note", unquote(parts[1])
        elif parts == ["activities"]:
            kind, contact = "task", document.get("contact_id")
        else:
            return 404, {"error": "not found"}
        key = headers.get("idempotency-key")
        with self._lock:
            for record in self.records:
                if key and record.idempotency_key == key:
                    return 200, {"id": record.id}
            record = CrmRecord(len(self.records) + 1, kind, contact, document, key)
            self.records.append(record)
        return 201, {"id": record.id}

    def __enter__(self) -> CrmStandIn:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                status, reply = stand_in._answer(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                 self.rfile.read(length))
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # the drill prints what matters itself
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="drill-crm")
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{REDTAIL_BASE_PATH}"
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
