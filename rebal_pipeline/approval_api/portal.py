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

The review link's page can also change the proposed quantities (when its advisor may decide the
recommendation): one number field per proposed trade, named by the trade's index in the package
(`qty_0`, `qty_1`, ...). The server maps each index back to the package's own trade (account,
symbol, side), so a form cannot name any other account or security; the quantities are then a
`modify` decision, re-validated like the API's.
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
from rebal_pipeline.approval_api.models import (
    MAX_DEFERRAL, MAX_REASON, DecisionResult, LinkUse, Modification, RecommendationSummary,
)
from rebal_pipeline.comms import emails
from rebal_pipeline.comms.chart import class_label
from rebal_pipeline.core.pii import mask_account
from rebal_pipeline.workflow.lifecycle import LifecyclePolicy
from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage, TradeChange

NEW_YORK = ZoneInfo("America/New_York")
FORM_TYPE = "application/x-www-form-urlencoded"
# The review page offers its quantities form for packages of up to this many trades (one field each).
MAX_MODIFY_ROWS = 200
MAX_FORM_FIELDS = MAX_MODIFY_ROWS + 20
MAX_QUANTITY = 1e10  # TradeChange's bound

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


def is_portal_path(scope: Mapping[str, Any]) -> bool:
    """The review portal's pages (routers/portal_pages.py): /portal and below."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "") or "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/portal" or path.startswith("/portal/")


def html_for(scope: Mapping[str, Any]) -> bool:
    """Whether an answer on this request (an error included) is a page: a link URL opened by a
    browser, or the portal's form posted back; anything under /portal (the review portal)."""
    if is_portal_path(scope):
        return True
    return is_link_path(scope) and (wants_html(_header(scope, b"accept")) or is_form_post(scope))


# ---------------------------------------------------------------------------------------------
# The form
# ---------------------------------------------------------------------------------------------


class FormError(Exception):
    """A form that cannot be taken: 400 when it cannot be read at all, 422 when a field is wrong
    (errors: each problem, when there are several; fields: the names of the wrong fields)."""

    def __init__(self, status: int, message: str, errors: list[str] | None = None,
                 fields: set[str] | frozenset[str] = frozenset()):
        super().__init__(message)
        self.status, self.message, self.errors, self.fields = status, message, list(errors or ()), set(fields)


_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FIELD_LABELS = {"reason": "Reason", "deferred_until": "Defer until"}
QTY_PREFIX = "qty_"
_QTY_FIELD = re.compile(r"^qty_(0|[1-9][0-9]{0,5})$")
# A non-negative decimal (what a number field sends): 12, 12.5, .5, 1e3; no sign, no thousands separator.
_QUANTITY = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?$")


def read_form(raw: bytes) -> dict[str, str]:
    """The fields of an urlencoded body (first value of each): reason, deferred_until and the
    review page's quantities (qty_<row>); other fields are ignored."""
    try:
        parsed = parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False, encoding="utf-8",
                          errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "the form could not be read (not UTF-8 form data)") from None
    return {name: values[0] for name, values in parsed.items()
            if (name in _FIELD_LABELS or name.startswith(QTY_PREFIX)) and values}


def quantity_fields(fields: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in fields.items() if name.startswith(QTY_PREFIX)}


def _trade_label(trade: PackageTrade, masked: Mapping[str, str]) -> str:
    account = masked.get(trade.account_id, mask_account(trade.account_id))
    return f"{trade.side.capitalize()} {trade.symbol} ({account})"


