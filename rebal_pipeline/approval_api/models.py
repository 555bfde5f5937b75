"""Request and response models of the approval API (pydantic; they are the OpenAPI document).

Decisions are a union discriminated by `action`, so the schema itself says what each action
needs: `modify` carries trades, `defer` and `escalate` carry a reason, only `defer` takes a date.
A request the schema accepts fails only on the store's rules (unknown, not yours, already decided,
trades that do not fit the account).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from rebal_pipeline.approval_api.links import ID_PATTERN, LINK_ACTIONS
from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage, TradeChange

STATUSES = ("pending", "approved", "modified", "deferred", "escalated", "auto_approved", "executed",
            "partially_executed", "cancelled", "refused_by_gate", "superseded", "resolved_by_market",
            "blocked_by_open_orders", "historical")
MAX_REASON = 2000
MAX_TRADES = 200
MAX_BATCH = 200
# A deferral is a pause, not a way to park a recommendation forever.
MAX_DEFERRAL = timedelta(days=366)

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN, min_length=1, max_length=64)]
# Free text: no NUL (Postgres text cannot hold it); lone surrogates are refused by pydantic itself.
Reason = Annotated[str, StringConstraints(max_length=MAX_REASON, pattern=r"^[^\x00]*$")]
# A reason that must say something: at least one visible character.
RequiredReason = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON,
                                                  pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]


def _utc_in_range(moment: datetime) -> datetime:
    try:
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValueError("the date is out of range") from None


def _date_time_text(value: Any) -> Any:
    # FastAPI validates the decoded JSON in pydantic's lax Python mode, which would read a number
    # as a Unix time; the schema promises an RFC 3339 string, so only a string is taken.
    if not isinstance(value, str):
        raise ValueError("a date-time must be an RFC 3339 string with an offset, e.g. 2026-11-24T21:00:00Z")
    return value


When = Annotated[AwareDatetime, BeforeValidator(_date_time_text), AfterValidator(_utc_in_range)]


class TradeChangeIn(TradeChange):
    """package.TradeChange, strictly typed (a quantity is a JSON number, not a numeric string)."""

    model_config = ConfigDict(strict=True, title="TradeChange")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: `error` in plain words, `detail` when there is more to say."""

    error: str
    detail: Any = None


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


class ApproveRequest(_In):
    action: Literal["approve"]
    reason: Reason | None = None


class ModifyRequest(_In):
    """Approve with the advisor's quantities: each line sets one trade (quantity 0 drops it)."""

    action: Literal["modify"]
    reason: Reason | None = None
    trades: list[TradeChangeIn] = Field(min_length=1, max_length=MAX_TRADES)


class DeferRequest(_In):
    """Wait: until `deferred_until` (at most a year ahead), else the store's default (5 days)."""

    action: Literal["defer"]
    reason: RequiredReason
    deferred_until: When | None = None


class EscalateRequest(_In):
    action: Literal["escalate"]
    reason: RequiredReason


class ReturnToAdvisorRequest(_In):
    """Compliance hands an escalated recommendation back to the advisor (back to pending)."""

    action: Literal["return_to_advisor"]
    reason: RequiredReason


class CommentRequest(_In):
    """A note on the recommendation (the advisor, their team, compliance): recorded and audited,
    it changes nothing — e.g. the advisor's word on one they escalated."""

    action: Literal["comment"]
    reason: RequiredReason = Field(description="the comment")


DecisionRequest = Annotated[Union[ApproveRequest, ModifyRequest, DeferRequest, EscalateRequest,
                                  ReturnToAdvisorRequest, CommentRequest],
                            Field(discriminator="action")]


class BatchApprove(ApproveRequest):
    recommendation_id: Id


class BatchModify(ModifyRequest):
    recommendation_id: Id


class BatchDefer(DeferRequest):
    recommendation_id: Id


class BatchEscalate(EscalateRequest):
    recommendation_id: Id


class BatchReturnToAdvisor(ReturnToAdvisorRequest):
    recommendation_id: Id


class BatchComment(CommentRequest):
    recommendation_id: Id


