"""The supervisory review report as HTML, PDF and CSV (no Dagster, no wall clock).

    html_report(report) -> bytes   jinja2 (templates/supervisory_report.html.j2), autoescaped, one
                                   self-contained page: inline styles, no script, no image, no link
                                   to anything outside it (a Content-Security-Policy of
                                   `default-src 'none'` says so to the browser, too)
    pdf_report(report)  -> bytes   fpdf2: A4 landscape, DejaVu Sans (shipped with matplotlib, so
                                   masked numbers ••••1234 and ± print), page n of N
    csv_report(report)  -> bytes   the csv module: one long table, one row per fact, a `section`
                                   column first (summary, outcome, exception, advisor, decision,
                                   escalation, wash_sale_override, recommendation, audit_chain)
    render_all(report)  -> {"html": …, "pdf": …, "csv": …}

Byte-identical for the same report: rows come sorted from report.py; times are printed in New
York time from the stored moments; the PDF's creation date is the end of the period (00:00 New
York after its last day), never "now"; fpdf2's document id is derived from the content. All three
formats print the same formatted values (one view model, `view`), so a figure checked in one is
the figure in the others.
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from rebal_pipeline.supervision.report import (
    EXCEPTION_LABELS, FIRM_TIMEZONE, OUTCOME_LABELS, SupervisoryReport,
)

FORMATS = ("html", "pdf", "csv")
TITLE = "Supervisory review report"
DASH = "\u2014"

_ACTION_LABELS = {"approve": "Approved", "modify": "Modified", "defer": "Deferred", "escalate": "Escalated",
                  "auto_approve": "Auto-approved", "return_to_advisor": "Returned to advisor", "comment": "Comment"}

DEFINITIONS = (
    "Facts are as recorded by the end of the period (00:00 New York after its last day): a decision or "
    "state change recorded later is not in this report; outcomes are the last state the audit chain "
    "recorded for each recommendation before then.",
    "Time to decision: from the first alert of the account's drift to the first decision by a person "
    "(approve, modify, defer, escalate); auto-approvals are not counted as a person's decision.",
    "Review window: the approval policy's escalation hours from the first alert (7 days for the weekly "
    "batch); an alert is past it when no person decided inside the window while it was still open.",
    "Share deferred / escalated: of the advisor's recommendations of the period, those deferred at least "
    "once / escalated by any route (advisor, compliance, the escalation rule, compliance review).",
    "Account numbers are masked to their last four characters.",
)


# ---------------------------------------------------------------------------------------------
# Formatting: one set of helpers for every format
# ---------------------------------------------------------------------------------------------


def moment(value: datetime | None) -> str:
    """2026-11-20 16:30 (New York time)."""
    if value is None:
        return DASH
    return value.astimezone(FIRM_TIMEZONE).strftime("%Y-%m-%d %H:%M")


def when(value: datetime | date | None) -> str:
    if value is None:
        return DASH
    return moment(value) if isinstance(value, datetime) else value.isoformat()


def day_label(value: date) -> str:
    return f"{value.day} {value:%b %Y}"


def hours(value: float | None) -> str:
    return DASH if value is None else f"{value:,.1f} h"


def share(value: float) -> str:
    return f"{value * 100:.1f}%"


def money(value: float | None) -> str:
    if value is None:
        return DASH
    cents = round(value, 2)
    return "$0.00" if cents == 0 else f"{'-' if cents < 0 else ''}${abs(cents):,.2f}"


def _who(actor_id: str, name: str) -> str:
    """A person as "Name (ID)"; rebal's own actors in words."""
    if actor_id.startswith("policy:"):
        return f"rebal policy ({actor_id.removeprefix('policy:')})"
    if actor_id.startswith("rebal:"):
        return f"rebal ({actor_id.removeprefix('rebal:').replace('_', ' ')})"
    return f"{name} ({actor_id})" if name and name != actor_id else actor_id


def _text(value) -> str:
    return DASH if value is None or value == "" else str(value)


# ---------------------------------------------------------------------------------------------
# The view model: what every format prints
# ---------------------------------------------------------------------------------------------