def trade_changes(fields: Mapping[str, str], package: RecommendationPackage) -> list[TradeChange]:
    """The review form's quantities as a modification: qty_<i> is the package's trade i (its
    account, symbol and side come from the package, never from the form). An unknown row, a value
    that is not a non-negative number, or no quantity at all raise FormError(422)."""
    masked = emails._accounts(package, None)
    problems: list[str] = []
    wrong: set[str] = set()
    changes: list[tuple[int, TradeChange]] = []
    for name, value in quantity_fields(fields).items():
        match = _QTY_FIELD.match(name)
        index = int(match[1]) if match else -1
        if not 0 <= index < len(package.trades):
            shown = name if len(name) <= 24 else name[:24] + "\u2026"
            problems.append(f"field {shown}: not a trade of this recommendation (the form's rows only)")
            continue
        trade = package.trades[index]
        label = _trade_label(trade, masked)
        text = value.strip()
        quantity = float(text) if _QUANTITY.match(text) else None
        if quantity is None:
            wrong.add(name)
            if text.startswith("-") and _QUANTITY.match(text[1:]):
                problems.append(f"{label}: the quantity cannot be negative (0 drops the trade)")
            elif not text:
                problems.append(f"{label}: enter a quantity (0 drops the trade)")
            else:
                problems.append(f"{label}: not a number (use digits and a decimal point, e.g. 12.5)")
            continue
        if quantity > MAX_QUANTITY:
            wrong.add(name)
            problems.append(f"{label}: the quantity is too large")
            continue
        changes.append((index, TradeChange(account_id=trade.account_id, symbol=trade.symbol, side=trade.side,
                                           quantity=quantity)))
    if problems:
        raise FormError(422, "some quantities cannot be taken", problems, wrong)
    if not changes:
        raise FormError(422, "no quantities were sent: change them in the form, then press Record these quantities")
    return [change for _, change in sorted(changes, key=lambda item: item[0])]


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


def _masking(package: RecommendationPackage):
    """A function masking the package's account ids in a message (the API's messages name them)."""
    masked = emails._accounts(package, None)
    if not masked:
        return lambda text: text
    pattern = re.compile(r"(?<![A-Za-z0-9._-])(" + "|".join(
        re.escape(a) for a in sorted(masked, key=len, reverse=True)) + r")(?![A-Za-z0-9._-])")
    return lambda text: pattern.sub(lambda m: masked[m[1]], str(text))


_SIDE_ORDER = {"sell": 0, "buy": 1}


def _plain_quantity(value: float) -> str:
    """A quantity as a number field takes it: 1200, 12.5 (no thousands separator)."""
    text = f"{float(value):.10f}".rstrip("0").rstrip(".")
    return text or "0"


def _quantity_rows(package: RecommendationPackage, values: Mapping[str, str], wrong: set[str]) -> list[dict]:
    """The review form's rows, in the trades table's order; each named by its trade's package index."""
    masked = emails._accounts(package, None)
    ordered = sorted(enumerate(package.trades), key=lambda it: (it[1].account_id, _SIDE_ORDER[it[1].side],
                                                                it[1].symbol))
    rows = []
    for index, t in ordered:
        name = f"{QTY_PREFIX}{index}"
        rows.append({
            "name": name, "account": masked.get(t.account_id, mask_account(t.account_id)),
            "side": t.side.capitalize(), "symbol": t.symbol, "price": emails.money(t.est_price),
            "proposed": emails.quantity(t.quantity), "value": values.get(name, _plain_quantity(t.quantity)),
            "invalid": name in wrong, "label": _trade_label(t, masked),
        })
    return rows


def link_page(*, claims: LinkClaims, summary: RecommendationSummary, package: RecommendationPackage, would: str,
              advisor_name: str | None, now: datetime, error: str | None = None,
              values: Mapping[str, str] | None = None, status: int = 200, errors: list[str] | None = None,
              modify_refused: str | None = None, wrong_fields: set[str] | frozenset[str] = frozenset(),
              gate_refusal: str | None = None) -> HTMLResponse:
    """The link's page: the recommendation and, for a decision link, the form posting it back.
    A review link's page offers the quantities form unless modify_refused says why it cannot
    (one line); errors lists the problems of a refused form (account ids masked)."""
    first, last = defer_bounds(now)
    values = dict(values or {})
    mask = _masking(package)
    may_modify = claims.action == "review" and modify_refused is None
    if claims.action == "review" and may_modify and len(package.trades) > MAX_MODIFY_ROWS:
        may_modify, modify_refused = False, (f"this recommendation has {len(package.trades)} trades, more than this "
                                             f"page can change ({MAX_MODIFY_ROWS}); modify it in the approval API")
    return _page(
        "link.html.j2", status,
        action=claims.action, title=_TITLES[claims.action], would=would, expires_at=local_moment(claims.expires_at),
        advisor_name=advisor_name, rec=_recommendation(summary, package),
        error=mask(_for_people(error)) if error else None, errors=[mask(e) for e in errors or ()], values=values,
        defer_min=first.isoformat(), defer_max=last.isoformat(), max_reason=MAX_REASON,
        default_defer_days=LifecyclePolicy().default_defer_days,
        may_modify=may_modify, modify_refused=mask(modify_refused) if modify_refused else None,
        quantity_rows=_quantity_rows(package, values, set(wrong_fields)) if may_modify else [],
        # Issue 12: why the approval gate refused the last approval (the recommendation is back).
        gate_refusal=mask(gate_refusal) if gate_refusal else None,
    )


