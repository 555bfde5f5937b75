"""Hand-made canonical feeds for tests: small books whose drift can be worked out by hand.

FeedBuilder starts with a valid feed (users, one advisor, a few securities and a 60/40 model)
and lets a test add households, accounts and positions; `write()` produces the CSV folder.
Positions get one lot each unless the test gives lots explicitly.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
from dagster import DagsterInstance, materialize

from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.defs.feed.assets import assets as feed_assets
from rebal_pipeline.defs.trades.assets import assets as trade_assets
from rebal_pipeline.defs.warehouse.assets import build_sql_assets, drift_policy, feed_data_quality_alert
from rebal_pipeline.defs.workflow.assets import assets as workflow_assets
from rebal_pipeline.resources import (
    AdvisorOverrides, ApprovalClockResource, DriftPolicySource, FeedLocation, Warehouse, WorkflowStoreResource,
)

AS_OF = date(2026, 11, 20)  # a Friday, an NYSE session


@dataclass
class FeedBuilder:
    as_of: date = AS_OF
    rows: dict[str, list[dict]] = field(default_factory=lambda: {n: [] for n in FEED_FILES})

    def __post_init__(self):
        self.add("users", user_id="ADV-1", name="Dana Advisor", email="dana@example-ria.com", role="advisor")
        self.add("users", user_id="ADV-2", name="Sam Advisor", email="sam@example-ria.com", role="advisor")
        self.add("users", user_id="CCO-1", name="Chris Compliance", email="cco@example-ria.com", role="compliance")
        for symbol, asset_class, security_type, price, wash_group, fractional in (
            ("VTI", "equity", "etf", "100", "us_total", "false"),
            ("BND", "fixed_income", "etf", "50", "us_agg", "false"),
            ("VNQ", "alternatives", "etf", "80", "reit", "false"),
            ("VBTLX", "fixed_income", "mutual_fund", "10", "us_agg", "true"),
            ("CASH", "cash", "cash", "1", "cash", "false"),
        ):
            self.add("securities", symbol=symbol, cusip="", description=f"{symbol} test security",
                     asset_class=asset_class, security_type=security_type, wash_group=wash_group,
                     tlh_substitute="", fractional=fractional)
            self.add("prices", symbol=symbol, close=price)
        self.model("M6040", VTI="0.6", BND="0.4")

    def model(self, model_id: str, **weights: str) -> None:
        """Define (or redefine) a model portfolio: its security weights replace any before."""
        self.rows["models"] = [r for r in self.rows["models"] if r["model_id"] != model_id]
        for symbol, weight in weights.items():
            self.add("models", model_id=model_id, symbol=symbol, weight=weight)

    def add(self, file: str, **values) -> dict:
        self.rows[file].append(values)
        return values

    def household(self, household_id="HH-1", advisor_id="ADV-1", aggregate=False,
                  ordinary="0.32", ltcg="0.15", state="0.05", name=None):
        return self.add("households", household_id=household_id, name=name or f"{household_id} family",
                        advisor_id=advisor_id, aggregate_rebalancing=str(aggregate).lower(),
                        federal_ordinary_rate=ordinary, federal_ltcg_rate=ltcg, state_rate=state)

    def account(self, account_id, household_id="HH-1", model_id="M6040", account_type="taxable",
                discretionary=False, tax_sensitive=False, suspended=False, suspended_reason="",
                advisor_id=""):
        return self.add("accounts", account_id=account_id, household_id=household_id,
                        client_name=f"Client {account_id}", client_email=f"{account_id.lower()}@example.com",
                        custodian="schwab", account_type=account_type,
                        discretionary=str(discretionary).lower(), tax_sensitive=str(tax_sensitive).lower(),
                        suspended=str(suspended).lower(), suspended_reason=suspended_reason,
                        model_id=model_id, advisor_id=advisor_id)

    def position(self, account_id, symbol, quantity, cost_basis=None, open_date=None, lots=True):
        self.add("positions", account_id=account_id, symbol=symbol, quantity=str(quantity))
        if lots and symbol != "CASH":
            self.add("lots", account_id=account_id, symbol=symbol,
                     lot_id=f"{account_id}-{symbol}-1",
                     open_date=(open_date or self.as_of - timedelta(days=800)).isoformat(),
                     quantity=str(quantity),
                     cost_basis=str(cost_basis if cost_basis is not None else Decimal(str(quantity)) * 90))

    def line_of(self, file: str, row: dict) -> int:
        """The line a row will be written on (the header is line 1)."""
        return next(i for i, r in enumerate(self.rows[file]) if r is row) + 2

    def price(self, symbol: str) -> str:
        return next(r["close"] for r in self.rows["prices"] if r["symbol"] == symbol)

    def write(self, feed_root: Path) -> Path:
        folder = feed_root / self.as_of.isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        for name, spec in FEED_FILES.items():
            with (folder / spec.filename).open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=spec.column_names, lineterminator="\n")
                writer.writeheader()
                for row in self.rows[name]:
                    writer.writerow({c: row.get(c, "") for c in spec.column_names})
        return folder


@dataclass
class Workspace:
    """A throw-away REBAL_HOME: feed folder, archive and warehouse under one tmp dir."""

    root: Path
    last_result: object = None

    @property
    def feed_root(self) -> Path:
        return self.root / "feeds"

    @property
    def warehouse_path(self) -> Path:
        return self.root / "warehouse.duckdb"

    def resources(self, policy_file: Path | None = None) -> dict:
        return {
            "warehouse": Warehouse(database=str(self.warehouse_path)),
            "feed": FeedLocation(feed_root=str(self.feed_root), archive_root=str(self.root / "archive")),
            "drift_policy_source": DriftPolicySource(policy_file=str(policy_file or "")),
            "advisor_overrides": AdvisorOverrides(wash_sale_file=str(self.overrides_path)),
            "workflow_store": WorkflowStoreResource(url=self.workflow_url),
            "approval_clock": ApprovalClockResource(),
        }

    @property
    def workflow_url(self) -> str:
        return f"sqlite:///{self.root / 'workflow.sqlite'}"

    @property
    def overrides_path(self) -> Path:
        return self.root / "overrides" / "wash_sale_overrides.csv"

    def run_day(self, as_of: date = AS_OF, instance: DagsterInstance | None = None,
                policy_file: Path | None = None, raise_on_error: bool = True):
        return materialize(
            [*feed_assets, drift_policy, *build_sql_assets(), feed_data_quality_alert, *trade_assets, *workflow_assets],
            partition_key=as_of.isoformat(),
            resources=self.resources(policy_file),
            instance=instance,
            raise_on_error=raise_on_error,
        )

    def table(self, name: str, as_of: date = AS_OF, order_by: str | None = None) -> pl.DataFrame:
        with duckdb.connect(str(self.warehouse_path), read_only=True) as con:
            sql = f'select * from "{name}" where as_of = ?'
            if order_by:
                sql += f" order by {order_by}"
            return con.execute(sql, [as_of]).pl()
