"""Synthetic RIA book for the sandbox: one as-of date of the canonical feed.

`generate_feed` writes the eleven files of `rebal_pipeline.core.feed_contract.FEED_FILES` for a
made-up advisory firm: advisors and staff, client households with tax rates, their accounts,
model portfolios, IPS overrides, restrictions, securities and closes, positions, cost-basis lots
and the last 60 days of transactions. docs/sandbox.md describes the knobs, what the book looks
like, the past wash sales it always plants (`SandboxReport.wash_sales`) and the defects that
`defects=True` plants (`SandboxReport.defects`).

Everything is drawn with numpy/polars over whole arrays (there is no loop over accounts), so a
book of a million accounts takes about 25 seconds. The book is a pure function of the config:
the same config gives byte-identical files.

How the book is built, in the order of the code below:
1. households: AUM (lognormal, calibrated to the Base/Standard/Premium tiers), tax brackets,
   accounts per household, aggregate rebalancing and household IPS targets;
2. accounts: type, custodian, flags, model, account-level IPS targets and standing lot-relief
   method;
3. holdings: each account's target asset-class weights spread over the securities of its model,
   perturbed (and, for some accounts, tilted past their band), valued at PRE-shock closes and
   rounded to whole shares (thousandths for funds); the remainder is cash;
4. lots: each position split in integer units into 1-3 lots opened over five years, priced
   from a simulated daily price history (with a market peak some eight months back, so that
   lots bought near it are tax-loss-harvesting candidates);
5. past wash sales: in a handful of households per 200, a taxable account sold a lot bought at
   the peak, 1-30 days ago, at a loss; where the scenario has a replacement purchase, the newest
   lot of a position the household holds is moved to the purchase date (so lots still sum to
   positions), and no other purchase of that wash group falls in the window;
6. transactions: the buy (or dividend reinvestment) behind every lot opened in the last 60
   days, the planted loss sales, trims of other fund positions (each sell with the basis and
   acquisition date of the shares sold; never a wash sale by accident) and cash deposits;
7. the `shock` moves only the as-of closes in prices.csv; the positions stay as they were.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rebal_pipeline.core.feed_contract import (
    ACCOUNT_TYPES,
    ASSET_CLASSES,
    CASH_SYMBOL,
    FEED_FILES,
    LOT_RELIEF_METHODS,
)

# --------------------------------------------------------------------------------------------
# Public interface
# --------------------------------------------------------------------------------------------

SHOCKABLE_ASSET_CLASSES = ("equity", "fixed_income", "alternatives")


class SandboxConfig(BaseModel):
    """What book to generate. Frozen: a config names one book."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    as_of: dt.date
    households: int = Field(default=200, ge=1)
    seed: int = Field(default=42, ge=0)
    # asset_class -> return applied to the as-of closes, e.g. {"equity": -0.12}.
    shock: dict[str, float] = Field(default_factory=dict)
    # Plant the documented bad rows (docs/sandbox.md, "Injected defects").
    defects: bool = False
    # Default: about one advisor per 40 households, at least 2.
    advisors: int | None = Field(default=None, ge=1)

    @field_validator("shock")
    @classmethod
    def _shock_moves_priced_classes(cls, shock: dict[str, float]) -> dict[str, float]:
        for asset_class, move in shock.items():
            if asset_class not in SHOCKABLE_ASSET_CLASSES:
                # Cash is priced at exactly 1 by contract, so it cannot be shocked.
                raise ValueError(
                    f"shock: unknown or unshockable asset class {asset_class!r}; "
                    f"use one of {', '.join(SHOCKABLE_ASSET_CLASSES)}"
                )
            if not math.isfinite(move) or move <= -1.0:
                raise ValueError(f"shock: {asset_class} return {move} must be finite and > -1")
        return shock

    @property
    def advisor_count(self) -> int:
        if self.advisors is not None:
            return self.advisors
        return max(2, round(self.households / 40))


class InjectedDefect(BaseModel):
    """One bad row planted on purpose, and the account the pipeline must hold out for it."""

    model_config = ConfigDict(frozen=True)

    file: str
    account_id: str
    column: str
    kind: str


WASH_SALE_KINDS = (
    "ira_replacement",  # (a) taxable loss sale, same wash group bought in the household's IRA: loss lost for good
    "same_account",  # (b) same symbol bought back in the same account 10-25 days later; basis not yet adjusted
    "custodian_adjusted",  # (c) like (b), but the custodian already added the loss to the lot (wash_sale_adjusted=true)
    "partial_replacement",  # (d) like (b), but fewer shares bought back (e.g. 75 of 100)
    "clean_harvest",  # (e) a loss sale with no substantially identical purchase within 30 days: not a wash
    "outside_window",  # (e) a loss sale whose only such purchase is 31+ days before it: not a wash
)
NOT_WASH_SALES = ("clean_harvest", "outside_window")


class WashSaleScenario(BaseModel):
    """One past loss sale planted on purpose (docs/sandbox.md, "Past wash sales").

    All amounts are exact: whole ETF shares at whole-cent closes. `loss` is the sale's
    cost_basis minus price x quantity as written in transactions.csv. The "replacement" is the
    substantially identical purchase (same wash_group) nearest the sale, if any: for
    `outside_window` it is the purchase 31+ days before the sale, which is *not* a replacement.
    """

    model_config = ConfigDict(frozen=True)

    kind: str  # one of WASH_SALE_KINDS
    household_id: str
    account_id: str  # the taxable account that sold
    symbol: str
    sale_date: dt.date
    quantity: Decimal  # shares sold
    loss: Decimal  # dollars, > 0
    replacement_account_id: str | None
    replacement_symbol: str | None
    replacement_date: dt.date | None  # the buy's trade_date == the replacement lot's open_date
    replacement_quantity: Decimal | None
    # What IRC §1091 disallows: loss x min(1, replacement/sold) for a wash sale, else 0. For
    # ira_replacement it is lost for good (Rev. Rul. 2008-5); otherwise it belongs in the
    # replacement lot's basis (already there for custodian_adjusted).
    disallowed_loss: Decimal

    @property
    def wash_sale(self) -> bool:
        return self.kind not in NOT_WASH_SALES


class SandboxReport(BaseModel):
    """What was written. Row counts are data rows in the files, planted rows included."""

    feed_dir: Path
    households: int
    accounts: int
    positions: int
    lots: int
    transactions: int
    defects: list[InjectedDefect] = Field(default_factory=list)
    # The planted past loss sales, wash sales and not (always present, defects or not).
    wash_sales: list[WashSaleScenario] = Field(default_factory=list)


# Accounts per household: 1-5 with mean about 2.5.
ACCOUNTS_PER_HOUSEHOLD = (1, 2, 3, 4, 5)
ACCOUNTS_PER_HOUSEHOLD_P = (0.25, 0.28, 0.25, 0.14, 0.08)
MEAN_ACCOUNTS_PER_HOUSEHOLD = sum(n * p for n, p in zip(ACCOUNTS_PER_HOUSEHOLD, ACCOUNTS_PER_HOUSEHOLD_P))


def households_for_accounts(n_accounts: int) -> int:
    """The household count that yields about `n_accounts` accounts on average."""
    return max(1, round(n_accounts / MEAN_ACCOUNTS_PER_HOUSEHOLD))


def cusip_check_digit(base: str) -> str:
    """The ninth character of a CUSIP (ANSI X9.6 "modulus 10 double add double")."""
    if len(base) != 8:
        raise ValueError(f"a CUSIP base has 8 characters, got {base!r}")
    total = 0
    for position, char in enumerate(base.upper()):
        if char.isdigit():
            value = int(char)
        elif char.isalpha():
            value = ord(char) - ord("A") + 10
        else:
            value = {"*": 36, "@": 37, "#": 38}[char]
        if position % 2 == 1:  # every second character is doubled
            value *= 2
        total += value // 10 + value % 10
    return str((10 - total % 10) % 10)


# --------------------------------------------------------------------------------------------
# The firm's shelf: securities, models, names
# --------------------------------------------------------------------------------------------


class _Security(NamedTuple):
    symbol: str
    description: str
    asset_class: str
    security_type: str
    # Securities in one wash group are substantially identical (IRC §1091): share classes of
    # one fund, and, conservatively, funds tracking the same index (VOO/IVV/VFIAX).
    wash_group: str
    tlh_substitute: str  # "" = none; else a symbol of another wash group, same asset class
    fractional: bool
    typical_close: float
    idiosyncratic_vol: float  # annual, on top of the asset-class market factor


SECURITIES: tuple[_Security, ...] = (
    # US equity: total market, S&P 500, large cap, growth
    _Security("VTI", "Vanguard Total Stock Market ETF", "equity", "etf", "crsp_us_total", "ITOT", False, 280.00, 0.01),
    _Security("VTSAX", "Vanguard Total Stock Market Index Fund Admiral Shares", "equity", "mutual_fund", "crsp_us_total", "ITOT", True, 140.00, 0.01),
    _Security("ITOT", "iShares Core S&P Total U.S. Stock Market ETF", "equity", "etf", "sp_total_market", "SCHB", False, 125.00, 0.01),
    _Security("SCHB", "Schwab U.S. Broad Market ETF", "equity", "etf", "dj_us_broad", "VTI", False, 23.50, 0.01),
    _Security("VOO", "Vanguard S&P 500 ETF", "equity", "etf", "sp500", "SCHX", False, 520.00, 0.02),
    _Security("IVV", "iShares Core S&P 500 ETF", "equity", "etf", "sp500", "SCHX", False, 570.00, 0.02),
    _Security("VFIAX", "Vanguard 500 Index Fund Admiral Shares", "equity", "mutual_fund", "sp500", "SCHX", True, 480.00, 0.02),
    _Security("SCHX", "Schwab U.S. Large-Cap ETF", "equity", "etf", "dj_us_large_cap", "VOO", False, 23.00, 0.02),
    _Security("VUG", "Vanguard Growth ETF", "equity", "etf", "crsp_us_large_growth", "IWF", False, 400.00, 0.06),
    _Security("IWF", "iShares Russell 1000 Growth ETF", "equity", "etf", "r1000_growth", "VUG", False, 390.00, 0.06),
    _Security("QQQ", "Invesco QQQ Trust", "equity", "etf", "nasdaq100", "VUG", False, 500.00, 0.08),
    _Security("VEA", "Vanguard FTSE Developed Markets ETF", "equity", "etf", "ftse_developed", "IEFA", False, 50.00, 0.07),
    _Security("IEFA", "iShares Core MSCI EAFE ETF", "equity", "etf", "msci_eafe_imi", "VEA", False, 75.00, 0.07),
    _Security("VWO", "Vanguard FTSE Emerging Markets ETF", "equity", "etf", "ftse_emerging", "IEMG", False, 45.00, 0.12),
    _Security("IEMG", "iShares Core MSCI Emerging Markets ETF", "equity", "etf", "msci_em_imi", "VWO", False, 55.00, 0.12),
    _Security("AAPL", "Apple Inc", "equity", "stock", "aapl", "", False, 225.00, 0.22),
    _Security("MSFT", "Microsoft Corp", "equity", "stock", "msft", "", False, 420.00, 0.20),
    _Security("JNJ", "Johnson & Johnson", "equity", "stock", "jnj", "", False, 155.00, 0.15),
    _Security("JPM", "JPMorgan Chase & Co", "equity", "stock", "jpm", "", False, 240.00, 0.20),
    _Security("XOM", "Exxon Mobil Corp", "equity", "stock", "xom", "", False, 115.00, 0.22),
    # Held by exactly one account, so that a bad close for it holds out only that account.
    _Security("ZVXQ", "Sandbox Thin Holdings Inc", "equity", "stock", "zvxq", "", False, 8.40, 0.35),
    # Fixed income
    _Security("BND", "Vanguard Total Bond Market ETF", "fixed_income", "etf", "us_agg_vanguard", "AGG", False, 73.00, 0.005),
    _Security("VBTLX", "Vanguard Total Bond Market Index Fund Admiral Shares", "fixed_income", "mutual_fund", "us_agg_vanguard", "AGG", True, 9.70, 0.005),
    _Security("AGG", "iShares Core U.S. Aggregate Bond ETF", "fixed_income", "etf", "us_agg_ishares", "SCHZ", False, 98.00, 0.005),
    _Security("SCHZ", "Schwab U.S. Aggregate Bond ETF", "fixed_income", "etf", "us_agg_schwab", "BND", False, 23.20, 0.005),
    _Security("VGIT", "Vanguard Intermediate-Term Treasury ETF", "fixed_income", "etf", "ust_3_10", "IEF", False, 59.00, 0.02),
    _Security("IEF", "iShares 7-10 Year Treasury Bond ETF", "fixed_income", "etf", "ust_7_10", "VGIT", False, 95.00, 0.03),
    _Security("TIP", "iShares TIPS Bond ETF", "fixed_income", "etf", "us_tips", "VTIP", False, 109.00, 0.02),
    _Security("VTIP", "Vanguard Short-Term Inflation-Protected Securities ETF", "fixed_income", "etf", "us_tips_0_5", "TIP", False, 49.00, 0.01),
    _Security("VCIT", "Vanguard Intermediate-Term Corporate Bond ETF", "fixed_income", "etf", "corp_5_10_bloomberg", "IGIB", False, 81.00, 0.03),
    _Security("IGIB", "iShares 5-10 Year Investment Grade Corporate Bond ETF", "fixed_income", "etf", "corp_5_10_ice", "VCIT", False, 52.00, 0.03),
    _Security("MUB", "iShares National Muni Bond ETF", "fixed_income", "etf", "muni_sp_national", "TFI", False, 107.00, 0.02),
    _Security("TFI", "SPDR Nuveen Bloomberg Municipal Bond ETF", "fixed_income", "etf", "muni_bloomberg", "MUB", False, 46.00, 0.02),
    # Alternatives: REITs and gold (ERISA plans here may not hold them)
    _Security("VNQ", "Vanguard Real Estate ETF", "alternatives", "etf", "reit_msci", "SCHH", False, 90.00, 0.16),
    _Security("SCHH", "Schwab U.S. REIT ETF", "alternatives", "etf", "reit_dj", "VNQ", False, 21.00, 0.16),
    _Security("GLD", "SPDR Gold Shares", "alternatives", "etf", "physical_gold", "", False, 240.00, 0.14),
    _Security("IAU", "iShares Gold Trust", "alternatives", "etf", "physical_gold", "", False, 48.00, 0.14),
    # Cash: a money-market fund (has lots) and the sweep balance (no lots, quantity = dollars)
    _Security("SWVXX", "Schwab Value Advantage Money Fund", "cash", "money_market", "schwab_mmf", "", True, 1.00, 0.0),
    _Security(CASH_SYMBOL, "Cash and sweep balance", "cash", "cash", "cash", "", True, 1.00, 0.0),
)

