"""What the messages are sent with: the comms part of `RebalSettings`, as the senders need it.

`CommsSettings.from_settings(s)` takes the one typed settings object (rebal_pipeline/settings.py,
validated when it was loaded: a malformed number or flag never gets here) and answers the
questions a send asks:

| question | variables | when it cannot be answered |
|---|---|---|
| `relay()` | `REBAL_SMTP_*` | `SmtpConfigError` (set REBAL_SMTP_HOST, …): the message waits for a retry |
| `link_secret()` | `REBAL_LINK_SECRET` | `Transient`: the links cannot be signed, the message waits |
| `public_url`, `link_ttl` | `REBAL_PUBLIC_URL` (`http://127.0.0.1:8000`), `REBAL_LINK_TTL_HOURS` (72) | — |
| `confirmation_style`, `firm_name()` | `REBAL_CLIENT_CONFIRMATION` (simple), `REBAL_FIRM_NAME` (the From display name) | — |
| `crm_style()`, `crm_client()` | `REBAL_CRM`, `REBAL_WEALTHBOX_*` / `REBAL_REDTAIL_*`, `REBAL_CRM_MAX_ATTEMPTS` (5) | `Transient`: ambiguous or unusable CRM settings are retried |

Why errors are `Transient` (a retry), not failures: they are fixed on our side, after which the
queued messages go out (comms/outbound.py). None of these messages ever shows a secret's value.

In Dagster the settings arrive as resources (resources.py: `EmailResource`, `CrmResource`,
`LinksResource`), built from the same `RebalSettings` in `resources_for`; the ops turn them back
into one `CommsSettings` (`comms_settings`). Tests build a `RebalSettings` (`load_settings({...})`)
instead of setting environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from email.utils import parseaddr

from rebal_pipeline.comms import smtp
from rebal_pipeline.comms.crm import RedtailStyleClient, RetryPolicy, WealthboxStyleClient
from rebal_pipeline.comms.outbound import Transient
from rebal_pipeline.settings import RebalSettings, SettingsError

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
CONFIRMATION_STYLES = ("simple", "detailed")

CrmClient = WealthboxStyleClient | RedtailStyleClient


@dataclass(frozen=True)
class CommsSettings:
    settings: RebalSettings

    @classmethod
    def from_settings(cls, settings: RebalSettings) -> "CommsSettings":
        return cls(settings)

    # --- the approval clock (a CRM task is due at the reminder; a reminder names the escalation)
    def approval_clock(self):
        """The LifecyclePolicy in force (the drift policy file REBAL_DRIFT_POLICY names, with
        REBAL_REMINDER_HOURS / REBAL_ESCALATION_HOURS on top: workflow/lifecycle.py, the one home
        of that override). A policy that cannot be used is a retry, not a lost message."""
        from rebal_pipeline.workflow.lifecycle import lifecycle_policy

        try:
            return lifecycle_policy(rebal_settings=self.settings)
        except ValueError as exc:
            raise Transient(str(exc)) from None

    # --- the mail relay ------------------------------------------------------------------------
    def relay(self) -> smtp.SmtpSettings:
        return smtp.SmtpSettings.from_settings(self.settings)

    # --- one-click links -----------------------------------------------------------------------
    def link_secret(self) -> bytes:
        try:
            return self.settings.link_secret()
        except SettingsError as exc:
            # Fixed on our side, after which the queued emails go out: a retry, not a rejection.
            raise Transient(f"{exc} The one-click links cannot be signed.") from None

    @property
    def public_url(self) -> str:
        """The approval API as advisors reach it; links are `<url>/links/<token>`."""
        return (self.settings.public_url or DEFAULT_PUBLIC_URL).rstrip("/")

    @property
    def link_ttl(self) -> timedelta:
        """How long a link in an email stays valid, from the message's first attempt."""
        return timedelta(hours=self.settings.link_ttl_hours)

    # --- client confirmations --------------------------------------------------------------------
    @property
    def confirmation_style(self) -> str:
        """The firm's default (a household's own setting in households.csv wins over it)."""
        return self.settings.client_confirmation

    def firm_name(self, smtp_from: str) -> str:
        """REBAL_FIRM_NAME, else the display name of the From address, else its domain."""
        name = (self.settings.firm_name or "").strip()
        if name:
            return name
        display, address = parseaddr(smtp_from)
        return display.strip() or address.rsplit("@", 1)[-1]

    # --- the CRM -------------------------------------------------------------------------------
    def crm_style(self) -> str | None:
        """Which CRM is configured: REBAL_CRM (wealthbox | redtail | none), else the one whose base
        URL is set; None when none is. Both set without REBAL_CRM is ambiguous: an error (retried)."""
        chosen = self.settings.crm
        if chosen == "none":
            return None
        if chosen:
            return chosen
        present = [style for style, url in (("wealthbox", self.settings.wealthbox_base_url),
                                            ("redtail", self.settings.redtail_base_url)) if url]
        if len(present) > 1:
            raise Transient("both REBAL_WEALTHBOX_BASE_URL and REBAL_REDTAIL_BASE_URL are set: "
                            "choose one with REBAL_CRM")
        return present[0] if present else None

    def crm_configured(self) -> bool:
        """A CRM is meant to be used (even if its settings turn out to be broken: then it is retried)."""
        try:
            return self.crm_style() is not None
        except Transient:
            return True

    def crm_client(self) -> CrmClient | None:
        """The configured CRM client (None: no CRM). Its in-run retries are bounded by
        REBAL_CRM_MAX_ATTEMPTS (default 5); beyond them the outbox retries later."""
        style = self.crm_style()
        if style is None:
            return None
        attempts = self.settings.crm_max_attempts
        retry = RetryPolicy(max_attempts=attempts) if attempts else RetryPolicy()
        try:
            if style == "wealthbox":
                return WealthboxStyleClient.from_settings(self.settings, retry=retry)
            return RedtailStyleClient.from_settings(self.settings, retry=retry)
        except ValueError as exc:  # missing settings; the messages name variables, never values
            raise Transient(f"the {style} CRM settings are not usable: {exc}") from None
