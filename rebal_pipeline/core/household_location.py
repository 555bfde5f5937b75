"""Household asset location: per-account asset-class targets for aggregated households.

A household with `aggregate_rebalancing` must reach its asset-class mix as a whole, but WHERE
each class sits across its member accounts is free, and money cannot move between accounts.
`locate_households` decides every account's class targets for all such households with ONE
sparse linear program (block-diagonal across households, built from numpy index arrays, no
per-household Python loop). Its output feeds `trade_sizing.size_trades` as `class_targets`.

It runs three pure steps, each testable on its own:
    build_lp(frames, policy) -> LocationLP     the up-front checks, then the cost vector, the
                                               sparse rows, the bounds and an LPIndex saying
                                               which household / account / class each
                                               variable and row is
    solve_lp(LocationLP) -> LPSolution         one HiGHS solve, and each household's status
                                               (infeasible, turnover cap, solver failed)
    unpack_targets(LocationLP, LPSolution)     the per-account class targets and statuses

LP per household h (all households stacked), per (account a, class c) cell, with b, s >= 0 the
dollars bought / sold and x = current + b - s the dollars held after rebalancing:
    sum_c x[a,c] = market_value[a]                        (no money moves between accounts)
    sum_a x[a,c] = target_weight[h,c] * household value   (the household hits its targets)
    s[a,c] <= current[a,c]                                (so x >= 0)
    b[a,c] = s[a,c] = 0 for a barred (account, class)     (frozen, as the sizing core does)
    sum_{a,c} s[a,c] <= max_turnover_fraction * household value   (policy cap, when set)
    minimise  sum location_penalty[type(a), c] * x[a,c]
            + gain_penalty * max(gain_ratio[a,c], 0) * s[a,c]   (taxable accounts only)
            + turnover_penalty * (b[a,c] + s[a,c])
The classes of a household are those in its targets plus those any member account holds; each
member account gets a row for every one of them (zero target rows included, so the sizer sells
what the household no longer wants in that account).

Units: each household block is solved in fractions of its own value (dollars / household value);
dividing a block's rows and objective by a positive constant does not change its optimum, and it
keeps HiGHS's absolute tolerances (1e-7) meaningful for $10k and $100M households alike.

Turnover cap (policy `household_location.max_turnover_fraction`): a household whose targets need
more sales than the cap moves as far toward them as the cap allows (the class rows' elastic slack
below absorbs the rest; account rows' slack costs more, so every account keeps its value) and its
status says so: "turnover cap: reaching the household's targets would sell more than 25% of its
value ...; $X is sold now and the rest waits for a later rebalance (<class> would be $Y over its
target; ...)". The caller shows that status in the recommendation's `unresolved`.

No gain realised for nothing in a taxable account. The LP works on classes: a taxable cell it
leaves unchanged has b = s = 0 (both cost turnover). But the sizing core then splits each class
target over the model's securities, so a taxable account whose equity is all VTI, under a model
of VTI + VXUS, would sell VTI (realising its gain) to buy VXUS although its class mix is
unchanged — the $4.6K of gains of issue 14. `hold_taxable_classes` (run on the located targets,
before sizing) gives the sizer, for each class of a taxable household account, security weights that keep what is held:
a class the LP leaves or reduces keeps its securities in their current proportions (a reduction
is sold cheapest-tax first by the sizer's rule 3t), and a class the LP increases keeps every
holding and spreads only the increase over the model's securities of the class. Drift of
securities inside a class is thus never traded in a taxable account of an aggregated household;
harvesting losses is the tax engine's separate pass.

Infeasibility (design choice): every equality row gets a pair of elastic slack variables with a
large cost M, so the stacked LP is always feasible and one solve suffices. M is chosen above any
possible dual value of a block (10 × (cells' largest |cost| + 1) × (rows in the largest
household + 1); a block's duals are bounded by the cost of a path through its rows), so by exact
penalty theory a household whose targets are reachable gets zero slack, and a household with
slack above `_SLACK_TOL` (a fraction of its value) is unreachable: it is reported with a
plain-words reason (which class misses its target and by how much) and gets its CURRENT mix as
target, never a wrong answer. This avoids both a per-household fallback loop and a partial
pre-check (a per-class capacity check alone cannot catch joint, Hall-type infeasibilities).
Households with bad inputs (no targets, targets not summing to 1, non-positive value, negative
holdings, market_value disagreeing with the class values) are checked up front, kept out of the
LP and reported the same way. If the solver itself fails, every LP household gets the solver's
message and its current mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.optimize import linprog

from rebal_pipeline.core.frames import conform

STATUS_OPTIMAL = "optimal"
# The status of a household the turnover cap held back (it moves part of the way).
STATUS_TURNOVER_CAP = "turnover cap"
# Account rows' elastic slack costs this many times the class rows' (see the LP).
_ACCOUNT_SLACK_WEIGHT = 100.0

# A household whose elastic slack exceeds this fraction of its value cannot reach its targets.
_SLACK_TOL = 1e-6
# Targets must sum to 1 within this (then they are renormalised to exactly 1).
_TARGET_SUM_TOL = 1e-6
# market_value may differ from the sum of the account's class values by at most this many dollars.
_VALUE_TOL = 0.01

# Default asset-location penalties, in dollars of cost per dollar held (0.02 = 2 cents per $).
# Reasoning: tax-inefficient assets (fixed_income pays ordinary-income coupons; alternatives are
# mostly REITs with non-qualified dividends) are penalised in taxable accounts and belong in
# tax-deferred accounts (traditional IRA / 401k / ERISA plans) where their income is sheltered.
# Tax-efficient equities (qualified dividends, deferred long-term gains, step-up at death) belong
# in taxable; holding them in tax-deferred accounts turns their capital gains into ordinary
# income, hence a small penalty there. Roth and 529 accounts are tax-free forever, so they should
# hold the highest-expected-growth assets (equities); bonds there waste the tax-free growth.
# Cash costs nothing anywhere. Pairs not listed (e.g. unknown account types) cost 0.
DEFAULT_LOCATION_PENALTY: dict[tuple[str, str], float] = {
    ("taxable", "fixed_income"): 0.02,
    ("taxable", "alternatives"): 0.02,
    ("taxable", "equity"): 0.0,
    ("taxable", "cash"): 0.0,
    **{
        (t, c): p
        for t in ("traditional_ira", "401k", "erisa")
        for c, p in (
            ("equity", 0.01),
            ("fixed_income", 0.0),
            ("alternatives", 0.0),
            ("cash", 0.0),
        )
    },
    **{
        (t, c): p
        for t in ("roth_ira", "529")
        for c, p in (
            ("equity", 0.0),
            ("fixed_income", 0.015),
            ("alternatives", 0.015),
            ("cash", 0.0),
        )
    },
}


@dataclass(frozen=True)
class LocationPolicy:
    # (account_type, asset_class) -> cost per $ held there.
    location_penalty: dict[tuple[str, str], float] = field(
        default_factory=lambda: dict(DEFAULT_LOCATION_PENALTY)
    )
    gain_penalty: float = (
        1.0  # cost per $ of unrealised gain realised by selling in a taxable account
    )
    turnover_penalty: float = 0.01  # cost per $ bought or sold in any account
    # Policy cap (drift_policy.yaml household_location.max_turnover_fraction): a household's
    # asset-class sales in one rebalance, summed over its accounts, are at most this fraction of
    # its value (the optimiser's moves; a tax-advantaged account's switch between securities of
    # one class, made by the sizer to follow the model, is not counted). None: no cap.
    max_turnover_fraction: float | None = None


OUTPUT_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    "household_id": pl.String(),
    "asset_class": pl.String(),
    "target_weight": pl.Float64(),
    "target_value": pl.Float64(),
    "status": pl.String(),
}

_INPUTS: dict[str, dict[str, pl.DataType]] = {
    "accounts": {
        "household_id": pl.String(),
        "account_id": pl.String(),
        "account_type": pl.String(),
        "market_value": pl.Float64(),
    },
    "current": {
        "account_id": pl.String(),
        "asset_class": pl.String(),
        "market_value": pl.Float64(),
    },
    "gains": {
        "account_id": pl.String(),
        "asset_class": pl.String(),
        "unrealised_gain_ratio": pl.Float64(),
    },
    "targets": {
        "household_id": pl.String(),
        "asset_class": pl.String(),
        "target_weight": pl.Float64(),
    },
    "barred": {"account_id": pl.String(), "asset_class": pl.String()},
}


def _frame(df: pl.DataFrame, name: str) -> pl.DataFrame:
    """An input conformed to its schema and in one canonical row order (every column sorted):
    with the order-keeping unique/group_by below, the LP, its sums and so its solution are the
    same bit for bit whatever order the rows came in, and on every run (issue #15: without it
    float sums in hash order gave 1e-10 differences run to run, enough to move a cent)."""
    conformed = conform(df, _INPUTS[name], name)
    return conformed.sort(conformed.columns, nulls_last=True) if conformed.width else conformed


def _money(col: str) -> pl.Expr:
    return pl.format("${}", pl.col(col).round(2))


@dataclass(frozen=True)
class LPIndex:
    """What each LP variable and row stands for (build → solve → unpack).

    Variables, in this order: b (one per cell: dollars bought), s (one per cell: sold), then a
    (+, −) elastic slack pair per row. Cell i is row i of `cells`; b_i is variable i, s_i is
    variable n + i. Rows: one per account (row r is `accounts` row r), then one per class (row
    n_acc + k is `classes` row k). All values are fractions of the household's value.
    """

    # One row per (account, class) of the households in the LP, in variable order; columns
    # include household_id, account_id, asset_class, market_value, hh_value, cur (dollars held).
    cells: pl.DataFrame
    # household_id, account_id of each account row, in row order.
    accounts: pl.DataFrame
    # household_id, asset_class of each class row, in row order.
    classes: pl.DataFrame
    # household_id, hh_value of each household in the LP, in the order of the turnover-cap rows.
    households: pl.DataFrame
    # Each cell's rows: its account's row, its class's row (n_acc + k), its household's turnover
    # cap row (the row of `households`).
    acc_row: np.ndarray
    cls_row: np.ndarray
    hh_row: np.ndarray
    # Each cell's current holding, in fractions of its household's value.
    cur: np.ndarray

    @property
    def n(self) -> int:
        return self.cells.height

    @property
    def n_acc(self) -> int:
        return self.accounts.height

    @property
    def m(self) -> int:
        return self.accounts.height + self.classes.height

    def bought(self, z: np.ndarray) -> np.ndarray:
        return z[: self.n]

    def sold(self, z: np.ndarray) -> np.ndarray:
        return z[self.n : 2 * self.n]

    def slack(self, z: np.ndarray) -> np.ndarray:
        """Per row, + : the row's left side is short of its target; − : over it."""
        n, m = self.n, self.m
        return z[2 * n : 2 * n + m] - z[2 * n + m :]


