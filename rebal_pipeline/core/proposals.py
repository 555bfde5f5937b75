"""Trade proposals: each drift alert becomes whole-share trades back inside its bands.

Domain orchestration for the `propose_trades` asset (declared in defs/trades/assets.py): read
the day's frames from the warehouse, call the pure cores, write the results. No Dagster here.
Account-scope alerts go straight to the sizing core (core/trade_sizing.py); households
rebalanced as one first go through the asset-location optimiser (core/household_location.py),
which decides each member account's class targets, then through the same sizing core.

Until the tax engine has made the trades final, each recommendation is known by its provisional
key (`recommendation_key`: kind|scope|scope_id); `propose_trades` then mints every id once, from
the final trades (core/recommendation_identity.py), and writes only minted ids.
"""

from datetime import date

import polars as pl

from rebal_pipeline.core.basis_ledger_store import prior_ledger, with_ledger_lots
from rebal_pipeline.core.recommendation_identity import KEY, mint_recommendation_ids, provisional_key
from rebal_pipeline.core.sql_models import replace_partition
from rebal_pipeline.core.tax_engine import TaxOutcome, apply_tax_engine, past_wash_sales, sell_tax_cost
from rebal_pipeline.core.tax_lots import TaxPolicy, with_terms
from rebal_pipeline.core.trade_sizing import SizingPolicy, size_trades

INPUTS = (
    "drift_alerts", "drift", "holdings", "int_account_targets", "int_model_versions",
    "stg_feed_accounts", "stg_feed_models", "stg_feed_securities", "stg_feed_prices",
    "stg_feed_restrictions", "stg_feed_lots", "drift_policy", "int_scanned_accounts",
    "int_household_targets", "stg_feed_transactions", "stg_feed_households",
)

# Who is sized: accounts with a live account-scope alert, or the tradeable (not suspended)
# members of households with a live household-scope alert (aggregate rebalancing).
ACCOUNT_SCOPE = "(select scope_id from drift_alerts where as_of = $as_of and scope = 'account' and status = 'alert')"
HOUSEHOLD_MEMBERS = """(select s.account_id from int_scanned_accounts s
    join drift_alerts a on a.scope = 'household' and a.scope_id = s.household_id
                       and a.status = 'alert' and a.as_of = $as_of
    where s.as_of = $as_of and s.aggregate_rebalancing and not s.suspended)"""

QUERIES = {
    "holdings": """select account_id, symbol, asset_class, quantity::double as quantity, price::double as price,
                          market_value from holdings where as_of = $as_of and account_id in {who}""",
    "class_targets": """select account_id, asset_class, target_weight from int_account_targets
                         where as_of = $as_of and account_id in {who}""",
    "model_weights": """select a.account_id, m.symbol, m.weight::double as weight
                         from stg_feed_accounts a join stg_feed_models m on m.model_id = a.model_id and m.as_of = $as_of
                         where a.as_of = $as_of and a.account_id in {who}""",
    "restrictions": """select account_id, kind, value from stg_feed_restrictions
                        where as_of = $as_of and account_id in {who}""",
    "bands": """select scope_id as account_id, asset_class, band from drift
                 where as_of = $as_of and scope = 'account' and scope_id in {who}""",
    # The version of what the proposal was built from: the account's model (a hash of its
    # weights) or, for IPS-only accounts, its IPS targets.
    "versions": """select a.account_id,
                           coalesce('model:' || a.model_id || '@' || v.model_version, 'ips') as model_version
                    from stg_feed_accounts a
                    left join int_model_versions v on v.model_id = a.model_id and v.as_of = $as_of
                    where a.as_of = $as_of and a.account_id in {who}""",
}

# The security master with the day's closes: the same for every account, read once a day.
SECURITIES = """select s.symbol, s.asset_class, s.security_type, s.fractional, p.close::double as price,
                       s.wash_group, s.tlh_substitute
                from stg_feed_securities s join stg_feed_prices p on p.symbol = s.symbol and p.as_of = $as_of
                where s.as_of = $as_of"""

