"""The report as HTML, PDF and CSV: the same bytes for the same period (twice, and after the
period has moved on), the figures in every format, a self-contained HTML page, a real PDF; page
1 rendered to rebal_pipeline_tests/supervision/output/supervisory_report_page1.png (pdftoppm)
for checking by eye."""

import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rebal_pipeline.supervision.render import CSV_COLUMNS, csv_report, html_report, pdf_report, render_all
from rebal_pipeline.supervision.report import build_report
from rebal_pipeline_tests.supervision.conftest import ESCALATE_REASON, WEEK, after_the_period

OUTPUT = Path(__file__).parent / "output"


def rendered(book):
    with book.store.begin() as conn:
        return render_all(build_report(conn, WEEK, anchors=book.anchors, wash_sale_overrides=book.overrides))


def test_the_same_period_gives_the_same_bytes_in_every_format(book):
    first = rendered(book)
    assert rendered(book) == first
    after_the_period(book.store)  # a decision after the period changes nothing in it
    assert rendered(book) == first
    assert set(first) == {"html", "pdf", "csv"}


def test_the_csv_carries_the_figures(book):
    rows = list(csv.DictReader(io.StringIO(rendered(book)["csv"].decode("utf-8"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    outcome = {r["item"]: int(r["value"]) for r in rows if r["section"] == "outcome"}
    assert outcome == {"approved": 2, "deferred": 1, "modified": 1, "escalated": 2, "auto_approved": 1}
    advisor = {(r["advisor_id"], r["item"]): r for r in rows if r["section"] == "advisor"}
    assert advisor[("ADV-1", "median_hours_to_decision")]["hours"] == "5.0"
    assert advisor[("ADV-1", "mean_hours_to_decision")]["hours"] == "10.5"
    assert advisor[("ADV-2", "escalated")]["value"] == "2" and advisor[("ADV-2", "escalated")]["detail"] == "0.6667"
    assert sum(1 for r in rows if r["section"] == "decision") == 7
    assert [r["item"] for r in rows if r["section"] == "exception"] == [
        "past_review_window", "outside_bands", "outside_bands", "outside_bands", "micro_trade_auto_approval",
        "suspended_account", "data_quality_hold"]
    assert not any("ACC-" in value for r in rows for value in r.values())  # account numbers masked


def test_the_html_is_escaped_and_self_contained(book):
    html = rendered(book)["html"].decode("utf-8")
    assert "default-src 'none'" in html
    assert not re.search(r"<(script|img|link|iframe|object)\b", html, re.I)
    assert not re.search(r"(src|href)\s*=", html, re.I) and "url(" not in html and "@import" not in html
    # A reason is text: its quote is escaped, and the account number in it masked.
    assert "Request from the client&#39;s attorney about \u2022\u2022\u2022\u20222001" in html
    assert ESCALATE_REASON not in html
    assert '<td class="num" data-outcome="approved">2</td>' in html
    assert re.search(r'<tr data-advisor="ADV-1">.*?<td class="num">5\.0 h</td><td class="num">10\.5 h</td>', html)
    assert html.count('data-exception="outside_bands"') == 3


def test_the_pdf_is_a_real_pdf_with_the_figures(book):
    pdf = rendered(book)["pdf"]
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    pages = int(re.search(rb"/Count (\d+)", pdf).group(1))
    assert pages == len(re.findall(rb"/Type /Page\b(?!s)", pdf)) == 3
    assert b"/CreationDate (D:20261123050000Z)" in pdf  # the period's end (00:00 New York), not "now"
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) not installed: the PDF's text is not checked")
    text = subprocess.run(["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    assert "Supervisory review report" in text and "Page 1 of 3" in text
    assert re.search(r"Dana Advisor \(ADV-1\)\s+4\s+4\s+5\.0 h\s+10\.5 h\s+30\.0 h\s+0\s+1 \(25\.0%\)\s+0 \(0\.0%\)", text)
    assert re.search(r"Sam Advisor \(ADV-2\)\s+3\s+1\s+10\.0 h\s+10\.0 h\s+10\.0 h\s+1\s+0 \(0\.0%\)\s+2 \(66\.7%\)", text)
    assert re.search(r"Still outside its bands\s+3", text) and re.search(r"Total\s+7", text)
    assert "\u2022\u2022\u2022\u20221001" in text and "ACC-0001001" not in text


def test_page_one_rendered_for_checking_by_eye(book, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) not installed: apt-get install -y poppler-utils")
    OUTPUT.mkdir(exist_ok=True)
    pdf = tmp_path / "supervisory_report.pdf"
    pdf.write_bytes(rendered(book)["pdf"])
    subprocess.run(["pdftoppm", "-png", "-r", "110", "-f", "1", "-l", "1", "-singlefile", str(pdf),
                    str(OUTPUT / "supervisory_report_page1")], check=True, timeout=60)
    png = OUTPUT / "supervisory_report_page1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_format_on_its_own_is_the_same_as_render_all(book):
    with book.store.begin() as conn:
        report = build_report(conn, WEEK, anchors=book.anchors, wash_sale_overrides=book.overrides)
    assert render_all(report) == {"html": html_report(report), "pdf": pdf_report(report), "csv": csv_report(report)}
