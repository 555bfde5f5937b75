"""What the routes depend on, resolved per request from the app that create_app built
(app.state): the workflow store, the clock, and the caller — `current_user`, the one place an API
token is checked; `portal_session`, the one place a review-portal session cookie is; both admitted
by `admit`, the one role check — and `portal_form`, the portal's one CSRF check of every form.
The path aliases carry the documented patterns and limits of a recommendation id and a link token."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Callable

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.approval_api import signin
from rebal_pipeline.approval_api.errors import ApiError
from rebal_pipeline.approval_api.links import ID_PATTERN
from rebal_pipeline.workflow import lifecycle, sessions
from rebal_pipeline.workflow.schema import ROLES
from rebal_pipeline.workflow.store import WorkflowStore

log = logging.getLogger("rebal.approval_api")

MAX_API_TOKEN_CHARS = 512

bearer = HTTPBearer(auto_error=False, scheme_name="api_token",
                    description="A user's API token (issued by operations; stored as a SHA-256 digest)")


def get_store(request: Request) -> WorkflowStore:
    return request.app.state.store


def get_clock(request: Request) -> Callable[[], datetime]:
    return request.app.state.clock


Store = Annotated[WorkflowStore, Depends(get_store)]


def current_user(store: Store,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict:
    """The caller's user row, from `Authorization: Bearer <API token>`; 401 without a known
    token, 403 for a role the approval API does not serve."""
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
    admit(user)
    return user


def admit(user: dict) -> None:
    """The one role check of the API and the portal: 403 for a role the approval API does not serve."""
    if user["role"] not in ROLES:
        raise ApiError(403, "your role may not use the approval API")


# ---------------------------------------------------------------------------------------------
# The review portal (routers/portal_pages.py): a session cookie instead of an API token
# ---------------------------------------------------------------------------------------------


def portal_session(request: Request, store: Store) -> sessions.Session:
    """The signed-in person of a portal request: the session cookie's live session (workflow/
    sessions.py: idle timeout, lifetime, an inactive user's session refused at once), admitted
    by the same role check as an API token. SessionError(401) sends the browser to sign in."""
    settings = request.app.state.portal
    cookie = request.cookies.get(signin.SESSION_COOKIE)
    with store.begin() as conn:
        try:
            session, refused = sessions.read_session(conn, cookie, get_clock(request)(), settings.idle_timeout), None
        except sessions.SessionError as exc:  # committed: an ended session's row is deleted
            session, refused = None, exc
    if refused is not None:
        raise refused
    admit(session.user)
    return session


PortalSession = Annotated[sessions.Session, Depends(portal_session)]


def require_role(session: sessions.Session, *roles: str) -> None:
    """A portal page for some roles only (the compliance view, the operations view): 403 for the rest."""
    if session.user["role"] not in roles:
        raise ApiError(403, f"this page is for {' and '.join(roles)} only")


async def portal_form(request: Request, session: PortalSession) -> dict[str, list[str]]:
    """The posted form of a signed-in person, after the one CSRF check of the portal: the hidden
    field `csrf` must be this session's token (403 otherwise, nothing recorded)."""
    fields = signin.read_fields(await request.body(), request.headers.get("content-type"))
    signin.check_session_csrf(fields, session.csrf_token)
    return fields


PortalForm = Annotated[dict, Depends(portal_form)]


User = Annotated[dict, Depends(current_user)]
RecommendationIdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=64,
                                            description="recommendation id")]
TokenPath = Annotated[str, Path(min_length=1, max_length=link_tokens.MAX_TOKEN_CHARS,
                                description="the signed link token from the email")]