# What the household optimiser needs, for the members of alerted aggregated households.
HOUSEHOLD_QUERIES = {
    "members": """select household_id, account_id, account_type, market_value::double as market_value
                  from int_scanned_accounts where as_of = $as_of and account_id in {who}""",
    "current": """select account_id, asset_class, sum(market_value)::double as market_value
                  from holdings where as_of = $as_of and account_id in {who} group by all""",
    # Unrealised gain as a share of market value, per account and class (taxable accounts only:
    # selling there realises the gain; inside IRAs and 401(k)s it does not).
    "gains": """select h.account_id, h.asset_class,
                       (sum(h.market_value) - sum(l.cost_basis::double)) / nullif(sum(h.market_value), 0)
                           as unrealised_gain_ratio
                from holdings h
                join (select account_id, symbol, sum(cost_basis) as cost_basis from stg_feed_lots
                      where as_of = $as_of group by all) l using (account_id, symbol)
                where h.as_of = $as_of and h.account_type = 'taxable' and h.account_id in {who}
                group by all""",
    "targets": """select household_id, asset_class, target_weight from int_household_targets
                  where as_of = $as_of and household_id in (select household_id from int_scanned_accounts
                                                             where as_of = $as_of and account_id in {who})""",
    "barred": """select account_id, value as asset_class from stg_feed_restrictions
                 where as_of = $as_of and kind = 'no_asset_class' and account_id in {who}""",
    # Bands and drift of the household, applied to each member's own class targets.
    "bands": """select s.account_id, d.asset_class, d.band from drift d
                join int_scanned_accounts s on s.household_id = d.scope_id and s.as_of = $as_of
                where d.as_of = $as_of and d.scope = 'household' and s.account_id in {who}""",
    "household_drift": """select scope_id as household_id, asset_class, drift, target_weight, band from drift
                          where as_of = $as_of and scope = 'household'""",
}


def _household_post_trade_check(members: pl.DataFrame, current: pl.DataFrame, trades: pl.DataFrame,
                                household_drift: pl.DataFrame) -> pl.DataFrame:
    """Is each household inside its bands after the trades? The band applies to the
    household's mix (aggregate rebalancing), not to each account: rounding in one account may
    be offset in another. Returns household_id, inside_bands, household_unresolved."""
    signed = trades.select(
        "account_id", "asset_class",
        pl.when(pl.col("side") == "buy").then(pl.col("est_value")).otherwise(-pl.col("est_value")).alias("change"),
    )
    # Cash pays for buys and receives sale proceeds.
    cash = signed.group_by("account_id").agg((-pl.col("change").sum()).alias("change")).with_columns(
        pl.lit("cash").alias("asset_class")
    )
    after = (
        pl.concat([
            current.rename({"market_value": "change"}),
            signed,
            cash.select("account_id", "asset_class", "change"),
        ])
        .join(members.select("account_id", "household_id"), on="account_id")
        .group_by("household_id", "asset_class")
        .agg(pl.col("change").sum().alias("value"))
        .with_columns((pl.col("value") / pl.col("value").sum().over("household_id")).alias("weight_after"))
    )
    checked = (
        household_drift.join(after, on=["household_id", "asset_class"], how="full", coalesce=True)
        .filter(pl.col("household_id").is_in(members["household_id"].implode()))
        .with_columns(
            pl.col("weight_after").fill_null(0.0),
            pl.col("target_weight").fill_null(0.0),
            pl.col("band").fill_null(pl.col("band").min().over("household_id")),
        )
        .with_columns(((pl.col("weight_after") - pl.col("target_weight")).abs() - pl.col("band") > 1e-9).alias("outside"))
    )
    return (
        checked.sort("household_id", "asset_class")
        .group_by("household_id", maintain_order=True)
        .agg(
            (~pl.col("outside").any()).alias("inside_bands"),
            pl.format(
                "household {} at {}% vs target {}% ±{}%",
                pl.col("asset_class"),
                (pl.col("weight_after") * 100).round(1),
                (pl.col("target_weight") * 100).round(1),
                (pl.col("band") * 100).round(1),
            ).filter(pl.col("outside")).str.join("; ").alias("household_unresolved"),
        )
    )


