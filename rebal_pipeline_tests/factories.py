"""The one place tests build recommendation packages and users.

Every test package describes its own book (accounts, prices, trades) and builds packages and
users here, so a new required field of RecommendationPackage or users.csv is added once.

- `make_package(**fields)`: a RecommendationPackage with the daily run's defaults for what the
  test does not say: one account (`scope_id`, default ACC-1), or a household when it names
  several `account_ids` (its scope_id the household_id, as the daily run's); the positions
  fingerprint is computed from the holdings, as the daily run does (workflow/package.py), unless
  the test gives one. Any other field (kind="harvest", trade_rules, restrictions, tax, ...) as a
  keyword.
- `holding(...)`, `trade(...)`: lines with market value / trade value computed from quantity × price
  (trade value rounded to the cent); any other field (fractional, security_type, replaces_symbol,
  wash_sale_disallowed, or a hand-set market_value / est_value) as a keyword.
- `user(user_id, role=...)`: one users.csv row; `USERS` the standard firm (two advisors,
  compliance, operations); `DESK` the trading desk some tests add to it.
"""

from __future__ import annotations

from datetime import date

from rebal_pipeline.workflow.package import (PackageHolding, PackageTrade, RecommendationPackage,
                                             positions_fingerprint)

AS_OF = date(2026, 11, 20)

_NAMES = {"advisor": "Advisor", "compliance": "Compliance", "operations": "Operations"}


def user(user_id: str, role: str = "advisor", name: str | None = None, email: str | None = None,
         **columns) -> dict:
    """One users.csv row (extra columns such as team_of / team_alerts as keywords)."""
    return {"user_id": user_id, "name": name or f"{user_id.title()} {_NAMES.get(role, role.title())}",
            "email": email or f"{user_id.lower()}@example-ria.com", "role": role, **columns}


USERS = [
    user("ADV-1", name="Dana Advisor", email="dana@example-ria.com"),
    user("ADV-2", name="Sam Advisor", email="sam@example-ria.com"),
    user("CCO-1", "compliance", name="Chris Compliance", email="cco@example-ria.com"),
    user("OPS-1", "operations", name="Olu Operations", email="ops@example-ria.com"),
]
DESK = user("DESK-1", "trading_desk", name="Toni Desk", email="desk@example-ria.com")


def holding(account_id: str, symbol: str, asset_class: str, quantity: float, price: float, **fields) -> PackageHolding:
    return PackageHolding(account_id=account_id, symbol=symbol, asset_class=asset_class, quantity=quantity,
                          price=price, market_value=fields.pop("market_value", quantity * price), **fields)


def trade(account_id: str, symbol: str, asset_class: str, side: str, quantity: float, price: float,
          reason: str = "rebalance", **fields) -> PackageTrade:
    return PackageTrade(account_id=account_id, symbol=symbol, asset_class=asset_class, side=side, quantity=quantity,
                        est_price=price, est_value=fields.pop("est_value", round(quantity * price, 2)),
                        reason=reason, **fields)


def make_package(**fields) -> RecommendationPackage:
    """A package of one account (or a household package of `account_ids`) with the daily run's defaults."""
    account_ids = fields.get("account_ids") or [fields.get("scope_id", "ACC-1")]
    household_id = fields.get("household_id", "HH-1")
    scope = fields.get("scope", "account" if len(account_ids) == 1 else "household")
    holdings = fields.get("holdings", [])
    defaults = dict(
        recommendation_id="REC-1", as_of=AS_OF, scope=scope,
        scope_id=household_id if scope == "household" else account_ids[0], kind="rebalance", advisor_id="ADV-1",
        household_id=household_id, account_ids=account_ids, policy_version="2026.11-2+test", trades=[],
        holdings=holdings,
        positions_fingerprint=positions_fingerprint([(h.account_id, h.symbol, h.quantity) for h in holdings]),
    )
    return RecommendationPackage(**{**defaults, **fields})
