"""The library API behind the CLI: profile a model, solve the ILP, write the plan and its reports.

A training script can call `make_plan(...)` and then `planner.apply.apply_plan(model, plan)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from quant import SolverSettings, decompose
from quant.decompose import _sqrt_weights, weighted_error

from . import __version__
from .budget import parse_budget
from .errors import UserError
from .fisher import compute_fisher, load_calib, load_fisher, save_fisher
from .grid import GridPoint, make_grid
from .ilp import solve
from .models import discover_matrices, iter_matrices, planned_params, resolve_model, unplanned_bytes
from .plan import Plan, PlanEntry
from .profile import cache_folder, resolve_device, run_profile, save_table, settings_key

log = logging.getLogger("lqplan")

DEFAULT_CACHE = Path(".lqplan-cache")


@dataclass
class PlanResult:
    plan: Plan
    table: pd.DataFrame
    stats: object
    paths: dict = field(default_factory=dict)
    comparison: dict | None = None


def get_fisher(source, matrices, calib: str, cache_dir: Path, tokens: int, device, progress: bool):
    """Fisher row/column weights for the calibration source, computed once and reused from the cache."""
    text = load_calib(calib)
    key = f"{text.name.replace('/', '_')[-40:]}-{text.digest}-{tokens}"
    path = Path(cache_dir) / source.fingerprint.split(":")[-1][:24] / "fisher" / f"{key}.safetensors"
    names = [m.name for m in matrices]
    if path.exists():
        weights = load_fisher(path)
        if all(n in weights for n in names):
            log.info("fisher: reusing %s", path)
            return weights, key
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="fisher", unit="batch", dynamic_ncols=True)  # noqa: E731
    weights = compute_fisher(source.folder, names, text, max_tokens=tokens, device=str(device), progress=bar)
    save_fisher(path, weights, {"calib": text.name, "digest": text.digest, "tokens": tokens})
    return weights, key


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
        point = GridPoint.from_dict({**cfg, "rank": int(row["rank"])})
        shape = tuple(int(x) for x in info.shape)
        entries.append(PlanEntry(info.name, shape, point, float(row["error"]), point.bits(shape) // 8))
    params = planned_params(matrices)
    total_bytes = sum(e.bytes for e in entries)
    totals = {"params": params, "bits": total_bytes * 8, "bits_per_param": total_bytes * 8 / params,
              "bytes": total_bytes, "model_bytes": total_bytes + unplanned, "unplanned_bytes": unplanned,
              "error": sum(e.error for e in entries), "budget_bits": budget_bits}
    solver_info = {k: getattr(solution, k) for k in ("solver", "status", "objective", "bound", "gap", "seconds")
                   if hasattr(solution, k)}
    return Plan(model={"name": source.name, "source": str(source.folder), "fingerprint": source.fingerprint,
                       "architecture": (source.config.get("architectures") or ["?"])[0]},
                budget={"spec": budget.spec, "kind": budget.kind, "value": budget.value, "bits": budget_bits},
                matrices=entries, totals=totals, solver=solver_info, method=method,
                created_by=f"lqplan {__version__}")


def weighted_plan_error(source, plan: Plan, fisher, weighted_decomposition: bool, iters: int,
                        solver: SolverSettings, device) -> float:
    """Fisher-weighted error of a plan's configurations, decomposed with or without the weights."""
    infos = [m for m in discover_matrices(source) if m.name in plan.by_name()]
    total = 0.0
    for info, w in iter_matrices(source, infos, device=device):
        e = plan.by_name()[info.name]
        rows, cols = fisher[info.name]
        d = decompose(w, e.point.config, e.point.rank, iters, (rows, cols) if weighted_decomposition else None, solver)
        dr, dc = _sqrt_weights(rows).to(w.device), _sqrt_weights(cols).to(w.device)
        total += weighted_error(w.float() - d.q.dequantize() - d.a @ d.b.T, dr, dc)
    return total


