"""Deciding a recommendation, shared by the single, batch and link endpoints: authority's rule
first (workflow/authority.py), a modification validated as the gate applies it, then
lifecycle.decide (an idempotent repeat answers the recorded decision; a concurrent one a 409)."""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.approval_api.errors import ApiError
from rebal_pipeline.approval_api.models import MAX_DEFERRAL, DecisionResult, Modification
from rebal_pipeline.approval_api.records import _decision, _load
from rebal_pipeline.workflow import authority, ledger, lifecycle
from rebal_pipeline.workflow.lifecycle import DecisionError
from rebal_pipeline.workflow.package import RecommendationPackage, TradeChange, apply_modification
from rebal_pipeline.workflow.schema import recommendations

log = logging.getLogger("rebal.approval_api")


def _check_may_decide(conn: Connection, user: dict, rec: dict, action: str) -> None:
    """authority's rule, applied before the API computes anything from the package (a
    modification's errors and band report must not reach someone who may not decide)."""
    refused = authority.refusal(conn, user, rec, action)
    # A state conflict (409) is lifecycle.decide's to answer: it knows an idempotent repeat.
    if refused is not None and refused.status != 409:
        raise DecisionError(refused.status, refused.message)


def _decide(conn: Connection, user: dict, recommendation_id: str, action: str, now: datetime, *,
            reason: str | None = None, trades: list[TradeChange] | None = None,
            deferred_until: datetime | None = None, via: str = "api") -> DecisionResult:
    payload: dict[str, Any] = {}
    modification = None
    if action == "modify":
        rec = _load(conn, recommendation_id)
        _check_may_decide(conn, user, rec, action)
        # The one validation of a trade list (package.validate_trades), as the gate applies it: the
        # package's holdings net of what the accounts' open orders already claim (issue 12).
        pkg = RecommendationPackage.model_validate_json(rec["package"])
        check = apply_modification(pkg, list(trades or ()), ledger.reserved(conn, pkg.account_ids))
        if check.errors:
            raise ApiError(422, "the modified trades cannot be accepted", {"errors": check.errors})
        payload = {"trades": [t.model_dump(mode="json") for t in check.trades],
                   "band_report": check.band_report, "inside_bands": check.inside_bands}
        modification = Modification(trades=check.trades, band_report=check.band_report,
                                    inside_bands=check.inside_bands)
    elif action == "defer" and deferred_until is not None:
        if deferred_until > now + MAX_DEFERRAL:
            raise ApiError(422, f"deferred_until may be at most {MAX_DEFERRAL.days} days ahead")
        payload = {"deferred_until": deferred_until}
    for attempt in (1, 2):
        try:
            with conn.begin_nested():
                row, created = lifecycle.decide(conn, recommendation_id, user, action, now, reason=reason,
                                                payload=payload, via=via)
            break
        except (DecisionError, IntegrityError) as exc:
            # A concurrent request decided this recommendation after we read it (Postgres, read
            # committed: our conditional update found nothing to change). Once more, now seeing
            # its decision: the same decision is then an idempotent repeat (200), another a 409.
            if attempt == 2 or (isinstance(exc, DecisionError) and exc.status != 409):
                if isinstance(exc, IntegrityError):
                    raise ApiError(409, "a concurrent request recorded a decision on this recommendation; "
                                        "reload it") from None
                raise
    status = conn.execute(select(recommendations.c.status).where(
        recommendations.c.recommendation_id == recommendation_id)).scalar_one()
    if modification is None and row["action"] == "modify":  # an idempotent repeat of a modify
        stored = json.loads(row["payload"])
        modification = Modification(trades=stored["trades"], band_report=stored["band_report"],
                                    inside_bands=stored["inside_bands"])
    log.info("decision %s recommendation=%s action=%s actor=%s via=%s", "recorded" if created else "repeated",
             recommendation_id, action, user["user_id"], via)
    return DecisionResult(created=created, recommendation_status=status, decision=_decision(row),
                          modification=modification)
