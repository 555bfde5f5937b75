"""One-click approval links: HMAC-SHA256-signed, expiring, single-use tokens.

Token format (version 1), all ASCII and URL-safe, no padding:

    <payload> "." <signature>

    payload   = base64url(canonical JSON {"a": action, "adv": advisor id, "exp": expiry (Unix seconds),
                                          "lid": link id, "rid": recommendation id, "v": 1})
                (sorted keys, no whitespace)
    signature = base64url(HMAC-SHA256(secret, "rebal-link/v1." + payload))

The signature covers the base64url text exactly as sent, so any change to the recommendation, the
advisor, the action, the expiry or the link id invalidates it; signatures are compared with
`hmac.compare_digest`. Both parts must be canonical base64url (re-encoding gives the same text),
so one link has exactly one spelling.

A link is bound to one recommendation, one advisor (the actor recorded for the decision) and one
action: approve, defer, escalate — or review, which only opens the package and records nothing.
Single use is enforced by the API: the link id goes into `wf_used_links` in the same transaction
as the decision. The secret (REBAL_LINK_SECRET, at least 32 bytes) is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from rebal_pipeline.core.clock import utc as _utc

LINK_ACTIONS = ("approve", "defer", "escalate", "review")
DECISION_LINK_ACTIONS = ("approve", "defer", "escalate")
MIN_SECRET_BYTES = 32
MAX_TOKEN_CHARS = 1024
VERSION = 1

# Recommendation and user ids: what the store and the feed produce (hex digests, ADV-0001, ...).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
LINK_ID_PATTERN = r"^[A-Za-z0-9_\-]{16,64}$"

_CONTEXT = b"rebal-link/v1."
_ID = re.compile(ID_PATTERN)
_LINK_ID = re.compile(LINK_ID_PATTERN)
_B64 = re.compile(r"^[A-Za-z0-9_\-]+$")


class LinkError(Exception):
    """A link the API refuses; status is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class LinkClaims:
    recommendation_id: str
    advisor_id: str
    action: str
    expires_at: datetime
    link_id: str


def check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the link secret must be at least {MIN_SECRET_BYTES} bytes")


def new_link_id() -> str:
    return secrets.token_urlsafe(18)  # 24 characters, 144 random bits


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Strict base64url: alphabet only, and the text must be the canonical encoding of its bytes."""
    if not _B64.match(text):
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64e(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def _sign(secret: bytes, payload_b64: str) -> bytes:
    return hmac.new(bytes(secret), _CONTEXT + payload_b64.encode("ascii"), hashlib.sha256).digest()


def make_link_token(secret: bytes, recommendation_id: str, advisor_id: str, action: str, expires_at: datetime,
                    link_id: str | None = None) -> str:
    """A signed link token (see the module docstring). link_id: unique per link (default: random)."""
    check_secret(secret)
    if action not in LINK_ACTIONS:
        raise ValueError(f"unknown link action {action!r}; one of {', '.join(LINK_ACTIONS)}")
    if not _ID.match(recommendation_id) or not _ID.match(advisor_id):
        raise ValueError("recommendation and advisor ids must match " + ID_PATTERN)
    link_id = link_id or new_link_id()
    if not _LINK_ID.match(link_id):
        raise ValueError("link ids must match " + LINK_ID_PATTERN)
    claims = {"a": action, "adv": advisor_id, "exp": int(_utc(expires_at).timestamp()), "lid": link_id,
              "rid": recommendation_id, "v": VERSION}
    payload = _b64e(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode("ascii"))
    return f"{payload}.{_b64e(_sign(secret, payload))}"


def read_link_token(secret: bytes, token: str, now: datetime) -> LinkClaims:
    """The claims of a genuine, unexpired token; LinkError(401) otherwise. Whether the link was
    already used, and whether its advisor may still act, is the API's business (the store)."""
    check_secret(secret)
    invalid = LinkError(401, "this link is not valid")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise invalid
    payload_b64, signature_b64 = token.split(".")
    try:
        signature = _b64d(signature_b64)
        _b64d(payload_b64)
    except (ValueError, binascii.Error):
        raise invalid from None
    if not hmac.compare_digest(signature, _sign(secret, payload_b64)):
        raise invalid
    # Genuine from here on: a malformed payload is our own bug or an old format, still refused.
    try:
        claims = json.loads(_b64d(payload_b64))
        rid, adv, action, exp, lid = claims["rid"], claims["adv"], claims["a"], claims["exp"], claims["lid"]
        ok = (claims.get("v") == VERSION and isinstance(rid, str) and _ID.match(rid) and isinstance(adv, str)
              and _ID.match(adv) and action in LINK_ACTIONS and isinstance(exp, int) and not isinstance(exp, bool)
              and isinstance(lid, str) and _LINK_ID.match(lid))
        expires_at = datetime.fromtimestamp(exp, timezone.utc) if ok else None
    except (ValueError, KeyError, TypeError, OverflowError, OSError, AttributeError):
        raise invalid from None
    if not ok or expires_at is None:
        raise invalid
    if _utc(now) >= expires_at:
        raise LinkError(401, "this link has expired; use the links of a newer email about this recommendation, or the approval API")
    return LinkClaims(recommendation_id=rid, advisor_id=adv, action=action, expires_at=expires_at, link_id=lid)


def issue_links(secret: bytes, recommendation_id: str, advisor_id: str, now: datetime,
                ttl: timedelta = timedelta(hours=72), actions: tuple[str, ...] = LINK_ACTIONS) -> dict[str, str]:
    """One token per action for an alert email (each with its own link id)."""
    expires_at = _utc(now) + ttl
    return {a: make_link_token(secret, recommendation_id, advisor_id, a, expires_at) for a in actions}
