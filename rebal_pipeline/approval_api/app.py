"""The approval API: advisors review and decide recommendations; one-click links from alert emails.

    app = create_app(store, link_secret)           # tests inject a clock
    serve("127.0.0.1", 8000)                        # store and secret from the environment

Every state change goes through `lifecycle.decide` in one store transaction, so the decision, the
recommendation's new status, the audit event and (for links) the used-link record commit or fail
together. Errors are JSON `{"error": "<plain words>", "detail": ...}` with a 4xx status. Logs carry
ids only: no client names, emails, API tokens, link tokens or secrets (link URLs are redacted).

The link URLs are also the approval portal (portal.py): a browser opening `/links/{token}` gets an
HTML page with the recommendation and a form that posts back to the same URL (urlencoded, handled
by a route left out of the OpenAPI document that shares the JSON route's decision code), and link
errors as HTML pages with the same status and message. API clients see the JSON described above.
The review link's page also offers a quantities form (when its advisor may decide): posted, it is a
`modify` decision via the link, recorded once per review link (the link id in `used_links`).
"""


import json
import logging
import os
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, case, insert, or_, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match

from rebal_pipeline import settings
from rebal_pipeline.approval_api import portal
from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.approval_api.links import ID_PATTERN, LinkClaims, LinkError
from rebal_pipeline.approval_api.request_body import (
    MAX_BODY_BYTES, BodyRefused, StrictJSONRoute, declared_too_large, limited_receive, too_large,
)
from rebal_pipeline.approval_api.models import (
    MAX_DEFERRAL, BatchItemResult, BatchRequest, BatchResponse, Decision, DecisionRequest, DecisionResult, ErrorBody,
    Health, LinkUse, LinkView, ListQuery, Modification, RecommendationDetail, RecommendationList,
    RecommendationSummary,
)
from rebal_pipeline.workflow import authority, ledger, lifecycle
from rebal_pipeline.workflow.lifecycle import DecisionError
from rebal_pipeline.workflow.package import RecommendationPackage, TradeChange, apply_modification
from rebal_pipeline.workflow.schema import ROLES, advisor_team, decisions, recommendations, used_links, users
from rebal_pipeline.workflow.store import WorkflowStore

log = logging.getLogger("rebal.approval_api")

MAX_API_TOKEN_CHARS = 512
READ_ONLY_ROLES = ("operations", "trading_desk")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); Postgres aware ones."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.detail, self.headers = status, message, detail, headers


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: whatever a client sent and we echo, the body always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> AsciiJSONResponse:
    return AsciiJSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def _error_for(scope: dict, status: int, message: str, detail: Any = None,
               headers: dict[str, str] | None = None) -> Response:
    """An error in the form the client reads: JSON, or for a browser on a link URL (and the
    portal's form) a page with the same status and message."""
    if portal.html_for(scope):
        reference = detail.get("request_id") if isinstance(detail, dict) else None
        return portal.error_page(status, message, headers, reference=reference)
    if portal.is_link_path(scope):  # the same URL answers HTML to browsers
        headers = {**(headers or {}), "Vary": "Accept"}
    return _error(status, message, detail, headers)


def _validation_errors(errors: Any) -> list[dict]:
    """Location, message and type of each problem; never the input itself (it may be anything)."""
    out = []
    for e in errors or ():
        loc = [x if isinstance(x, int) else str(x) for x in e.get("loc", ())] if isinstance(e, dict) else []
        out.append({"loc": loc, "msg": str(e.get("msg", "")) if isinstance(e, dict) else str(e),
                    "type": str(e.get("type", "")) if isinstance(e, dict) else "invalid"})
    return out


_E = {"model": ErrorBody}
_UNAUTHORISED = {401: {**_E, "description": "no API token, or an unknown one"}}
_READ_ERRORS = {**_UNAUTHORISED, 403: {**_E, "description": "not one of your recommendations"},
                404: {**_E, "description": "no such recommendation"},
                422: {**_E, "description": "the request is not valid"}}
# Every operation with a body: it is read (request_body.py) before authentication, so these
# come before a 401, and nothing is recorded on any of them.
_BAD_BODY = {400: {**_E, "description": "the body could not be read: it is not UTF-8 JSON (another encoding such "
                                        "as UTF-16, a byte order mark, or bytes that are not UTF-8)"},
             413: {**_E, "description": f"the body is larger than {MAX_BODY_BYTES} bytes (2 MiB), declared or "
                                        "streamed; the connection is closed"}}
