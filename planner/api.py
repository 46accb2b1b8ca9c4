"""The library API behind the CLI: profile a model, solve the ILP, write the plan and its reports.

A training script can call `make_plan(...)` and then `planner.apply.apply_plan(model, plan)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from quant import SolverSettings, decompose
from quant.weighting import fisher_scales, weighted_error

from . import __version__
from .budget import parse_budget
from .devices import resolve_device
from .errors import UserError
from .fisher import compute_fisher, load_calib, load_fisher, save_fisher
from .grid import GridPoint, make_grid
from .ilp import DEFAULT_TIME_LIMIT, RTOL, InfeasibleBudget, solve
from .models import discover_matrices, iter_matrices, planned_params, resolve_model, unplanned_bytes
from .plan import Plan, PlanEntry
from .profile import cache_folder, run_profile, save_table, settings_key

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
        if "method" in row.index and isinstance(row["method"], str):
            cfg["method"] = row["method"]
        point = GridPoint.from_dict({**cfg, "rank": int(row["rank"])})
        shape = tuple(int(x) for x in info.shape)
        entries.append(PlanEntry(info.name, shape, point, float(row["error"]), point.bits(shape) // 8))
    params = planned_params(matrices)
    total_bytes = sum(e.bytes for e in entries)
    totals = {"params": params, "bits": total_bytes * 8, "bits_per_param": total_bytes * 8 / params,
              "bytes": total_bytes, "model_bytes": total_bytes + unplanned, "unplanned_bytes": unplanned,
              "error": sum(e.error for e in entries), "budget_bits": budget_bits}
    solver_info = {k: getattr(solution, k) for k in ("solver", "status", "proof", "objective", "bound", "gap",
                                                     "seconds") if hasattr(solution, k)}
    solver_info["mip_rel_tol"] = RTOL  # "optimal" means proven within this relative tolerance of the total error
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


def _adapter_note(grid: list[GridPoint], shapes: list[tuple[int, int]], budget_bits: int, params: int) -> str:
    """Why an infeasible budget is infeasible when adapters are the cause: what the grid's smallest rank costs on
    this model and the largest rank that would still fit next to the cheapest quantization."""
    lora = [p for p in grid if p.method == "lora"]
    ranks = sorted({p.rank for p in lora})
    if not ranks or ranks[0] == 0:
        return ""
    per_rank = sum(16 * (m + n) for m, n in shapes)  # 16-bit adapters: r·(m + n)·16 bits per matrix
    configs = {p.config for p in lora}
    quant_min = sum(min(c.matrix_bits(s, 0) for c in configs) for s in shapes)
    note = (f"; rank-{ranks[0]} adapters alone cost {ranks[0] * per_rank / params:.4f} bits/param on this model "
            f"(the cheapest quantization alone {quant_min / params:.4f})")
    fit = (budget_bits - quant_min) // per_rank
    if fit < 1:
        return note + ("; not even rank-1 adapters fit beside it: raise the budget or add cheaper quantization "
                       "(--bits 2, larger --blocks)")
    top = 1 << (int(fit).bit_length() - 1)  # largest power of two that fits
    example = ",".join(str(r) for r in (top // 2, top, top * 2) if r >= 1)
    return note + f"; lower --ranks so the smallest is at most {fit} (e.g. --ranks {example})"


def check_budget_feasible(grid: list[GridPoint], matrices, budget_bits: int, describe) -> int:
    """Raise InfeasibleBudget before profiling when every matrix at its cheapest grid point exceeds the budget
    (storage does not depend on the profile); return that smallest plan's bits."""
    shapes = [tuple(int(x) for x in m.shape) for m in matrices]
    min_bits = 0
    for shape in shapes:
        costs = [p.bits(shape) for p in grid if p.applies_to(shape)]
        if not costs:
            raise UserError(f"no grid point applies to a {shape[0]}x{shape[1]} matrix; widen the grid "
                            "(--bits/--blocks/--ranks)")
        min_bits += min(costs)
    if budget_bits < min_bits:
        params = sum(m * n for m, n in shapes)
        raise InfeasibleBudget(f"the budget, {describe(budget_bits)}, is below the smallest possible plan for this "
                               f"grid (every matrix at its cheapest configuration); raise it to at least "
                               f"{describe(min_bits)}" + _adapter_note(grid, shapes, budget_bits, params),
                               min_bits, budget_bits)
    return min_bits


def resolve_budget(source, matrices, grid, budget: str):
    """The budget in bits for these matrices, checked against the grid's cheapest plan before any profiling (a
    typo or an infeasible budget fails in a second, not after hours). Returns (Budget, bits, unplanned bytes,
    describe(bits) -> the bit count in the user's unit)."""
    budget_obj = parse_budget(budget)
    unplanned = unplanned_bytes(source, matrices)
    params = planned_params(matrices)
    budget_bits = budget_obj.total_bits(params, unplanned)

    def describe(bits: int) -> str:
        return budget_obj.format_bits(bits, params, unplanned)

    check_budget_feasible(grid, matrices, budget_bits, describe)
    return budget_obj, budget_bits, unplanned, describe


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
        from .ilp import error_budget_curve, uniform_solutions
        from .report import write_reports

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
