"""From custodian connections to the canonical feed: pull, translate, assemble.

    pull_and_convert(connection, feed_root, siblings) -> list[Delivery]     (SFTP connections)
    pull_from_api(connection, as_of, feed_root, siblings) -> Delivery       (OAuth API connections)
    assemble_feed(siblings, as_of, feed_root) -> Assembly

Each connection delivers its *part* of a day: the positions, lots, transactions and prices of the
accounts held at that custodian, in canonical columns, under $REBAL_HOME/inbound/<connection>/
canonical/<as_of>/ (complete or absent: it appears by an atomic rename).

- SFTP: new files are fetched into inbound/<connection>/raw (pinned host key, resumable,
  idempotent; connections/sftp.py), archived content-addressed, and each as-of date whose
  custodian file set is complete is translated (connections/dialects.py).
- OAuth API: the day's pages are pulled all-or-nothing (connections/oauth_api.py) and every
  page's body is archived content-addressed.

The day's canonical feed <feed_root>/<as_of>/ is then assembled once every custodian connection
of the firm has delivered its part: the firm's own files from $REBAL_HOME/reference/<firm>/ plus
the parts' rows, concatenated. Prices are the one file custodians overlap on: a symbol priced
identically by two custodians is one row; priced differently, both rows are kept, and the feed's
duplicate-key rule rejects them visibly (nothing is picked silently). A folder appears or changes
only by an atomic rename, so the feed_arrivals sensor never sees half a feed; re-assembly happens
only when a part or a reference file changed. The daily scan is launched by feed_arrivals.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rebal_pipeline import settings
from rebal_pipeline.connections import dialects
from rebal_pipeline.connections.config import Connection, inbound_dir, part_dir
from rebal_pipeline.connections.credentials import custodian_secret
from rebal_pipeline.connections.sftp import SftpConfigError, SftpSource, pull_new
from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.folders import swap_in
from rebal_pipeline.core.landing import archive_raw

_DATE = re.compile(r"(\d{8})")


@dataclass(frozen=True)
class Assembly:
    as_of: dt.date
    feed_dir: Path | None            # None while waiting for a connection's part
    waiting_for: tuple[str, ...] = ()
    changed: bool = False            # the canonical folder was (re)written now

    def describe(self) -> str:
        if self.feed_dir is None:
            return f"feed waits for {', '.join(self.waiting_for)}"
        return f"feed {'assembled →' if self.changed else 'unchanged at'} {self.feed_dir}"


@dataclass(frozen=True)
class Delivery:
    connection: str
    as_of: dt.date
    part_dir: Path
    raw_files: dict[str, str]        # name → sha256
    assembly: Assembly = field(default=None)

    @property
    def feed_dir(self) -> Path | None:
        return self.assembly.feed_dir if self.assembly else None


def sftp_source(connection: Connection) -> SftpSource:
    """The SftpSource of a connection; the key file's path comes from the env variable it names."""
    sftp = connection.sftp
    key_file = custodian_secret(sftp.private_key_file_env)
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


def pull_and_convert(connection: Connection, feed_root: Path,
                     siblings: list[Connection] | None = None) -> list[Delivery]:
    """Fetch what is new over SFTP and translate every complete date not yet translated from
    these bytes into the connection's part; assemble each such day with `siblings` (the firm's
    custodian connections; default: this one alone)."""
    raw = inbound_dir(connection) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if connection.kind == "sftp":
        for fetched in pull_new(sftp_source(connection), raw):
            # The raw file, byte for byte, in the write-once content-addressed archive.
            archive_raw(fetched.path, settings.archive_root())
    deliveries = []
    for as_of in complete_dates(connection.dialect, raw):
        marker = inbound_dir(connection) / "converted" / f"{as_of.isoformat()}.json"
        # A file the custodian re-sent (a correction) was kept under a versioned name beside the
        # first one: the newest version of each file is the delivery.
        newest = {n: _newest_version(raw, n) for n in expected_files(connection.dialect, as_of)}
        digests = {n: _sha256(p) for n, p in newest.items()}
        if marker.exists() and marker.read_text() == _marker_text(digests) and part_dir(connection, as_of).exists():
            continue  # these exact bytes were translated already
        delivery_dir = inbound_dir(connection) / "deliveries" / as_of.isoformat() / _digest_of(digests)
        delivery_dir.mkdir(parents=True, exist_ok=True)
        for name, path in newest.items():
            if not (delivery_dir / name).exists():
                os.link(path, delivery_dir / name)  # the same bytes under the name the dialect expects
        with _staged_part(connection, as_of) as staging:
            dialects.to_canonical(connection.dialect, delivery_dir, as_of, reference_dir(connection), staging)
        _write_atomically(marker, _marker_text(digests))
        deliveries.append(Delivery(connection.name, as_of, part_dir(connection, as_of), digests,
                                   assemble_feed(siblings or [connection], as_of, feed_root)))
    return deliveries


