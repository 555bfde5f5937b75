"""The trade recommendation package: what the advisor reviews, decides on and the gate re-checks.

Built by the daily run from the warehouse (workflow/publishing.py) and stored as canonical JSON
with the recommendation. Pure functions here validate an advisor's modified quantities and
check that approved trades still fit today's positions.

One validation for every trade list (`validate_trades`): the API's and the portal's modify
(through `apply_modification`) and the approval gate (through `trades_still_fit`, with the
latest holdings net of the account's open orders) call the same function, so a modification is
held to exactly the rules a proposal is sized by (core/trade_sizing.py rules 2, 4, 5 and 6):

  line rules (each error names the line: "<account> <side> <symbol> <quantity>: ... (<rule>)")
    - no `CASH` line: cash is the balancing item, it follows from the trades (no_cash_line);
    - no money-market line the proposal did not make: sweep cash follows from the trades too
      (no_money_market_line);
    - whole shares for a security that does not trade fractionally; at most the sizer's
      `fractional_decimals` share decimals for one that does (a sell of the whole holding is
      always allowed: harvests sell positions as held) (whole_shares / fractional_decimals);
    - a changed line is at least the minimum trade, max(min_trade_value, min_trade_pct x the
      account's market value), or 0 to drop it (min_trade); a line exactly as proposed was
      sized under that rule already;
  account rules (over the whole list, against the positions given, net of open orders)
    - never sell more than is held once the account's open sells are counted (no overselling);
    - never sell a no_sell_symbol, never buy a no_buy_symbol or a barred class (no_asset_class,
      an ERISA plan restriction);
    - never leave cash below the floor, max(the account's min_cash_weight restriction, the
      policy's default_cash_buffer) x the account's market value, unless the trades raise cash
      (an account already under its floor may be brought closer to it, never further away).
A package built before the trade rules were recorded in it (`trade_rules` None) is checked with
the shipped defaults; a security whose `fractional` flag the package does not carry is
checked against the fractional decimals (the ticket builder still refuses a fractional order of
a whole-share security from the reference data).
"""

from __future__ import annotations

import hashlib
from datetime import date

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

_EPS = 1e-9
CASH_SYMBOL = "CASH"
MONEY_MARKET = "money_market"


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
    # From the security master (securities.csv): None in packages built before they were recorded.
    fractional: bool | None = None
    security_type: str | None = None


class PackageHolding(_Frozen):
    account_id: str
    symbol: str
    asset_class: str
    quantity: float
    price: float
    market_value: float
    fractional: bool | None = None
    security_type: str | None = None


class TradeRules(_Frozen):
    """The policy's trade-sizing rule in force when the package was built (policy.trade_sizing)."""

    min_trade_value: float = 100.0
    min_trade_pct: float = 0.001
    cash_buffer: float = 0.0  # default_cash_buffer: the cash floor of an account without min_cash_weight
    fractional_decimals: int = 3


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
    trade_rules: TradeRules | None = None


def worst_band(package: "RecommendationPackage") -> tuple[PackageBand, float] | None:
    """The band furthest outside, and how far: the largest |drift| ÷ band (1.0 = at the band's
    edge; a band of 0 counts 0), the first on a tie; None without bands. The one rule the review
    queue, the market-event batches and their report sort and show by (the queue's SQL ordering,
    review_queue._SEVERITY_SQL, computes the same number in the store)."""
    worst: tuple[PackageBand, float] | None = None
    for band in package.bands:
        ratio = abs(band.drift) / band.band if band.band else 0.0
        if worst is None or ratio > worst[1]:
            worst = (band, ratio)
    return worst


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


