"""A small book of approved recommendations for the ticket tests, with hand-checkable numbers.

Three advisors' worth of orders on three custodians, placed Monday 23 November 2026 at
14:35:00 UTC (09:35 New York, EST):

* REC-HH1, ADV-1 household at Schwab, non-discretionary, approved by ADV-1:
  ACC-1 sell 10 VTI, buy 103.093 VBTLX at $9.70 (a fund: $1,000.00 = 1000.0021 to the cent);
  ACC-2 sell 25 VTI, sell its whole 12.345 VTSAX.
* REC-2, ADV-1 at Schwab, non-discretionary, modified by ADV-1: ACC-3 sell 7 VTI
  → with REC-HH1 one Schwab block: sell 42 VTI = 10 + 25 + 7.
* REC-3, ADV-2 at Fidelity, discretionary, auto-approved by policy micro-trade-v1:
  ACC-4 buy 3 AAPL (stock), buy 500 SWVXX at $1.00 (money market: $500.00).
* REC-4, ADV-3 at Pershing, non-discretionary, approved by ADV-3:
  ACC-5 buy 4 IVV, ACC-6 buy 6 IVV → one Pershing block of 10.

Packages and trades are built through rebal_pipeline_tests/factories.py. The ticket builder reads
only a package's id, advisor, policy version, accounts and trades, so these carry no household or
holdings: a household package is named by its first account and its fingerprint is a placeholder.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

from rebal_pipeline.tickets.orders import AccountRef, ApprovalDecision, Order, SecurityRef, build_orders
from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage
from rebal_pipeline_tests import factories

PLACED_AT = datetime(2026, 11, 23, 14, 35, tzinfo=timezone.utc)
DECIDED_AT = datetime(2026, 11, 23, 14, 10, tzinfo=timezone.utc)
PLACED_BY = "TRD-0001"
POLICY = "2026.1+0123456789ab"

SECURITIES = {
    "VTI": SecurityRef(symbol="VTI", cusip="922908769", security_type="etf"),
    "VTSAX": SecurityRef(symbol="VTSAX", cusip="922908728", security_type="mutual_fund", fractional=True),
    "VBTLX": SecurityRef(symbol="VBTLX", cusip="921937603", security_type="mutual_fund", fractional=True),
    "AAPL": SecurityRef(symbol="AAPL", cusip="037833100", security_type="stock"),
    "IVV": SecurityRef(symbol="IVV", cusip="464287200", security_type="etf"),
    "SWVXX": SecurityRef(symbol="SWVXX", cusip="808515605", security_type="money_market", fractional=True),
    "BOND1": SecurityRef(symbol="BOND1", cusip="912828XX0", security_type="bond"),
    "CASH": SecurityRef(symbol="CASH", security_type="cash", fractional=True),
}

ACCOUNTS = {
    "ACC-1": AccountRef(account_id="ACC-1", custodian="schwab", discretionary=False),
    "ACC-2": AccountRef(account_id="ACC-2", custodian="schwab", discretionary=False),
    "ACC-3": AccountRef(account_id="ACC-3", custodian="schwab", discretionary=False),
    "ACC-4": AccountRef(account_id="ACC-4", custodian="fidelity", discretionary=True),
    "ACC-5": AccountRef(account_id="ACC-5", custodian="pershing", discretionary=False),
    "ACC-6": AccountRef(account_id="ACC-6", custodian="pershing", discretionary=False),
}

_CLASS = {"VTI": "equity", "VTSAX": "equity", "AAPL": "equity", "IVV": "equity", "VBTLX": "fixed_income",
          "SWVXX": "cash", "BOND1": "fixed_income", "CASH": "cash"}


def trade(account: str, symbol: str, side: str, quantity: float, price: float) -> PackageTrade:
    return factories.trade(account, symbol, _CLASS[symbol], side, quantity, price, reason="drift")


def package(recommendation_id: str, advisor: str, accounts: list[str], trades: list[PackageTrade],
            discretionary: bool = False) -> RecommendationPackage:
    return factories.make_package(
        recommendation_id=recommendation_id, as_of=date(2026, 11, 20), scope_id=accounts[0], advisor_id=advisor,
        household_id=None, account_ids=accounts, discretionary=discretionary, policy_version=POLICY, trades=trades,
        positions_fingerprint="0" * 64,
    )


def decision(decision_id: str, recommendation_id: str, actor: str, action: str = "approve") -> ApprovalDecision:
    return ApprovalDecision(decision_id=decision_id, recommendation_id=recommendation_id, action=action,
                            actor_id=actor, created_at=DECIDED_AT, via="policy" if action == "auto_approve" else "api")


def approved_book() -> list[tuple[RecommendationPackage, ApprovalDecision]]:
    return [
        (package("REC-HH1", "ADV-1", ["ACC-1", "ACC-2"], [
            trade("ACC-1", "VTI", "sell", 10, 280.0), trade("ACC-1", "VBTLX", "buy", 103.093, 9.70),
            trade("ACC-2", "VTI", "sell", 25, 280.0), trade("ACC-2", "VTSAX", "sell", 12.345, 140.0)]),
         decision("DEC-1", "REC-HH1", "ADV-1")),
        (package("REC-2", "ADV-1", ["ACC-3"], [trade("ACC-3", "VTI", "sell", 7, 280.0)]),
         decision("DEC-2", "REC-2", "ADV-1", "modify")),
        (package("REC-3", "ADV-2", ["ACC-4"], [trade("ACC-4", "AAPL", "buy", 3, 225.0),
                                               trade("ACC-4", "SWVXX", "buy", 500, 1.0)], discretionary=True),
         decision("DEC-3", "REC-3", "policy:micro-trade-v1", "auto_approve")),
        (package("REC-4", "ADV-3", ["ACC-5", "ACC-6"], [trade("ACC-5", "IVV", "buy", 4, 570.0),
                                                        trade("ACC-6", "IVV", "buy", 6, 570.0)]),
         decision("DEC-4", "REC-4", "ADV-3")),
    ]


def book_orders() -> list[Order]:
    orders = []
    for pkg, dec in approved_book():
        orders += build_orders(pkg, pkg.trades, dec, SECURITIES, ACCOUNTS, placed_by=PLACED_BY, placed_at=PLACED_AT)
    return orders