SYMBOLS: tuple[str, ...] = tuple(s.symbol for s in SECURITIES)
THIN_STOCK = "ZVXQ"
# Not in securities.csv: the "unknown_symbol" defect.
UNKNOWN_SYMBOL = "QXZV"

_SEC = {symbol: i for i, symbol in enumerate(SYMBOLS)}
_CLASS = {asset_class: i for i, asset_class in enumerate(ASSET_CLASSES)}
_EQUITY, _FIXED_INCOME, _ALTERNATIVES, _CASH_CLASS = (_CLASS[c] for c in ("equity", "fixed_income", "alternatives", "cash"))
_CASH = _SEC[CASH_SYMBOL]
_N_SEC = len(SECURITIES)
_SEC_CLASS = np.array([_CLASS[s.asset_class] for s in SECURITIES], dtype=np.int8)
_WASH_GROUPS = sorted({s.wash_group for s in SECURITIES})
_SEC_GROUP = np.array([_WASH_GROUPS.index(s.wash_group) for s in SECURITIES], dtype=np.int64)
# Quantities are integers in units: whole shares, thousandths of a share for funds that trade
# fractionally, cents for the CASH balance (and the money-market fund). Splitting lots in integer units keeps them summing
# exactly to the position.
# The money-market fund is kept in cents of a share: at a $1.00 NAV its shares are dollars.
_SEC_DECIMALS = np.array(
    [2 if s.asset_class == "cash" else 3 if s.fractional else 0 for s in SECURITIES], dtype=np.int8
)
_UNITS_PER_SHARE = (10 ** _SEC_DECIMALS.astype(np.int64)).astype(np.int64)
_IS_STOCK = np.array([s.security_type == "stock" for s in SECURITIES])
_IS_FUND_AT_NAV = np.array([s.security_type in ("mutual_fund", "money_market") for s in SECURITIES])
# Monthly dividends are reinvested in these (bond funds and the money-market fund).
_REINVESTS_MONTHLY = np.array(
    [s.security_type in ("mutual_fund", "money_market") and s.asset_class in ("fixed_income", "cash") for s in SECURITIES]
)
_LEGACY_STOCKS = np.array([_SEC[s] for s in ("AAPL", "MSFT", "JNJ", "JPM", "XOM")])

# Security-level models in basis points (sum to 10,000 each, so the weights sum to exactly 1).
# Names give the growth/income split; each keeps a small cash weight.
MODELS: dict[str, dict[str, int]] = {
    "MOD-CONS": {"VTI": 1500, "VOO": 500, "VEA": 700, "VWO": 300, "BND": 3000, "VGIT": 1200, "TIP": 800, "VCIT": 1000, "SWVXX": 600, CASH_SYMBOL: 400},
    "MOD-INC": {"VTI": 1000, "VOO": 1500, "VEA": 500, "BND": 2500, "VCIT": 1500, "MUB": 1000, "TIP": 500, "VNQ": 500, "SWVXX": 700, CASH_SYMBOL: 300},
    "MOD-BAL": {"VTI": 2800, "VOO": 1000, "VEA": 1200, "VWO": 500, "VNQ": 300, "GLD": 200, "BND": 2200, "VGIT": 800, "TIP": 400, "VCIT": 400, CASH_SYMBOL: 200},
    "MOD-GROW": {"VTI": 3600, "VOO": 1200, "VUG": 800, "VEA": 1300, "VWO": 600, "VNQ": 300, "GLD": 200, "BND": 1200, "VCIT": 400, "TIP": 200, CASH_SYMBOL: 200},
    "MOD-AGGR": {"VTI": 4000, "VOO": 1500, "VUG": 1000, "QQQ": 500, "VEA": 1500, "VWO": 800, "VNQ": 200, "BND": 300, CASH_SYMBOL: 200},
}
MODEL_IDS = tuple(MODELS)  # ordered from most conservative to most aggressive (by risk ladder)
_RISK_LADDER_P = (0.15, 0.10, 0.35, 0.28, 0.12)  # household risk profile -> model
_BALANCED = MODEL_IDS.index("MOD-BAL")
_NO_MODEL = len(MODEL_IDS)  # row of the default sleeves, for IPS-only accounts

# How an IPS-only account (no model) fills each asset class, in basis points of the class.
DEFAULT_SLEEVES: dict[str, dict[str, int]] = {
    "equity": {"VTI": 5500, "VOO": 1000, "VEA": 2500, "VWO": 1000},
    "fixed_income": {"BND": 7000, "VGIT": 2000, "TIP": 1000},
    "alternatives": {"VNQ": 6000, "GLD": 4000},
    "cash": {CASH_SYMBOL: 10000},
}

# What an account actually holds in place of the model's symbols.
_HOLDING_VARIANTS: dict[int, dict[str, str]] = {
    # 401(k) menus and some IRAs hold the mutual-fund share class of the same fund.
    1: {"VTI": "VTSAX", "VOO": "VFIAX", "BND": "VBTLX"},
    # Taxable accounts that harvested losses earlier still hold the substitutes.
    2: {"VTI": "ITOT", "VEA": "IEFA", "VWO": "IEMG", "BND": "AGG", "VCIT": "IGIB", "VNQ": "SCHH"},
    # Holdings transferred in from another firm, never switched to the house line-up.
    3: {"VOO": "IVV", "VUG": "IWF", "VGIT": "IEF", "MUB": "TFI", "TIP": "VTIP", "GLD": "IAU", "BND": "SCHZ"},
}
_SHARE_CLASS_FUNDS = 1

ADVISOR_FIRST_NAMES = (
    "Sarah", "Michael", "Priya", "David", "Elena", "James", "Aisha", "Robert", "Mei", "Daniel",
    "Laura", "Carlos", "Rachel", "Thomas", "Nadia", "Kevin", "Hannah", "Omar", "Julia", "Brian",
    "Grace", "Marcus", "Sofia", "Andrew", "Yuki", "Patrick", "Fatima", "Jonathan", "Claire", "Victor",
)
FIRST_NAMES = ADVISOR_FIRST_NAMES + (
    "Maria", "John", "Linda", "William", "Jennifer", "Richard", "Patricia", "Joseph", "Susan", "Charles",
    "Karen", "Christopher", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark", "Sandra", "Steven",
    "Ashley", "Paul", "Emily", "Joshua", "Donna", "Kenneth", "Michelle", "Ana", "Wei", "Arjun",
    "Lucia", "Hiroshi", "Amara", "Noah", "Olivia", "Liam", "Emma", "Mateo", "Ava", "Ethan",
    "Isabella", "Lucas", "Mia", "Samuel", "Chloe", "Benjamin", "Zoe", "Gabriel", "Leah", "Ravi",
)
SURNAMES = (
    "Alvarez", "Chen", "Patel", "Nguyen", "Johnson", "Williams", "Garcia", "Kim", "Okafor", "Schmidt",
    "Rossi", "Cohen", "O'Brien", "Murphy", "Singh", "Tanaka", "Kowalski", "Andersen", "Dubois", "Haddad",
    "Santos", "Martinez", "Lopez", "Brown", "Davis", "Miller", "Wilson", "Moore", "Taylor", "Anderson",
    "Thomas", "Jackson", "White", "Harris", "Martin", "Thompson", "Robinson", "Clark", "Lewis", "Lee",
    "Walker", "Hall", "Allen", "Young", "Hernandez", "King", "Wright", "Hill", "Scott", "Green",
    "Adams", "Baker", "Gonzalez", "Nelson", "Carter", "Mitchell", "Perez", "Roberts", "Turner", "Phillips",
    "Campbell", "Parker", "Evans", "Edwards", "Collins", "Stewart", "Sanchez", "Morris", "Rogers", "Reed",
    "Cook", "Morgan", "Bell", "Cooper", "Rivera", "Ward", "Torres", "Peterson", "Gray", "Ramirez",
    "Watson", "Brooks", "Kelly", "Sanders", "Price", "Bennett", "Wood", "Barnes", "Ross", "Henderson",
    "Mehta", "Shah", "Wong", "Yamamoto", "Park", "Choi", "Novak", "Fischer", "Weber", "Larsen",
    "Moreau", "Costa", "Ferreira", "Nakamura", "Mensah", "Adeyemi", "Ivanov", "Kaplan", "Flores", "Diaz",
)
# Staff other than advisors: (user_id, name, role).
STAFF = (
    ("CCO-0001", "Margaret Okonkwo", "compliance"),
    ("TRD-0001", "Daniel Reyes", "trading_desk"),
    ("OPS-0001", "Priscilla Huang", "operations"),
    ("ASC-0001", "Jordan Blake", "advisor"),  # a client associate on the first advisor's team
)
ASSOCIATE = STAFF[-1]
_FIRST_ADVISOR = "ADV-0001"
FIRM_EMAIL_DOMAIN = "example-ria.com"
CLIENT_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")
CUSTODIANS = ("schwab", "fidelity", "pershing")
CUSTODIAN_P = (0.45, 0.35, 0.20)
SUSPENDED_REASONS = (
    "client deceased – estate pending",
    "account transfer in progress",
    "legal hold",
    "client requested trading pause",
)

# Household AUM is lognormal with P(< $100k) = 30% and P(>= $500k) = 25%, which gives the
# Base/Standard/Premium mix of 30/45/25 by household market value:
#   ln(100k) = mu - 0.5244 sigma, ln(500k) = mu + 0.6745 sigma.
_AUM_SIGMA = math.log(5.0) / (0.5244 + 0.6745)
_AUM_MU = math.log(100_000) + 0.5244 * _AUM_SIGMA
_AUM_MIN, _AUM_MAX = 10_000.0, 30_000_000.0

# Federal brackets, in 1e-4: ordinary rate, long-term capital gains rate(s) consistent with it
# (the 3.8% net investment income tax is added from the 32% bracket up).
_ORDINARY_BP = np.array([1200, 2200, 2400, 3200, 3500, 3700])
_ORDINARY_P_CUTS = np.array([-1.504, -0.425, 0.493, 1.171, 1.798])  # 12/25/28/17/10/8 % of households
_LTCG_BP = np.array([0, 1500, 1500, 1880, 1880, 2380])
# Top marginal state rates (1e-4) and how common they are among clients.
_STATE_BP = np.array([0, 307, 425, 475, 495, 500, 550, 575, 637, 685, 930, 999, 1075, 1330])
_STATE_P = np.array([0.22, 0.05, 0.04, 0.04, 0.05, 0.04, 0.04, 0.05, 0.05, 0.09, 0.14, 0.03, 0.03, 0.03])

ACCOUNT_TYPE_FIRST_P = {"taxable": 0.70, "traditional_ira": 0.12, "roth_ira": 0.06, "401k": 0.07, "529": 0.0, "erisa": 0.05}
ACCOUNT_TYPE_OTHER_P = {"taxable": 0.18, "traditional_ira": 0.26, "roth_ira": 0.22, "401k": 0.14, "529": 0.17, "erisa": 0.03}
# Relative size of an account within its household (529s and Roths are smaller).
_ACCOUNT_SIZE_FACTOR = {"taxable": 1.0, "traditional_ira": 0.8, "roth_ira": 0.35, "401k": 0.7, "529": 0.25, "erisa": 0.6}
_TYPE = {t: i for i, t in enumerate(ACCOUNT_TYPES)}

