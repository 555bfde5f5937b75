"""The canonical feed: one folder per as-of date of UTF-8 CSV files (see docs/feed_contract.md).

This module is the single, declarative statement of that public interface. The ingest
(`rebal_pipeline.core.landing`), the SQL staging models and the sandbox generator all read
it, so a column added here is added everywhere. Changes must stay additive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnKind = Literal["id", "text", "decimal", "date", "bool", "enum"]

# Decimal text: optional minus, at most 10 integer digits, optional fraction of at most 8
# places (so every value fits DECIMAL(18,8) exactly), no thousands
# separators, no exponent. Anything else is quarantined rather than guessed at.
DECIMAL_PATTERN = r"^-?[0-9]{1,10}(\.[0-9]{1,8})?$"
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
BOOL_VALUES = ("true", "false")


@dataclass(frozen=True)
class PlausibilityLimits:
    """Values the decimal format admits but no real feed has (docs/feed_contract.md, "Plausibility
    limits"). A row beyond them is a data-quality reject like any other: its account is held out
    of the day with the reason, and the rest of the book is scanned, sized and published. They
    keep every downstream step inside what its arithmetic can represent (trade quantities are
    sized as integer hundred-millionths of a share, at most 9.2e10 shares)."""

    max_quantity: int = 1_000_000_000  # shares (units) in one position, lot or transaction
    min_price: str = "0.01"  # dollars: a close under one cent (not CASH) is not a price rebal trades at
    max_price: int = 1_000_000  # dollars per share (the dearest listed share is under $1M)
    max_account_value: int = 500_000_000  # dollars: one account's market value; also one transaction's value
    max_cost_basis: int = 1_000_000_000  # dollars: one lot's (or one sale's) total cost basis


PLAUSIBILITY = PlausibilityLimits()


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    # A required column missing from the header fails the whole file.
    required: bool = True
    # May the value be empty? (e.g. suspended_reason when not suspended)
    nullable: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeedFile:
    name: str  # file stem, e.g. "positions" for positions.csv
    columns: tuple[Column, ...]
    # Columns that identify a row; a second row with the same key is a duplicate.
    key: tuple[str, ...] = ()
    doc: str = ""
    optional_file: bool = False

    @property
    def filename(self) -> str:
        return f"{self.name}.csv"

    @property
    def required_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


ROLES = ("advisor", "compliance", "trading_desk", "operations")
ACCOUNT_TYPES = ("taxable", "traditional_ira", "roth_ira", "401k", "529", "erisa")
ASSET_CLASSES = ("equity", "fixed_income", "alternatives", "cash")
SECURITY_TYPES = ("stock", "etf", "mutual_fund", "bond", "money_market", "cash")
RESTRICTION_KINDS = ("no_buy_symbol", "no_sell_symbol", "no_asset_class", "min_cash_weight")
TRANSACTION_TYPES = ("buy", "sell", "reinvest", "transfer_in", "transfer_out")
TARGET_SCOPES = ("account", "household")
# How the lots of a sale are chosen: fifo is the default when lots are not identified
# (Treas. Reg. §1.1012-1(c)(1)); hifo and tax_min are standing specific-identification orders.
LOT_RELIEF_METHODS = ("fifo", "hifo", "tax_min")
CASH_SYMBOL = "CASH"

FEED_FILES: dict[str, FeedFile] = {
    f.name: f
    for f in (
        FeedFile(
            "users",
            (
                Column("user_id", "id"),
                Column("name", "text"),
                Column("email", "text"),
                Column("role", "enum", choices=ROLES),
                # Optional team routing: this user works on (is notified of, may decide for)
                # the named advisor's clients.
                Column("team_of", "id", required=False, nullable=True),
                # Optional, on an advisor's row: their team members (team_of) also receive the
                # advisor's alert emails (each with their own links). Empty or absent = false.
                Column("team_alerts", "bool", required=False, nullable=True),
            ),
            key=("user_id",),
            doc="Advisors, compliance officers, trading desk and operations staff.",
        ),
        FeedFile(
            "households",
            (
                Column("household_id", "id"),
                Column("name", "text"),
                Column("advisor_id", "id"),
                Column("aggregate_rebalancing", "bool"),
                Column("federal_ordinary_rate", "decimal"),
                Column("federal_ltcg_rate", "decimal"),
                Column("state_rate", "decimal"),
                # Optional: how the household hears of an executed rebalance (empty = the firm's
                # default, REBAL_CLIENT_CONFIRMATION).
                Column("confirmation_style", "enum", required=False, nullable=True, choices=("simple", "detailed")),
            ),
            key=("household_id",),
            doc="Client households; aggregate_rebalancing rebalances all accounts as one.",
        ),
        FeedFile(
            "accounts",
            (
                Column("account_id", "id"),
                Column("household_id", "id"),
                Column("client_name", "text"),
                Column("client_email", "text"),
                Column("custodian", "id"),
                Column("account_type", "enum", choices=ACCOUNT_TYPES),
                Column("discretionary", "bool"),
                Column("tax_sensitive", "bool"),
                Column("suspended", "bool"),
                Column("suspended_reason", "text", nullable=True),
                Column("model_id", "id", nullable=True),
                # Optional: overrides the household's advisor of record.
                Column("advisor_id", "id", required=False, nullable=True),
                # Optional: the account's standing lot-relief instruction; empty = the policy default.
                Column("lot_relief_method", "enum", required=False, nullable=True, choices=LOT_RELIEF_METHODS),
            ),
            key=("account_id",),
        ),
        FeedFile(
            "models",
            (Column("model_id", "id"), Column("symbol", "id"), Column("weight", "decimal")),
            key=("model_id", "symbol"),
            doc="Security-level model weights; sum to 1 per model.",
        ),
        FeedFile(
            "ips_targets",
            (
                Column("scope", "enum", choices=TARGET_SCOPES),
                Column("scope_id", "id"),
                Column("asset_class", "enum", choices=ASSET_CLASSES),
                Column("target_weight", "decimal"),
            ),
            key=("scope", "scope_id", "asset_class"),
            doc="IPS asset-class targets that override the model; sum to 1 per scope.",
        ),
        FeedFile(
            "restrictions",
            (
                Column("account_id", "id"),
                Column("kind", "enum", choices=RESTRICTION_KINDS),
                Column("value", "text"),
            ),
            key=("account_id", "kind", "value"),
        ),
        FeedFile(
            "securities",
            (
                Column("symbol", "id"),
                Column("cusip", "text", nullable=True),
                Column("description", "text"),
                Column("asset_class", "enum", choices=ASSET_CLASSES),
                Column("security_type", "enum", choices=SECURITY_TYPES),
                Column("wash_group", "id"),
                Column("tlh_substitute", "id", nullable=True),
                Column("fractional", "bool"),
            ),
            key=("symbol",),
        ),
        FeedFile(
            "prices",
            (Column("symbol", "id"), Column("close", "decimal")),
            key=("symbol",),
            doc="Close of the as-of date; cash has price 1.",
        ),
        FeedFile(
            "positions",
            (Column("account_id", "id"), Column("symbol", "id"), Column("quantity", "decimal")),
            key=("account_id", "symbol"),
            doc="Cash is the symbol CASH with quantity in dollars.",
        ),
        FeedFile(
            "lots",
            (
                Column("account_id", "id"),
                Column("symbol", "id"),
                Column("lot_id", "id"),
                Column("open_date", "date"),
                Column("quantity", "decimal"),
                Column("cost_basis", "decimal"),
                # Optional: true when the custodian has already added a disallowed wash-sale loss
                # to this lot's basis (brokers must for identical securities in one account,
                # IRC §6045(g)); rebal then does not add it a second time.
                Column("wash_sale_adjusted", "bool", required=False, nullable=True),
            ),
            key=("account_id", "lot_id"),
            doc="cost_basis is the lot's total dollars; lots of one account/symbol sum to the position.",
        ),
        FeedFile(
            "transactions",
            (
                Column("account_id", "id"),
                Column("symbol", "id"),
                Column("trade_date", "date"),
                Column("type", "enum", choices=TRANSACTION_TYPES),
                Column("quantity", "decimal"),
                Column("price", "decimal"),
                # Optional, for sells: the total cost basis of the shares sold and the date they
                # were acquired, as custodians report realised gains. Without them a past loss sale
                # cannot be checked for a wash sale (reported, never guessed).
                Column("cost_basis", "decimal", required=False, nullable=True),
                Column("acquired_date", "date", required=False, nullable=True),
            ),
            key=(),
            doc="At least the last 61 days (the wash-sale look-back: a loss sold 30 days ago is washed by a "
                "purchase up to 30 days before that sale, IRC §1091(a)).",
        ),
    )
}
