"""A hand-made recommendation package with every feature the advisor alert shows: a band
breach, sells and buys, a substitute for a washed buy, a tax-loss harvest with a disallowed loss,
wait-for-long-term advice and the wash-sale watch."""

from __future__ import annotations

from datetime import date, datetime, timezone

from rebal_pipeline.workflow.package import PackageBand, PackageHolding, PackageTrade, RecommendationPackage

AS_OF = date(2026, 11, 20)
PUBLISHED_AT = datetime(2026, 11, 20, 21, 30, tzinfo=timezone.utc)
ACCOUNT_ID = "ACC-0042"
ACCOUNT_NUMBER = "87654321"  # the custodian's number: the email shows ••••4321
CLIENT_NAME = "Avery & Jordan Client"  # an ampersand: autoescape must show it, not break the HTML

LINKS = {
    "approve": "https://rebal.example-ria.com/l/approve?t=eyJhIjoiYXBwcm92ZSJ9.c2ln&lang=en",
    "review": "https://rebal.example-ria.com/l/review?t=eyJhIjoicmV2aWV3In0.c2ln",
    "defer": "https://rebal.example-ria.com/l/defer?t=eyJhIjoiZGVmZXIifQ.c2ln",
    "escalate": "https://rebal.example-ria.com/l/escalate?t=eyJhIjoiZXNjYWxhdGUifQ.c2ln",
}


def make_package(**overrides) -> RecommendationPackage:
    fields = dict(
        recommendation_id="9f2c1e0a7b6d5c4e3f2a1b0c9d8e7f60", as_of=AS_OF, scope="account", scope_id=ACCOUNT_ID,
        kind="rebalance", advisor_id="ADV-1", household_id="HH-0007", account_ids=[ACCOUNT_ID], tier="standard",
        urgency="medium", delivery="within_48h", discretionary=False,
        policy_version="2026.1+3fa85f64", model_version="growth-60-40@7c1d2e3f",
        trades=[
            PackageTrade(account_id=ACCOUNT_ID, symbol="VTI", asset_class="equity", side="sell", quantity=120,
                         est_price=251.35, est_value=30162.00, reason="rebalance"),
            PackageTrade(account_id=ACCOUNT_ID, symbol="VNQ", asset_class="alternatives", side="sell", quantity=40,
                         est_price=90.00, est_value=3600.00, reason="tlh", wash_sale_disallowed=212.50),
            PackageTrade(account_id=ACCOUNT_ID, symbol="SCHH", asset_class="alternatives", side="buy", quantity=171,
                         est_price=21.00, est_value=3591.00, reason="substitute", replaces_symbol="VNQ"),
            PackageTrade(account_id=ACCOUNT_ID, symbol="BND", asset_class="fixed_income", side="buy",
                         quantity=412.3456, est_price=72.80, est_value=30018.76, reason="rebalance"),
        ],
        holdings=[
            PackageHolding(account_id=ACCOUNT_ID, symbol="VTI", asset_class="equity", quantity=800, price=251.35,
                           market_value=201080.00),
            PackageHolding(account_id=ACCOUNT_ID, symbol="BND", asset_class="fixed_income", quantity=1100,
                           price=72.80, market_value=80080.00),
            PackageHolding(account_id=ACCOUNT_ID, symbol="VNQ", asset_class="alternatives", quantity=200,
                           price=90.00, market_value=18000.00),
            PackageHolding(account_id=ACCOUNT_ID, symbol="CASH", asset_class="cash", quantity=3000, price=1.0,
                           market_value=3000.00),
        ],
        bands=[
            PackageBand(asset_class="equity", target_weight=0.55, band=0.05, current_weight=0.6654, drift=0.1154),
            PackageBand(asset_class="fixed_income", target_weight=0.35, band=0.05, current_weight=0.2650,
                        drift=-0.0850),
            PackageBand(asset_class="alternatives", target_weight=0.07, band=0.05, current_weight=0.0596,
                        drift=-0.0104),
            PackageBand(asset_class="cash", target_weight=0.03, band=0.02, current_weight=0.0100, drift=-0.0200),
        ],
        tax={
            "trade_value": 67371.76, "sell_value": 33762.00, "st_gain": 1840.25, "lt_gain": 6420.10,
            "realized_loss": 1187.50, "wash_sale_disallowed": 212.50, "est_tax": 1733.42, "net_tax_pct": 0.025729,
            "wait_for_long_term": True, "wait_until": "2026-12-09", "tax_saved_by_waiting": 331.25,
            "wait_reason": "wait until 2026-12-09 (19 days): the short-term gains on VTI 45 sh (lot L-17) turn "
                           "long-term and about $331.25 of tax is saved; drift is 1.7× its band (severe at 2×)",
            "wash_sale_watch": "do not buy VNQ (wash group reit_msci) in any of the household's accounts, "
                               "IRAs included, through 2026-12-20",
        },
        inside_bands=True, unresolved=None, positions_fingerprint="0" * 64,
    )
    fields.update(overrides)
    return RecommendationPackage(**fields)
