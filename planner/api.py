"""The library API behind the CLI: profile a model, solve the ILP, write the plan and its reports.

A training script can call `make_plan(...)` and then `planner.train.apply_plan(model, plan)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from quant import SolverSettings, decompose
from quant.weighting import fisher_scales, weighted_error

from . import __version__
from .devices import resolve_device
from .errors import UserError
from .model.discover import discover_matrices, planned_params
from .model.resolve import resolve_model
from .model.stream import iter_matrices
from .plan.budget import resolve_budget
from .plan.document import Plan, PlanEntry
from .plan.ilp import (
    DEFAULT_TIME_LIMIT,
    RTOL,
    error_budget_curve,
    solve,
    uniform_solutions,
)
from .profile.cache import cache_folder, settings_key
from .profile.fisher import get_fisher
from .profile.grid import GridPoint, make_grid
from .profile.run import run_profile, save_table
from .report.render import write_reports

log = logging.getLogger("lqplan")
DEFAULT_CACHE = Path(".lqplan-cache")


@dataclass
class PlanResult:
    plan: Plan
    table: pd.DataFrame
    stats: object
    paths: dict = field(default_factory=dict)
    comparison: dict | None = None


def plan_from_solution(source, matrices, table: pd.DataFrame, solution, budget, budget_bits: int, method: dict,
                       unplanned: int) -> Plan:
    chosen = table.set_index(["matrix", "label"])
    entries = []
    for info in matrices:
        label = solution.choice[info.name]
        row = chosen.loc[(info.name, label)]
        cfg = {k: row[k] for k in ("kind", "bits", "blocksize", "double_quant", "dq_bits", "dq_blocksize",
                                   "dq_dtype", "scale_dtype", "asymmetric")}
        cfg = {k: (v.item() if hasattr(v, "item") else v) for k, v in cfg.items()}
        if "method" in row.index and isinstance(row["method"], str):
            cfg["method"] = row["method"]
        point = GridPoint.from_dict({**cfg, "rank": int(row["rank"])})
        entries.append(PlanEntry.of(info.name, info.shape, point, row["error"]))
    solver_info = {k: getattr(solution, k) for k in ("solver", "status", "proof", "objective", "bound", "gap",
                                                     "seconds") if hasattr(solution, k)}
    solver_info["mip_rel_tol"] = RTOL  # "optimal" means proven within this relative tolerance of the total error
    return Plan.from_entries(
        {"name": source.name, "source": str(source.folder), "fingerprint": source.fingerprint,
         "architecture": (source.config.get("architectures") or ["?"])[0]},
        {"spec": budget.spec, "kind": budget.kind, "value": budget.value, "bits": budget_bits}, entries,
        unplanned_bytes=unplanned, budget_bits=budget_bits, solver=solver_info, method=method,
        created_by=f"lqplan {__version__}")


def weighted_plan_error(source, plan: Plan, fisher, weighted_decomposition: bool, iters: int,
                        solver: SolverSettings, device) -> float:
    """Fisher-weighted error of a plan's configurations, decomposed with or without the weights."""
    infos = [m for m in discover_matrices(source) if m.name in plan.by_name()]
    total = 0.0
    for info, w in iter_matrices(source, infos, device=device):
        e = plan.by_name()[info.name]
        rows, cols = fisher[info.name]
        weights = (rows, cols) if weighted_decomposition else None
        dr, dc = fisher_scales((rows, cols), w.device)
        if e.point.method == "qalora":
            from quant.qalora import adapter_weight, qalora_decompose, useful_steps

            d = qalora_decompose(w, e.point.config, e.point.rank, useful_steps(iters), solver, weights)
            low = adapter_weight(d.lora_a, d.lora_b, e.point.config.blocksize)
        else:
            d = decompose(w, e.point.config, e.point.rank, iters, weights, solver)
            low = d.a @ d.b.T
        total += weighted_error(w.float() - d.q.dequantize() - low, dr, dc)
    return total


