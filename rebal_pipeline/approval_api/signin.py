"""The review portal's sign-in machinery: its settings, cookies, forms and the sign-in email.

The rules of links and sessions are the store's (workflow/sessions.py); this module is the HTTP
side of them:
- `PortalSettings`: where sign-in links point (`public_url`; never the request's Host header,
  which a stranger could set to their own site and have a genuine link mailed there), the SMTP
  relay, the idle timeout, the session's lifetime, the link's lifetime.
- Cookies: the session cookie `rebal_session` (HttpOnly, SameSite=Strict, Path=/portal, Secure
  when the request came over https or the settings say so). Before sign-in the two sign-in forms
  carry a CSRF token bound to a random pre-session cookie `rebal_signin` (HMAC with the app's
  secret), so nobody can post a sign-in of their own into someone else's browser.
- Forms: urlencoded bodies read strictly (UTF-8, at most MAX_FIELDS fields); every form of a
  session carries the session's CSRF token in the hidden field `csrf` (checked in one
  dependency, dependencies.portal_form).
- `send_sign_in_email`: through comms/outbound.deliver under the key `sign_in:<link id>`. A
  sign-in email that could not be sent is withdrawn, not retried later (the person asks again;
  a late link would be expired anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from rebal_pipeline.comms import emails, outbound, smtp
from rebal_pipeline.workflow import sessions
from rebal_pipeline.workflow.store import WorkflowStore

log = logging.getLogger("rebal.approval_api")

SESSION_COOKIE = "rebal_session"
SIGN_IN_COOKIE = "rebal_signin"
COOKIE_PATH = "/portal"
CSRF_FIELD = "csrf"
MAX_FIELDS = 450  # the batch form: up to 200 selected rows and the queue's other fields
_PRE_CONTEXT = b"rebal-portal-sign-in-csrf/v1."


class PortalFormError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class PortalSettings:
    """The portal's settings (the app holds one; tests set public_url once the server runs)."""

    public_url: str | None = None  # e.g. https://rebal.example-ria.com: the sign-in links' origin
    smtp: smtp.SmtpSettings | None = None
    idle_timeout: timedelta = sessions.IDLE_TIMEOUT
    session_lifetime: timedelta = sessions.SESSION_LIFETIME
    sign_in_ttl: timedelta = sessions.SIGN_IN_TTL
    secure_cookies: bool | None = None  # None: Secure when the request came over https

    def can_send(self) -> bool:
        return bool(self.public_url and self.smtp)

    @property
    def idle_minutes(self) -> int:
        """The idle timeout as every portal page's footer states it."""
        return int(self.idle_timeout.total_seconds() // 60)


# ---------------------------------------------------------------------------------------------
# Cookies
# ---------------------------------------------------------------------------------------------


def _secure(request: Request, settings: PortalSettings) -> bool:
    return settings.secure_cookies if settings.secure_cookies is not None else request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, settings: PortalSettings, session_id: str) -> None:
    response.set_cookie(SESSION_COOKIE, session_id, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request, settings))


def clear_session_cookie(response: Response, request: Request, settings: PortalSettings) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_secure(request, settings))


def sign_in_csrf(request: Request, response_cookies: dict[str, str], secret: bytes) -> str:
    """The CSRF token of a sign-in form: bound to the pre-session cookie (made now when absent;
    the caller sets what lands in response_cookies)."""
    pre = request.cookies.get(SIGN_IN_COOKIE)
    if not pre or len(pre) > 64 or not pre.isascii():
        pre = secrets.token_urlsafe(24)
        response_cookies[SIGN_IN_COOKIE] = pre
    return hmac.new(secret, _PRE_CONTEXT + pre.encode("ascii"), hashlib.sha256).hexdigest()


def set_sign_in_cookie(response: Response, request: Request, settings: PortalSettings, value: str) -> None:
    response.set_cookie(SIGN_IN_COOKIE, value, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request, settings))


def check_sign_in_csrf(request: Request, fields: dict[str, list[str]], secret: bytes) -> None:
    pre = request.cookies.get(SIGN_IN_COOKIE)
    sent = (fields.get(CSRF_FIELD) or [""])[0]
    if not pre or len(pre) > 64 or not pre.isascii():
        raise PortalFormError(403, "this browser sent no sign-in cookie: allow cookies for this site, reload the "
                                   "page and try again")
    wanted = hmac.new(secret, _PRE_CONTEXT + pre.encode("ascii"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), wanted.encode("ascii")):
        raise PortalFormError(403, "the form's security token is missing or out of date (CSRF check): reload the "
                                   "page and try again")


def check_session_csrf(fields: dict[str, list[str]], csrf_token: str) -> None:
    sent = (fields.get(CSRF_FIELD) or [""])[0]
    if not sent or not hmac.compare_digest(sent.encode("utf-8", "replace"), csrf_token.encode("ascii")):
        raise PortalFormError(403, "the form's security token is missing or out of date (CSRF check): reload the "
                                   "page and try again; nothing was recorded")


# ---------------------------------------------------------------------------------------------
# Forms
# ---------------------------------------------------------------------------------------------


def read_fields(raw: bytes, content_type: str | None) -> dict[str, list[str]]:
    """An urlencoded body as name -> values (in order). 400 when it is not one, or cannot be read;
    an empty body is an empty form (its CSRF check then refuses it)."""
    if not raw:
        return {}
    if (content_type or "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise PortalFormError(400, "the portal takes its forms as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False, encoding="utf-8",
                          errors="strict", max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise PortalFormError(400, "the form could not be read (not UTF-8 form data, or too many fields)") from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        if "\x00" in value:
            raise PortalFormError(422, "the form contains a character that cannot be stored")
        fields.setdefault(name, []).append(value)
    return fields


def first(fields: dict[str, list[str]], name: str) -> str:
    return (fields.get(name) or [""])[0]


# ---------------------------------------------------------------------------------------------
# The sign-in email
# ---------------------------------------------------------------------------------------------


def sign_in_url(settings: PortalSettings, token: str) -> str:
    base = (settings.public_url or "").rstrip("/")
    return f"{base}/portal/sign-in/{token}"


def check_public_url(url: str) -> None:
    parts = urlsplit(url)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if not (parts.scheme == "https" or (parts.scheme == "http" and local)) or not parts.netloc:
        raise ValueError("the portal's public URL must be an https URL (http only for a local server)")


def send_sign_in_email(store: WorkflowStore, settings: PortalSettings, requested: sessions.SignInRequest,
                       now: datetime) -> outbound.Delivery:
    """Email the link (key sign_in:<link id>); a failed send is withdrawn (see the module docstring)."""
    relay = settings.smtp
    assert relay is not None and settings.public_url
    key = f"sign_in:{requested.link_id}"

    def build(message_id: str):
        return emails.sign_in(link=sign_in_url(settings, requested.token), expires_at=requested.expires_at,
                              sender=relay.sender, to=requested.user["email"], message_id=message_id,
                              recipient_name=requested.user.get("name"))

    def send(message_key: str) -> str:
        message_id = smtp.make_message_id(message_key, outbound.sender_domain(relay))
        return smtp.send(build(message_id), relay)

    done = outbound.deliver(store.begin, key, "sign_in", "smtp", send, now, recipient_id=requested.user["user_id"])
    if done.status not in ("sent", "already_sent"):
        with store.begin() as conn:
            outbound.withdraw(conn, key, "a sign-in link is not sent late; the person asks for a new one", now)
        log.warning("sign-in email %s not sent (%s)", key, done.status)
    return done
