"""POST /recommendations/{id}/decisions (one decision) and POST /decisions/batch (many, one
transaction per item, each item's outcome reported in its place)."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Callable

from fastapi import Depends, Response
from sqlalchemy.exc import OperationalError

from rebal_pipeline.approval_api.deciding import _decide
from rebal_pipeline.approval_api.dependencies import RecommendationIdPath, Store, User, get_clock
from rebal_pipeline.approval_api.errors import _BAD_BODY, _BAD_JSON, _DECIDE_ERRORS, _E, _UNAUTHORISED, ApiError, _log_unhandled
from rebal_pipeline.approval_api.models import (
    BatchItemResult, BatchRequest, BatchResponse, DecisionRequest, DecisionResult, ErrorBody,
)
from rebal_pipeline.approval_api.routers import api_router
from rebal_pipeline.workflow.lifecycle import DecisionError

log = logging.getLogger("rebal.approval_api")

router = api_router()
Clock = Annotated[Callable[[], datetime], Depends(get_clock)]


@router.post("/recommendations/{recommendation_id}/decisions", status_code=201, response_model=DecisionResult,
          tags=["decisions"], responses={
              200: {"model": DecisionResult, "description": "the same decision was already recorded by you"},
              201: {"model": DecisionResult, "description": "decision recorded"}, **_DECIDE_ERRORS})
def post_decision(recommendation_id: RecommendationIdPath, body: DecisionRequest, user: User,
                  response: Response, store: Store, clock: Clock) -> DecisionResult:
    with store.begin() as conn:
        result = _decide(conn, user, recommendation_id, body.action, clock(), reason=body.reason,
                         trades=getattr(body, "trades", None), deferred_until=getattr(body, "deferred_until", None))
    response.status_code = 201 if result.created else 200
    return result


@router.post("/decisions/batch", response_model=BatchResponse, tags=["decisions"], responses={
    **_UNAUTHORISED, **_BAD_BODY, 422: {**_E, "description": f"the document is malformed ({_BAD_JSON}, or not the "
                                                 "schema; nothing was recorded); a decision refused on its merits "
                                                 "is reported in its item"}})
def post_batch(body: BatchRequest, user: User, store: Store, clock: Clock) -> BatchResponse:
    results = []
    for index, item in enumerate(body.items):
        outcome = BatchItemResult(index=index, recommendation_id=item.recommendation_id, action=item.action,
                                  status=500)
        try:
            with store.begin() as conn:  # one transaction per item
                result = _decide(conn, user, item.recommendation_id, item.action, clock(), reason=item.reason,
                                 trades=getattr(item, "trades", None),
                                 deferred_until=getattr(item, "deferred_until", None), via="batch")
            outcome.status, outcome.result = (201 if result.created else 200), result
        except (ApiError, DecisionError) as exc:
            outcome.status = exc.status
            outcome.error = ErrorBody(error=exc.message, detail=getattr(exc, "detail", None))
        except OperationalError as exc:
            log.error("workflow store unavailable (%s) on batch item %d", type(exc.orig).__name__, index)
            outcome.status = 503
            outcome.error = ErrorBody(error="the workflow store is unavailable; try this item again")
        except Exception as exc:  # last resort for this item only: the session goes on
            _log_unhandled(exc, "POST", "/decisions/batch", f"item {index}")
            outcome.error = ErrorBody(error="internal error on this item; it was not recorded")
        results.append(outcome)
    counts: dict[str, int] = {}
    for outcome in results:
        counts[str(outcome.status)] = counts.get(str(outcome.status), 0) + 1
    return BatchResponse(results=results, counts=counts)
