"""Pick one configuration per matrix: the multiple-choice knapsack ILP of LQ-LoRA, solved with PuLP.

minimise sum e(i,c) x(i,c)  s.t.  sum_c x(i,c) = 1 for every matrix i,  sum s(i,c) x(i,c) <= budget,  x binary.

Before the solver sees it, the instance is made small without changing its optimum:
1. dominance: a configuration is dropped when another of the same matrix is no larger and no worse;
2. the LP relaxation is solved exactly by the convex-hull greedy (an MCKP LP has at most two fractional
   variables); its value is the proven lower bound reported as `bound`, its multiplier lambda the Lagrangian price;
3. the greedy integer solution is the incumbent (and the solver's warm start); if it meets the bound the solver
   is not called at all;
4. reduced-cost fixing: x(i,c) = 1 forces objective >= bound + rc(i,c) (rc: Lagrangian reduced cost at lambda), so
   every configuration with bound + rc > incumbent is dropped; only the few near the lambda-tangent remain;
5. what is left is solved exactly by dynamic programming over the budget (in units of the gcd of the storage
   steps): planner.mckp's sparse DP keeps only the budget positions where the best error changes and drops those
   whose error plus the LP bound of the remaining matrices cannot reach a target that widens from the LP bound to
   the incumbent; it gives the same plan as the dense table (_solve_dp, used when the sparse lists outgrow the
   limits but the table fits). Past DP_MAX_CELLS / DP_MAX_BYTES the MIP solver below runs with a time limit. The DP
   is hand-written because branch and bound stalls on the instances real models give: layers whose matrices
   have nearly equal errors make millions of near-equivalent plans, and HiGHS and CBC both ran out a 60 s limit
   on a 132M Llama's 84 matrices (gap 1e-3 left), where the DP takes well under a second and is exact; on
   near-symmetric 13B/70B tables (bench/bench_ilp.py) the sparse DP proves the optimum in about 2 s at most.
MIP solver: HiGHS, the one that meets issue 5's target (proven optimal in <= 5 s on 2 cores) on every 70B-sized
instance measured (bench/bench_ilp.py, 560 x 48): 1.5-2.0 s with steps 1-4 and 3.5 s without, where CBC took 0.55 s,
8.2 s and 4.7 s on three seeds/budgets with them and 16 s without; CBC (issue 3's choice) stays available as solver="cbc".
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import pulp

from . import mckp
from .errors import UserError

SOLVERS = ("highs", "cbc")
DEFAULT_SOLVER = "highs"
# Optimality is claimed within this relative tolerance of the total error (both solvers are asked for it).
# 1e-6: far below the profile's own noise (the randomized solver is within 1% of exact LoftQ); 1e-9 made HiGHS
# branch for minutes on some real 84-matrix profiles to separate plans that differ in the 9th digit.
RTOL = 1e-6
# Seconds the MIP may branch before the best plan found so far is returned with status "feasible" and its gap to
# the LP bound: knapsacks over near-identical matrices (a model whose layers look alike) can branch for many
# minutes to prove the last 1e-6, and a planner must not hang. None = no limit.
DEFAULT_TIME_LIMIT = 60.0
# Largest DP solved exactly: (state, configuration) evaluations of one sparse-DP round, or for the dense table kept
# configurations x budget units (time: 0.55e9 cells/s measured on the 2-core
# machine, so <= ~4 s) and its memory: a choice table per matrix left with a choice (one or two bytes per budget
# unit) plus the working arrays over the budget.
# The 70B-sized instances of bench/bench_ilp.py need 0.6-1.7e8 cells after fixing; the executor's 132M Llama at
# 2.75 bits needed more than 2e8 on its H100 profile, where HiGHS then ran out its 60 s without a proof.
DP_MAX_CELLS = 2_000_000_000
DP_MAX_BYTES = 512 * 2**20
# Bytes per budget unit of _solve_dp's float64 working arrays (best, new, a candidate slice) and boolean mask.
_DP_WORK_BYTES_PER_UNIT = 3 * 8 + 1
CURVE_TIME_LIMIT = 10.0  # per budget of the error-budget curve: a report, not a plan
REQUIRED_COLUMNS = ("matrix", "label", "error", "storage_bits")


class InfeasibleBudget(UserError):
    """The budget is below the smallest plan (every matrix at its cheapest configuration)."""

    def __init__(self, message: str, min_bits: int, budget_bits: int):
        super().__init__(message)
        self.min_bits = min_bits
        self.budget_bits = budget_bits


class SolutionError(RuntimeError):
    """A solution breaks the ILP's constraints: a bug, never the user's fault."""


@dataclass
class Solution:
    choice: dict[str, str]  # matrix -> GridPoint label, in sorted matrix order
    total_bits: int
    total_error: float
    status: str  # "optimal" (proven within RTOL) or "feasible" (time limit hit; see gap)
    objective: float  # = total_error
    bound: float  # exact LP-relaxation value: no plan within the budget has a smaller total error
    gap: float  # (objective - bound) / max(|objective|, tiny); includes the integrality gap of the LP bound
    solver: str
    seconds: float
    budget_bits: int
    # what proved optimality: "lp-bound", "fixing" (one candidate left per matrix), "dp" (exact DP over the budget,
    # bound-pruned sparse states or the dense table) or "mip"
    proof: str = ""
    multiplier: float = 0.0  # Lagrange multiplier of the budget row: error reduction per extra bit at the margin
    pruned: dict = field(default_factory=dict)  # configs, dominated, fixed_by_bound, in_model


# ---- preparation: validation, dominance, convex hulls ------------------------------------------------------------
class _Instance:
    """The table reduced to undominated configurations, sorted deterministically, with each matrix's lower hull."""

    def __init__(self, table: pd.DataFrame):
        if not isinstance(table, pd.DataFrame) or table.empty:
            raise UserError("the profile table is empty; profile at least one matrix before planning")
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise UserError(f"the profile table lacks columns {missing}; re-create it with `lqplan profile`")
        df = table.loc[:, list(REQUIRED_COLUMNS)].copy()
        df["matrix"] = df["matrix"].astype(str)
        df["label"] = df["label"].astype(str)
        err = pd.to_numeric(df["error"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(err).all() or (err < 0).any():
            bad = df.loc[~(np.isfinite(err) & (err >= 0)), ["matrix", "label"]].iloc[0]
            raise UserError(f"profile error of {bad['matrix']} / {bad['label']} is not a finite non-negative number; "
                            "re-profile that matrix")
        bits = pd.to_numeric(df["storage_bits"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(bits).all() or (bits < 0).any() or (bits != np.round(bits)).any():
            raise UserError("profile storage_bits must be non-negative integers; re-create the table with "
                            "`lqplan profile`")
        df["error"], df["storage_bits"] = err, bits.astype(np.int64)
        dup = df.duplicated(["matrix", "label"])
        if dup.any():
            row = df.loc[dup].iloc[0]
            raise UserError(f"the profile table lists {row['matrix']} / {row['label']} twice; drop the duplicate rows")

        self.n_configs = len(df)
        self.params = _params(table)
        df = df.sort_values(["matrix", "storage_bits", "error", "label"], kind="mergesort", ignore_index=True)
        self.names = list(pd.unique(df["matrix"]))
        # Dominance: sorted by (size, error, label), a row is kept only if it beats every smaller-or-equal row.
        best_before = df.groupby("matrix", sort=False)["error"].cummin().groupby(df["matrix"], sort=False).shift(1)
        keep = best_before.isna().to_numpy() | (df["error"].to_numpy() < best_before.to_numpy())
        df = df.loc[keep].reset_index(drop=True)
        self.n_dominated = self.n_configs - len(df)

        self.mat = pd.Categorical(df["matrix"], categories=self.names).codes.astype(np.int64)
        self.s = df["storage_bits"].to_numpy(dtype=np.int64)
        self.e = df["error"].to_numpy(dtype=np.float64)
        self.label = df["label"].to_numpy(dtype=object)
        bounds = np.flatnonzero(np.diff(self.mat)) + 1
        self.start = np.concatenate(([0], bounds))
        self.stop = np.concatenate((bounds, [len(df)]))
        self.min_bits = int(self.s[self.start].sum())
        self._build_increments()

    def _build_increments(self) -> None:
        # Hand-written lower convex hull (monotone chain): no library solves the MCKP LP by hull greedy.
        src, dst = [], []
        s, e = self.s.tolist(), self.e.tolist()
        for lo, hi in zip(self.start.tolist(), self.stop.tolist()):
            hull = [lo]
            for k in range(lo + 1, hi):
                while len(hull) >= 2:
                    a, b = hull[-2], hull[-1]
                    # drop b unless the slope a->b is strictly steeper than b->k (undominated: s up, e down)
                    if (e[b] - e[a]) * (s[k] - s[b]) >= (e[k] - e[b]) * (s[b] - s[a]):
                        hull.pop()
                    else:
                        break
                hull.append(k)
            src.extend(hull[:-1])
            dst.extend(hull[1:])
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        ds = self.s[dst] - self.s[src]
        de = self.e[dst] - self.e[src]
        eff = -de / ds
        # Most error removed per bit first; ties in (matrix, position) order so the result is deterministic.
        order = np.lexsort((src, -eff))
        self.inc_src, self.inc_dst, self.inc_ds, self.inc_de, self.inc_eff = (
            src[order], dst[order], ds[order], de[order], eff[order])
        self.inc_cum = np.cumsum(self.inc_ds)

    # ---- LP relaxation and greedy incumbent -------------------------------------------------------------------
    def relax(self, budget_bits: int):
        """Exact LP optimum: (bound, multiplier, integral part of the LP solution as row indices per matrix)."""
        cap = budget_bits - self.min_bits
        k = int(np.searchsorted(self.inc_cum, cap, side="right"))  # increments that fit whole
        rows = self.start.copy()
        taken = self.inc_dst[:k]
        np.maximum.at(rows, self.mat[taken], taken)  # a matrix's hull steps are taken in order: keep the furthest
        terms = self.e[rows].tolist()
        if k < len(self.inc_ds):
            used = int(self.inc_cum[k - 1]) if k else 0
            frac = (cap - used) / int(self.inc_ds[k])
            terms.append(frac * float(self.inc_de[k]))
            multiplier = float(self.inc_eff[k])
        else:
            multiplier = 0.0
        return math.fsum(terms), multiplier, rows, k

    def greedy(self, budget_bits: int, rows: np.ndarray, k: int) -> np.ndarray:
        """The LP's integral part, then every later hull step that still fits, in the same order."""
        out = rows.tolist()
        mat = self.mat.tolist()
        left = budget_bits - int(self.s[rows].sum())
        for src, dst, ds in zip(self.inc_src[k:].tolist(), self.inc_dst[k:].tolist(), self.inc_ds[k:].tolist()):
            if ds <= left and out[mat[src]] == src:
                out[mat[src]] = dst
                left -= ds
        return np.asarray(out, dtype=np.int64)

    def improve(self, rows: np.ndarray, candidates: np.ndarray, budget_bits: int) -> np.ndarray:
        """Local search: apply the best improving move of one or two matrices among `candidates` until none is left.

        A better incumbent shrinks the reduced-cost window, so the solver gets fewer variables."""
        cand = np.flatnonzero(candidates)
        if len(cand) > 4000:  # the pair table is len(cand)^2; beyond this the solver is the cheaper tool
            return rows
        rows = rows.copy()
        mat = self.mat[cand]
        other = mat[:, None] != mat[None, :]
        for _ in range(100):
            cur = rows[mat]
            ds, de = self.s[cand] - self.s[cur], self.e[cand] - self.e[cur]
            left = budget_bits - int(self.s[rows].sum())
            tiny = 1e-12 * abs(float(self.e[rows].sum()))
            pair = np.where(other & (ds[:, None] + ds[None, :] <= left), de[:, None] + de[None, :], np.inf)
            u, v = np.unravel_index(int(np.argmin(pair)), pair.shape)
            single = np.where(ds <= left, de, np.inf)
            w = int(np.argmin(single))
            if single[w] <= pair[u, v] and single[w] < -tiny:
                rows[mat[w]] = cand[w]
            elif pair[u, v] < -tiny:
                rows[mat[u]], rows[mat[v]] = cand[u], cand[v]
            else:
                break
        return rows


def _params(table: pd.DataFrame) -> int | None:
    if "m" not in table.columns or "n" not in table.columns:
        return None
    shapes = table.drop_duplicates("matrix")
    return int((shapes["m"].astype(np.int64) * shapes["n"].astype(np.int64)).sum())


def _default_describe(params: int | None) -> Callable[[int], str]:
    def describe(bits: int) -> str:
        per = f" = {bits / params:.6f} bits/param" if params else ""
        return f"{bits:,} bits ({math.ceil(bits / 8):,} bytes of planned matrices{per})"
    return describe


# ---- solving -----------------------------------------------------------------------------------------------------
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


class _HiGHSWarm(pulp.HiGHS):
    """PuLP's HiGHS interface has no warm start; hand the variables' initial values to highspy before the run."""

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


def _make_solver(name: str, threads: int, time_limit: float | None, gap_abs: float):
    if name == "highs":
        return _HiGHSWarm(msg=False, threads=threads, timeLimit=time_limit, gapRel=RTOL, gapAbs=gap_abs,
                          random_seed=0)
    if name == "cbc":
        # The CBC binary bundled with PuLP 3 (deprecated for PuLP 4, where COIN_CMD needs `pip install pulp[cbc]`).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, threads=threads, timeLimit=time_limit, gapRel=RTOL, gapAbs=gap_abs,
                                     warmStart=True)
    raise UserError(f"ILP solver {name!r} is not supported; use one of {SOLVERS} (e.g. --solver highs)")


def _restricted(inst: _Instance, keep: np.ndarray, budget_bits: int):
    """The kept rows with each matrix's costs shifted by its cheapest kept row (same optimum, small numbers) and
    storage in units of the gcd of the shifts, so the budget row compares integers, not 1e11-sized floats.
    Returns (rows, matrix of each row, storage units, error shift, capacity in units)."""
    rows = np.flatnonzero(keep)
    mats = inst.mat[rows]
    first = np.full(len(inst.names), -1, dtype=np.int64)
    first[mats[::-1]] = rows[::-1]
    ds, de = inst.s[rows] - inst.s[first[mats]], inst.e[rows] - inst.e[first[mats]]
    cap = budget_bits - int(inst.s[first].sum())
    g = int(np.gcd.reduce(ds[ds > 0])) if (ds > 0).any() else 1
    return rows, mats, ds // g, de, cap // g


def _solve_dp(inst: _Instance, restricted) -> np.ndarray:
    """Exact optimum of the kept rows (`restricted` from _restricted): best[c] = least error shift of the matrices
    so far within c units. Ties go to the earlier (smaller) configuration, so the plan is deterministic."""
    rows, mats, ds, de, cap = restricted
    best = np.zeros(cap + 1)
    picks = []  # (lo, hi, index of the row chosen at each capacity or None when the matrix has one row)
    for lo, hi in zip(*_spans(mats)):
        if hi - lo == 1:  # only its cheapest kept row (shift 0): nothing to choose
            picks.append((lo, hi, None))
            continue
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=_choice_dtype(hi - lo))
        for j in range(lo, hi):
            d = int(ds[j])
            if d > cap:
                break  # storage ascends within a matrix
            cand = best[:cap + 1 - d] + de[j]
            better = cand < new[d:]
            new[d:][better] = cand[better]
            arg[d:][better] = j - lo
        best = new
        picks.append((lo, hi, arg))
    out = np.empty(len(inst.names), dtype=np.int64)
    c = cap
    for lo, _, arg in reversed(picks):
        j = lo if arg is None else lo + int(arg[c])
        out[mats[j]] = rows[j]
        c -= int(ds[j])
    return out


def _choice_dtype(choices: int) -> type:
    """The dtype of a matrix's DP choice table: the index of its chosen row among `choices`."""
    return np.uint8 if choices <= 256 else np.int16


def _dp_fits(restricted) -> bool:
    """Whether _solve_dp's work (cells) and memory (choice tables + working arrays) stay under DP_MAX_CELLS and
    DP_MAX_BYTES."""
    rows, mats, _, _, cap = restricted
    tables = sum(np.dtype(_choice_dtype(c)).itemsize for c in np.bincount(mats).tolist() if c > 1)
    memory = (tables + _DP_WORK_BYTES_PER_UNIT) * (cap + 1)
    return len(rows) * (cap + 1) <= DP_MAX_CELLS and memory <= DP_MAX_BYTES


def _spans(mats: np.ndarray) -> tuple[list[int], list[int]]:
    """[lo, hi) of each matrix's run in a matrix-sorted row array."""
    bounds = np.flatnonzero(np.diff(mats)) + 1
    return np.concatenate(([0], bounds)).tolist(), np.concatenate((bounds, [len(mats)])).tolist()


def _solve_exact(inst: _Instance, restricted, rc: np.ndarray | None, incumbent: np.ndarray,
                 bound: float) -> np.ndarray | None:
    """The optimum by planner.mckp's bounded sparse DP (same plan as _solve_dp, far less work), else by _solve_dp
    when the sparse lists outgrow the limits but the dense table fits; None when neither fits."""
    rows, mats, ds, de, cap = restricted
    at = np.searchsorted(rows, incumbent)  # the incumbent's rows are kept, so each is found
    base = math.fsum(inst.e[rows[ds == 0]].tolist())  # each matrix's first kept row has the only zero shift
    rc_kept = np.zeros(len(rows)) if rc is None else rc[rows]
    try:
        best, _ = mckp.solve(ds, de, rc_kept, list(zip(*_spans(mats))), cap, lower=bound - base,
                             upper=math.fsum(de[at].tolist()), scale=math.fsum(inst.e[incumbent].tolist()),
                             max_cells=DP_MAX_CELLS, max_bytes=DP_MAX_BYTES)
        out = np.empty(len(inst.names), dtype=np.int64)
        out[mats[best]] = rows[best]
        return out
    except mckp.TooLarge:
        return _solve_dp(inst, restricted) if _dp_fits(restricted) else None


def _solve_mip(inst: _Instance, restricted, incumbent: np.ndarray, solver: str, threads: int,
               time_limit: float | None, gap_abs: float) -> tuple[np.ndarray, str]:
    rows, mats, ds, de, cap = restricted

    prob = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = [prob.add_variable(f"x{r}", cat=pulp.LpBinary) for r in rows.tolist()]
    prob += pulp.LpAffineExpression(zip(x, de.tolist()))
    prob += pulp.LpAffineExpression(zip(x, ds.tolist())) <= cap, "budget"
    for lo, hi in zip(*_spans(mats)):
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


def solve(table: pd.DataFrame, budget_bits: int, solver: str = DEFAULT_SOLVER, threads: int = 2,
          time_limit: float | None = DEFAULT_TIME_LIMIT, describe: Callable[[int], str] | None = None,
          fix_by_bound: bool = True, exact_dp: bool = True, _instance: _Instance | None = None) -> Solution:
    """Optimal configuration per matrix under `budget_bits` (see the module docstring for the method).

    describe(bits) -> str words a bit count in the user's unit for the infeasibility message (see
    planner.budget.Budget.format_bits). fix_by_bound=False skips steps 3-4 and exact_dp=False step 5's DP (for
    benchmarking the MIP solvers)."""
    t0 = time.perf_counter()
    solver = str(solver).lower()
    if solver not in SOLVERS:
        raise UserError(f"ILP solver {solver!r} is not supported; use one of {SOLVERS} (e.g. --solver highs)")
    inst = _instance if _instance is not None else _Instance(table)
    budget_bits = int(budget_bits)
    if budget_bits < inst.min_bits:
        say = describe or _default_describe(inst.params)
        raise InfeasibleBudget(f"the budget, {say(budget_bits)}, is below the smallest possible plan (every matrix at "
                               f"its cheapest configuration); raise it to at least {say(inst.min_bits)}",
                               inst.min_bits, budget_bits)
    bound, multiplier, lp_rows, k = inst.relax(budget_bits)
    rows = inst.greedy(budget_bits, lp_rows, k)
    incumbent_error = math.fsum(inst.e[rows].tolist())
    tol = RTOL * max(abs(incumbent_error), 1e-300)
    pruned = {"configs": inst.n_configs, "dominated": inst.n_dominated, "fixed_by_bound": 0,
              "in_model": len(inst.s)}
    if fix_by_bound and incumbent_error - bound <= tol:
        status, proof = "optimal", "lp-bound"
        pruned["fixed_by_bound"], pruned["in_model"] = len(inst.s), 0
    else:
        keep = np.ones(len(inst.s), dtype=bool)
        if fix_by_bound:
            # Lagrangian reduced cost of each row against its matrix's cheapest row at the LP multiplier.
            price = inst.e + multiplier * inst.s.astype(np.float64)
            low = np.minimum.reduceat(price, inst.start)
            rc = price - low[inst.mat]
            keep = rc <= (incumbent_error - bound) + tol
            rows = inst.improve(rows, keep, budget_bits)
            incumbent_error = math.fsum(inst.e[rows].tolist())
            keep = rc <= (incumbent_error - bound) + tol
            keep[rows] = True
            pruned["fixed_by_bound"] = int((~keep).sum())
            pruned["in_model"] = int(keep.sum())
        if fix_by_bound and pruned["in_model"] == len(inst.names):
            status, proof = "optimal", "fixing"
        else:
            restricted = _restricted(inst, keep, budget_bits)
            best = _solve_exact(inst, restricted, rc if fix_by_bound else None, rows, bound) if exact_dp else None
            if best is not None:
                if math.fsum(inst.e[best].tolist()) < incumbent_error:  # on a float tie the incumbent stays
                    rows = best
                status, proof = "optimal", "dp"
            else:
                rows, status = _solve_mip(inst, restricted, rows, solver, threads, time_limit, tol)
                proof = "mip" if status == "optimal" else ""
    choice = {inst.names[i]: str(inst.label[r]) for i, r in enumerate(rows.tolist())}
    total_error = math.fsum(inst.e[rows].tolist())
    sol = Solution(choice=choice, total_bits=int(inst.s[rows].sum()), total_error=total_error, status=status,
                   objective=total_error, bound=bound, gap=(total_error - bound) / max(abs(total_error), 1e-300),
                   solver=solver, seconds=0.0, budget_bits=budget_bits, proof=proof, multiplier=multiplier,
                   pruned=pruned)
    verify(table, sol, budget_bits)
    sol.seconds = time.perf_counter() - t0
    return sol


def verify(table: pd.DataFrame, solution: Solution, budget_bits: int) -> None:
    """Check a solution against the full table: one known configuration per matrix, totals right, within budget."""
    names = set(table["matrix"].astype(str))
    choice = solution.choice
    if set(choice) != names:
        missing, extra = sorted(names - set(choice))[:3], sorted(set(choice) - names)[:3]
        raise SolutionError(f"solution does not pick exactly one configuration per matrix (missing {missing}, "
                            f"unknown {extra})")
    keys = pd.MultiIndex.from_arrays([table["matrix"].astype(str), table["label"].astype(str)])
    want = pd.MultiIndex.from_tuples(list(choice.items()))
    pos = keys.get_indexer(want)
    if (pos < 0).any():
        bad = want[int(np.flatnonzero(pos < 0)[0])]
        raise SolutionError(f"solution picks {bad[1]!r} for {bad[0]}, which the table does not have")
    bits = int(table["storage_bits"].to_numpy(dtype=np.int64)[pos].sum())
    error = math.fsum(table["error"].to_numpy(dtype=np.float64)[pos].tolist())
    if bits > budget_bits:
        raise SolutionError(f"solution uses {bits} bits, over the budget of {budget_bits}")
    if bits != solution.total_bits or not math.isclose(error, solution.total_error, rel_tol=1e-12, abs_tol=1e-300):
        raise SolutionError(f"solution totals ({solution.total_bits} bits, error {solution.total_error}) differ from "
                            f"its choices ({bits} bits, error {error})")


# ---- comparisons -------------------------------------------------------------------------------------------------
def uniform_solutions(table: pd.DataFrame, budget_bits: int) -> pd.DataFrame:
    """One row per label that every matrix has: its totals when used everywhere, and whether it fits the budget."""
    names = table["matrix"].astype(str).nunique()
    df = table.assign(matrix=table["matrix"].astype(str), label=table["label"].astype(str))
    agg = df.groupby("label", sort=True).agg(matrices=("matrix", "nunique"), total_bits=("storage_bits", "sum"),
                                              total_error=("error", "sum"))
    out = agg.loc[agg["matrices"] == names].drop(columns="matrices").reset_index()
    out["total_bits"] = out["total_bits"].astype(np.int64)
    params = _params(table)
    if params:
        out["bits_per_param"] = out["total_bits"] / params
    out["fits"] = out["total_bits"] <= int(budget_bits)
    return out.sort_values(["total_bits", "label"], kind="mergesort", ignore_index=True)


def lp_curve(inst: _Instance, budgets_bits) -> np.ndarray:
    """The LP relaxation's optimum at every budget, in one pass (mckp.hull_curve); NaN below the smallest plan."""
    return mckp.hull_curve(inst.min_bits, math.fsum(inst.e[inst.start].tolist()), inst.inc_ds, inst.inc_de,
                           budgets_bits)


def error_budget_curve(table: pd.DataFrame, budgets_bits: list[int], solver: str = DEFAULT_SOLVER,
                       threads: int = 2, time_limit: float | None = CURVE_TIME_LIMIT) -> pd.DataFrame:
    """The LP curve (lp_bound, one pass) and the exact optimum at each budget (the table is prepared once, the
    exact DP solves each point; the time-limited MIP only where the DP's limits are exceeded); infeasible budgets
    get status "infeasible"."""
    inst = _Instance(table)
    budgets = sorted(int(x) for x in budgets_bits)
    lp = lp_curve(inst, budgets)
    rows = []
    for b, lp_b in zip(budgets, lp.tolist()):
        row = {"budget_bits": b, "budget_bits_per_param": b / inst.params if inst.params else math.nan,
               "lp_bound": lp_b}
        try:
            sol = solve(table, b, solver=solver, threads=threads, time_limit=time_limit, _instance=inst)
        except InfeasibleBudget:
            rows.append({**row, "total_bits": math.nan, "bits_per_param": math.nan, "total_error": math.nan,
                         "bound": math.nan, "gap": math.nan, "status": "infeasible"})
            continue
        rows.append({**row, "total_bits": sol.total_bits,
                     "bits_per_param": sol.total_bits / inst.params if inst.params else math.nan,
                     "total_error": sol.total_error, "bound": sol.bound, "gap": sol.gap, "status": sol.status})
    return pd.DataFrame(rows)
