"""The one-click links from alert emails, /links/{token}: GET shows what the link would do (a
portal page for a browser), POST performs it (JSON), and the portal's form posts back to the same
URL. A link carries its own signed, expiring, single-use authorisation (links.py), so these routes
take no API token; the link's advisor must still be allowed to act (workflow/authority.py)."""
from __future__ import annotations

from datetime import datetime
from typing import Callable

from fastapi import APIRouter, Response
from fastapi.routing import APIRoute
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Match

from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.approval_api import portal
from rebal_pipeline.approval_api.deciding import _check_may_decide, _decide
from rebal_pipeline.approval_api.dependencies import TokenPath
from rebal_pipeline.approval_api.errors import _BAD_BODY, _LINK_ERRORS, ApiError
from rebal_pipeline.approval_api.links import LinkClaims
from rebal_pipeline.approval_api.models import DecisionResult, LinkUse, LinkView
from rebal_pipeline.approval_api.records import _load, _may_read, _package, _summary
from rebal_pipeline.approval_api.routers import api_router
from rebal_pipeline.workflow import authority, lifecycle
from rebal_pipeline.workflow.lifecycle import DecisionError
from rebal_pipeline.workflow.schema import used_links, users
from rebal_pipeline.workflow.store import WorkflowStore

# What each link's page says it would do.
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


class _Links:
    """What the /links routes do with a link: read and check it, open its recommendation, spend
    it inside the decision's transaction, and render its page. Verifies links with the app's
    secret and clock."""

    def __init__(self, store: WorkflowStore, secret: bytes, clock: Callable[[], datetime]):
        self.store, self.secret, self.clock = store, secret, clock

    def read(self, token: str) -> LinkClaims:
        return link_tokens.read_link_token(self.secret, token, self.clock())

    def user_of(self, conn: Connection, claims: LinkClaims, rec: dict) -> dict:
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

    def is_used(self, conn: Connection, link_id: str) -> bool:
        return conn.execute(select(used_links.c.link_id).where(used_links.c.link_id == link_id)).first() is not None

    def open(self, claims: LinkClaims) -> tuple[dict, dict]:
        """The link's recommendation and advisor, if the link may still be used (else 410/403/404)."""
        with self.store.begin() as conn:
            if claims.action != "review" and self.is_used(conn, claims.link_id):
                raise ApiError(410, "this link has already been used")
            rec = _load(conn, claims.recommendation_id)
            user = self.user_of(conn, claims, rec)
        return rec, user

    def record_use(self, conn: Connection, claims: LinkClaims, now: datetime) -> None:
        """Spend the link inside the decision's transaction: the store's unique link id makes a
        second use (a double click, a replay) a 410, never a second decision."""
        try:
            with conn.begin_nested():
                conn.execute(insert(used_links).values(link_id=claims.link_id, used_at=now,
                                                       recommendation_id=claims.recommendation_id,
                                                       action=claims.action))
        except IntegrityError:
            raise ApiError(410, "this link has already been used") from None

    def use(self, claims: LinkClaims, body: LinkUse, now: datetime) -> tuple[dict, DecisionResult]:
        """The link's decision, as the link's advisor (via=link), for the JSON route and the
        portal's form alike. The link id is recorded in the decision's transaction: single use."""
        if claims.action == "review":
            raise ApiError(422, "a review link opens the recommendation; it records no decision")
        if body.deferred_until is not None and claims.action != "defer":
            raise ApiError(422, "deferred_until applies to defer links only")
        with self.store.begin() as conn:
            rec = _load(conn, claims.recommendation_id)
            user = self.user_of(conn, claims, rec)
            self.record_use(conn, claims, now)
            result = _decide(conn, user, claims.recommendation_id, claims.action, now, reason=body.reason,
                             deferred_until=body.deferred_until, via="link")
        return rec, result

    def why_no_modify(self, conn: Connection, claims: LinkClaims, user: dict, rec: dict) -> str | None:
        """Why the review link's page offers no quantities form (None: it does). The API's own
        checks: who may decide (_check_may_decide), and the statuses a decision can be recorded on."""
        if self.is_used(conn, claims.link_id):
            return "this link has already recorded a modification (each link records one)"
        refused = authority.refusal(conn, user, rec, "modify")
        if refused is not None:
            return (f"the recommendation is already {rec['status'].replace('_', ' ')}" if refused.status == 409
                    else refused.message)
        if not _package(rec).trades:
            return "no trades are proposed"
        return None

    def page(self, claims: LinkClaims, *, error: str | None = None, values: dict[str, str] | None = None,
                   status: int = 200, errors: list[str] | None = None,
                   wrong_fields: set[str] | None = None) -> Response:
        rec, user = self.open(claims)
        refused = None
        with self.store.begin() as conn:
            if claims.action == "review":
                refused = self.why_no_modify(conn, claims, user, rec)
            gate_refusal = (lifecycle.last_gate_refusal(conn, claims.recommendation_id)
                            if rec["status"] in lifecycle.OPEN else None)
        return portal.link_page(claims=claims, summary=_summary(rec), package=_package(rec),
                                would=LINK_WOULD[claims.action], advisor_name=user.get("name"), now=self.clock(),
                                error=error, values=values, status=status, errors=errors, modify_refused=refused,
                                wrong_fields=wrong_fields or set(),
                                gate_refusal=gate_refusal["reason"] if gate_refusal else None)

    def modify(self, claims: LinkClaims, fields: dict[str, str], now: datetime) -> tuple[dict, DecisionResult]:
        """The review page's quantities form: a modify decision as the link's advisor (via=link).
        Each qty_<i> is the package's trade i (account, symbol, side from the package). The link id
        is recorded in the decision's transaction: one modification per review link."""
        body = portal.link_use(fields)
        if body.deferred_until is not None:
            raise ApiError(422, "deferred_until applies to defer links only")
        reason = body.reason if body.reason and body.reason.strip() else None
        with self.store.begin() as conn:
            rec = _load(conn, claims.recommendation_id)
            user = self.user_of(conn, claims, rec)
            _check_may_decide(conn, user, rec, "modify")
            if self.is_used(conn, claims.link_id):
                raise ApiError(410, "this link has already been used")
            changes = portal.trade_changes(fields, _package(rec))
            self.record_use(conn, claims, now)
            result = _decide(conn, user, claims.recommendation_id, "modify", now, reason=reason, trades=changes,
                             via="link")
        return rec, result

    def use_form(self, token: str, raw: bytes) -> Response:
        claims = self.read(token)
        fields: dict[str, str] = {}
        try:
            fields = portal.read_form(raw)
            if claims.action == "review":  # the quantities form
                rec, result = self.modify(claims, fields, self.clock())
            else:
                if portal.quantity_fields(fields):  # never approve other quantities than proposed
                    raise portal.FormError(422, "quantities can be changed on the review page only; "
                                                "this link decides the trades as proposed")
                rec, result = self.use(claims, portal.link_use(fields), self.clock())
        except (portal.FormError, ApiError, DecisionError) as exc:
            if exc.status == 422:  # the form again, with what is wrong
                errors = (exc.errors if isinstance(exc, portal.FormError)
                          else exc.detail.get("errors") if isinstance(exc, ApiError) and isinstance(exc.detail, dict)
                          else None)
                return self.page(claims, error=exc.message, values=fields, status=422,
                                  errors=[str(e) for e in errors or ()],
                                  wrong_fields=exc.fields if isinstance(exc, portal.FormError) else None)
            if isinstance(exc, portal.FormError):
                raise ApiError(exc.status, exc.message) from None
            raise
        return portal.result_page(claims=claims, summary=_summary(rec), package=_package(rec), result=result)


