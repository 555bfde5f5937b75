"""Fixtures for the approval workflow: a migrated workflow store on SQLite and on Postgres, and a
small book of published recommendations with hand-made packages."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.package import (
    PackageBand, PackageHolding, PackageTrade, RecommendationPackage, positions_fingerprint,
)
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.postgres import PG, scratch_database

AS_OF = date(2026, 11, 20)
# The daily run publishes at 16:30 New York = 21:30 UTC.
PUBLISHED_AT = datetime(2026, 11, 20, 21, 30, tzinfo=timezone.utc)

USERS = [
    {"user_id": "ADV-1", "name": "Dana Advisor", "email": "dana@example-ria.com", "role": "advisor"},
    {"user_id": "ADV-2", "name": "Sam Advisor", "email": "sam@example-ria.com", "role": "advisor"},
    {"user_id": "CCO-1", "name": "Chris Compliance", "email": "cco@example-ria.com", "role": "compliance"},
    {"user_id": "OPS-1", "name": "Olu Operations", "email": "ops@example-ria.com", "role": "operations"},
]


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
        PackageHolding(account_id=account_id, symbol="VTI", asset_class="equity", quantity=70, price=100, market_value=7000),
        PackageHolding(account_id=account_id, symbol="BND", asset_class="fixed_income", quantity=60, price=50,
                       market_value=3000),
        PackageHolding(account_id=account_id, symbol="CASH", asset_class="cash", quantity=cash, price=1, market_value=cash),
    ]
    trades = trades if trades is not None else [
        PackageTrade(account_id=account_id, symbol="VTI", asset_class="equity", side="sell", quantity=10, est_price=100,
                     est_value=1000, reason="rebalance"),
        PackageTrade(account_id=account_id, symbol="BND", asset_class="fixed_income", side="buy", quantity=20,
                     est_price=50, est_value=1000, reason="rebalance"),
    ]
    return RecommendationPackage(
        recommendation_id=recommendation_id, as_of=AS_OF, scope="account", scope_id=account_id, kind="rebalance",
        advisor_id=advisor_id, household_id="HH-1", account_ids=[account_id], tier="standard", urgency="medium",
        delivery=delivery, discretionary=discretionary, policy_version="2026.11-2+test", trades=trades,
        holdings=holdings, restrictions=list(restrictions),
        bands=[PackageBand(asset_class="equity", target_weight=0.6, band=0.05, current_weight=0.7, drift=0.1),
               PackageBand(asset_class="fixed_income", target_weight=0.4, band=0.05, current_weight=0.3, drift=-0.1)],
        tax={"st_gain": 0.0, "lt_gain": 100.0, "est_tax": 20.0}, inside_bands=True,
        positions_fingerprint=positions_fingerprint([(h.account_id, h.symbol, h.quantity) for h in holdings]),
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
