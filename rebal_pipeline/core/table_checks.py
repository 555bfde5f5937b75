"""The warehouse's data checks, as plain functions over a DuckDB connection.

Two kinds (Dagster turns them into asset checks in defs/warehouse/checks.py):
- *blocking* table checks (pandera.polars schemas) run on the partition a model just wrote: when
  one fails, nothing downstream of that table runs for the day, because drift or alerts
  computed on top of it would be wrong;
- *visible* checks (WARN) that tell operations about accounts held out or positions that do not
  reconcile, while the rest of the book still gets its scan.
Account numbers in what a check reports are masked to their last four characters (core/pii.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import duckdb
import pandera.polars as pa
import polars as pl

from rebal_pipeline.core.pii import mask_account, masker

WEIGHT_TOLERANCE = 1e-6

class HoldingsSchema(pa.DataFrameModel):
    """Every position priced, no negative market value, lots reconcile to positions."""

    account_id: str = pa.Field(nullable=False)
    symbol: str = pa.Field(nullable=False)
    quantity: float = pa.Field(ge=0)
    price: float = pa.Field(nullable=False, gt=0)  # every position priced
    market_value: float = pa.Field(ge=0)  # no negative market values

    @pa.dataframe_check
    def lots_reconcile_to_positions(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("lot_quantity") == pl.col("quantity"))


class DriftWeightsSchema(pa.DataFrameModel):
    """Current and target weights each sum to 1 within every scope."""

    scope: str = pa.Field(isin=["account", "household"])
    scope_id: str
    current_weight: float = pa.Field(ge=0, le=1 + WEIGHT_TOLERANCE)
    target_weight: float = pa.Field(ge=0, le=1 + WEIGHT_TOLERANCE)

    @pa.dataframe_check
    def current_weights_sum_to_one(cls, data) -> pl.LazyFrame:
        total = pl.col("current_weight").sum().over("scope", "scope_id")
        return data.lazyframe.select((total - 1).abs() <= WEIGHT_TOLERANCE)

    @pa.dataframe_check
    def target_weights_sum_to_one(cls, data) -> pl.LazyFrame:
        total = pl.col("target_weight").sum().over("scope", "scope_id")
        return data.lazyframe.select((total - 1).abs() <= WEIGHT_TOLERANCE)


@dataclass(frozen=True)
class CheckOutcome:
    """What a check found. `severity` is "error" (blocking) or "warn"; `metadata` holds plain
    values, with `json` / `text` / `md` naming how the Dagster UI shows the others."""

    name: str
    passed: bool
    severity: str = "error"
    metadata: dict = field(default_factory=dict)
    json: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    md: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TableCheck:
    name: str
    description: str
    schema: type[pa.DataFrameModel]
    columns: tuple[str, ...]
    blocking: bool = True

    def run(self, con: duckdb.DuckDBPyConnection, table: str, as_of: date) -> CheckOutcome:
        cols = ", ".join(f'"{c}"' for c in self.columns)
        frame = con.execute(f'select {cols} from "{table}" where as_of = ?', [as_of]).pl()
        # Decimals are checked as floats: the checks compare signs, presence and sums.
        frame = frame.with_columns(
            [pl.col(c).cast(pl.Float64) for c, t in frame.schema.items() if isinstance(t, pl.Decimal)]
        )
        return validate(self.name, self.schema, frame)


def validate(check_name: str, schema: type[pa.DataFrameModel], frame: pl.DataFrame) -> CheckOutcome:
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        failures = exc.failure_cases
        return CheckOutcome(
            check_name, passed=False, severity="error",
            metadata={"rows_checked": frame.height, "failures": failures.height},
            json={"failed_checks": sorted(set(failures["check"].to_list()))},
            text={"examples": masker(frame["account_id"] if "account_id" in frame.columns else ())(
                str(failures.head(10)))},  # account numbers: last four only (core/pii.py)
        )
    return CheckOutcome(check_name, passed=True, metadata={"rows_checked": frame.height})


@dataclass(frozen=True)
class NoAccountsHeldOut:
    """Visible, not blocking: accounts held out for data quality must be seen by operations,
    but the rest of the book still gets its scan."""

    name: str = "no_accounts_held_out_for_data_quality"
    description: str = "Fails (WARN) when any account is held out because of rejected feed rows."
    blocking: bool = False

    def run(self, con: duckdb.DuckDBPyConnection, table: str, as_of: date) -> CheckOutcome:
        held, rejects = con.execute(
            f'select count(*), coalesce(sum(problem_count), 0) from "{table}" where as_of = ?', [as_of]
        ).fetchone()
        examples = con.execute(
            f'select account_id, reasons from "{table}" where as_of = ? order by account_id limit 5', [as_of]
        ).fetchall()
        return CheckOutcome(
            self.name, passed=held == 0, severity="warn",
            metadata={"accounts_held_out": held, "rejected_rows": int(rejects)},
            md={"examples": "\n".join(f"- {mask_account(a)}: {masker([a])(r)}" for a, r in examples) or "none"},
        )


@dataclass(frozen=True)
class PositionsReconcile:
    """Visible, not blocking: a position that changed since the previous day without the
    transactions to explain it (a missed transfer, a corporate action, a feed error) is a
    data-quality alert for operations; today's positions are still the custodian's record, so the
    account keeps its scan (its lots and wash-sale history may be incomplete: look before approving)."""

    name: str = "positions_reconcile_with_previous_day"
    description: str = ("Fails (WARN) when a position changed since the previous as-of date by more than its "
                        "transactions explain.")
    blocking: bool = False

    def run(self, con: duckdb.DuckDBPyConnection, table: str, as_of: date) -> CheckOutcome:
        breaks, accounts = con.execute(
            f'select count(*), count(distinct account_id) from "{table}" where as_of = ?', [as_of]).fetchone()
        examples = con.execute(
            f'select account_id, reason from "{table}" where as_of = ? order by account_id, symbol limit 5', [as_of]).fetchall()
        return CheckOutcome(
            self.name, passed=breaks == 0, severity="warn",
            metadata={"unexplained_changes": breaks, "accounts": accounts},
            md={"examples": "\n".join(f"- {masker([a])(r)}" for a, r in examples) or "none"},
        )


# Which checks run on which table.
TABLE_CHECKS: dict[str, list[TableCheck | NoAccountsHeldOut | PositionsReconcile]] = {
    "data_quality_alerts": [NoAccountsHeldOut()],
    "reconciliation_alerts": [PositionsReconcile()],
    "holdings": [
        TableCheck(
            "holdings_priced_nonnegative_and_reconciled",
            "Every position priced (> 0), no negative market value, lots sum to each position.",
            HoldingsSchema,
            ("account_id", "symbol", "quantity", "price", "market_value", "lot_quantity"),
        )
    ],
    "drift": [
        TableCheck(
            "weights_sum_to_one_per_scope",
            "Current and target weights each sum to 1 in every account and household scope.",
            DriftWeightsSchema,
            ("scope", "scope_id", "current_weight", "target_weight"),
        )
    ],
}
