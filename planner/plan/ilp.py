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
   steps): planner.plan.mckp's sparse DP keeps only the budget positions where the best error changes and drops those
   whose error plus the LP bound of the remaining matrices cannot reach a target that widens from the LP bound to
   the incumbent; it gives the same plan as the dense table (dense_solve, used when the sparse lists outgrow the
   limits but the table fits). Past DP_MAX_CELLS / DP_MAX_BYTES the MIP solver below runs with a time limit. The DP
   is hand-written because branch and bound stalls on the instances real models give: layers whose matrices
   have nearly equal errors make millions of near-equivalent plans that HiGHS and CBC cannot separate within a
   time limit, where the DP is exact and fast (timings: reports/benchmarks.md, section 3b).
MIP solver: HiGHS by default (the faster of the two on 70B-sized instances, same section); CBC stays available as
solver="cbc".
With a tie (planner.plan.tie), the same steps run on the grouped table, where each fused group is one item whose
costs and errors are its members' sums, and the choice is expanded back to the members.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from . import mckp
from .instance import (
    RTOL,
    InfeasibleBudget,
    Instance,
    default_describe,
    matrix_spans,
    table_params,
)
from .mip import DEFAULT_SOLVER, SOLVERS, solve_mip
from ..model.fused import TieGroup, parse_tie, tie_groups
from .tie import expand_choice, group_table

log = logging.getLogger("lqplan")

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


CURVE_TIME_LIMIT = 10.0  # per budget of the error-budget curve: a report, not a plan


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
    solver: str  # what found the solution: the MIP solver ("highs", "cbc"), or the proof when it did not run
    seconds: float
    budget_bits: int
    # what proved optimality: "lp-bound", "fixing" (one candidate left per matrix), "dp" (exact DP over the budget,
    # bound-pruned sparse states or the dense table) or "mip"
    proof: str = ""
    multiplier: float = 0.0  # Lagrange multiplier of the budget row: error reduction per extra bit at the margin
    pruned: dict = field(default_factory=dict)  # configs, dominated, fixed_by_bound, in_model


def _restricted(inst: Instance, keep: np.ndarray, budget_bits: int):
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


def _solve_exact(inst: Instance, restricted, rc: np.ndarray | None, incumbent: np.ndarray,
                 bound: float) -> np.ndarray | None:
    """The optimum by planner.plan.mckp's bounded sparse DP (same plan as dense_solve, far less work), else by dense_solve
    when the sparse lists outgrow the limits but the dense table fits; None when neither fits."""
    rows, mats, ds, de, cap = restricted
    at = np.searchsorted(rows, incumbent)  # the incumbent's rows are kept, so each is found
    base = math.fsum(inst.e[rows[ds == 0]].tolist())  # each matrix's first kept row has the only zero shift
    rc_kept = np.zeros(len(rows)) if rc is None else rc[rows]
    try:
        best, _ = mckp.solve(ds, de, rc_kept, list(zip(*matrix_spans(mats))), cap, lower=bound - base,
                             upper=math.fsum(de[at].tolist()), scale=math.fsum(inst.e[incumbent].tolist()),
                             max_cells=DP_MAX_CELLS, max_bytes=DP_MAX_BYTES, order=inst.alike_order)
        out = np.empty(len(inst.names), dtype=np.int64)
        out[mats[best]] = rows[best]
        return out
    except mckp.TooLarge:
        return (mckp.dense_solve(len(inst.names), restricted)
                if mckp.dense_fits(restricted, DP_MAX_CELLS, DP_MAX_BYTES) else None)