def pull_from_api(connection: Connection, as_of: dt.date, feed_root: Path,
                  siblings: list[Connection] | None = None, **api_options) -> Delivery:
    """Pull one day from the connection's OAuth API into its part (all or nothing), archive every
    page's body, and assemble the day. Raises oauth_api.ReauthorizationNeeded when a person must
    authorize rebal again (the caller raises the operations alert)."""
    from rebal_pipeline.connections.oauth_api import RAW_PAGES, CustodianApi, OAuthApiConfig, pull_day

    # pull_day's folder is the part itself: it holds the four canonical files (plus the raw pages
    # and its manifest) and is swapped in whole only once every page arrived.
    target = part_dir(connection, as_of)
    with CustodianApi(OAuthApiConfig.from_connection(connection), **api_options) as api:
        result = pull_day(api, as_of, target)
    raw_files = {p.name: archive_raw(p, settings.archive_root()) for p in sorted((target / RAW_PAGES).iterdir())}
    return Delivery(connection.name, result.as_of, target, raw_files,
                    assemble_feed(siblings or [connection], as_of, feed_root))


class _staged_part:
    """A part is written beside its final place and renamed in whole; an error leaves the old one."""

    def __init__(self, connection: Connection, as_of: dt.date):
        self.target = part_dir(connection, as_of)
        self.staging = self.target.parent / f".{as_of.isoformat()}.partial-{secrets.token_hex(4)}"

    def __enter__(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        swap_in(self.staging, self.target)


def part_is_complete(connection: Connection, as_of: dt.date) -> bool:
    folder = part_dir(connection, as_of)
    return all((folder / FEED_FILES[name].filename).is_file() for name in dialects.CUSTODIAN_FILES)


def assemble_feed(connections: list[Connection], as_of: dt.date, feed_root: Path) -> Assembly:
    """The day's canonical feed from every connection's part and the firm's reference files, once
    all parts are in; unchanged inputs = nothing rewritten."""
    waiting = tuple(c.name for c in connections if not part_is_complete(c, as_of))
    if waiting:
        return Assembly(as_of, None, waiting)
    reference = reference_dir(connections[0])
    for name in dialects.REFERENCE_FILES:
        if not (reference / FEED_FILES[name].filename).is_file():
            raise dialects.DialectError(FEED_FILES[name].filename, None, None,
                                        f"reference file missing from {reference}")
    inputs = {f"reference/{FEED_FILES[n].filename}": _sha256(reference / FEED_FILES[n].filename)
              for n in dialects.REFERENCE_FILES}
    for c in connections:
        for n in dialects.CUSTODIAN_FILES:
            inputs[f"{c.name}/{FEED_FILES[n].filename}"] = _sha256(part_dir(c, as_of) / FEED_FILES[n].filename)
    target = Path(feed_root) / as_of.isoformat()
    marker = settings.rebal_home() / "inbound" / ".assembled" / f"{as_of.isoformat()}.json"
    if target.exists() and marker.exists() and marker.read_text() == _marker_text(inputs):
        return Assembly(as_of, target, changed=False)

    staging = Path(feed_root) / f".{as_of.isoformat()}.assembling-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        for name in dialects.REFERENCE_FILES:
            shutil.copyfile(reference / FEED_FILES[name].filename, staging / FEED_FILES[name].filename)
        for name in dialects.CUSTODIAN_FILES:
            spec = FEED_FILES[name]
            rows = _concatenated([part_dir(c, as_of) / spec.filename for c in connections], spec.column_names)
            if name == "prices":
                rows = _one_row_per_identical_price(rows)
            dialects.write_canonical_csv(staging / spec.filename, spec.column_names, rows)
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_atomically(marker, _marker_text(inputs))
    return Assembly(as_of, target, changed=True)


def _concatenated(paths: list[Path], columns: tuple[str, ...] | list[str]):
    for path in paths:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if list(reader.fieldnames or []) != list(columns):
                raise ValueError(f"{path}: columns {reader.fieldnames} are not the canonical {list(columns)}")
            yield from reader


def _one_row_per_identical_price(rows):
    """Two custodians pricing a symbol at the same close say one thing: keep one row. Different
    closes are both kept (the feed rejects the duplicate key, naming both lines)."""
    seen: set[tuple[str, object]] = set()
    for row in rows:
        try:
            close: object = Decimal(row["close"])
        except InvalidOperation:
            close = row["close"]  # not a number: kept as written, the feed rejects it
        if (row["symbol"], close) in seen:
            continue
        seen.add((row["symbol"], close))
        yield row


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _newest_version(raw: Path, name: str) -> Path:
    """`name`, or its newest re-delivery `<stem>.<UTC time>-<size><suffix>` (sftp.pull_new)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    versions = sorted(p for p in raw.glob(f"{stem}.*-*{suffix}")
                      if re.fullmatch(rf"{re.escape(stem)}\.\d{{8}}T\d{{6}}Z-\d+{re.escape(suffix)}", p.name))
    return versions[-1] if versions else raw / name


def _digest_of(digests: dict[str, str]) -> str:
    return hashlib.sha256(_marker_text(digests).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker_text(digests: dict[str, str]) -> str:
    return "\n".join(f"{name} {sha}" for name, sha in sorted(digests.items())) + "\n"