# The asset-class factor: annual drift and volatility of the simulated price history.
_CLASS_DRIFT = {"equity": 0.08, "fixed_income": 0.02, "alternatives": 0.05, "cash": 0.0}
_CLASS_VOL = {"equity": 0.15, "fixed_income": 0.05, "alternatives": 0.04, "cash": 0.0}
# The peak some eight months back: how far above today's close it is, by asset class. For
# equity and alternatives funds it is at least 13% (so lots bought there are down >= 10%).
_PEAK_HEIGHT = {"equity": 0.15, "fixed_income": 0.06, "alternatives": 0.12, "cash": 0.0}
_MIN_PEAK_LOSS = math.log(1.13)
HISTORY_DAYS = 5 * 366 + 10
_LEGACY_LOT_MIN_DAYS = 3 * 365  # legacy single-stock lots were bought three to five years ago
# Transactions cover as_of − 60 … as_of: the 61 days the feed contract asks for (a loss sold 30
# days ago is washed by a purchase up to 30 days before that sale, IRC §1091(a)).
LOOKBACK_DAYS = 60


# --------------------------------------------------------------------------------------------
# Random streams and small helpers
# --------------------------------------------------------------------------------------------


def _rng(seed: int, part: str) -> np.random.Generator:
    # One independent stream per part of the book, so that changing one part (or turning the
    # defects on) never reshuffles the others.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(part.encode())]))


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def _rank_in_segment(counts: np.ndarray) -> np.ndarray:
    """0, 1, ... within each consecutive segment of the given lengths."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(_segment_starts(counts), counts)


def _choice(rng: np.random.Generator, p: dict[str, float] | tuple | np.ndarray, size: int) -> np.ndarray:
    probabilities = np.asarray(list(p.values()) if isinstance(p, dict) else p, dtype=float)
    return rng.choice(len(probabilities), size=size, p=probabilities / probabilities.sum())


def _roll_to_trading_day(as_of: np.datetime64, days_back: np.ndarray) -> np.ndarray:
    """Days back from as_of of the weekday on or before each date (trades settle on weekdays)."""
    dates = np.busday_offset(as_of - days_back.astype("timedelta64[D]"), 0, roll="backward")
    return (as_of - dates).astype(np.int64)


def _decimal_text(value: Decimal) -> str:
    return format(value, "f")  # never an exponent


def _round_cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


# --------------------------------------------------------------------------------------------
# Book construction
# --------------------------------------------------------------------------------------------


@dataclass
class _Prices:
    pre_shock_cents: np.ndarray  # int64 per security: the close the positions were built at
    as_of_close: list[Decimal]  # per security, after the shock: prices.csv
    history_cents: np.ndarray  # (securities, HISTORY_DAYS): close `d` days before as_of
    peak_days_back: int


def _draw_prices(config: SandboxConfig, as_of: np.datetime64) -> _Prices:
    rng = _rng(config.seed, "prices")
    typical = np.array([s.typical_close for s in SECURITIES])
    at_one_dollar = np.array([s.asset_class == "cash" for s in SECURITIES])
    # Cash and the money-market fund stay at $1.00; everything else moves a little per seed.
    wobble = np.where(at_one_dollar, 1.0, np.exp(rng.normal(0.0, 0.03, _N_SEC)))
    pre_shock_cents = np.maximum(1, np.round(typical * wobble * 100)).astype(np.int64)

    as_of_close = []
    for security, cents in zip(SECURITIES, pre_shock_cents):
        close = (Decimal(int(cents)) / 100).quantize(Decimal("0.01"))
        move = config.shock.get(security.asset_class)
        if move is not None:
            close = max(Decimal("0.01"), _round_cents(close * (1 + Decimal(str(move)))))
        as_of_close.append(close)

    # Daily history, d = 0 (as_of) .. HISTORY_DAYS-1 days back: an asset-class market factor
    # plus a wash-group factor (share classes of one fund move together), drifting upward over
    # time (so older lots mostly carry gains), with a peak some eight months back.
    days = np.arange(HISTORY_DAYS)
    scale = 1.0 / math.sqrt(365.0)
    class_walk = np.concatenate(
        [np.zeros((len(ASSET_CLASSES), 1)), np.cumsum(rng.normal(0.0, scale, (len(ASSET_CLASSES), HISTORY_DAYS - 1)), axis=1)],
        axis=1,
    )
    group_walk = np.concatenate(
        [np.zeros((len(_WASH_GROUPS), 1)), np.cumsum(rng.normal(0.0, scale, (len(_WASH_GROUPS), HISTORY_DAYS - 1)), axis=1)],
        axis=1,
    )
    group_of = _SEC_GROUP
    drift = np.array([_CLASS_DRIFT[s.asset_class] for s in SECURITIES])
    class_vol = np.array([_CLASS_VOL[s.asset_class] for s in SECURITIES])
    idio_vol = np.array([s.idiosyncratic_vol for s in SECURITIES])
    log_ratio = (
        -drift[:, None] * days[None, :] / 365.0
        + class_vol[:, None] * class_walk[_SEC_CLASS]
        + idio_vol[:, None] * group_walk[group_of]
    )

    # Legacy single stocks have run up since the client bought them (which is why some clients
    # will not sell): their three-to-five-year-old closes are at most 65% of today's.
    legacy = np.zeros(_N_SEC, dtype=bool)
    legacy[_LEGACY_STOCKS] = True
    excess = np.maximum(0.0, log_ratio[:, _LEGACY_LOT_MIN_DAYS:].max(axis=1) - math.log(0.65))
    ramp = np.minimum(days / _LEGACY_LOT_MIN_DAYS, 1.0)
    log_ratio[legacy] -= excess[legacy, None] * ramp[None, :]

    peak_days_back = int(_roll_to_trading_day(as_of, np.array([rng.integers(210, 271)]))[0])
    hump = np.exp(-0.5 * ((days - peak_days_back) / 45.0) ** 2)
    height = np.array([_PEAK_HEIGHT[s.asset_class] for s in SECURITIES]) * rng.uniform(0.8, 1.2, _N_SEC)
    guaranteed = np.array(
        [s.asset_class in ("equity", "alternatives") and s.security_type in ("etf", "mutual_fund") for s in SECURITIES]
    )
    height = np.where(guaranteed, np.maximum(height, _MIN_PEAK_LOSS - log_ratio[:, peak_days_back]), height)
    log_ratio += height[:, None] * hump[None, :]
    log_ratio[at_one_dollar] = 0.0
    history_cents = np.maximum(1, np.round(pre_shock_cents[:, None] * np.exp(log_ratio))).astype(np.int64)
    return _Prices(pre_shock_cents, as_of_close, history_cents, peak_days_back)


@dataclass
class _Households:
    n: int
    advisor: np.ndarray
    surname: np.ndarray
    name_style: np.ndarray
    aum_cents: np.ndarray
    accounts: np.ndarray  # accounts per household
    aggregated: np.ndarray
    has_targets: np.ndarray  # household-scope IPS targets
    target_bp: np.ndarray  # (n, asset classes), meaningful where has_targets
    risk: np.ndarray  # index into MODEL_IDS
    ordinary_bp: np.ndarray
    ltcg_bp: np.ndarray
    state_bp: np.ndarray


def _model_class_bp() -> np.ndarray:
    """(models, asset classes) weights in basis points."""
    table = np.zeros((len(MODEL_IDS), len(ASSET_CLASSES)), dtype=np.int64)
    for m, model_id in enumerate(MODEL_IDS):
        for symbol, bp in MODELS[model_id].items():
            table[m, _SEC_CLASS[_SEC[symbol]]] += bp
    return table


def _draw_households(config: SandboxConfig) -> _Households:
    rng = _rng(config.seed, "households")
    n = config.households
    aum = np.clip(np.exp(rng.normal(_AUM_MU, _AUM_SIGMA, n)), _AUM_MIN, _AUM_MAX)
    accounts = np.asarray(ACCOUNTS_PER_HOUSEHOLD)[_choice(rng, ACCOUNTS_PER_HOUSEHOLD_P, n)]
    aggregated = (accounts > 1) & (rng.random(n) < 0.25)
    has_targets = aggregated & (rng.random(n) < 0.8)
    risk = _choice(rng, _RISK_LADDER_P, n)

    # Household IPS: the model's asset-class mix, nudged by up to 5 points between equity and
    # bonds; fixed income takes the remainder so the weights sum to exactly 10,000 bp.
    target_bp = _model_class_bp()[risk].copy()
    nudge = rng.choice(np.array([-500, 0, 500]), size=n)
    nudge = np.clip(nudge, -(target_bp[:, _EQUITY] - 1000), target_bp[:, _FIXED_INCOME] - 500)
    target_bp[:, _EQUITY] += nudge
    target_bp[:, _FIXED_INCOME] = 10_000 - target_bp[:, [_EQUITY, _ALTERNATIVES, _CASH_CLASS]].sum(axis=1)

    # Richer households sit in higher brackets, with plenty of exceptions.
    wealth_score = (np.log(aum) - _AUM_MU) / _AUM_SIGMA + rng.normal(0.0, 0.8, n)
    bracket = np.searchsorted(_ORDINARY_P_CUTS, wealth_score)
    ltcg_bp = _LTCG_BP[bracket]
    # In the 35% bracket married couples straddle the 20% capital-gains threshold.
    ltcg_bp = np.where((bracket == 4) & (rng.random(n) < 0.5), 2380, ltcg_bp)
    state_bp = _STATE_BP[_choice(rng, _STATE_P, n)]

    return _Households(
        n=n,
        advisor=rng.integers(0, config.advisor_count, n),
        surname=rng.integers(0, len(SURNAMES), n),
        name_style=_choice(rng, (0.5, 0.35, 0.15), n),
        aum_cents=np.round(aum * 100).astype(np.int64),
        accounts=accounts,
        aggregated=aggregated,
        has_targets=has_targets,
        target_bp=target_bp,
        risk=risk,
        ordinary_bp=_ORDINARY_BP[bracket],
        ltcg_bp=ltcg_bp,
        state_bp=state_bp,
    )


@dataclass
class _Accounts:
    n: int
    household: np.ndarray
    account_type: np.ndarray  # index into ACCOUNT_TYPES
    first_name: np.ndarray
    joint_first_name: np.ndarray  # -1 = individual account
    email_domain: np.ndarray
    custodian: np.ndarray
    discretionary: np.ndarray
    tax_sensitive: np.ndarray
    suspended: np.ndarray
    suspended_reason: np.ndarray
    model: np.ndarray  # index into MODEL_IDS; _NO_MODEL for IPS-only accounts
    has_targets: np.ndarray  # account-scope IPS targets
    target_bp: np.ndarray  # (n, asset classes): what the account is built to (account, household or model targets)
    advisor_override: np.ndarray  # -1 = the household's advisor
    value_cents: np.ndarray
    holding_variant: np.ndarray
    wash_sale_seller: np.ndarray  # taxable account holding VTI at a loss ...
    wash_sale_buyer: np.ndarray  # ... while the household's IRA bought VTSAX within 30 days
    lot_relief: np.ndarray  # index into LOT_RELIEF_METHODS; -1 = empty (the policy default, fifo)


def _draw_accounts(config: SandboxConfig, households: _Households) -> _Accounts:
    rng = _rng(config.seed, "accounts")
    household = np.repeat(np.arange(households.n), households.accounts)
    n = len(household)
    first_of_household = _rank_in_segment(households.accounts) == 0

    account_type = np.where(
        first_of_household,
        _choice(rng, ACCOUNT_TYPE_FIRST_P, n),
        _choice(rng, ACCOUNT_TYPE_OTHER_P, n),
    )
    taxable = account_type == _TYPE["taxable"]
    erisa = account_type == _TYPE["erisa"]
    ira = np.isin(account_type, [_TYPE["traditional_ira"], _TYPE["roth_ira"]])

    # Each account's share of the household's AUM.
    size = rng.gamma(2.0, size=n) * np.array([_ACCOUNT_SIZE_FACTOR[t] for t in ACCOUNT_TYPES])[account_type]
    share = size / np.bincount(household, weights=size, minlength=households.n)[household]
    # No account is under $1,000: a smaller one could not hold the model in whole shares.
    value_cents = np.maximum(100_000, np.floor(households.aum_cents[household] * share)).astype(np.int64)

    # Mostly one custodian per household; some accounts sit elsewhere.
    household_custodian = _choice(rng, CUSTODIAN_P, households.n)
    custodian = np.where(rng.random(n) < 0.10, _choice(rng, CUSTODIAN_P, n), household_custodian[household])

    discretionary = rng.random(n) < 0.40
    # ~15% of all accounts are tax-sensitive; only taxable accounts can be.
    tax_sensitive = taxable & (rng.random(n) < min(1.0, 0.15 * n / max(1, taxable.sum())))
    suspended = rng.random(n) < 0.02
    suspended_reason = np.where(suspended, rng.integers(0, len(SUSPENDED_REASONS), n), -1)

    # Roth IRAs and 529s are long-horizon money: at least balanced, one step above the household.
    model = households.risk[household].copy()
    long_horizon = np.isin(account_type, [_TYPE["roth_ira"], _TYPE["529"]])
    model = np.where(long_horizon, np.maximum(np.minimum(model + 1, len(MODEL_IDS) - 1), _BALANCED), model)

    # Account-level IPS overrides: every ERISA account (its plan bars alternatives, so its IPS
    # targets none) and some others, outside households that are rebalanced as one.
    in_household_targets = households.has_targets[household]
    has_targets = erisa | (~in_household_targets & (rng.random(n) < 0.07))
    model = np.where(has_targets & ~erisa & (rng.random(n) < 0.35), _NO_MODEL, model)
    account_bp = np.zeros((n, len(ASSET_CLASSES)), dtype=np.int64)
    account_bp[:, _EQUITY] = rng.choice(np.array([3500, 4000, 5000, 5500, 6500, 7000, 7500, 8500]), n)
    account_bp[:, _ALTERNATIVES] = np.where(erisa, 0, rng.choice(np.array([0, 0, 300, 500]), n))
    account_bp[:, _CASH_CLASS] = rng.choice(np.array([200, 300, 500]), n)
    account_bp[:, _FIXED_INCOME] = 10_000 - account_bp.sum(axis=1)

    target_bp = np.where(
        has_targets[:, None],
        account_bp,
        np.where(in_household_targets[:, None], households.target_bp[household], _model_class_bp()[np.minimum(model, _NO_MODEL - 1)]),
    )

    n_advisors = config.advisor_count
    advisor_override = np.full(n, -1)
    if n_advisors > 1:
        other = (households.advisor[household] + rng.integers(1, n_advisors, n)) % n_advisors
        advisor_override = np.where(rng.random(n) < 0.03, other, -1)

    # What the account holds in place of the model's symbols (see _HOLDING_VARIANTS).
    draw = rng.random(n)
    holding_variant = np.zeros(n, dtype=np.int8)
    holding_variant[(account_type == _TYPE["401k"]) & (draw < 0.8)] = _SHARE_CLASS_FUNDS
    holding_variant[ira & (draw < 0.25)] = _SHARE_CLASS_FUNDS
    holding_variant[taxable & (draw < 0.08)] = 2
    holding_variant[taxable & (draw >= 0.08) & (draw < 0.18)] = 3

    # Wash-sale set-ups: in some households with a taxable account and an IRA, the taxable
    # account holds VTI with a lot bought at the peak (a harvestable loss) while the IRA
    # bought VTSAX (same fund, another share class: substantially identical) within 30 days.
    first_taxable = _first_in_household(household, taxable & (holding_variant == 0), households.n)
    first_ira = _first_in_household(household, ira, households.n)
    setup = (first_taxable >= 0) & (first_ira >= 0) & (rng.random(households.n) < 0.15)
    wash_sale_seller = np.zeros(n, dtype=bool)
    wash_sale_buyer = np.zeros(n, dtype=bool)
    wash_sale_seller[first_taxable[setup]] = True
    wash_sale_buyer[first_ira[setup]] = True
    holding_variant[wash_sale_buyer] = _SHARE_CLASS_FUNDS

    # A third of taxable accounts are joint ("Maria & David Alvarez").
    first_name = rng.integers(0, len(FIRST_NAMES), n)
    joint_first_name = (first_name + rng.integers(1, len(FIRST_NAMES), n)) % len(FIRST_NAMES)
    joint_first_name = np.where(taxable & (rng.random(n) < 0.3), joint_first_name, -1)

    return _Accounts(
        n=n,
        household=household,
        account_type=account_type,
        first_name=first_name,
        joint_first_name=joint_first_name,
        email_domain=rng.integers(0, len(CLIENT_EMAIL_DOMAINS), n),
        custodian=custodian,
        discretionary=discretionary,
        tax_sensitive=tax_sensitive,
        suspended=suspended,
        suspended_reason=suspended_reason,
        model=model,
        has_targets=has_targets,
        target_bp=target_bp,
        advisor_override=advisor_override,
        value_cents=value_cents,
        holding_variant=holding_variant,
        wash_sale_seller=wash_sale_seller,
        wash_sale_buyer=wash_sale_buyer,
        lot_relief=_draw_lot_relief(config, n),
    )


# Standing lot-relief instructions: most accounts leave it to the policy default (fifo).
LOT_RELIEF_P = {"": 0.60, "fifo": 0.05, "hifo": 0.10, "tax_min": 0.25}
_TAX_MIN = LOT_RELIEF_METHODS.index("tax_min")


def _draw_lot_relief(config: SandboxConfig, n: int) -> np.ndarray:
    # Its own stream, so the rest of the accounts are drawn as before.
    methods = np.array([-1 if m == "" else LOT_RELIEF_METHODS.index(m) for m in LOT_RELIEF_P], dtype=np.int8)
    return methods[_choice(_rng(config.seed, "lot_relief"), LOT_RELIEF_P, n)]


def _first_in_household(household: np.ndarray, mask: np.ndarray, n_households: int) -> np.ndarray:
    """Per household, the first account (index) where mask holds, or -1."""
    first = np.full(n_households, -1)
    accounts = np.flatnonzero(mask)[::-1]  # reversed so the first account is written last
    first[household[accounts]] = accounts
    return first


def _within_class_shares() -> np.ndarray:
    """(models + default sleeve, securities): each security's share of its asset class."""
    shares = np.zeros((len(MODEL_IDS) + 1, _N_SEC))
    for row, model_id in enumerate((*MODEL_IDS, None)):
        bp = MODELS[model_id] if model_id else {}
        for asset_class in ASSET_CLASSES:
            sleeve = {s: w for s, w in bp.items() if SECURITIES[_SEC[s]].asset_class == asset_class}
            # A class the model does not hold (or an IPS-only account) is filled from the default sleeve.
            sleeve = sleeve or DEFAULT_SLEEVES[asset_class]
            total = sum(sleeve.values())
            for symbol, weight in sleeve.items():
                shares[row, _SEC[symbol]] = weight / total
    return shares