def solve(table: pd.DataFrame, budget_bits, solver: str = DEFAULT_SOLVER, threads: int = 2,
          time_limit: float | None = DEFAULT_TIME_LIMIT, describe: Callable[[int], str] | None = None,
          fix_by_bound: bool = True, exact_dp: bool = True, tie: Sequence[str] = (),
          _instance: Instance | None = None) -> Solution:
    """Optimal configuration per matrix under `budget_bits` (see the module docstring for the method).

    budget_bits: a bit count, or the planner.plan.budget.ResolvedBudget `lqplan plan` made (its bits and describe).
    describe(bits) -> str words a bit count in the user's unit for the infeasibility message (see
    planner.plan.budget.Budget.format_bits). fix_by_bound=False skips steps 3-4 and exact_dp=False step 5's DP (for
    benchmarking the MIP solvers). tie: fused groups ("qkv", "gate_up"; planner.plan.tie) whose members get one
    configuration: the knapsack is solved over each group as one item, the choice expanded to its members.
    _instance: the prepared Instance of the table (of the grouped table, with a tie), reused across budgets.
    With `describe` (a user's budget), a budget that does not bind is said in a warning (budget_slack)."""
    t0 = time.perf_counter()
    if hasattr(budget_bits, "describe"):  # a ResolvedBudget: its bits, worded in the user's unit
        budget_bits, describe = budget_bits.bits, describe or budget_bits.describe
    tied, groups = tied_table(table, tie)
    if groups:
        sol = _solve(tied, budget_bits, solver, threads, time_limit, describe, fix_by_bound, exact_dp, _instance,
                     smallest="every matrix at its cheapest configuration, each tied group at the cheapest one all "
                              "its members take")
        slack = budget_slack(tied, sol) if describe is not None else 0
        sol = expand_solution(table, sol, groups)
    else:
        sol = _solve(table, budget_bits, solver, threads, time_limit, describe, fix_by_bound, exact_dp, _instance)
        slack = budget_slack(table, sol) if describe is not None else 0
    if slack:
        log.warning("the budget, %s, does not bind: every matrix already has its least-error profiled configuration, "
                    "together %s (%.2g%% of the budget); a larger budget changes nothing: profile larger "
                    "configurations (--bits, --ranks) to use it, or lower the budget", describe(budget_bits),
                    describe(sol.total_bits), 100 * sol.total_bits / budget_bits)
    sol.seconds = time.perf_counter() - t0
    return sol


def budget_slack(table: pd.DataFrame, sol: Solution) -> int:
    """Bits of the budget the plan leaves unused although no matrix can lower its error any more (each has its
    least-error row of `table`): the budget does not bind. 0 when it binds."""
    least = math.fsum(table.groupby("matrix", sort=False)["error"].min().tolist())
    if sol.total_error > least + RTOL * max(abs(least), 1e-300):
        return 0
    return max(sol.budget_bits - sol.total_bits, 0)


def tied_table(table: pd.DataFrame, tie: Sequence[str]) -> tuple[pd.DataFrame, list[TieGroup]]:
    """The table the knapsack is solved over for `tie`: each group of two or more members as one item
    (planner.plan.tie.group_table), and the groups; the table itself and [] when nothing is tied."""
    names = parse_tie(tie, "tie")
    groups = tie_groups(pd.unique(table["matrix"].astype(str)), names) if names else []
    return (group_table(table, groups), groups) if groups else (table, [])


def expand_solution(table: pd.DataFrame, sol: Solution, groups: Sequence[TieGroup]) -> Solution:
    """A solution over group items as one over the table's matrices: each member takes its group's label, the
    totals are the members' own rows (the LP bound and multiplier stay the grouped instance's)."""
    choice = expand_choice(sol.choice, groups)
    bits, error = _totals(table, choice)
    out = dataclasses.replace(sol, choice=choice, total_bits=bits, total_error=error, objective=error,
                              gap=(error - sol.bound) / max(abs(error), 1e-300))
    verify(table, out, sol.budget_bits)
    return out


def _solve(table: pd.DataFrame, budget_bits: int, solver: str, threads: int, time_limit: float | None,
           describe: Callable[[int], str] | None, fix_by_bound: bool, exact_dp: bool, _instance: Instance | None,
           smallest: str = "every matrix at its cheapest configuration") -> Solution:
    t0 = time.perf_counter()
    solver = str(solver).lower()
    if solver not in SOLVERS:
        raise UserError(f"ILP solver {solver!r} is not supported; use one of {SOLVERS} (e.g. --solver highs)")
    inst = _instance if _instance is not None else Instance(table)
    budget_bits = int(budget_bits)
    if budget_bits < inst.min_bits:
        raise InfeasibleBudget.below(budget_bits, inst.min_bits, describe or default_describe(inst.params), smallest)
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
                rows, status = solve_mip(inst, restricted, rows, solver, threads, time_limit, tol)
                proof = "mip" if status == "optimal" else ""
    if proof not in ("", "mip"):
        solver = proof  # the MIP solver did not run: the solution names what found and proved it
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
    names = set(table["matrix"].astype(str).unique())  # unique first: iterating every row of a string column is slow
    choice = solution.choice
    if set(choice) != names:
        missing, extra = sorted(names - set(choice))[:3], sorted(set(choice) - names)[:3]
        raise SolutionError(f"solution does not pick exactly one configuration per matrix (missing {missing}, "
                            f"unknown {extra})")
    bits, error = _totals(table, choice)
    if bits > budget_bits:
        raise SolutionError(f"solution uses {bits} bits, over the budget of {budget_bits}")
    if bits != solution.total_bits or not math.isclose(error, solution.total_error, rel_tol=1e-12, abs_tol=1e-300):
        raise SolutionError(f"solution totals ({solution.total_bits} bits, error {solution.total_error}) differ from "
                            f"its choices ({bits} bits, error {error})")


