"""SFTP pulls against a real in-process paramiko SFTP server (see sftp_server.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from rebal_pipeline.connections.sftp import (
    LEDGER_NAME,
    SftpAuthError,
    SftpConfigError,
    SftpConnectionError,
    SftpHostKeyError,
    SftpSource,
    SftpTransferError,
    fetch,
    list_remote,
    load_ledger,
    pull_new,
)
from rebal_pipeline.sandbox.sftp_server import SftpTestServer, make_ed25519, make_rsa

POSITIONS = b"account_id,symbol,quantity\n" + b"".join(
    f"A{i:06d},SYM{i % 97},{i * 3}\n".encode() for i in range(9000)
)  # ~190 kB: several SFTP reads
PRICES = b"symbol,close\nVTI,250.10\nBND,72.05\n"


@pytest.fixture(scope="module")
def keys():
    return {"host": make_ed25519(), "client": make_ed25519(), "other": make_ed25519()}


@pytest.fixture
def remote(tmp_path) -> Path:
    root = tmp_path / "remote"
    (root / "outgoing").mkdir(parents=True)
    (root / "outgoing" / "positions.csv").write_bytes(POSITIONS)
    (root / "outgoing" / "prices.csv").write_bytes(PRICES)
    (root / "outgoing" / "readme.txt").write_bytes(b"not a feed file")
    return root


@pytest.fixture
def server(remote, keys):
    with SftpTestServer(remote, host_key=keys["host"].pkey, client_key=keys["client"].pkey) as s:
        yield s


def make_source(tmp_path: Path, server: SftpTestServer, client_key, *, pinned=None, **kw) -> SftpSource:
    kh = tmp_path / "known_hosts"
    kh.write_text("" if pinned is False else server.known_hosts_line(pinned))
    key_path = client_key.write(tmp_path / "id_ed25519") if "private_key_env" not in kw else None
    return SftpSource(
        host="127.0.0.1", port=server.port, username="custodian", private_key_path=key_path,
        known_hosts=kh, remote_dir="/outgoing", pattern="*.csv",
        connect_timeout=5, auth_timeout=5, banner_timeout=5, channel_timeout=5, **kw,
    )


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_happy_path_fetches_both_files_with_digests_and_ledger(tmp_path, server, keys, caplog):
    src = make_source(tmp_path, server, keys["client"])
    listed = list_remote(src)
    assert [(f.name, f.size) for f in listed] == [("positions.csv", len(POSITIONS)), ("prices.csv", len(PRICES))]

    dest = tmp_path / "inbox"
    with caplog.at_level(logging.DEBUG):
        got = pull_new(src, dest)
    assert [(f.path.name, f.size, f.sha256) for f in got] == [
        ("positions.csv", len(POSITIONS), sha(POSITIONS)),
        ("prices.csv", len(PRICES), sha(PRICES)),
    ]
    assert (dest / "positions.csv").read_bytes() == POSITIONS
    assert (dest / "prices.csv").read_bytes() == PRICES
    assert not list(dest.glob("*.part")) and not list(dest.glob(".*.part.json"))
    ledger = json.loads((dest / LEDGER_NAME).read_text())
    assert ledger["version"] == 1
    assert [(e["name"], e["size"], e["sha256"], e["local_name"]) for e in ledger["files"]] == [
        ("positions.csv", len(POSITIONS), sha(POSITIONS), "positions.csv"),
        ("prices.csv", len(PRICES), sha(PRICES), "prices.csv"),
    ]
    mt = int(os.stat(server.root / "outgoing" / "prices.csv").st_mtime)
    assert ledger["files"][1]["mtime"] == mt
    # no file contents and no key material in the logs
    text = caplog.text
    assert "VTI" not in text and "A000001" not in text and "PRIVATE KEY" not in text


def test_unknown_host_key_is_refused(tmp_path, server, keys):
    src = make_source(tmp_path, server, keys["client"], pinned=False)  # empty known_hosts
    with pytest.raises(SftpHostKeyError) as e:
        list_remote(src)
    assert e.value.host == f"[127.0.0.1]:{server.port}" and e.value.expected is None
    assert keys["host"].pkey.fingerprint in str(e.value) and "not in known_hosts" in str(e.value)
    assert server.bytes_served == 0


def test_changed_host_key_is_refused(tmp_path, server, keys):
    stale = make_ed25519().pkey  # what we pinned; the server now presents keys["host"]
    src = make_source(tmp_path, server, keys["client"], pinned=stale)
    with pytest.raises(SftpHostKeyError) as e:
        pull_new(src, tmp_path / "inbox")
    msg = str(e.value)
    assert "CHANGED" in msg and keys["host"].pkey.fingerprint in msg and stale.fingerprint in msg
    assert e.value.expected == stale.fingerprint
    assert not (tmp_path / "inbox" / LEDGER_NAME).exists()


def test_rsa_host_key_pinned_works(tmp_path, remote, keys):
    host = make_rsa()
    with SftpTestServer(remote, host_key=host.pkey, client_key=keys["client"].pkey) as s:
        assert len(list_remote(make_source(tmp_path, s, keys["client"]))) == 2


def test_wrong_client_key_is_refused(tmp_path, server, keys):
    src = make_source(tmp_path, server, keys["other"])
    with pytest.raises(SftpAuthError, match="refused key authentication"):
        list_remote(src)


def test_dropped_connection_then_resume(tmp_path, server, keys):
    src = make_source(tmp_path, server, keys["client"])
    dest = tmp_path / "inbox"
    server.arm_drop(70_000)
    with pytest.raises(SftpConnectionError, match="resume"):
        fetch(src, "positions.csv", dest)
    part = dest / "positions.csv.part"
    assert server.drops == 1
    assert part.exists() and 0 < part.stat().st_size <= 70_000
    assert part.read_bytes() == POSITIONS[: part.stat().st_size]
    assert not (dest / "positions.csv").exists()

    reads_before, kept = len(server.reads), part.stat().st_size
    got = pull_new(src, dest)  # resumes the .part, then fetches prices.csv
    assert [f.path.name for f in got] == ["positions.csv", "prices.csv"]
    assert (dest / "positions.csv").read_bytes() == POSITIONS
    assert got[0].sha256 == sha(POSITIONS) and got[0].size == len(POSITIONS)
    assert not part.exists() and not list(dest.glob(".*.part.json"))
    # Only the missing tail of positions.csv was asked for again: no read below the kept bytes.
    # (Counted by offsets, not bytes: paramiko's pipelined reads may ask for a window twice
    # under load, which is its business, not a restart.)
    resumed = [(offset, n) for name, offset, n in server.reads[reads_before:] if name.endswith("positions.csv")]
    assert resumed and min(offset for offset, _ in resumed) == kept
    assert max(offset + n for offset, n in resumed) == len(POSITIONS)


def test_part_longer_than_remote_starts_over(tmp_path, server, keys):
    src = make_source(tmp_path, server, keys["client"])
    dest = tmp_path / "inbox"
    dest.mkdir()
    (dest / "prices.csv.part").write_bytes(b"x" * (len(PRICES) + 10))
    got = fetch(src, "prices.csv", dest)
    assert got.sha256 == sha(PRICES) and (dest / "prices.csv").read_bytes() == PRICES


def test_second_pull_fetches_nothing(tmp_path, server, keys, monkeypatch):
    # this one authenticates with a passphrase-protected key held in an env variable (the source
    # names its variables: the environment is the interface)
    client = make_ed25519(passphrase="s3cret")
    server.client_key = client.pkey
    monkeypatch.setenv("CUST_SFTP_KEY", client.private_openssh)
    monkeypatch.setenv("CUST_SFTP_PASSPHRASE", "s3cret")
    src = make_source(
        tmp_path, server, client, private_key_env="CUST_SFTP_KEY", passphrase_env="CUST_SFTP_PASSPHRASE"
    )
    dest = tmp_path / "inbox"
    assert len(pull_new(src, dest)) == 2
    ledger_before = (dest / LEDGER_NAME).read_bytes()
    served = server.bytes_served
    assert pull_new(src, dest) == []
    assert server.bytes_served == served and (dest / LEDGER_NAME).read_bytes() == ledger_before


def test_file_changed_on_server_is_fetched_again_under_a_new_name(tmp_path, server, keys):
    src = make_source(tmp_path, server, keys["client"])
    dest = tmp_path / "inbox"
    pull_new(src, dest)
    corrected = PRICES + b"AGG,98.40\n"
    path = server.root / "outgoing" / "prices.csv"
    path.write_bytes(corrected)
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 60))

    got = pull_new(src, dest)
    assert len(got) == 1
    new = got[0]
    assert new.remote_name == "prices.csv" and new.path.name != "prices.csv"
    assert new.path.name.startswith("prices.") and new.path.suffix == ".csv"
    assert new.path.read_bytes() == corrected and new.sha256 == sha(corrected)
    assert new.replaces == dest / "prices.csv"
    assert (dest / "prices.csv").read_bytes() == PRICES  # the earlier copy is untouched
    entries = load_ledger(dest)
    assert [e["local_name"] for e in entries if e["name"] == "prices.csv"] == ["prices.csv", new.path.name]
    assert pull_new(src, dest) == []


def test_config_rules(tmp_path, server, keys, monkeypatch):
    base = dict(host="h", username="u", known_hosts=tmp_path / "kh")
    with pytest.raises(ValidationError):  # no key at all
        SftpSource(**base)
    with pytest.raises(ValidationError):  # an inline key is not an env variable name
        SftpSource(**base, private_key_env=keys["client"].private_openssh)
    with pytest.raises(ValidationError):  # no inline password field
        SftpSource(**base, private_key_env="K", password="hunter2")
    monkeypatch.delenv("NOT_SET_SFTP_KEY", raising=False)
    src = make_source(tmp_path, server, keys["client"], private_key_env="NOT_SET_SFTP_KEY")
    with pytest.raises(SftpConfigError, match="NOT_SET_SFTP_KEY is not set"):
        list_remote(src)
    good = make_source(tmp_path, server, keys["client"])
    with pytest.raises(SftpTransferError, match="unsafe"):
        fetch(good, "../etc/passwd", tmp_path / "inbox")
    (tmp_path / "inbox").mkdir(exist_ok=True)
    (tmp_path / "inbox" / "prices.csv").write_bytes(b"mine")
    with pytest.raises(SftpTransferError, match="refusing to overwrite"):
        fetch(good, "prices.csv", tmp_path / "inbox")
