"""The exact MCKP solver (planner.plan.mckp) against brute force, the dense DP, HiGHS, and the LP curve."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import planner.plan.ilp as ilp
from planner.plan import mckp
from planner.plan.ilp import RTOL, InfeasibleBudget, error_budget_curve, solve
from planner.plan.instance import Instance
from planner.testing.tables import near_symmetric_table, params_of



def brute_force(table: pd.DataFrame, budget: int) -> float | None:
    groups = [g[["storage_bits", "error"]].to_numpy() for _, g in table.groupby("matrix", sort=True)]
    best = None
    for combo in itertools.product(*groups):
        if sum(int(r[0]) for r in combo) <= budget:
            e = math.fsum(r[1] for r in combo)
            best = e if best is None else min(best, e)
    return best


@st.composite
def tables(draw, symmetric: bool):
    """4-6 matrices x 3-4 configs. Errors are multiples of 1/4 (sums are exact, so ties are exact too); symmetric:
    every matrix shares one table, perturbed by at most a few 1/1024 (near-equal plans)."""
    n_mats, n_cfgs = draw(st.integers(4, 6)), draw(st.integers(3, 4))
    sizes = st.lists(st.integers(1, 9), min_size=n_cfgs, max_size=n_cfgs)
    errors = st.lists(st.integers(0, 48), min_size=n_cfgs, max_size=n_cfgs)
    shared = (draw(sizes), draw(errors))
    rows = []
    for i in range(n_mats):
        size, err = shared if symmetric else (draw(sizes), draw(errors))
        noise = draw(st.lists(st.integers(0, 3), min_size=n_cfgs, max_size=n_cfgs)) if symmetric else [0] * n_cfgs
        for c in range(n_cfgs):
            rows.append({"matrix": f"m{i}", "label": f"c{c}", "storage_bits": 8 * size[c],
                         "error": err[c] / 4 + noise[c] / 1024})
    return pd.DataFrame(rows)


def _budgets(table: pd.DataFrame, fracs) -> list[int]:
    lo = int(table.groupby("matrix")["storage_bits"].min().sum())
    hi = int(table.groupby("matrix")["storage_bits"].max().sum())
    return sorted({lo + int(f * (hi - lo)) for f in fracs})


@pytest.mark.parametrize("symmetric", [False, True])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_exact_optimum_equals_brute_force(symmetric, data):
    table = data.draw(tables(symmetric))
    for budget in _budgets(table, data.draw(st.lists(st.floats(0, 1), min_size=1, max_size=3))):
        for fix in (True, False):
            sol = solve(table, budget, fix_by_bound=fix)
            assert sol.status == "optimal" and sol.total_bits <= budget
            assert sol.total_error == brute_force(table, budget)  # exact: the errors are dyadic


def _dense_only(inst, restricted, rc, incumbent, bound):
    return mckp.dense_solve(len(inst.names), restricted)


def test_same_plan_as_the_dense_dp(monkeypatch):
    """Ties (identical layers, exact copies) are broken exactly as the dense DP table broke them."""
    base = near_symmetric_table("13b", layers=1, noise=0.0)
    tables = [near_symmetric_table("13b", layers=3, seed=1)]
    tables.append(pd.concat([base.assign(matrix=base["matrix"].str.replace("layers.0.", f"layers.{k}.",
                                                                             regex=False)) for k in range(4)]))
    for table in tables:
        params = params_of(table)
        for bpp in (2.3, 2.75, 4.127):
            sparse = solve(table, int(bpp * params))
            with monkeypatch.context() as m:
                m.setattr(ilp, "_solve_exact", _dense_only)
                dense = solve(table, int(bpp * params))
            assert sparse.choice == dense.choice and sparse.proof == dense.proof, bpp


def test_alike_order_groups_layers_and_both_tie_branches_run(monkeypatch):
    """Instance.alike_order puts one type's layers side by side; a noisy table ends with the runner-up check alone,
    copied layers (exact ties) with the round in name order, and both give the dense DP's plan (checked above)."""
    table = near_symmetric_table("13b", layers=3, seed=1)
    inst = Instance(table)
    kinds = [inst.names[m].split(".")[-1] for m in inst.alike_order.tolist()]
    assert sum(a != b for a, b in zip(kinds, kinds[1:])) == 6  # 7 runs of 3 layers each
    rounds = []
    real = mckp._one_round
    monkeypatch.setattr(mckp, "_one_round", lambda ds, *a: rounds.append(len(ds)) or real(ds, *a))
    solve(table, int(2.75 * params_of(table)))
    assert rounds == []
    base = near_symmetric_table("13b", layers=1, noise=0.0)
    copies = pd.concat([base.assign(matrix=base["matrix"].str.replace("layers.0.", f"layers.{k}.", regex=False))
                        for k in range(4)])
    solve(copies, int(2.75 * params_of(copies)))
    assert len(rounds) == 1