@dataclass(frozen=True)
class LocationLP:
    """The stacked LP of every household that passed the up-front checks (scipy linprog form:
    minimise c·z subject to a_ub·z ≤ b_ub, a_eq·z = b_eq, bounds[:, 0] ≤ z ≤ bounds[:, 1]),
    plus the cells of the households kept out of it with their reason."""

    c: np.ndarray
    a_eq: sp.csr_array | None
    b_eq: np.ndarray | None
    bounds: np.ndarray | None
    # The turnover cap (one row per household), None when the policy sets no cap.
    a_ub: sp.csr_array | None
    b_ub: np.ndarray | None
    max_turnover_fraction: float | None
    index: LPIndex
    # The cells (columns as in `cells`, less the row numbers) of the households kept out of the
    # LP by the up-front checks, each with its household's reason.
    not_located: pl.DataFrame


@dataclass(frozen=True)
class LPSolution:
    """The solver's answer: `z` the solution vector (None when the solver failed or nothing was
    solved), and per household that is not plainly optimal its reason (`household_status`:
    household_id, lp_reason)."""

    z: np.ndarray | None
    status: int
    message: str
    household_status: pl.DataFrame


_HOUSEHOLD_STATUS_SCHEMA = {"household_id": pl.String(), "lp_reason": pl.String()}


