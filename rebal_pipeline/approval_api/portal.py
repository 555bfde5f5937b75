"""The approval portal: the HTML pages behind the one-click links of the advisor emails.

The link routes (`/links/{token}`) answer a browser with HTML and every other client with JSON:

    GET  + Accept preferring text/html           -> the recommendation and the link's form (changes nothing)
    POST + application/x-www-form-urlencoded    -> the decision (the JSON route's logic), a result page
    any link error, asked for by a browser       -> an HTML error page, same status and message as the JSON

Pages are jinja2 templates (templates/*.html.j2, autoescape on) with inline CSS only and no
external resource; every page carries a Content-Security-Policy that allows nothing else, and
`Cache-Control: no-store` / `Referrer-Policy: no-referrer` because the link token is in the URL.
The recommendation is shown with the alert email's own view model (`comms.emails`), so the page and
the email show the same numbers, with account numbers masked the same way (••••1234).

Dates of the defer form are New York days (the firm's market calendar): "defer until 25 Nov"
means until the start of 25 Nov, New York time.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Mapping
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from starlette.responses import HTMLResponse

from rebal_pipeline.approval_api.links import LinkClaims
from rebal_pipeline.approval_api.models import MAX_DEFERRAL, MAX_REASON, DecisionResult, LinkUse, RecommendationSummary
from rebal_pipeline.comms import emails
from rebal_pipeline.workflow.lifecycle import LifecyclePolicy
from rebal_pipeline.workflow.package import RecommendationPackage

NEW_YORK = ZoneInfo("America/New_York")
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 20

SECURITY_HEADERS = {
    # Nothing but the page itself and its inline styles; forms post back to this origin only.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    # The link token is in the URL: keep it out of caches, history-independent stores and referrers.
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # The same URL answers JSON or HTML.
    "Vary": "Accept",
}

_ENV = Environment(
    loader=PackageLoader("rebal_pipeline.approval_api", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# ---------------------------------------------------------------------------------------------
# Content negotiation
# ---------------------------------------------------------------------------------------------


def _media_ranges(accept: str) -> list[tuple[str, str, float]]:
    ranges = []
    for item in accept.split(",")[:64]:
        media, *params = item.split(";")
        kind, _, sub = media.strip().lower().partition("/")
        if not kind or not sub:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        ranges.append((kind, sub, q))
    return ranges


def _quality(ranges: list[tuple[str, str, float]], media_type: str) -> tuple[float, int]:
    """(q, specificity) of the most specific range matching media_type (RFC 9110 §12.5.1);
    specificity 2 = exact, 1 = type/*, 0 = */*, -1 = not acceptable at all."""
    kind, _, sub = media_type.partition("/")
    best: tuple[int, float] = (-1, 0.0)
    for r_kind, r_sub, q in ranges:
        if (r_kind, r_sub) == (kind, sub):
            spec = 2
        elif r_kind == kind and r_sub == "*":
            spec = 1
        elif (r_kind, r_sub) == ("*", "*"):
            spec = 0
        else:
            continue
        if spec > best[0]:
            best = (spec, q)
    return best[1], best[0]


def wants_html(accept: str | None) -> bool:
    """Whether an Accept header prefers HTML to JSON: what browsers send (`text/html,…,*/*;q=0.8`).
    HTML must be named (text/html, application/xhtml+xml or text/*): `*/*` alone, no header, or a
    tie with JSON keeps the API's JSON."""
    if not accept:
        return False
    ranges = _media_ranges(accept)
    html = max(_quality(ranges, "text/html"), _quality(ranges, "application/xhtml+xml"))
    json = _quality(ranges, "application/json")
    return html[1] >= 1 and html[0] > 0 and html > json


def is_form(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == FORM_TYPE


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def is_form_post(scope: Mapping[str, Any]) -> bool:
    return scope.get("method") == "POST" and is_form(_header(scope, b"content-type"))


def is_link_path(scope: Mapping[str, Any]) -> bool:
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "") or "")
    if root and path.startswith(root):  # served under a prefix (a proxy's root_path)
        path = path[len(root):]
    return path.startswith("/links/")


def html_for(scope: Mapping[str, Any]) -> bool:
    """Whether an answer on this request (an error included) is a page: a link URL opened by a
    browser, or the portal's form posted back."""
    return is_link_path(scope) and (wants_html(_header(scope, b"accept")) or is_form_post(scope))


# ---------------------------------------------------------------------------------------------
# The form
# ---------------------------------------------------------------------------------------------


class FormError(Exception):
    """A form that cannot be taken: 400 when it cannot be read at all, 422 when a field is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FIELD_LABELS = {"reason": "Reason", "deferred_until": "Defer until"}


def read_form(raw: bytes) -> dict[str, str]:
    """The fields of an urlencoded body (first value of each; unknown fields are ignored)."""
    try:
        parsed = parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False, encoding="utf-8",
                          errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "the form could not be read (not UTF-8 form data)") from None
    return {name: values[0] for name, values in parsed.items() if name in _FIELD_LABELS and values}


def defer_bounds(now: datetime) -> tuple[date, date]:
    """The first and last day the defer form offers (New York days): tomorrow .. a year ahead."""
    local = now.astimezone(NEW_YORK)
    return local.date() + timedelta(days=1), (now + MAX_DEFERRAL).astimezone(NEW_YORK).date()


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=NEW_YORK)


def link_use(fields: Mapping[str, str]) -> LinkUse:
    """The form's fields as the JSON route's body. A date (YYYY-MM-DD) becomes the start of that
    day in New York; an empty field is no value. Field errors raise FormError(422)."""
    body: dict[str, Any] = {}
    reason = fields.get("reason", "")
    if reason != "":
        body["reason"] = reason.replace("\r\n", "\n")
    until = fields.get("deferred_until", "").strip()
    if until:
        try:
            if not _DAY.match(until):
                raise ValueError
            body["deferred_until"] = start_of_day(date.fromisoformat(until)).isoformat()
        except ValueError:
            raise FormError(422, "Defer until: not a date (use the date picker, or YYYY-MM-DD)") from None
    try:
        return LinkUse.model_validate(body)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            label = _FIELD_LABELS.get(str(error["loc"][0]) if error["loc"] else "", "Form")
            if error["type"] == "string_too_long":
                problems.append(f"{label}: at most {MAX_REASON} characters")
            elif error["type"] == "string_pattern_mismatch":
                problems.append(f"{label}: contains a character that cannot be stored")
            else:
                problems.append(f"{label}: {error['msg']}")
        raise FormError(422, "; ".join(problems)) from None


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


def local_moment(moment: datetime | str | None) -> str:
    """25 Nov 2026 00:00 EST: what the advisor reads (New York time)."""
    if moment is None or moment == "":
        return "\u2014"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    local = moment.astimezone(NEW_YORK)
    return f"{emails.day(local.date())} {local:%H:%M} {local.tzname()}"


def sentence(text: str) -> str:
    """An API message as a sentence: first letter up (the rest as it is: ids keep their case), a full stop."""
    text = str(text).strip()
    if not text:
        return text
    return text[0].upper() + text[1:] + ("" if text[-1] in ".!?" else ".")


_ENV.filters.update(money=emails.money, day=emails.day, moment=local_moment, sentence=sentence)

_TITLES = {
    "approve": "Approve these trades?",
    "defer": "Defer this recommendation",
    "escalate": "Escalate to compliance",
    "review": "Review the recommendation",
}

_ERROR_TITLES = {
    400: "The form could not be read",
    401: "This link cannot be used",
    403: "This link is not yours to use",
    404: "Not found",
    405: "Not possible on this page",
    409: "A decision is already recorded",
    410: "This link has already been used",
    413: "Too much data",
    422: "The request is not valid",
    503: "Please try again shortly",
}


def _page(template: str, http_status: int, headers: Mapping[str, str] | None = None, /,
          **context: Any) -> HTMLResponse:
    body = _ENV.get_template(template).render(**context)
    return HTMLResponse(body, status_code=http_status, headers={**SECURITY_HEADERS, **(headers or {})})


def _recommendation(summary: RecommendationSummary, package: RecommendationPackage) -> dict:
    view = emails._package_view(package, client_name="", account_numbers=None)
    return {
        **view,
        "summary": summary,
        "household_id": package.household_id,
        "status": summary.status.replace("_", " "),
        "trade_value": emails.money(summary.trade_value),
        "deferred_until": local_moment(summary.deferred_until) if summary.deferred_until else None,
        "decided": summary.status not in ("pending", "deferred", "escalated"),
    }


def _for_people(message: str) -> str:
    """An API message about the form in the form's words (the API names its JSON fields)."""
    return message.replace("deferred_until", "the defer-until day")


def link_page(*, claims: LinkClaims, summary: RecommendationSummary, package: RecommendationPackage, would: str,
              advisor_name: str | None, now: datetime, error: str | None = None,
              values: Mapping[str, str] | None = None, status: int = 200) -> HTMLResponse:
    """The link's page: the recommendation and, for a decision link, the form posting it back."""
    first, last = defer_bounds(now)
    return _page(
        "link.html.j2", status,
        action=claims.action, title=_TITLES[claims.action], would=would, expires_at=local_moment(claims.expires_at),
        advisor_name=advisor_name, rec=_recommendation(summary, package),
        error=_for_people(error) if error else None, values=dict(values or {}),
        defer_min=first.isoformat(), defer_max=last.isoformat(), max_reason=MAX_REASON,
        default_defer_days=LifecyclePolicy().default_defer_days,
    )


def result_page(*, claims: LinkClaims, summary: RecommendationSummary, package: RecommendationPackage,
                result: DecisionResult) -> HTMLResponse:
    """What the form recorded: 201 when recorded now, 200 when it was already recorded."""
    decision = result.decision
    return _page(
        "result.html.j2", 201 if result.created else 200,
        action=decision.action, created=result.created, status=result.recommendation_status.replace("_", " "),
        decision=decision, decided_at=local_moment(decision.created_at),
        deferred_until=local_moment(decision.payload.get("deferred_until")),
        rec=_recommendation(summary, package), recommendation_id=claims.recommendation_id,
    )


def error_page(status: int, message: str, headers: Mapping[str, str] | None = None,
               reference: str | None = None) -> HTMLResponse:
    """A link error for a browser: the JSON's status and message, and what to do next."""
    title = _ERROR_TITLES.get(status, "Something went wrong" if status >= 500 else "This request cannot be completed")
    return _page("error.html.j2", status, headers, status=status, title=title, message=message,
                 reference=reference)