def apply_modification(package: RecommendationPackage, changes: list[TradeChange],
                       reserved: Reserved | None = None) -> ModificationCheck:
    """The package's trades with the advisor's quantities, re-validated by `validate_trades`
    against the package's holdings (net of the account's open orders when `reserved` is given);
    only securities the package prices; the bands re-checked on the result and reported (outside
    a band is allowed, it is reported, not refused — the advisor decides)."""
    errors: list[str] = []
    prices = {h.symbol: h.price for h in package.holdings} | {t.symbol: t.est_price for t in package.trades}
    classes = {h.symbol: h.asset_class for h in package.holdings} | {t.symbol: t.asset_class for t in package.trades}
    traits = _traits(package)
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
        fractional, security_type = traits.get(change.symbol, (None, None))
        trades[key] = PackageTrade(
            account_id=change.account_id, symbol=change.symbol, asset_class=classes[change.symbol], side=change.side,
            quantity=change.quantity, est_price=price, est_value=round(change.quantity * price, 2),
            reason=base.reason if base else "advisor", replaces_symbol=base.replaces_symbol if base else None,
            fractional=fractional, security_type=security_type,
        )
    final = [t for t in trades.values() if t.quantity > 0]
    if not final:
        errors.append("the modification leaves no trade; to act on none, defer (with a reason) or escalate")
    errors += validate_trades(package, final, {(h.account_id, h.symbol): h.quantity for h in package.holdings},
                              reserved)
    report, inside = band_check(package, final)
    return ModificationCheck(errors=errors, trades=sorted(final, key=lambda t: (t.account_id, t.side, t.symbol)),
                             band_report=report, inside_bands=inside)


@dataclass(frozen=True)
class Reserved:
    """What the account's open orders (workflow/ledger.py) already claim: shares of each
    (account, symbol) their unfilled sells will take, and the signed cash their unfilled lines
    will move (sell proceeds minus buy costs, at their estimated prices)."""

    sells: dict[tuple[str, str], float] = field(default_factory=dict)
    cash: dict[str, float] = field(default_factory=dict)


def _traits(package: RecommendationPackage) -> dict[str, tuple[bool | None, str | None]]:
    found: dict[str, tuple[bool | None, str | None]] = {}
    for item in [*package.holdings, *package.trades]:
        known = found.get(item.symbol, (None, None))
        found[item.symbol] = (item.fractional if item.fractional is not None else known[0],
                              item.security_type or known[1])
    return found


def _fmt_qty(quantity: float) -> str:
    return f"{quantity:.10f}".rstrip("0").rstrip(".") if quantity < 1e-4 else f"{quantity:g}"


