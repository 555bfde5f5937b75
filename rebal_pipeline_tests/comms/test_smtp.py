"""The advisor alert through a real SMTP server (aiosmtpd on 127.0.0.1): what the advisor's mail
client receives — numbers, masked account, both parts, the inline chart, exactly the signed links —
plus STARTTLS with a certificate made in the test, login over TLS only, and Message-IDs that stay
the same for the same idempotency key."""

from __future__ import annotations

import logging
import smtplib
import ssl

import pytest

from rebal_pipeline.comms import emails
from rebal_pipeline.comms.chart import CHART_HEIGHT_PX, CHART_WIDTH_PX
from rebal_pipeline.comms.smtp import SmtpConfigError, SmtpSettings, make_message_id, send
from rebal_pipeline_tests.comms.fixtures import ACCOUNT_ID, ACCOUNT_NUMBER, CLIENT_NAME, LINKS, make_package
from rebal_pipeline_tests.comms.peers import make_self_signed_cert, smtp_server
from rebal_pipeline_tests.comms.reading import parse, png_size, read_html

DOMAIN = "example-ria.com"
ADVISOR = "dana@example-ria.com"


def alert(key: str = "alert:9f2c1e0a:ADV-1"):
    return emails.advisor_alert(
        make_package(), client_name=CLIENT_NAME, links=LINKS, sender=f"rebal <alerts@{DOMAIN}>", to=ADVISOR,
        message_id=make_message_id(key, DOMAIN), account_numbers={ACCOUNT_ID: ACCOUNT_NUMBER},
        advisor_name="Dana Advisor",
    )


def plain(peer) -> SmtpSettings:
    return SmtpSettings.from_env({"REBAL_SMTP_HOST": peer.host, "REBAL_SMTP_PORT": str(peer.port),
                                  "REBAL_SMTP_STARTTLS": "false", "REBAL_SMTP_FROM": f"alerts@{DOMAIN}",
                                  "REBAL_SMTP_TIMEOUT": "5"})


def test_the_advisor_receives_the_alert_with_its_numbers_chart_and_exactly_the_signed_links(caplog):
    caplog.set_level(logging.DEBUG, logger="rebal")
    with smtp_server() as peer:
        message_id = send(alert(), plain(peer))
    assert len(peer.messages) == 1
    received = peer.messages[0]
    assert received.rcpt_tos == [ADVISOR]
    mail = parse(received.data)
    assert mail["Message-ID"] == message_id
    assert mail["Date"] and mail["From"] == f"rebal <alerts@{DOMAIN}>"
    assert "••••4321" in mail["Subject"] and ACCOUNT_NUMBER not in mail["Subject"]

    # Both parts, and the chart inline in a multipart/related next to the HTML.
    assert mail.get_content_type() == "multipart/alternative"
    text = mail.get_body(("plain",)).get_content()
    html_part = mail.get_body(("html",))
    html = html_part.get_content()
    [image] = [p for p in mail.walk() if p.get_content_type() == "image/png"]
    assert image.get_content_disposition() == "inline"
    assert png_size(image.get_content()) == (CHART_WIDTH_PX, CHART_HEIGHT_PX)
    page = read_html(html)
    assert page.images == ["cid:" + image["Content-ID"].strip("<>")]

    # Exactly the links passed in (each action twice: top and bottom of the email), nothing else.
    assert set(page.links) == set(LINKS.values())
    assert sorted(page.links) == sorted(list(LINKS.values()) * 2)
    for url in LINKS.values():
        assert url in text

    for body in (text, page.text):
        # The masked account only; the full number never.
        assert "••••4321" in body and ACCOUNT_NUMBER not in body
        assert CLIENT_NAME in body  # "&" escaped in the HTML source, shown as "&" to the reader
        # Drift, trades, tax, as formatted numbers.
        assert "+11.54%" in body and "-8.50%" in body and "±5.00%" in body and "66.54%" in body
        assert "120" in body and "VTI" in body and "$30,162.00" in body
        assert "412.3456" in body and "$30,018.76" in body
        assert "Substitute for VNQ" in body
        assert "$1,733.42" in body and "2.57%" in body  # est. tax and net % of trade value
        assert "$1,840.25" in body and "$6,420.10" in body and "$1,187.50" in body  # ST, LT, losses
        assert "$212.50" in body  # wash-sale disallowed
        assert "9 Dec 2026" in body and "$331.25" in body  # wait for long-term
        assert "do not buy VNQ (wash group reit_msci)" in body
        assert "growth-60-40@7c1d2e3f" in body and "2026.1+3fa85f64" in body
    assert "Avery &amp; Jordan Client" in html
    rows = page.text.splitlines()  # one line per table row, cells joined by " | "
    assert "Sell | 120 | VTI | $30,162.00 | Rebalance |" in rows
    assert "Buy | 412.3456 | BND | $30,018.76 | Rebalance |" in rows
    assert "Equity | 66.54% | 55.00% | +11.54% | ±5.00% | Outside band |" in rows
    assert "Cash | 1.00% | 3.00% | -2.00% | ±2.00% | Inside |" in rows  # exactly at the band is inside
    # This year's figure, labelled as such (issue #14: the §1211(b) limit applies to net losses).
    assert "Estimated tax this year | $1,733.42 | Realized losses | $1,187.50 |" in rows

    # No PII in the logs: neither the client, nor the account number, nor an address.
    assert message_id in caplog.text
    for secret in (CLIENT_NAME, "Avery", ACCOUNT_NUMBER, ADVISOR, "Dana"):
        assert secret not in caplog.text