_BAD_JSON = "malformed JSON, a key repeated in one object, NaN or Infinity"
_DECIDE_ERRORS = {**_READ_ERRORS, **_BAD_BODY, 409: {**_E, "description": "a different decision is already recorded"},
                  422: {**_E, "description": f"the request is not valid ({_BAD_JSON}, or not the schema), or the "
                                              "modified trades do not fit (detail.errors lists why)"}}
_LINK_ERRORS = {401: {**_E, "description": "the link is not genuine, or has expired"},
                403: {**_E, "description": "the link's advisor may no longer act on this recommendation"},
                404: {**_E, "description": "the recommendation no longer exists"},
                410: {**_E, "description": "the link was already used (links are single-use)"},
                422: {**_E, "description": f"the request is not valid (e.g. a defer link without a reason; "
                                            f"{_BAD_JSON})"}}
LINK_WOULD = {
    "approve": "approve the proposed trades",
    "defer": "defer the recommendation (a reason is required)",
    "escalate": "escalate the recommendation to compliance (a reason is required)",
    "review": "nothing: this link opens the recommendation for review",
}


class _FormPostRoute(APIRoute):
    """POST /links/{token} with the portal's form (application/x-www-form-urlencoded): a route of
    its own, left out of the OpenAPI document. It matches such a request only, so JSON (and any
    other body) reaches the documented route exactly as before."""

    def matches(self, scope):
        if scope.get("type") != "http" or not portal.is_form_post(scope):
            return Match.NONE, {}
        return super().matches(scope)