def validate_trades(package: RecommendationPackage, trades: list[PackageTrade], held: dict[tuple[str, str], float],
                    reserved: Reserved | None = None) -> list[str]:
    """Why these trades may not be executed against the positions `held` (empty: they may): the
    line and account rules of the module docstring. The one check behind a proposal's approval
    at the gate and an advisor's modification in the API and the portal."""
    rules = package.trade_rules or TradeRules()
    reserved = reserved or Reserved()
    errors: list[str] = []
    restricted = {(r.account_id, r.kind, r.value) for r in package.restrictions}
    proposed = {(t.account_id, t.symbol, t.side): t.quantity for t in package.trades}
    traits = _traits(package)
    prices = {h.symbol: h.price for h in package.holdings} | {t.symbol: t.est_price for t in package.trades}
    prices[CASH_SYMBOL] = 1.0
    accounts = sorted(set(package.account_ids) | {t.account_id for t in trades})
    value = {a: sum(q * prices.get(s, 0.0) for (acc, s), q in held.items() if acc == a) for a in accounts}
    cash = {a: held.get((a, CASH_SYMBOL), 0.0) + reserved.cash.get(a, 0.0) for a in accounts}
    before = dict(cash)
    unit = 10.0 ** -rules.fractional_decimals
    for t in trades:
        line = f"{t.account_id} {t.side} {t.symbol} {_fmt_qty(t.quantity)}"
        fractional, security_type = traits.get(t.symbol, (None, None))
        fractional = t.fractional if t.fractional is not None else fractional
        security_type = t.security_type or security_type
        as_proposed = abs(proposed.get((t.account_id, t.symbol, t.side), -1.0) - t.quantity) <= _EPS
        have = held.get((t.account_id, t.symbol), 0.0) - reserved.sells.get((t.account_id, t.symbol), 0.0)
        whole_holding = t.side == "sell" and abs(t.quantity - have) <= _EPS
        if t.symbol == CASH_SYMBOL or security_type == "cash":
            errors.append(f"{line}: cash is not traded, it follows from the trades (no CASH lines)")
            continue
        if security_type == MONEY_MARKET and not as_proposed:
            errors.append(f"{line}: a money-market fund holds the account's cash, which follows from the trades "
                          "(no money-market lines)")
            continue
        if not whole_holding:
            if fractional is False and abs(t.quantity - round(t.quantity)) > 1e-12:
                errors.append(f"{line}: {t.symbol} trades in whole shares only (whole shares)")
            elif abs(t.quantity / unit - round(t.quantity / unit)) > 1e-6:
                errors.append(f"{line}: at most {rules.fractional_decimals} share decimals "
                              "(fractional decimals, as the proposals are sized)")
        minimum = max(rules.min_trade_value, rules.min_trade_pct * value.get(t.account_id, 0.0))
        if not as_proposed and not whole_holding and t.quantity * t.est_price < minimum - 0.005:
            errors.append(f"{line}: ${t.quantity * t.est_price:,.2f} is below the minimum trade of ${minimum:,.2f} "
                          "(minimum trade; 0 drops the line)")
        if t.side == "sell":
            if t.quantity > have + _EPS:
                pending = reserved.sells.get((t.account_id, t.symbol), 0.0)
                note = f" after {pending:g} in open orders" if pending > _EPS else ""
                errors.append(f"{t.account_id} sell {t.symbol} {t.quantity:g}: only {max(have, 0.0):g} held{note} "
                              "(no overselling)")
            if (t.account_id, "no_sell_symbol", t.symbol) in restricted:
                errors.append(f"{t.account_id} sell {t.symbol}: the account may not sell it (no_sell_symbol)")
            cash[t.account_id] = cash.get(t.account_id, 0.0) + t.quantity * t.est_price
        else:
            if (t.account_id, "no_buy_symbol", t.symbol) in restricted:
                errors.append(f"{t.account_id} buy {t.symbol}: the account may not buy it (no_buy_symbol)")
            if (t.account_id, "no_asset_class", t.asset_class) in restricted:
                errors.append(f"{t.account_id} buy {t.symbol}: {t.asset_class} is barred by the plan (no_asset_class)")
            cash[t.account_id] = cash.get(t.account_id, 0.0) - t.quantity * t.est_price
    for account in accounts:
        left, start = cash.get(account, 0.0), before.get(account, 0.0)
        weight, why = _cash_floor(package, account, rules)
        floor = weight * value.get(account, 0.0)
        if left >= min(floor, start) - 0.005:
            continue
        if floor <= 0.005:
            errors.append(f"{account}: the buys need ${-left:,.2f} more cash than the account has after its sells")
        else:
            share = left / value[account] if value.get(account) else 0.0
            errors.append(f"{account}: the trades leave ${left:,.2f} cash ({share:.1%}), below the floor of "
                          f"${floor:,.2f} ({weight:.1%}: {why})")
    return errors


def _cash_floor(package: RecommendationPackage, account: str, rules: TradeRules) -> tuple[float, str]:
    """The account's cash floor weight and where it comes from (trade_sizing rule 2)."""
    restricted = []
    for r in package.restrictions:
        if r.account_id == account and r.kind == "min_cash_weight":
            try:
                restricted.append(float(r.value))
            except ValueError:
                restricted.append(1.0)  # unreadable: no buy may pass until the feed is fixed
    own = max(restricted, default=0.0)
    if own >= rules.cash_buffer and own > 0:
        return own, "the account's min_cash_weight restriction"
    return rules.cash_buffer, "the policy's cash buffer"


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
                     today: dict[tuple[str, str], float], reserved: Reserved | None = None) -> list[str]:
    """Why approved trades no longer fit today's positions net of the account's open orders
    (empty: they fit). Used by the gate: `validate_trades` with the latest holdings."""
    return validate_trades(package, trades, today, reserved)