@dataclass
class _Positions:
    account: np.ndarray  # int32
    security: np.ndarray  # int16
    units: np.ndarray  # int64 (shares, thousandths, or cents for CASH)
    thin_stock_holder: int


def _draw_positions(config: SandboxConfig, accounts: _Accounts, households: _Households, prices: _Prices) -> _Positions:
    rng = _rng(config.seed, "positions")
    n = accounts.n
    is_class = [(_SEC_CLASS == c) for c in range(len(ASSET_CLASSES))]
    equity, fixed_income = is_class[_EQUITY], is_class[_FIXED_INCOME]

    # Target weight per security: the asset-class target spread over the model's securities.
    weights = accounts.target_bp[:, _SEC_CLASS] / 10_000.0
    weights *= _within_class_shares()[accounts.model]

    for variant, swaps in _HOLDING_VARIANTS.items():
        rows = np.flatnonzero(accounts.holding_variant == variant)
        for held_instead_of, held in swaps.items():
            weights[rows, _SEC[held]] += weights[rows, _SEC[held_instead_of]]
            weights[rows, _SEC[held_instead_of]] = 0.0

    # A fifth of taxable accounts carry a legacy single stock (3-10% of the account) carved
    # out of their equity sleeve.
    legacy = np.flatnonzero((accounts.account_type == _TYPE["taxable"]) & (rng.random(n) < 0.20))
    stock = _LEGACY_STOCKS[rng.integers(0, len(_LEGACY_STOCKS), len(legacy))]
    stock_weight = rng.uniform(0.03, 0.10, len(legacy))
    equity_weight = weights[legacy][:, equity].sum(axis=1)
    keep = equity_weight > 2 * stock_weight
    legacy, stock, stock_weight, equity_weight = legacy[keep], stock[keep], stock_weight[keep], equity_weight[keep]
    weights[np.ix_(legacy, np.flatnonzero(equity))] *= ((equity_weight - stock_weight) / equity_weight)[:, None]
    weights[legacy, stock] += stock_weight

    # Markets moved since the last rebalance: a few percent of noise on every holding, and for
    # about one account in eight a tilt of 4-10 points between equities and bonds, enough to
    # breach most bands.
    weights *= np.exp(rng.normal(0.0, 0.03, weights.shape))
    tilted = np.flatnonzero(rng.random(n) < 0.12)
    tilt = rng.uniform(0.04, 0.10, len(tilted))
    towards_equity = rng.random(len(tilted)) < 0.5
    equity_weight = weights[tilted][:, equity].sum(axis=1)
    bond_weight = weights[tilted][:, fixed_income].sum(axis=1)
    tilt = np.where(towards_equity, np.minimum(tilt, 0.9 * bond_weight), -np.minimum(tilt, 0.9 * equity_weight))
    with np.errstate(divide="ignore", invalid="ignore"):
        equity_scale = np.where(equity_weight > 0, (equity_weight + tilt) / equity_weight, 1.0)
        bond_scale = np.where(bond_weight > 0, (bond_weight - tilt) / bond_weight, 1.0)
    weights[np.ix_(tilted, np.flatnonzero(equity))] *= equity_scale[:, None]
    weights[np.ix_(tilted, np.flatnonzero(fixed_income))] *= bond_scale[:, None]

    # The thinly held stock: 1% of one ordinary account (not suspended, not rebalanced with
    # its household, big enough for a handful of shares).
    ordinary = ~accounts.suspended & ~households.aggregated[accounts.household]
    candidates = np.flatnonzero(ordinary & (accounts.value_cents >= 2_000_000))
    if len(candidates) == 0:
        candidates = np.flatnonzero(ordinary) if ordinary.any() else np.arange(n)
        candidates = candidates[[np.argmax(accounts.value_cents[candidates])]]
    thin_stock_holder = int(candidates[rng.integers(0, len(candidates))])
    weights[thin_stock_holder, _SEC[THIN_STOCK]] = 0.01

    weights /= weights.sum(axis=1, keepdims=True)

    # Whole shares (thousandths for funds) at the pre-shock close, rounded to the nearest unit;
    # what is left is the cash balance. Where rounding up overspent the account, the largest
    # holding gives back enough shares to keep the cash balance at or above zero.
    value = weights * accounts.value_cents[:, None].astype(np.float64)
    del weights
    unit_price_cents = prices.pre_shock_cents / _UNITS_PER_SHARE
    units = np.round(value / unit_price_cents[None, :]).astype(np.int64)
    del value
    units[thin_stock_holder, _SEC[THIN_STOCK]] = max(1, units[thin_stock_holder, _SEC[THIN_STOCK]])
    units[:, _CASH] = 0
    cash = accounts.value_cents - (units * unit_price_cents[None, :]).sum(axis=1)
    for _ in range(_N_SEC):  # a few rounds at most, over all overspent accounts at once
        overspent = np.flatnonzero(cash < 0)
        if len(overspent) == 0:
            break
        largest = np.argmax(units[overspent] * unit_price_cents[None, :], axis=1)
        needed = np.ceil(-cash[overspent] / unit_price_cents[largest]).astype(np.int64)
        given_back = np.minimum(units[overspent, largest], needed)
        units[overspent, largest] -= given_back
        cash[overspent] += given_back * unit_price_cents[largest]
    units[:, _CASH] = np.floor(cash).astype(np.int64)

    # Every account reports its cash balance, even when it is zero.
    held = units > 0
    held[:, _CASH] = True
    account, security = np.nonzero(held)
    return _Positions(
        account=account.astype(np.int32),
        security=security.astype(np.int16),
        units=units[account, security],
        thin_stock_holder=thin_stock_holder,
    )


# Lot opening dates: how a lot came to be.
_OPENED_ANY_TIME, _OPENED_RECENTLY, _OPENED_NEARLY_LONG_TERM, _OPENED_NEAR_PEAK = 0, 1, 2, 3
_OPENED_LONG_AGO, _OPENED_AT_PEAK, _OPENED_FOR_WASH_SALE, _OPENED_BY_REINVESTMENT = 4, 5, 6, 7
# Ordinary lots: opened any time in five years / in the look-back window / nearly a year ago
# (about to turn long-term) / near the peak (now at a loss).
_OPENED_P_KINDS = (_OPENED_ANY_TIME, _OPENED_RECENTLY, _OPENED_NEARLY_LONG_TERM, _OPENED_NEAR_PEAK)
_OPENED_P = (0.72, 0.07, 0.08, 0.13)


