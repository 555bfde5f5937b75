"""The review portal (issue 16): the review queue in the browser, under /portal.

    GET  /portal/sign-in                  the email form
    POST /portal/sign-in                  a sign-in link is emailed (the same answer for any address)
    GET  /portal/sign-in/{token}          "Sign in as …?" (changes nothing: mail scanners prefetch)
    POST /portal/sign-in/{token}          spends the link, sets the session cookie, → the queue
    POST /portal/sign-out                 ends the session
    GET  /portal/queue                    my queue: filters, sorting, the batch form; with
                                          ?batch=mev-YYYYMMDD one market-event batch and its header
    POST /portal/batch                    approve or defer the selected rows, one result per row
                                          (?batch=…: the rows were picked from that batch's queue)
    GET  /portal/recommendations/{id}     the package with the decision forms and its history
    POST /portal/recommendations/{id}/decision
    GET  /portal/compliance               escalations and compliance reviews, with history
    GET  /portal/operations               feed status per connection, alerts, undelivered messages

Server-rendered (jinja2, autoescape), no script, no external resource, the link pages' CSP
(portal.SECURITY_HEADERS). Every page but the sign-in ones needs a session (dependencies.
portal_session); every form posts the session's CSRF token (dependencies.portal_form). What a
person is shown and may do is authority.py's rule, and every decision goes through
deciding._decide (lifecycle.decide): the same gate, audit chain and 409s as the API. Routes are
left out of the OpenAPI document (they are pages, not the API).
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from rebal_pipeline.approval_api import portal, review_queue, signin
from rebal_pipeline.approval_api.deciding import _check_may_decide, _decide
from rebal_pipeline.approval_api.dependencies import PortalForm, PortalSession, Store, require_role
from rebal_pipeline.approval_api.errors import ApiError, _log_unhandled
from rebal_pipeline.approval_api.links import ID_PATTERN
from rebal_pipeline.approval_api.models import MAX_BATCH, MAX_REASON
from rebal_pipeline.approval_api.records import _load, _package, _summary
from rebal_pipeline.workflow import authority, lifecycle, sessions
from rebal_pipeline.workflow.lifecycle import DecisionError, LifecyclePolicy
from rebal_pipeline.workflow.schema import recommendations

log = logging.getLogger("rebal.approval_api")

RecommendationId = Path(pattern=ID_PATTERN, min_length=1, max_length=64)
SignInToken = Path(min_length=1, max_length=sessions.MAX_TOKEN_CHARS)

_ACTION_WORDS = {"approve": "Approved", "modify": "Modified", "defer": "Deferred", "escalate": "Escalated to compliance",
                 "return_to_advisor": "Returned to the advisor"}
_ACTION_MESSAGES = {
    "approve": "Approved — the trades go to the approval gate, which re-checks today's positions before any ticket "
               "is prepared.",
    "modify": "Modified — the changed trades go to the approval gate, which re-checks today's positions before any "
              "ticket is prepared.",
    "defer": "Deferred. No trade is made; the recommendation comes back for a new decision on the day it is "
             "deferred to.",
    "escalate": "Escalated to compliance. No trade is made until compliance decides.",
    "return_to_advisor": "Returned to the advisor, who decides it again.",
}
_OUTCOMES = {200: "already recorded", 201: "recorded", 403: "not yours to decide", 404: "not found",
             409: "already decided", 410: "gone", 422: "not valid", 503: "try again", 500: "not recorded"}
PORTAL_ACTIONS = ("approve", "modify", "defer", "escalate", "return_to_advisor")


def policy_of(request: Request) -> LifecyclePolicy:
    """The lifecycle policy in force (the 48h rule's hours): create_app's, else lifecycle_policy()."""
    state = request.app.state
    if getattr(state, "lifecycle_policy", None) is None:
        try:
            state.lifecycle_policy = lifecycle.lifecycle_policy()
        except Exception as exc:  # noqa: BLE001 — a page must not fail on it; the default hours are shown
            log.warning("lifecycle policy not readable (%s); the portal shows the default hours", type(exc).__name__)
            state.lifecycle_policy = LifecyclePolicy()
    return state.lifecycle_policy


def _common(request: Request, session: sessions.Session | None, section: str = "") -> dict:
    settings = request.app.state.portal
    return {"me": session.user if session else None, "csrf": session.csrf_token if session else "",
            "section": section, "idle_minutes": settings.idle_minutes}


def page(request: Request, template: str, status: int = 200, session: sessions.Session | None = None,
         section: str = "", **context) -> Response:
    return portal._page(f"portal/{template}", status, None, **{**_common(request, session, section), **context})


def sign_in_page(request: Request, status: int = 200, *, notice: str | None = None, error: str | None = None,
                 email: str = "") -> Response:
    """The email form (also the answer to a request whose session is over: 401 with why)."""
    cookies: dict[str, str] = {}
    form_csrf = signin.sign_in_csrf(request, cookies, request.app.state.portal_secret)
    settings = request.app.state.portal
    response = page(request, "sign_in.html.j2", status, form_csrf=form_csrf, notice=notice, error=error,
                    email=email, ttl_minutes=int(settings.sign_in_ttl.total_seconds() // 60))
    for value in cookies.values():
        signin.set_sign_in_cookie(response, request, settings, value)
    if status == 401:
        signin.clear_session_cookie(response, request, settings)
    return response


def portal_router() -> APIRouter:
    """The review queue's pages: sign-in and sign-out, the queue and the batch, one
    recommendation, compliance and operations (one function per group below)."""
    router = APIRouter(include_in_schema=False)
    for add_routes in (_sign_in_routes, _queue_routes, _recommendation_routes, _oversight_routes):
        add_routes(router)
    return router


def _sign_in_routes(router: APIRouter) -> None:
    """Sign-in by an emailed single-use link, and sign-out."""

    @router.get("/portal")
    def portal_home() -> Response:
        return RedirectResponse("/portal/queue", status_code=303)

    @router.get("/portal/sign-in")
    def sign_in_form(request: Request) -> Response:
        return sign_in_page(request)

    @router.post("/portal/sign-in")
    async def ask_sign_in(request: Request, store: Store) -> Response:
        fields = signin.read_fields(await request.body(), request.headers.get("content-type"))
        signin.check_sign_in_csrf(request, fields, request.app.state.portal_secret)
        email = signin.first(fields, "email").strip()
        if not email or len(email) > sessions.MAX_EMAIL_CHARS or "@" not in email or not email.isprintable() \
                or any(c.isspace() for c in email):
            return sign_in_page(request, 422, error="enter your email address, e.g. dana@example-ria.com",
                                email=email[:320])
        settings, now = request.app.state.portal, request.app.state.clock()
        requested = await run_in_threadpool(_request_link, store, settings, email, now)
        response = page(request, "sign_in_sent.html.j2", email=email,
                        ttl_minutes=int(settings.sign_in_ttl.total_seconds() // 60))
        if requested is not None:
            # Sent after the answer has gone out: how long the relay takes does not tell a stranger
            # whether the address is a user's.
            response.background = BackgroundTask(signin.send_sign_in_email, store, settings, requested, now)
        return response

    def _request_link(store, settings: signin.PortalSettings, email: str, now) -> sessions.SignInRequest | None:
        if not settings.can_send():
            log.error("portal sign-in asked for, but the portal has no public URL or SMTP relay configured")
            return None
        with store.begin() as conn:
            return sessions.request_sign_in(conn, email, now, settings.sign_in_ttl)

    @router.get("/portal/sign-in/{token}")
    def confirm_sign_in(request: Request, store: Store, token: str = SignInToken) -> Response:
        with store.begin() as conn:
            try:
                user, expires = sessions.check_sign_in(conn, token, request.app.state.clock())
            except sessions.SessionError as exc:
                raise ApiError(exc.status, exc.message) from None
        cookies: dict[str, str] = {}
        form_csrf = signin.sign_in_csrf(request, cookies, request.app.state.portal_secret)
        response = page(request, "sign_in_confirm.html.j2", form_csrf=form_csrf, name=user["name"],
                        role=user["role"], expires_at=portal.local_moment(expires))
        for value in cookies.values():
            signin.set_sign_in_cookie(response, request, request.app.state.portal, value)
        return response

    @router.post("/portal/sign-in/{token}")
    async def sign_in(request: Request, store: Store, token: str = SignInToken) -> Response:
        fields = signin.read_fields(await request.body(), request.headers.get("content-type"))
        signin.check_sign_in_csrf(request, fields, request.app.state.portal_secret)
        settings, now = request.app.state.portal, request.app.state.clock()

        def spend():
            with store.begin() as conn:
                user = sessions.spend_sign_in(conn, token, now)
                return sessions.start_session(conn, user["user_id"], now, settings.session_lifetime)

        try:
            session = await run_in_threadpool(spend)
        except sessions.SessionError as exc:
            raise ApiError(exc.status, exc.message) from None
        response = RedirectResponse("/portal/queue", status_code=303)
        signin.set_session_cookie(response, request, settings, session.session_id)
        response.delete_cookie(signin.SIGN_IN_COOKIE, path=signin.COOKIE_PATH)
        log.info("portal sign-in user=%s", session.user["user_id"])
        return response

    @router.post("/portal/sign-out")
    def sign_out(request: Request, session: PortalSession, fields: PortalForm, store: Store) -> Response:
        with store.begin() as conn:
            sessions.end_session(conn, session.session_id, request.app.state.clock())
        response = page(request, "signed_out.html.j2")
        signin.clear_session_cookie(response, request, request.app.state.portal)
        return response


def _queue_routes(router: APIRouter) -> None:
    """My queue, and approving or deferring many rows in one review session."""

    @router.get("/portal/queue")
    def my_queue(request: Request, session: PortalSession, store: Store) -> Response:
        user = session.user
        params = {}
        for name, value in request.query_params.multi_items():
            params.setdefault(name, value)
        default_status = "escalated" if user["role"] == "compliance" else "open"
        try:
            filters = review_queue.read_filters(params, default_status)
        except review_queue.QueryError as exc:
            raise ApiError(422, str(exc)) from None
        now, policy = request.app.state.clock(), policy_of(request)
        with store.begin() as conn:
            data = review_queue.queue(conn, user, filters, now, policy)
            # A batch-filtered queue has the batch's header; the whole queue, the recent batches.
            market_batch = review_queue.batch_header(conn, user, filters.batch, now) if filters.batch else None
            market_batches = [] if filters.batch else review_queue.recent_market_batches(conn, user, now)
        first_day, last_day = portal.defer_bounds(now)
        heading = {"advisor": "My queue", "compliance": "Queue", "operations": "All recommendations",
                   "trading_desk": "All recommendations"}.get(user["role"], "Queue")
        intro = ("Open recommendations of your clients and your team's." if user["role"] == "advisor" else
                 "Every recommendation you may read (decide escalated ones from Compliance)."
                 if user["role"] == "compliance" else "Every recommendation (read only: your role decides nothing).")
        if market_batch:
            heading = f"Market event of {market_batch['day']}"
            intro = ("Your clients' and your team's recommendations from this market event's re-scan."
                     if user["role"] == "advisor" else "The recommendations from this market event's re-scan.")
        choices = [("open", "Open (pending, deferred, escalated)")] + [
            (s, s.replace("_", " ").capitalize()) for s in review_queue.STATUS_CHOICES[1:]]
        return page(request, "queue.html.j2", session=session, section="queue", wide=True, heading=heading,
                    intro=intro, data=data, filters=filters, status_choices=choices,
                    filtered=bool(filters.tier or filters.kind or filters.household or filters.batch
                                  or filters.status != default_status),
                    market_batch=market_batch, market_batches=market_batches,
                    batch_action="/portal/batch?" + urlencode({"batch": filters.batch}) if filters.batch
                    else "/portal/batch",
                    batch=user["role"] in ("advisor", "compliance") and any(r["may_decide"] for r in data["rows"]),
                    may_defer=user["role"] == "advisor", max_reason=MAX_REASON,
                    default_defer_days=policy.default_defer_days, defer_min=first_day.isoformat(),
                    defer_max=last_day.isoformat(),
                    prev_url="/portal/queue?" + urlencode(filters.query(page=str(filters.page - 1))),
                    next_url="/portal/queue?" + urlencode(filters.query(page=str(filters.page + 1))))

    @router.post("/portal/batch")
    def batch(request: Request, session: PortalSession, fields: PortalForm, store: Store) -> Response:
        # Rows picked from a market-event batch's queue: the result page leads back to it. The
        # form's fields stay those of the whole queue (the batch is in the form's address).
        from_batch = request.query_params.get("batch", "")
        if from_batch and not review_queue.is_batch_id(from_batch):
            raise ApiError(422, "batch: not a market-event batch id (mev- and the trading day's eight digits, "
                                "e.g. mev-20261120)")
        action = signin.first(fields, "action")
        if action not in ("approve", "defer"):
            raise ApiError(422, "a review session approves or defers the selected rows (action approve or defer)")
        picked = list(dict.fromkeys(fields.get("rid", [])))
        if not picked:
            raise ApiError(422, "no row was selected: tick the rows to decide, then press the button")
        if len(picked) > MAX_BATCH:
            raise ApiError(422, f"at most {MAX_BATCH} rows per review session")
        reason, until = None, None
        if action == "defer":
            use = _reason_and_day(fields)
            reason, until = use.reason, use.deferred_until
            if not (reason and reason.strip()):
                raise ApiError(422, "a reason is required to defer: write it in the field next to Defer selected")
        user, results = session.user, []
        for rid in picked:
            results.append(_batch_row(request, store, user, rid, action, reason, until))
        counts: dict[str, int] = {}
        for r in results:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        market_batch = None
        if from_batch:
            with store.begin() as conn:
                market_batch = review_queue.batch_header(conn, user, from_batch, request.app.state.clock())
        return page(request, "batch_result.html.j2", session=session, section="queue", wide=True,
                    action_label="approve" if action == "approve" else "defer", results=results,
                    market_batch=market_batch,
                    summary=sorted(counts.items(), key=lambda kv: (kv[0] not in ("recorded", "already recorded"),
                                                                   kv[0])))

    def _batch_row(request, store, user, rid, action, reason, until) -> dict:
        row = {"recommendation_id": rid, "household": None, "accounts": None, "status": None, "link": False}
        code, message = 500, "internal error on this row; it was not recorded"
        try:
            if not review_queue._ID.match(rid):
                raise ApiError(422, "not a recommendation id")
            with store.begin() as conn:
                result = _decide(conn, user, rid, action, request.app.state.clock(), reason=reason,
                                 deferred_until=until, via="portal")
            code = 201 if result.created else 200
            message = _ACTION_MESSAGES[action] if result.created else "you had already recorded this decision"
        except (ApiError, DecisionError) as exc:
            code, message = exc.status, exc.message
        except OperationalError as exc:
            log.error("workflow store unavailable (%s) on a portal batch row", type(exc.orig).__name__)
            code, message = 503, "the workflow store is unavailable; try this row again"
        except Exception as exc:  # noqa: BLE001 — this row only: the session goes on
            _log_unhandled(exc, "POST", "/portal/batch", "row")
        # What the person may see of the row afterwards (never another advisor's client).
        try:
            with store.begin() as conn:
                rec = conn.execute(select(recommendations).where(
                    recommendations.c.recommendation_id == rid)).mappings().first() if review_queue._ID.match(rid) \
                    else None
                if rec is not None and authority.may_read(conn, user, dict(rec)):
                    view = review_queue.row_view(dict(rec), request.app.state.clock(), policy_of(request))
                    row.update(household=view["household"], accounts=view["accounts"], status=rec["status"],
                               link=True)
        except Exception as exc:  # noqa: BLE001
            _log_unhandled(exc, "POST", "/portal/batch", "row view")
        row.update(code=code, ok=code in (200, 201), outcome=_OUTCOMES.get(code, "refused"),
                   message=message)
        return row


def _recommendation_routes(router: APIRouter) -> None:
    """One recommendation's page and its decision form."""

    def _recommendation_page(request: Request, session: sessions.Session, store, rid: str, *, status: int = 200,
                             error: str | None = None, errors: list[str] | None = None,
                             values: dict | None = None) -> Response:
        user, now = session.user, request.app.state.clock()
        with store.begin() as conn:
            rec = _load(conn, rid)
            if not authority.may_read(conn, user, rec):
                raise ApiError(403, "not one of your recommendations")
            forms = [a for a in PORTAL_ACTIONS if authority.refusal(conn, user, rec, a) is None]
            why_not = None
            if not forms and user["role"] in authority.READ_ONLY_ROLES:
                why_not = f"your role ({user['role'].replace('_', ' ')}) reads recommendations and decides none"
            elif not forms:
                refusals = [authority.refusal(conn, user, rec, a) for a in ("approve", "escalate")]
                conflict = next((r for r in refusals if r is not None and r.status == 409), None)
                why_not = (f"the recommendation is {rec['status'].replace('_', ' ')}: nothing can be decided on it now"
                           if conflict else refusals[0].message if refusals[0] else "nothing to decide")
            trail = review_queue.history(conn, [rid])[rid]
            gate = lifecycle.last_gate_refusal(conn, rid) if rec["status"] in lifecycle.OPEN else None
        package = _package(rec)
        if not package.trades:
            forms = [f for f in forms if f != "modify"]
        mask = portal._masking(package)
        clock, tone = review_queue.escalation_clock(rec, now, policy_of(request))
        first_day, last_day = portal.defer_bounds(now)
        policy = policy_of(request)
        return page(request, "recommendation.html.j2", status, session=session, section="queue",
                    rec=portal._recommendation(_summary(rec), package), rid=rid, advisor_id=rec["advisor_id"],
                    forms=forms, why_not=why_not, history=review_queue.mask_history(trail, package), clock=clock, clock_tone=tone,
                    error=mask(portal._for_people(error)) if error else None, errors=[mask(e) for e in errors or ()],
                    values=values or {}, max_reason=MAX_REASON, default_defer_days=policy.default_defer_days,
                    defer_min=first_day.isoformat(), defer_max=last_day.isoformat(),
                    quantity_rows=portal._quantity_rows(package, {}, set())
                    if "modify" in forms and len(package.trades) <= portal.MAX_MODIFY_ROWS else [],
                    gate_refusal=mask(gate["reason"]) if gate else None)

    @router.get("/portal/recommendations/{recommendation_id}")
    def recommendation(request: Request, session: PortalSession, store: Store,
                       recommendation_id: str = RecommendationId) -> Response:
        return _recommendation_page(request, session, store, recommendation_id)

    @router.post("/portal/recommendations/{recommendation_id}/decision")
    def decide(request: Request, session: PortalSession, fields: PortalForm, store: Store,
               recommendation_id: str = RecommendationId) -> Response:
        action = signin.first(fields, "action")
        if action not in PORTAL_ACTIONS:
            raise ApiError(422, f"unknown decision; one of {', '.join(PORTAL_ACTIONS)}")
        user, now = session.user, request.app.state.clock()
        try:
            use = _reason_and_day(fields)
            with store.begin() as conn:
                rec = _load(conn, recommendation_id)
                trades = None
                if action == "modify":
                    _check_may_decide(conn, user, rec, "modify")  # who first: no package errors to a stranger
                    single = {k: v[0] for k, v in fields.items() if k.startswith(portal.QTY_PREFIX) and v}
                    trades = portal.trade_changes(single, _package(rec))
                reason = use.reason if use.reason and use.reason.strip() else None
                result = _decide(conn, user, recommendation_id, action, now, reason=reason, trades=trades,
                                 deferred_until=use.deferred_until if action == "defer" else None, via="portal")
        except portal.FormError as exc:
            return _recommendation_page(request, session, store, recommendation_id, status=exc.status,
                                        error=exc.message, errors=exc.errors, values={"modify_open": action == "modify"})
        except (ApiError, DecisionError) as exc:
            if exc.status == 404:
                raise
            detail = getattr(exc, "detail", None)
            errors = detail.get("errors") if isinstance(detail, dict) else None
            return _recommendation_page(request, session, store, recommendation_id, status=exc.status,
                                        error=exc.message, errors=errors)
        decision = result.decision
        with store.begin() as conn:
            rec = _load(conn, recommendation_id)
        heading = _ACTION_WORDS[action]
        if action == "defer" and decision.payload.get("deferred_until"):
            heading = f"Deferred until {portal.local_moment(decision.payload['deferred_until'])}"
        return page(request, "decided.html.j2", 201 if result.created else 200, session=session, section="queue",
                    heading=heading, message=_ACTION_MESSAGES[action], created=result.created, rid=recommendation_id,
                    scope_label=portal._recommendation(_summary(rec), _package(rec))["scope_label"],
                    rec_status=result.recommendation_status, decided_at=portal.local_moment(decision.created_at),
                    actor=decision.actor_id, reason=decision.reason)


def _oversight_routes(router: APIRouter) -> None:
    """The compliance and operations views."""

    @router.get("/portal/compliance")
    def compliance(request: Request, session: PortalSession, store: Store) -> Response:
        require_role(session, "compliance")
        policy = policy_of(request)
        with store.begin() as conn:
            data = review_queue.compliance_items(conn, request.app.state.clock(), policy)
        return page(request, "compliance.html.j2", session=session, section="compliance", wide=True, data=data,
                    escalation_hours=f"{policy.escalation_hours:g}")

    @router.get("/portal/operations")
    def operations(request: Request, session: PortalSession, store: Store) -> Response:
        require_role(session, "operations")
        with store.begin() as conn:
            data = review_queue.operations_view(conn)
        return page(request, "operations.html.j2", session=session, section="operations", wide=True, data=data)


def _reason_and_day(fields: dict[str, list[str]]):
    """reason and deferred_until of a portal form, checked as the link forms check them (FormError 422)."""
    single = {name: fields[name][0] for name in ("reason", "deferred_until") if fields.get(name)}
    return portal.link_use(single)