def test_the_same_idempotency_key_sends_the_same_message_id():
    with smtp_server() as peer:
        first = send(alert("alert:9f2c1e0a:ADV-1"), plain(peer))
        again = send(alert("alert:9f2c1e0a:ADV-1"), plain(peer))
        other = send(alert("reminder:9f2c1e0a"), plain(peer))
    received = [parse(m.data)["Message-ID"] for m in peer.messages]
    assert received == [first, again, other]
    assert first == again == make_message_id("alert:9f2c1e0a:ADV-1", DOMAIN)
    assert other != first


def test_starttls_with_a_verified_certificate_and_login_over_tls(tmp_path):
    cert = make_self_signed_cert(tmp_path)
    users = {"rebal-relay": "s3cret-password"}
    with smtp_server(tls_context=cert.server_context(), users=users) as peer:
        settings = SmtpSettings.from_env({
            "REBAL_SMTP_HOST": peer.host, "REBAL_SMTP_PORT": str(peer.port), "REBAL_SMTP_STARTTLS": "true",
            "REBAL_SMTP_USERNAME": "rebal-relay", "REBAL_SMTP_PASSWORD": "s3cret-password",
            "REBAL_SMTP_FROM": f"alerts@{DOMAIN}", "REBAL_SMTP_CA_FILE": str(cert.cert_path),
            "REBAL_SMTP_TIMEOUT": "5",
        })
        assert "s3cret" not in repr(settings)
        message_id = send(alert(), settings)
    [received] = peer.messages
    assert received.tls and received.login == "rebal-relay"
    assert parse(received.data)["Message-ID"] == message_id


def test_starttls_refuses_a_relay_whose_certificate_is_not_trusted(tmp_path):
    served = make_self_signed_cert(tmp_path / "relay")
    other = make_self_signed_cert(tmp_path / "other", common_name="someone-else")
    with smtp_server(tls_context=served.server_context()) as peer:
        settings = SmtpSettings(host=peer.host, port=peer.port, sender=f"alerts@{DOMAIN}", starttls=True,
                                timeout=5, ca_file=str(other.cert_path))
        with pytest.raises(ssl.SSLCertVerificationError):
            send(alert(), settings)
    assert peer.messages == []


def test_starttls_configured_but_not_offered_fails_instead_of_sending_in_clear():
    with smtp_server() as peer:  # no TLS on this relay
        settings = SmtpSettings(host=peer.host, port=peer.port, sender=f"alerts@{DOMAIN}", starttls=True, timeout=5)
        with pytest.raises(smtplib.SMTPNotSupportedError):
            send(alert(), settings)
    assert peer.messages == []


def test_a_relay_requiring_starttls_refuses_a_plain_client(tmp_path):
    cert = make_self_signed_cert(tmp_path)
    with smtp_server(tls_context=cert.server_context()) as peer:
        with pytest.raises(smtplib.SMTPException):
            send(alert(), plain(peer))
    assert peer.messages == []


def test_credentials_are_never_sent_without_tls_to_a_remote_relay():
    settings = SmtpSettings(host="smtp.example-ria.com", port=25, sender=f"alerts@{DOMAIN}", starttls=False,
                            username="rebal", password="pw")
    with pytest.raises(SmtpConfigError):
        send(alert(), settings)


def test_settings_come_from_the_environment_with_defaults():
    settings = SmtpSettings.from_env({"REBAL_SMTP_HOST": "smtp.example-ria.com", "REBAL_SMTP_FROM": "a@b.com"})
    assert (settings.port, settings.starttls, settings.timeout, settings.username) == (587, True, 30.0, None)
    assert SmtpSettings.from_env({"REBAL_SMTP_HOST": "h", "REBAL_SMTP_FROM": "a@b.com",
                                  "REBAL_SMTP_STARTTLS": "false"}).port == 25
    with pytest.raises(SmtpConfigError, match="REBAL_SMTP_HOST"):
        SmtpSettings.from_env({"REBAL_SMTP_FROM": "a@b.com"})
    with pytest.raises(SmtpConfigError, match="true or false"):
        SmtpSettings.from_env({"REBAL_SMTP_HOST": "h", "REBAL_SMTP_FROM": "a@b.com", "REBAL_SMTP_STARTTLS": "maybe"})


def test_message_ids_are_deterministic_and_do_not_reveal_the_key():
    mid = make_message_id("alert:REC-1:ADV-1", DOMAIN)
    assert mid == make_message_id("alert:REC-1:ADV-1", DOMAIN)
    assert mid.startswith("<rebal.") and mid.endswith(f"@{DOMAIN}>") and "REC-1" not in mid
    with pytest.raises(ValueError):
        make_message_id("k", "not a domain>")
