"""The daily run writes its recommendations to the workflow store with full packages."""

import json

from sqlalchemy import func, select

from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import audit_events, recommendations
from rebal_pipeline.workflow.store import WorkflowStore
from rebal_pipeline_tests.trades.test_trade_proposals import book


def test_the_daily_run_publishes_each_recommendation_once_with_its_package(workspace, dagster_instance):
    book().write(workspace.feed_root)
    assert workspace.run_day(instance=dagster_instance).success
    store = WorkflowStore(workspace.workflow_url)
    with store.begin() as conn:
        rows = conn.execute(select(recommendations).order_by(recommendations.c.scope_id)).mappings().all()
        chain = conn.execute(select(func.count()).select_from(audit_events)).scalar()
    assert [(r["scope_id"], r["status"], r["advisor_id"]) for r in rows] == [
        ("ACC-6040", "pending", "ADV-1"), ("ACC-8020", "pending", "ADV-1")]
    pkg = RecommendationPackage.model_validate(json.loads(rows[0]["package"]))
    assert [(t.side, t.symbol, t.quantity) for t in pkg.trades] == [("buy", "BND", 20.0), ("sell", "VTI", 10.0)]
    assert {h.symbol for h in pkg.holdings} == {"VTI", "BND", "CASH"}
    assert {b.asset_class: (b.target_weight, b.band) for b in pkg.bands}["equity"] == (0.6, 0.07)
    assert pkg.tax["est_tax"] == 20.0  # 10 VTI: $1,000 − $900 basis = $100 long-term × 20%

    assert workspace.run_day(instance=dagster_instance).success  # the same day again
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(recommendations)).scalar() == 2
        assert conn.execute(select(func.count()).select_from(audit_events)).scalar() == chain
        assert audit.verify(conn).ok
    store.dispose()
