"""The trade recommendation package: what the advisor reviews, decides on and the gate re-checks.

Built by the daily run from the warehouse (defs/workflow/assets.py) and stored as canonical JSON
with the recommendation. Pure functions here validate an advisor's modified quantities and
check that approved trades still fit today's positions.
"""

from __future__ import annotations

import hashlib
from datetime import date

from pydantic import BaseModel, ConfigDict, Field

_EPS = 1e-9


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackageTrade(_Frozen):
    account_id: str
    symbol: str
    asset_class: str
    side: str = Field(pattern="^(buy|sell)$")
    quantity: float = Field(ge=0)
    est_price: float = Field(gt=0)
    est_value: float
    reason: str
    replaces_symbol: str | None = None
    wash_sale_disallowed: float = 0.0


class PackageHolding(_Frozen):
    account_id: str
    symbol: str
    asset_class: str
    quantity: float
    price: float
    market_value: float


class PackageBand(_Frozen):
    """The scope's asset-class target and band (household mix for aggregated households)."""

    asset_class: str
    target_weight: float
    band: float
    current_weight: float
    drift: float


class PackageRestriction(_Frozen):
    account_id: str
    kind: str
    value: str


class RecommendationPackage(_Frozen):
    recommendation_id: str
    as_of: date
    scope: str
    scope_id: str
    kind: str  # rebalance | harvest
    advisor_id: str | None
    household_id: str | None
    account_ids: list[str]
    tier: str | None = None
    urgency: str | None = None
    delivery: str | None = None
    discretionary: bool = False
    policy_version: str
    model_version: str | None = None
    trades: list[PackageTrade]
    holdings: list[PackageHolding]
    restrictions: list[PackageRestriction] = []
    bands: list[PackageBand] = []
    tax: dict = {}
    inside_bands: bool | None = None
    unresolved: str | None = None
    positions_fingerprint: str


def positions_fingerprint(holdings: list[tuple[str, str, float]]) -> str:
    """SHA-256 over the sorted (account, symbol, quantity) of the scope's positions."""
    text = "\n".join(f"{a}|{s}|{q:.8f}" for a, s, q in sorted(holdings))
    return hashlib.sha256(text.encode()).hexdigest()


class TradeChange(_Frozen):
    """One line of a modification: the quantity the advisor wants (0 drops the trade)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    account_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    symbol: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._/-]+$")
    side: str = Field(pattern="^(buy|sell)$")
    quantity: float = Field(ge=0, le=1e10)


class ModificationCheck(_Frozen):
    errors: list[str]  # any error refuses the modification (4xx)
    trades: list[PackageTrade]  # the modified trade list
    band_report: list[dict]  # per class: weight after, target, band, inside
    inside_bands: bool


def apply_modification(package: RecommendationPackage, changes: list[TradeChange]) -> ModificationCheck:
    """The package's trades with the advisor's quantities, re-validated: no overselling, no
    buying a restricted security or a barred (ERISA) class, no negative cash, only securities the
    package prices; the bands re-checked on the result and reported (outside a band is allowed,
    it is reported, not refused — the advisor decides)."""
    errors: list[str] = []
    prices = {h.symbol: h.price for h in package.holdings} | {t.symbol: t.est_price for t in package.trades}
    classes = {h.symbol: h.asset_class for h in package.holdings} | {t.symbol: t.asset_class for t in package.trades}
    trades = {(t.account_id, t.symbol, t.side): t for t in package.trades}
    seen = set()
    for change in changes:
        key = (change.account_id, change.symbol, change.side)
        if key in seen:
            errors.append(f"{change.account_id} {change.side} {change.symbol}: listed twice")
            continue
        seen.add(key)
        if change.account_id not in package.account_ids:
            errors.append(f"{change.account_id}: not an account of this recommendation")
            continue
        if change.symbol not in prices:
            errors.append(f"{change.symbol}: not priced in this recommendation (only its holdings and trades are)")
            continue
        base = trades.get(key)
        price = prices[change.symbol]
        trades[key] = PackageTrade(
            account_id=change.account_id, symbol=change.symbol, asset_class=classes[change.symbol], side=change.side,
            quantity=change.quantity, est_price=price, est_value=round(change.quantity * price, 2),
            reason=base.reason if base else "advisor", replaces_symbol=base.replaces_symbol if base else None,
        )
    final = [t for t in trades.values() if t.quantity > 0]
    if not final:
        errors.append("the modification leaves no trade; to act on none, defer (with a reason) or escalate")
    errors += _fit_errors(package, final, {(h.account_id, h.symbol): h.quantity for h in package.holdings})
    report, inside = band_check(package, final)
    return ModificationCheck(errors=errors, trades=sorted(final, key=lambda t: (t.account_id, t.side, t.symbol)),
                             band_report=report, inside_bands=inside)


def _fit_errors(package: RecommendationPackage, trades: list[PackageTrade],
                held: dict[tuple[str, str], float]) -> list[str]:
    errors = []
    restricted = {(r.account_id, r.kind, r.value) for r in package.restrictions}
    cash = {a: held.get((a, "CASH"), 0.0) for a in package.account_ids}
    for t in trades:
        if t.side == "sell":
            have = held.get((t.account_id, t.symbol), 0.0)
            if t.quantity > have + _EPS:
                errors.append(f"{t.account_id} sell {t.symbol} {t.quantity:g}: only {have:g} held (no overselling)")
            if (t.account_id, "no_sell_symbol", t.symbol) in restricted:
                errors.append(f"{t.account_id} sell {t.symbol}: the account may not sell it (no_sell_symbol)")
            cash[t.account_id] = cash.get(t.account_id, 0.0) + t.quantity * t.est_price
        else:
            if (t.account_id, "no_buy_symbol", t.symbol) in restricted:
                errors.append(f"{t.account_id} buy {t.symbol}: the account may not buy it (no_buy_symbol)")
            if (t.account_id, "no_asset_class", t.asset_class) in restricted:
                errors.append(f"{t.account_id} buy {t.symbol}: {t.asset_class} is barred by the plan (no_asset_class)")
            cash[t.account_id] = cash.get(t.account_id, 0.0) - t.quantity * t.est_price
    for account, left in sorted(cash.items()):
        if left < -0.005:
            errors.append(f"{account}: the buys need ${-left:,.2f} more cash than the account has after its sells")
    return errors


def band_check(package: RecommendationPackage, trades: list[PackageTrade]) -> tuple[list[dict], bool]:
    """Asset-class weights of the scope after the trades against the package's bands."""
    value: dict[str, float] = {}
    for h in package.holdings:
        value[h.asset_class] = value.get(h.asset_class, 0.0) + h.market_value
    for t in trades:
        signed = t.quantity * t.est_price * (1 if t.side == "buy" else -1)
        value[t.asset_class] = value.get(t.asset_class, 0.0) + signed
        value["cash"] = value.get("cash", 0.0) - signed
    total = sum(value.values()) or 1.0
    report, inside = [], True
    for band in package.bands:
        weight = value.get(band.asset_class, 0.0) / total
        ok = abs(weight - band.target_weight) <= band.band + _EPS
        inside &= ok
        report.append({"asset_class": band.asset_class, "weight_after": round(weight, 6),
                       "target_weight": band.target_weight, "band": band.band, "inside": ok})
    return report, inside


def trades_still_fit(package: RecommendationPackage, trades: list[PackageTrade],
                     today: dict[tuple[str, str], float]) -> list[str]:
    """Why approved trades no longer fit today's positions (empty: they fit). Used by the gate:
    a sell of more than is held today, a cash shortfall, or a restriction."""
    return _fit_errors(package, trades, today)
