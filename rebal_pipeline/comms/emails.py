"""The emails rebal sends, rendered from jinja2 templates (templates/*.html.j2, *.txt.j2).

Every builder is pure: same input, same bytes (no Date header — `smtp.send` stamps it; no random
Content-ID — the chart's is derived from the Message-ID). Each returns an
`email.message.EmailMessage`:

    multipart/alternative
    ├── text/plain            (quoted-printable, UTF-8)
    └── multipart/related     (only when there is an inline image; else text/html directly)
        ├── text/html         (quoted-printable, UTF-8, refers to the image as cid:…)
        └── image/png         (the drift chart, inline, Content-ID <drift-chart.…>)

The HTML part is rendered with autoescape (client names, reasons and other text from the data are
escaped; link URLs go into href attributes escaped and are checked to be http(s) URLs first). The
plain-text part carries the same facts. Numbers are formatted by one set of filters: money
`$12,345.67` (`-$1,234.50` when negative), percents with two decimals `12.34%`, drift signed
`+7.40%`, bands `±5.00%`, quantities without trailing zeros.

The Message-ID is the caller's: pass `smtp.make_message_id(idempotency_key, domain)` so a re-sent
email keeps its identity (see smtp.py). Account numbers are always masked (••••1234). Logs carry the
recommendation id, the template and the Message-ID only — never a name, an address or an amount.

Emails:
- `advisor_alert`        — the recommendation with drift table and chart, trades, tax, links;
- `reminder`             — 24h without a decision: a short summary and the links again;
- `escalation`           — 48h without a decision: to compliance, who, since when, the package;
- `weekly_digest`        — base tier: one email listing several recommendations with review links;
- `client_confirmation`  — after execution, "simple" or "detailed" (per firm/household setting);
- `operations_alert`     — to operations: what happened (late files, a connection to re-authorize),
                           the connection, as-of date and details, and what to do;
- `sign_in`              — the portal's single-use, expiring sign-in link (one button).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from email.message import EmailMessage
from typing import Literal, Mapping, Sequence
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined

from rebal_pipeline.comms import chart as drift_chart_module
from rebal_pipeline.comms.chart import DISPLAY_HEIGHT_PX, DISPLAY_WIDTH_PX, class_label, is_outside
from rebal_pipeline.core.money import carryforward_words, tax_effect, tax_effect_words
from rebal_pipeline.core.pii import mask_account
from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage

log = logging.getLogger("rebal.comms.emails")

ALERT_ACTIONS = ("approve", "review", "defer", "escalate")
ConfirmationStyle = Literal["simple", "detailed"]
SIMPLE_CONFIRMATION = "Your portfolio has been rebalanced to align with your investment plan."


# ---------------------------------------------------------------------------------------------
# Number and text formatting (the template filters)
# ---------------------------------------------------------------------------------------------


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def money(value) -> str:
    """$12,345.67; -$1,234.50; — when unknown. Never -$0.00."""
    v = _number(value)
    if v is None:
        return "\u2014"
    cents = round(v, 2)
    if cents == 0:
        return "$0.00"
    return f"{'-' if cents < 0 else ''}${abs(cents):,.2f}"


def percent(fraction, places: int = 2) -> str:
    """A fraction as a percent: 0.1234 -> 12.34%."""
    v = _number(fraction)
    if v is None:
        return "\u2014"
    text = f"{v * 100:.{places}f}"
    if float(text) == 0:  # never "-0.00%"
        text = f"{0:.{places}f}"
    return text + "%"


def signed_percent(fraction, places: int = 2) -> str:
    """Drift: +7.40%, -3.10%, 0.00%."""
    v = _number(fraction)
    if v is None:
        return "\u2014"
    text = percent(v, places)
    return text if float(text[:-1]) == 0 else ("+" + text if v > 0 else text)


def band_percent(fraction, places: int = 2) -> str:
    """A band: ±5.00%."""
    return "\u00b1" + percent(fraction, places)


def quantity(value) -> str:
    """Shares or units: 120, 12.345 (up to 4 decimals, trailing zeros dropped), 1,200."""
    v = _number(value)
    if v is None:
        return "\u2014"
    text = f"{v:,.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# mask_account (••••1234) lives in core/pii.py: emails, logs, metadata and the CLI mask alike.


def day(value) -> str:
    """20 Nov 2026."""
    if value is None or value == "":
        return "\u2014"
    if isinstance(value, str):
        value = date.fromisoformat(value[:10])
    return f"{value.day} {value:%b %Y}"


def moment(value: datetime) -> str:
    """20 Nov 2026 21:30 UTC (naive datetimes are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    value = value.astimezone(timezone.utc)
    return f"{day(value.date())} {value:%H:%M} UTC"


_REASONS = {
    "rebalance": "Rebalance",
    "cash": "Cash target",
    "restriction": "Restriction",
    "location": "Asset location",
    "tlh": "Tax-loss harvest",
    "substitute": "Substitute",
    "advisor": "Advisor change",
}


def reason_text(trade: PackageTrade) -> str:
    """The trade's reason in words; a substitute (or a restriction's replacement) says what it
    replaces."""
    text = _REASONS.get(trade.reason, trade.reason.replace("_", " ").capitalize())
    if trade.replaces_symbol:
        if trade.reason == "substitute":
            return f"Substitute for {trade.replaces_symbol} (avoids a wash sale)"
        return f"{text}: replaces {trade.replaces_symbol}"
    return text


# ---------------------------------------------------------------------------------------------
# Template environments
# ---------------------------------------------------------------------------------------------

# Inline styles: many mail clients drop <style> blocks, so every element carries its own.
_CSS = {
    "body": "margin:0;padding:0;background:#f3f4f6;",
    "wrap": "width:100%;background:#f3f4f6;padding:16px 0;",
    "card": "width:680px;max-width:100%;margin:0 auto;background:#ffffff;border:1px solid #e1e4e8;"
            "border-radius:6px;font-family:Arial,Helvetica,sans-serif;color:#1f2328;font-size:14px;line-height:1.45;",
    "pad": "padding:20px 24px;",
    "h1": "margin:0 0 4px 0;font-size:20px;line-height:1.3;color:#1f2328;",
    "h2": "margin:22px 0 8px 0;font-size:15px;color:#1f2328;border-bottom:1px solid #e1e4e8;padding-bottom:4px;",
    "muted": "color:#59636e;font-size:13px;",
    "table": "width:100%;border-collapse:collapse;font-size:13px;",
    "th": "text-align:left;padding:6px 8px;border-bottom:2px solid #d0d7de;color:#59636e;font-weight:bold;"
          "white-space:nowrap;",
    "th_num": "text-align:right;padding:6px 8px;border-bottom:2px solid #d0d7de;color:#59636e;font-weight:bold;"
              "white-space:nowrap;",
    "td": "text-align:left;padding:6px 8px;border-bottom:1px solid #eaeef2;vertical-align:top;",
    "td_num": "text-align:right;padding:6px 8px;border-bottom:1px solid #eaeef2;vertical-align:top;"
              "white-space:nowrap;font-variant-numeric:tabular-nums;",
    "outside": "color:#b42318;font-weight:bold;",
    "inside": "color:#1a7f37;",
    "note": "margin:12px 0;padding:10px 12px;background:#fff8e6;border-left:4px solid #d4a72c;font-size:13px;",
    "flag": "margin:12px 0;padding:10px 12px;background:#fdecea;border-left:4px solid #b42318;font-size:13px;",
    "ok": "margin:12px 0;padding:10px 12px;background:#eaf6ec;border-left:4px solid #1a7f37;font-size:13px;",
    "btn_approve": "display:inline-block;padding:10px 18px;background:#1a7f37;color:#ffffff;text-decoration:none;"
                   "border-radius:5px;font-weight:bold;font-size:14px;",
    "btn_review": "display:inline-block;padding:10px 18px;background:#0969da;color:#ffffff;text-decoration:none;"
                  "border-radius:5px;font-weight:bold;font-size:14px;",
    "btn_defer": "display:inline-block;padding:10px 18px;background:#eaeef2;color:#1f2328;text-decoration:none;"
                 "border-radius:5px;font-weight:bold;font-size:14px;border:1px solid #d0d7de;",
    "btn_escalate": "display:inline-block;padding:10px 18px;background:#bc4c00;color:#ffffff;text-decoration:none;"
                    "border-radius:5px;font-weight:bold;font-size:14px;",
    "link": "color:#0969da;",
    "footer": "padding:14px 24px;border-top:1px solid #e1e4e8;color:#59636e;font-size:12px;",
}

_FILTERS = {
    "money": money, "percent": percent, "signed_percent": signed_percent, "band_percent": band_percent,
    "quantity": quantity, "mask": mask_account, "day": day, "moment": moment,
}


def _environment(autoescape: bool) -> Environment:
    env = Environment(
        loader=PackageLoader("rebal_pipeline.comms", "templates"),
        autoescape=autoescape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(_FILTERS)
    env.globals["css"] = _CSS
    return env


# HTML with autoescape on; plain text without (it is not HTML: escaping would show &amp; to the reader).
_HTML = _environment(autoescape=True)
_TEXT = _environment(autoescape=False)


# ---------------------------------------------------------------------------------------------
# View models: what the templates see (formatted strings and flags, no arithmetic in templates)
# ---------------------------------------------------------------------------------------------


def _check_links(links: Mapping[str, str], required: Sequence[str]) -> dict[str, str]:
    unknown = sorted(set(links) - set(ALERT_ACTIONS))
    if unknown:
        raise ValueError(f"links: unknown action(s) {unknown}; expected some of {ALERT_ACTIONS}")
    missing = [a for a in required if not links.get(a)]
    if missing:
        raise ValueError(f"links: missing {missing}")
    for action, url in links.items():
        parts = urlsplit(url)
        # A signed link is a bearer credential: https, or http only to a local test/dev server.
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if not (parts.scheme == "https" or (parts.scheme == "http" and local)) or not parts.netloc \
                or any(c.isspace() for c in url):
            raise ValueError(f"links: the {action} link is not an https URL")
    return {a: links[a] for a in ALERT_ACTIONS if a in links}


def _accounts(package: RecommendationPackage, account_numbers: Mapping[str, str] | None) -> dict[str, str]:
    """account_id -> masked custodian number (the account id itself when no number is given)."""
    numbers = account_numbers or {}
    return {a: mask_account(numbers.get(a, a)) for a in package.account_ids}


def _scope_label(package: RecommendationPackage, masked: Mapping[str, str]) -> str:
    if package.scope == "household":
        return f"Household ({len(masked)} accounts: {', '.join(masked.values())})"
    return f"Account {', '.join(masked.values())}"


def _band_rows(package: RecommendationPackage) -> list[dict]:
    return [{
        "label": class_label(b.asset_class), "current": percent(b.current_weight), "target": percent(b.target_weight),
        "drift": signed_percent(b.drift), "band": band_percent(b.band), "outside": is_outside(b),
    } for b in package.bands]


def _trade_rows(package: RecommendationPackage, masked: Mapping[str, str]) -> list[dict]:
    order = {"sell": 0, "buy": 1}
    trades = sorted(package.trades, key=lambda t: (t.account_id, order[t.side], t.symbol))
    return [{
        "account": masked.get(t.account_id, mask_account(t.account_id)), "side": t.side.capitalize(),
        "quantity": quantity(t.quantity), "symbol": t.symbol, "value": money(t.est_value),
        "price": money(t.est_price), "reason": reason_text(t), "tlh": t.reason == "tlh",
        "substitute": t.reason == "substitute",
        "wash_sale_disallowed": money(t.wash_sale_disallowed) if t.wash_sale_disallowed else None,
    } for t in trades]


def _tax_view(package: RecommendationPackage) -> dict:
    tax = package.tax or {}

    def amount(key: str) -> float:
        return _number(tax.get(key)) or 0.0

    trade_value = amount("trade_value") or sum(t.est_value for t in package.trades)
    # This year's figure (net capital loss limited by IRC §1211(b)); packages published before it
    # existed carry only est_tax. A saving is worded as one (core/money.py), never as a negative tax.
    est_tax = amount("est_tax_this_year") if tax.get("est_tax_this_year") is not None else amount("est_tax")
    effect = tax_effect(est_tax)
    household = _number(tax.get("household_est_tax_this_year"))
    household_carry = amount("household_loss_carryforward")
    show_household = package.scope != "household" and household is not None and (
        round(household, 2) != round(est_tax, 2) or round(household_carry, 2) != round(amount("loss_carryforward"), 2))
    return {
        "known": bool(tax),
        "trade_value": money(trade_value),
        "sell_value": money(amount("sell_value") or sum(t.est_value for t in package.trades if t.side == "sell")),
        "st_gain": money(amount("st_gain")), "lt_gain": money(amount("lt_gain")),
        "realized_loss": money(amount("realized_loss")),
        "wash_sale_disallowed": money(amount("wash_sale_disallowed")),
        "has_disallowed": amount("wash_sale_disallowed") > 0,
        "est_tax": effect.amount, "saving": effect.saving,
        "est_tax_label": effect.label.capitalize() + " this year",
        "est_tax_words": effect.words,
        "est_tax_cell": ("saving " if effect.saving else "") + effect.amount,
        "carryforward": carryforward_words(amount("loss_carryforward")),
        "household_tax": (tax_effect_words(household) + " this year for the household (all of today's "
                          "recommendations)" + (f"; {carryforward_words(household_carry)}" if household_carry > 0
                                                 else "")) if show_household else None,
        "net_tax_pct": percent(abs(_number(tax["net_tax_pct"]) or 0.0)) if tax.get("net_tax_pct") is not None
        else percent(abs(est_tax / trade_value) if trade_value else 0.0),
        "wait": bool(tax.get("wait_for_long_term")),
        "wait_until": day(tax.get("wait_until")) if tax.get("wait_until") else None,
        "tax_saved_by_waiting": money(tax["tax_saved_by_waiting"]) if tax.get("tax_saved_by_waiting") else None,
        "wait_reason": tax.get("wait_reason") or None,
        "wash_sale_watch": [w.strip() for w in (tax.get("wash_sale_watch") or "").split(";") if w.strip()],
    }


def _headline(package: RecommendationPackage) -> dict:
    """The most drifted class (by |drift| over its band): what the subject and digest show."""
    if package.kind == "harvest":
        title = "Tax-loss harvest available"
    else:
        title = "Rebalance needed"
    if not package.bands:
        return {"title": title, "summary": ""}
    worst = max(package.bands, key=lambda b: (abs(b.drift) - b.band, abs(b.drift)))
    return {"title": title,
            "summary": f"{class_label(worst.asset_class)} {signed_percent(worst.drift)} "
                       f"vs. {band_percent(worst.band)} band"}


def _package_view(package: RecommendationPackage, client_name: str,
                  account_numbers: Mapping[str, str] | None) -> dict:
    masked = _accounts(package, account_numbers)
    return {
        "client_name": client_name,
        "scope_label": _scope_label(package, masked),
        "accounts": list(masked.values()),
        "show_account_column": len(masked) > 1,
        "headline": _headline(package),
        "bands": _band_rows(package),
        "any_outside": any(is_outside(b) for b in package.bands),
        "trades": _trade_rows(package, masked),
        "trade_count": len(package.trades),
        "tax": _tax_view(package),
        "inside_bands": package.inside_bands,
        "unresolved": package.unresolved,
        "refs": {
            "recommendation_id": package.recommendation_id, "as_of": day(package.as_of),
            "model_version": package.model_version or "\u2014", "policy_version": package.policy_version,
            "tier": (package.tier or "\u2014").replace("_", " "), "urgency": package.urgency or "\u2014",
            "kind": package.kind, "discretionary": package.discretionary,
        },
    }


# ---------------------------------------------------------------------------------------------
# Message assembly
# ---------------------------------------------------------------------------------------------

_MSGID = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")


def _content_id(message_id: str, name: str) -> str:
    """A Content-ID derived from the Message-ID: deterministic, and unique per message."""
    domain = message_id.strip("<>").rsplit("@", 1)[1]
    digest = hashlib.sha256(f"{name}\x00{message_id}".encode()).hexdigest()[:20]
    return f"<{name}.{digest}@{domain}>"


def _assemble(*, template: str, subject: str, sender: str, to: str | Sequence[str], message_id: str,
              context: dict, images: Mapping[str, bytes] | None = None, in_reply_to: str | None = None,
              reference: str | None = None) -> EmailMessage:
    if not _MSGID.match(message_id or ""):
        raise ValueError("message_id must look like <local@domain> (use smtp.make_message_id)")
    recipients = [to] if isinstance(to, str) else list(to)
    if not recipients:
        raise ValueError("no recipient")
    cids = {name: _content_id(message_id, name) for name in (images or {})}
    context = {**context, "cid": {name: cid.strip("<>") for name, cid in cids.items()},
               "chart_width": DISPLAY_WIDTH_PX, "chart_height": DISPLAY_HEIGHT_PX}
    # Blocks that render empty leave runs of blank lines in the plain text: one blank line at most.
    text = re.sub(r"\n{3,}", "\n\n", _TEXT.get_template(f"{template}.txt.j2").render(context))
    html = _HTML.get_template(f"{template}.html.j2").render(context)

    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    # RFC 3834: machine-generated; out-of-office responders should not answer it.
    msg["Auto-Submitted"] = "auto-generated"
    if reference:
        msg["X-Rebal-Reference"] = reference
    # Quoted-printable keeps both parts 7-bit clean whatever the relay supports (no 8BITMIME needed).
    msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    if images:
        html_part = msg.get_payload()[1]
        for name, png in images.items():
            html_part.add_related(png, maintype="image", subtype="png", cid=cids[name], disposition="inline",
                                  filename=f"{name}.png")
    # MIME boundaries from the Message-ID too (the email package picks random ones): same input,
    # same bytes.
    seed = hashlib.sha256(f"boundary\x00{message_id}".encode()).hexdigest()[:24]
    for number, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"==rebal-{seed}-{number}==")
    log.info("rendered %s email %s (reference %s)", template, message_id, reference or "-")
    return msg


# ---------------------------------------------------------------------------------------------
# The emails
# ---------------------------------------------------------------------------------------------


def advisor_alert(package: RecommendationPackage, *, client_name: str, links: Mapping[str, str],
                  sender: str, to: str | Sequence[str], message_id: str,
                  account_numbers: Mapping[str, str] | None = None, advisor_name: str | None = None,
                  chart_png: bytes | None = None) -> EmailMessage:
    """The advisor's alert for one recommendation: drift table and chart, trades, tax, IPS/model
    reference and the four signed one-click links (`links` must hold approve, review, defer and
    escalate, as made by the approval API's make_link for this recommendation and advisor).

    account_numbers: account_id -> custodian account number (masked in the email); default the
    account ids. chart_png: a pre-rendered chart; default `chart.drift_chart(package.bands)`
    (no chart when the package has no bands)."""
    links = _check_links(links, ALERT_ACTIONS)
    view = _package_view(package, client_name, account_numbers)
    png = chart_png if chart_png is not None else (
        drift_chart_module.drift_chart(package.bands) if package.bands else None)
    head = view["headline"]
    subject = f"{head['title']}: {client_name}, {', '.join(view['accounts'])}"
    if head["summary"]:
        subject += f" ({head['summary']})"
    return _assemble(
        template="advisor_alert", subject=subject, sender=sender, to=to, message_id=message_id,
        context={**view, "links": links, "advisor_name": advisor_name, "has_chart": png is not None},
        images={"drift-chart": png} if png is not None else None, reference=package.recommendation_id,
    )


def reminder(package: RecommendationPackage, *, client_name: str, links: Mapping[str, str], alerted_at: datetime,
             sender: str, to: str | Sequence[str], message_id: str,
             account_numbers: Mapping[str, str] | None = None, advisor_name: str | None = None,
             escalates_at: datetime | None = None, in_reply_to: str | None = None) -> EmailMessage:
    """The 24h reminder: the recommendation still waits for a decision. A short summary and the
    links (fresh ones: links are single-use). in_reply_to: the alert's Message-ID, so the
    reminder threads under it."""
    links = _check_links(links, ALERT_ACTIONS)
    view = _package_view(package, client_name, account_numbers)
    subject = f"Reminder — {view['headline']['title'].lower()}: {client_name}, {', '.join(view['accounts'])}"
    return _assemble(
        template="reminder", subject=subject, sender=sender, to=to, message_id=message_id,
        context={**view, "links": links, "advisor_name": advisor_name, "alerted_at": alerted_at,
                 "escalates_at": escalates_at},
        in_reply_to=in_reply_to, reference=package.recommendation_id,
    )


def escalation(package: RecommendationPackage, *, client_name: str, advisor_name: str, advisor_id: str,
               pending_since: datetime, escalated_at: datetime, links: Mapping[str, str],
               sender: str, to: str | Sequence[str], message_id: str,
               account_numbers: Mapping[str, str] | None = None, compliance_name: str | None = None,
               reason: str | None = None) -> EmailMessage:
    """To compliance after 48h without a decision (or when the advisor escalates: pass `reason`):
    who, since when, and the package (drift, trades, tax). links: at least `review` (for the
    compliance officer), others optional."""
    links = _check_links(links, ("review",))
    view = _package_view(package, client_name, account_numbers)
    waited = escalated_at - pending_since
    hours = max(0, int(waited.total_seconds() // 3600))
    subject = (f"Escalation: no decision for {hours}h — {advisor_name} ({advisor_id}), "
               f"{client_name}, {', '.join(view['accounts'])}")
    if reason:
        subject = f"Escalation from {advisor_name} ({advisor_id}): {client_name}, {', '.join(view['accounts'])}"
    return _assemble(
        template="escalation", subject=subject, sender=sender, to=to, message_id=message_id,
        context={**view, "links": links, "advisor_name": advisor_name, "advisor_id": advisor_id,
                 "pending_since": pending_since, "escalated_at": escalated_at, "hours": hours,
                 "compliance_name": compliance_name, "reason": reason},
        reference=package.recommendation_id,
    )


@dataclass(frozen=True)
class DigestItem:
    """One recommendation of the weekly digest."""

    package: RecommendationPackage
    client_name: str
    review_link: str
    account_numbers: Mapping[str, str] | None = None


def weekly_digest(items: Sequence[DigestItem], *, advisor_name: str | None, week_ending: date,
                  sender: str, to: str | Sequence[str], message_id: str) -> EmailMessage:
    """The base tier's weekly batch: one email listing the week's recommendations (client, account,
    most drifted class, trades, trade value, est. tax) with a review link each."""
    rows = []
    for item in items:
        _check_links({"review": item.review_link}, ("review",))
        view = _package_view(item.package, item.client_name, item.account_numbers)
        rows.append({**view, "review_link": item.review_link})
    subject = f"Weekly rebalancing digest — {len(rows)} recommendation{'s' if len(rows) != 1 else ''}, " \
              f"week ending {day(week_ending)}"
    return _assemble(
        template="weekly_digest", subject=subject, sender=sender, to=to, message_id=message_id,
        context={"items": rows, "advisor_name": advisor_name, "week_ending": week_ending},
        reference=f"digest:{week_ending.isoformat()}",
    )


@dataclass(frozen=True)
class ExecutedTrade:
    """A trade as executed, for the client's detailed confirmation."""

    side: str  # buy | sell
    quantity: float
    symbol: str
    price: float
    amount: float
    description: str | None = None  # the security's name, e.g. "Vanguard Total Stock Market ETF"

    @classmethod
    def from_package(cls, trade: PackageTrade, description: str | None = None) -> "ExecutedTrade":
        """From the package's trade at its estimated price (when the fill is not known)."""
        return cls(side=trade.side, quantity=trade.quantity, symbol=trade.symbol, price=trade.est_price,
                   amount=trade.est_value, description=description)


def client_confirmation(*, client_name: str, account_number: str, executed_on: date, style: ConfirmationStyle,
                        sender: str, to: str | Sequence[str], message_id: str, firm_name: str,
                        advisor_name: str | None = None, trades: Sequence[ExecutedTrade] = (),
                        reference: str | None = None) -> EmailMessage:
    """The client's confirmation after execution. style (the firm's or household's setting):
    "simple" says only that the portfolio was rebalanced to its plan; "detailed" adds the trades."""
    if style not in ("simple", "detailed"):
        raise ValueError(f"style must be 'simple' or 'detailed', not {style!r}")
    if style == "detailed" and not trades:
        raise ValueError("a detailed confirmation needs the executed trades")
    order = {"sell": 0, "buy": 1}
    rows = [{
        "side": "Sold" if t.side == "sell" else "Bought", "quantity": quantity(t.quantity), "symbol": t.symbol,
        "description": t.description, "price": money(t.price), "amount": money(t.amount),
    } for t in sorted(trades, key=lambda t: (order[t.side], t.symbol))] if style == "detailed" else []
    totals = {
        "sold": money(sum(t.amount for t in trades if t.side == "sell")),
        "bought": money(sum(t.amount for t in trades if t.side == "buy")),
    }
    return _assemble(
        template="client_confirmation", subject=f"Your {firm_name} portfolio has been rebalanced",
        sender=sender, to=to, message_id=message_id,
        context={"client_name": client_name, "account": mask_account(account_number), "executed_on": executed_on,
                 "style": style, "trades": rows, "totals": totals, "firm_name": firm_name,
                 "advisor_name": advisor_name, "simple_text": SIMPLE_CONFIRMATION},
        reference=reference,
    )


# ---------------------------------------------------------------------------------------------
# Operations alerts (workflow/operations_alerts.py)
# ---------------------------------------------------------------------------------------------

# Per alert code: the email's heading and what operations should do. An alert code without an
# entry still gets an email (with the generic steps): a new alert is never silently dropped.
OPERATIONS_GUIDANCE: dict[str, dict] = {
    "feed_data_quality": {
        "title": "Rows of today's feed were rejected",
        "why": "Each rejected row is kept, with its file, line, column and reason, in the rejects table; the "
               "accounts it concerns are held out of today's recommendations (the rest of the book was scanned), "
               "so their advisors get no alert for them until the data is corrected.",
        "steps": [
            "Open the rejects asset of this date in the Dagster UI (or `rebal summary`): each row names the file, "
            "the line, the column and the reason.",
            "Ask the custodian (or whoever prepares the feed) for a corrected file; rebal never fixes data itself.",
            "Once the corrected file is in the day's folder, re-materialise the day: the held-out accounts are "
            "scanned and their advisors alerted as usual.",
        ],
    },
    "feed_late": {
        "title": "Custodian files are late",
        "why": "The daily scan never runs on older data: until these files are in, the advisors get no drift "
               "alerts for this date.",
        "steps": [
            "Check the custodian's delivery: did the files for this date reach the custodian's SFTP server (or "
            "the drop folder), and can rebal reach it? The connection's pull runs and the custodian_files sensor "
            "in the Dagster UI show the last attempts.",
            "Once the files are in, they are landed and the day's scan starts by itself (feed_arrivals sensor).",
            "If the custodian cannot deliver today, tell the advisors that this date's alerts are delayed.",
        ],
    },
    "reauthorization_needed": {
        "title": "A custodian connection needs to be re-authorized",
        "why": "The custodian no longer accepts this connection's authorization (its refresh token expired or "
               "was revoked), so rebal cannot fetch its files, and the daily scan does not run for the dates "
               "it misses.",
        "steps": [
            "Re-authorize the connection: someone with the firm's login at the custodian runs "
            "`rebal connections authorize <connection>`, opens the address it prints, approves, and passes the "
            "code and state of the custodian's redirect back to the same command (docs/custodian_feeds.md, "
            "section 4).",
            "The custodian_api_pulls sensor notices the new authorization and pulls the missed day by itself; "
            "check that the run succeeds in the Dagster UI.",
        ],
    },
}
_GENERIC_STEPS = ["Look at the details above, and at the recent runs and sensor ticks in the Dagster UI."]
_DETAIL_LABELS = {"missing": "Missing files", "rejected_rows": "Rejected rows",
                  "accounts_held_out": "Accounts held out today", "unknown_accounts": "Accounts not in accounts.csv",
                  "reconciliation_breaks": "Reconciliation breaks", "commonest_reasons": "Commonest reasons",
                  "held_out_accounts": "Held-out accounts (masked)"}


def _detail_value(value) -> str:
    """A details value as one line of text (lists joined, nothing missing shown as a dash)."""
    if value is None or value == "" or value == []:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_detail_value(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_detail_value(v)}" for k, v in sorted(value.items()))
    if isinstance(value, datetime):
        return moment(value)
    if isinstance(value, date):
        return day(value)
    return str(value)


def operations_alert(*, alert: str, summary: str, raised_at: datetime, sender: str, to: str | Sequence[str],
                     message_id: str, connection: str | None = None, as_of: date | None = None,
                     details: Mapping[str, object] | None = None, recipient_name: str | None = None,
                     reference: str | None = None) -> EmailMessage:
    """An operations alert to the operations team: what happened (`summary`, one plain sentence),
    the connection, the as-of date, the details as a small table, and what to do for this kind of
    alert (OPERATIONS_GUIDANCE). reference: the alert's key (X-Rebal-Reference)."""
    summary = " ".join(summary.split())  # the subject is one header line
    guidance = OPERATIONS_GUIDANCE.get(alert, {})
    rows = [{"label": _DETAIL_LABELS.get(k, k.replace("_", " ").capitalize()), "value": _detail_value(v)}
            for k, v in sorted((details or {}).items())]
    return _assemble(
        template="operations_alert", subject=f"[rebal operations] {summary}", sender=sender, to=to,
        message_id=message_id,
        context={"alert": alert, "title": guidance.get("title") or alert.replace("_", " ").capitalize(),
                 "summary": summary, "raised_at": raised_at, "connection": connection or "\u2014",
                 "as_of": day(as_of) if as_of else "\u2014", "details": rows,
                 "why": guidance.get("why"), "steps": guidance.get("steps") or _GENERIC_STEPS,
                 "recipient_name": recipient_name},
        reference=reference,
    )


# ---------------------------------------------------------------------------------------------
# The portal's sign-in link (workflow/sessions.py)
# ---------------------------------------------------------------------------------------------


def sign_in(*, link: str, expires_at: datetime, sender: str, to: str, message_id: str,
            recipient_name: str | None = None) -> EmailMessage:
    """The portal's sign-in email: one button (the single-use, expiring link) and when it expires.
    Opening the link changes nothing; the page it opens has the button that signs in."""
    _check_links({"review": link}, ())  # the same rule as the alert's links: https (http to a local server)
    return _assemble(
        template="sign_in", subject="Your rebal sign-in link", sender=sender, to=to, message_id=message_id,
        context={"link": link, "expires_at": expires_at, "recipient_name": recipient_name},
    )
