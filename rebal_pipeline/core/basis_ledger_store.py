"""rebal's basis ledger in the warehouse: read, compute and write `basis_adjustments` and
`basis_reconciliation` (the Dagster asset is declared in defs/trades/basis.py).

Reads the day's lots and transactions and the previous session's ledger, computes with
core/tax_engine.past_wash_sales, and writes both tables (one as-of partition each; re-running a
day reads the same previous session and replaces the day's rows exactly).

Why the ledger exists: custodians adjust basis for a wash sale only within one account (IRC
§6045(g)); rebal checks across the household (IRC §1091, Rev. Rul. 2008-5) and must remember what
it adjusted after the loss sale has left transactions.csv's look-back, so that a later sale of
the replacement shares — and a second wash of that loss (a chain) — starts from the right basis.
The drift alerts' TLH flag (int_tlh_flags.sql) reads this table for wash-adjusted lot bases.
"""

from datetime import date

import polars as pl

from rebal_pipeline.core.sql_models import replace_partition
from rebal_pipeline.core.tax_engine import PastWashSales, past_wash_sales

INPUTS = ("stg_feed_lots", "stg_feed_transactions", "stg_feed_accounts", "stg_feed_securities")

# Every lot of the book: a replacement lot may be in an account nothing else looks at today.
LOTS = """select account_id, symbol, lot_id, open_date, quantity::double as quantity,
                 cost_basis::double as cost_basis, wash_sale_adjusted
          from stg_feed_lots where as_of = $as_of"""
TRANSACTIONS = """select _line, account_id, symbol, trade_date, transaction_type, quantity::double as quantity,
                         price::double as price, cost_basis::double as cost_basis, acquired_date
                  from stg_feed_transactions where as_of = $as_of"""
ACCOUNTS = """select account_id, household_id, account_type, account_type = 'taxable' as taxable
              from stg_feed_accounts where as_of = $as_of"""
SECURITIES = "select symbol, wash_group from stg_feed_securities where as_of = $as_of"
# The ledger of the session before: the latest partition before the day (sessions only; a
# holiday or a missed day is skipped over, not treated as an empty ledger).
PRIOR_LEDGER = """select * from basis_adjustments
                  where as_of = (select max(as_of) from basis_adjustments where as_of < $as_of)"""


def _table_exists(con, name: str) -> bool:
    return bool(con.execute(
        "select count(*) from information_schema.tables where table_schema = current_schema() and table_name = ?",
        [name]).fetchone()[0])


def prior_ledger(con, as_of: date) -> tuple[pl.DataFrame | None, date | None]:
    """The previous session's basis_adjustments rows and their date (None, None on the first day)."""
    if not _table_exists(con, "basis_adjustments"):
        return None, None
    frame = con.execute(PRIOR_LEDGER, {"as_of": as_of}).pl()
    if frame.height == 0:
        return None, None
    return frame.drop("as_of"), frame["as_of"].max()


def compute_basis_ledger(con, as_of: date) -> PastWashSales:
    params = {"as_of": as_of}
    ledger, prior_as_of = prior_ledger(con, as_of)
    return past_wash_sales(
        con.execute(LOTS, params).pl(), con.execute(TRANSACTIONS, params).pl(), con.execute(ACCOUNTS, params).pl(),
        con.execute(SECURITIES, params).pl(), prior_ledger=ledger, prior_as_of=prior_as_of, as_of=as_of,
        lots_complete=True,
    )


def write_basis_ledger(con, as_of: date) -> PastWashSales:
    """Compute the day's ledger and replace its partitions of basis_adjustments and basis_reconciliation."""
    past = compute_basis_ledger(con, as_of)
    stamp = pl.lit(as_of).alias("as_of")
    replace_partition(con, "basis_adjustments", as_of, past.ledger.with_columns(stamp).to_arrow())
    replace_partition(con, "basis_reconciliation", as_of, past.reconciliation.with_columns(stamp).to_arrow())
    return past


def with_ledger_lots(con, as_of: date, lots: pl.DataFrame, ledger: pl.DataFrame | None) -> pl.DataFrame:
    """`lots` (propose_trades' subset of the book) plus the lots rebal's ledger raises: a raised
    basis can make a lot a harvest candidate although its reported basis does not."""
    if ledger is None or ledger.height == 0:
        return lots
    raised = ledger.filter(pl.col("applied_to_lot")).select("account_id", "lot_id").unique()
    if raised.height == 0:
        return lots
    extra = con.execute(LOTS, {"as_of": as_of}).pl().join(raised, on=["account_id", "lot_id"], how="semi")
    return pl.concat([lots, extra.select(lots.columns)], how="vertical_relaxed").unique(
        ["account_id", "lot_id"], keep="first").sort("account_id", "lot_id")
