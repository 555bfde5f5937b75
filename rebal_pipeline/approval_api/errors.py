"""Errors as the client reads them: `{"error": ..., "detail": ...}` JSON (non-ASCII escaped),
or for a browser on a link URL a portal page with the same status and message; anything under
/portal (the review portal) is always a page, and a request there without a live session is the
sign-in page (401, saying why). install_error_handlers
maps every exception the routes raise (ApiError, DecisionError, LinkError, BodyRefused, validation,
Starlette HTTP errors, an unreachable store) to that form; the route template, never the raw path
(link tokens live in URLs), is what gets logged."""
from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match

from rebal_pipeline.approval_api import portal
from rebal_pipeline.approval_api.links import LinkError
from rebal_pipeline.approval_api.models import ErrorBody
from rebal_pipeline.approval_api.request_body import MAX_BODY_BYTES, BodyRefused
from rebal_pipeline.approval_api.signin import PortalFormError, PortalSettings
from rebal_pipeline.workflow.lifecycle import DecisionError
from rebal_pipeline.workflow.sessions import SessionError

log = logging.getLogger("rebal.approval_api")


# The documented errors (OpenAPI `responses`) the routes share.
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
    if portal.is_portal_path(scope):
        reference = detail.get("request_id") if isinstance(detail, dict) else None
        settings = getattr(getattr(scope.get("app"), "state", None), "portal", None) or PortalSettings()
        return portal.portal_error_page(status, message, headers, reference=reference,
                                        idle_minutes=settings.idle_minutes)
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


def _route_of(scope: dict) -> str:
    """The route template (/links/{token}), never the raw path: link and sign-in tokens live in URLs."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        return template
    path = scope.get("path", "")
    if path.startswith("/portal/sign-in/"):  # sign-in tokens live in URLs too
        return "/portal/sign-in/{token}"
    return "/links/{token}" if path.startswith("/links/") else path[:100]


def _log_unhandled(exc: BaseException, method: str, route: str, where: str = "") -> None:
    # Code locations only (file, line, function): an exception's message may carry SQL parameters
    # or client data, so neither it nor any value is logged.
    frames = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                        for f in reversed(traceback.extract_tb(exc.__traceback__)[-8:]))
    log.error("unhandled %s in %s %s %s at %s", type(exc).__name__, method, route, where, frames)


def _methods_for(request: Request) -> list[str]:
    """Every method some route on the request's path answers. FastAPI 0.165's include_router adds
    one lazy entry per router (its routes under original_router.routes) instead of copying the
    routes, so look inside such entries as well as at plain routes."""
    methods: set[str] = set()
    probe = {**request.scope, "method": "\0"}  # a method no route has: path-only match

    def visit(routes) -> None:
        for route in routes:
            inner = getattr(getattr(route, "original_router", None), "routes", None)
            if inner is not None:
                visit(inner)
                continue
            match, _ = route.matches(probe)
            if match != Match.NONE and getattr(route, "methods", None):
                methods.update(route.methods)

    visit(request.app.router.routes)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the API answers, in the client's form (see the module docstring)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_for(request.scope, exc.status, exc.message, exc.detail, exc.headers)

    @app.exception_handler(DecisionError)
    async def _decision_error(request: Request, exc: DecisionError):
        return _error_for(request.scope, exc.status, exc.message)

    @app.exception_handler(LinkError)
    async def _link_error(request: Request, exc: LinkError):
        return _error_for(request.scope, exc.status, exc.message)

    @app.exception_handler(SessionError)
    async def _session_over(request: Request, exc: SessionError):
        # The review portal without a live session: the sign-in page, saying why (401).
        from rebal_pipeline.approval_api.routers.portal_pages import sign_in_page

        if not portal.is_portal_path(request.scope):
            return _error_for(request.scope, exc.status, exc.message)
        return sign_in_page(request, 401, notice=exc.message)

    @app.exception_handler(PortalFormError)
    async def _portal_form(request: Request, exc: PortalFormError):
        return _error_for(request.scope, exc.status, exc.message)

    @app.exception_handler(portal.FormError)
    async def _form_error(request: Request, exc: portal.FormError):
        message = exc.message if not exc.errors or len(exc.errors) == 1 and exc.errors[0] == exc.message \
            else f"{exc.message}: {'; '.join(exc.errors)}"
        return _error_for(request.scope, exc.status, message)

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