def _modification_view(modification: Modification, package: RecommendationPackage) -> dict:
    """The recorded trades next to the proposed ones (a dropped trade shows as 0), and the bands after."""
    masked = emails._accounts(package, None)
    recorded = {(t.account_id, t.symbol, t.side): t for t in modification.trades}
    proposed = {(t.account_id, t.symbol, t.side): t for t in package.trades}
    rows = []
    for key in sorted(proposed.keys() | recorded.keys(), key=lambda k: (k[0], _SIDE_ORDER.get(k[2], 2), k[1])):
        base, now = proposed.get(key), recorded.get(key)
        price = (now or base).est_price
        quantity = now.quantity if now else 0.0
        rows.append({
            "account": masked.get(key[0], mask_account(key[0])), "side": key[2].capitalize(), "symbol": key[1],
            "proposed": emails.quantity(base.quantity) if base else "\u2014", "quantity": emails.quantity(quantity),
            "price": emails.money(price), "value": emails.money(now.est_value if now else 0.0),
            "changed": base is None or abs(base.quantity - quantity) > 1e-9, "dropped": now is None,
        })
    bands = [{
        "label": class_label(b.asset_class), "after": emails.percent(b.weight_after),
        "target": emails.percent(b.target_weight), "drift": emails.signed_percent(b.weight_after - b.target_weight),
        "band": emails.band_percent(b.band), "inside": b.inside,
    } for b in modification.band_report]
    return {"rows": rows, "trade_count": len(modification.trades), "bands": bands,
            "inside_bands": modification.inside_bands,
            "outside": [b["label"] for b in bands if not b["inside"]],
            "trade_value": emails.money(sum(t.est_value for t in modification.trades))}


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
        link_action=claims.action,
        modification=_modification_view(result.modification, package) if result.modification else None,
    )


def error_page(status: int, message: str, headers: Mapping[str, str] | None = None,
               reference: str | None = None) -> HTMLResponse:
    """A link error for a browser: the JSON's status and message, and what to do next."""
    return _page("error.html.j2", status, headers, status=status, title=_error_title(status, _ERROR_TITLES),
                 message=message, reference=reference)


def _error_title(status: int, titles: Mapping[int, str]) -> str:
    return titles.get(status, "Something went wrong" if status >= 500 else "This request cannot be completed")


_PORTAL_ERROR_TITLES = {
    **_ERROR_TITLES,
    401: "This sign-in link cannot be used",
    403: "Not allowed",
    410: "This sign-in link has already been used",
}


def portal_error_page(status: int, message: str, headers: Mapping[str, str] | None = None,
                      reference: str | None = None, *, idle_minutes: int) -> HTMLResponse:
    """An error of the review portal (/portal/...): status, message, and the way back.
    idle_minutes: the portal's idle timeout (PortalSettings.idle_minutes), as every page says it."""
    # Without the session here: the bar shows no name (the page may answer a stranger).
    return _page("portal/error.html.j2", status, headers, status=status,
                 title=_error_title(status, _PORTAL_ERROR_TITLES), message=message, reference=reference, me=None,
                 csrf="", section="", idle_minutes=idle_minutes)
