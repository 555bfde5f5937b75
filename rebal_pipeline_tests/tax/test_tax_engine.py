"""The tax engine over one recommendation's own trades (core/tax_engine.py, no warehouse)."""

from datetime import date

import polars as pl

from rebal_pipeline.core.recommendation_identity import KEY, mint_recommendation_ids
from rebal_pipeline.core.tax_engine import PastWashSales, apply_tax_engine
from rebal_pipeline.core.tax_lots import TaxPolicy
from rebal_pipeline.core.wash_sales import LOSS_SALES_SCHEMA, PURCHASES_SCHEMA

AS_OF = date(2026, 11, 20)

ACCOUNTS = pl.DataFrame({
    "account_id": ["TAX", "IRA"], "household_id": ["HH", "HH"], "account_type": ["taxable", "traditional_ira"],
    "taxable": [True, False], "lot_relief_method": ["fifo", "fifo"], "federal_ordinary_rate": [0.32, 0.32],
    "federal_ltcg_rate": [0.15, 0.15], "state_rate": [0.05, 0.05], "harvest_eligible": [True, True],
})
SECURITIES = pl.DataFrame({
    "symbol": ["VTI", "SCHB", "BND"], "asset_class": ["equity", "equity", "fixed_income"],
    "security_type": ["etf", "etf", "etf"], "fractional": [False, False, False], "price": [100.0, 50.0, 50.0],
    "wash_group": ["us_total", "dj_broad", "us_agg"], "tlh_substitute": ["SCHB", "VTI", None],
})
LOTS = pl.DataFrame({
    "account_id": ["TAX", "IRA"], "symbol": ["VTI", "BND"], "lot_id": ["T1", "I1"], "lot_part": ["", ""],
    "acquired_date": [date(2025, 3, 3)] * 2, "holding_from": [date(2025, 3, 3)] * 2, "quantity": [50.0, 100.0],
    "cost_basis": [5500.0, 5000.0], "taxable": [True, False],
})


def household_recommendation(trades):
    """One household recommendation (asset location): the taxable account sells VTI at a loss
    ($110 basis, $100 price) and the IRA buys VTI with the proceeds of its bonds."""
    frame = pl.DataFrame(trades, schema={"account_id": pl.String, "symbol": pl.String, "asset_class": pl.String,
                                         "side": pl.String, "quantity": pl.Float64, "est_price": pl.Float64,
                                         "est_value": pl.Float64, "reason": pl.String}, orient="row")
    return frame.with_columns(pl.lit("REC-HH").alias(KEY))


def run(trades, overrides=None):
    past = PastWashSales(LOTS, pl.DataFrame(schema=LOSS_SALES_SCHEMA), pl.DataFrame(schema=PURCHASES_SCHEMA),
                         pl.DataFrame())
    recs = pl.DataFrame({KEY: ["REC-HH"], "scope": ["household"], "scope_id": ["HH"]})
    return apply_tax_engine(
        trades, recs, past, ACCOUNTS, SECURITIES, pl.DataFrame(schema={"account_id": pl.String, "kind": pl.String,
                                                                       "value": pl.String}),
        pl.DataFrame({KEY: ["REC-HH"], "drift_to_band": [1.5]}),
        overrides if overrides is not None else pl.DataFrame(schema={"account_id": pl.String, "symbol": pl.String,
                                                                     "reason": pl.String}),
        AS_OF, TaxPolicy(tlh_min_loss=1e9), 100.0,
    )


def minted_id(recommendations, trades) -> str:
    """The id core/recommendation_identity.py mints for the one recommendation from these trades."""
    members = pl.DataFrame({KEY: ["REC-HH"] * 2, "account_id": ["TAX", "IRA"], "model_version": ["m@1"] * 2})
    recs = recommendations.with_columns(pl.lit("rebalance").alias("kind"))
    return mint_recommendation_ids(recs, members, trades, AS_OF, "test-policy")["recommendation_id"].item()


TRADES = [("TAX", "VTI", "equity", "sell", 20.0, 100.0, 2000.0, "location"),
          ("IRA", "BND", "fixed_income", "sell", 40.0, 50.0, 2000.0, "location"),
          ("IRA", "VTI", "equity", "buy", 20.0, 100.0, 2000.0, "location")]


def test_a_buy_in_the_same_recommendation_that_would_wash_its_own_loss_becomes_the_substitute():
    outcome = run(household_recommendation(TRADES))
    ira_buy = outcome.trades.filter((pl.col("account_id") == "IRA") & (pl.col("side") == "buy"))
    assert ira_buy.select("symbol", "quantity", "reason", "replaces_symbol").rows() == [("SCHB", 40.0, "substitute", "VTI")]
    sale = outcome.tax_impact.filter(pl.col("account_id") == "TAX").row(0, named=True)
    # 20 sh × ($100 − $110) = −$200 long-term, deductible: saves $40; nothing disallowed.
    assert (sale["gain"], sale["wash_sale_disallowed"], sale["est_tax"]) == (-200.0, 0.0, -40.0)
    # The substitution changed the trades, so the recommendation has a new identity.
    assert minted_id(outcome.recommendations, outcome.trades) != minted_id(
        outcome.recommendations, household_recommendation(TRADES))