def fisher_comparison(source, matrices, table: pd.DataFrame, plan: Plan, fisher, grid, iters: int,
                      solver: SolverSettings, budget_obj, budget_bits: int, method: dict, unplanned: int, dev,
                      cache_dir: Path, progress: bool, ilp_solver: str, describe,
                      time_limit: float | None = DEFAULT_TIME_LIMIT) -> dict:
    """The data-free plan for the same budget and grid, and both plans' Fisher-weighted and plain errors."""
    plain_table, _ = run_profile(source, matrices, grid, iters, solver, None, None, Path(cache_dir), str(dev),
                                 progress)
    plain_solution = solve(plain_table, budget_bits, solver=ilp_solver, describe=describe, time_limit=time_limit)
    plain_plan = plan_from_solution(source, matrices, plain_table, plain_solution, budget_obj, budget_bits,
                                    {**method, "fisher": None}, unplanned)
    unweighted = table.set_index(["matrix", "label"])["error_unweighted"]
    plain_by_name = plain_plan.by_name()
    return {
        "fisher_plan_weighted_error": plan.totals["error"],
        "plain_plan_weighted_error": weighted_plan_error(source, plain_plan, fisher, False, iters, solver, dev),
        "fisher_plan_unweighted_error": float(sum(unweighted[(e.name, e.point.label)] for e in plan.matrices)),
        "plain_plan_unweighted_error": plain_plan.totals["error"],
        "plain_plan_bits_per_param": plain_plan.totals["bits_per_param"],
        "changed_matrices": sum(1 for e in plan.matrices if plain_by_name[e.name].point != e.point),
        "matrices": len(plan.matrices),
    }


def make_plan(model: str | None = None, budget: str = "2.75bits", out_dir: str | Path = "lqplan-out",
              grid: list[GridPoint] | None = None, iters: int = 5, solver: SolverSettings | None = None,
              calib: str | None = None, calib_tokens: int = 16384, ilp_solver: str = "highs",
              cache_dir: str | Path = DEFAULT_CACHE, device: str = "auto", progress: bool = True,
              reports: bool = True, include_head: bool = False,
              time_limit: float | None = DEFAULT_TIME_LIMIT) -> PlanResult:
    """Profile → plan → report for one model and budget. Returns the plan, the profile table, the profile's
    ProfileStats (points computed vs cached) and, with `calib`, the comparison with the data-free plan."""
    t0 = time.perf_counter()
    source = resolve_model(model)
    matrices = discover_matrices(source, include_head=include_head)
    grid = grid or make_grid()
    solver = solver or SolverSettings()
    dev = resolve_device(device)
    budget_obj, budget_bits, unplanned, describe = resolve_budget(source, matrices, grid, budget)

    fisher, fkey = (None, None)
    if calib:
        fisher, fkey = get_fisher(source, matrices, calib, Path(cache_dir), calib_tokens, dev, progress)
    table, stats = run_profile(source, matrices, grid, iters, solver, fisher, fkey, Path(cache_dir), str(dev),
                               progress)
    solution = solve(table, budget_bits, solver=ilp_solver, describe=describe, time_limit=time_limit)
    method = {"iters": iters, "solver": solver.key, "grid": [p.label for p in grid],
              "fisher": None if fisher is None else {"source": calib, "key": fkey, "tokens": calib_tokens}}
    plan = plan_from_solution(source, matrices, table, solution, budget_obj, budget_bits, method, unplanned)

    comparison = None
    if fisher is not None:
        comparison = fisher_comparison(source, matrices, table, plan, fisher, grid, iters, solver, budget_obj,
                                       budget_bits, method, unplanned, dev, Path(cache_dir), progress, ilp_solver,
                                       describe, time_limit)
        plan.method["fisher"]["comparison"] = comparison  # in plan.json too, so `lqplan report` can show it

    out = Path(out_dir)
    paths = {}
    manifest = {"schema": "lqplan.profile/1", "model": plan.model, "fingerprint": source.fingerprint,
                "settings": settings_key(iters, solver, fkey),
                "cache": str(cache_folder(Path(cache_dir), source.fingerprint, settings_key(iters, solver, fkey))),
                "grid": [p.to_dict() for p in grid], "iters": iters, "solver": solver.key}
    # The profile first, the plan last: a plan.json on disk always has its profile beside it.
    paths["profile"], paths["profile_manifest"] = save_table(table, out, manifest)
    plan.save(out / "plan.json")
    paths["plan"] = out / "plan.json"

    if reports:
        grid_bpp = sorted({round(b, 3) for b in (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.127, 4.5, 5.0)})
        curve_budgets = [int(b * planned_params(matrices)) for b in grid_bpp]
        try:
            curve = error_budget_curve(table, curve_budgets)
        except UserError:
            curve = None
        uniform = uniform_solutions(table, budget_bits)
        extra = {"profile_seconds": round(stats.seconds, 2), "computed_points": stats.computed_points,
                 "cached_points": stats.cached_points, "computed_matrices": len(stats.computed_matrices),
                 "total_seconds": round(time.perf_counter() - t0, 2)}
        if comparison:
            extra["fisher_comparison"] = comparison
        paths.update(write_reports(plan, table, out, curve, uniform, extra))
    return PlanResult(plan, table, stats, paths, comparison)
