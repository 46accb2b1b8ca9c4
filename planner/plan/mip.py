"""The MIP fallback for instances too large for the exact DP: the restricted knapsack through PuLP with HiGHS
(highspy, warm-started from the incumbent) or PuLP's bundled CBC, under a time limit. PuLP is imported when the
fallback runs, not with the planner: most plans are proven by the DP and never need it."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import numpy as np

from ..errors import UserError
from .instance import Instance, matrix_spans

SOLVERS = ("highs", "cbc")
DEFAULT_SOLVER = "highs"


@contextlib.contextmanager
def _silence_fd1():
    """Send file descriptor 1 to /dev/null: highspy >= 1.16 prints a banner from C++ when the first Highs object
    is made, whatever `output_flag` says, and that would land in the middle of the CLI's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pulp():
    try:
        import pulp
    except ImportError:
        raise UserError("this plan needs the MIP fallback, which needs PuLP and HiGHS: pip install pulp highspy") \
            from None
    return pulp


@functools.cache
def _highs_warm():
    """PuLP's HiGHS interface has no warm start: this subclass hands the variables' initial values to highspy
    before the run."""
    pulp = _pulp()

    class HiGHSWarm(pulp.HiGHS):
        def createAndConfigureSolver(self, lp):
            with _silence_fd1():
                super().createAndConfigureSolver(lp)

        def callSolver(self, lp):
            import highspy

            values = [0.0] * lp.solverModel.getNumCol()
            for var in lp.variables():
                values[var.index] = float(var.varValue or 0.0)
            start = highspy.HighsSolution()
            start.col_value = values
            start.value_valid = True
            lp.solverModel.setSolution(start)
            super().callSolver(lp)

    return HiGHSWarm


def _make_solver(name: str, threads: int, time_limit: float | None, gap_abs: float):
    # The model's objective is the error shifted by each matrix's cheapest kept row, a sum far from the total error
    # (the cheapest rows' errors are large), so a relative gap would be relative to the wrong number; the absolute
    # gap, RTOL times the total error, is the only stopping test.
    pulp = _pulp()
    if name == "highs":
        return _highs_warm()(msg=False, threads=threads, timeLimit=time_limit, gapRel=0.0, gapAbs=gap_abs,
                              random_seed=0)
    if name == "cbc":
        # The CBC binary bundled with PuLP 3 (deprecated for PuLP 4, where COIN_CMD needs `pip install pulp[cbc]`).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, threads=threads, timeLimit=time_limit, gapRel=0.0, gapAbs=gap_abs,
                                     warmStart=True)
    raise UserError(f"ILP solver {name!r} is not supported; use one of {SOLVERS} (e.g. --solver highs)")


def solve_mip(inst: Instance, restricted, incumbent: np.ndarray, solver: str, threads: int,
               time_limit: float | None, gap_abs: float) -> tuple[np.ndarray, str]:
    rows, mats, ds, de, cap = restricted
    pulp = _pulp()
    prob = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = [prob.add_variable(f"x{r}", cat=pulp.LpBinary) for r in rows.tolist()]
    prob += pulp.LpAffineExpression(zip(x, de.tolist()))
    prob += pulp.LpAffineExpression(zip(x, ds.tolist())) <= cap, "budget"
    for lo, hi in zip(*matrix_spans(mats)):
        prob += pulp.LpAffineExpression((v, 1) for v in x[lo:hi]) == 1, f"one_{mats[lo]}"
    chosen = set(incumbent.tolist())
    for r, v in zip(rows.tolist(), x):
        v.setInitialValue(1 if r in chosen else 0)
    prob.solve(_make_solver(solver, threads, time_limit, gap_abs))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        # The warm start is feasible, so anything else is a solver failure; keep the incumbent.
        return incumbent, "feasible"
    values = np.array([v.value() or 0.0 for v in x])
    out = incumbent.copy()
    for i in np.unique(mats):
        sel = np.flatnonzero(mats == i)
        out[i] = rows[sel[np.argmax(values[sel])]]
    status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"
    return out, status
