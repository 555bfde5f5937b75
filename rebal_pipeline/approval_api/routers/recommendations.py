"""GET /recommendations (the caller's queue) and GET /recommendations/{id} (one, with its
package, decisions and the gate's last refusal)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Query
from sqlalchemy import or_, select

from rebal_pipeline.approval_api.dependencies import RecommendationIdPath, Store, User
from rebal_pipeline.approval_api.errors import _READ_ERRORS, _UNAUTHORISED, ApiError
from rebal_pipeline.approval_api.models import ListQuery, RecommendationDetail, RecommendationList
from rebal_pipeline.approval_api.records import (
    _SUMMARY_COLUMNS, _URGENCY_RANK, _decision, _load, _may_read, _summary, _utc,
)
from rebal_pipeline.approval_api.routers import api_router
from rebal_pipeline.workflow import lifecycle
from rebal_pipeline.workflow.package import RecommendationPackage
from rebal_pipeline.workflow.schema import advisor_team, decisions, recommendations

router = api_router()


@router.get("/recommendations", response_model=RecommendationList, tags=["recommendations"],
         responses={**_UNAUTHORISED, 422: _READ_ERRORS[422]})
def list_recommendations(user: User, store: Store, q: Annotated[ListQuery, Query()]) -> RecommendationList:
    """The caller's queue: summaries (no packages; GET /recommendations/{id} has the package),
    most urgent first (high, medium, low), then oldest first (the escalation clock)."""
    status, limit, offset = q.status, q.limit, q.offset
    r = recommendations.c
    query = select(*_SUMMARY_COLUMNS)
    wanted = status
    if user["role"] == "advisor":
        teams = select(advisor_team.c.advisor_id).where(advisor_team.c.member_user_id == user["user_id"])
        query = query.where(or_(r.advisor_id == user["user_id"], r.advisor_id.in_(teams)))
    elif user["role"] == "compliance":
        wanted = "escalated" if status == "pending" else status
        query = query.where(r.escalated_at.is_not(None))
    query = query.where(r.status == wanted).order_by(_URGENCY_RANK, r.clock_started_at, r.recommendation_id)
    with store.begin() as conn:
        rows = conn.execute(query.limit(limit + 1).offset(offset)).mappings().all()
    more = len(rows) > limit
    return RecommendationList(status=wanted, items=[_summary(row) for row in rows[:limit]],
                              next_offset=offset + limit if more else None)


@router.get("/recommendations/{recommendation_id}", response_model=RecommendationDetail, tags=["recommendations"],
         responses=_READ_ERRORS)
def get_recommendation(recommendation_id: RecommendationIdPath, user: User, store: Store) -> RecommendationDetail:
    with store.begin() as conn:
        rec = _load(conn, recommendation_id)
        if not _may_read(conn, user, rec):
            raise ApiError(403, "not one of your recommendations")
        rows = conn.execute(select(decisions).where(decisions.c.recommendation_id == recommendation_id)
                            .order_by(decisions.c.decision_seq)).mappings().all()
        refusal = lifecycle.last_gate_refusal(conn, recommendation_id)
    return RecommendationDetail(
        recommendation_id=rec["recommendation_id"], status=rec["status"], advisor_id=rec["advisor_id"],
        clock_started_at=_utc(rec["clock_started_at"]), deferred_until=_utc(rec["deferred_until"]),
        escalated_at=_utc(rec["escalated_at"]), escalated_to=rec["escalated_to"], supersedes=rec["supersedes"],
        superseded_by=rec["superseded_by"], package=RecommendationPackage.model_validate_json(rec["package"]),
        decisions=[_decision(d) for d in rows], last_gate_refusal=refusal)