@dataclass
class _Lots:
    account: np.ndarray
    security: np.ndarray
    units: np.ndarray
    days_back: np.ndarray  # open_date = as_of - days_back
    cost_cents: np.ndarray
    reinvested: np.ndarray
    # Per position with lots (positions in order, cash left out): its first lot and lot count.
    # Position row p of account a is entry p - a (each account's one cash row comes last).
    position_first_lot: np.ndarray
    position_lot_count: np.ndarray
    # Lots whose cost_cents include a disallowed wash-sale loss the custodian already added
    # (wash_sale_adjusted=true), and that loss in cents.
    adjusted_lots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    adjusted_cents: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _nearly_long_term_days_back(as_of: dt.date) -> np.ndarray:
    """Days back of opening dates that turn long-term in 3..30 days.

    Long-term means held more than one year (IRC §1222): a lot opened on D is long-term from
    the day after D's anniversary. Rolling back to a weekday later takes off at most two days.
    """
    days_back = []
    for days_to_long_term in range(3, 31):
        anniversary = as_of + dt.timedelta(days=days_to_long_term - 1)
        try:
            opened = anniversary.replace(year=anniversary.year - 1)
        except ValueError:  # 29 February
            opened = anniversary.replace(year=anniversary.year - 1, day=28)
        days_back.append((as_of - opened).days)
    return np.array(days_back)


def _month_end_days_back(as_of: dt.date) -> np.ndarray:
    """Days back of the last weekday of each month within the look-back window (dividend dates)."""
    found = []
    year, month = as_of.year, as_of.month
    for _ in range(3):
        first_of_next = dt.date(year + (month == 12), month % 12 + 1, 1)
        month_end = np.busday_offset(np.datetime64(first_of_next - dt.timedelta(days=1)), 0, roll="backward")
        days_back = int((np.datetime64(as_of) - month_end).astype(int))
        if 0 <= days_back <= LOOKBACK_DAYS:
            found.append(days_back)
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return np.array(found)


def _draw_lots(config: SandboxConfig, accounts: _Accounts, positions: _Positions, prices: _Prices) -> _Lots:
    # Lots outnumber accounts 16 to 1, so this part keeps to small integer types and in-place
    # updates: a million accounts make 16 million lots.
    rng = _rng(config.seed, "lots")
    as_of = np.datetime64(config.as_of)
    with_lots = np.flatnonzero(positions.security != _CASH)
    security = positions.security[with_lots]
    account = positions.account[with_lots]
    units = positions.units[with_lots]
    m = len(with_lots)

    # Funds paying monthly dividends often have a small lot from last month's reinvestment.
    reinvests = _REINVESTS_MONTHLY[security] & (rng.random(m) < 0.5) & (units >= 20)
    reinvested_units = np.where(reinvests, np.maximum(1, np.round(units * rng.uniform(0.002, 0.008, m))), 0).astype(np.int64)
    bought_units = units - reinvested_units
    # One to three lots per position, the reinvestment lot included.
    bought_lots = np.minimum(np.array([1, 2, 3])[_choice(rng, (0.45, 0.35, 0.20), m)], bought_units)
    bought_lots = np.maximum(1, np.minimum(bought_lots, 3 - reinvests))
    lot_count = bought_lots + reinvests

    lot_position = np.repeat(np.arange(m, dtype=np.int32), lot_count)
    n_lots = len(lot_position)
    first_lot = _segment_starts(lot_count)
    last_bought = first_lot + bought_lots - 1
    reinvested = np.zeros(n_lots, dtype=bool)
    reinvested[(last_bought + 1)[reinvests]] = True

    # Split the bought units in integer units: one each, the rest by random proportions, any
    # rounding remainder to the last bought lot, so the lots sum exactly to the position.
    proportion = rng.uniform(0.2, 1.0, n_lots)
    proportion[reinvested] = 0.0
    proportion /= np.bincount(lot_position, weights=proportion, minlength=m)[lot_position]
    lot_units = 1 + np.floor((bought_units - bought_lots)[lot_position] * proportion).astype(np.int64)
    del proportion
    lot_units[reinvested] = reinvested_units[reinvests]
    lot_units[last_bought] += bought_units - np.bincount(lot_position[~reinvested], weights=lot_units[~reinvested], minlength=m).astype(np.int64)

    # When each lot was opened.
    lot_security = security[lot_position]
    lot_account = account[lot_position]
    how = np.asarray(_OPENED_P_KINDS, dtype=np.int8)[_choice(rng, _OPENED_P, n_lots)]
    how[_IS_STOCK[lot_security] & (lot_security != _SEC[THIN_STOCK])] = _OPENED_LONG_AGO
    first = np.zeros(n_lots, dtype=bool)
    first[first_lot] = True
    how[first & (lot_security == _SEC["VTI"]) & accounts.wash_sale_seller[lot_account]] = _OPENED_AT_PEAK
    how[first & (lot_security == _SEC["VTSAX"]) & accounts.wash_sale_buyer[lot_account]] = _OPENED_FOR_WASH_SALE
    how[reinvested] = _OPENED_BY_REINVESTMENT
    del first

    month_ends = _month_end_days_back(config.as_of)
    draws: dict[int, Callable[[int], np.ndarray]] = {
        _OPENED_ANY_TIME: lambda k: rng.integers(LOOKBACK_DAYS + 1, 5 * 365 + 1, k),
        # Drawn two days short of the window so the roll back to a weekday stays inside it.
        _OPENED_RECENTLY: lambda k: rng.integers(0, LOOKBACK_DAYS - 1, k),
        _OPENED_NEARLY_LONG_TERM: lambda k: _nearly_long_term_days_back(config.as_of)[rng.integers(0, 28, k)],
        _OPENED_NEAR_PEAK: lambda k: prices.peak_days_back + rng.integers(-20, 21, k),
        _OPENED_LONG_AGO: lambda k: rng.integers(_LEGACY_LOT_MIN_DAYS, 5 * 365 + 1, k),
        _OPENED_AT_PEAK: lambda k: np.full(k, prices.peak_days_back),
        # IRC §1091: a purchase within 30 days before the sale.
        _OPENED_FOR_WASH_SALE: lambda k: rng.integers(2, 27, k),
        _OPENED_BY_REINVESTMENT: lambda k: month_ends[rng.integers(0, len(month_ends), k)],
    }
    days_back = np.empty(n_lots, dtype=np.int32)
    for opened, draw in draws.items():
        chosen = how == opened
        days_back[chosen] = draw(int(chosen.sum()))
    days_back = _roll_to_trading_day(as_of, days_back).astype(np.int32)

    # Cost basis: the close of that day, give or take the intraday range; funds trade at NAV.
    price_cents = prices.history_cents[lot_security, days_back].astype(np.float64)
    at_close = _IS_FUND_AT_NAV[lot_security] | (how == _OPENED_AT_PEAK)
    del how
    price_cents[~at_close] *= np.exp(rng.normal(0.0, 0.003, int((~at_close).sum())))
    cost_cents = np.round(lot_units * np.maximum(1.0, np.round(price_cents)) / _UNITS_PER_SHARE[lot_security]).astype(np.int64)
    del price_cents, at_close

    # Oldest lot first within each position (lot ids follow opening order). The positions are
    # already in order, so a stable sort of this key is nearly free.
    order = np.argsort(lot_position.astype(np.int64) * 4096 + (4095 - days_back), kind="stable")
    return _Lots(
        account=lot_account[order],
        security=lot_security[order],
        units=lot_units[order],
        days_back=days_back[order],
        cost_cents=cost_cents[order],
        reinvested=reinvested[order],
        # The sort keeps each position's lots together where they were.
        position_first_lot=first_lot,
        position_lot_count=lot_count.astype(np.int8),
    )


# --------------------------------------------------------------------------------------------
# Past wash sales
# --------------------------------------------------------------------------------------------

# Scenarios of each kind per 200 households (at least one of each kind where the book allows).
WASH_SALES_PER_200 = {
    "ira_replacement": 2,
    "same_account": 2,
    "custodian_adjusted": 1,
    "partial_replacement": 1,
    "clean_harvest": 1,
    "outside_window": 1,
}
# What the scenarios sell and buy: equity and alternatives ETFs, whole shares at whole-cent
# closes (so every amount is exact), whose history peaks >= 13% above today's close.
_WASH_SALE_SECURITY = np.array([s.security_type == "etf" and s.asset_class in ("equity", "alternatives") for s in SECURITIES])
WASH_SALE_WINDOW_DAYS = 30  # IRC §1091: 30 days before or after the sale


@dataclass
class _WashSales:
    scenarios: list[WashSaleScenario]
    households: np.ndarray  # bool per household: holds a scenario (no defect, no other sell there)
    # The scenario sells, for transactions.csv.
    account: np.ndarray
    security: np.ndarray
    days_back: np.ndarray
    units: np.ndarray
    price_cents: np.ndarray
    cost_cents: np.ndarray
    acquired_days_back: np.ndarray


