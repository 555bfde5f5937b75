"""Reading recommendations as the API shows them: a row to its summary, package and decisions,
moments made UTC (rebal_pipeline.core.clock.utc; a moment not yet set stays None)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, select

from rebal_pipeline.approval_api.errors import ApiError
from rebal_pipeline.approval_api.models import Decision, RecommendationSummary
from rebal_pipeline.core.clock import utc
from rebal_pipeline.workflow import authority
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import recommendations


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)


def _load(conn: Connection, recommendation_id: str) -> dict:
    rec = conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == recommendation_id)).mappings().first()
    if rec is None:
        raise ApiError(404, f"no recommendation {recommendation_id}")
    return dict(rec)


# Who may do what: workflow/authority.py, the one rule the API, the portal, the lifecycle and
# the gate share. These wrappers only turn its refusals into this API's errors.
def _may_read(conn: Connection, user: dict, rec: dict) -> bool:
    return authority.may_read(conn, user, rec)


# The queue reads the summary's columns only: never the package (large JSON, per row).
_SUMMARY_COLUMNS = [recommendations.c[name] for name in RecommendationSummary.model_fields]
_URGENCY_RANK = case({"high": 0, "medium": 1, "low": 2}, value=recommendations.c.urgency, else_=3)


def _summary(rec: Any) -> RecommendationSummary:
    return RecommendationSummary(
        recommendation_id=rec["recommendation_id"], advisor_id=rec["advisor_id"], as_of=rec["as_of"],
        scope=rec["scope"], scope_id=rec["scope_id"], kind=rec["kind"], urgency=rec["urgency"],
        delivery=rec["delivery"], status=rec["status"], trade_value=rec["trade_value"],
        clock_started_at=_utc(rec["clock_started_at"]), deferred_until=_utc(rec["deferred_until"]),
        escalated_at=_utc(rec["escalated_at"]))


def _package(rec: Any) -> RecommendationPackage:
    return RecommendationPackage.model_validate_json(rec["package"])


def _decision(row: Any) -> Decision:
    return Decision(
        decision_id=row["decision_id"], recommendation_id=row["recommendation_id"], action=row["action"],
        actor_id=row["actor_id"], via=row["via"], reason=row["reason"], payload=json.loads(row["payload"]),
        created_at=_utc(row["created_at"]), gate_verdict=row["gate_verdict"], gate_reason=row["gate_reason"])
