"""The portal's sign-in: single-use, expiring sign-in links and browser sessions, in the store.

    requested = request_sign_in(conn, email, now)     # None: unknown, inactive, or rate-limited
    user = spend_sign_in(conn, token, now)            # once; SessionError 401 / 410 / 403 otherwise
    session_id, csrf = start_session(conn, user_id, now)
    current = read_session(conn, session_id, now)     # SessionError 401 when it is over
    end_session(conn, session_id, now)                 # sign-out: the row is deleted

The rules:
- A sign-in link is a random token (secrets.token_urlsafe, 256 bits) stored as its SHA-256
  only, for one active user, valid SIGN_IN_TTL, spent by exactly one POST (a conditional update
  on `used_at`: of two concurrent posts one wins, the other is a 410).
- At most MAX_SIGN_IN_LINKS links per user per SIGN_IN_WINDOW: an address asking more often
  gets no more email (the caller answers the same page whatever happens: no user enumeration).
- A session id is random (secrets.token_urlsafe, 256 bits), stored as its SHA-256 only; it ends
  after IDLE_TIMEOUT without a request, after SESSION_LIFETIME in any case, at sign-out (the
  row is deleted), and at once when its user is no longer active or no longer has a role the
  portal serves (checked on every read against wf_users, so a departed user's session stops on
  their next request, whatever the cookie says).
- Each session has its own CSRF token (the hidden field of every form it is served).
Sign-ins, failed sign-in attempts on a genuine link, and sign-outs are audit events (ids only).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit
from rebal_pipeline.workflow.schema import ROLES, portal_sessions, sign_in_links, users

# Defaults; the portal's idle timeout is REBAL_PORTAL_IDLE_MINUTES (approval_api/app.py).
IDLE_TIMEOUT = timedelta(minutes=30)
SESSION_LIFETIME = timedelta(hours=12)
SIGN_IN_TTL = timedelta(minutes=15)
SIGN_IN_WINDOW = timedelta(hours=1)
MAX_SIGN_IN_LINKS = 5
MAX_TOKEN_CHARS = 128
MAX_EMAIL_CHARS = 320


class SessionError(Exception):
    """A sign-in or a session refused; status is the HTTP status (401, 403, 410)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class SignInRequest:
    user: dict
    token: str  # goes into the email only; the store keeps its digest
    link_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Session:
    session_id: str
    user: dict
    csrf_token: str
    expires_at: datetime


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _usable_token(token: str) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS and token.isascii() and token.isprintable()


def normal_email(email: str) -> str:
    return (email or "").strip().lower()


def request_sign_in(conn: Connection, email: str, now: datetime, ttl: timedelta = SIGN_IN_TTL) -> SignInRequest | None:
    """A new sign-in link for the active user with this email address (case-insensitive), or
    None: no such user (or several share the address, which signs nobody in), or they asked for
    MAX_SIGN_IN_LINKS links within SIGN_IN_WINDOW already."""
    now = _utc(now)
    address = normal_email(email)
    if not address or len(address) > MAX_EMAIL_CHARS:
        return None
    found = conn.execute(select(users).where(and_(func.lower(users.c.email) == address, users.c.active,
                                                  users.c.role.in_(ROLES))).limit(2)).mappings().all()
    if len(found) != 1:
        return None
    user = dict(found[0])
    recent = conn.execute(select(func.count()).select_from(sign_in_links).where(and_(
        sign_in_links.c.user_id == user["user_id"], sign_in_links.c.created_at > now - SIGN_IN_WINDOW))).scalar_one()
    if recent >= MAX_SIGN_IN_LINKS:
        # Once per user and hour in the audit trail, however often a stranger keeps asking.
        audit.append(conn, f"sign_in_rate_limited:{user['user_id']}:{now:%Y-%m-%dT%H}", "portal_sign_in_rate_limited",
                     "rebal:portal", now, user["user_id"], {"links_in_window": recent})
        return None
    token, link_id = secrets.token_urlsafe(32), secrets.token_urlsafe(12)
    expires_at = now + ttl
    conn.execute(insert(sign_in_links).values(token_sha256=_sha(token), link_id=link_id, user_id=user["user_id"],
                                              created_at=now, expires_at=expires_at, used_at=None))
    audit.append(conn, f"sign_in_link:{link_id}", "portal_sign_in_link", "rebal:portal", now, user["user_id"],
                 {"link_id": link_id, "expires_at": expires_at})
    return SignInRequest(user=user, token=token, link_id=link_id, expires_at=expires_at)


def _link(conn: Connection, token: str):
    if not _usable_token(token):
        return None
    return conn.execute(select(sign_in_links).where(sign_in_links.c.token_sha256 == _sha(token))).mappings().first()


