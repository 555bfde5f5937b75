"""The versioned drift policy: tiers, bands, urgency, tax-sensitive rules.

Loaded from a YAML file (default: rebal_pipeline/policies/drift_policy.yaml, or the path in
REBAL_DRIFT_POLICY) and validated here at the boundary. The version id recorded on every
drift row and alert is `<version>+<first 12 hex of the file's SHA-256>`, so an edited file
that forgot to bump its version is still told apart.
"""

from __future__ import annotations

import hashlib
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_POLICY_FILE = Path(__file__).resolve().parents[1] / "policies" / "drift_policy.yaml"

# Tax-loss harvesting (issue 14, one rule for the drift alerts' TLH flag in int_tlh_flags.sql and
# for tlh_candidates in core/tax_lots.harvest_candidates): a lot is a candidate when its loss over
# its wash-adjusted basis is at least tlh_loss_threshold − TLH_LOSS_TOLERANCE. The threshold is
# inclusive, and a lot down exactly 10% computes as 0.09999999999999985 in binary floating point;
# the tolerance (far below a cent on any real lot) absorbs that, nothing more.
TLH_LOSS_TOLERANCE = 1e-9

Urgency = Literal["high", "medium", "low"]
Delivery = Literal["same_day", "within_48h", "weekly_batch"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    name: str = Field(pattern=r"^[a-z_]+$")
    min_aum: Decimal = Field(ge=0)
    max_aum: Decimal | None = None
    band: Decimal = Field(gt=0, lt=1)
    urgency: Urgency
    delivery: Delivery


class TaxSensitiveRule(_Strict):
    band: Decimal = Field(gt=0, lt=1)
    urgency: Urgency
    delivery: Delivery


class TradeSizingRule(_Strict):
    """How proposals are sized: minimum trade, cash buffer, fractional share precision."""

    min_trade_value: Decimal = Field(default=Decimal(100), ge=0)
    min_trade_pct: Decimal = Field(default=Decimal("0.001"), ge=0, lt=1)
    default_cash_buffer: Decimal = Field(default=Decimal(0), ge=0, lt=1)
    fractional_decimals: int = Field(default=3, ge=0, le=8)


class WaitForLongTermRule(_Strict):
    """When to advise waiting for short-term lots to turn long-term instead of selling now."""

    window_days: int = Field(default=30, ge=0, le=366)
    # Drift at or beyond this multiple of its band is severe: rebalance now whatever the tax.
    severe_drift_multiple: Decimal = Field(default=Decimal(2), gt=1)
    min_tax_saved: Decimal = Field(default=Decimal(0), ge=0)


class TaxRule(_Strict):
    """The tax engine's settings: lot relief default, harvesting minimum, wait-for-long-term."""

    # Treas. Reg. §1.1012-1(c)(1): without an identification of lots, shares are sold FIFO.
    default_lot_relief_method: Literal["fifo", "hifo", "tax_min"] = "fifo"
    tlh_min_loss: Decimal = Field(default=Decimal(0), ge=0)
    wait_for_long_term: WaitForLongTermRule = WaitForLongTermRule()


class HouseholdLocationRule(_Strict):
    """The household asset-location optimiser (core/household_location.py) — issue 14."""

    # A household's sales in one rebalance, summed over its accounts, are at most this fraction
    # of its value; when the cap binds the household moves part of the way and the
    # recommendation says why. 1 = no practical cap.
    max_turnover_fraction: Decimal = Field(default=Decimal("0.5"), gt=0, le=1)


class ApprovalRule(_Strict):
    """The approval workflow's clock and the discretionary micro-trade rule."""

    reminder_hours: Decimal = Field(default=Decimal(24), gt=0)
    escalation_hours: Decimal = Field(default=Decimal(48), gt=0)
    default_defer_days: int = Field(default=5, ge=1, le=90)
    # Discretionary accounts: trades under this many dollars with zero realised gain are
    # approved by policy (0 turns the rule off).
    micro_trade_limit: Decimal = Field(default=Decimal(5000), ge=0)

    @model_validator(mode="after")
    def _reminder_before_escalation(self) -> "ApprovalRule":
        if self.reminder_hours >= self.escalation_hours:
            raise ValueError("approval.reminder_hours must be less than approval.escalation_hours")
        return self


class SupervisionRule(_Strict):
    """The supervisory review report for the chief compliance officer (rebal_pipeline/supervision):
    how often the scheduled report covers the period just ended (weekly: Monday to Sunday;
    monthly: the calendar month; quarterly: the calendar quarter, in the firm's time zone)."""

    frequency: Literal["weekly", "monthly", "quarterly"] = "weekly"


class BasketWeight(_Strict):
    symbol: str = Field(min_length=1, max_length=16)
    weight: Decimal = Field(gt=0, le=1)


class MarketEventRule(_Strict):
    """Market-event batch scans (rebal_pipeline/market_events): the reference basket whose move
    since the last scan (or, before the day's first event, since the last session's close)
    triggers an out-of-cycle scan of every account when |move| ≥ threshold; how long after the
    latest event the batch's approved trades go out together as block orders; how often the
    `market_events` sensor looks at the intraday prices."""

    reference_basket: list[BasketWeight] = Field(
        default_factory=lambda: [BasketWeight(symbol="VTI", weight=Decimal("0.6")),
                                 BasketWeight(symbol="VEA", weight=Decimal("0.2")),
                                 BasketWeight(symbol="BND", weight=Decimal("0.2"))],
        min_length=1)
    threshold: Decimal = Field(default=Decimal("0.03"), gt=0, lt=1)
    release_after_minutes: int = Field(default=120, ge=0, le=24 * 60)
    poll_seconds: int = Field(default=60, ge=10, le=3600)

    @model_validator(mode="after")
    def _basket_is_whole(self) -> "MarketEventRule":
        symbols = [w.symbol for w in self.reference_basket]
        if len(set(symbols)) != len(symbols):
            raise ValueError("market_events.reference_basket names a symbol twice")
        if sum(w.weight for w in self.reference_basket) != 1:
            raise ValueError("market_events.reference_basket weights must add up to 1")
        return self


class DriftPolicy(_Strict):
    version: str = Field(min_length=1)
    effective_from: date
    tiers: list[Tier] = Field(min_length=1)
    tax_sensitive: TaxSensitiveRule
    tlh_loss_threshold: Decimal = Field(gt=0, lt=1)
    relative_band: Decimal | None = Field(default=None, gt=0, lt=1)
    trade_sizing: TradeSizingRule = TradeSizingRule()
    tax: TaxRule = TaxRule()
    household_location: HouseholdLocationRule = HouseholdLocationRule()
    approval: ApprovalRule = ApprovalRule()
    supervision: SupervisionRule = SupervisionRule()
    market_events: MarketEventRule = MarketEventRule()
    content_sha256: str = ""

    @model_validator(mode="after")
    def _tiers_cover_every_aum_once(self) -> "DriftPolicy":
        # Tiers must tile [0, ∞) with no gap and no overlap, so every household gets exactly one.
        ordered = sorted(self.tiers, key=lambda t: t.min_aum)
        if ordered[0].min_aum != 0:
            raise ValueError("the lowest tier must start at min_aum 0")
        for lower, upper in zip(ordered, ordered[1:]):
            if lower.max_aum != upper.min_aum:
                raise ValueError(
                    f"tiers {lower.name} and {upper.name} leave a gap or overlap "
                    f"({lower.max_aum} vs {upper.min_aum})"
                )
        if ordered[-1].max_aum is not None:
            raise ValueError("the highest tier must have max_aum null (open-ended)")
        return self

    @property
    def version_id(self) -> str:
        return f"{self.version}+{self.content_sha256[:12]}"

    def bands_frame(self) -> pl.DataFrame:
        """One row per tier plus the tax-sensitive rule, for the drift SQL to join."""
        rows = [
            {
                "rule": t.name,
                "min_aum": float(t.min_aum),
                "max_aum": None if t.max_aum is None else float(t.max_aum),
                "band": float(t.band),
                "urgency": t.urgency,
                "delivery": t.delivery,
            }
            for t in self.tiers
        ]
        ts = self.tax_sensitive
        rows.append(
            {
                "rule": "tax_sensitive",
                "min_aum": None,
                "max_aum": None,
                "band": float(ts.band),
                "urgency": ts.urgency,
                "delivery": ts.delivery,
            }
        )
        return pl.DataFrame(rows).with_columns(
            pl.lit(self.version_id).alias("policy_version"),
            pl.lit(float(self.tlh_loss_threshold)).alias("tlh_loss_threshold"),
            pl.lit(TLH_LOSS_TOLERANCE).alias("tlh_loss_tolerance"),
            pl.lit(float(self.tax.tlh_min_loss)).alias("tlh_min_loss"),
            pl.lit(None if self.relative_band is None else float(self.relative_band), pl.Float64).alias(
                "relative_band"
            ),
        )


def load_policy(path: Path | str | None = None) -> DriftPolicy:
    path = Path(path) if path else DEFAULT_POLICY_FILE
    raw = path.read_bytes()
    document = yaml.safe_load(raw)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a drift policy must be a YAML mapping")
    return DriftPolicy.model_validate({**document, "content_sha256": hashlib.sha256(raw).hexdigest()})