def test_kept_by_override_the_ira_buy_loses_the_loss_for_good():
    overrides = pl.DataFrame({"account_id": ["IRA"], "symbol": ["VTI"], "reason": ["model fidelity (ADV-1)"]})
    outcome = run(household_recommendation(TRADES), overrides)
    sale = outcome.tax_impact.filter(pl.col("account_id") == "TAX").row(0, named=True)
    assert (sale["wash_sale_disallowed"], sale["loss_lost_permanently"], sale["est_tax"]) == (200.0, True, 0.0)
    summary = outcome.summary.row(0, named=True)
    assert (summary["realized_loss"], summary["wash_sale_disallowed"]) == (0.0, 200.0)


def test_the_minted_id_replaces_the_key_in_every_frame_and_in_the_wash_sale_ids():
    overrides = pl.DataFrame({"account_id": ["IRA"], "symbol": ["VTI"], "reason": ["model fidelity (ADV-1)"]})
    keyed = run(household_recommendation(TRADES), overrides)
    outcome = keyed.identified(pl.DataFrame({KEY: ["REC-HH"], "recommendation_id": ["ID-1"]}))
    for frame in (outcome.trades, outcome.recommendations, outcome.tax_impact, outcome.summary):
        assert KEY not in frame.columns and frame["recommendation_id"].unique().to_list() == ["ID-1"]
    # The wash sale the kept buy causes names the sale and the buy by the minted id.
    proposed = outcome.wash_sales.filter(pl.col("when") == "proposed")
    assert proposed.select("sale_id", "purchase_id").rows() == [("S:ID-1:TAX:T1:", "B:ID-1:IRA:VTI")]
    assert outcome.wash_sales.columns == [c for c in keyed.wash_sales.columns if not c.endswith("_recommendation_key")]


def test_two_harvested_positions_sharing_a_substitute_buy_it_on_one_line():
    """VTI and ITOT both harvest into SCHB: one buy line of SCHB, not two (the package, the order
    ledger and the wash-sale match each key a recommendation's buy by account and security; two
    lines made the final wash-sale match refuse the day — found by the 10k-account benchmark).

    VTI: 50 sh at $100 on a $6,000 basis (down 16.7%) → $5,000 → 100 SCHB at $50.
    ITOT: 40 sh at $50 on a $2,600 basis (down 23.1%) → $2,000 → 40 SCHB. One line: 140 SCHB."""
    securities = pl.concat([SECURITIES.with_columns(
        pl.when(pl.col("symbol") == "SCHB").then(pl.lit("ITOT")).otherwise(pl.col("tlh_substitute")).alias("tlh_substitute")),
        pl.DataFrame({"symbol": ["ITOT"], "asset_class": ["equity"], "security_type": ["etf"], "fractional": [False],
                      "price": [50.0], "wash_group": ["ishares_total"], "tlh_substitute": ["SCHB"]})])
    lots = pl.DataFrame({
        "account_id": ["TAX", "TAX"], "symbol": ["VTI", "ITOT"], "lot_id": ["T1", "T2"], "lot_part": ["", ""],
        "acquired_date": [date(2025, 3, 3)] * 2, "holding_from": [date(2025, 3, 3)] * 2, "quantity": [50.0, 40.0],
        "cost_basis": [6000.0, 2600.0], "taxable": [True, True],
    })
    past = PastWashSales(lots, pl.DataFrame(schema=LOSS_SALES_SCHEMA), pl.DataFrame(schema=PURCHASES_SCHEMA),
                         pl.DataFrame())
    no_trades = household_recommendation([]).head(0)
    outcome = apply_tax_engine(
        no_trades, pl.DataFrame(schema={KEY: pl.String, "scope": pl.String, "scope_id": pl.String}),
        past, ACCOUNTS, securities, pl.DataFrame(schema={"account_id": pl.String, "kind": pl.String, "value": pl.String}),
        pl.DataFrame(schema={KEY: pl.String, "drift_to_band": pl.Float64}),
        pl.DataFrame(schema={"account_id": pl.String, "symbol": pl.String, "reason": pl.String}),
        AS_OF, TaxPolicy(), 100.0,
    )
    harvest = outcome.trades.sort("side", "symbol").select("side", "symbol", "quantity").rows()
    assert harvest == [("buy", "SCHB", 140.0), ("sell", "ITOT", 40.0), ("sell", "VTI", 50.0)]