def test_deterministic_and_independent_of_row_order():
    table = near_symmetric_table("13b", layers=4, seed=3)
    budget = int(2.75 * params_of(table))
    a = solve(table, budget)
    b = solve(table.sample(frac=1.0, random_state=1).reset_index(drop=True), budget)
    assert a.choice == b.choice == solve(table, budget).choice
    assert a.proof == "dp"


def test_infeasible_and_tightest_budgets():
    table = near_symmetric_table("13b", layers=1)
    lo = int(table.groupby("matrix")["storage_bits"].min().sum())
    with pytest.raises(InfeasibleBudget):
        solve(table, lo - 1)
    assert solve(table, lo).total_bits == lo
    # mckp directly: a zero capacity keeps every matrix at its first row
    ds, de = np.array([0, 2, 0, 3]), np.array([0.0, -1.0, 0.0, -2.0])
    rows, _ = mckp.solve(ds, de, np.zeros(4), [(0, 2), (2, 4)], 0, lower=0.0, upper=0.0, scale=1.0,
                         max_cells=10**6, max_bytes=10**6)
    assert rows.tolist() == [0, 2]
    rows, _ = mckp.solve(ds, de, np.zeros(4), [(0, 2), (2, 4)], 3, lower=-2.0, upper=0.0, scale=1.0,
                         max_cells=10**6, max_bytes=10**6)
    assert rows.tolist() == [0, 3]


def test_too_large_is_reported():
    ds, de = np.array([0, 2, 0, 3]), np.array([0.0, -1.0, 0.0, -2.0])
    with pytest.raises(mckp.TooLarge):
        mckp.solve(ds, de, np.zeros(4), [(0, 2), (2, 4)], 5, lower=-3.0, upper=0.0, scale=1.0, max_cells=1,
                   max_bytes=10**6)


def test_equals_highs_proven_optimum_on_a_40_matrix_near_symmetric_instance():
    pytest.importorskip("highspy")
    table = near_symmetric_table("13b", layers=6, seed=2).query("~matrix.str.contains('up_proj') or "
                                                                "~matrix.str.contains('layers.5.')")
    assert table["matrix"].nunique() == 41
    for bpp in (2.75, 3.5):
        budget = int(bpp * params_of(table))
        exact = solve(table, budget)
        mip = solve(table, budget, exact_dp=False, time_limit=20)
        if mip.status != "optimal":
            pytest.skip("HiGHS did not prove this instance within 20 s")
        assert exact.proof == "dp"
        assert exact.total_error <= mip.total_error * (1 + 1e-12)
        assert exact.total_error == pytest.approx(mip.total_error, rel=RTOL)


def test_curve_lp_points_bound_the_exact_points_and_meet_them_at_hull_vertices():
    table = near_symmetric_table("13b", layers=2, seed=4)
    inst = Instance(table)
    params = params_of(table)
    vertices = [inst.min_bits + int(inst.inc_cum[k]) for k in (0, len(inst.inc_cum) // 3, len(inst.inc_cum) // 2)]
    budgets = [inst.min_bits - 1, *vertices, *(int(b * params) for b in (2.5, 2.75, 3.0, 3.5, 4.127))]
    curve = error_budget_curve(table, budgets).set_index("budget_bits")
    assert curve["status"].iloc[0] == "infeasible" and math.isnan(curve["lp_bound"].iloc[0])
    ok = curve.loc[curve["status"] == "optimal"]
    assert len(ok) == len(budgets) - 1
    assert (ok["lp_bound"] <= ok["total_error"] * (1 + 1e-12)).all()
    assert np.allclose(ok["lp_bound"], ok["bound"], rtol=1e-12)  # one pass = the per-budget LP
    for b in vertices:
        assert ok.loc[b, "total_error"] == pytest.approx(ok.loc[b, "lp_bound"], rel=1e-12)