def view(report: SupervisoryReport) -> dict:
    p = report.period
    chain = report.chain
    if chain.verified:
        chain_words = (f"Verified: the chain is intact and matches every anchor. At the end of the period it "
                       f"held {chain.events_to_period_end:,} events ({chain.events_in_period:,} recorded in the "
                       f"period), ending in event {chain.head_seq}.")
    else:
        chain_words = f"NOT VERIFIED: {chain.problem}"
    anchored = moment(datetime.fromisoformat(chain.anchored_at)) + " New York" if chain.anchored_at else DASH
    anchor_words = (f"{chain.anchor_file} (event {chain.anchor_seq}, anchored {anchored})"
                    if chain.anchor_file else "not anchored yet (no anchor covers the period's last event)")
    exceptions = [{"kind": EXCEPTION_LABELS[x.kind], "code": x.kind, "when": when(x.when), "subject": x.subject,
                   "advisor": _text(x.advisor_id), "recommendation": _text(x.recommendation_id), "detail": x.detail}
                  for x in report.exceptions]
    summary = [
        ("Recommendations published", f"{len(report.recommendations):,}"),
        ("Decisions recorded", f"{len(report.decisions):,}"),
        ("Modifications", f"{len(report.modifications):,}"),
        ("Deferrals", f"{len(report.deferrals):,}"),
        ("Escalations", f"{len(report.escalations):,}"),
        ("Wash-sale overrides", f"{len(report.wash_sale_overrides):,}"),
        ("Exceptions", f"{len(report.exceptions):,}"),
        ("Audit chain", "verified" if chain.verified else "NOT VERIFIED"),
    ]
    return {
        "title": TITLE,
        "period": f"{day_label(p.start)} \u2013 {day_label(p.end)}",
        "period_key": f"{p.start.isoformat()} to {p.end.isoformat()}",
        "frequency": report.frequency or "on demand",
        "as_recorded_by": f"{moment(p.ends_at)} New York",
        "policy_versions": ", ".join(report.policy_versions) or DASH,
        "review_window": f"{report.review_window_hours:g} h",
        "micro_trade_limit": money(report.micro_trade_limit),
        "summary": [{"label": label, "value": value} for label, value in summary],
        "outcomes": [{"code": code, "label": OUTCOME_LABELS.get(code, code), "count": f"{count:,}"}
                     for code, count in report.outcomes],
        "outcomes_total": f"{len(report.recommendations):,}",
        "exceptions": exceptions,
        "exception_counts": [{"label": EXCEPTION_LABELS[k], "count": len(report.exceptions_of(k))}
                             for k in EXCEPTION_LABELS],
        "advisors": [{"advisor": f"{a.name} ({a.advisor_id})", "advisor_id": a.advisor_id,
                      "recommendations": f"{a.recommendations:,}", "decided": f"{a.decided:,}",
                      "median": hours(a.median_hours), "mean": hours(a.mean_hours), "longest": hours(a.longest_hours),
                      "auto_approved": f"{a.auto_approved:,}",
                      "deferred": f"{a.deferred:,} ({share(a.share_deferred)})",
                      "escalated": f"{a.escalated:,} ({share(a.share_escalated)})"} for a in report.advisors],
        "decisions": [{"when": moment(x.decided_at), "recommendation": x.recommendation_id, "subject": x.subject,
                       "advisor": _text(x.advisor_id), "action": _ACTION_LABELS.get(x.action, x.action),
                       "code": x.action, "by": _who(x.actor_id, x.actor_name), "via": x.via, "reason": _text(x.reason), "detail": _text(x.detail),
                       "gate": _text(x.gate)} for x in report.decisions],
        "modifications": [],  # filled below from decisions (same rows)
        "escalations": [{"when": moment(x.escalated_at), "recommendation": x.recommendation_id, "subject": x.subject,
                         "advisor": _text(x.advisor_id), "route": x.route, "by": _who(x.by, x.by),
                         "reason": _text(x.reason)}
                        for x in report.escalations],
        "overrides": [{"as_of": x.as_of.isoformat(), "account": x.account, "symbol": x.symbol, "by": x.decided_by,
                       "when": moment(x.decided_at), "reason": x.reason,
                       "recommendation": _text(x.recommendation_id), "disallowed": money(x.disallowed_loss)}
                      for x in report.wash_sale_overrides],
        "recommendations": [{"as_of": x.as_of.isoformat(), "recommendation": x.recommendation_id,
                             "advisor": _text(x.advisor_id), "subject": x.subject, "kind": x.kind,
                             "tier": _text(x.tier), "trade_value": money(x.trade_value),
                             "outcome": OUTCOME_LABELS.get(x.outcome, x.outcome), "code": x.outcome,
                             "alerted": moment(x.alerted_at), "decided": moment(x.decided_at),
                             "hours": hours(x.hours_to_decision)} for x in report.recommendations],
        "chain": {"words": chain_words, "verified": chain.verified, "head_seq": str(chain.head_seq),
                  "head_hash": chain.head_hash, "events_in_period": f"{chain.events_in_period:,}",
                  "events_to_period_end": f"{chain.events_to_period_end:,}", "anchor": anchor_words},
        "definitions": list(DEFINITIONS),
    }


