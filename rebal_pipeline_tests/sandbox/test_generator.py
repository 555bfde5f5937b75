"""The sandbox generator writes a clean, realistic canonical feed, and plants exactly the
documented defects when asked, and exactly the documented past wash sales always.

The checks read the files the way the ingest does (text, exactly as written) and do the
arithmetic exactly (integers or Decimal), because the ingest demands exact sums.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

import duckdb
import polars as pl
import pydantic
import pytest

from rebal_pipeline import settings
from rebal_pipeline.core.feed_contract import (
    BOOL_VALUES,
    CASH_SYMBOL,
    DATE_PATTERN,
    DECIMAL_PATTERN,
    FEED_FILES,
    LOT_RELIEF_METHODS,
)
from rebal_pipeline.core.landing import land_feed
from rebal_pipeline.core.sql_models import load_project, materialize_model
from rebal_pipeline.sandbox.generator import (
    WASH_SALE_KINDS,
    WASH_SALES_PER_200,
    SandboxConfig,
    SandboxReport,
    WashSaleScenario,
    cusip_check_digit,
    generate_feed,
    households_for_accounts,
)

AS_OF = dt.date(2025, 6, 13)  # a Friday
BOOK = dict(as_of=AS_OF, households=300, seed=42)
THIN_STOCK = "ZVXQ"
DOCUMENTED_DEFECTS = {
    # kind: (file, column)
    "negative_quantity": ("positions.csv", "quantity"),
    "unknown_symbol": ("positions.csv", "symbol"),
    "non_positive_price": ("prices.csv", "close"),
    "lots_mismatch": ("lots.csv", "quantity"),
    "targets_not_summing": ("ips_targets.csv", "target_weight"),
    "duplicate_key": ("positions.csv", "account_id,symbol"),
    "bad_decimal": ("positions.csv", "quantity"),
    "bad_date": ("lots.csv", "open_date"),
    "bad_enum": ("restrictions.csv", "kind"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> SandboxReport:
    return generate_feed(SandboxConfig(**BOOK), tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def defective(tmp_path_factory) -> SandboxReport:
    return generate_feed(SandboxConfig(**BOOK, defects=True), tmp_path_factory.mktemp("defective"))


def read(report: SandboxReport, name: str) -> pl.DataFrame:
    """A feed file as text columns, empty fields as null: what the ingest sees."""
    return pl.read_csv(report.feed_dir / f"{name}.csv", infer_schema=False)


def exact(column: str) -> pl.Expr:
    """Non-negative decimal text as an exact integer count of 1e-8 (the contract's precision)."""
    parts = pl.col(column).str.split_exact(".", 1)
    whole = parts.struct.field("field_0").cast(pl.Int64)
    fraction = parts.struct.field("field_1").fill_null("").str.pad_end(8, "0").cast(pl.Int64)
    return whole * 100_000_000 + fraction


def exact_frame(frame: pl.DataFrame, column: str) -> pl.Series:
    return frame.select(exact(column)).to_series()


ONE = 100_000_000  # 1 in units of 1e-8


def lines(report: SandboxReport, filename: str) -> list[str]:
    return (report.feed_dir / filename).read_text(encoding="utf-8").splitlines()


def days_to_long_term(opened: dt.date, as_of: dt.date) -> int:
    """Held more than one year (IRC §1222): long-term from the day after the anniversary."""
    try:
        anniversary = opened.replace(year=opened.year + 1)
    except ValueError:  # opened on 29 February
        anniversary = opened.replace(year=opened.year + 1, day=28)
    return (anniversary + dt.timedelta(days=1) - as_of).days


def holdings(report: SandboxReport) -> pl.DataFrame:
    """Positions with asset class and as-of market value (floats: for tiers and weights only)."""
    return (
        read(report, "positions")
        .join(read(report, "prices"), on="symbol")
        .join(read(report, "securities").select("symbol", "asset_class"), on="symbol")
        .join(read(report, "accounts").select("account_id", "household_id"), on="account_id")
        .with_columns(market_value=pl.col("quantity").cast(pl.Float64) * pl.col("close").cast(pl.Float64))
    )


# --- determinism ------------------------------------------------------------------------


def test_the_same_config_writes_byte_identical_files(tmp_path):
    config = SandboxConfig(as_of=AS_OF, households=80, seed=5, defects=True, shock={"equity": -0.05})
    first = generate_feed(config, tmp_path / "first")
    second = generate_feed(config, tmp_path / "second")
    for feed_file in FEED_FILES.values():
        assert (first.feed_dir / feed_file.filename).read_bytes() == (second.feed_dir / feed_file.filename).read_bytes(), feed_file.filename
    assert first == second.model_copy(update={"feed_dir": first.feed_dir})


def test_another_seed_writes_another_book(tmp_path, clean):
    other = generate_feed(SandboxConfig(**{**BOOK, "seed": 43}), tmp_path)
    for name in ("households", "accounts", "positions", "lots", "prices"):
        assert (other.feed_dir / f"{name}.csv").read_bytes() != (clean.feed_dir / f"{name}.csv").read_bytes(), name


def test_generating_again_overwrites_the_date_folder(tmp_path):
    generate_feed(SandboxConfig(as_of=AS_OF, households=40, seed=1), tmp_path)
    report = generate_feed(SandboxConfig(as_of=AS_OF, households=20, seed=2), tmp_path)
    assert read(report, "households").height == 20
    assert sorted(p.name for p in report.feed_dir.iterdir()) == sorted(f.filename for f in FEED_FILES.values())


# --- the contract's shape and formats -----------------------------------------------------


def test_every_contract_file_is_written_with_the_contract_columns_in_order(clean):
    assert clean.feed_dir == clean.feed_dir.parent / AS_OF.isoformat()
    assert sorted(p.name for p in clean.feed_dir.iterdir()) == sorted(f.filename for f in FEED_FILES.values())
    for feed_file in FEED_FILES.values():
        raw = (clean.feed_dir / feed_file.filename).read_bytes()
        text = raw.decode("utf-8")  # strict: fails on anything that is not UTF-8
        assert b"\r" not in raw and text.endswith("\n"), feed_file.filename
        assert text.split("\n", 1)[0] == ",".join(feed_file.column_names), feed_file.filename


def test_report_counts_the_rows_written(clean):
    assert clean.defects == []
    assert clean.households == read(clean, "households").height == 300
    assert clean.accounts == read(clean, "accounts").height
    assert clean.positions == read(clean, "positions").height
    assert clean.lots == read(clean, "lots").height
    assert clean.transactions == read(clean, "transactions").height


def test_every_value_is_written_in_the_contract_format(clean):
    for feed_file in FEED_FILES.values():
        frame = read(clean, feed_file.name)
        assert frame.height > 0, feed_file.filename
        for column in feed_file.columns:
            values = frame.get_column(column.name)
            where = f"{feed_file.filename}[{column.name}]"
            if not column.nullable:
                assert values.null_count() == 0, where
            present = values.drop_nulls()
            assert (present != "").all(), f"{where}: empty values must be empty fields, not \"\""
            if column.kind == "decimal":
                assert present.str.contains(DECIMAL_PATTERN).all(), where
            elif column.kind == "date":
                assert present.str.contains(DATE_PATTERN).all(), where
                present.str.to_date("%Y-%m-%d")  # real calendar dates
            elif column.kind == "bool":
                assert present.is_in(BOOL_VALUES).all(), where
            elif column.kind == "enum":
                assert present.is_in(column.choices).all(), where


def test_every_key_is_unique(clean):
    for feed_file in FEED_FILES.values():
        if feed_file.key:
            frame = read(clean, feed_file.name)
            assert not frame.select(feed_file.key).is_duplicated().any(), feed_file.filename


# --- invariants of a clean feed ------------------------------------------------------------


def test_every_symbol_used_is_in_the_security_master_and_priced(clean):
    securities = read(clean, "securities")
    known = set(securities["symbol"])
    assert known == set(read(clean, "prices")["symbol"])
    restrictions = read(clean, "restrictions")
    used = (
        set(read(clean, "positions")["symbol"])
        | set(read(clean, "lots")["symbol"])
        | set(read(clean, "transactions")["symbol"])
        | set(read(clean, "models")["symbol"])
        | set(securities["tlh_substitute"].drop_nulls())
        | set(restrictions.filter(pl.col("kind").is_in(["no_buy_symbol", "no_sell_symbol"]))["value"])
    )
    assert used <= known
    assert 30 <= len(known) <= 40


def test_prices_are_positive_and_cash_is_exactly_one(clean):
    prices = read(clean, "prices").with_columns(close=exact("close"))
    assert (prices["close"] > 0).all()
    assert prices.filter(pl.col("symbol") == CASH_SYMBOL)["close"].to_list() == [ONE]
    close = dict(read(clean, "prices").iter_rows())
    assert 200 < float(close["VTI"]) < 400 and 50 < float(close["BND"]) < 100 and close["SWVXX"] == "1.00"


def test_model_weights_and_ips_targets_sum_to_exactly_one(clean):
    models = read(clean, "models").group_by("model_id").agg(total=exact("weight").sum())
    assert 3 <= models.height <= 5
    assert (models["total"] == ONE).all()
    targets = read(clean, "ips_targets").group_by("scope", "scope_id").agg(total=exact("target_weight").sum())
    assert (targets["total"] == ONE).all()
    # Every model keeps a small cash weight.
    cash = read(clean, "models").join(read(clean, "securities"), on="symbol").filter(pl.col("asset_class") == "cash")
    assert cash["model_id"].n_unique() == models.height


def test_lots_sum_exactly_to_their_positions_and_cash_has_none(clean):
    positions = read(clean, "positions").with_columns(quantity=exact("quantity"))
    lots = read(clean, "lots").with_columns(quantity=exact("quantity"), cost_basis=exact("cost_basis"))
    assert (positions["quantity"] >= 0).all()
    assert (lots["quantity"] > 0).all() and (lots["cost_basis"] > 0).all()
    assert lots.filter(pl.col("symbol") == CASH_SYMBOL).height == 0
    assert lots.filter(pl.col("symbol") == "SWVXX").height > 0  # money-market funds do have lots
    lot_totals = lots.group_by("account_id", "symbol").agg(lots=pl.col("quantity").sum(), count=pl.len())
    assert lot_totals["count"].min() >= 1 and lot_totals["count"].max() <= 3
    reconciled = positions.filter(pl.col("symbol") != CASH_SYMBOL).join(lot_totals, on=["account_id", "symbol"], how="full", coalesce=True)
    assert reconciled.filter(pl.col("quantity").is_null() | pl.col("lots").is_null() | (pl.col("quantity") != pl.col("lots"))).height == 0
    # Every account reports a cash balance in dollars and cents.
    cash = read(clean, "positions").filter(pl.col("symbol") == CASH_SYMBOL)
    assert cash.height == read(clean, "accounts").height
    assert cash["quantity"].str.contains(r"^[0-9]+\.[0-9]{2}$").all()


def test_quantities_are_whole_shares_except_for_fractional_funds(clean):
    securities = read(clean, "securities").select("symbol", "fractional")
    for name in ("positions", "lots", "transactions"):
        frame = read(clean, name).filter(pl.col("symbol") != CASH_SYMBOL).join(securities, on="symbol")
        whole = frame.filter(pl.col("fractional") == "false")["quantity"]
        assert whole.str.contains(r"^[0-9]+$").all(), name
        fractional = frame.filter(pl.col("fractional") == "true")["quantity"]
        assert fractional.str.contains(r"^[0-9]+(\.[0-9]{1,3})?$").all(), name


def test_every_reference_resolves(clean):
    users = read(clean, "users")
    advisors = set(users.filter(pl.col("role") == "advisor")["user_id"])
    households = read(clean, "households")
    accounts = read(clean, "accounts")
    targets = read(clean, "ips_targets")
    assert set(households["advisor_id"]) <= advisors
    assert set(accounts["household_id"]) <= set(households["household_id"])
    assert set(households["household_id"]) <= set(accounts["household_id"])  # no empty households
    assert set(accounts["model_id"].drop_nulls()) <= set(read(clean, "models")["model_id"])
    account_targets = set(targets.filter(pl.col("scope") == "account")["scope_id"])
    assert set(accounts.filter(pl.col("model_id").is_null())["account_id"]) <= account_targets
    assert accounts["model_id"].null_count() > 0  # some accounts are run from their IPS alone
    assert account_targets <= set(accounts["account_id"])
    assert set(targets.filter(pl.col("scope") == "household")["scope_id"]) <= set(households["household_id"])
    for name in ("restrictions", "positions", "lots", "transactions"):
        assert set(read(clean, name)["account_id"]) <= set(accounts["account_id"]), name
    # A few accounts name another advisor of record; the rest leave the column empty.
    overrides = accounts.filter(pl.col("advisor_id").is_not_null()).join(households, on="household_id", suffix="_household")
    assert 0 < overrides.height < accounts.height / 10
    assert set(overrides["advisor_id"]) <= advisors
    assert (overrides["advisor_id"] != overrides["advisor_id_household"]).all()


def test_the_firm_has_advisors_and_one_of_each_other_role(clean):
    users = read(clean, "users")
    # One advisor per 40 households, plus a client associate on the first advisor's team.
    assert Counter(users["role"]) == {"advisor": round(300 / 40) + 1, "compliance": 1, "trading_desk": 1, "operations": 1}
    assert users.filter(pl.col("team_of").is_not_null()).select("user_id", "team_of").rows() == [("ASC-0001", "ADV-0001")]
    assert users["email"].str.ends_with("@example-ria.com").all()
    assert users["email"].n_unique() == users.height
    assert users["name"].str.contains(r"^[A-Z][a-z]+ [A-Z][A-Za-z']+$").all()


def test_tlh_substitutes_are_another_wash_group_in_the_same_asset_class(clean):
    securities = read(clean, "securities")
    pairs = securities.filter(pl.col("tlh_substitute").is_not_null()).join(
        securities, left_on="tlh_substitute", right_on="symbol", suffix="_substitute"
    )
    assert pairs.height > 10
    assert (pairs["asset_class"] == pairs["asset_class_substitute"]).all()
    assert (pairs["wash_group"] != pairs["wash_group_substitute"]).all()
    group = dict(securities.select("symbol", "wash_group").iter_rows())
    # Share classes of one fund, and funds on one index, are substantially identical.
    assert group["VTI"] == group["VTSAX"] and group["VOO"] == group["IVV"] == group["VFIAX"] and group["BND"] == group["VBTLX"]


def test_cusips_carry_a_valid_check_digit(clean):
    # Real CUSIPs: Apple, Microsoft, Vanguard Total Stock Market ETF.
    for cusip in ("037833100", "594918104", "922908769"):
        assert cusip_check_digit(cusip[:8]) == cusip[8]
    securities = read(clean, "securities")
    cusips = securities.filter(pl.col("symbol") != CASH_SYMBOL)["cusip"]
    assert cusips.null_count() == 0 and cusips.n_unique() == len(cusips)
    for cusip in cusips:
        assert len(cusip) == 9 and cusip_check_digit(cusip[:8]) == cusip[8], cusip


def test_lots_are_opened_before_as_of_and_trades_fall_in_the_last_60_days(clean):
    opened = read(clean, "lots")["open_date"].str.to_date()
    assert opened.max() <= AS_OF and opened.min() >= AS_OF - dt.timedelta(days=5 * 366)
    traded = read(clean, "transactions")["trade_date"].str.to_date()
    assert traded.max() <= AS_OF and traded.min() >= AS_OF - dt.timedelta(days=60)
    assert (opened.dt.weekday() <= 5).all() and (traded.dt.weekday() <= 5).all()  # weekdays only
    assert set(read(clean, "transactions")["type"]) >= {"buy", "sell", "reinvest", "transfer_in"}


def test_every_lot_opened_in_the_last_60_days_has_its_purchase_in_the_transactions(clean):
    since = (AS_OF - dt.timedelta(days=60)).isoformat()
    recent = read(clean, "lots").filter(pl.col("open_date") >= since)
    purchases = read(clean, "transactions").filter(pl.col("type").is_in(["buy", "reinvest"]))
    assert recent.height > 0

    # The same lots and purchases, one for one (two lots may share a day and a quantity), each
    # at the lot's price: cost basis / quantity (written with 2 places, or 6 for fund shares),
    # less the wash-sale loss the custodian added to the basis of a lot marked adjusted.
    added = {
        (w.replacement_account_id, w.replacement_symbol, w.replacement_date.isoformat()): w.disallowed_loss
        for w in clean.wash_sales
        if w.kind == "custodian_adjusted"
    }
    adjusted = recent.filter(pl.col("wash_sale_adjusted") == "true").select("account_id", "symbol", "open_date").rows()
    assert sorted(adjusted) == sorted(added)
    micro = Decimal("0.000001")
    expected = Counter(
        (account_id, symbol, opened, quantity, ((Decimal(cost_basis) - added.get((account_id, symbol, opened), 0)) / Decimal(quantity)).quantize(micro, ROUND_HALF_UP))
        for account_id, symbol, opened, quantity, cost_basis in recent.select("account_id", "symbol", "open_date", "quantity", "cost_basis").iter_rows()
    )
    found = Counter(
        (account_id, symbol, traded, quantity, Decimal(price))
        for account_id, symbol, traded, quantity, price in purchases.select("account_id", "symbol", "trade_date", "quantity", "price").iter_rows()
    )
    assert expected == found


# --- what the demo needs to show -----------------------------------------------------------


def test_households_fall_in_all_three_tiers_in_roughly_the_intended_mix(clean):
    value = holdings(clean).group_by("household_id").agg(pl.col("market_value").sum())["market_value"]
    base, premium = (value < 100_000).mean(), (value >= 500_000).mean()
    standard = 1 - base - premium
    assert 0.18 <= base <= 0.42 and 0.33 <= standard <= 0.57 and 0.15 <= premium <= 0.37


def test_the_book_has_joint_aggregated_suspended_and_erisa_accounts(clean):
    households = read(clean, "households")
    accounts = read(clean, "accounts").join(households, on="household_id")
    per_household = accounts.group_by("household_id").agg(accounts=pl.len(), aggregated=pl.col("aggregate_rebalancing").first())
    assert per_household["accounts"].min() >= 1 and per_household["accounts"].max() <= 5
    assert 2.0 <= per_household["accounts"].mean() <= 3.0
    multi = per_household.filter(pl.col("accounts") > 1)
    assert 0.15 <= (multi["aggregated"] == "true").mean() <= 0.35
    assert per_household.filter(pl.col("accounts") == 1, pl.col("aggregated") == "true").height == 0
    assert households["name"].str.contains(r"^(The [A-Z][A-Za-z']+ Family|[A-Z][A-Za-z']+ (Household|Family Trust))$").all()

    suspended = accounts.filter(pl.col("suspended") == "true")
    assert suspended.height > 0 and suspended["suspended_reason"].null_count() == 0
    assert accounts.filter(pl.col("suspended") == "false")["suspended_reason"].null_count() == accounts.height - suspended.height
    assert accounts.filter(pl.col("tax_sensitive") == "true")["account_type"].unique().to_list() == ["taxable"]
    assert set(accounts["account_type"]) == {"taxable", "traditional_ira", "roth_ira", "401k", "529", "erisa"}
    assert set(accounts["custodian"]) == {"schwab", "fidelity", "pershing"}
    assert accounts["account_id"].str.contains(r"^ACC-[0-9]{7}$").all() and households["household_id"].str.contains(r"^HH-[0-9]{6}$").all()

    # ERISA plans bar alternatives: a restriction on every ERISA account, and nothing held there.
    erisa = set(accounts.filter(pl.col("account_type") == "erisa")["account_id"])
    barred = read(clean, "restrictions").filter(pl.col("kind") == "no_asset_class", pl.col("value") == "alternatives")
    assert erisa and set(barred["account_id"]) == erisa
    held = holdings(clean).filter(pl.col("account_id").is_in(list(erisa)), pl.col("asset_class") == "alternatives")
    assert held.height == 0


def test_restrictions_include_each_kind(clean):
    restrictions = read(clean, "restrictions")
    assert set(restrictions["kind"]) == {"no_buy_symbol", "no_sell_symbol", "no_asset_class", "min_cash_weight"}
    assert set(restrictions.filter(pl.col("kind") == "min_cash_weight")["value"]) <= {"0.02", "0.03", "0.05"}
    # A client who will not sell a stock holds it.
    no_sell = restrictions.filter(pl.col("kind") == "no_sell_symbol").rename({"value": "symbol"})
    assert no_sell.join(read(clean, "positions"), on=["account_id", "symbol"]).height == no_sell.height > 0
    # ... and it is a legacy, low-basis holding: every lot at a gain.
    lots = no_sell.join(read(clean, "lots"), on=["account_id", "symbol"]).join(read(clean, "prices"), on="symbol")
    gains = lots.select(pl.col("quantity").cast(pl.Float64) * pl.col("close").cast(pl.Float64) - pl.col("cost_basis").cast(pl.Float64))
    assert lots.height > 0 and (gains.to_series() > 0).all()


def test_some_taxable_lots_are_down_ten_percent_and_some_turn_long_term_within_30_days(clean):
    lots = (
        read(clean, "lots")
        .join(read(clean, "prices"), on="symbol")
        .join(read(clean, "accounts").select("account_id", "account_type"), on="account_id")
        .with_columns(
            value=pl.col("quantity").cast(pl.Float64) * pl.col("close").cast(pl.Float64),
            cost=pl.col("cost_basis").cast(pl.Float64),
            opened=pl.col("open_date").str.to_date(),
        )
    )
    harvestable = lots.filter(pl.col("account_type") == "taxable", pl.col("value") <= 0.9 * pl.col("cost"))
    assert harvestable.height > 0
    assert lots.filter(pl.col("value") > pl.col("cost")).height > lots.height / 3  # most of the book is at a gain
    nearly_long_term = [d for d in lots["opened"] if 1 <= days_to_long_term(d, AS_OF) <= 30]
    assert len(nearly_long_term) > 0


def test_wash_sale_set_ups_pair_a_taxable_loss_with_an_ira_purchase_of_the_same_fund(clean):
    securities = read(clean, "securities").select("symbol", "wash_group")
    accounts = read(clean, "accounts").select("account_id", "household_id", "account_type")
    losses = (
        read(clean, "lots")
        .join(read(clean, "prices"), on="symbol")
        .join(securities, on="symbol")
        .join(accounts, on="account_id")
        .filter(
            pl.col("account_type") == "taxable",
            pl.col("quantity").cast(pl.Float64) * pl.col("close").cast(pl.Float64) <= 0.9 * pl.col("cost_basis").cast(pl.Float64),
        )
    )
    # IRC §1091: a substantially identical purchase within 30 days, in any account of the household.
    ira_purchases = (
        read(clean, "transactions")
        .filter(pl.col("type") == "buy", pl.col("trade_date") >= (AS_OF - dt.timedelta(days=30)).isoformat())
        .join(securities, on="symbol")
        .join(accounts, on="account_id")
        .filter(pl.col("account_type").is_in(["traditional_ira", "roth_ira"]))
    )
    set_ups = losses.join(ira_purchases, on=["household_id", "wash_group"], suffix="_ira").filter(pl.col("symbol") != pl.col("symbol_ira"))
    assert set_ups.height > 0


def test_the_thin_stock_is_held_by_exactly_one_ordinary_account(clean):
    holders = read(clean, "positions").filter(pl.col("symbol") == THIN_STOCK)
    assert holders.height == 1
    account = read(clean, "accounts").filter(pl.col("account_id") == holders["account_id"][0])
    assert account["suspended"].to_list() == ["false"]


def test_about_one_account_in_seven_breaches_its_band_without_a_shock(clean):
    """Bands as the drift policy sets them: ±2% tax-sensitive, else ±3/±5/±7% by household tier.

    Judged on accounts of households that are not rebalanced as one (the others are judged as
    a household), against their IPS targets or else their model's asset-class weights.
    """
    positions = holdings(clean)
    household_value = positions.group_by("household_id").agg(household_value=pl.col("market_value").sum())
    weights = positions.group_by("account_id", "asset_class").agg(pl.col("market_value").sum()).with_columns(
        weight=pl.col("market_value") / pl.col("market_value").sum().over("account_id")
    )
    securities = read(clean, "securities").select("symbol", "asset_class")
    model_targets = (
        read(clean, "models").join(securities, on="symbol").group_by("model_id", "asset_class").agg(target=pl.col("weight").cast(pl.Float64).sum())
    )
    account_targets = read(clean, "ips_targets").filter(pl.col("scope") == "account").select(
        account_id="scope_id", asset_class="asset_class", target=pl.col("target_weight").cast(pl.Float64)
    )
    accounts = (
        read(clean, "accounts")
        .join(read(clean, "households").select("household_id", "aggregate_rebalancing"), on="household_id")
        .filter(pl.col("aggregate_rebalancing") == "false", pl.col("suspended") == "false")
        .join(household_value, on="household_id")
    )
    with_ips = accounts.filter(pl.col("account_id").is_in(account_targets["account_id"].implode()))
    targets = pl.concat(
        [
            account_targets.join(with_ips.select("account_id"), on="account_id"),
            accounts.join(with_ips.select("account_id"), on="account_id", how="anti").join(model_targets, on="model_id").select("account_id", "asset_class", "target"),
        ]
    )
    drift = (
        targets.join(weights, on=["account_id", "asset_class"], how="full", coalesce=True)
        .join(accounts.select("account_id"), on="account_id")
        .fill_null(0.0)
        .group_by("account_id")
        .agg(max_drift=(pl.col("weight") - pl.col("target")).abs().max())
        .join(accounts, on="account_id")
        .with_columns(
            band=pl.when(pl.col("tax_sensitive") == "true")
            .then(0.02)
            .when(pl.col("household_value") >= 500_000)
            .then(0.03)
            .when(pl.col("household_value") >= 100_000)
            .then(0.05)
            .otherwise(0.07)
        )
    )
    breach_rate = (drift["max_drift"] > drift["band"]).mean()
    assert 0.07 <= breach_rate <= 0.25


def test_an_equity_shock_moves_only_equity_closes_by_exactly_that_factor(tmp_path, clean):
    shocked = generate_feed(SandboxConfig(**BOOK, shock={"equity": -0.12}), tmp_path)
    asset_class = dict(read(clean, "securities").select("symbol", "asset_class").iter_rows())
    before = dict(read(clean, "prices").iter_rows())
    after = dict(read(shocked, "prices").iter_rows())
    for symbol, close in before.items():
        if asset_class[symbol] == "equity":
            assert Decimal(after[symbol]) == (Decimal(close) * Decimal("0.88")).quantize(Decimal("0.01"), ROUND_HALF_UP), symbol
        else:
            assert after[symbol] == close, symbol
    # The holdings are the ones the advisor had yesterday: only the closes moved.
    for name in ("accounts", "positions", "lots", "transactions"):
        assert (shocked.feed_dir / f"{name}.csv").read_bytes() == (clean.feed_dir / f"{name}.csv").read_bytes(), name


def test_config_refuses_what_the_feed_cannot_express():
    with pytest.raises(pydantic.ValidationError):
        SandboxConfig(as_of=AS_OF, shock={"cash": -0.1})  # cash is priced at exactly 1
    with pytest.raises(pydantic.ValidationError):
        SandboxConfig(as_of=AS_OF, shock={"equity": -1.0})  # a close must stay above zero
    with pytest.raises(pydantic.ValidationError):
        SandboxConfig(as_of=AS_OF, households=0)
    with pytest.raises(pydantic.ValidationError):
        SandboxConfig(as_of=AS_OF).households = 3  # frozen
    assert SandboxConfig(as_of=AS_OF).advisor_count == 5
    assert SandboxConfig(as_of=AS_OF, households=10).advisor_count == 2


def test_households_for_accounts_gives_about_that_many_accounts(tmp_path):
    report = generate_feed(SandboxConfig(as_of=AS_OF, households=households_for_accounts(1_500)), tmp_path)
    assert 1_350 <= report.accounts <= 1_650


# --- new optional columns -------------------------------------------------------------------


def test_some_accounts_carry_a_standing_lot_relief_method(clean):
    accounts = read(clean, "accounts")
    share = {m: (accounts["lot_relief_method"] == m).sum() / accounts.height for m in LOT_RELIEF_METHODS}
    empty = accounts["lot_relief_method"].null_count() / accounts.height
    assert 0.17 <= share["tax_min"] <= 0.35 and 0.05 <= share["hifo"] <= 0.16 and 0 < share["fifo"] <= 0.10
    assert empty >= 0.5  # most leave it to the policy default (fifo)
    # The accounts that harvested a loss told the custodian to relieve the lowest-tax lots first.
    sellers = accounts.filter(pl.col("account_id").is_in([w.account_id for w in clean.wash_sales]))
    assert sellers.height > 0 and (sellers["lot_relief_method"] == "tax_min").all()


def test_only_custodian_adjusted_replacement_lots_are_marked_wash_sale_adjusted(clean):
    lots = read(clean, "lots")
    marked = lots.filter(pl.col("wash_sale_adjusted").is_not_null())
    assert set(marked["wash_sale_adjusted"]) == {"true"}
    expected = {(w.replacement_account_id, w.replacement_symbol, w.replacement_date.isoformat()) for w in clean.wash_sales if w.kind == "custodian_adjusted"}
    assert set(marked.select("account_id", "symbol", "open_date").rows()) == expected and marked.height == len(expected) > 0


def test_every_sell_reports_the_basis_and_acquisition_date_of_the_shares_sold(clean):
    transactions = read(clean, "transactions")
    sells = transactions.filter(pl.col("type") == "sell")
    others = transactions.filter(pl.col("type") != "sell")
    assert sells.height > 20
    assert sells["cost_basis"].null_count() == 0 and sells["acquired_date"].null_count() == 0
    assert others["cost_basis"].null_count() == others["acquired_date"].null_count() == others.height
    sells = sells.with_columns(
        acquired=pl.col("acquired_date").str.to_date(),
        traded=pl.col("trade_date").str.to_date(),
        ratio=pl.col("cost_basis").cast(pl.Float64) / (pl.col("price").cast(pl.Float64) * pl.col("quantity").cast(pl.Float64)),
    )
    # Bought before the 60-day window (so no buy row is missing for shares since sold), on a
    # weekday, at a basis a price history of five years makes plausible.
    assert (sells["acquired"] < sells["traded"]).all() and (sells["acquired"] < AS_OF - dt.timedelta(days=60)).all()
    assert (sells["acquired"] >= AS_OF - dt.timedelta(days=5 * 366 + 10)).all() and (sells["acquired"].dt.weekday() <= 5).all()
    assert (exact_frame(sells, "cost_basis") > 0).all() and sells["ratio"].is_between(0.3, 3.0).all()
    # The ordinary trims relieved the position's oldest shares first (first in, first out):
    # bought before every lot still held.
    planted = [(w.account_id, w.symbol, w.sale_date.isoformat()) for w in clean.wash_sales]
    trims = sells.filter(~pl.concat_list("account_id", "symbol", "trade_date").list.join(",").is_in([",".join(k) for k in planted]))
    assert trims.height == sells.height - len(planted)
    oldest = read(clean, "lots").group_by("account_id", "symbol").agg(oldest=pl.col("open_date").str.to_date().min())
    trims = trims.join(oldest, on=["account_id", "symbol"], how="left")
    assert (trims["oldest"].is_null() | (trims["acquired"] <= trims["oldest"])).all()


# --- past wash sales -----------------------------------------------------------------------

WINDOW = dt.timedelta(days=30)  # IRC §1091: 30 days before or after the sale
IRA_TYPES = ("traditional_ira", "roth_ira")


def loss_sales(report: SandboxReport) -> dict[tuple[str, str, dt.date], dict]:
    """Every sell at a loss (price x quantity < cost_basis, exactly), by account, symbol and day."""
    accounts = dict(read(report, "accounts").select("account_id", "household_id").iter_rows())
    group = dict(read(report, "securities").select("symbol", "wash_group").iter_rows())
    found = {}
    for row in read(report, "transactions").filter(pl.col("type") == "sell").iter_rows(named=True):
        loss = Decimal(row["cost_basis"]) - Decimal(row["price"]) * Decimal(row["quantity"])
        if loss > 0:
            key = (row["account_id"], row["symbol"], dt.date.fromisoformat(row["trade_date"]))
            assert key not in found
            found[key] = {**row, "loss": loss, "household_id": accounts[row["account_id"]], "wash_group": group[row["symbol"]]}
    return found


def purchases(report: SandboxReport) -> list[dict]:
    """Buys and reinvestments (acquisitions for §1091), with household, wash group and account type."""
    accounts = {r["account_id"]: r for r in read(report, "accounts").iter_rows(named=True)}
    group = dict(read(report, "securities").select("symbol", "wash_group").iter_rows())
    return [
        {**row, "traded": dt.date.fromisoformat(row["trade_date"]), "household_id": accounts[row["account_id"]]["household_id"],
         "account_type": accounts[row["account_id"]]["account_type"], "wash_group": group[row["symbol"]]}
        for row in read(report, "transactions").filter(pl.col("type").is_in(["buy", "reinvest"])).iter_rows(named=True)
    ]


def identical_purchases(sale: dict, bought: list[dict], within: dt.timedelta | None = WINDOW) -> list[dict]:
    sold_on = dt.date.fromisoformat(sale["trade_date"])
    return [
        b for b in bought
        if b["household_id"] == sale["household_id"] and b["wash_group"] == sale["wash_group"]
        and (within is None or abs(b["traded"] - sold_on) <= within)
    ]


def planted_key(w: WashSaleScenario) -> tuple[str, str, dt.date]:
    return (w.account_id, w.symbol, w.sale_date)


def test_past_loss_sales_of_every_kind_are_planted_one_per_household(clean):
    kinds = Counter(w.kind for w in clean.wash_sales)
    # A handful per 200 households, scaling with the book: 300 households -> 1.5x.
    assert kinds == {kind: round(300 * per / 200) for kind, per in WASH_SALES_PER_200.items()}
    assert set(kinds) == set(WASH_SALE_KINDS)
    assert len({w.household_id for w in clean.wash_sales}) == len(clean.wash_sales)
    accounts = {r["account_id"]: r for r in read(clean, "accounts").iter_rows(named=True)}
    for w in clean.wash_sales:
        seller = accounts[w.account_id]
        assert seller["household_id"] == w.household_id and seller["account_type"] == "taxable" and seller["suspended"] == "false"
        assert AS_OF - WINDOW <= w.sale_date < AS_OF and w.sale_date.weekday() < 5
        assert w.loss > 0 and w.quantity > 0
        if w.replacement_account_id is not None:
            assert accounts[w.replacement_account_id]["household_id"] == w.household_id
            assert accounts[w.replacement_account_id]["suspended"] == "false"


def test_each_planted_sale_is_a_loss_sale_in_the_transactions_as_recorded(clean):
    losses = loss_sales(clean)
    for w in clean.wash_sales:
        sale = losses[planted_key(w)]
        assert Decimal(sale["quantity"]) == w.quantity and sale["loss"] == w.loss, w
        # Short-term: the shares were bought near the market peak some eight months back.
        acquired = dt.date.fromisoformat(sale["acquired_date"])
        assert w.sale_date - dt.timedelta(days=300) < acquired < w.sale_date - dt.timedelta(days=150)


@pytest.mark.parametrize("book", ["clean", "defective"])
def test_the_wash_sales_in_the_feed_are_exactly_the_planted_ones(book, request):
    """A reference reading of §1091 over the written files finds the planted wash sales, each
    with exactly its recorded replacement, and no other loss sale with any replacement."""
    report = request.getfixturevalue(book)
    losses, bought = loss_sales(report), purchases(report)
    found = {key: identical_purchases(sale, bought) for key, sale in losses.items()}
    washes = {key for key, matched in found.items() if matched}
    assert washes == {planted_key(w) for w in report.wash_sales if w.wash_sale}
    for w in report.wash_sales:
        if w.wash_sale:
            [replacement] = found[planted_key(w)]
            assert (replacement["account_id"], replacement["symbol"], replacement["traded"]) == (w.replacement_account_id, w.replacement_symbol, w.replacement_date)
            assert replacement["type"] == "buy" and Decimal(replacement["quantity"]) == w.replacement_quantity
            disallowed = w.loss * min(w.replacement_quantity, w.quantity) / w.quantity
            assert w.disallowed_loss == disallowed > 0  # exact: whole shares, whole-cent loss per share
        else:
            assert found[planted_key(w)] == [] and w.disallowed_loss == 0


def replacement_lot(report: SandboxReport, w: WashSaleScenario) -> dict:
    lots = read(report, "lots").filter(
        pl.col("account_id") == w.replacement_account_id, pl.col("symbol") == w.replacement_symbol, pl.col("open_date") == w.replacement_date.isoformat()
    )
    assert lots.height == 1, w
    return lots.row(0, named=True)


def buy_row(report: SandboxReport, w: WashSaleScenario) -> dict:
    [row] = [p for p in purchases(report) if (p["account_id"], p["symbol"], p["traded"]) == (w.replacement_account_id, w.replacement_symbol, w.replacement_date)]
    return row


def test_an_ira_replacement_loses_the_loss_for_good(clean):
    losses = loss_sales(clean)
    scenarios = [w for w in clean.wash_sales if w.kind == "ira_replacement"]
    group = dict(read(clean, "securities").select("symbol", "wash_group").iter_rows())
    account_type = dict(read(clean, "accounts").select("account_id", "account_type").iter_rows())
    assert scenarios
    for w in scenarios:
        assert account_type[w.replacement_account_id] in IRA_TYPES
        assert group[w.replacement_symbol] == group[w.symbol]
        assert dt.timedelta(days=1) <= w.replacement_date - w.sale_date <= WINDOW  # bought after the sale
        lot = replacement_lot(clean, w)
        assert Decimal(lot["quantity"]) == w.replacement_quantity >= w.quantity and lot["wash_sale_adjusted"] is None
        # It covers the sale in shares and in dollars, so all of the loss is disallowed,
        # however an engine matches shares of another symbol of the group.
        proceeds = Decimal(losses[planted_key(w)]["price"]) * w.quantity
        assert Decimal(buy_row(clean, w)["price"]) * w.replacement_quantity >= proceeds
        assert w.disallowed_loss == w.loss
    # Substantially identical is the wash group, not the symbol: one sells IVV and buys VOO.
    assert any(w.replacement_symbol != w.symbol for w in scenarios)


@pytest.mark.parametrize("kind", ["same_account", "custodian_adjusted", "partial_replacement"])
def test_a_same_account_replacement_and_its_lot(clean, kind):
    scenarios = [w for w in clean.wash_sales if w.kind == kind]
    assert scenarios
    for w in scenarios:
        assert (w.replacement_account_id, w.replacement_symbol) == (w.account_id, w.symbol)
        assert dt.timedelta(days=10) <= w.replacement_date - w.sale_date <= dt.timedelta(days=25)
        buy, lot = buy_row(clean, w), replacement_lot(clean, w)
        assert buy["quantity"] == lot["quantity"] and Decimal(lot["quantity"]) == w.replacement_quantity
        paid = Decimal(buy["price"]) * w.replacement_quantity
        if kind == "custodian_adjusted":
            # The custodian already added the disallowed loss: rebal must not add it again.
            assert lot["wash_sale_adjusted"] == "true" and Decimal(lot["cost_basis"]) == paid + w.disallowed_loss
        else:
            assert lot["wash_sale_adjusted"] is None and Decimal(lot["cost_basis"]) == paid
        if kind == "partial_replacement":
            assert w.replacement_quantity < w.quantity and w.disallowed_loss == w.loss * w.replacement_quantity / w.quantity < w.loss
        else:
            assert w.replacement_quantity == w.quantity and w.disallowed_loss == w.loss


def test_a_clean_harvest_and_a_purchase_31_days_before_are_not_wash_sales(clean):
    losses, bought = loss_sales(clean), purchases(clean)
    clean_harvests = [w for w in clean.wash_sales if w.kind == "clean_harvest"]
    outside = [w for w in clean.wash_sales if w.kind == "outside_window"]
    assert clean_harvests and outside
    for w in clean_harvests:
        assert w.replacement_account_id is None and identical_purchases(losses[planted_key(w)], bought) == []
    for w in outside:
        # The household's only purchase of the wash group in the 60 days is 31+ days before the sale.
        [purchase] = identical_purchases(losses[planted_key(w)], bought, within=None)
        assert (purchase["account_id"], purchase["symbol"], purchase["traded"]) == (w.replacement_account_id, w.replacement_symbol, w.replacement_date)
        assert w.sale_date - w.replacement_date >= dt.timedelta(days=31)
        assert replacement_lot(clean, w)["quantity"] == purchase["quantity"]


def test_no_other_sell_is_a_wash_sale_in_any_account(clean):
    """Ordinary trims at a loss never have a substantially identical purchase within 30 days,
    whatever the account type, so an engine that does not filter by type finds nothing more."""
    planted = {planted_key(w) for w in clean.wash_sales}
    bought = purchases(clean)
    others = {key: sale for key, sale in loss_sales(clean).items() if key not in planted}
    assert others  # there are ordinary loss sales ...
    assert all(identical_purchases(sale, bought) == [] for sale in others.values())  # ... and none is a wash


# --- injected defects ----------------------------------------------------------------------


def test_defects_are_reported_one_of_each_kind_in_distinct_ordinary_accounts(defective):
    assert {d.kind: (d.file, d.column) for d in defective.defects} == DOCUMENTED_DEFECTS
    assert len(defective.defects) == len(DOCUMENTED_DEFECTS)
    accounts = read(defective, "accounts").join(read(defective, "households"), on="household_id")
    named = accounts.filter(pl.col("account_id").is_in([d.account_id for d in defective.defects]))
    assert named.height == len(DOCUMENTED_DEFECTS)
    # Holding any of them out touches no other account.
    assert (named["suspended"] == "false").all() and (named["aggregate_rebalancing"] == "false").all()


def test_each_defect_is_in_the_file_and_account_it_names(defective):
    account_of = {d.kind: d.account_id for d in defective.defects}
    positions = read(defective, "positions")
    lots = read(defective, "lots")
    securities = set(read(defective, "securities")["symbol"])

    def rows(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
        return frame.filter(pl.col("account_id") == account_of[kind])

    assert rows(positions, "negative_quantity")["quantity"].str.starts_with("-").sum() == 1
    assert [s for s in rows(positions, "unknown_symbol")["symbol"] if s not in securities] != []
    assert rows(positions, "duplicate_key").select("account_id", "symbol").is_duplicated().sum() == 2
    assert rows(positions, "bad_decimal")["quantity"].str.contains(",").sum() == 1
    assert rows(lots, "bad_date")["open_date"].to_list().count("2024-13-45") == 1
    assert read(defective, "prices").filter(pl.col("symbol") == THIN_STOCK)["close"].to_list() == ["0.00"]
    assert positions.filter(pl.col("symbol") == THIN_STOCK)["account_id"].to_list() == [account_of["non_positive_price"]]

    mismatch = rows(lots, "lots_mismatch").with_columns(quantity=exact("quantity")).group_by("symbol").agg(lots=pl.col("quantity").sum())
    held = rows(positions, "lots_mismatch").with_columns(quantity=exact("quantity")).join(mismatch, on="symbol")
    assert (held["quantity"] != held["lots"]).sum() == 1

    targets = read(defective, "ips_targets").filter(pl.col("scope") == "account", pl.col("scope_id") == account_of["targets_not_summing"])
    assert targets.select(exact("target_weight").sum()).item() == 95 * ONE // 100
    assert rows(read(defective, "restrictions"), "bad_enum")["kind"].to_list().count("no_trade_ever") == 1


def test_defects_leave_every_other_row_as_it_was(clean, defective):
    planted_accounts = {d.account_id for d in defective.defects}
    changed = Counter()
    for feed_file in FEED_FILES.values():
        before, after = Counter(lines(clean, feed_file.filename)), Counter(lines(defective, feed_file.filename))
        removed, added = before - after, after - before
        for line in (removed + added).elements():
            if feed_file.name == "prices":
                assert line.startswith(THIN_STOCK + ","), line
            else:
                assert line.split(",", 1)[0] in planted_accounts or line.split(",")[1] in planted_accounts, line
            changed[feed_file.filename] += 1
        # Still well-formed CSV: every file parses, with the planted rows among the others.
        assert read(defective, feed_file.name).height == len(lines(defective, feed_file.filename)) - 1
    # positions: 2 rows edited (before and after) + 2 added; lots: 2 edited; prices: 1 edited;
    # ips_targets: 3 added; restrictions: 1 added.
    assert changed == {"positions.csv": 6, "lots.csv": 4, "prices.csv": 2, "ips_targets.csv": 3, "restrictions.csv": 1}
    assert defective.positions == clean.positions + 2 and defective.lots == clean.lots


def test_defects_leave_the_planted_wash_sales_whole(clean, defective):
    assert defective.wash_sales == clean.wash_sales
    households = dict(read(defective, "accounts").select("account_id", "household_id").iter_rows())
    planted = {w.household_id for w in defective.wash_sales}
    assert not planted & {households[d.account_id] for d in defective.defects}


def test_defects_need_enough_ordinary_accounts(tmp_path):
    with pytest.raises(ValueError, match="defects=True needs"):
        generate_feed(SandboxConfig(as_of=AS_OF, households=1, defects=True), tmp_path)


# --- the ingest's verdict ---------------------------------------------------------------------


def land(report: SandboxReport, root) -> tuple[pl.DataFrame, set[str]]:
    """Land the feed and run the SQL models behind `rejects` and `data_quality_alerts` (the
    rule checks of int_feed_rule_violations included): the rejected rows and held accounts."""
    models = load_project(settings.sql_dir())
    needed, pending = set(), ["rejects", "data_quality_alerts"]
    while pending:
        name = pending.pop()
        if name in models and name not in needed:
            needed.add(name)
            pending.extend(models[name].refs)
    with duckdb.connect(str(root / "warehouse.duckdb")) as con:
        land_feed(con, report.feed_dir, AS_OF, root / "archive")
        for name, model in models.items():  # dependencies first
            if name in needed:
                materialize_model(con, model, AS_OF)
        rejects = con.execute("select * from rejects where as_of = ?", [AS_OF]).pl()
        held = {row[0] for row in con.execute("select account_id from data_quality_alerts where as_of = ?", [AS_OF]).fetchall()}
    return rejects, held


def test_the_clean_book_lands_with_zero_rejects(clean, tmp_path):
    rejects, held = land(clean, tmp_path)
    assert rejects.height == 0, rejects.head(10)
    assert held == set()


def test_the_defective_book_rejects_only_the_planted_rows(defective, tmp_path):
    rejects, held = land(defective, tmp_path)
    assert held == {d.account_id for d in defective.defects}
    assert set(rejects["file"]) == {d.file for d in defective.defects}
    assert set(rejects["account_id"].drop_nulls()) <= {d.account_id for d in defective.defects}