def _plan_wash_sales(
    config: SandboxConfig,
    accounts: _Accounts,
    households: _Households,
    positions: _Positions,
    lots: _Lots,
    prices: _Prices,
) -> _WashSales:
    """Choose the households of the past loss sales and rewrite the lots they bought back.

    Each scenario sells, 1-30 days ago, a lot its taxable account bought at the market peak
    (a short-term loss; those shares are gone, so no lot shows them). A replacement purchase is
    the newest lot of a position it already holds, moved to its new opening date and priced at
    that day's close, so lots still sum to positions and the cash balance is untouched. A
    household is taken only when no other purchase of the wash group falls in the look-back
    window, so the engine must find exactly the planted wash sales. One scenario per household.
    """
    rng = _rng(config.seed, "wash_sales")
    as_of = np.datetime64(config.as_of)
    history = prices.history_cents
    peak = prices.peak_days_back
    n_groups = len(_WASH_GROUPS)
    wanted = {kind: max(1, round(households.n * per / 200)) for kind, per in WASH_SALES_PER_200.items()}

    # Households that may hold one: not a prospective set-up (those bought VTSAX in the IRA
    # recently), not the thin stock's holder (its `non_positive_price` defect holds it out).
    eligible = np.ones(households.n, dtype=bool)
    eligible[accounts.household[accounts.wash_sale_seller | accounts.wash_sale_buyer]] = False
    eligible[accounts.household[positions.thin_stock_holder]] = False
    # Looked for in a random pool of households, in pool order (enough to fill every kind).
    pool = rng.permutation(np.flatnonzero(eligible))[: 4 * sum(wanted.values())]
    rank = np.full(households.n, -1, dtype=np.int64)
    rank[pool] = np.arange(len(pool))

    # Candidate positions: scenario ETFs held in pool households, in pool order (a household's
    # candidates together; its accounts are consecutive).
    account_count = households.accounts[pool]
    pool_accounts = np.repeat(_segment_starts(households.accounts)[pool], account_count) + _rank_in_segment(account_count)
    # Each account's positions end with its cash row.
    cash_row = np.flatnonzero(positions.security == _CASH)
    first_position = np.where(pool_accounts > 0, cash_row[pool_accounts - 1] + 1, 0)
    position_count = cash_row[pool_accounts] + 1 - first_position
    p = np.repeat(first_position, position_count) + _rank_in_segment(position_count)
    p = p[_WASH_SALE_SECURITY[positions.security[p]]]
    account = positions.account[p].astype(np.int64)
    security = positions.security[p].astype(np.int64)
    household = accounts.household[account]
    key = household * n_groups + _SEC_GROUP[security]
    newest = lots.position_first_lot[p - account] + lots.position_lot_count[p - account] - 1
    newest_units = lots.units[newest]
    newest_recent = (lots.days_back[newest] <= LOOKBACK_DAYS).astype(np.int64)
    # Purchases (lots opened in the transaction window) of each household's wash groups.
    recent = np.flatnonzero(lots.days_back <= LOOKBACK_DAYS)
    recent_household = accounts.household[lots.account[recent]]
    recent_key = (recent_household * n_groups + _SEC_GROUP[lots.security[recent]])[rank[recent_household] >= 0]
    keys, counts = np.unique(np.append(recent_key, -1), return_counts=True)  # -1: never empty
    found = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    group_purchases = np.where(keys[found] == key, counts[found], 0)
    # ... other than the newest lot of this position (which a scenario may rewrite).
    other_purchases = group_purchases - newest_recent

    account_type = accounts.account_type[account]
    active = ~accounts.suspended[account]
    taxable = active & (account_type == _TYPE["taxable"])
    ira = active & np.isin(account_type, [_TYPE["traditional_ira"], _TYPE["roth_ira"]])

    used = np.zeros(households.n, dtype=bool)

    def pick(kind: str, candidate_household: np.ndarray, valid: np.ndarray, limit: int | None = None) -> np.ndarray:
        """Indices of the chosen candidates (which come in pool order, each household's together):
        in the first unused households, each one's valid candidate of highest random priority."""
        index = np.flatnonzero(valid & ~used[candidate_household])
        if len(index) == 0:
            return index
        chosen_household = candidate_household[index]
        start = np.flatnonzero(np.concatenate([[True], chosen_household[1:] != chosen_household[:-1]]))
        priority = rng.random(len(index))
        best = np.maximum.reduceat(priority, start)
        chosen = index[priority == np.repeat(best, np.diff(np.append(start, len(index))))]
        chosen = chosen[: wanted[kind] if limit is None else limit]
        used[candidate_household[chosen]] = True
        return chosen

    def sale_day(low: np.ndarray | int, high: int, size: int) -> np.ndarray:
        return _roll_to_trading_day(as_of, rng.integers(low, high, size))

    rows: list[tuple] = []
    sells: list[tuple[np.ndarray, ...]] = []
    adjusted_lots: list[np.ndarray] = []
    adjusted_cents: list[np.ndarray] = []

    def record(kind, seller, sale, sold, replacement, bought_on, bought, disallowed_shares):
        """Apply the chosen scenarios: their sells, rewritten replacement lots and report rows."""
        sec = security[seller]
        loss_per_share = history[sec, peak] - history[sec, sale]
        sells.append((account[seller], sec, sale, sold, history[sec, sale], sold * history[sec, peak], np.full(len(seller), peak)))
        if replacement is not None:
            lot = newest[replacement]
            lots.days_back[lot] = bought_on
            lots.cost_cents[lot] = bought * history[security[replacement], bought_on]
            if kind == "custodian_adjusted":
                adjustment = disallowed_shares * loss_per_share
                lots.cost_cents[lot] += adjustment
                adjusted_lots.append(lot)
                adjusted_cents.append(adjustment)
        none = [None] * len(seller)
        rows.extend(
            zip(
                [kind] * len(seller),
                household[seller].tolist(),
                account[seller].tolist(),
                sec.tolist(),
                sale.tolist(),
                sold.tolist(),
                (sold * loss_per_share).tolist(),
                none if replacement is None else account[replacement].tolist(),
                none if replacement is None else security[replacement].tolist(),
                none if replacement is None else bought_on.tolist(),
                none if replacement is None else bought.tolist(),
                (disallowed_shares * loss_per_share).tolist(),
            )
        )

    # (a) A taxable loss sale; 1-25 days later the household's IRA buys the same wash group
    # (VTI/VTI, IVV/VOO, ...), at least as many shares and dollars as were sold.
    seller_index, ira_index = np.flatnonzero(taxable), np.flatnonzero(ira)
    pairs = (
        pl.DataFrame({"s": seller_index, "key": key[seller_index]})
        .join(pl.DataFrame({"r": ira_index, "key": key[ira_index]}), on="key")
        .sort("s", "r")
    )
    s, r = pairs["s"].to_numpy(), pairs["r"].to_numpy()
    gap = rng.integers(3, 26, len(s))
    sale = sale_day(gap, 29, len(s))
    bought_on = _roll_to_trading_day(as_of, sale - gap)
    bought = newest_units[r]
    # At most the shares and dollars bought back (and no more than the account still holds).
    sold = np.minimum.reduce([bought, bought * history[security[r], bought_on] // history[security[s], sale], positions.units[p[s]]])
    valid = (other_purchases[r] == 0) & (sold >= 1) & (history[security[s], peak] > history[security[s], sale])
    # One of them, where the book has it, buys another symbol of the group (IVV sold, VOO bought).
    cross = pick("ira_replacement", household[s], valid & (security[s] != security[r]), limit=1)
    chosen = np.concatenate([cross, pick("ira_replacement", household[s], valid, limit=wanted["ira_replacement"] - len(cross))])
    record("ira_replacement", s[chosen], sale[chosen], sold[chosen], r[chosen], bought_on[chosen], bought[chosen], sold[chosen])

    # (b, c, d) Bought back in the same account 10-25 days after the sale.
    c = np.flatnonzero(taxable)
    for kind in ("same_account", "custodian_adjusted", "partial_replacement"):
        gap = rng.integers(12, 26, len(c))
        sale = sale_day(gap, 29, len(c))
        bought_on = _roll_to_trading_day(as_of, sale - gap)
        bought = newest_units[c]
        # Partial: 3 bought back for every 4 sold (75 of 100).
        sold = (4 * bought + 2) // 3 if kind == "partial_replacement" else bought
        valid = (other_purchases[c] == 0) & (history[security[c], peak] > history[security[c], sale])
        if kind == "partial_replacement":
            valid &= bought >= 3
        chosen = pick(kind, household[c], valid)
        record(kind, c[chosen], sale[chosen], sold[chosen], c[chosen], bought_on[chosen], bought[chosen], bought[chosen])

    # (e) Not wash sales: no purchase of the group in the window at all, or the only one 31-38
    # days before the sale (both inside the 60 days of transactions.csv).
    share = rng.uniform(0.25, 1.0, len(c))
    sold = np.maximum(1, np.round(positions.units[p[c]] * share)).astype(np.int64)
    sale = sale_day(1, 29, len(c))
    valid = (group_purchases[c] == 0) & (history[security[c], peak] > history[security[c], sale])
    chosen = pick("clean_harvest", household[c], valid)
    zero = np.zeros(len(chosen), dtype=np.int64)
    record("clean_harvest", c[chosen], sale[chosen], sold[chosen], None, None, None, zero)

    sale = sale_day(3, 19, len(c))
    bought_on = _roll_to_trading_day(as_of, sale + rng.integers(WASH_SALE_WINDOW_DAYS + 1, 37, len(c)))
    valid = (other_purchases[c] == 0) & (history[security[c], peak] > history[security[c], sale])
    chosen = pick("outside_window", household[c], valid)
    zero = np.zeros(len(chosen), dtype=np.int64)
    record("outside_window", c[chosen], sale[chosen], sold[chosen], c[chosen], bought_on[chosen], newest_units[c[chosen]], zero)

    columns = [np.concatenate(column).astype(np.int64) for column in zip(*sells)]
    # The harvesting accounts have a standing order to relieve the lowest-tax lots first.
    accounts.lot_relief[columns[0]] = _TAX_MIN
    if adjusted_lots:
        lots.adjusted_lots = np.concatenate(adjusted_lots)
        lots.adjusted_cents = np.concatenate(adjusted_cents)
    def day(days_back: int) -> dt.date:
        return config.as_of - dt.timedelta(days=days_back)

    scenarios = [
        WashSaleScenario(
            kind=kind,
            household_id=f"HH-{h + 1:06d}",
            account_id=account_id(a),
            symbol=SYMBOLS[sec],
            sale_date=day(sale),
            quantity=Decimal(sold),
            loss=Decimal(loss).scaleb(-2),
            replacement_account_id=None if r_account is None else account_id(r_account),
            replacement_symbol=None if r_sec is None else SYMBOLS[r_sec],
            replacement_date=None if bought_on is None else day(bought_on),
            replacement_quantity=None if bought is None else Decimal(bought),
            disallowed_loss=Decimal(disallowed).scaleb(-2),
        )
        for kind, h, a, sec, sale, sold, loss, r_account, r_sec, bought_on, bought, disallowed in rows
    ]
    return _WashSales(scenarios, used, *columns)


_TRANSACTION_TYPE = {"buy": 0, "sell": 1, "reinvest": 2, "transfer_in": 3, "transfer_out": 4}


@dataclass
class _Transactions:
    account: np.ndarray
    security: np.ndarray
    days_back: np.ndarray
    kind: np.ndarray  # index into _TRANSACTION_TYPE
    units: np.ndarray
    price_micros: np.ndarray  # dollars x 1e6
    cost_cents: np.ndarray  # sells: basis of the shares sold; -1 = empty
    acquired_days_back: np.ndarray  # sells: when the shares sold were bought; -1 = empty


def _draw_transactions(
    config: SandboxConfig,
    accounts: _Accounts,
    positions: _Positions,
    lots: _Lots,
    prices: _Prices,
    wash_sales: _WashSales,
) -> _Transactions:
    rng = _rng(config.seed, "transactions")
    as_of = np.datetime64(config.as_of)

    # The purchase behind every lot opened in the look-back window, at the lot's price
    # (cost basis / quantity; before any wash-sale loss the custodian added to the basis).
    recent = np.flatnonzero(lots.days_back <= LOOKBACK_DAYS)
    units_per_share = _UNITS_PER_SHARE[lots.security[recent]]
    paid_cents = lots.cost_cents[recent]
    paid_cents[np.searchsorted(recent, lots.adjusted_lots)] -= lots.adjusted_cents
    numerator = paid_cents * units_per_share * 10_000
    bought_price = (2 * numerator + lots.units[recent]) // (2 * lots.units[recent])  # rounded half up
    bought_kind = np.where(lots.reinvested[recent], _TRANSACTION_TYPE["reinvest"], _TRANSACTION_TYPE["buy"])

    # Some fund positions were trimmed in the window: those shares are gone, so no lot shows
    # them. (Single stocks are legacy holdings, which their owners keep; households with a
    # planted wash-sale scenario sell nothing else.)
    trimmed = (positions.security != _CASH) & ~_IS_STOCK[positions.security]
    holdings = np.flatnonzero(trimmed & (rng.random(len(positions.account)) < 0.03))
    holdings = holdings[~wash_sales.households[accounts.household[positions.account[holdings]]]]
    sold_security = positions.security[holdings].astype(np.int64)
    sold_units = np.maximum(1, np.round(positions.units[holdings] * rng.uniform(0.05, 0.30, len(holdings)))).astype(np.int64)
    sold_days_back = _roll_to_trading_day(as_of, rng.integers(0, LOOKBACK_DAYS - 1, len(holdings)))
    sold_price_cents = prices.history_cents[sold_security, sold_days_back]
    sold_account = positions.account[holdings]
    # First in, first out: the shares sold were bought before every lot still held (and
    # before the window, so there is no buy row for them), at that day's close.
    sells = _rng(config.seed, "sells")
    oldest_lot = lots.days_back[lots.position_first_lot[holdings - sold_account]]
    acquired = np.maximum(np.maximum(oldest_lot, sold_days_back), LOOKBACK_DAYS) + sells.integers(1, 366, len(holdings))
    acquired = _roll_to_trading_day(as_of, np.minimum(acquired, HISTORY_DAYS - 3))
    ups = _UNITS_PER_SHARE[sold_security]
    sold_cost = np.maximum(1, (2 * sold_units * prices.history_cents[sold_security, acquired] + ups) // (2 * ups))
    # No accidental wash sales: a trim at a loss with a purchase of its wash group in the
    # household within 30 days (a lot opened then) did not happen.
    keep = ~_accidental_wash_sales(accounts, lots, sold_account, sold_security, sold_days_back, sold_units * sold_price_cents < sold_cost * ups)
    holdings, sold_security, sold_units, sold_days_back = holdings[keep], sold_security[keep], sold_units[keep], sold_days_back[keep]
    sold_price_cents, sold_cost, acquired = sold_price_cents[keep], sold_cost[keep], acquired[keep]

    # Client deposits that are still sitting in cash.
    cash = np.flatnonzero((positions.security == _CASH) & (positions.units >= 100_000) & (rng.random(len(positions.account)) < 0.03))
    deposit = np.minimum(positions.units[cash], np.round(rng.uniform(1_000, 25_000, len(cash))) * 100).astype(np.int64)
    deposit_days_back = _roll_to_trading_day(as_of, rng.integers(0, LOOKBACK_DAYS - 1, len(cash)))

    w = wash_sales
    n_bought, n_sold, n_planted, n_cash = len(recent), len(holdings), len(w.account), len(cash)
    account = np.concatenate([lots.account[recent], positions.account[holdings], w.account, positions.account[cash]])
    security = np.concatenate([lots.security[recent], sold_security, w.security, positions.security[cash]]).astype(np.int16)
    days_back = np.concatenate([lots.days_back[recent], sold_days_back, w.days_back, deposit_days_back])
    kind = np.concatenate(
        [bought_kind, np.full(n_sold + n_planted, _TRANSACTION_TYPE["sell"]), np.full(n_cash, _TRANSACTION_TYPE["transfer_in"])]
    )
    units = np.concatenate([lots.units[recent], sold_units, w.units, deposit])
    price_micros = np.concatenate([bought_price, sold_price_cents * 10_000, w.price_cents * 10_000, np.full(n_cash, 1_000_000)])
    cost_cents = np.concatenate([np.full(n_bought, -1), sold_cost, w.cost_cents, np.full(n_cash, -1)])
    acquired_days_back = np.concatenate([np.full(n_bought, -1), acquired, w.acquired_days_back, np.full(n_cash, -1)])

    order = np.lexsort((security, -days_back, account))
    return _Transactions(
        account[order],
        security[order],
        days_back[order],
        kind[order].astype(np.int8),
        units[order],
        price_micros[order],
        cost_cents[order],
        acquired_days_back[order].astype(np.int32),
    )


def _accidental_wash_sales(
    accounts: _Accounts,
    lots: _Lots,
    account: np.ndarray,
    security: np.ndarray,
    days_back: np.ndarray,
    at_a_loss: np.ndarray,
) -> np.ndarray:
    """Which of these sells are at a loss with a lot of their wash group opened in the household
    within 30 days before or after them (the lot's purchase is a buy or reinvest row)."""
    loss = np.flatnonzero(at_a_loss)
    n_groups = len(_WASH_GROUPS)
    sell_household = accounts.household[account[loss]]
    sell_key = sell_household.astype(np.int64) * n_groups + _SEC_GROUP[security[loss]]
    bought = np.flatnonzero(lots.days_back <= days_back.max(initial=0) + WASH_SALE_WINDOW_DAYS)
    # Only lots of households with a loss sale matter.
    selling = np.zeros(int(accounts.household.max(initial=0)) + 1, dtype=bool)
    selling[sell_household] = True
    bought_household = accounts.household[lots.account[bought]]
    near = selling[bought_household]
    bought, bought_household = bought[near], bought_household[near]
    bought_key = bought_household.astype(np.int64) * n_groups + _SEC_GROUP[lots.security[bought]]
    matches = (
        pl.DataFrame({"sell": loss, "key": sell_key, "sold": days_back[loss]})
        .join(pl.DataFrame({"key": bought_key, "bought": lots.days_back[bought]}), on="key")
        .filter((pl.col("sold") - pl.col("bought")).abs() <= WASH_SALE_WINDOW_DAYS)
    )
    accidental = np.zeros(len(account), dtype=bool)
    accidental[matches["sell"].to_numpy()] = True
    return accidental


_RESTRICTION_KINDS = ("no_buy_symbol", "no_sell_symbol", "no_asset_class", "min_cash_weight")


def _draw_restrictions(config: SandboxConfig, accounts: _Accounts, positions: _Positions) -> pl.DataFrame:
    rng = _rng(config.seed, "restrictions")
    n = accounts.n
    # The ERISA plans here bar alternatives in their plan documents, which bind the fiduciary
    # (ERISA §404(a)(1)(D)).
    erisa = np.flatnonzero(accounts.account_type == _TYPE["erisa"])
    # ESG-minded clients who will not add to fossil-fuel holdings.
    esg = np.flatnonzero(rng.random(n) < 0.04)
    # Clients who will not sell a legacy, low-basis single stock.
    legacy = np.flatnonzero(_IS_STOCK[positions.security] & (positions.security != _SEC[THIN_STOCK]))
    legacy = legacy[rng.random(len(legacy)) < 0.4]
    # A cash floor for clients who draw on the account.
    cash_floor = np.flatnonzero(rng.random(n) < 0.05)
    floor_text = np.array(["0.02", "0.03", "0.05"])[rng.integers(0, 3, len(cash_floor))]

    frame = pl.DataFrame(
        {
            "account": np.concatenate([esg, positions.account[legacy], erisa, cash_floor]).astype(np.int64),
            "kind": np.concatenate([np.full(len(esg), 0), np.full(len(legacy), 1), np.full(len(erisa), 2), np.full(len(cash_floor), 3)]),
            "value": np.concatenate(
                [
                    np.full(len(esg), "XOM"),
                    np.array(SYMBOLS)[positions.security[legacy]],
                    np.full(len(erisa), "alternatives"),
                    floor_text,
                ]
            ).astype(str),
        }
    )
    return frame.sort("account", "kind", "value", maintain_order=True)


# --------------------------------------------------------------------------------------------
# Rendering: compact arrays -> the contract's text
# --------------------------------------------------------------------------------------------


def _prefixed_id(prefix: str, index: pl.Expr, width: int) -> pl.Expr:
    return pl.concat_str([pl.lit(prefix), (index + 1).cast(pl.String).str.zfill(width)])


def _account_id(index: pl.Expr) -> pl.Expr:
    return _prefixed_id("ACC-", index, 7)


def _household_id(index: pl.Expr) -> pl.Expr:
    return _prefixed_id("HH-", index, 6)


def _advisor_id(index: pl.Expr) -> pl.Expr:
    return _prefixed_id("ADV-", index, 4)


def account_id(index: int) -> str:
    """The account id of the index-th account (0-based), as written in the feed."""
    return f"ACC-{index + 1:07d}"


def _fixed_point(units: pl.Expr, places: int) -> pl.Expr:
    """Non-negative integer units of 10^-places as decimal text (no exponent, no separators)."""
    if places == 0:
        return units.cast(pl.String)
    scale = 10**places
    return pl.concat_str([(units // scale).cast(pl.String), pl.lit("."), (units % scale).cast(pl.String).str.zfill(places)])


def _quantity(units: pl.Expr, decimals: pl.Expr) -> pl.Expr:
    return (
        pl.when(decimals == 0)
        .then(_fixed_point(units, 0))
        .when(decimals == 2)
        .then(_fixed_point(units, 2))
        .otherwise(_fixed_point(units, 3))
    )


def _symbol(security: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(SYMBOLS)).gather(security)


def _open_date(as_of: dt.date, days_back: pl.Expr) -> pl.Expr:
    return pl.lit(as_of) - pl.duration(days=days_back)


def _pick_text(options: tuple[str, ...], index: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(options)).gather(index)


def _users_frame(config: SandboxConfig) -> pl.DataFrame:
    rng = _rng(config.seed, "users")
    n = config.advisor_count
    advisors = pl.DataFrame(
        {"i": np.arange(n), "first": rng.integers(0, len(ADVISOR_FIRST_NAMES), n), "last": rng.integers(0, len(SURNAMES), n)}
    ).select(
        user_id=_advisor_id(pl.col("i")),
        first=_pick_text(ADVISOR_FIRST_NAMES, pl.col("first")),
        last=_pick_text(SURNAMES, pl.col("last")),
        role=pl.lit("advisor"),
    )
    staff = pl.DataFrame(
        {
            "user_id": [u for u, _, _ in STAFF],
            "first": [name.split()[0] for _, name, _ in STAFF],
            "last": [name.split()[1] for _, name, _ in STAFF],
            "role": [r for _, _, r in STAFF],
        }
    )
    users = pl.concat([advisors, staff])
    # first.last@firm; namesakes get a number so every login is unique.
    local = pl.concat_str([pl.col("first"), pl.lit("."), pl.col("last")]).str.to_lowercase().str.replace_all("[^a-z.]", "")
    users = users.with_columns(local=local).with_columns(seen=pl.col("local").cum_count().over("local"))
    return users.select(
        "user_id",
        name=pl.concat_str([pl.col("first"), pl.lit(" "), pl.col("last")]),
        email=pl.concat_str(
            [pl.col("local"), pl.when(pl.col("seen") > 1).then(pl.col("seen").cast(pl.String)).otherwise(pl.lit("")), pl.lit("@" + FIRM_EMAIL_DOMAIN)]
        ),
        role="role",
        # Team routing: the client associate works on the first advisor's clients.
        team_of=pl.when(pl.col("user_id") == ASSOCIATE[0]).then(pl.lit(_FIRST_ADVISOR)).otherwise(pl.lit(None, pl.String)),
        # No team has asked for copies of its advisor's alerts (empty: not set, i.e. off).
        team_alerts=pl.lit(None, pl.String),
    )


def _households_frame(households: _Households) -> pl.DataFrame:
    surname = _pick_text(SURNAMES, pl.col("surname"))
    name = pl.when(pl.col("style") == 0).then(pl.concat_str([pl.lit("The "), surname, pl.lit(" Family")]))
    name = name.when(pl.col("style") == 1).then(pl.concat_str([surname, pl.lit(" Household")]))
    name = name.otherwise(pl.concat_str([surname, pl.lit(" Family Trust")]))
    return pl.DataFrame(
        {
            "i": np.arange(households.n),
            "surname": households.surname,
            "style": households.name_style,
            "advisor": households.advisor,
            "aggregate_rebalancing": households.aggregated,
            "ordinary": households.ordinary_bp,
            "ltcg": households.ltcg_bp,
            "state": households.state_bp,
        }
    ).select(
        household_id=_household_id(pl.col("i")),
        name=name,
        advisor_id=_advisor_id(pl.col("advisor")),
        aggregate_rebalancing="aggregate_rebalancing",
        federal_ordinary_rate=_fixed_point(pl.col("ordinary"), 4),
        federal_ltcg_rate=_fixed_point(pl.col("ltcg"), 4),
        state_rate=_fixed_point(pl.col("state"), 4),
        # Every tenth household asked for detailed confirmations; the rest use the firm default.
        confirmation_style=pl.when(pl.col("i") % 10 == 3).then(pl.lit("detailed")).otherwise(pl.lit(None, pl.String)),
    )


def _accounts_frame(accounts: _Accounts, households: _Households) -> pl.DataFrame:
    surname = _pick_text(SURNAMES, pl.col("surname"))
    first = _pick_text(FIRST_NAMES, pl.col("first"))
    joint = _pick_text(FIRST_NAMES, pl.col("joint").clip(0))
    client_name = (
        pl.when(pl.col("joint") >= 0)
        .then(pl.concat_str([first, pl.lit(" & "), joint, pl.lit(" "), surname]))
        .otherwise(pl.concat_str([first, pl.lit(" "), surname]))
    )
    email = pl.concat_str(
        [
            pl.concat_str([first, pl.lit("."), surname]).str.to_lowercase().str.replace_all("[^a-z.]", ""),
            pl.lit("@"),
            _pick_text(CLIENT_EMAIL_DOMAINS, pl.col("domain")),
        ]
    )
    return pl.DataFrame(
        {
            "i": np.arange(accounts.n),
            "household": accounts.household,
            "surname": households.surname[accounts.household],
            "first": accounts.first_name,
            "joint": accounts.joint_first_name,
            "domain": accounts.email_domain,
            "custodian": accounts.custodian,
            "type": accounts.account_type,
            "discretionary": accounts.discretionary,
            "tax_sensitive": accounts.tax_sensitive,
            "suspended": accounts.suspended,
            "reason": accounts.suspended_reason,
            "model": accounts.model,
            "advisor": accounts.advisor_override,
            "lot_relief": accounts.lot_relief,
        }
    ).select(
        account_id=_account_id(pl.col("i")),
        household_id=_household_id(pl.col("household")),
        client_name=client_name,
        client_email=email,
        custodian=_pick_text(CUSTODIANS, pl.col("custodian")),
        account_type=_pick_text(ACCOUNT_TYPES, pl.col("type")),
        discretionary="discretionary",
        tax_sensitive="tax_sensitive",
        suspended="suspended",
        suspended_reason=pl.when(pl.col("reason") >= 0).then(_pick_text(SUSPENDED_REASONS, pl.col("reason").clip(0))),
        model_id=pl.when(pl.col("model") < _NO_MODEL).then(_pick_text(MODEL_IDS, pl.col("model").clip(0, _NO_MODEL - 1))),
        advisor_id=pl.when(pl.col("advisor") >= 0).then(_advisor_id(pl.col("advisor").clip(0))),
        lot_relief_method=pl.when(pl.col("lot_relief") >= 0).then(_pick_text(LOT_RELIEF_METHODS, pl.col("lot_relief").clip(0))),
    )


def _models_frame() -> pl.DataFrame:
    rows = [(model_id, symbol, bp) for model_id in MODEL_IDS for symbol, bp in MODELS[model_id].items()]
    return pl.DataFrame(rows, schema=["model_id", "symbol", "bp"], orient="row").select(
        "model_id", "symbol", weight=_fixed_point(pl.col("bp"), 4)
    )


def _ips_targets_frame(accounts: _Accounts, households: _Households) -> pl.DataFrame:
    def scope_rows(scope: str, ids: pl.Expr, index: np.ndarray, target_bp: np.ndarray) -> pl.DataFrame:
        frame = pl.DataFrame({"i": np.repeat(index, len(ASSET_CLASSES)), "class": np.tile(np.arange(len(ASSET_CLASSES)), len(index)), "bp": target_bp.reshape(-1)})
        # Classes the IPS leaves at zero are simply not listed.
        return frame.filter(pl.col("bp") > 0).select(
            scope=pl.lit(scope), scope_id=ids, asset_class=_pick_text(ASSET_CLASSES, pl.col("class")), target_weight=_fixed_point(pl.col("bp"), 4)
        )

    household_index = np.flatnonzero(households.has_targets)
    account_index = np.flatnonzero(accounts.has_targets)
    return pl.concat(
        [
            scope_rows("household", _household_id(pl.col("i")), household_index, households.target_bp[household_index]),
            scope_rows("account", _account_id(pl.col("i")), account_index, accounts.target_bp[account_index]),
        ]
    )


def _securities_frame() -> pl.DataFrame:
    rows = []
    for i, s in enumerate(SECURITIES):
        # Made-up CUSIPs ("SBX" issuer prefix) with a genuine check digit; none for cash.
        base = f"SBX{i + 1:03d}10"
        rows.append(
            {
                "symbol": s.symbol,
                "cusip": None if s.symbol == CASH_SYMBOL else base + cusip_check_digit(base),
                "description": s.description,
                "asset_class": s.asset_class,
                "security_type": s.security_type,
                "wash_group": s.wash_group,
                "tlh_substitute": s.tlh_substitute or None,
                "fractional": s.fractional,
            }
        )
    return pl.DataFrame(rows, schema={c: (pl.Boolean if c == "fractional" else pl.String) for c in FEED_FILES["securities"].column_names})


def _prices_frame(prices: _Prices) -> pl.DataFrame:
    return pl.DataFrame({"symbol": list(SYMBOLS), "close": [_decimal_text(c) for c in prices.as_of_close]})


def _positions_table(positions: _Positions) -> pl.DataFrame:
    return pl.DataFrame({"account": positions.account, "security": positions.security, "units": positions.units})


def _render_positions(part: pl.DataFrame) -> pl.DataFrame:
    decimals = pl.lit(pl.Series(_SEC_DECIMALS)).gather(pl.col("security"))
    return part.select(
        account_id=_account_id(pl.col("account")),
        symbol=_symbol(pl.col("security")),
        quantity=_quantity(pl.col("units"), decimals),
    )


def _lots_table(lots: _Lots) -> pl.DataFrame:
    adjusted = np.zeros(len(lots.account), dtype=bool)
    adjusted[lots.adjusted_lots] = True
    return pl.DataFrame(
        {
            "account": lots.account,
            "security": lots.security,
            "units": lots.units,
            "days_back": lots.days_back,
            "cost_cents": lots.cost_cents,
            "adjusted": adjusted,
        }
    ).with_row_index("lot")


def _render_lots(as_of: dt.date) -> Callable[[pl.DataFrame], pl.DataFrame]:
    def render(part: pl.DataFrame) -> pl.DataFrame:
        decimals = pl.lit(pl.Series(_SEC_DECIMALS)).gather(pl.col("security"))
        return part.select(
            account_id=_account_id(pl.col("account")),
            symbol=_symbol(pl.col("security")),
            lot_id=_prefixed_id("LOT-", pl.col("lot").cast(pl.Int64), 9),
            open_date=_open_date(as_of, pl.col("days_back")),
            quantity=_quantity(pl.col("units"), decimals),
            cost_basis=_fixed_point(pl.col("cost_cents"), 2),
            # Empty unless the custodian already added a wash-sale loss to the basis.
            wash_sale_adjusted=pl.when(pl.col("adjusted")).then(pl.lit("true")),
        )

    return render


def _transactions_table(transactions: _Transactions) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account": transactions.account,
            "security": transactions.security,
            "days_back": transactions.days_back,
            "kind": transactions.kind,
            "units": transactions.units,
            "price_micros": transactions.price_micros,
            "cost_cents": transactions.cost_cents,
            "acquired": transactions.acquired_days_back,
        }
    )


def _render_transactions(as_of: dt.date) -> Callable[[pl.DataFrame], pl.DataFrame]:
    types = tuple(_TRANSACTION_TYPE)

    def render(part: pl.DataFrame) -> pl.DataFrame:
        decimals = pl.lit(pl.Series(_SEC_DECIMALS)).gather(pl.col("security"))
        micros = pl.col("price_micros")
        # Whole-cent prices print with 2 places; fund prices derived from the cost basis with 6.
        price = pl.when(micros % 10_000 == 0).then(_fixed_point(micros // 10_000, 2)).otherwise(_fixed_point(micros, 6))
        return part.select(
            account_id=_account_id(pl.col("account")),
            symbol=_symbol(pl.col("security")),
            trade_date=_open_date(as_of, pl.col("days_back")),
            type=_pick_text(types, pl.col("kind")),
            quantity=_quantity(pl.col("units"), decimals),
            price=price,
            # Sells only: the basis of the shares sold and when they were bought.
            cost_basis=pl.when(pl.col("cost_cents") >= 0).then(_fixed_point(pl.col("cost_cents"), 2)),
            acquired_date=pl.when(pl.col("acquired") >= 0).then(_open_date(as_of, pl.col("acquired"))),
        )

    return render


def _render_restrictions(part: pl.DataFrame) -> pl.DataFrame:
    return part.select(account_id=_account_id(pl.col("account")), kind=_pick_text(_RESTRICTION_KINDS, pl.col("kind")), value="value")


# --------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------


@dataclass
class _FileEdits:
    """Planted rows for one file: cells replaced in place, and rows added at the end."""

    replace: dict[int, dict[str, str]] = field(default_factory=dict)
    append: list[dict[str, str]] = field(default_factory=list)


DEFECT_KINDS = (
    "negative_quantity",
    "unknown_symbol",
    "non_positive_price",
    "lots_mismatch",
    "targets_not_summing",
    "duplicate_key",
    "bad_decimal",
    "bad_date",
    "bad_enum",
)


def _plan_defects(
    config: SandboxConfig,
    accounts: _Accounts,
    households: _Households,
    positions: _Positions,
    lots: _Lots,
    wash_sales: _WashSales,
) -> tuple[list[InjectedDefect], dict[str, _FileEdits]]:
    rng = _rng(config.seed, "defects")
    edits: dict[str, _FileEdits] = {name: _FileEdits() for name in FEED_FILES}
    defects: list[InjectedDefect] = []

    def plant(file: str, account: int, column: str, kind: str) -> None:
        defects.append(InjectedDefect(file=f"{file}.csv", account_id=account_id(account), column=column, kind=kind))

    # Each defect gets its own ordinary account: not suspended (it would be held out anyway)
    # and not rebalanced with its household (so holding it out touches no other account).
    first_position = np.searchsorted(positions.account, np.arange(accounts.n))
    position_count = np.bincount(positions.account, minlength=accounts.n)
    lot_count = np.bincount(lots.account, minlength=accounts.n)
    cash_units = positions.units[first_position + position_count - 1]  # CASH is the last security
    eligible = ~accounts.suspended & ~households.aggregated[accounts.household] & (lot_count > 0)
    # Keep the planted wash sales whole: no defect holds out an account of their households.
    eligible &= ~wash_sales.households[accounts.household]
    eligible[positions.thin_stock_holder] = False
    candidates = rng.permutation(np.flatnonzero(eligible))
    taken: set[int] = set()

    def take(condition: Callable[[int], bool] = lambda account: True) -> int:
        for account in candidates:
            account = int(account)
            if account not in taken and condition(account):
                taken.add(account)
                return account
        raise ValueError(
            f"defects=True needs {len(DEFECT_KINDS)} ordinary accounts with holdings; "
            f"a book of {config.households} households does not have them (use more households)"
        )

    def first_holding(account: int) -> int:
        """Row of the account's first position other than cash."""
        return int(first_position[account])

    def first_lot(account: int) -> int:
        return int(np.searchsorted(lots.account, account))

    def position_row(row: int) -> dict[str, str]:
        """One positions.csv row exactly as written."""
        one = pl.DataFrame({"account": positions.account[row : row + 1], "security": positions.security[row : row + 1], "units": positions.units[row : row + 1]})
        return _render_positions(one).row(0, named=True)

    # positions.csv: a quantity below zero.
    account = take()
    row = first_holding(account)
    edits["positions"].replace[row] = {"quantity": "-" + position_row(row)["quantity"]}
    plant("positions", account, "quantity", "negative_quantity")

    # positions.csv: a holding in a symbol the security master does not know.
    account = take()
    edits["positions"].append.append({"account_id": account_id(account), "symbol": UNKNOWN_SYMBOL, "quantity": "25"})
    plant("positions", account, "symbol", "unknown_symbol")

    # prices.csv: a zero close for the thinly held stock; only its one holder is affected.
    edits["prices"].replace[_SEC[THIN_STOCK]] = {"close": "0.00"}
    plant("prices", positions.thin_stock_holder, "close", "non_positive_price")

    # lots.csv: one lot a unit larger than it is, so the lots overstate the position.
    account = take()
    row = first_lot(account)
    quantity = Decimal(int(lots.units[row]) + 1).scaleb(-int(_SEC_DECIMALS[lots.security[row]]))
    edits["lots"].replace[row] = {"quantity": _decimal_text(quantity)}
    plant("lots", account, "quantity", "lots_mismatch")

    # ips_targets.csv: an account-level IPS whose weights add up to 95%.
    account = take(lambda a: not accounts.has_targets[a] and accounts.model[a] < _NO_MODEL)
    for asset_class, weight in (("equity", "0.6000"), ("fixed_income", "0.3300"), ("cash", "0.0200")):
        edits["ips_targets"].append.append({"scope": "account", "scope_id": account_id(account), "asset_class": asset_class, "target_weight": weight})
    plant("ips_targets", account, "target_weight", "targets_not_summing")

    # positions.csv: the same holding reported twice.
    account = take()
    edits["positions"].append.append(position_row(first_holding(account)))
    plant("positions", account, "account_id,symbol", "duplicate_key")

    # positions.csv: a thousands separator in a quantity ("12,345.67"): the cash balance,
    # so the quantity itself is right and only its spelling is wrong.
    account = take(lambda a: cash_units[a] >= 100_000)
    row = int(first_position[account] + position_count[account] - 1)
    dollars, cents = divmod(int(positions.units[row]), 100)
    edits["positions"].replace[row] = {"quantity": f"{dollars:,}.{cents:02d}"}
    plant("positions", account, "quantity", "bad_decimal")

    # lots.csv: an opening date that is no date.
    account = take()
    edits["lots"].replace[first_lot(account)] = {"open_date": "2024-13-45"}
    plant("lots", account, "open_date", "bad_date")

    # restrictions.csv: a restriction kind the contract does not have.
    account = take()
    edits["restrictions"].append.append({"account_id": account_id(account), "kind": "no_trade_ever", "value": "all"})
    plant("restrictions", account, "kind", "bad_enum")

    return defects, edits


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_CHUNK_ROWS = 1_000_000


def _write_feed_file(
    feed_dir: Path,
    name: str,
    table: pl.DataFrame,
    render: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    edits: _FileEdits | None = None,
) -> int:
    """Write one contract file, rendering `table` chunk by chunk; returns the data rows written.

    Rendering in chunks keeps the text of the big files (lots: ~20M rows for 1M accounts) out
    of memory. The file is written beside its final name and moved into place, so a reader
    never sees half a file.
    """
    columns = FEED_FILES[name].column_names
    edits = edits or _FileEdits()
    path = feed_dir / FEED_FILES[name].filename
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write((",".join(columns) + "\n").encode())
        for start in range(0, table.height, _CHUNK_ROWS):
            part = table.slice(start, _CHUNK_ROWS)
            text = (render(part) if render else part).select(columns)
            for row, cells in edits.replace.items():
                if start <= row < start + part.height:
                    for column, value in cells.items():
                        cell = text.get_column(column).cast(pl.String).scatter(row - start, value)
                        text = text.with_columns(cell)
            text.write_csv(out, include_header=False)
        if edits.append:
            pl.DataFrame(edits.append, schema={c: pl.String for c in columns}).write_csv(out, include_header=False)
    os.replace(partial, path)
    return table.height + len(edits.append)


def generate_feed(config: SandboxConfig, out_root: Path) -> SandboxReport:
    """Generate the book described by `config` and write out_root/<as_of>/*.csv."""
    as_of = np.datetime64(config.as_of)
    prices = _draw_prices(config, as_of)
    households = _draw_households(config)
    accounts = _draw_accounts(config, households)
    positions = _draw_positions(config, accounts, households, prices)
    lots = _draw_lots(config, accounts, positions, prices)
    wash_sales = _plan_wash_sales(config, accounts, households, positions, lots, prices)
    transactions = _draw_transactions(config, accounts, positions, lots, prices, wash_sales)
    restrictions = _draw_restrictions(config, accounts, positions)

    defects: list[InjectedDefect] = []
    edits: dict[str, _FileEdits] = {name: _FileEdits() for name in FEED_FILES}
    if config.defects:
        defects, edits = _plan_defects(config, accounts, households, positions, lots, wash_sales)

    feed_dir = Path(out_root) / config.as_of.isoformat()
    feed_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, table: pl.DataFrame, render: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> int:
        return _write_feed_file(feed_dir, name, table, render, edits[name])

    write("users", _users_frame(config))
    write("households", _households_frame(households))
    write("accounts", _accounts_frame(accounts, households))
    write("models", _models_frame())
    write("ips_targets", _ips_targets_frame(accounts, households))
    write("restrictions", restrictions, _render_restrictions)
    write("securities", _securities_frame())
    write("prices", _prices_frame(prices))
    positions_written = write("positions", _positions_table(positions), _render_positions)
    lots_written = write("lots", _lots_table(lots), _render_lots(config.as_of))
    transactions_written = write("transactions", _transactions_table(transactions), _render_transactions(config.as_of))

    return SandboxReport(
        feed_dir=feed_dir,
        households=households.n,
        accounts=accounts.n,
        positions=positions_written,
        lots=lots_written,
        transactions=transactions_written,
        defects=defects,
        wash_sales=wash_sales.scenarios,
    )