def locate_households(
    accounts: pl.DataFrame,
    current: pl.DataFrame,
    gains: pl.DataFrame,
    targets: pl.DataFrame,
    barred: pl.DataFrame,
    policy: LocationPolicy = LocationPolicy(),
) -> pl.DataFrame:
    """Per-account class targets for aggregated households (one LP). See the module docstring.

    Returns account_id, household_id, asset_class, target_weight (of the account's market value,
    sums to 1 per account with positive value), target_value, status ("optimal" or a reason).
    """
    lp = build_lp(accounts, current, gains, targets, barred, policy)
    return unpack_targets(lp, solve_lp(lp))


def build_lp(
    accounts: pl.DataFrame,
    current: pl.DataFrame,
    gains: pl.DataFrame,
    targets: pl.DataFrame,
    barred: pl.DataFrame,
    policy: LocationPolicy = LocationPolicy(),
) -> LocationLP:
    """Step 1: the input frames → the stacked LP of the module docstring (households with bad
    inputs are checked up front and kept out of it, with their reason)."""
    accounts = _frame(accounts, "accounts").unique(["account_id"], keep="first", maintain_order=True)
    targets = (
        _frame(targets, "targets")
        .group_by(["household_id", "asset_class"], maintain_order=True)
        .agg(pl.col("target_weight").sum())
    )
    cells, hh_classes = _cells(accounts, current, gains, targets, barred, policy)
    hh_tsum = targets.group_by("household_id", maintain_order=True).agg(
        pl.col("target_weight").sum().alias("tsum")
    )
    reasons = _screen(accounts, cells, hh_tsum)
    cells = cells.join(reasons, on="household_id", how="left")
    ok = cells.filter(pl.col("reason").is_null())
    not_located = cells.filter(pl.col("reason").is_not_null())
    ok_accounts = accounts.join(
        ok.select("household_id").unique(maintain_order=True), on="household_id", how="semi"
    ).sort(["household_id", "account_id"])
    ok_classes = hh_classes.join(
        ok.select("household_id").unique(maintain_order=True), on="household_id", how="semi"
    ).sort(["household_id", "asset_class"])
    households = (
        ok.select("household_id").unique(maintain_order=True).sort("household_id")
        .join(reasons.select("household_id", "hh_value"), on="household_id", how="left")
    )
    n_acc = ok_accounts.height
    ok = (
        ok.join(
            ok_accounts.select("account_id").with_row_index("acc_row"),
            on="account_id",
            how="left",
        )
        .join(
            ok_classes.with_row_index("cls_row"),
            on=["household_id", "asset_class"],
            how="left",
        )
        .sort(["household_id", "account_id", "asset_class"])
    )
    hh_row = ok.select(pl.col("household_id").rank("dense").cast(pl.Int64) - 1).to_series().to_numpy()
    index = LPIndex(
        cells=ok,
        accounts=ok_accounts.select("household_id", "account_id"),
        classes=ok_classes.select("household_id", "asset_class"),
        households=households,
        acc_row=ok["acc_row"].to_numpy().astype(np.int64),
        cls_row=ok["cls_row"].to_numpy().astype(np.int64) + n_acc,
        hh_row=hh_row,
        cur=ok["cur"].to_numpy() / ok["hh_value"].to_numpy(),  # fractions of the household's value
    )
    if not ok.height:
        return LocationLP(c=np.zeros(0), a_eq=None, b_eq=None, bounds=None, a_ub=None, b_ub=None,
                          max_turnover_fraction=policy.max_turnover_fraction, index=index,
                          not_located=not_located)

    # Row right-hand sides: account rows (market value − current) and class rows
    # (target × household value − current), both in fractions of the household's value.
    acc_hv = ok_accounts.join(
        reasons.select("household_id", "hh_value"), on="household_id", how="left"
    )
    cls_t = ok_classes.join(
        targets, on=["household_id", "asset_class"], how="left"
    ).join(hh_tsum, on="household_id", how="left")
    c, a_eq, b_eq, bounds = _equality_rows(
        index,
        acc_rhs=acc_hv["market_value"].to_numpy() / acc_hv["hh_value"].to_numpy(),
        cls_rhs=(cls_t["target_weight"].fill_null(0.0) / cls_t["tsum"]).to_numpy(),  # renormalised
        policy=policy,
    )
    # Turnover cap: Σ s over a household's cells ≤ cap (already in fractions of its value;
    # an account's buys equal its sales, so this caps one-way turnover).
    cap = policy.max_turnover_fraction
    a_ub = b_ub = None
    if cap is not None:
        n, n_hh = index.n, index.households.height
        a_ub = sp.csr_array(
            (np.ones(n), (hh_row, n + np.arange(n))), shape=(n_hh, 2 * n + 2 * index.m)
        )
        b_ub = np.full(n_hh, float(cap))
    return LocationLP(c=c, a_eq=a_eq, b_eq=b_eq, bounds=bounds, a_ub=a_ub, b_ub=b_ub,
                      max_turnover_fraction=cap, index=index, not_located=not_located)


