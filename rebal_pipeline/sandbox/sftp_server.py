"""A real, in-process SFTP server (paramiko server side) playing the custodian, serving a folder:
used by the tests and by `rebal drill --via-sftp`.

    with SftpTestServer(root, host_key=make_ed25519().pkey, client_key=client.pkey) as server:
        server.port, server.known_hosts_line(), server.arm_drop(100_000)

- listens on 127.0.0.1 on an ephemeral port, one thread per connection;
- its own host key (Ed25519 or RSA, see `make_ed25519` / `make_rsa`);
- public-key authentication only, accepting exactly one client public key for one user name;
- read-only SFTP over `root` (no path escapes);
- `arm_drop(N)` cuts the connection (socket shutdown) once N more bytes of file reads have been
  served - one shot, then disarmed; `bytes_served` counts all file bytes served, `drops` the cuts.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import threading
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paramiko import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_PERMISSION_DENIED,
    SFTPAttributes,
    SFTPHandle,
    SFTPServer,
    SFTPServerInterface,
)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    pkey: paramiko.PKey
    private_openssh: str  # OpenSSH private key text (encrypted if made with a passphrase)

    def write(self, path: Path) -> Path:
        path.write_text(self.private_openssh)
        path.chmod(0o600)
        return path


def make_ed25519(passphrase: str | None = None) -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    enc = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    text = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, enc
    ).decode()
    return KeyPair(paramiko.Ed25519Key.from_private_key(io.StringIO(text), password=passphrase), text)


def make_rsa(bits: int = 2048) -> KeyPair:
    pkey = paramiko.RSAKey.generate(bits)
    buf = io.StringIO()
    pkey.write_private_key(buf)
    return KeyPair(pkey, buf.getvalue())


def known_hosts_line(host: str, port: int, key: paramiko.PKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.get_name()} {key.get_base64()}\n"


class _Auth(paramiko.ServerInterface):
    def __init__(self, server: SftpTestServer, transport: paramiko.Transport):
        self.fixture = server
        self.transport = transport
        self.cut = False

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        ok = username == self.fixture.username and key.asbytes() == self.fixture.client_key.asbytes()
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED

    def check_auth_password(self, username, password):
        return AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        return OPEN_SUCCEEDED if kind == "session" else OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class _Handle(SFTPHandle):
    def __init__(self, fixture: SftpTestServer, auth: _Auth, flags=0):
        super().__init__(flags)
        self.fixture = fixture
        self.auth = auth

    def read(self, offset, length):
        fx = self.fixture
        with fx._lock:
            if self.auth.cut:
                return SFTP_FAILURE  # requests already queued on a cut connection serve nothing
            limit = fx.drop_after_bytes
            if limit is not None:
                remaining = limit - fx._since_armed
                if remaining <= 0:
                    fx.drop_after_bytes = None
                    fx.drops += 1
                    self.auth.cut = True
                    fx._cut(self.auth.transport)
                    return SFTP_FAILURE
                length = min(length, remaining)
        data = super().read(offset, length)
        if isinstance(data, bytes):
            with fx._lock:
                fx.bytes_served += len(data)
                fx._since_armed += len(data)
                fx.reads.append((self.filename, offset, len(data)))
        return data

    def stat(self):
        return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))


class _RootedSftp(SFTPServerInterface):
    def __init__(self, auth: _Auth, fixture: SftpTestServer, *args, **kwargs):
        super().__init__(auth, *args, **kwargs)
        self.auth = auth
        self.fixture = fixture

    def _local(self, path: str) -> Path:
        root = self.fixture.root.resolve()
        rel = os.path.normpath("/" + path).lstrip("/")
        p = (root / rel).resolve()
        if p != root and root not in p.parents:
            raise PermissionError(path)
        return p

    def canonicalize(self, path):
        return os.path.normpath("/" + path)

    def list_folder(self, path):
        try:
            d = self._local(path)
            out = []
            for name in sorted(os.listdir(d)):
                attr = SFTPAttributes.from_stat(os.stat(d / name))
                attr.filename = name
                out.append(attr)
            return out
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except OSError:
            return SFTP_PERMISSION_DENIED

    def stat(self, path):
        try:
            return SFTPAttributes.from_stat(os.stat(self._local(path)))
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except OSError:
            return SFTP_PERMISSION_DENIED

    lstat = stat

    def open(self, path, flags, attr):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            return SFTP_PERMISSION_DENIED  # a custodian's outgoing drop is read-only to us
        try:
            f = open(self._local(path), "rb")  # noqa: SIM115 - owned by the handle
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except OSError:
            return SFTP_PERMISSION_DENIED
        h = _Handle(self.fixture, self.auth, flags)
        h.readfile = f
        h.filename = path
        return h

    def remove(self, path):
        return SFTP_PERMISSION_DENIED

    def rename(self, oldpath, newpath):
        return SFTP_PERMISSION_DENIED


SERVER_LOG = "rebal.sandbox.sftp_server"
logging.getLogger(SERVER_LOG).setLevel(logging.CRITICAL)


class SftpTestServer:
    def __init__(
        self,
        root: Path,
        *,
        host_key: paramiko.PKey,
        client_key: paramiko.PKey,
        username: str = "custodian",
    ):
        self.root = Path(root)
        self.host_key = host_key
        self.client_key = client_key
        self.username = username
        self.drop_after_bytes: int | None = None
        self.bytes_served = 0
        self.reads: list[tuple[str, int, int]] = []  # (remote path, offset, bytes) of every read served
        self.drops = 0
        self.connections = 0
        self._since_armed = 0
        self._lock = threading.Lock()
        self._transports: list[paramiko.Transport] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle
    def start(self) -> SftpTestServer:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, name="sftp-test-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        for t in list(self._transports):
            t.close()

    def __enter__(self) -> SftpTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._sock is not None, "server not started"
        return self._sock.getsockname()[1]

    def known_hosts_line(self, key: paramiko.PKey | None = None) -> str:
        """The known_hosts entry pinning this server (or `key`, to simulate a stale pin)."""
        return known_hosts_line("127.0.0.1", self.port, key or self.host_key)

    def arm_drop(self, after_bytes: int) -> None:
        with self._lock:
            self.drop_after_bytes = after_bytes
            self._since_armed = 0

    # -- internals
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        t = paramiko.Transport(conn)
        # The server side's own log: a client hanging up (what every pull does when it is done, and
        # what the drop tests do on purpose) is logged by paramiko as a "Socket exception" error,
        # which is not news for a sandbox server. The client side keeps paramiko's normal logging.
        t.set_log_channel(SERVER_LOG)
        self._transports.append(t)
        t.add_server_key(self.host_key)
        auth = _Auth(self, t)
        t.set_subsystem_handler("sftp", SFTPServer, _RootedSftp, self)
        try:
            t.start_server(server=auth)
        except (paramiko.SSHException, EOFError, OSError):
            t.close()  # the client refused us (host key) or went away

    @staticmethod
    def _cut(transport: paramiko.Transport) -> None:
        sock = transport.sock
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        threading.Thread(target=transport.close, daemon=True).start()


__all__ = ["KeyPair", "SftpTestServer", "known_hosts_line", "make_ed25519", "make_rsa"]