def _read(con, queries: dict[str, str], who: str, as_of: date) -> dict[str, pl.DataFrame]:
    return {name: con.execute(sql.format(who=who), {"as_of": as_of}).pl() for name, sql in queries.items()}


def _sizing_policy(policy) -> SizingPolicy:
    rule = policy.trade_sizing
    return SizingPolicy(
        min_trade_value=float(rule.min_trade_value),
        min_trade_pct=float(rule.min_trade_pct),
        default_cash_buffer=float(rule.default_cash_buffer),
        fractional_decimals=rule.fractional_decimals,
    )


# The member accounts of a recommendation, with the model version its id records for each.
_MEMBERS_SCHEMA = {KEY: pl.String, "account_id": pl.String, "model_version": pl.String}


def _account_proposals(con, as_of: date, policy, securities: pl.DataFrame,
                       tax_cost: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    frames = _read(con, QUERIES, ACCOUNT_SCOPE, as_of)
    sized = size_trades(
        frames["holdings"], frames["class_targets"], frames["model_weights"], securities,
        frames["restrictions"], frames["bands"], _sizing_policy(policy), sell_tax_cost=tax_cost,
    )
    accounts = sized.accounts.join(frames["versions"], on="account_id", how="left").with_columns(
        pl.col("model_version").fill_null("ips"),
        pl.lit("account").alias("scope"),
        pl.col("account_id").alias("scope_id"),
    ).select("account_id", provisional_key("rebalance", "account", pl.col("account_id")).alias(KEY),
             pl.all().exclude("account_id"))
    trades = sized.trades.join(accounts.select("account_id", KEY, "model_version"), on="account_id", how="left")
    return trades, accounts


def _household_proposals(con, as_of: date, policy, securities: pl.DataFrame,
                         tax_cost: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Aggregated households: the optimiser places each class across the member accounts
    (asset location, no gains realised in taxable where avoidable), then the sizing core turns
    each member's class targets into whole-share trades. One recommendation per household.
    Returns its trades, the recommendations and their members (recommendation_key, account_id,
    model_version: what the id records of each member account)."""
    from rebal_pipeline.core.household_location import LocationPolicy, hold_taxable_classes, locate_households

    # Class targets come from the optimiser and bands from the household, so the accounts'
    # own targets and bands are not read.
    wanted = ("holdings", "model_weights", "restrictions", "versions")
    frames = _read(con, {name: QUERIES[name] for name in wanted}, HOUSEHOLD_MEMBERS, as_of)
    lp = _read(con, HOUSEHOLD_QUERIES, HOUSEHOLD_MEMBERS, as_of)
    if lp["members"].height == 0:
        return pl.DataFrame(), pl.DataFrame(), pl.DataFrame(schema=_MEMBERS_SCHEMA)
    # Turnover at 0.1% of each dollar traded (spread and costs): low enough that moving bonds
    # from taxable into an IRA (four trades per dollar, saving ~3 cents a year in location
    # penalty) is worth doing; at 1% the optimiser would only fix the household's mix.
    located = locate_households(
        lp["members"], lp["current"], lp["gains"], lp["targets"], lp["barred"],
        LocationPolicy(turnover_penalty=0.001,
                       max_turnover_fraction=float(policy.household_location.max_turnover_fraction)),
    )
    # Issue 14: a taxable account keeps the securities of a class the optimiser leaves alone (no
    # gain realised to swap one security of a class for another); see hold_taxable_classes.
    sized = size_trades(
        frames["holdings"], located.select("account_id", "asset_class", "target_weight"),
        hold_taxable_classes(located, frames["holdings"], frames["model_weights"], lp["members"], securities),
        securities, frames["restrictions"], lp["bands"],
        _sizing_policy(policy), sell_tax_cost=tax_cost,
    )
    members = (
        sized.accounts.join(lp["members"].select("account_id", "household_id"), on="account_id")
        .join(frames["versions"], on="account_id", how="left")
        .with_columns(pl.col("model_version").fill_null("ips"),
                      provisional_key("rebalance", "household", pl.col("household_id")).alias(KEY))
    )
    optimiser = located.group_by("account_id").agg(pl.col("status").first())
    members = members.join(optimiser, on="account_id", how="left")
    households = (
        members.sort("account_id")
        .group_by("household_id", maintain_order=True)
        .agg(
            pl.col(KEY).first(),
            pl.col("market_value").sum(),
            pl.col("cash_before").sum(),
            pl.col("cash_after").sum(),
            pl.col("trade_count").sum(),
            pl.col("dust_dropped").sum(),
            pl.concat_str([pl.col("account_id"), pl.col("unresolved")], separator=": ")
            .drop_nulls().str.join(" || ").alias("unresolved"),
            pl.concat_str([pl.col("account_id"), pl.col("compliance_review")], separator=": ")
            .drop_nulls().str.join(" || ").alias("compliance_review"),
            pl.col("model_version").unique().sort().str.join(",").alias("model_version"),
            pl.col("status").filter(pl.col("status") != "optimal").first().alias("optimiser_status"),
        )
        .with_columns(
            pl.when(pl.col("unresolved") == "").then(None).otherwise(pl.col("unresolved")).alias("unresolved"),
            pl.when(pl.col("compliance_review") == "").then(None).otherwise(pl.col("compliance_review"))
            .alias("compliance_review"),
            pl.lit("household").alias("scope"),
            pl.col("household_id").alias("scope_id"),
        )
        .join(_household_post_trade_check(lp["members"], lp["current"], sized.trades, lp["household_drift"]),
              on="household_id", how="left")
        .with_columns(
            pl.col("inside_bands").fill_null(False),
            # Account details matter only when the household itself is still outside a band.
            pl.when(pl.col("inside_bands").fill_null(False)).then(None)
            .otherwise(pl.concat_str([pl.col("household_unresolved"), pl.col("unresolved")], separator=" — accounts: ",
                                     ignore_nulls=True))
            .alias("unresolved"),
        )
        .with_columns(
            # The optimiser's reason (turnover cap, infeasible targets) leads, whether or not the
            # household ended inside its bands: the advisor sees why it stopped where it did.
            pl.when(pl.col("optimiser_status").is_null()).then(pl.col("unresolved"))
            .otherwise(pl.concat_str([pl.col("optimiser_status"), pl.col("unresolved")], separator=" — ",
                                     ignore_nulls=True))
            .alias("unresolved"),
        )
        .drop("household_unresolved")
    )
    # "location": the trade moves a class between the household's accounts rather than
    # changing the household's mix (buying a class the household is not short of, or selling
    # one it is not over in).
    trades = (
        sized.trades
        .join(lp["members"].select("account_id", "household_id"), on="account_id")
        .join(households.select("household_id", KEY, "model_version"), on="household_id")
        .join(lp["household_drift"].select("household_id", "asset_class", "drift"),
              on=["household_id", "asset_class"], how="left")
        .with_columns(
            pl.when(
                (pl.col("reason") == "rebalance")
                & (((pl.col("side") == "buy") & (pl.col("drift").fill_null(0) >= 0))
                   | ((pl.col("side") == "sell") & (pl.col("drift").fill_null(0) <= 0)))
            )
            .then(pl.lit("location"))
            .otherwise(pl.col("reason"))
            .alias("reason")
        )
        .drop("drift", "household_id")
    )
    return (trades, households.drop("household_id").with_columns(pl.lit(None, pl.String).alias("account_id")),
            members.select(list(_MEMBERS_SCHEMA)))


def _members(recommendations: pl.DataFrame, household_members: pl.DataFrame) -> pl.DataFrame:
    """Every recommendation's member accounts: an account-scope one (a rebalance, with its model
    version, or a harvest, which records none) its own account, a household its sized members."""
    own = recommendations.filter(pl.col("scope") == "account").select(
        KEY, pl.col("scope_id").alias("account_id"), "model_version")
    return pl.concat([own.cast(_MEMBERS_SCHEMA), household_members.cast(_MEMBERS_SCHEMA)])


# Everything the tax engine needs about an account: household, rates, lot-relief method, and
# whether it may get a harvest today (scanned, i.e. not held out for data quality, and not
# suspended). Every account of the feed is listed: a household's IRA matters to the wash-sale
# check even when the IRA itself has nothing to trade.
TAX_ACCOUNTS = """select a.account_id, a.household_id, a.account_type, a.account_type = 'taxable' as taxable,
                         coalesce(a.lot_relief_method, $default_method) as lot_relief_method,
                         h.federal_ordinary_rate::double as federal_ordinary_rate,
                         h.federal_ltcg_rate::double as federal_ltcg_rate, h.state_rate::double as state_rate,
                         coalesce(s.account_id is not null and not s.suspended, false) as harvest_eligible
                  from stg_feed_accounts a
                  join stg_feed_households h on h.household_id = a.household_id and h.as_of = $as_of
                  left join int_scanned_accounts s on s.account_id = a.account_id and s.as_of = $as_of
                  where a.as_of = $as_of"""

# The lots the day needs, not the whole book's: those of accounts being sized, taxable lots
# near the harvest threshold, and lots a past purchase opened (a wash sale may raise their
# basis). A wash-sale adjustment only ever raises a basis, so no other lot can become a harvest.
LOTS = """select l.account_id, l.symbol, l.lot_id, l.open_date, l.quantity::double as quantity,
                 l.cost_basis::double as cost_basis, l.wash_sale_adjusted
          from stg_feed_lots l
          join stg_feed_accounts a on a.account_id = l.account_id and a.as_of = $as_of
          join stg_feed_prices p on p.symbol = l.symbol and p.as_of = $as_of
          where l.as_of = $as_of and (
              l.account_id in {who}
              or (a.account_type = 'taxable' and l.cost_basis > 0
                  and l.cost_basis::double - l.quantity::double * p.close::double
                      >= $harvest_threshold * l.cost_basis::double - 0.01)
              or exists (select 1 from stg_feed_transactions t
                         where t.as_of = $as_of and t.transaction_type in ('buy', 'reinvest')
                           and t.account_id = l.account_id and t.symbol = l.symbol and t.trade_date = l.open_date))"""

TRANSACTIONS = """select _line, account_id, symbol, trade_date, transaction_type, quantity::double as quantity,
                         price::double as price, cost_basis::double as cost_basis, acquired_date
                  from stg_feed_transactions where as_of = $as_of"""

# How far each alerted scope is outside its band (the "severe drift" test of wait-for-long-term).
SEVERITY = """select scope, scope_id, max(abs(drift) / band) as drift_to_band
              from drift where as_of = $as_of and band > 0 group by all"""

OUTPUT_TABLES = ("trade_proposals", "trade_recommendations", "tax_lots", "tax_impact", "recommendation_summary",
                 "tlh_candidates", "wash_sales")


def _tax_policy(policy) -> TaxPolicy:
    tax = policy.tax
    return TaxPolicy(
        default_lot_relief_method=tax.default_lot_relief_method,
        tlh_loss_threshold=float(policy.tlh_loss_threshold),
        tlh_min_loss=float(tax.tlh_min_loss),
        wait_window_days=tax.wait_for_long_term.window_days,
        severe_drift_multiple=float(tax.wait_for_long_term.severe_drift_multiple),
        wait_min_tax_saved=float(tax.wait_for_long_term.min_tax_saved),
        fractional_decimals=policy.trade_sizing.fractional_decimals,
    )


def propose_trades(con, as_of: date, policy, overrides: pl.DataFrame | None = None,
                   timings: dict | None = None) -> TaxOutcome:
    """Size the day's alerts (accounts, and aggregated households through the optimiser), run the
    tax engine over the proposals (lot relief, wash sales, harvests, wait-for-long-term) and
    write OUTPUT_TABLES. `overrides` (account_id, symbol, reason): buys the advisor keeps even
    though they wash a loss. `timings`, if given, receives the seconds of each part (benchmark)."""
    clock = _Clock(timings)
    tax_policy = _tax_policy(policy)
    params = {"as_of": as_of}
    securities = con.execute(SECURITIES, params).pl()
    accounts = con.execute(TAX_ACCOUNTS, {**params, "default_method": tax_policy.default_lot_relief_method}).pl()
    sized = f"({ACCOUNT_SCOPE[1:-1]} union {HOUSEHOLD_MEMBERS[1:-1]})"
    lots = con.execute(LOTS.format(who=sized), {**params, "harvest_threshold": tax_policy.tlh_loss_threshold}).pl()
    transactions = con.execute(TRANSACTIONS, params).pl()
    # rebal's basis ledger of the session before (core/basis_ledger_store.py): wash chains across days.
    ledger, ledger_as_of = prior_ledger(con, as_of)
    past = past_wash_sales(with_ledger_lots(con, as_of, lots, ledger), transactions, accounts, securities,
                           ledger, ledger_as_of, as_of)
    tax_cost = sell_tax_cost(
        past.lots, securities.select("symbol", "price"),
        accounts.select("account_id", "federal_ordinary_rate", "federal_ltcg_rate", "state_rate"), as_of,
    )
    clock.lap("tax")
    account_trades, account_recs = _account_proposals(con, as_of, policy, securities, tax_cost)
    household_trades, household_recs, household_members = _household_proposals(con, as_of, policy, securities,
                                                                               tax_cost)
    trades = pl.concat([account_trades, household_trades], how="diagonal_relaxed")
    recs = pl.concat([account_recs, household_recs], how="diagonal_relaxed")
    severity = recs.select(KEY, "scope", "scope_id").join(
        con.execute(SEVERITY, params).pl(), on=["scope", "scope_id"], how="left"
    ).select(KEY, "drift_to_band")
    if overrides is None:
        overrides = pl.DataFrame(schema={"account_id": pl.String, "symbol": pl.String, "reason": pl.String})
    clock.lap("sizing")
    keyed = apply_tax_engine(
        trades, recs, past, accounts, securities, con.execute(QUERIES["restrictions"].format(
            who="(select account_id from stg_feed_accounts where as_of = $as_of)"), params).pl(),
        severity, overrides, as_of, tax_policy, float(policy.trade_sizing.min_trade_value),
    )
    clock.lap("tax")
    # The trades are final: each recommendation's id is minted, once, and replaces its key everywhere.
    outcome = keyed.identified(mint_recommendation_ids(
        keyed.recommendations, _members(keyed.recommendations, household_members), keyed.trades,
        as_of, policy.version_id,
    ))
    stamp = [pl.lit(as_of).alias("as_of")]
    tables = {
        "trade_proposals": outcome.trades.with_columns(*stamp),
        "trade_recommendations": outcome.recommendations.with_columns(
            *stamp, pl.lit(policy.version_id).alias("policy_version")),
        "tax_lots": with_terms(past.lots, as_of).with_columns(*stamp),
        "tax_impact": outcome.tax_impact,
        "recommendation_summary": outcome.summary,
        "tlh_candidates": outcome.tlh_candidates,
        "wash_sales": outcome.wash_sales if outcome.wash_sales.height else pl.DataFrame(
            {"as_of": [as_of], "sale_id": [None]}, schema={"as_of": pl.Date, "sale_id": pl.String}).clear(),
    }
    for name, frame in tables.items():
        replace_partition(con, name, as_of, frame.to_arrow())
    clock.lap("write")
    return outcome


class _Clock:
    """Adds the seconds since the last lap to timings[part] (no-op without a dict)."""

    def __init__(self, timings: dict | None):
        import time

        self._now, self.timings = time.perf_counter, timings
        self._last = self._now()

    def lap(self, part: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[part] = self.timings.get(part, 0.0) + now - self._last
            self._last = now
