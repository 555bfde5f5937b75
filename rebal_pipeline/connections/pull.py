"""Pull one custodian connection: what a run of the pull_custodian_files job does, without Dagster.

    pull_connection(name, as_of, connections=, feed_root=, clock=, open_store=) -> list[Delivery]

- An SFTP connection: every file new on the server is fetched, archived and translated, and each
  complete date assembled (ingest.pull_and_convert). `as_of` is ignored: SFTP pulls whatever is new.
- An OAuth API connection: the day `as_of` (ISO; empty = the last closed NYSE session at `clock()`)
  is pulled all or nothing, archived and assembled (ingest.pull_from_api). When the custodian no
  longer accepts the refresh token, one operations alert `reauthorization_needed:<connection>:
  <as_of>` is raised in the workflow store (emailed by the comms sensors; the custodian_api_pulls
  sensor then waits for a new token file, connections/arrivals.py) and `ReauthorizationPending`
  is raised: the run fails with the alert's sentence.

Every delivery is assembled with the firm's other custodian connections, so the day's canonical
feed appears once the last custodian's part is in (connections/ingest.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rebal_pipeline.connections.config import Connection, Connections
from rebal_pipeline.connections.deadlines import expected_as_of
from rebal_pipeline.connections.ingest import Delivery, pull_and_convert, pull_from_api
from rebal_pipeline.connections.oauth_api import ReauthorizationNeeded
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert

if TYPE_CHECKING:
    from rebal_pipeline.workflow.store import WorkflowStore

Clock = Callable[[], datetime]


class UnknownConnection(LookupError):
    """The run names a connection the connections file does not list."""


class ReauthorizationPending(Exception):
    """A person must authorize rebal at the custodian again; the operations alert is recorded.
    `str(exc)` is the alert's sentence (the run's failure)."""

    def __init__(self, needed: ReauthorizationNeeded, alert_raised: bool):
        self.alert_message = needed.alert_message
        self.alert_raised = alert_raised  # False: an earlier run of the same day raised it
        super().__init__(self.alert_message)

    @property
    def log_line(self) -> str:
        return f"{self.alert_message} (operations alert {'raised' if self.alert_raised else 'already raised'})"


def reauthorization_key(connection: str, as_of: date) -> str:
    """The operations alert's key: one alert per connection and as-of date."""
    return f"reauthorization_needed:{connection}:{as_of.isoformat()}"


def find_connection(connections: Connections, name: str) -> Connection:
    matching = [c for c in connections.connections if c.name == name]
    if not matching:
        raise UnknownConnection(f"no connection named {name!r} in the connections file")
    [connection] = matching
    return connection


def pull_connection(name: str, as_of: str = "", *, connections: Connections, feed_root: Path, clock: Clock,
                    open_store: Callable[[], AbstractContextManager[WorkflowStore]]) -> list[Delivery]:
    """Pull the connection `name` (see the module's docstring); the days delivered, oldest first."""
    connection = find_connection(connections, name)
    siblings = connections.custodian_connections
    if connection.kind != "oauth_api":
        return pull_and_convert(connection, feed_root, siblings)
    day = date.fromisoformat(as_of) if as_of else expected_as_of(clock())
    try:
        return [pull_from_api(connection, day, feed_root, siblings)]
    except ReauthorizationNeeded as needed:
        raised = _raise_reauthorization_alert(open_store, connection, day, needed, clock())
        raise ReauthorizationPending(needed, raised) from None


def _raise_reauthorization_alert(open_store, connection: Connection, as_of: date, needed: ReauthorizationNeeded,
                                 now: datetime) -> bool:
    with open_store() as store, store.begin() as conn:
        return raise_operations_alert(
            conn, key=reauthorization_key(connection.name, as_of), alert="reauthorization_needed",
            summary=needed.alert_message, connection=connection.name, as_of=as_of, now=now,
            details={"custodian": connection.custodian, "token_file": connection.oauth.token_file,
                     "what_to_do": f"rebal connections authorize {connection.name}"})


def describe(delivery: Delivery) -> str:
    """One line for the run's log."""
    return (f"{delivery.connection}: {delivery.as_of} part in {delivery.part_dir}; {delivery.assembly.describe()}"
            f" ({len(delivery.raw_files)} raw files archived)")


def pull_summary(deliveries: list[Delivery]) -> dict[str, list[str]]:
    """What the run shows in the Dagster UI: the days pulled, the days whose feed was (re)written,
    and the connections a day still waits for."""
    return {
        "dates_pulled": [d.as_of.isoformat() for d in deliveries],
        "feeds_assembled": [d.as_of.isoformat() for d in deliveries if d.assembly.changed],
        "waiting_for": sorted({n for d in deliveries for n in d.assembly.waiting_for}),
    }