def check_sign_in(conn: Connection, token: str, now: datetime) -> tuple[dict, datetime]:
    """The user a sign-in link would sign in, and when the link expires (changes nothing: the
    confirm page's GET). Raises SessionError: 401 not a link / expired, 410 used, 403 the user may
    no longer sign in."""
    now = _utc(now)
    row = _link(conn, token)
    if row is None:
        raise SessionError(401, "this sign-in link is not valid; ask for a new one")
    if row["used_at"] is not None:
        raise SessionError(410, "this sign-in link has already been used; ask for a new one")
    if _utc(row["expires_at"]) <= now:
        raise SessionError(401, "this sign-in link has expired; ask for a new one")
    user = conn.execute(select(users).where(users.c.user_id == row["user_id"])).mappings().first()
    if user is None or not user["active"] or user["role"] not in ROLES:
        raise SessionError(403, "this account may no longer sign in to the portal")
    return dict(user), _utc(row["expires_at"])


def spend_sign_in(conn: Connection, token: str, now: datetime) -> dict:
    """Spend a sign-in link (once) and return its user; the errors of check_sign_in."""
    now = _utc(now)
    user, _ = check_sign_in(conn, token, now)
    spent = conn.execute(update(sign_in_links).where(and_(
        sign_in_links.c.token_sha256 == _sha(token), sign_in_links.c.used_at.is_(None))).values(used_at=now))
    if spent.rowcount != 1:
        raise SessionError(410, "this sign-in link has already been used; ask for a new one")
    return user


def start_session(conn: Connection, user_id: str, now: datetime,
                  lifetime: timedelta = SESSION_LIFETIME) -> Session:
    now = _utc(now)
    # Housekeeping on the way: sessions past their lifetime, links a day past their expiry.
    conn.execute(delete(portal_sessions).where(portal_sessions.c.expires_at <= now))
    conn.execute(delete(sign_in_links).where(sign_in_links.c.expires_at <= now - timedelta(days=1)))
    user = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().one()
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    digest = _sha(session_id)
    conn.execute(insert(portal_sessions).values(session_sha256=digest, user_id=user_id, csrf_token=csrf,
                                                created_at=now, last_seen_at=now, expires_at=now + lifetime))
    # The event id names the digest's first characters only: the audit record never holds a credential.
    audit.append(conn, f"portal_sign_in:{user_id}:{digest[:16]}", "portal_signed_in", user_id, now, user_id, {})
    return Session(session_id=session_id, user=dict(user), csrf_token=csrf, expires_at=now + lifetime)


def read_session(conn: Connection, session_id: str | None, now: datetime,
                 idle: timedelta = IDLE_TIMEOUT) -> Session:
    """The live session of this id, its last-seen time moved to now. SessionError(401) when there
    is none (never was, signed out, idle too long, past its lifetime, its user gone); an ended
    session's row is deleted."""
    now = _utc(now)
    if not session_id or not _usable_token(session_id):
        raise SessionError(401, "please sign in")
    digest = _sha(session_id)
    row = conn.execute(select(portal_sessions).where(portal_sessions.c.session_sha256 == digest)).mappings().first()
    if row is None:
        raise SessionError(401, "your session has ended; please sign in again")
    user = conn.execute(select(users).where(users.c.user_id == row["user_id"])).mappings().first()
    problem = None
    if user is None or not user["active"] or user["role"] not in ROLES:
        problem = "your account may no longer use the portal; your session has ended"
    elif _utc(row["expires_at"]) <= now:
        problem = "your session reached its maximum length; please sign in again"
    elif _utc(row["last_seen_at"]) + idle <= now:
        minutes = int(idle.total_seconds() // 60)
        problem = f"your session ended after {minutes} minutes without activity; please sign in again"
    if problem is not None:
        conn.execute(delete(portal_sessions).where(portal_sessions.c.session_sha256 == digest))
        raise SessionError(401, problem)
    conn.execute(update(portal_sessions).where(portal_sessions.c.session_sha256 == digest).values(last_seen_at=now))
    return Session(session_id=session_id, user=dict(user), csrf_token=row["csrf_token"],
                   expires_at=_utc(row["expires_at"]))


def end_session(conn: Connection, session_id: str, now: datetime) -> bool:
    """Sign-out: the session's row is deleted (False: there was none)."""
    now = _utc(now)
    if not _usable_token(session_id):
        return False
    digest = _sha(session_id)
    row = conn.execute(select(portal_sessions.c.user_id).where(portal_sessions.c.session_sha256 == digest)).first()
    if row is None:
        return False
    conn.execute(delete(portal_sessions).where(portal_sessions.c.session_sha256 == digest))
    audit.append(conn, f"portal_sign_out:{row.user_id}:{digest[:16]}", "portal_signed_out", row.user_id, now,
                 row.user_id, {})
    return True