def create_app(store: WorkflowStore, link_secret: bytes, clock: Callable[[], datetime] = utcnow,
               link_ttl: timedelta = timedelta(hours=72)) -> FastAPI:
    """The approval API over a (migrated) workflow store. link_secret signs one-click links;
    link_ttl is how long the links this app issues (`app.state.issue_links`) stay valid."""
    link_tokens.check_secret(link_secret)
    secret = bytes(link_secret)

    app = FastAPI(
        title="rebal approval API",
        version="1.0",
        description=(
            "Advisors review rebalancing recommendations and decide them: approve, modify quantities and "
            "approve, defer with a reason, escalate to compliance. Authenticate with `Authorization: Bearer "
            "<API token>`. One-click links from alert emails (`/links/{token}`) carry their own signed, "
            "expiring, single-use authorisation. Errors are `{\"error\": ..., \"detail\": ...}`."
        ),
        default_response_class=AsciiJSONResponse,
    )
    app.router.route_class = StrictJSONRoute  # JSON bodies read strictly (request_body.read_json)
    app.state.store = store
    app.state.clock = clock
    app.state.link_ttl = link_ttl
    app.state.issue_links = lambda recommendation_id, advisor_id, actions=link_tokens.LINK_ACTIONS: (
        link_tokens.issue_links(secret, recommendation_id, advisor_id, clock(), link_ttl, tuple(actions)))

    bearer = HTTPBearer(auto_error=False, scheme_name="api_token",
                        description="A user's API token (issued by operations; stored as a SHA-256 digest)")

    # -----------------------------------------------------------------------------------------
    # Errors
    # -----------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_for(request.scope, exc.status, exc.message, exc.detail, exc.headers)

    @app.exception_handler(DecisionError)
    async def _decision_error(request: Request, exc: DecisionError):
        return _error_for(request.scope, exc.status, exc.message)

    @app.exception_handler(LinkError)
    async def _link_error(request: Request, exc: LinkError):
        return _error_for(request.scope, exc.status, exc.message)

    @app.exception_handler(BodyRefused)
    async def _body_refused(request: Request, exc: BodyRefused):
        return _error_for(request.scope, exc.status_code, exc.message, exc.body_detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_for(request.scope, 422, "the request is not valid", _validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        from http import HTTPStatus

        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # One path, several routes (GET and POST /links/{token}): Starlette's Allow names the
            # first route's methods only; name every method the path supports.
            headers["Allow"] = ", ".join(_methods_for(request))
        return _error_for(request.scope, exc.status_code, message.lower() if message else "error", None,
                          headers or None)

    @app.exception_handler(OperationalError)
    async def _store_down(request: Request, exc: OperationalError):
        # The message can carry SQL parameters: log the class only.
        log.error("workflow store unavailable (%s) on %s %s", type(exc.orig).__name__ if exc.orig else "?",
                  request.method, _route_of(request.scope))
        return _error_for(request.scope, 503, "the workflow store is unavailable; try again shortly",
                          headers={"Retry-After": "5"})

    # -----------------------------------------------------------------------------------------
    # Authentication and authorisation
    # -----------------------------------------------------------------------------------------

    def current_user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict:
        unauthorised = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "an API token is required (Authorization: Bearer <token>)", headers=unauthorised)
        token = credentials.credentials
        if len(token) > MAX_API_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            raise ApiError(401, "the API token is not valid", headers=unauthorised)
        with store.begin() as conn:
            user = lifecycle.user_for_token(conn, token)
        if user is None:
            log.info("api token refused")
            raise ApiError(401, "the API token is not valid", headers=unauthorised)
        if user["role"] not in ROLES:
            raise ApiError(403, "your role may not use the approval API")
        return user

    User = Annotated[dict, Depends(current_user)]
    RecommendationIdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=64,
                                                description="recommendation id")]
    TokenPath = Annotated[str, Path(min_length=1, max_length=link_tokens.MAX_TOKEN_CHARS,
                                    description="the signed link token from the email")]

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

    def _check_may_decide(conn: Connection, user: dict, rec: dict, action: str) -> None:
        """authority's rule, applied before the API computes anything from the package (a
        modification's errors and band report must not reach someone who may not decide)."""
        refused = authority.refusal(conn, user, rec, action)
        # A state conflict (409) is lifecycle.decide's to answer: it knows an idempotent repeat.
        if refused is not None and refused.status != 409:
            raise DecisionError(refused.status, refused.message)

    # -----------------------------------------------------------------------------------------
    # Deciding (shared by the single, batch and link endpoints)
    # -----------------------------------------------------------------------------------------

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

    # -----------------------------------------------------------------------------------------
    # Endpoints
    # -----------------------------------------------------------------------------------------

    @app.get("/health", response_model=Health, tags=["service"],
             responses={503: {**_E, "description": "the workflow store is unreachable"}})
    def health() -> Health:
        with store.begin() as conn:
            conn.execute(text("select 1"))
        return Health(status="ok", store=store.dialect)

    @app.get("/recommendations", response_model=RecommendationList, tags=["recommendations"],
             responses={**_UNAUTHORISED, 422: _READ_ERRORS[422]})
    def list_recommendations(user: User, q: Annotated[ListQuery, Query()]) -> RecommendationList:
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

    @app.get("/recommendations/{recommendation_id}", response_model=RecommendationDetail, tags=["recommendations"],
             responses=_READ_ERRORS)
    def get_recommendation(recommendation_id: RecommendationIdPath, user: User) -> RecommendationDetail:
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

    @app.post("/recommendations/{recommendation_id}/decisions", status_code=201, response_model=DecisionResult,
              tags=["decisions"], responses={
                  200: {"model": DecisionResult, "description": "the same decision was already recorded by you"},
                  201: {"model": DecisionResult, "description": "decision recorded"}, **_DECIDE_ERRORS})
    def post_decision(recommendation_id: RecommendationIdPath, body: DecisionRequest, user: User,
                      response: Response) -> DecisionResult:
        with store.begin() as conn:
            result = _decide(conn, user, recommendation_id, body.action, clock(), reason=body.reason,
                             trades=getattr(body, "trades", None), deferred_until=getattr(body, "deferred_until", None))
        response.status_code = 201 if result.created else 200
        return result

    @app.post("/decisions/batch", response_model=BatchResponse, tags=["decisions"], responses={
        **_UNAUTHORISED, **_BAD_BODY, 422: {**_E, "description": f"the document is malformed ({_BAD_JSON}, or not the "
                                                     "schema; nothing was recorded); a decision refused on its merits "
                                                     "is reported in its item"}})
    def post_batch(body: BatchRequest, user: User) -> BatchResponse:
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

    # -----------------------------------------------------------------------------------------
    # One-click links
    # -----------------------------------------------------------------------------------------

    def _read_link(token: str) -> LinkClaims:
        return link_tokens.read_link_token(secret, token, clock())

    def _link_user(conn: Connection, claims: LinkClaims, rec: dict) -> dict:
        row = conn.execute(select(users).where(users.c.user_id == claims.advisor_id)).mappings().first()
        if row is None or not row["active"]:
            now_with = f" it is now with {rec['advisor_id']}" if rec["advisor_id"] != claims.advisor_id else ""
            raise ApiError(403, f"this link was sent to {claims.advisor_id}, who is no longer an active user: it "
                                f"cannot be used any more{';' if now_with else ''}{now_with}")
        user = dict(row)
        if claims.action != "review":
            _check_may_decide(conn, user, rec, claims.action)
        elif not _may_read(conn, user, rec):
            raise ApiError(403, "not one of your recommendations")
        return user

    def _is_used(conn: Connection, link_id: str) -> bool:
        return conn.execute(select(used_links.c.link_id).where(used_links.c.link_id == link_id)).first() is not None

    def _open_link(claims: LinkClaims) -> tuple[dict, dict]:
        """The link's recommendation and advisor, if the link may still be used (else 410/403/404)."""
        with store.begin() as conn:
            if claims.action != "review" and _is_used(conn, claims.link_id):
                raise ApiError(410, "this link has already been used")
            rec = _load(conn, claims.recommendation_id)
            user = _link_user(conn, claims, rec)
        return rec, user

    def _use_link(claims: LinkClaims, body: LinkUse, now: datetime) -> tuple[dict, DecisionResult]:
        """The link's decision, as the link's advisor (via=link), for the JSON route and the
        portal's form alike. The link id is recorded in the decision's transaction: single use."""
        if claims.action == "review":
            raise ApiError(422, "a review link opens the recommendation; it records no decision")
        if body.deferred_until is not None and claims.action != "defer":
            raise ApiError(422, "deferred_until applies to defer links only")
        with store.begin() as conn:
            rec = _load(conn, claims.recommendation_id)
            user = _link_user(conn, claims, rec)
            try:
                with conn.begin_nested():
                    conn.execute(insert(used_links).values(link_id=claims.link_id, used_at=now,
                                                           recommendation_id=claims.recommendation_id,
                                                           action=claims.action))
            except IntegrityError:
                raise ApiError(410, "this link has already been used") from None
            result = _decide(conn, user, claims.recommendation_id, claims.action, now, reason=body.reason,
                             deferred_until=body.deferred_until, via="link")
        return rec, result

    def _why_no_modify(conn: Connection, claims: LinkClaims, user: dict, rec: dict) -> str | None:
        """Why the review link's page offers no quantities form (None: it does). The API's own
        checks: who may decide (_check_may_decide), and the statuses a decision can be recorded on."""
        if _is_used(conn, claims.link_id):
            return "this link has already recorded a modification (each link records one)"
        refused = authority.refusal(conn, user, rec, "modify")
        if refused is not None:
            return (f"the recommendation is already {rec['status'].replace('_', ' ')}" if refused.status == 409
                    else refused.message)
        if not _package(rec).trades:
            return "no trades are proposed"
        return None

    def _link_page(claims: LinkClaims, *, error: str | None = None, values: dict[str, str] | None = None,
                   status: int = 200, errors: list[str] | None = None,
                   wrong_fields: set[str] | None = None) -> Response:
        rec, user = _open_link(claims)
        refused = None
        with store.begin() as conn:
            if claims.action == "review":
                refused = _why_no_modify(conn, claims, user, rec)
            gate_refusal = (lifecycle.last_gate_refusal(conn, claims.recommendation_id)
                            if rec["status"] in lifecycle.OPEN else None)
        return portal.link_page(claims=claims, summary=_summary(rec), package=_package(rec),
                                would=LINK_WOULD[claims.action], advisor_name=user.get("name"), now=clock(),
                                error=error, values=values, status=status, errors=errors, modify_refused=refused,
                                wrong_fields=wrong_fields or set(),
                                gate_refusal=gate_refusal["reason"] if gate_refusal else None)

    def _modify_by_link(claims: LinkClaims, fields: dict[str, str], now: datetime) -> tuple[dict, DecisionResult]:
        """The review page's quantities form: a modify decision as the link's advisor (via=link).
        Each qty_<i> is the package's trade i (account, symbol, side from the package). The link id
        is recorded in the decision's transaction: one modification per review link."""
        body = portal.link_use(fields)
        if body.deferred_until is not None:
            raise ApiError(422, "deferred_until applies to defer links only")
        reason = body.reason if body.reason and body.reason.strip() else None
        with store.begin() as conn:
            rec = _load(conn, claims.recommendation_id)
            user = _link_user(conn, claims, rec)
            _check_may_decide(conn, user, rec, "modify")
            if _is_used(conn, claims.link_id):
                raise ApiError(410, "this link has already been used")
            changes = portal.trade_changes(fields, _package(rec))
            try:
                with conn.begin_nested():
                    conn.execute(insert(used_links).values(link_id=claims.link_id, used_at=now,
                                                           recommendation_id=claims.recommendation_id,
                                                           action=claims.action))
            except IntegrityError:
                raise ApiError(410, "this link has already been used") from None
            result = _decide(conn, user, claims.recommendation_id, "modify", now, reason=reason, trades=changes,
                             via="link")
        return rec, result

    @app.get("/links/{token}", response_model=LinkView, tags=["links"], responses=_LINK_ERRORS)
    def view_link(token: TokenPath, request: Request, response: Response) -> LinkView:
        """What the link would do. Changes nothing: mail scanners prefetch GETs."""
        claims = _read_link(token)
        if portal.wants_html(request.headers.get("accept")):  # a browser: the portal page
            return _link_page(claims)
        rec, _ = _open_link(claims)
        response.headers["Vary"] = "Accept"
        return LinkView(action=claims.action, recommendation_id=claims.recommendation_id,
                        advisor_id=claims.advisor_id, expires_at=claims.expires_at, would=LINK_WOULD[claims.action],
                        needs_reason=claims.action in ("defer", "escalate"), recommendation=_summary(rec),
                        package=_package(rec) if claims.action == "review" else None)

    def _use_link_form(token: str, raw: bytes) -> Response:
        claims = _read_link(token)
        fields: dict[str, str] = {}
        try:
            fields = portal.read_form(raw)
            if claims.action == "review":  # the quantities form
                rec, result = _modify_by_link(claims, fields, clock())
            else:
                if portal.quantity_fields(fields):  # never approve other quantities than proposed
                    raise portal.FormError(422, "quantities can be changed on the review page only; "
                                                "this link decides the trades as proposed")
                rec, result = _use_link(claims, portal.link_use(fields), clock())
        except (portal.FormError, ApiError, DecisionError) as exc:
            if exc.status == 422:  # the form again, with what is wrong
                errors = (exc.errors if isinstance(exc, portal.FormError)
                          else exc.detail.get("errors") if isinstance(exc, ApiError) and isinstance(exc.detail, dict)
                          else None)
                return _link_page(claims, error=exc.message, values=fields, status=422,
                                  errors=[str(e) for e in errors or ()],
                                  wrong_fields=exc.fields if isinstance(exc, portal.FormError) else None)
            if isinstance(exc, portal.FormError):
                raise ApiError(exc.status, exc.message) from None
            raise
        return portal.result_page(claims=claims, summary=_summary(rec), package=_package(rec), result=result)

    async def use_link_form(token: TokenPath, request: Request) -> Response:
        """The portal's form posted back: the same decision as the JSON route, answered with a page."""
        raw = await request.body()
        return await run_in_threadpool(_use_link_form, token, raw)

    # Registered before the JSON route: it claims form posts only (see _FormPostRoute).
    app.router.add_api_route("/links/{token}", use_link_form, methods=["POST"], include_in_schema=False,
                             route_class_override=_FormPostRoute, name="use_link_form")

    @app.post("/links/{token}", response_model=DecisionResult, status_code=201, tags=["links"], responses={
        200: {"model": DecisionResult, "description": "the same decision was already recorded by this advisor"},
        201: {"model": DecisionResult, "description": "decision recorded"}, **_LINK_ERRORS, **_BAD_BODY})
    def use_link(token: TokenPath, response: Response, body: LinkUse | None = None) -> DecisionResult:
        """Perform the link's decision, as the link's advisor (recorded with via=link). Single use:
        the link id is recorded in the decision's transaction; a used link answers 410."""
        _, result = _use_link(_read_link(token), body or LinkUse(), clock())
        response.status_code = 201 if result.created else 200
        return result

    app.add_middleware(_Guard)
    return app


