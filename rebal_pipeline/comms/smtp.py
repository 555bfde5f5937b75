"""Email delivery over SMTP (smtplib), settings from `RebalSettings` (the environment only).

Settings (`SmtpSettings.from_settings`):

| variable | default | meaning |
|---|---|---|
| `REBAL_SMTP_HOST` | — (required) | the relay's host name |
| `REBAL_SMTP_PORT` | 587 with STARTTLS, else 25 | the relay's port |
| `REBAL_SMTP_USERNAME` | — | log in with this user (only over TLS, see below) |
| `REBAL_SMTP_PASSWORD` | — | its password (never logged, not in repr) |
| `REBAL_SMTP_STARTTLS` | `true` | `true`/`false`: upgrade with STARTTLS, certificate verified |
| `REBAL_SMTP_FROM` | — (required) | the From address, e.g. `rebal <alerts@example-ria.com>` |
| `REBAL_SMTP_TIMEOUT` | `30` | seconds for connecting and for each SMTP command |
| `REBAL_SMTP_CA_FILE` | system trust store | a PEM bundle to trust instead (a private relay's CA) |

With STARTTLS on, a relay that does not offer it is an error (no silent downgrade), and the
certificate and host name are verified. A password is never sent over an unencrypted connection
except to a loopback relay (a local MTA / sidecar).

Exactly-once. SMTP has no idempotent "send": a crash after the relay accepted a message and
before the caller recorded it leads to a second send. So:

1. the caller derives the Message-ID from its idempotency key with `make_message_id(key, domain)`
   (key e.g. `alert:<recommendation_id>:<advisor_id>`, `reminder:<recommendation_id>`,
   `escalation:<recommendation_id>`, `digest:<advisor_id>:<week>`, `client:<execution_id>`) and
   passes it to the email builder;
2. it records "sending <key>" in the workflow store, calls `send`, then records "sent <key> as
   <Message-ID>" — a record of "sent" means never send again (the outbox pattern);
3. a retry after a crash between the two records sends the same message with the same
   Message-ID: a duplicate at most, and a recognisable one (mail stores and clients that
   de-duplicate do it by Message-ID; the audit trail ties both sends to one key).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from rebal_pipeline.settings import RebalSettings

log = logging.getLogger("rebal.comms.smtp")

_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$")


class SmtpConfigError(ValueError):
    """The SMTP settings (REBAL_SMTP_*) are missing or malformed."""


def make_message_id(key: str, domain: str) -> str:
    """A deterministic Message-ID for an idempotency key: `<rebal.<sha256(key)[:40]>@<domain>>`.

    The same key gives the same Message-ID (a re-sent email is recognisably the same one); the
    key itself, which may contain ids, is not readable from it. domain: the sending domain."""
    if not key:
        raise ValueError("make_message_id: empty idempotency key")
    if not _DOMAIN.match(domain or ""):
        raise ValueError(f"make_message_id: {domain!r} is not a domain name")
    digest = hashlib.sha256(f"rebal-message-id/v1\x00{key}".encode()).hexdigest()[:40]
    return f"<rebal.{digest}@{domain.lower()}>"


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    sender: str
    port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True
    timeout: float = 30.0
    ca_file: str | None = None
    # For tests and special set-ups: the TLS context to verify the relay with (default: the
    # system trust store, or ca_file). Verification is never turned off here.
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: "RebalSettings") -> "SmtpSettings":
        """The relay of rebal's settings (REBAL_SMTP_*; typed and validated when they were loaded).
        Port: REBAL_SMTP_PORT, else 587 with STARTTLS and 25 without."""
        host, sender = (settings.smtp_host or "").strip(), (settings.smtp_from or "").strip()
        missing = [n for n, v in (("REBAL_SMTP_HOST", host), ("REBAL_SMTP_FROM", sender)) if not v]
        if missing:
            raise SmtpConfigError(f"set {', '.join(missing)}")
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(host=host, sender=sender, port=settings.smtp_port or (587 if settings.smtp_starttls else 25),
                   username=settings.smtp_username or None, password=password or None,
                   starttls=settings.smtp_starttls, timeout=settings.smtp_timeout,
                   ca_file=settings.smtp_ca_file or None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SmtpSettings":
        """`from_settings` of the settings in `environ` (default: the process environment)."""
        from rebal_pipeline.settings import SettingsError, load_settings

        try:
            return cls.from_settings(load_settings(environ))
        except SettingsError as exc:
            raise SmtpConfigError(str(exc)) from None

    def tls_context(self) -> ssl.SSLContext:
        if self.ssl_context is not None:
            return self.ssl_context
        return ssl.create_default_context(cafile=self.ca_file)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def send(message: EmailMessage, settings: SmtpSettings) -> str:
    """Send `message` through the relay; returns its Message-ID.

    The message must carry a Message-ID (from `make_message_id`: see the module's note on
    exactly-once). From defaults to settings.sender, Date is stamped now when absent. Raises
    smtplib.SMTPException / OSError on failure (nothing is retried here: the caller's outbox
    decides), SmtpConfigError for a set-up that would leak the password."""
    message_id = message.get("Message-ID")
    if not message_id:
        raise ValueError("send: the message has no Message-ID (use make_message_id with an idempotency key)")
    if settings.username and not settings.starttls and not _is_loopback(settings.host):
        raise SmtpConfigError("refusing to send SMTP credentials over an unencrypted connection; "
                              "set REBAL_SMTP_STARTTLS=true")
    if not message.get("From"):
        message["From"] = settings.sender
    if not message.get("Date"):
        message["Date"] = format_datetime(datetime.now(timezone.utc))
    with smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as client:
        client.ehlo()
        if settings.starttls:
            # Raises SMTPNotSupportedError when the relay does not offer STARTTLS: no downgrade.
            client.starttls(context=settings.tls_context())
            client.ehlo()
        if settings.username:
            client.login(settings.username, settings.password or "")
        refused = client.send_message(message)
    if refused:
        # Some recipients were refused, at least one accepted: report it without the addresses.
        log.warning("message %s: %d recipient(s) refused by the relay", message_id, len(refused))
    log.info("message %s sent via %s:%d (%s)", message_id, settings.host, settings.port,
             "starttls" if settings.starttls else "plain")
    return message_id
