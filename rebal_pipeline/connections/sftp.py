"""Pull a custodian's daily files by SFTP (paramiko). No Dagster here: assets call these functions.

Security
- The custodian's host key is pinned in a known_hosts file (`SftpSource.known_hosts`, OpenSSH
  format; for a port other than 22 the entry is `[host]:port`). paramiko's `RejectPolicy` is
  always used, never `AutoAddPolicy`: an unknown host key or a changed one raises
  `SftpHostKeyError` naming the host and the SHA256 fingerprint seen (and the expected one).
- Key authentication only: no passwords, no SSH agent, no keys looked up in ~/.ssh. The private key
  is read from a file (`private_key_path`) or from an environment variable whose *name* is in the
  config (`private_key_env`); its passphrase likewise comes from an environment variable named by
  `passphrase_env`. Keys and passphrases are never part of the config, a repr, a log or an error.
- Logs carry host, remote file names, sizes and digests - never file contents or secrets.
- Remote names are checked (no `/`, no `..`, no NUL) before they become local paths.

Transfer
- A file is downloaded to `<local_name>.part`, SHA-256 computed while streaming, fsynced, its size
  checked against the remote stat, then atomically renamed into place (and the directory fsynced).
- Resumable: the `.part` is stamped with the remote identity (name, size, mtime) in a hidden
  `.<local_name>.part.json`. If the stamp matches and the `.part` is not longer than the remote
  file, the next call continues from its length (remote seek + append); otherwise it starts over.
- Idempotent: `pull_new` keeps a ledger `<dest_dir>/.fetched.json` (written atomically, under an
  exclusive lock) of every file fetched, and fetches only files whose (name, size, mtime) is not
  there yet. A file that changed on the server (same name, another size or mtime) is fetched again
  under a distinct local name `<stem>.<mtime UTC>-<size><suffix>` and reported with `replaces` set;
  the earlier local copy is never overwritten.

Ledger format (`.fetched.json`)::

    {"version": 1,
     "files": [{"name": "positions.csv",          # remote name
                "size": 1234, "mtime": 1767312000, # remote stat (size in bytes, mtime epoch s)
                "sha256": "<hex>",
                "local_name": "positions.csv",     # file name inside dest_dir
                "fetched_at": "2026-01-02T03:04:05+00:00"}]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import stat as stat_mod
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paramiko
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rebal_pipeline.connections.credentials import custodian_secret
from rebal_pipeline.core.write_once import fsync_dir

log = logging.getLogger(__name__)

LEDGER_NAME = ".fetched.json"
LOCK_NAME = ".fetched.lock"
PART_SUFFIX = ".part"
CHUNK = 32768
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


# --------------------------------------------------------------------------------------- errors
class SftpError(Exception):
    """Base class of every error raised by this module."""


class SftpConfigError(SftpError):
    """The source is unusable as configured (missing env variable, unreadable key, bad name)."""


class SftpHostKeyError(SftpError):
    """The server's host key is not pinned in known_hosts, or differs from the pinned one."""

    def __init__(self, host: str, seen: str, expected: str | None = None):
        self.host, self.seen, self.expected = host, seen, expected
        if expected is None:
            msg = (
                f"host key of {host} is not in known_hosts (server presented {seen}); refusing to "
                f"connect - pin the custodian's host key in the known_hosts file after verifying it"
            )
        else:
            msg = (
                f"host key of {host} CHANGED: server presented {seen}, known_hosts expects "
                f"{expected}; refusing to connect (possible man-in-the-middle, or a rotated key to "
                f"confirm with the custodian)"
            )
        super().__init__(msg)


class SftpAuthError(SftpError):
    """The server refused our key."""


class SftpConnectionError(SftpError):
    """Network failure: unreachable, timed out, or the connection dropped (a retry resumes)."""


class SftpTransferError(SftpError):
    """A transfer is inconsistent: size mismatch, missing remote file, or a local name in use."""