BatchItem = Annotated[Union[BatchApprove, BatchModify, BatchDefer, BatchEscalate, BatchReturnToAdvisor, BatchComment],
                      Field(discriminator="action")]


class BatchRequest(_In):
    """A review session: up to 200 decisions, each recorded (or refused) on its own."""

    items: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH)


class BandLine(BaseModel):
    asset_class: str
    weight_after: float
    target_weight: float
    band: float
    inside: bool


class Modification(BaseModel):
    """The modified trade list and the bands re-checked on it (outside a band is reported, not refused)."""

    trades: list[PackageTrade]
    band_report: list[BandLine]
    inside_bands: bool


class Decision(BaseModel):
    decision_id: str
    recommendation_id: str
    action: str
    actor_id: str
    via: str
    reason: str | None
    payload: dict[str, Any]
    created_at: datetime
    gate_verdict: str | None = None
    gate_reason: str | None = None


class DecisionResult(BaseModel):
    """201: recorded now; 200: the same decision by the same person was already recorded."""

    created: bool
    recommendation_status: str
    decision: Decision
    modification: Modification | None = None


class BatchItemResult(BaseModel):
    index: int
    recommendation_id: str
    action: str
    status: int = Field(description="the HTTP status this decision alone would have had")
    result: DecisionResult | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItemResult]
    counts: dict[str, int] = Field(description="items per status code")


# ---------------------------------------------------------------------------------------------
# Recommendations
# ---------------------------------------------------------------------------------------------

ListStatus = Literal["pending", "approved", "modified", "deferred", "escalated", "auto_approved", "executed",
                     "partially_executed", "cancelled", "refused_by_gate", "superseded", "resolved_by_market",
                     "blocked_by_open_orders", "historical"]


class ListQuery(_In):
    """Query of GET /recommendations (unknown parameters are refused, not ignored)."""

    status: ListStatus = Field("pending", description=(
        "pending: awaiting the caller — an advisor's own and their team's pending recommendations, "
        "compliance's escalated ones, everything pending for operations; any other status filters the "
        "caller's recommendations (compliance: those ever escalated)"))
    limit: int = Field(200, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=1_000_000_000)


class RecommendationSummary(BaseModel):
    recommendation_id: str
    advisor_id: str | None
    as_of: date
    scope: str
    scope_id: str
    kind: str
    urgency: str | None
    delivery: str | None
    status: str
    trade_value: float
    clock_started_at: datetime
    deferred_until: datetime | None = None
    escalated_at: datetime | None = None


class RecommendationList(BaseModel):
    status: str = Field(description="the status asked for (for compliance, pending means escalated)")
    items: list[RecommendationSummary]
    next_offset: int | None = Field(description="offset of the next page, if there may be one")


class GateRefusal(BaseModel):
    decision_id: str
    action: str
    actor_id: str
    reason: str | None
    checked_at: datetime | None


class RecommendationDetail(BaseModel):
    recommendation_id: str
    status: str
    advisor_id: str | None
    clock_started_at: datetime
    deferred_until: datetime | None
    escalated_at: datetime | None
    escalated_to: str | None
    supersedes: str | None
    superseded_by: str | None
    package: RecommendationPackage
    decisions: list[Decision]
    # Issue 12: why the approval gate last refused a decision on it (None: never), so whoever
    # decides it now sees why the previous approval did not execute.
    last_gate_refusal: GateRefusal | None = None


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


class LinkUse(_In):
    """Optional body of POST /links/{token}: defer and escalate links need a reason."""

    reason: Reason | None = None
    deferred_until: When | None = None


class LinkView(BaseModel):
    """What a link would do (GET changes nothing: mail scanners prefetch links)."""

    action: Literal[LINK_ACTIONS]  # type: ignore[valid-type]
    recommendation_id: str
    advisor_id: str
    expires_at: datetime
    would: str = Field(description="what POSTing to this link records, in plain words")
    needs_reason: bool
    recommendation: RecommendationSummary
    package: RecommendationPackage | None = Field(None, description="review links only")


class Health(BaseModel):
    status: str
    store: str
