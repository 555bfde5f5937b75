"""From a custodian connection to the canonical feed: pull by SFTP, translate the dialect.

    pull_and_convert(connection, feed_root) -> list[Delivery]

New files are fetched into $REBAL_HOME/inbound/<connection>/raw (SFTP: pinned host key, resumable,
idempotent; connections/sftp.py), archived content-addressed like every feed file, and each
as-of date whose custodian file set is complete is translated (connections/dialects.py) with the
firm's reference files into <feed_root>/<as_of>/. The daily scan is then launched by the
feed_arrivals sensor, which watches the canonical folders of every kind of connection.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rebal_pipeline import settings
from rebal_pipeline.connections import dialects
from rebal_pipeline.connections.config import Connection, inbound_dir
from rebal_pipeline.connections.sftp import SftpConfigError, SftpSource, pull_new
from rebal_pipeline.core.landing import archive_raw

_DATE = re.compile(r"(\d{8})")


@dataclass(frozen=True)
class Delivery:
    connection: str
    as_of: dt.date
    feed_dir: Path
    raw_files: dict[str, str]  # name → sha256


def sftp_source(connection: Connection) -> SftpSource:
    """The SftpSource of a connection; the key file's path comes from the env variable it names."""
    sftp = connection.sftp
    key_file = os.environ.get(sftp.private_key_file_env)
    if not key_file:
        raise SftpConfigError(f"connection {connection.name}: {sftp.private_key_file_env} is not set "
                              "(the path of the SFTP private key)")
    return SftpSource(host=sftp.host, port=sftp.port, username=sftp.username, private_key_path=Path(key_file),
                      passphrase_env=sftp.private_key_passphrase_env, known_hosts=Path(sftp.known_hosts_file),
                      remote_dir=sftp.remote_dir, pattern=sftp.pattern)


def expected_files(dialect: str, as_of: dt.date) -> list[str]:
    """The custodian's file names for one as-of date."""
    if dialect == "schwab":
        return [dialects.schwab_filename(kind, as_of) for kind in dialects.CUSTODIAN_FILES]
    if dialect == "fidelity":
        return [dialects.fidelity_filename(kind, as_of) for kind in dialects.CUSTODIAN_FILES]
    if dialect == "pershing":
        return [dialects.pershing_filename(as_of)]
    raise ValueError(f"no file set is defined for dialect {dialect!r}")


def complete_dates(dialect: str, raw_dir: Path) -> list[dt.date]:
    """As-of dates whose whole file set is in raw_dir (partial downloads, *.part, do not count)."""
    names = {p.name for p in raw_dir.iterdir() if p.is_file()} if raw_dir.exists() else set()
    dates = set()
    for name in names:
        for digits in _DATE.findall(name):
            try:
                dates.add(dt.datetime.strptime(digits, "%Y%m%d").date())
            except ValueError:
                continue
    return sorted(d for d in dates if all(n in names for n in expected_files(dialect, d)))


def reference_dir(connection: Connection) -> Path:
    """The firm-maintained files (users, households, accounts, models, IPS, restrictions,
    securities) that a custodian does not send: $REBAL_HOME/reference/<firm>/."""
    return settings.rebal_home() / "reference" / connection.firm


def pull_and_convert(connection: Connection, feed_root: Path) -> list[Delivery]:
    """Fetch what is new and translate every complete date not yet translated from these bytes."""
    raw = inbound_dir(connection) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if connection.kind == "sftp":
        for fetched in pull_new(sftp_source(connection), raw):
            # The raw file, byte for byte, in the write-once content-addressed archive.
            archive_raw(fetched.path, settings.archive_root())
    deliveries = []
    for as_of in complete_dates(connection.dialect, raw):
        out = feed_root / as_of.isoformat()
        marker = inbound_dir(connection) / "converted" / f"{as_of.isoformat()}.json"
        # A file the custodian re-sent (a correction) was kept under a versioned name beside the
        # first one: the newest version of each file is the delivery.
        newest = {n: _newest_version(raw, n) for n in expected_files(connection.dialect, as_of)}
        digests = {n: _sha256(p) for n, p in newest.items()}
        if marker.exists() and marker.read_text() == _marker_text(digests):
            continue  # these exact bytes were translated already
        delivery_dir = inbound_dir(connection) / "deliveries" / as_of.isoformat() / _digest_of(digests)
        delivery_dir.mkdir(parents=True, exist_ok=True)
        for name, path in newest.items():
            if not (delivery_dir / name).exists():
                os.link(path, delivery_dir / name)  # the same bytes under the name the dialect expects
        report = dialects.to_canonical(connection.dialect, delivery_dir, as_of, reference_dir(connection), out)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(_marker_text(digests))
        os.replace(tmp, marker)
        deliveries.append(Delivery(connection.name, as_of, report.out_dir, digests))
    return deliveries


def _newest_version(raw: Path, name: str) -> Path:
    """`name`, or its newest re-delivery `<stem>.<UTC time>-<size><suffix>` (sftp.pull_new)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    versions = sorted(p for p in raw.glob(f"{stem}.*-*{suffix}")
                      if re.fullmatch(rf"{re.escape(stem)}\.\d{{8}}T\d{{6}}Z-\d+{re.escape(suffix)}", p.name))
    return versions[-1] if versions else raw / name


def _digest_of(digests: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(_marker_text(digests).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker_text(digests: dict[str, str]) -> str:
    return "\n".join(f"{name} {sha}" for name, sha in sorted(digests.items())) + "\n"
