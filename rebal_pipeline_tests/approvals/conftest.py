"""Fixtures for the approval workflow: a migrated workflow store on SQLite and on Postgres, and a
small book of published recommendations with hand-made packages."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.package import PackageBand, RecommendationPackage
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.factories import USERS, holding, make_package, trade  # noqa: F401 (USERS: shared)
from rebal_pipeline_tests.postgres import PG, scratch_database

AS_OF = date(2026, 11, 20)
# The daily run publishes at 16:30 New York = 21:30 UTC.
PUBLISHED_AT = datetime(2026, 11, 20, 21, 30, tzinfo=timezone.utc)



def _pg_url(dbname: str) -> str:
    password = f":{PG['password']}" if PG["password"] else ""
    return f"postgresql+psycopg2://{PG['user']}{password}@{PG['host']}:{PG['port']}/{dbname}"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A migrated, empty workflow store: embedded SQLite, and Postgres (required in CI)."""
    if request.param == "sqlite":
        s = WorkflowStore(f"sqlite:///{tmp_path / 'workflow.sqlite'}")
        s.migrate()
        yield s
        s.dispose()
    else:
        with scratch_database() as dbname:
            s = WorkflowStore(_pg_url(dbname))
            s.migrate()
            yield s
            s.dispose()


def package(recommendation_id="REC-1", account_id="ACC-1", advisor_id="ADV-1", discretionary=False,
            trades=None, cash=0.0, delivery="within_48h", restrictions=()) -> RecommendationPackage:
    """A $10,000 account at 70/30 on a 60/40 model ±5%: sell 10 VTI ($100), buy 20 BND ($50)."""
    holdings = [
        holding(account_id, "VTI", "equity", 70, 100),
        holding(account_id, "BND", "fixed_income", 60, 50),
        holding(account_id, "CASH", "cash", cash, 1),
    ]
    trades = trades if trades is not None else [
        trade(account_id, "VTI", "equity", "sell", 10, 100, est_value=1000),
        trade(account_id, "BND", "fixed_income", "buy", 20, 50, est_value=1000),
    ]
    return make_package(
        recommendation_id=recommendation_id, as_of=AS_OF, scope_id=account_id, advisor_id=advisor_id,
        account_ids=[account_id], tier="standard", urgency="medium", delivery=delivery, discretionary=discretionary,
        trades=trades, holdings=holdings, restrictions=list(restrictions),
        bands=[PackageBand(asset_class="equity", target_weight=0.6, band=0.05, current_weight=0.7, drift=0.1),
               PackageBand(asset_class="fixed_income", target_weight=0.4, band=0.05, current_weight=0.3, drift=-0.1)],
        tax={"st_gain": 0.0, "lt_gain": 100.0, "est_tax": 20.0}, inside_bands=True,
    )


def publish(store: WorkflowStore, *packages: RecommendationPackage, as_of: date = AS_OF,
            now: datetime = PUBLISHED_AT, realized_gain: float = 100.0, inside: set[str] = frozenset(),
            users: list[dict] | None = None):
    """Publish packages as the daily run would (users.csv — `users`, default USERS — synced first)."""
    with store.begin() as conn:
        lifecycle.sync_users(conn, USERS if users is None else users, now)
        return lifecycle.publish_day(conn, as_of, [
            {"recommendation_id": p.recommendation_id, "scope": p.scope, "scope_id": p.scope_id, "kind": p.kind,
             "household_id": p.household_id, "advisor_id": p.advisor_id, "tier": p.tier, "urgency": p.urgency,
             "delivery": p.delivery, "discretionary": p.discretionary,
             "trade_value": sum(t.est_value for t in p.trades), "realized_gain": realized_gain,
             "policy_version": p.policy_version, "positions_fingerprint": p.positions_fingerprint,
             "package": p.model_dump(mode="json")}
            for p in packages], set(inside), now)
