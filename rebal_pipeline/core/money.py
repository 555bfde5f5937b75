"""Money in the advisor's words: the one place a tax figure becomes text.

A negative estimated tax is a saving, and it is said so ("estimated tax saving $121"), never
printed as a negative tax ("$-121" or "-$121"). Every surface that shows a tax effect — the
drill, the emails, the portal and the API's `tax` dict (recommendation_summary's words columns)
— goes through `tax_effect` / `tax_effect_words` here, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TAX_WORDS = "estimated tax"
SAVING_WORDS = "estimated tax saving"


def dollars(amount: float, places: int = 2) -> str:
    """An unsigned dollar amount: $1,234.56 (places=2) or $1,235 (places=0); $0.00, never -$0."""
    value = round(abs(float(amount)), places)
    return f"${value:,.{places}f}"


@dataclass(frozen=True)
class TaxEffect:
    label: str  # "estimated tax" or "estimated tax saving"
    amount: str  # unsigned: "$121.00"
    saving: bool

    @property
    def words(self) -> str:
        return f"{self.label} {self.amount}"


def _cents(amount: float | None, places: int) -> float:
    if amount is None or (isinstance(amount, float) and math.isnan(amount)):
        return 0.0
    return round(float(amount), places)


def tax_effect(amount: float | None, places: int = 2) -> TaxEffect:
    """A tax effect (positive = tax owed, negative = tax saved) as a label and an unsigned amount.
    An amount that rounds to zero at `places` is "estimated tax $0.00" (no saving claimed)."""
    value = _cents(amount, places)
    saving = value < 0
    return TaxEffect(SAVING_WORDS if saving else TAX_WORDS, dollars(value, places), saving)


def tax_effect_words(amount: float | None, places: int = 2) -> str:
    """"estimated tax $1,733.42", "estimated tax saving $121.00", "estimated tax $0.00"."""
    return tax_effect(amount, places).words


def carryforward_words(amount: float | None, places: int = 2) -> str | None:
    """The part of a net capital loss not usable this year (IRC §1211(b) limit), in words; None
    when there is none."""
    value = _cents(amount, places)
    if value <= 0:
        return None
    return (f"{dollars(value, places)} of net capital loss carried forward to later years "
            "(IRC §1212(b); a net capital loss offsets at most $3,000 of ordinary income a year, $1,500 "
            "married filing separately, §1211(b))")


__all__ = ["TaxEffect", "tax_effect", "tax_effect_words", "carryforward_words", "dollars"]