def _with_subsets(v: dict) -> dict:
    v["modifications"] = [d for d in v["decisions"] if d["code"] == "modify"]
    v["deferrals"] = [d for d in v["decisions"] if d["code"] == "defer"]
    return v


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_HTML = Environment(loader=PackageLoader("rebal_pipeline.supervision", "templates"), autoescape=True,
                    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def html_report(report: SupervisoryReport) -> bytes:
    return _HTML.get_template("supervisory_report.html.j2").render(r=_with_subsets(view(report))).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("section", "item", "date", "advisor_id", "subject", "recommendation_id", "status", "actor", "via",
               "value", "hours", "reason", "detail")


def csv_report(report: SupervisoryReport) -> bytes:
    """One row per fact; values raw where a machine reads them (ISO dates, numbers with a dot)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n", extrasaction="raise")
    writer.writeheader()
    p = report.period

    def row(section: str, **values) -> None:
        writer.writerow({c: "" for c in CSV_COLUMNS} | {"section": section} | {
            k: ("" if v is None else v) for k, v in values.items()})

    row("summary", item="period_from", date=p.start.isoformat())
    row("summary", item="period_to", date=p.end.isoformat())
    row("summary", item="as_recorded_by", date=p.ends_at.isoformat())
    row("summary", item="frequency", detail=report.frequency or "on demand")
    row("summary", item="policy_versions", detail=" ".join(report.policy_versions))
    for item, value in (("recommendations", len(report.recommendations)), ("decisions", len(report.decisions)),
                        ("modifications", len(report.modifications)), ("deferrals", len(report.deferrals)),
                        ("escalations", len(report.escalations)),
                        ("wash_sale_overrides", len(report.wash_sale_overrides)),
                        ("exceptions", len(report.exceptions))):
        row("summary", item=item, value=value)
    for code, count in report.outcomes:
        row("outcome", item=code, value=count, detail=OUTCOME_LABELS.get(code, code))
    for x in report.exceptions:
        row("exception", item=x.kind, date=x.when.isoformat() if isinstance(x.when, date) and not isinstance(
            x.when, datetime) else x.when.astimezone(FIRM_TIMEZONE).isoformat(), advisor_id=x.advisor_id,
            subject=x.subject, recommendation_id=x.recommendation_id, detail=x.detail)
    for a in report.advisors:
        row("advisor", item="recommendations", advisor_id=a.advisor_id, subject=a.name, value=a.recommendations)
        row("advisor", item="decided", advisor_id=a.advisor_id, subject=a.name, value=a.decided)
        row("advisor", item="median_hours_to_decision", advisor_id=a.advisor_id, subject=a.name, hours=a.median_hours)
        row("advisor", item="mean_hours_to_decision", advisor_id=a.advisor_id, subject=a.name, hours=a.mean_hours)
        row("advisor", item="longest_hours_to_decision", advisor_id=a.advisor_id, subject=a.name,
            hours=a.longest_hours)
        row("advisor", item="auto_approved", advisor_id=a.advisor_id, subject=a.name, value=a.auto_approved)
        row("advisor", item="deferred", advisor_id=a.advisor_id, subject=a.name, value=a.deferred,
            detail=f"{a.share_deferred:.4f}")
        row("advisor", item="escalated", advisor_id=a.advisor_id, subject=a.name, value=a.escalated,
            detail=f"{a.share_escalated:.4f}")
    for x in report.decisions:
        row("decision", item=x.decision_id, date=x.decided_at.astimezone(FIRM_TIMEZONE).isoformat(),
            advisor_id=x.advisor_id, subject=x.subject, recommendation_id=x.recommendation_id, status=x.action,
            actor=x.actor_id, via=x.via, reason=x.reason, detail=" ".join(filter(None, [x.detail, (
                f"gate: {x.gate}" if x.gate else "")])))
    for x in report.escalations:
        row("escalation", item=x.route, date=x.escalated_at.astimezone(FIRM_TIMEZONE).isoformat(),
            advisor_id=x.advisor_id, subject=x.subject, recommendation_id=x.recommendation_id, actor=x.by,
            reason=x.reason)
    for x in report.wash_sale_overrides:
        row("wash_sale_override", item=x.symbol, date=x.as_of.isoformat(), subject=x.account,
            recommendation_id=x.recommendation_id, actor=x.decided_by, value=x.disallowed_loss, reason=x.reason,
            detail=f"decided {x.decided_at.astimezone(FIRM_TIMEZONE).isoformat()}")
    for x in report.recommendations:
        row("recommendation", item=x.kind, date=x.as_of.isoformat(), advisor_id=x.advisor_id, subject=x.subject,
            recommendation_id=x.recommendation_id, status=x.outcome, actor=x.decided_by, value=f"{x.trade_value:.2f}",
            hours=x.hours_to_decision, detail=f"first alert {x.alerted_at.astimezone(FIRM_TIMEZONE).isoformat()}"
            + (f"; {x.first_action} {x.decided_at.astimezone(FIRM_TIMEZONE).isoformat()}" if x.decided_at else ""))
    c = report.chain
    row("audit_chain", item="verified", value="true" if c.verified else "false", detail=c.problem)
    row("audit_chain", item="events_in_period", value=c.events_in_period)
    row("audit_chain", item="events_to_period_end", value=c.events_to_period_end)
    row("audit_chain", item="head", value=c.head_seq, detail=c.head_hash)
    row("audit_chain", item="anchor", value=c.anchor_seq, detail=" ".join(filter(None, [
        c.anchor_file, c.anchor_hash, c.anchored_at])) or "not anchored yet")
    return out.getvalue().encode("utf-8")


# ---------------------------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------------------------


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


_INK, _MUTED, _RULE, _HEAD_FILL, _ALERT = (31, 35, 40), (89, 99, 110), (208, 215, 222), (230, 234, 239), (180, 35, 24)
_STRIPE = (246, 248, 250)


def pdf_report(report: SupervisoryReport) -> bytes:
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    v = _with_subsets(view(report))

    class _Pdf(FPDF):
        def header(self):
            if self.page_no() == 1:  # the title block says it
                return
            self.set_font("DejaVu", "B", 9)
            self.set_text_color(*_MUTED)
            self.cell(0, 5, f"{TITLE} \u00b7 {v['period']}", new_x="LMARGIN", new_y="NEXT")
            self.set_draw_color(*_RULE)
            self.line(self.l_margin, self.get_y() + 1, self.w - self.r_margin, self.get_y() + 1)
            self.ln(4)
            self.set_text_color(*_INK)

        def footer(self):
            self.set_y(-12)
            self.set_font("DejaVu", "", 8)
            self.set_text_color(*_MUTED)
            self.cell(0, 5, f"As recorded by {v['as_recorded_by']} \u00b7 rebal", align="L")
            self.set_x(self.l_margin)
            self.cell(0, 5, f"Page {self.page_no()} of {{nb}}", align="R")
            self.set_text_color(*_INK)

    pdf = _Pdf(orientation="L", unit="mm", format="A4")
    fonts = _font_dir()
    pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    # No wall clock in the bytes: the document is dated by the period it reports.
    pdf.set_creation_date(report.period.ends_at)
    pdf.set_title(f"{TITLE} {v['period_key']}")
    pdf.set_subject("Supervisory review of rebalancing recommendations")
    pdf.set_author("rebal")
    pdf.set_creator("rebal supervision")
    pdf.set_lang("en-US")
    pdf.set_auto_page_break(True, margin=16)
    pdf.set_margins(12, 10, 12)
    pdf.add_page()
    heading_style = FontFace(emphasis="B", color=_INK, fill_color=_HEAD_FILL)
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def section(title: str, note: str | None = None) -> None:
        if pdf.get_y() > pdf.h - 40:
            pdf.add_page()
        pdf.ln(3)
        pdf.set_font("DejaVu", "B", 11)
        pdf.cell(0, 6, title, new_x="LMARGIN", new_y="NEXT")
        if note:
            pdf.set_font("DejaVu", "", 8)
            pdf.set_text_color(*_MUTED)
            pdf.multi_cell(0, 4, note, new_x="LMARGIN", new_y="NEXT")
            pdf.set_text_color(*_INK)
        pdf.ln(1)

    def table(headings: list[str], rows: list[list[str]], widths: list[float], numeric: set[int] = frozenset(),
              empty: str = "None in this period.") -> None:
        pdf.set_font("DejaVu", "", 7.5)
        if not rows:
            pdf.set_text_color(*_MUTED)
            pdf.cell(0, 5, empty, new_x="LMARGIN", new_y="NEXT")
            pdf.set_text_color(*_INK)
            return
        scale = width / sum(widths) if sum(widths) > width else 1.0
        pdf.set_draw_color(*_RULE)
        with pdf.table(col_widths=[w * scale for w in widths], width=min(width, sum(widths)), align="LEFT",
                       headings_style=heading_style, line_height=4, padding=1, text_align="LEFT",
                       borders_layout="HORIZONTAL_LINES", first_row_as_headings=True,
                       cell_fill_mode="ROWS", cell_fill_color=_STRIPE) as t:
            head = t.row()
            for i, h in enumerate(headings):
                head.cell(h, align="RIGHT" if i in numeric else "LEFT")
            for values in rows:
                line = t.row()
                for i, value in enumerate(values):
                    line.cell(value, align="RIGHT" if i in numeric else "LEFT")

    # Title block
    pdf.set_font("DejaVu", "B", 18)
    pdf.cell(0, 9, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 10)
    pdf.cell(0, 6, f"Period {v['period']} (New York time) \u00b7 {v['frequency']}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 8)
    pdf.set_text_color(*_MUTED)
    pdf.multi_cell(0, 4, f"As recorded by {v['as_recorded_by']}. Policy: {v['policy_versions']}; review window "
                         f"{v['review_window']}; micro-trade limit {v['micro_trade_limit']}.",
                   new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(*_INK)
    pdf.ln(2)

    # Summary, outcomes and exception counts side by side
    top = pdf.get_y()
    pdf.set_font("DejaVu", "B", 11)
    pdf.cell(80, 6, "Summary", new_x="LMARGIN", new_y="NEXT")
    _side_table(pdf, pdf.l_margin, ["In the period", "Count"], [[s["label"], s["value"]] for s in v["summary"]],
                [58, 22], heading_style)
    left_bottom = pdf.get_y()
    pdf.set_xy(pdf.l_margin + 92, top)
    pdf.set_font("DejaVu", "B", 11)
    pdf.cell(80, 6, "Outcomes at the end of the period")
    pdf.set_xy(pdf.l_margin + 92, top + 6)
    pdf.set_font("DejaVu", "", 7.5)
    x0 = pdf.l_margin + 92
    _side_table(pdf, x0, ["Outcome", "Recommendations"],
                [[o["label"], o["count"]] for o in v["outcomes"]] + [["Total", v["outcomes_total"]]], [62, 28],
                heading_style)
    middle_bottom = pdf.get_y()
    x1 = pdf.l_margin + 192
    pdf.set_xy(x1, top)
    pdf.set_font("DejaVu", "B", 11)
    pdf.cell(80, 6, "Exceptions")
    pdf.set_xy(x1, top + 6)
    _side_table(pdf, x1, ["Kind", "Count"], [[e["label"], str(e["count"])] for e in v["exception_counts"]],
                [62, 19], heading_style)
    pdf.set_xy(pdf.l_margin, max(left_bottom, middle_bottom, pdf.get_y()) + 2)

    chain = v["chain"]
    section("Audit chain")
    pdf.set_font("DejaVu", "B" if not chain["verified"] else "", 8.5)
    if not chain["verified"]:
        pdf.set_text_color(*_ALERT)
    pdf.multi_cell(0, 4.5, chain["words"], new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(*_INK)
    pdf.set_font("DejaVu", "", 8)
    pdf.multi_cell(0, 4.5, f"Head at the end of the period: event {chain['head_seq']}, hash {chain['head_hash']}. "
                           f"Anchor: {chain['anchor']}.", new_x="LMARGIN", new_y="NEXT")

    section("Per advisor", "Time to decision from the first alert to the first decision by a person.")
    table(["Advisor", "Recommendations", "Decided", "Median", "Mean", "Longest", "Auto-approved", "Deferred",
           "Escalated"],
          [[a["advisor"], a["recommendations"], a["decided"], a["median"], a["mean"], a["longest"],
            a["auto_approved"], a["deferred"], a["escalated"]] for a in v["advisors"]],
          [58, 32, 18, 22, 22, 22, 30, 34, 35], {1, 2, 3, 4, 5, 6, 7, 8})

    section("Exceptions")
    table(["Kind", "When", "Subject", "Advisor", "Recommendation", "Detail"],
          [[e["kind"], e["when"], e["subject"], e["advisor"], e["recommendation"], e["detail"]]
           for e in v["exceptions"]], [44, 26, 34, 18, 34, 117])

    section("Decisions", "Who decided, when (New York time), how, and why; the gate's verdict if it ran in the period.")
    table(["When", "Recommendation", "Subject", "Action", "By", "Via", "Reason", "Detail", "Gate"],
          [[d["when"], d["recommendation"], d["subject"], d["action"], d["by"], d["via"], d["reason"], d["detail"],
            d["gate"]] for d in v["decisions"]], [27, 30, 20, 25, 36, 12, 53, 59, 11])

    section("Modifications")
    table(["When", "Recommendation", "Subject", "By", "Reason", "What changed"],
          [[d["when"], d["recommendation"], d["subject"], d["by"], d["reason"], d["detail"]]
           for d in v["modifications"]], [24, 30, 26, 40, 70, 83])

    section("Deferrals")
    table(["When", "Recommendation", "Subject", "By", "Reason", "Until"],
          [[d["when"], d["recommendation"], d["subject"], d["by"], d["reason"], d["detail"]]
           for d in v["deferrals"]], [24, 30, 26, 40, 100, 53])

    section("Escalations")
    table(["When", "Recommendation", "Subject", "Advisor", "Route", "By", "Reason"],
          [[x["when"], x["recommendation"], x["subject"], x["advisor"], x["route"], x["by"], x["reason"]]
           for x in v["escalations"]], [27, 30, 26, 18, 34, 44, 94])

    section("Wash-sale overrides", "Buys kept although they wash a loss, with the advisor's documented reason.")
    table(["Day", "Account", "Symbol", "By", "Recorded", "Reason", "Recommendation", "Disallowed loss"],
          [[o["as_of"], o["account"], o["symbol"], o["by"], o["when"], o["reason"], o["recommendation"],
            o["disallowed"]] for o in v["overrides"]], [20, 20, 16, 22, 26, 100, 34, 28], {7})

    section("Recommendations of the period")
    table(["As of", "Recommendation", "Advisor", "Subject", "Kind", "Trade value", "Outcome", "First alert",
           "First decision", "Time to decision"],
          [[x["as_of"], x["recommendation"], x["advisor"], x["subject"], x["kind"], x["trade_value"], x["outcome"],
            x["alerted"], x["decided"], x["hours"]] for x in v["recommendations"]],
          [20, 30, 16, 32, 18, 24, 50, 26, 26, 24], {5, 9})

    section("Definitions")
    pdf.set_font("DejaVu", "", 7.5)
    for text in v["definitions"]:
        pdf.multi_cell(0, 4, f"\u2022 {text}", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _side_table(pdf, x: float, headings: list[str], rows: list[list[str]], widths: list[float], style) -> None:
    """A small two-column table starting at x (the summary block's middle and right columns)."""
    pdf.set_font("DejaVu", "B", 7.5)
    pdf.set_fill_color(*_HEAD_FILL)
    pdf.set_draw_color(*_RULE)
    pdf.set_x(x)
    pdf.cell(widths[0], 5, headings[0], border="B", fill=True)
    pdf.cell(widths[1], 5, headings[1], border="B", fill=True, align="R", new_x="LMARGIN", new_y="NEXT")
    for i, (label, value) in enumerate(rows):
        last = i == len(rows) - 1
        pdf.set_font("DejaVu", "B" if last and label == "Total" else "", 7.5)
        pdf.set_fill_color(*_STRIPE)
        pdf.set_x(x)
        pdf.cell(widths[0], 5, label, border="B", fill=i % 2 == 1)
        pdf.cell(widths[1], 5, value, border="B", align="R", fill=i % 2 == 1, new_x="LMARGIN", new_y="NEXT")
    if not rows:
        pdf.set_x(x)
        pdf.cell(sum(widths), 5, "None", new_x="LMARGIN", new_y="NEXT")


def render_all(report: SupervisoryReport) -> dict[str, bytes]:
    return {"html": html_report(report), "pdf": pdf_report(report), "csv": csv_report(report)}