def make_plan(model: str | None = None, budget: str = "2.75bits", out_dir: str | Path = "lqplan-out",
              grid: list[GridPoint] | None = None, iters: int = 5, solver: SolverSettings | None = None,
              calib: str | None = None, calib_tokens: int = 16384, ilp_solver: str = "highs",
              cache_dir: str | Path = DEFAULT_CACHE, device: str = "auto", progress: bool = True,
              reports: bool = True, include_head: bool = False) -> PlanResult:
    """Profile → plan → report for one model and budget. Returns the plan and the profile table."""
    t0 = time.perf_counter()
    source = resolve_model(model)
    matrices = discover_matrices(source, include_head=include_head)
    grid = grid or make_grid()
    solver = solver or SolverSettings()
    dev = resolve_device(device)
    budget_obj = parse_budget(budget)  # parse before the long profile: a typo should fail in a second
    unplanned = unplanned_bytes(source, matrices)
    budget_bits = budget_obj.total_bits(planned_params(matrices), unplanned)

    fisher, fkey = (None, None)
    if calib:
        fisher, fkey = get_fisher(source, matrices, calib, Path(cache_dir), calib_tokens, dev, progress)
    table, stats = run_profile(source, matrices, grid, iters, solver, fisher, fkey, Path(cache_dir), str(dev),
                               progress)
    solution = solve(table, budget_bits, solver=ilp_solver)
    method = {"iters": iters, "solver": solver.key, "grid": [p.label for p in grid],
              "fisher": None if fisher is None else {"source": calib, "key": fkey, "tokens": calib_tokens}}
    plan = plan_from_solution(source, matrices, table, solution, budget_obj, budget_bits, method, unplanned)
    out = Path(out_dir)
    paths = {}
    plan.save(out / "plan.json")
    paths["plan"] = out / "plan.json"
    manifest = {"schema": "lqplan.profile/1", "model": plan.model, "settings": settings_key(iters, solver, fkey),
                "cache": str(cache_folder(Path(cache_dir), source.fingerprint, settings_key(iters, solver, fkey))),
                "grid": [p.to_dict() for p in grid], "iters": iters, "solver": solver.key}
    paths["profile"], paths["profile_manifest"] = save_table(table, out, manifest)

    comparison = None
    if fisher is not None:
        # The data-free plan for the same budget, and both plans' Fisher-weighted errors, for the report.
        plain_table, _ = run_profile(source, matrices, grid, iters, solver, None, None, Path(cache_dir), str(dev),
                                     progress)
        plain_plan = plan_from_solution(source, matrices, plain_table, solve(plain_table, budget_bits,
                                                                             solver=ilp_solver),
                                        budget_obj, budget_bits, {**method, "fisher": None}, unplanned)
        comparison = {
            "fisher_plan_weighted_error": plan.totals["error"],
            "plain_plan_weighted_error": weighted_plan_error(source, plain_plan, fisher, False, iters, solver, dev),
            "plain_plan_unweighted_error": plain_plan.totals["error"],
            "changed_matrices": sum(1 for e in plan.matrices
                                    if plain_plan.by_name()[e.name].point != e.point),
        }
    if reports:
        from .ilp import error_budget_curve, uniform_solutions
        from .report import write_reports

        params = plan.totals["params"]
        grid_bpp = sorted({round(b, 3) for b in (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.127, 4.5, 5.0)})
        curve_budgets = [int(b * params) for b in grid_bpp]
        try:
            curve = error_budget_curve(table, curve_budgets)
        except UserError:
            curve = None
        uniform = uniform_solutions(table, budget_bits)
        extra = {"profile_seconds": round(stats.seconds, 2), "computed_points": stats.computed_points,
                 "cached_points": stats.cached_points, "total_seconds": round(time.perf_counter() - t0, 2)}
        if comparison:
            extra["fisher_comparison"] = comparison
        paths.update(write_reports(plan, table, out, curve, uniform, extra))
    return PlanResult(plan, table, stats, paths, comparison)
