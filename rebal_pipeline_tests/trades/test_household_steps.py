"""The three steps of household asset location (build_lp, solve_lp, unpack_targets), each on
its own, with hand-computed values.

The household of most tests: H holds $200k in two accounts, a taxable account T ($100k equity,
60% unrealised gain) and a traditional IRA I ($50k equity, $50k bonds), with targets of 50%
equity and 50% bonds. It holds $150k of equity and wants $100k: the $50k sale belongs in the
IRA (no tax there, and bonds belong there), so the taxable account keeps its gain.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from rebal_pipeline.core.household_location import (
    LocationPolicy,
    LPSolution,
    build_lp,
    solve_lp,
    unpack_targets,
)
from rebal_pipeline_tests.trades.test_household_location import K, _frames

INF = np.inf


def _mixed_ira(**targets_or_barred):
    return _frames(
        [("H", "T", "taxable", K), ("H", "I", "traditional_ira", K)],
        [("T", "equity", K), ("I", "equity", K / 2), ("I", "fixed_income", K / 2)],
        gains=[("T", "equity", 0.6)],
        targets=[("H", "equity", 0.5), ("H", "fixed_income", 0.5)],
        **targets_or_barred,
    )


def _barred_erisa():
    # H2's only account is an ERISA plan that may not hold alternatives: 20% is unreachable.
    return _frames(
        [("H2", "E2", "erisa", K)],
        [("E2", "equity", K)],
        targets=[("H2", "equity", 0.8), ("H2", "alternatives", 0.2)],
        barred=[("E2", "alternatives")],
    )


def _rows(out: pl.DataFrame) -> list[tuple]:
    return [
        (r["account_id"], r["asset_class"], pytest.approx(r["target_weight"], abs=1e-9),
         pytest.approx(r["target_value"], abs=1e-3), r["status"])
        for r in out.iter_rows(named=True)
    ]


# ---- build_lp ---------------------------------------------------------------------------------


def test_build_indexes_one_variable_pair_per_account_and_class():
    lp = build_lp(**_mixed_ira())
    # Cells (and so b_i, s_i) in household, account, class order; rows: accounts, then classes.
    assert lp.index.cells.select("account_id", "asset_class").rows() == [
        ("I", "equity"), ("I", "fixed_income"), ("T", "equity"), ("T", "fixed_income"),
    ]
    assert lp.index.accounts.rows() == [("H", "I"), ("H", "T")]
    assert lp.index.classes.rows() == [("H", "equity"), ("H", "fixed_income")]
    assert lp.index.households.rows() == [("H", 2 * K)]
    assert lp.index.acc_row.tolist() == [0, 0, 1, 1]  # I, I, T, T
    assert lp.index.cls_row.tolist() == [2, 3, 2, 3]  # equity, bonds, equity, bonds
    # Current holdings in fractions of the household's $200k.
    assert lp.index.cur.tolist() == [0.25, 0.25, 0.5, 0.0]
    assert lp.not_located.height == 0


def test_build_costs_location_gain_and_turnover_per_dollar():
    lp = build_lp(**_mixed_ira())
    # Buying: location penalty + 1% turnover (IRA equity 1%, taxable bonds 2%).
    assert lp.c[:4] == pytest.approx([0.02, 0.01, 0.01, 0.03])
    # Selling: − location penalty + gain ratio (taxable only) + 1% turnover; selling the taxable
    # equity realises 60 cents of gain per dollar.
    assert lp.c[4:8] == pytest.approx([0.0, 0.01, 0.61, -0.01])
    # Elastic slack: M = 10 × (0.61 + 1) × (4 rows + 1) = 80.5 per class row, 100 × M per account row.
    assert lp.c[8:12] == pytest.approx([8050.0, 8050.0, 80.5, 80.5])
    assert lp.c[12:16] == pytest.approx([8050.0, 8050.0, 80.5, 80.5])


def test_build_rows_keep_account_values_and_reach_class_targets():
    lp = build_lp(**_mixed_ira())
    assert lp.a_eq.toarray().tolist() == [
        #  b: I.eq I.fi T.eq T.fi | s: same     | slack +     | slack −
        [1, 1, 0, 0, -1, -1, 0, 0, 1, 0, 0, 0, -1, 0, 0, 0],  # account I keeps its $100k
        [0, 0, 1, 1, 0, 0, -1, -1, 0, 1, 0, 0, 0, -1, 0, 0],  # account T keeps its $100k
        [1, 0, 1, 0, -1, 0, -1, 0, 0, 0, 1, 0, 0, 0, -1, 0],  # household equity
        [0, 1, 0, 1, 0, -1, 0, -1, 0, 0, 0, 1, 0, 0, 0, -1],  # household bonds
    ]
    # Accounts: nothing to add; equity 50% − 75% held; bonds 50% − 25% held.
    assert lp.b_eq.tolist() == pytest.approx([0.0, 0.0, -0.25, 0.25])
    # Sales are capped by what is held; buys and slack are free.
    assert lp.bounds[:, 0].tolist() == [0.0] * 16
    assert lp.bounds[:, 1].tolist() == [INF] * 4 + [0.25, 0.25, 0.5, 0.0] + [INF] * 8
    assert lp.a_ub is None and lp.b_ub is None


def test_build_freezes_a_barred_class_both_ways():
    lp = build_lp(**_barred_erisa())
    assert lp.index.cells.select("account_id", "asset_class").rows() == [
        ("E2", "alternatives"), ("E2", "equity"),
    ]
    # b and s of E2's alternatives are bounded to 0; its equity may be sold up to all of it.
    assert lp.bounds[:4, 1].tolist() == [0.0, INF, 0.0, 1.0]


def test_build_turnover_cap_is_one_row_per_household_over_its_sales():
    lp = build_lp(**_mixed_ira(), policy=LocationPolicy(max_turnover_fraction=0.1))
    assert lp.a_ub.toarray().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1] + [0] * 8]
    assert lp.b_ub.tolist() == [0.1]


def test_build_keeps_a_bad_input_household_out_of_the_lp():
    f = _frames(
        [("H", "T", "taxable", K)],
        [("T", "equity", K)],
        targets=[("H", "equity", 0.5), ("H", "fixed_income", 0.4)],
    )
    lp = build_lp(**f)
    assert lp.index.n == 0
    assert set(lp.not_located["reason"]) == {"household targets sum to 0.9, not 1"}


# ---- solve_lp ---------------------------------------------------------------------------------


def test_solve_sells_the_ira_equity_not_the_taxable_gain():
    sol = solve_lp(build_lp(**_mixed_ira()))
    assert sol.status == 0
    # The IRA sells 25% of the household ($50k) of equity and buys as much in bonds.
    assert sol.z[:8] == pytest.approx([0, 0.25, 0, 0, 0.25, 0, 0, 0], abs=1e-9)
    assert sol.z[8:] == pytest.approx([0.0] * 8, abs=1e-9)
    assert sol.household_status.height == 0  # optimal


def test_solve_names_what_an_unreachable_household_misses():
    sol = solve_lp(build_lp(**_barred_erisa()))
    assert sol.household_status.rows() == [(
        "H2",
        "infeasible: household targets cannot be reached without trading a barred asset class, "
        "which stays as it is (alternatives would be $20000.0 short of its target; equity would "
        "be $20000.0 over its target); current mix kept",
    )]


def test_solve_reports_the_turnover_cap_and_what_waits():
    # Reaching the targets needs $50k of sales (25% of $200k); the cap allows 10% ($20k).
    sol = solve_lp(build_lp(**_mixed_ira(), policy=LocationPolicy(max_turnover_fraction=0.1)))
    assert sol.household_status.rows() == [(
        "H",
        "turnover cap: reaching the household's targets would sell more than 10% of its value "
        "(policy household_location.max_turnover_fraction); $20000.0 is sold now and the rest "
        "waits for a later rebalance (equity would be $30000.0 over its target; fixed_income "
        "would be $30000.0 short of its target)",
    )]


# ---- unpack_targets ---------------------------------------------------------------------------


def test_unpack_turns_a_known_solution_into_account_targets():
    lp = build_lp(**_mixed_ira())
    z = np.zeros(16)
    z[1], z[4] = 0.25, 0.25  # the IRA buys $50k of bonds and sells $50k of equity
    out = unpack_targets(lp, LPSolution(z, 0, "", pl.DataFrame(schema={"household_id": pl.String,
                                                                      "lp_reason": pl.String})))
    assert out.columns == ["account_id", "household_id", "asset_class", "target_weight",
                           "target_value", "status"]
    assert _rows(out) == [
        ("I", "equity", 0.0, 0.0, "optimal"),
        ("I", "fixed_income", 1.0, K, "optimal"),
        ("T", "equity", 1.0, K, "optimal"),
        ("T", "fixed_income", 0.0, 0.0, "optimal"),
    ]


def test_unpack_keeps_the_current_mix_of_an_infeasible_household():
    lp = build_lp(**_barred_erisa())
    reason = ("infeasible: household targets cannot be reached without trading a barred asset "
              "class, which stays as it is (alternatives would be $20000.0 short of its target; "
              "equity would be $20000.0 over its target); current mix kept")
    assert _rows(unpack_targets(lp, solve_lp(lp))) == [
        ("E2", "alternatives", 0.0, 0.0, reason),
        ("E2", "equity", 1.0, K, reason),
    ]


def test_unpack_moves_a_capped_household_part_of_the_way():
    lp = build_lp(**_mixed_ira(), policy=LocationPolicy(max_turnover_fraction=0.1))
    out = unpack_targets(lp, solve_lp(lp))
    (status,) = set(out["status"])
    assert status.startswith("turnover cap: ")
    # $20k of the IRA's equity is sold into bonds; every account keeps its $100k.
    assert [r[:4] for r in _rows(out)] == [
        ("I", "equity", 0.3, 0.3 * K),
        ("I", "fixed_income", 0.7, 0.7 * K),
        ("T", "equity", 1.0, K),
        ("T", "fixed_income", 0.0, 0.0),
    ]


def test_unpack_keeps_the_current_mix_when_the_solver_fails():
    lp = build_lp(**_mixed_ira())
    failed = pl.DataFrame({"household_id": ["H"],
                           "lp_reason": ["solver failed: numerical difficulties; current mix kept"]})
    out = unpack_targets(lp, LPSolution(None, 4, "numerical difficulties", failed))
    assert _rows(out) == [
        ("I", "equity", 0.5, K / 2, "solver failed: numerical difficulties; current mix kept"),
        ("I", "fixed_income", 0.5, K / 2, "solver failed: numerical difficulties; current mix kept"),
        ("T", "equity", 1.0, K, "solver failed: numerical difficulties; current mix kept"),
        ("T", "fixed_income", 0.0, 0.0, "solver failed: numerical difficulties; current mix kept"),
    ]


def test_unpack_reports_a_bad_input_household_with_its_current_mix():
    f = _frames(
        [("H", "T", "taxable", K)],
        [("T", "equity", K)],
        targets=[("H", "equity", 0.5), ("H", "fixed_income", 0.4)],
    )
    lp = build_lp(**f)
    assert _rows(unpack_targets(lp, solve_lp(lp))) == [
        ("T", "equity", 1.0, K, "not located: household targets sum to 0.9, not 1; current mix kept"),
        ("T", "fixed_income", 0.0, 0.0, "not located: household targets sum to 0.9, not 1; current mix kept"),
    ]
