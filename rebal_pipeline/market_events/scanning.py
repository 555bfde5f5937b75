"""A market event from its prices to its batch: what the `market_event_scan` run does, in order.

  1. `receive_snapshot`   a prices drop file the sensor chose: archived byte for byte first
                          (content-addressed, write-once), then read strictly; rows it refuses
                          are quarantined beside the archive, never dropped or "fixed".
  2. `record_snapshot`    the event recorded once in the day's batch, measured again under the
                          batch's lock (batches.record_event: E1–E3); an absorbed snapshot ends
                          the run here.
  3. `scan_event`         the session's book valued at the event's prices in shadows
                          (market_events/scan.py), published through the daily run's own code
                          (workflow/publishing.py: supersede, history, held accounts, auto-approval
                          and compliance routing unchanged), and the scan's recommendations that
                          wait for a person added to the batch — all in ONE store transaction
                          with the event marked scanned, so a crash leaves either nothing or all
                          of it, and a re-run finds the event scanned and publishes nothing.
The report and the advisors' emails follow (market_events/report.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from rebal_pipeline.core.clock import utc
from rebal_pipeline.core.market_calendar import latest_closed_session
from rebal_pipeline.market_events import batches, prices, scan
from rebal_pipeline.workflow import lifecycle, publishing


class EventError(ValueError):
    """The event cannot be taken (a file outside the drop folder, an unknown event); nothing recorded."""


@dataclass(frozen=True)
class Received:
    snapshot: prices.PriceSnapshot
    archived: Path
    rejects_file: Path | None


def drop_file(feed_root: Path, relative: str) -> Path:
    """The drop file the sensor named, refused unless it is a prices file of an intraday folder."""
    path = (feed_root / relative).resolve()
    intraday = (feed_root / prices.INTRADAY_FOLDER).resolve()
    if intraday not in path.parents or not path.name.startswith("prices_") or path.suffix != ".csv":
        raise EventError(f"{relative!r} is not an intraday prices file under {prices.INTRADAY_FOLDER}/")
    return path


def receive_snapshot(feed_root: Path, archive_root: Path, relative: str) -> Received:
    path = drop_file(feed_root, relative)
    # Archived before it is read: a file the reader refuses is kept too, for operations to see.
    prices.archive_drop(path, archive_root, shown_as=relative)
    snapshot = prices.read_snapshot(path, feed_root=feed_root)
    archived = prices.archive_snapshot(snapshot, archive_root)  # the bytes read are the bytes archived
    rejects = prices.write_rejects(snapshot, archive_root)
    if not snapshot.prices:
        raise EventError(f"{snapshot.shown_as}: no row could be read ({len(snapshot.rejects)} quarantined in "
                         f"{rejects}): no event")
    return Received(snapshot, archived, rejects)


def session_closes(con, as_of) -> dict[str, Decimal]:
    return {s: Decimal(str(c)) for s, c in con.execute(
        f"select symbol, close from {scan.ATTACHED}.main.stg_feed_prices where as_of = $as_of",
        {"as_of": as_of}).fetchall()}


def record_snapshot(conn, received: Received, rule, now: datetime, closes: dict[str, Decimal], session_as_of
                    ) -> batches.Event | None:
    """The prices event of a snapshot (E1–E3), or None when it is absorbed."""
    snapshot = received.snapshot
    basket = prices.basket_of(rule)
    return batches.record_event(
        conn, event_key=f"prices:{snapshot.sha256}", source=batches.PRICES, declared_by=batches.ACTOR,
        reason=f"the reference basket moved (prices of {snapshot.priced_at.isoformat()}, {snapshot.shown_as})",
        day=snapshot.day, session_as_of=session_as_of, detected_at=snapshot.priced_at, now=now, basket=basket,
        threshold=rule.threshold, release_after=timedelta(minutes=rule.release_after_minutes),
        basket_prices={s: snapshot.prices[s] for s, _ in basket if s in snapshot.prices}, session_closes=closes,
        extra={"prices_file": snapshot.shown_as, "prices_sha256": snapshot.sha256,
               "archived_as": str(received.archived), "rejected_rows": len(snapshot.rejects)})


def event_prices(event: batches.Event, archive_root: Path) -> dict[str, Decimal]:
    """Every price of the event's snapshot (read back from the archive: the bytes the event was
    measured on), or none for a declaration without prices (the session's closes then)."""
    archived, shown_as = event.reference.get("archived_as"), event.reference.get("prices_file")
    if not archived:
        return {}
    import tempfile

    # Read as the file it was (its folder names its day), from the archived bytes.
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / shown_as
        copy.parent.mkdir(parents=True)
        copy.write_bytes(Path(archived).read_bytes())
        snapshot = prices.read_snapshot(copy, feed_root=Path(folder))
    if snapshot.sha256 != event.reference.get("prices_sha256"):
        raise EventError(f"the archived prices of {event.event_id} are not the bytes it was measured on")
    return dict(snapshot.prices)


@dataclass(frozen=True)
class ScanOutcome:
    event_id: str
    batch_id: str
    session_as_of: object
    scanned_by_this_run: bool
    counts: dict
    published: lifecycle.PublishResult | None
    joined: list[str]


def scan_event(store, warehouse_path: str, sql_dir: Path, event: batches.Event, *, policy, overrides_for,
               lifecycle_policy: lifecycle.LifecyclePolicy, archive_root: Path, now: datetime, run_id: str
               ) -> ScanOutcome:
    """Scan every account at the event's prices and publish, once (step 3 of the module)."""
    now = utc(now)
    if event.scanned_at is not None:
        return ScanOutcome(event.event_id, event.batch_id, event.reference.get("session_as_of"), False, {}, None, [])
    with scan.attached(warehouse_path) as con:
        as_of = scan.newest_session(con, latest_closed_session(event.detected_at))
        if as_of is None:
            raise scan.ScanError("the warehouse has no scanned session on or before the event: run the daily scan")
        counts = scan.scan(con, sql_dir, as_of, policy, event_prices(event, archive_root), overrides_for(as_of))
        ids = scan.recommendation_ids(con, as_of)
        with store.begin() as conn:
            current = batches.event(conn, event.event_id)
            if current is None or current.scanned_at is not None:  # another run got there first
                return ScanOutcome(event.event_id, event.batch_id, as_of, False, counts, None, [])
            _, published = publishing.publish_recommendations(
                con, conn, as_of, publishing.trade_rules_of(policy), lifecycle_policy, now)
            joined = batches.add_members(conn, event.event_id, ids, now)
            batches.mark_scanned(conn, event.event_id, run_id, now, len(joined))
    return ScanOutcome(event.event_id, event.batch_id, as_of, True, counts, published, joined)