def _totals(table: pd.DataFrame, choice: dict[str, str]) -> tuple[int, float]:
    """(storage bits, error) of one label per matrix, summed from the table's rows."""
    keys = pd.MultiIndex.from_arrays([table["matrix"].astype(str), table["label"].astype(str)])
    want = pd.MultiIndex.from_tuples(list(choice.items()))
    pos = keys.get_indexer(want)
    if (pos < 0).any():
        bad = want[int(np.flatnonzero(pos < 0)[0])]
        raise SolutionError(f"solution picks {bad[1]!r} for {bad[0]}, which the table does not have")
    bits = int(table["storage_bits"].to_numpy(dtype=np.int64)[pos].sum())
    return bits, math.fsum(table["error"].to_numpy(dtype=np.float64)[pos].tolist())


def uniform_solutions(table: pd.DataFrame, budget_bits: int) -> pd.DataFrame:
    """One row per label that every matrix has: its totals when used everywhere, and whether it fits the budget."""
    names = table["matrix"].astype(str).nunique()
    df = table.assign(matrix=table["matrix"].astype(str), label=table["label"].astype(str))
    agg = df.groupby("label", sort=True).agg(matrices=("matrix", "nunique"), total_bits=("storage_bits", "sum"),
                                              total_error=("error", "sum"))
    out = agg.loc[agg["matrices"] == names].drop(columns="matrices").reset_index()
    out["total_bits"] = out["total_bits"].astype(np.int64)
    params = table_params(table)
    if params:
        out["bits_per_param"] = out["total_bits"] / params
    out["fits"] = out["total_bits"] <= int(budget_bits)
    return out.sort_values(["total_bits", "label"], kind="mergesort", ignore_index=True)


def lp_curve(inst: Instance, budgets_bits) -> np.ndarray:
    """The LP relaxation's optimum at every budget, in one pass (mckp.hull_curve); NaN below the smallest plan."""
    return mckp.hull_curve(inst.min_bits, math.fsum(inst.e[inst.start].tolist()), inst.inc_ds, inst.inc_de,
                           budgets_bits)


def error_budget_curve(table: pd.DataFrame, budgets_bits: list[int], solver: str = DEFAULT_SOLVER,
                       threads: int = 2, time_limit: float | None = CURVE_TIME_LIMIT,
                       tie: Sequence[str] = ()) -> pd.DataFrame:
    """The LP curve (lp_bound, one pass) and the exact optimum at each budget (the table is prepared once, the
    exact DP solves each point; the time-limited MIP only where the DP's limits are exceeded); infeasible budgets
    get status "infeasible". tie: as solve's, at every budget (the LP curve is the tied instance's)."""
    tied, groups = tied_table(table, tie)
    inst = Instance(tied)
    budgets = sorted(int(x) for x in budgets_bits)
    lp = lp_curve(inst, budgets)
    rows = []
    for b, lp_b in zip(budgets, lp.tolist()):
        row = {"budget_bits": b, "budget_bits_per_param": b / inst.params if inst.params else math.nan,
               "lp_bound": lp_b}
        try:
            sol = _solve(tied, b, solver, threads, time_limit, None, True, True, inst)
            if groups:
                sol = expand_solution(table, sol, groups)
        except InfeasibleBudget:
            rows.append({**row, "total_bits": math.nan, "bits_per_param": math.nan, "total_error": math.nan,
                         "bound": math.nan, "gap": math.nan, "status": "infeasible"})
            continue
        rows.append({**row, "total_bits": sol.total_bits,
                     "bits_per_param": sol.total_bits / inst.params if inst.params else math.nan,
                     "total_error": sol.total_error, "bound": sol.bound, "gap": sol.gap, "status": sol.status})
    return pd.DataFrame(rows)