def _methods_for(request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\0"})  # a method no route has: path-only match
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


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


# ---------------------------------------------------------------------------------------------
# Request guard: body size, access log without secrets, last-resort errors
# ---------------------------------------------------------------------------------------------


def _route_of(scope: dict) -> str:
    """The route template (/links/{token}), never the raw path: link tokens live in URLs."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        return template
    path = scope.get("path", "")
    return "/links/{token}" if path.startswith("/links/") else path[:100]


def _log_unhandled(exc: BaseException, method: str, route: str, where: str = "") -> None:
    # Code locations only (file, line, function): an exception's message may carry SQL parameters
    # or client data, so neither it nor any value is logged.
    frames = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                        for f in reversed(traceback.extract_tb(exc.__traceback__)[-8:]))
    log.error("unhandled %s in %s %s %s at %s", type(exc).__name__, method, route, where, frames)


class _Guard:
    """Pure ASGI middleware around the routes (inside Starlette's error middleware): the body
    limit (request_body.py: a declared Content-Length above it is refused unread, a stream is
    counted as it arrives and refused at the limit; both before routing and authentication), a
    request id, the access log without secrets, last-resort errors."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        state = {"status": None, "too_large": False}

        async def _send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if declared_too_large(scope.get("headers", ())):
                state["too_large"], refused = True, too_large()
                response = _error_for(scope, 413, refused.message, refused.body_detail, refused.headers)
                await response(scope, receive, _send)
                return
            await self.app(scope, limited_receive(receive, state), _send)
        except BodyRefused as exc:  # the limit crossed outside FastAPI's handlers (none today)
            if state["status"] is None:
                await _error_for(scope, exc.status_code, exc.message, exc.body_detail, exc.headers)(scope, receive, _send)
        except Exception as exc:
            _log_unhandled(exc, scope.get("method", "?"), _route_of(scope), f"request={request_id}")
            if state["status"] is None:
                message, detail = "internal error; nothing was recorded by this request", {"request_id": request_id}
                try:
                    response = _error_for(scope, 500, message, detail)
                except Exception:  # the error page itself failed: plain JSON
                    response = _error(500, message, detail)
                await response(scope, receive, send)
                state["status"] = 500
        finally:
            log.info("%s %s %s %.0fms request=%s%s", scope.get("method"), _route_of(scope), state["status"],
                     (time.perf_counter() - started) * 1000, request_id,
                     " (body over the limit)" if state["too_large"] else "")


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


class ConfigurationError(SystemExit):
    pass


def link_secret_from_env() -> bytes:
    value = os.environ.get("REBAL_LINK_SECRET", "")
    raw = value.encode("utf-8")
    if len(raw) < link_tokens.MIN_SECRET_BYTES:
        raise ConfigurationError(
            "REBAL_LINK_SECRET must be set to a random secret of at least "
            f"{link_tokens.MIN_SECRET_BYTES} bytes (it signs the one-click approval links), e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`. "
            + ("It is not set." if not value else f"It is only {len(raw)} bytes long.")
            + " The approval API does not start without it.")
    return raw


def build_app_from_env(migrate: bool = True) -> FastAPI:
    secret = link_secret_from_env()
    store = WorkflowStore(settings.workflow_db_url())
    if migrate:
        store.migrate()
    return create_app(store, secret)


def serve(host: str = "127.0.0.1", port: int = 8000, migrate: bool = True) -> None:
    """Run the API with uvicorn: store from REBAL_WORKFLOW_DB_URL (else the embedded SQLite file),
    link secret from REBAL_LINK_SECRET. Uvicorn's access log is off (it would log link tokens);
    the API logs method, route template, status and a request id instead."""
    import uvicorn

    app = build_app_from_env(migrate=migrate)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("approval API on http://%s:%d (store: %s)", host, port, app.state.store.dialect)
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False, proxy_headers=False)
