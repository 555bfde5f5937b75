"""A hand-made recommendation package with every feature the advisor alert shows: a band
breach, sells and buys, a substitute for a washed buy, a tax-loss harvest with a disallowed loss,
wait-for-long-term advice and the wash-sale watch. Built through rebal_pipeline_tests/factories.py;
its positions fingerprint is a fixed placeholder (no email reads it)."""

from __future__ import annotations

from datetime import date, datetime, timezone

from rebal_pipeline.workflow.package import PackageBand, RecommendationPackage
from rebal_pipeline_tests import factories

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
        recommendation_id="9f2c1e0a7b6d5c4e3f2a1b0c9d8e7f60", as_of=AS_OF, scope_id=ACCOUNT_ID,
        household_id="HH-0007", tier="standard", urgency="medium", delivery="within_48h",
        policy_version="2026.1+3fa85f64", model_version="growth-60-40@7c1d2e3f",
        trades=[
            factories.trade(ACCOUNT_ID, "VTI", "equity", "sell", 120, 251.35),
            factories.trade(ACCOUNT_ID, "VNQ", "alternatives", "sell", 40, 90.00, "tlh", wash_sale_disallowed=212.50),
            factories.trade(ACCOUNT_ID, "SCHH", "alternatives", "buy", 171, 21.00, "substitute", replaces_symbol="VNQ"),
            factories.trade(ACCOUNT_ID, "BND", "fixed_income", "buy", 412.3456, 72.80),
        ],
        holdings=[
            factories.holding(ACCOUNT_ID, "VTI", "equity", 800, 251.35),
            factories.holding(ACCOUNT_ID, "BND", "fixed_income", 1100, 72.80),
            factories.holding(ACCOUNT_ID, "VNQ", "alternatives", 200, 90.00),
            factories.holding(ACCOUNT_ID, "CASH", "cash", 3000, 1.0),
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
    return factories.make_package(**fields)
