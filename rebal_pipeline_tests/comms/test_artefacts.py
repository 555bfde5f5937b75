"""Rendered emails saved for checking by eye, under rebal_pipeline_tests/comms/output/ (git-ignored):
the HTML (inline chart rewritten to a file next to it, as a mail client shows it), the raw .eml,
and — when Debian's headless `chromium` is installed — a PNG screenshot of each page."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from rebal_pipeline.comms import emails
from rebal_pipeline.comms.emails import DigestItem, ExecutedTrade
from rebal_pipeline.comms.smtp import make_message_id
from rebal_pipeline_tests.comms.fixtures import (
    ACCOUNT_ID, ACCOUNT_NUMBER, CLIENT_NAME, LINKS, PUBLISHED_AT, make_package,
)
from rebal_pipeline_tests.comms.reading import parse, png_size

OUTPUT = Path(__file__).parent / "output"
DOMAIN = "example-ria.com"
SENDER = f"rebal <alerts@{DOMAIN}>"
WINDOW_WIDTH = 760
SCREENSHOTS = ("advisor_alert", "reminder", "escalation", "weekly_digest", "client_confirmation_detailed",
               "client_confirmation_simple")


def _messages() -> dict:
    package = make_package()
    numbers = {ACCOUNT_ID: ACCOUNT_NUMBER}
    trades = [ExecutedTrade.from_package(t, description) for t, description in zip(package.trades, (
        "Vanguard Total Stock Market ETF", "Vanguard Real Estate ETF", "Schwab U.S. REIT ETF",
        "Vanguard Total Bond Market ETF"))]
    confirmation = dict(client_name=CLIENT_NAME, account_number=ACCOUNT_NUMBER, executed_on=date(2026, 11, 23),
                        sender=SENDER, to="client@example.com", firm_name="Example Wealth Partners",
                        advisor_name="Dana Advisor", trades=trades)
    return {
        "advisor_alert": emails.advisor_alert(
            package, client_name=CLIENT_NAME, links=LINKS, sender=SENDER, to="dana@example-ria.com",
            message_id=make_message_id("alert:REC-1:ADV-1", DOMAIN), account_numbers=numbers,
            advisor_name="Dana Advisor"),
        "reminder": emails.reminder(
            package, client_name=CLIENT_NAME, links=LINKS, alerted_at=PUBLISHED_AT,
            escalates_at=datetime(2026, 11, 22, 21, 30, tzinfo=timezone.utc), sender=SENDER,
            to="dana@example-ria.com", message_id=make_message_id("reminder:REC-1", DOMAIN), account_numbers=numbers,
            advisor_name="Dana Advisor"),
        "escalation": emails.escalation(
            package, client_name=CLIENT_NAME, advisor_name="Dana Advisor", advisor_id="ADV-1",
            pending_since=PUBLISHED_AT, escalated_at=datetime(2026, 11, 22, 21, 30, tzinfo=timezone.utc),
            links={"review": LINKS["review"]}, sender=SENDER, to="cco@example-ria.com",
            message_id=make_message_id("escalation:REC-1", DOMAIN), account_numbers=numbers,
            compliance_name="Chris Compliance"),
        "weekly_digest": emails.weekly_digest(
            [DigestItem(package, CLIENT_NAME, LINKS["review"], numbers),
             DigestItem(make_package(recommendation_id="REC-2", scope_id="ACC-0099", account_ids=["ACC-0099"],
                                     kind="harvest"), "Morgan Client", LINKS["review"] + "2")],
            advisor_name="Dana Advisor", week_ending=date(2026, 11, 20), sender=SENDER, to="dana@example-ria.com",
            message_id=make_message_id("digest:ADV-1:2026-W47", DOMAIN)),
        "client_confirmation_detailed": emails.client_confirmation(
            style="detailed", message_id=make_message_id("client:EXE-1", DOMAIN), **confirmation),
        "client_confirmation_simple": emails.client_confirmation(
            style="simple", message_id=make_message_id("client:EXE-2", DOMAIN), **confirmation),
    }


def _write(path: Path, data: bytes) -> None:
    """Atomically (test workers running in parallel may write the same artefacts)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


@pytest.fixture(scope="module")
def saved() -> dict[str, Path]:
    OUTPUT.mkdir(exist_ok=True)
    pages = {}
    for name, message in _messages().items():
        raw = message.as_bytes()
        _write(OUTPUT / f"{name}.eml", raw)
        mail = parse(raw)
        html = mail.get_body(("html",)).get_content()
        for number, image in enumerate(p for p in mail.walk() if p.get_content_type() == "image/png"):
            picture = OUTPUT / f"{name}_image{number}.png"
            _write(picture, image.get_content())
            html = html.replace("cid:" + image["Content-ID"].strip("<>"), picture.name)
        _write(OUTPUT / f"{name}.html", html.encode("utf-8"))
        _write(OUTPUT / f"{name}.txt", mail.get_body(("plain",)).get_content().encode("utf-8"))
        pages[name] = OUTPUT / f"{name}.html"
    return pages


def test_rendered_emails_are_saved_for_checking_by_eye(saved):
    for name, page in saved.items():
        assert page.stat().st_size > 1000, name
        assert "cid:" not in page.read_text(encoding="utf-8")
    assert png_size((OUTPUT / "advisor_alert_image0.png").read_bytes()) == (1280, 640)


def _trim(png: Path, background=(243, 244, 246)) -> tuple[int, int]:
    """Cut the empty page background below the email (the window is taller than the page)."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        bottom = height
        pixels = rgb.load()
        while bottom > 1 and all(pixels[x, bottom - 1] == background for x in range(0, width, 4)):
            bottom -= 1
        rgb.crop((0, 0, width, min(height, bottom + 16))).save(png)
        return width, min(height, bottom + 16)


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (./run test installs it as root): HTML saved only")
def test_screenshots_of_the_rendered_emails(saved, tmp_path):
    for name in SCREENSHOTS:
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}",
             f"--window-size={WINDOW_WIDTH},3200", saved[name].as_uri()],
            check=True, capture_output=True, timeout=120,
        )
        width, height = _trim(shot)
        assert width == WINDOW_WIDTH and 300 < height < 3200, (name, height)
        _write(OUTPUT / f"{name}.png", shot.read_bytes())