# --------------------------------------------------------------------------------------- config
class SftpSource(BaseModel):
    """One custodian's SFTP drop. Secrets are referenced by environment variable *name* only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    username: str = Field(min_length=1)
    private_key_path: Path | None = None
    private_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
    passphrase_env: str | None = Field(default=None, pattern=_ENV_NAME)
    known_hosts: Path
    remote_dir: str = "."
    pattern: str = "*"
    connect_timeout: float = Field(default=15.0, gt=0)
    auth_timeout: float = Field(default=15.0, gt=0)
    banner_timeout: float = Field(default=15.0, gt=0)
    channel_timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _one_key_source(self) -> SftpSource:
        if (self.private_key_path is None) == (self.private_key_env is None):
            raise ValueError("set exactly one of private_key_path and private_key_env")
        return self

    @property
    def label(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: int


@dataclasses.dataclass(frozen=True)
class FetchedFile:
    path: Path
    sha256: str
    size: int
    remote_name: str = ""
    mtime: int = 0
    replaces: Path | None = None  # the earlier local copy when the file changed on the server


# ------------------------------------------------------------------------------------ connecting
class _PinnedHostKeyPolicy(paramiko.RejectPolicy):
    def missing_host_key(self, client, hostname, key):  # noqa: ARG002 - paramiko's signature
        raise SftpHostKeyError(hostname, key.fingerprint)


def _load_private_key(source: SftpSource) -> paramiko.PKey:
    password = None
    if source.passphrase_env is not None:
        password = custodian_secret(source.passphrase_env)
        if password is None:
            raise SftpConfigError(f"environment variable {source.passphrase_env} is not set")
    try:
        if source.private_key_path is not None:
            return paramiko.PKey.from_path(source.private_key_path, password)
        text = custodian_secret(source.private_key_env or "")
        if not text:
            raise SftpConfigError(f"environment variable {source.private_key_env} is not set")
        last: Exception | None = None
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key(io.StringIO(text), password=password)
            except (paramiko.SSHException, ValueError) as exc:
                last = exc
        raise SftpConfigError(
            f"private key in {source.private_key_env} could not be loaded ({type(last).__name__})"
        )
    except SftpConfigError:
        raise
    except (OSError, ValueError, TypeError, paramiko.SSHException) as exc:
        # The exception type only: a message could quote key material.
        where = source.private_key_path or source.private_key_env
        raise SftpConfigError(
            f"private key {where} could not be loaded ({type(exc).__name__}; wrong passphrase or "
            f"unsupported key type?)"
        ) from None


@contextlib.contextmanager
def _session(source: SftpSource) -> Iterator[paramiko.SFTPClient]:
    pkey = _load_private_key(source)
    if not Path(source.known_hosts).is_file():
        raise SftpConfigError(f"known_hosts file {source.known_hosts} does not exist")
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(source.known_hosts))
        client.set_missing_host_key_policy(_PinnedHostKeyPolicy())
        try:
            client.connect(
                source.host,
                port=source.port,
                username=source.username,
                pkey=pkey,
                timeout=source.connect_timeout,
                auth_timeout=source.auth_timeout,
                banner_timeout=source.banner_timeout,
                channel_timeout=source.channel_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            raise SftpHostKeyError(
                exc.hostname, exc.key.fingerprint, exc.expected_key.fingerprint
            ) from None
        except paramiko.AuthenticationException:
            raise SftpAuthError(
                f"{source.label} refused key authentication (key {pkey.fingerprint})"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpConnectionError(
                f"cannot connect to {source.label}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(source.channel_timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpConnectionError(
                f"cannot open SFTP on {source.label}: {type(exc).__name__}: {exc}"
            ) from None
        log.info("sftp connected to %s (host key %s)", source.label,
                 client.get_transport().get_remote_server_key().fingerprint)
        try:
            yield sftp
        finally:
            with contextlib.suppress(Exception):
                sftp.close()
    finally:
        client.close()


def _remote_path(source: SftpSource, name: str) -> str:
    return posixpath.join(source.remote_dir, name)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise SftpTransferError(f"unsafe remote file name {name!r}")


def _list(sftp: paramiko.SFTPClient, source: SftpSource) -> list[RemoteFile]:
    try:
        entries = sftp.listdir_attr(source.remote_dir)
    except FileNotFoundError:
        raise SftpTransferError(f"remote directory {source.remote_dir!r} not found") from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise SftpConnectionError(f"listing {source.label}:{source.remote_dir} failed: {exc}") from None
    files = [
        RemoteFile(e.filename, int(e.st_size or 0), int(e.st_mtime or 0))
        for e in entries
        if e.st_mode is not None and stat_mod.S_ISREG(e.st_mode)
        and fnmatch.fnmatchcase(e.filename, source.pattern)
        and not e.filename.startswith(".")
    ]
    return sorted(files, key=lambda f: f.name)


# ------------------------------------------------------------------------------ local file utils
def _atomic_write_json(path: Path, data: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _stamp_path(dest_dir: Path, local_name: str) -> Path:
    return dest_dir / f".{local_name}{PART_SUFFIX}.json"


def _hash_file(path: Path, limit: int) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining > 0:
            chunk = f.read(min(CHUNK * 32, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h


def _fetch(
    sftp: paramiko.SFTPClient, source: SftpSource, name: str, dest_dir: Path, local_name: str
) -> FetchedFile:
    _check_name(name)
    _check_name(local_name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / local_name
    if final.exists():
        raise SftpTransferError(f"{final} already exists; refusing to overwrite it")
    part = dest_dir / f"{local_name}{PART_SUFFIX}"
    stamp_path = _stamp_path(dest_dir, local_name)
    rpath = _remote_path(source, name)
    try:
        rf = sftp.open(rpath, "rb")
    except FileNotFoundError:
        raise SftpTransferError(f"remote file {rpath!r} not found on {source.label}") from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise SftpConnectionError(f"opening {rpath!r} on {source.label} failed: {exc}") from None

    done = 0
    size = -1
    try:
        try:
            st = rf.stat()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpConnectionError(f"stat of {rpath!r} on {source.label} failed: {exc}") from None
        size, mtime = int(st.st_size or 0), int(st.st_mtime or 0)
        identity = {"name": name, "size": size, "mtime": mtime}

        offset = 0
        if part.exists():
            try:
                stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                stamp = None
            plen = part.stat().st_size
            if stamp == identity and plen <= size:
                offset = plen
                log.info("sftp resuming %s from byte %d of %d", name, offset, size)
            else:
                log.info("sftp discarding stale partial download of %s (%d bytes)", name, plen)
        if offset == 0:
            _atomic_write_json(stamp_path, identity)
            part.write_bytes(b"")
            h = hashlib.sha256()
        else:
            h = _hash_file(part, offset)

        done = offset
        with open(part, "r+b") as lf:
            lf.truncate(offset)
            lf.seek(offset)
            try:
                if offset:
                    rf.seek(offset)
                if size > offset:
                    # pipelined reads from `offset` (what paramiko's own get() does): one round
                    # trip per window instead of per 32 kB chunk
                    rf.prefetch(size, max_concurrent_requests=64)
                while True:
                    try:
                        chunk = rf.read(CHUNK)
                    except (OSError, EOFError, paramiko.SSHException) as exc:
                        raise SftpConnectionError(
                            f"connection to {source.label} dropped while fetching {name} after "
                            f"{done} of {size} bytes ({type(exc).__name__}); call again to resume"
                        ) from None
                    if not chunk:
                        break
                    lf.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if done > size:
                        break
            finally:
                lf.flush()
                os.fsync(lf.fileno())
    finally:
        with contextlib.suppress(Exception):
            rf.close()

    if done < size:
        # keep the .part: its stamp makes the next call resume it, or start over if the file changed
        raise SftpConnectionError(
            f"{name} on {source.label}: transfer ended after {done} of {size} bytes; call again "
            f"to resume"
        )
    if done != size:
        part.unlink(missing_ok=True)
        stamp_path.unlink(missing_ok=True)
        raise SftpTransferError(
            f"{name} on {source.label}: got more than the {size} bytes the server reported "
            f"(file growing on the server?); partial download discarded"
        )
    os.replace(part, final)
    fsync_dir(dest_dir)
    stamp_path.unlink(missing_ok=True)
    digest = h.hexdigest()
    log.info("sftp fetched %s from %s: %d bytes sha256=%s", name, source.label, size, digest)
    return FetchedFile(path=final, sha256=digest, size=size, remote_name=name, mtime=mtime)


# ------------------------------------------------------------------------------------ public API
def list_remote(source: SftpSource) -> list[RemoteFile]:
    """The regular files of `source.remote_dir` matching `source.pattern`, sorted by name."""
    with _session(source) as sftp:
        return _list(sftp, source)


def fetch(
    source: SftpSource, name: str, dest_dir: Path | str, *, local_name: str | None = None
) -> FetchedFile:
    """Download one remote file into `dest_dir` (as `local_name`, default `name`).

    Resumes a matching `.part` left by a dropped connection. Refuses to overwrite an existing
    local file (`SftpTransferError`). Does not touch the ledger - `pull_new` does.
    """
    with _session(source) as sftp:
        return _fetch(sftp, source, name, Path(dest_dir), local_name or name)


def load_ledger(dest_dir: Path | str) -> list[dict]:
    """The ledger entries of `dest_dir` (empty if nothing was fetched yet)."""
    path = Path(dest_dir) / LEDGER_NAME
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != 1:
        raise SftpConfigError(f"{path}: unsupported ledger version {data.get('version')!r}")
    return list(data["files"])


def _versioned_name(f: RemoteFile, taken: set[str], dest_dir: Path) -> str:
    stem, dot, suffix = f.name.rpartition(".")
    if not dot or not stem:
        stem, dot, suffix = f.name, "", ""
    when = dt.datetime.fromtimestamp(f.mtime, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stem}.{when}-{f.size}"
    tail = f"{dot}{suffix}"
    candidate, n = f"{base}{tail}", 1
    while candidate in taken or (dest_dir / candidate).exists():
        n += 1
        candidate = f"{base}-{n}{tail}"
    return candidate


@contextlib.contextmanager
def _locked(dest_dir: Path) -> Iterator[None]:
    with open(dest_dir / LOCK_NAME, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def pull_new(source: SftpSource, dest_dir: Path | str) -> list[FetchedFile]:
    """Fetch every matching remote file not yet in the ledger of `dest_dir`; return what was fetched.

    Same (name, size, mtime) as a ledger entry → skipped. Same name, other size/mtime → fetched
    again under a distinct local name, `replaces` pointing at the latest earlier copy. The ledger is
    saved after each file, so a failure part-way keeps what was completed; calling again resumes.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    fetched: list[FetchedFile] = []
    with _locked(dest):
        entries = load_ledger(dest)
        seen = {(e["name"], e["size"], e["mtime"]) for e in entries}
        with _session(source) as sftp:
            remote = _list(sftp, source)
            for f in remote:
                if (f.name, f.size, f.mtime) in seen:
                    continue
                _check_name(f.name)
                earlier = [e for e in entries if e["name"] == f.name]
                taken = {e["local_name"] for e in entries}
                if f.name in taken or (dest / f.name).exists():
                    local_name = _versioned_name(f, taken, dest)
                else:
                    local_name = f.name
                got = _fetch(sftp, source, f.name, dest, local_name)
                if earlier:
                    got = dataclasses.replace(got, replaces=dest / earlier[-1]["local_name"])
                    log.warning(
                        "sftp %s changed on %s since it was last fetched (was %d bytes, now %d); "
                        "new version kept as %s, earlier copy %s untouched",
                        f.name, source.label, earlier[-1]["size"], got.size, local_name,
                        earlier[-1]["local_name"],
                    )
                entries.append({
                    "name": f.name,
                    # the size/mtime of the bytes actually fetched (stat at open time)
                    "size": got.size,
                    "mtime": got.mtime,
                    "sha256": got.sha256,
                    "local_name": local_name,
                    "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                })
                seen.add((f.name, got.size, got.mtime))
                _atomic_write_json(dest / LEDGER_NAME, {"version": 1, "files": entries})
                fetched.append(got)
    log.info("sftp pull from %s: %d new of %d listed", source.label, len(fetched), len(remote))
    return fetched