def _cells(
    accounts: pl.DataFrame,
    current: pl.DataFrame,
    gains: pl.DataFrame,
    targets: pl.DataFrame,
    barred: pl.DataFrame,
    policy: LocationPolicy,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per (member account, household class) with what the LP needs of it (cur, gain,
    barred, target_weight, loc), sorted by household, account, class; and the households'
    classes (household_id, asset_class)."""
    current = (
        _frame(current, "current")
        .group_by(["account_id", "asset_class"], maintain_order=True)
        .agg(pl.col("market_value").sum().alias("cur"))
    )
    gains = _frame(gains, "gains").unique(["account_id", "asset_class"], keep="first", maintain_order=True)
    barred = (
        _frame(barred, "barred").unique(maintain_order=True).with_columns(pl.lit(True).alias("barred"))
    )
    cur_hh = current.join(
        accounts.select("account_id", "household_id"), on="account_id", how="inner"
    )
    # The household's classes: its targets plus whatever any member account holds.
    hh_classes = (
        pl.concat(
            [
                targets.select("household_id", "asset_class"),
                cur_hh.filter(pl.col("cur") != 0).select("household_id", "asset_class"),
            ]
        )
        .unique(maintain_order=True)
        .join(accounts.select("household_id").unique(maintain_order=True), on="household_id", how="semi")
    )
    loc = pl.DataFrame(
        {
            "account_type": [k[0] for k in policy.location_penalty],
            "asset_class": [k[1] for k in policy.location_penalty],
            "loc": [float(v) for v in policy.location_penalty.values()],
        },
        schema={
            "account_type": pl.String(),
            "asset_class": pl.String(),
            "loc": pl.Float64(),
        },
    )
    cells = (
        accounts.join(hh_classes, on="household_id", how="inner")
        .join(current, on=["account_id", "asset_class"], how="left")
        .join(gains, on=["account_id", "asset_class"], how="left")
        .join(barred, on=["account_id", "asset_class"], how="left")
        .join(targets, on=["household_id", "asset_class"], how="left")
        .join(loc, on=["account_type", "asset_class"], how="left")
        .with_columns(
            pl.col("cur").fill_null(0.0),
            pl.col("barred").fill_null(False),
            pl.col("target_weight").fill_null(0.0),
            pl.col("loc").fill_null(0.0),
            pl.when(pl.col("account_type") == "taxable")
            .then(pl.col("unrealised_gain_ratio").fill_null(0.0).clip(lower_bound=0.0))
            .otherwise(0.0)
            .alias("gain"),
        )
        .sort(["household_id", "account_id", "asset_class"])
    )
    return cells, hh_classes


def _screen(accounts: pl.DataFrame, cells: pl.DataFrame, hh_tsum: pl.DataFrame) -> pl.DataFrame:
    """The up-front checks of what makes a household unsolvable regardless of the LP: per
    household its value (hh_value), target sum (tsum) and reason (null: it enters the LP)."""
    acc_sum = cells.group_by("account_id", maintain_order=True).agg(
        pl.col("cur").sum().alias("cur_sum"), (pl.col("cur") < 0).any().alias("neg")
    )
    acc_chk = accounts.join(acc_sum, on="account_id", how="left").with_columns(
        pl.col("cur_sum").fill_null(0.0), pl.col("neg").fill_null(False)
    )
    return (
        acc_chk.with_columns(
            pl.when(pl.col("market_value") < 0)
            .then(
                pl.format(
                    "account {} has a negative market value", pl.col("account_id")
                )
            )
            .when(pl.col("neg"))
            .then(
                pl.format(
                    "account {} holds a negative value in some asset class",
                    pl.col("account_id"),
                )
            )
            .when((pl.col("market_value") - pl.col("cur_sum")).abs() > _VALUE_TOL)
            .then(
                pl.format(
                    "account {} market_value {} differs from the sum of its class values {}",
                    pl.col("account_id"),
                    _money("market_value"),
                    _money("cur_sum"),
                )
            )
            .alias("reason")
        )
        .group_by("household_id", maintain_order=True)
        .agg(
            pl.col("reason").drop_nulls().sort().first(),
            pl.col("market_value").sum().alias("hh_value"),
        )
        .join(hh_tsum, on="household_id", how="left")
        .with_columns(
            pl.when(pl.col("tsum").is_null())
            .then(pl.lit("household has no asset-class targets"))
            .when((pl.col("tsum") - 1.0).abs() > _TARGET_SUM_TOL)
            .then(
                pl.format("household targets sum to {}, not 1", pl.col("tsum").round(6))
            )
            .when(pl.col("hh_value") <= 0)
            .then(pl.lit("household has no positive market value"))
            .otherwise(pl.col("reason"))
            .alias("reason")
        )
        .select("household_id", "hh_value", "tsum", "reason")
    )


def _equality_rows(
    index: LPIndex,
    acc_rhs: np.ndarray,
    cls_rhs: np.ndarray,
    policy: LocationPolicy,
) -> tuple[np.ndarray, sp.csr_array, np.ndarray, np.ndarray]:
    """The cost vector, the equality rows (account and class rows with their elastic slack) and
    the variables' bounds. acc_rhs / cls_rhs: the account and class rows' targets (fractions of
    the household's value), before what the cells already hold is taken off."""
    ok, cur, n, m, n_acc = index.cells, index.cur, index.n, index.m, index.n_acc
    acc_row, cls_row = index.acc_row, index.cls_row
    n_cls = m - n_acc
    is_barred = ok["barred"].to_numpy()
    locp = ok["loc"].to_numpy()
    gain = ok["gain"].to_numpy()
    tp, gp = float(policy.turnover_penalty), float(policy.gain_penalty)

    rhs = np.concatenate([acc_rhs, cls_rhs])
    rhs -= np.bincount(acc_row, weights=cur, minlength=m)
    rhs -= np.bincount(cls_row, weights=cur, minlength=m)

    # Variables: b (n), s (n), then a (+, −) elastic slack pair per row.
    cost_b = locp + tp
    cost_s = -locp + gp * gain + tp
    max_cost = float(max(np.abs(cost_b).max(), np.abs(cost_s).max()))
    rows_per_hh = (
        index.accounts.group_by("household_id", maintain_order=True).len()["len"].max()
        + index.classes.group_by("household_id", maintain_order=True).len()["len"].max()
    )
    big_m = 10.0 * (max_cost + 1.0) * (rows_per_hh + 1)
    # Account rows' slack (money appearing in one account and leaving another) costs more than
    # class rows' slack, so a household held back by the turnover cap misses a class target
    # (reported) rather than an account's value (a mix the sizer could not trade to).
    slack_cost = np.concatenate([np.full(n_acc, _ACCOUNT_SLACK_WEIGHT * big_m), np.full(n_cls, big_m)])
    c = np.concatenate([cost_b, cost_s, slack_cost, slack_cost])

    cells_idx = np.arange(n)
    rows = np.concatenate(
        [acc_row, cls_row, acc_row, cls_row, np.arange(m), np.arange(m)]
    )
    cols = np.concatenate(
        [
            cells_idx,
            cells_idx,
            n + cells_idx,
            n + cells_idx,
            2 * n + np.arange(m),
            2 * n + m + np.arange(m),
        ]
    )
    vals = np.concatenate(
        [np.ones(2 * n), -np.ones(2 * n), np.ones(m), -np.ones(m)]
    )
    a_eq = sp.csr_array((vals, (rows, cols)), shape=(m, 2 * n + 2 * m))

    ub = np.concatenate(
        [
            np.where(is_barred, 0.0, np.inf),
            # A barred cell is frozen both ways: the sizing core neither buys nor sells a
            # class barred by an ERISA plan (it is flagged for compliance review instead).
            np.where(is_barred, 0.0, np.maximum(cur, 0.0)),
            np.full(2 * m, np.inf),
        ]
    )
    bounds = np.column_stack([np.zeros_like(ub), ub])
    return c, a_eq, rhs, bounds


def solve_lp(lp: LocationLP) -> LPSolution:
    """Step 2: one HiGHS solve of the stacked LP, and each household's status from it: a
    household with elastic slack cannot reach its targets (or is held back by the turnover cap)
    and says why; if the solver fails, every LP household gets the solver's message."""
    index = lp.index
    if not index.n:
        return LPSolution(None, 0, "nothing to solve", pl.DataFrame(schema=_HOUSEHOLD_STATUS_SCHEMA))
    res = linprog(lp.c, A_ub=lp.a_ub, b_ub=lp.b_ub, A_eq=lp.a_eq, b_eq=lp.b_eq,
                  bounds=lp.bounds, method="highs")
    if res.status != 0:
        failed = (
            index.classes["household_id"].unique(maintain_order=True)
            .to_frame()
            .with_columns(
                pl.lit(f"solver failed: {res.message}; current mix kept").alias("lp_reason")
            )
        )
        return LPSolution(None, res.status, res.message, failed)
    # The cap binds where its constraint has a non-zero dual (more turnover would lower
    # the objective: a class target missed, or a location improvement left undone).
    binding = (
        np.asarray(res.ineqlin.marginals) < -1e-9
        if lp.max_turnover_fraction is not None
        else np.zeros(index.households.height, dtype=bool)
    )
    status = _household_status(index, res.x, binding, lp.max_turnover_fraction)
    return LPSolution(res.x, res.status, res.message, status)


def _household_status(
    index: LPIndex, z: np.ndarray, binding: np.ndarray, cap: float | None
) -> pl.DataFrame:
    """household_id, lp_reason for every household of a solved LP that is not plainly optimal:
    the rows whose elastic slack exceeds `_SLACK_TOL` name what misses its target, `binding`
    (one flag per household) says where the turnover cap holds the household back."""
    n_acc = index.n_acc
    slack = index.slack(z)
    cls_slack = index.classes.with_columns(pl.Series("sl", slack[n_acc:]))
    bad_cls = (
        cls_slack.join(index.households, on="household_id")
        .filter(pl.col("sl").abs() > _SLACK_TOL)
        .with_columns((pl.col("sl").abs() * pl.col("hh_value")).alias("usd"))
        .with_columns(
            pl.format(
                "{} would be {} {} its target",
                pl.col("asset_class"),
                _money("usd"),
                pl.when(pl.col("sl") > 0)
                .then(pl.lit("short of"))
                .otherwise(pl.lit("over")),
            ).alias("msg")
        )
        .select("household_id", "msg")
    )
    acc_slack = index.accounts.with_columns(pl.Series("sl", slack[:n_acc]))
    bad_acc = acc_slack.filter(pl.col("sl").abs() > _SLACK_TOL).select(
        "household_id",
        pl.format("account {} cannot be filled", pl.col("account_id")).alias("msg"),
    )
    n_hh = index.households.height
    capped = index.households.with_columns(
        pl.Series("sold", np.bincount(index.hh_row, weights=index.sold(z), minlength=n_hh)),
        pl.Series("binding", binding),
    )
    missed = (
        pl.concat([bad_cls, bad_acc])
        .group_by("household_id", maintain_order=True)
        .agg(pl.col("msg").sort().str.join("; "), pl.col("msg").str.starts_with("account ").any().alias("acc"))
    )
    sold_text = pl.format("${}", (pl.col("sold") * pl.col("hh_value")).round(2))
    cap_text = pl.lit(f"{100.0 * float(cap or 0.0):g}%")
    return (
        capped.join(missed, on="household_id", how="left")
        .filter(pl.col("binding") | pl.col("msg").is_not_null())
        .select(
            "household_id",
            # The cap binds and the targets are missed: the household moves as far toward
            # them as the cap allows (every account keeps its value) and says why it stops.
            pl.when(pl.col("binding") & pl.col("msg").is_not_null() & ~pl.col("acc").fill_null(False))
            .then(
                pl.format(
                    "{}: reaching the household's targets would sell more than {} of its value "
                    "(policy household_location.max_turnover_fraction); {} is sold now and the rest "
                    "waits for a later rebalance ({})",
                    pl.lit(STATUS_TURNOVER_CAP), cap_text, sold_text, pl.col("msg"),
                )
            )
            .when(pl.col("msg").is_not_null())
            .then(
                pl.format(
                    "infeasible: household targets cannot be reached without trading a barred "
                    "asset class, which stays as it is ({}); current mix kept",
                    pl.col("msg"),
                )
            )
            # The cap binds but the targets are met: only asset location is held back.
            .otherwise(
                pl.format(
                    "{}: sales held to {} of the household's value ({}, policy "
                    "household_location.max_turnover_fraction); its targets are met, asset location "
                    "is improved only as far as the cap allows",
                    pl.lit(STATUS_TURNOVER_CAP), cap_text, sold_text,
                )
            )
            .alias("lp_reason"),
        )
    )


def unpack_targets(lp: LocationLP, solution: LPSolution) -> pl.DataFrame:
    """Step 3: the solution → locate_households' frame. An optimal or turnover-capped household
    gets the LP's holdings after rebalancing; any other (infeasible, solver failed, bad inputs)
    keeps its current mix, with its reason as status."""
    index = lp.index
    bad = lp.not_located.with_columns(
        pl.col("cur").alias("x"),
        pl.format("not located: {}; current mix kept", pl.col("reason")).alias("status"),
    )
    cols_out = ["account_id", "household_id", "asset_class", "market_value", "x", "status"]
    parts = [bad.select(cols_out)]
    if index.n:
        z = solution.z
        if z is not None:
            x = np.maximum(index.cur + index.bought(z) - index.sold(z), 0.0) * index.cells["hh_value"].to_numpy()
        else:
            x = index.cells["cur"].to_numpy()
        ok = index.cells.with_columns(pl.Series("x", x)).join(
            solution.household_status, on="household_id", how="left"
        )
        ok = ok.with_columns(
            pl.when(pl.col("lp_reason").is_null() | pl.col("lp_reason").str.starts_with(STATUS_TURNOVER_CAP))
            .then(pl.col("x"))
            .otherwise(pl.col("cur"))
            .alias("x"),
            pl.col("lp_reason").fill_null(STATUS_OPTIMAL).alias("status"),
        )
        parts.append(ok.select(cols_out))
    out = pl.concat(parts).with_columns(
        pl.when(pl.col("x").abs() < 1e-6).then(0.0).otherwise(pl.col("x")).alias("x")
    )
    tot = pl.col("x").sum().over("account_id")
    out = out.with_columns(
        pl.when(tot != 0).then(pl.col("x") / tot).otherwise(0.0).alias("target_weight")
    ).with_columns(
        (pl.col("target_weight") * pl.col("market_value")).alias("target_value")
    )
    return (
        out.select(list(OUTPUT_SCHEMA))
        .cast(OUTPUT_SCHEMA)
        .sort(["household_id", "account_id", "asset_class"])
    )


def hold_taxable_classes(
    located: pl.DataFrame,
    holdings: pl.DataFrame,
    model_weights: pl.DataFrame,
    accounts: pl.DataFrame,
    securities: pl.DataFrame,
) -> pl.DataFrame:
    """The security weights to size a household's accounts with (see "No gain realised for
    nothing" in the module docstring): `model_weights` (account_id, symbol, weight) unchanged for tax-advantaged
    accounts and for the cash class; for every other class of a taxable account, one weight per
    security of the class, in dollars (the sizer normalises weights within each class):
        held_i + max(target − held, 0) × (model weight of i / the model's weight in the class)
    where held_i is the account's current value in security i and target the LP's target value
    for the class. So a class the LP leaves unchanged or reduces keeps its securities in their
    current proportions (nothing is sold in one security of the class to buy another: no gain is
    realised for an unchanged class mix), and an increase is bought in the model's securities. A
    class with neither holdings nor model securities gets no rows (the sizer's fallbacks apply).

    located: account_id, asset_class, target_value (locate_households' output). holdings:
    account_id, symbol, market_value. accounts: account_id, account_type. securities: symbol,
    asset_class. Vectorised: joins and window sums, no per-account loop. Rows in any order give
    the same result (the inputs are put in one canonical order first, as in build_lp)."""
    located, holdings, model_weights, accounts, securities = (
        f.sort(f.columns, nulls_last=True) if f.width else f
        for f in (located, holdings, model_weights, accounts, securities))
    cls = securities.select("symbol", "asset_class").unique("symbol", keep="first", maintain_order=True)
    taxable = accounts.filter(pl.col("account_type") == "taxable").select("account_id").unique(maintain_order=True)
    held = (
        holdings.join(taxable, on="account_id", how="semi")
        .filter(pl.col("symbol") != "CASH")
        .join(cls, on="symbol", how="inner")
        .group_by("account_id", "asset_class", "symbol", maintain_order=True)
        .agg(pl.col("market_value").sum().alias("held"))
    )
    model = (
        model_weights.join(taxable, on="account_id", how="semi")
        .join(cls, on="symbol", how="inner")
        .filter((pl.col("weight") > 0) & (pl.col("asset_class") != "cash"))
        .group_by("account_id", "asset_class", "symbol", maintain_order=True)
        .agg(pl.col("weight").sum())
        .with_columns((pl.col("weight") / pl.col("weight").sum().over("account_id", "asset_class")).alias("m"))
        .select("account_id", "asset_class", "symbol", "m")
    )
    cells = (
        pl.concat([held.select("account_id", "asset_class", "symbol"), model.select("account_id", "asset_class", "symbol")])
        .unique(maintain_order=True)
        .filter(pl.col("asset_class") != "cash")
        .join(held, on=["account_id", "asset_class", "symbol"], how="left")
        .join(model, on=["account_id", "asset_class", "symbol"], how="left")
        .join(located.select("account_id", "asset_class", "target_value"), on=["account_id", "asset_class"], how="left")
        .with_columns(pl.col("held").fill_null(0.0), pl.col("m").fill_null(0.0), pl.col("target_value").fill_null(0.0))
        .with_columns(pl.col("held").sum().over("account_id", "asset_class").alias("class_held"),
                      pl.col("m").sum().over("account_id", "asset_class").alias("class_m"))
        .with_columns(
            # With no model security in the class an increase follows the holdings (value-weighted).
            pl.when(pl.col("class_m") > 0).then(pl.col("m"))
            .otherwise(pl.col("held") / pl.col("class_held")).alias("spread"),
            (pl.col("target_value") - pl.col("class_held")).clip(lower_bound=0.0).alias("increase"),
        )
        .with_columns((pl.col("held") + pl.col("increase") * pl.col("spread").fill_nan(0.0)).alias("weight"))
        .filter(pl.col("weight") > 0)
    )
    replaced = cells.select("account_id", "asset_class").unique(maintain_order=True)
    kept = (
        model_weights.join(cls, on="symbol", how="left")
        .with_columns(pl.when(pl.col("symbol") == "CASH").then(pl.lit("cash")).otherwise(pl.col("asset_class"))
                      .alias("asset_class"))
        .join(replaced, on=["account_id", "asset_class"], how="anti")
        .select("account_id", "symbol", pl.col("weight").cast(pl.Float64))
    )
    return pl.concat([kept, cells.select("account_id", "symbol", "weight")]).sort("account_id", "symbol")
