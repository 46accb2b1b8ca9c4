"""Profiling orchestration: every planned matrix x every grid point, cached per matrix so that reruns and bigger
grids compute only what is missing, and a killed run loses at most the matrix in flight.

Cache layout: <cache>/<model fingerprint>/<settings>/<matrix>.json, settings = iterations, solver, Fisher source.
Each file holds every grid point computed so far for that matrix and is replaced atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from quant import SolverSettings, fastgrid
from quant.config import CONFIG_FIELDS
from quant.engine import profile_matrix
from quant.lowrank import matmul_precision

from ..devices import resolve_device
from ..errors import UserError
from ..fsio import remove_stale_temps, write_json, write_text
from ..model.stream import iter_matrices
from .cache import cache_folder, cached_points, missing_points, safe_name
from .grid import GridPoint
from .settings import ProfileSettings

log = logging.getLogger("lqplan.profile")
# Matrices decomposed at once on one GPU: one matrix's grid alone leaves the GPU idle while the CPU launches its
# many small kernels and waits on the small eigenproblems; a few threads on their own streams fill those gaps.
CUDA_WORKERS = 3


TABLE_COLUMNS = ["matrix", "m", "n", "label", *CONFIG_FIELDS, "rank", "error", "error_unweighted", "quant_error",
                 "storage_bits", "best_iter", "regressed", "method"]


@dataclass
class ProfileStats:
    matrices: int = 0
    points: int = 0
    computed_points: int = 0
    computed_matrices: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    cached_seconds: float = 0.0  # what the points read from the cache took to compute, as the cache recorded it

    @property
    def cached_points(self) -> int:
        return self.points - self.computed_points

    def summary(self) -> str:
        """One line for logs and the CLI: what was computed and what came from the cache."""
        earlier = f"; the cached ones took {self.cached_seconds:.1f} s to compute" if self.cached_points else ""
        return (f"{self.computed_points} of {self.points} (matrix, config) points computed on "
                f"{len(self.computed_matrices)} of {self.matrices} matrices, {self.cached_points} from cache "
                f"({self.seconds:.1f} s{earlier})")

    def record(self) -> dict:
        """The profile's part of run.json and of the report's Run section."""
        return {"profile_seconds": round(self.seconds, 2), "computed_points": self.computed_points,
                "cached_points": self.cached_points, "computed_matrices": len(self.computed_matrices),
                "cached_profile_seconds": round(self.cached_seconds, 2)}


def profile_one(name: str, shape, w: torch.Tensor, missing: list[GridPoint], iters: int, solver: SolverSettings,
                fisher, batch_bytes: int | None = None, rounding: str = "nearest") -> dict:
    results = profile_matrix(w, [(p.config, p.rank, p.method) for p in missing], iters, fisher, solver, batch_bytes,
                             rounding)
    out = {}
    for p, r in zip(missing, results):
        out[p.label] = {"config": p.to_dict(), "error": r.error, "error_unweighted": r.error_unweighted,
                        "quant_error": r.quant_error, "best_iter": r.best_iter, "regressed": r.regressed,
                        "seconds": round(r.seconds, 6)}
    return out


def run_profile(source, matrices, settings: ProfileSettings, fisher: dict | None = None,
                fisher_key: str | None = None, *, cache_dir: Path = Path(".lqplan-cache"), device: str = "auto",
                progress: bool = True, only: set[str] | None = None, workers: int | None = None):
    """Profile `matrices` of `source` over `settings.grid`; returns (table, stats). `fisher` (name -> row/column
    weights, or the output objective's planner.profile.output_stats.OutputStats; anything with .get(name)) and its
    `fisher_key` make the profile weighted by `settings.objective`. `only` restricts the matrices this process
    computes (distributed runs); the table still lists every matrix found in the cache. `workers`: matrices
    decomposed at once (default CUDA_WORKERS on a GPU, each thread on its own CUDA stream, 1 on CPU), each with a
    share of the batch memory fixed before they start (fastgrid.batch_budget); the numbers do not depend on it, only
    the wall time, except where many workers' smaller shares cap a matrix's batch of configurations below the whole
    grid, which cuBLAS may round differently."""
    grid, iters, solver = settings.grid, settings.iters, settings.solver
    dev = resolve_device(device)
    folder = cache_folder(cache_dir, source.fingerprint, settings.cache_key(fisher_key))
    stats = ProfileStats(matrices=len(matrices),
                         points=sum(1 for info in matrices for p in grid if p.applies_to(info.shape)))
    t_start = time.perf_counter()
    if folder.exists():
        remove_stale_temps(folder)  # leftovers of a killed run's half-written files

    have = {info.name: cached_points(folder, info.name) for info in matrices}  # each cache file is read once
    todo = []
    for info in matrices:
        if only is not None and info.name not in only:
            continue
        # QA-LoRA points whose rank the matrix's pooled adapter cannot have are skipped (no row in the table).
        missing = missing_points(have[info.name], info, grid)
        for p in missing:
            if p.rank > min(info.shape):
                raise UserError(f"grid rank {p.rank} is larger than matrix {info.name} {tuple(info.shape)} allows "
                                f"({min(info.shape)}); lower --ranks")
        if missing:
            todo.append((info, missing))
        labels = {p.label for p in grid if p.applies_to(info.shape)} - {p.label for p in missing}
        stats.cached_seconds += sum(float(have[info.name][label].get("seconds", 0.0)) for label in labels
                                    if label in have[info.name])

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="matrix", desc="profile", dynamic_ncols=True)
    missing_of = {info.name: missing for info, missing in todo}

    def compute(info, w):
        weights = None
        if fisher is not None:
            weights = fisher.get(info.name)
            if weights is None:
                raise UserError(f"the calibration statistics have no entry for {info.name}; recompute them (--calib)")
        t0 = time.perf_counter()
        side = None
        if w.device.type == "cuda" and pool is not None:
            # Each worker thread on its own stream, after the reader's copy of w on the default stream.
            if getattr(streams, "side", None) is None:
                streams.side = torch.cuda.Stream(device=w.device)
            side = streams.side
            side.wait_stream(torch.cuda.default_stream(w.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            new = profile_one(info.name, info.shape, w, missing_of[info.name], iters, solver, weights, batch_bytes,
                              settings.rounding)
        if side is not None:
            side.synchronize()
        return new, t0

    def finish(info, new, t0):
        stats.compute_seconds += time.perf_counter() - t0  # summed over workers when several run at once
        have[info.name] = {**have[info.name], **new}
        write_json(folder / f"{safe_name(info.name)}.json",
                   {"matrix": info.name, "shape": list(info.shape), "points": have[info.name]})
        stats.computed_points += len(new)
        stats.computed_matrices.append(info.name)
        if bar is not None:
            bar.update(1)

    n_workers = workers if workers is not None else (CUDA_WORKERS if torch.device(dev).type == "cuda" else 1)
    batch_bytes = None
    if n_workers > 1 and todo:
        fastgrid.prepare_device(torch.device(dev), [p.config for _, missing in todo for p in missing])
        batch_bytes = fastgrid.batch_budget(torch.device(dev), n_workers)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="lqplan-profile") if n_workers > 1 else None
    streams = threading.local()  # one CUDA stream per worker thread, reused for its matrices
    stream = None
    try:
        with matmul_precision(solver):  # process-wide, so entered once here and not in the worker threads
            # prefetch: the next matrix is read from disk while this one is decomposed
            stream = iter_matrices(source, [t[0] for t in todo], device=dev, prefetch=True)
            pending: deque = deque()
            for info, w in stream:
                if pool is None:
                    finish(info, *compute(info, w))
                else:
                    pending.append((info, pool.submit(compute, info, w)))
                    if len(pending) >= n_workers:  # at most n_workers matrices alive (plus the one prefetched)
                        info, job = pending.popleft()
                        finish(info, *job.result())
                del w
            while pending:
                info, job = pending.popleft()
                finish(info, *job.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if stream is not None:
            stream.close()  # on an error, stop the reader thread now rather than whenever the generator is collected
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t_start
    log.info("profile: %s", stats.summary())
    return build_table(have, matrices, grid), stats


def build_table(have: dict[str, dict], matrices, grid) -> pd.DataFrame:
    """The profile table (one row per matrix x grid point, in model order then grid order) from each matrix's
    cached points `have[name]`."""
    rows = []
    for info in matrices:
        m, n = info.shape
        for p in grid:
            r = have[info.name].get(p.label)
            if r is None:
                continue
            rows.append({"matrix": info.name, "m": m, "n": n, "label": p.label, **p.config.to_dict(),
                         "rank": p.rank, "error": r["error"],
                         "error_unweighted": r["error_unweighted"], "quant_error": r["quant_error"],
                         "storage_bits": p.bits((m, n)), "best_iter": r["best_iter"], "regressed": r["regressed"],
                         "method": p.method})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def save_table(table: pd.DataFrame, out_dir: Path, manifest: dict) -> tuple[Path, Path]:
    """profile.csv (deterministic text: same inputs give the same bytes) and profile.json beside it."""

    out_dir = Path(out_dir)
    csv_path, man_path = out_dir / "profile.csv", out_dir / "profile.json"
    # floats as repr writes them (shortest text that reads back exactly): `lqplan report` re-renders from this file
    # and must show the numbers the plan was made from, not ten-digit roundings of them
    text = table.to_csv(index=False, lineterminator="\n")
    write_text(csv_path, text)
    manifest = {**manifest, "rows": len(table), "columns": list(table.columns),
                "sha256": hashlib.sha256(text.encode()).hexdigest()}
    write_json(man_path, manifest)
    return csv_path, man_path


def profile_manifest(source, settings: ProfileSettings, weights_key: str | None, cache_dir: Path,
                     model: dict | None = None) -> dict:
    """profile.json's header, the same for `lqplan plan` and `lqplan profile`: the model as plan.json names it,
    the objective, the settings key and the cache folder the numbers came from."""
    key = settings.cache_key(weights_key)
    return {"schema": "lqplan.profile/1", "model": model or source.record(), "fingerprint": source.fingerprint,
            "objective": settings.objective, "settings": key,
            "cache": str(cache_folder(Path(cache_dir), source.fingerprint, key)),
            "grid": [p.to_dict() for p in settings.grid], "iters": settings.iters, "solver": settings.solver.key}
