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

Under /portal the same app serves the review portal (routers/portal_pages.py, left out of the
OpenAPI document): sign-in by an emailed single-use link, a session cookie, the review queue, the
package page, batch review sessions, the compliance and operations views. Its decisions go through
the same `_decide` (via=portal); its settings are `signin.PortalSettings` (`portal_settings`).
"""

import hashlib
import hmac
import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Callable

from fastapi import FastAPI

from rebal_pipeline import settings
from rebal_pipeline.approval_api import links as link_tokens
from rebal_pipeline.approval_api.errors import (
    AsciiJSONResponse, _error, _error_for, _log_unhandled, _route_of, install_error_handlers,
)
from rebal_pipeline.approval_api.request_body import (
    BodyRefused, StrictJSONRoute, declared_too_large, limited_receive, too_large,
)
from rebal_pipeline.approval_api.routers import decisions, health, links, portal_pages, recommendations
from rebal_pipeline.approval_api.signin import PortalSettings
from rebal_pipeline.core.clock import utc_now as utcnow
from rebal_pipeline.workflow.lifecycle import LifecyclePolicy
from rebal_pipeline.workflow.store import WorkflowStore

log = logging.getLogger("rebal.approval_api")

def create_app(store: WorkflowStore, link_secret: bytes, clock: Callable[[], datetime] = utcnow,
               link_ttl: timedelta = timedelta(hours=72), portal_settings: PortalSettings | None = None,
               policy: LifecyclePolicy | None = None) -> FastAPI:
    """The approval API over a (migrated) workflow store. link_secret signs one-click links;
    link_ttl is how long the links this app issues (`app.state.issue_links`) stay valid.
    portal_settings: the review portal's (signin.PortalSettings: public URL, SMTP relay, idle
    timeout; `app.state.portal`); policy: the lifecycle policy the portal's escalation clock
    shows (default: lifecycle_policy(), read when first needed)."""
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
    app.state.portal = portal_settings or PortalSettings()
    app.state.lifecycle_policy = policy
    # The portal's sign-in forms are bound to their cookie with a key of its own, derived from the
    # link secret (the secret itself is not kept on the app).
    app.state.portal_secret = hmac.new(secret, b"rebal-portal-sign-in", hashlib.sha256).digest()
    app.state.issue_links = lambda recommendation_id, advisor_id, actions=link_tokens.LINK_ACTIONS: (
        link_tokens.issue_links(secret, recommendation_id, advisor_id, clock(), link_ttl, tuple(actions)))

    install_error_handlers(app)
    # The routes, in the route table's order (routers/__init__.py).
    app.include_router(health.router)
    app.include_router(recommendations.router)
    app.include_router(decisions.router)
    app.include_router(links.links_router(store, secret, clock))
    app.include_router(portal_pages.portal_router())
    app.add_middleware(_Guard)
    return app


# ---------------------------------------------------------------------------------------------
# Request guard: body size, access log without secrets, last-resort errors
# ---------------------------------------------------------------------------------------------


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


def link_secret_from_env(rebal_settings: settings.RebalSettings | None = None) -> bytes:
    """REBAL_LINK_SECRET (RebalSettings.link_secret, the one home of that rule); without a usable
    one the API does not start."""
    try:
        return (rebal_settings or settings.current()).link_secret()
    except settings.SettingsError as exc:
        raise ConfigurationError(f"{exc} The approval API does not start without it.") from None


def build_app_from_env(migrate: bool = True, rebal_settings: settings.RebalSettings | None = None) -> FastAPI:
    rebal_settings = rebal_settings or settings.current()
    secret = link_secret_from_env(rebal_settings)
    store = WorkflowStore(rebal_settings.workflow_db_url())
    if migrate:
        store.migrate()
    return create_app(store, secret, portal_settings=portal_settings_from(rebal_settings))


def portal_settings_from(rebal_settings: settings.RebalSettings) -> PortalSettings:
    """The review portal's settings: the SMTP relay of REBAL_SMTP_* (sign-in emails), the URL the
    sign-in links point to (REBAL_PUBLIC_URL, the API as advisors reach it: no sign-in email
    without it) and the idle timeout (REBAL_PORTAL_IDLE_MINUTES, default 30)."""
    from rebal_pipeline.comms.smtp import SmtpConfigError, SmtpSettings

    try:
        relay = SmtpSettings.from_settings(rebal_settings)
    except SmtpConfigError:
        relay = None
    found = PortalSettings(public_url=rebal_settings.public_url or None, smtp=relay)
    found.idle_timeout = timedelta(minutes=rebal_settings.portal_idle_minutes)
    if not found.can_send():
        log.warning("the review portal cannot email sign-in links (needs a public URL and REBAL_SMTP_*)")
    return found


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
