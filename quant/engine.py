"""Profiling engine: the decomposition error of one matrix for every grid point, sharing the matrix's device
copy and the Fisher scaling across configurations. Returns numbers only (no packed storage is kept)."""

from __future__ import annotations

import time

import torch

from .config import QuantConfig
from .decompose import decompose
from .fastgrid import profile_grid
from .loftq import check_matrix, plain_error
from .lowrank import SolverSettings
from .qalora import qalora_point_errors
from .results import PointResult
from .weighting import Metric, check_weighting

# Bumped whenever the numbers the engine returns for the same inputs change (the profile cache keys on it).
# 1: exact/per-point decompositions; 2: randomized points batched per rank by quant.fastgrid.
ENGINE_VERSION = 2


def profile_matrix(w: torch.Tensor, points: list[tuple], iters: int, fisher=None,
                   solver: SolverSettings | None = None, batch_bytes: int | None = None,
                   rounding: str = "nearest") -> list[PointResult]:
    """Decompose `w` once per (config, rank) point; results in the order of `points`. A point may be
    (config, rank, method) with method "lora" (default) or "qalora" (quant.qalora.qalora_point_errors: the error of
    W − Q − the pooled adapter's dense equivalent, at most one alternating step).

    The same seed is used for every point, so a point's result does not depend on which other points are asked
    for (a bigger grid reproduces the smaller grid's numbers exactly). batch_bytes: quant.fastgrid's batch memory
    (default: its own share of the free memory)."""
    check_matrix(w)
    fisher = check_weighting(fisher, tuple(w.shape))
    w = w.float()
    metric = Metric.of(fisher, w.device)
    plain_cache: dict[QuantConfig, float] = {}
    fast = {}
    if rounding == "nearest" and (solver is None or solver.method == "randomized"):
        # The randomized solver runs batched over the grid (quant.fastgrid): same contract, within 1% of exact LoftQ.
        lora = list(dict.fromkeys((p[0], p[1]) for p in points if (*p, "lora")[2] == "lora"))
        fast = dict(zip(lora, profile_grid(w, lora, iters, fisher, solver, batch_bytes=batch_bytes))) if lora else {}
    out = []
    for point in points:
        config, rank, method = (*point, "lora")[:3]
        if method == "lora" and (config, rank) in fast:
            out.append(fast[(config, rank)])
            continue
        t0 = time.perf_counter()
        if method == "qalora":
            r = qalora_point_errors(w, config, rank, iters, fisher, solver)
            if w.is_cuda:
                torch.cuda.synchronize(w.device)
            out.append(PointResult(r["error"], r["error_unweighted"], r["quant_error"], r["best_iter"],
                                   r["regressed"], time.perf_counter() - t0))
            continue
        if method != "lora":
            raise ValueError(f"point method {method!r} is not supported; use 'lora' or 'qalora'")
        d = decompose(w, config, rank, iters, fisher=fisher, solver=solver, rounding=rounding)
        if config not in plain_cache:
            if rank == 0 or iters == 0:
                plain_cache[config] = d.errors[0]
            elif rounding == "nearest":
                plain_cache[config] = plain_error(w, config, metric)
            else:
                plain_cache[config] = decompose(w, config, 0, 0, fisher=fisher, solver=solver, rounding=rounding).error
        if metric.plain:
            unweighted = d.error
        else:
            unweighted = float((w - d.q.dequantize() - d.a @ d.b.T).double().pow(2).sum())
        if w.is_cuda:
            torch.cuda.synchronize(w.device)
        out.append(PointResult(d.error, unweighted, plain_cache[config], d.best_iter, d.regressed,
                               time.perf_counter() - t0))
    return out