def links_router(store: WorkflowStore, secret: bytes, clock: Callable[[], datetime]) -> APIRouter:
    """GET, form POST and JSON POST /links/{token}, in that order (the form route claims form
    posts only; everything else reaches the documented JSON route). The routes verify links with
    the app's secret and clock."""
    router = api_router()
    links = _Links(store, secret, clock)

    @router.get("/links/{token}", response_model=LinkView, tags=["links"], responses=_LINK_ERRORS)
    def view_link(token: TokenPath, request: Request, response: Response) -> LinkView:
        """What the link would do. Changes nothing: mail scanners prefetch GETs."""
        claims = links.read(token)
        if portal.wants_html(request.headers.get("accept")):  # a browser: the portal page
            return links.page(claims)
        rec, _ = links.open(claims)
        response.headers["Vary"] = "Accept"
        return LinkView(action=claims.action, recommendation_id=claims.recommendation_id,
                        advisor_id=claims.advisor_id, expires_at=claims.expires_at, would=LINK_WOULD[claims.action],
                        needs_reason=claims.action in ("defer", "escalate"), recommendation=_summary(rec),
                        package=_package(rec) if claims.action == "review" else None)

    async def use_link_form(token: TokenPath, request: Request) -> Response:
        """The portal's form posted back: the same decision as the JSON route, answered with a page."""
        raw = await request.body()
        return await run_in_threadpool(links.use_form, token, raw)

    # Registered before the JSON route: it claims form posts only (see _FormPostRoute).
    router.add_api_route("/links/{token}", use_link_form, methods=["POST"], include_in_schema=False,
                         route_class_override=_FormPostRoute, name="use_link_form")

    @router.post("/links/{token}", response_model=DecisionResult, status_code=201, tags=["links"], responses={
        200: {"model": DecisionResult, "description": "the same decision was already recorded by this advisor"},
        201: {"model": DecisionResult, "description": "decision recorded"}, **_LINK_ERRORS, **_BAD_BODY})
    def use_link(token: TokenPath, response: Response, body: LinkUse | None = None) -> DecisionResult:
        """Perform the link's decision, as the link's advisor (recorded with via=link). Single use:
        the link id is recorded in the decision's transaction; a used link answers 410."""
        _, result = links.use(links.read(token), body or LinkUse(), links.clock())
        response.status_code = 201 if result.created else 200
        return result

    return router
