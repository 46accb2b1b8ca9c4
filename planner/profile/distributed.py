"""Profiling split across torchrun ranks (`torchrun --nproc-per-node N -m planner profile|plan ...`, or the
CLI's `--distributed N`, which launches exactly that): the work split, each rank's share, the merge on rank 0.

Every planned matrix is independent, so the work splits by matrix: rank 0 reads the cache, weighs each matrix
still missing points by m*n*(missing points) and assigns them to ranks by longest-processing-time-first; every rank
streams and profiles only its own matrices (run_profile(only=...)) and writes their cache files atomically, as a
single process would. The ranks then send their new cache entries to rank 0 (so hosts need not share a cache
folder) and rank 0 alone builds the table, solves the ILP and writes the outputs. A rank that dies loses only the
matrix it was computing; a rerun assigns only what is still missing.

The cached numbers are the single-process numbers bit for bit: each (matrix, point) decomposition is seeded on its
own and never depends on which process computes it or in which order. One caveat, CPU only: torch's reductions
and MKL's products round differently with a different number of intra-op threads, so a CPU rank reproduces a
single process that runs with the same thread count (max(1, cores // ranks per host)); on GPUs thread counts
do not enter the numbers.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from ..dist import Context, broadcast
from ..errors import UserError
from ..fsio import read_json, write_json
from .cache import cache_folder, cached_points, missing_points, safe_name
from .objective import calibration_weights
from .run import run_profile
from .settings import ProfileSettings


def balance(costs: Mapping[str, float], world: int) -> list[list[str]]:
    """Split matrices over `world` ranks by longest-processing-time-first: heaviest first, each to the least loaded
    rank (ties: lower rank). Deterministic; each rank's list keeps the input (model) order, which streams the
    safetensors files front to back. Makespan <= (4/3 - 1/(3*world)) x optimal (Graham 1969)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world={world!r} must be a positive integer number of ranks")
    names = list(costs)
    for n in names:
        if not costs[n] >= 0:
            raise ValueError(f"matrix {n!r} has cost {costs[n]!r}; costs must be non-negative numbers")
    loads = [(0, r) for r in range(world)]  # a heap of (load, rank): popping gives the least loaded, lowest rank
    owner: dict[str, int] = {}
    for i in sorted(range(len(names)), key=lambda i: (-costs[names[i]], i)):
        load, r = heapq.heappop(loads)
        owner[names[i]] = r
        heapq.heappush(loads, (load + costs[names[i]], r))
    shares: list[list[str]] = [[] for _ in range(world)]
    for n in names:
        shares[owner[n]].append(n)
    return shares


def missing_costs(folder: Path, matrices, grid) -> dict[str, int]:
    """Matrix name -> m*n*(grid points not yet in the cache), for the matrices that miss any point (model order)."""

    out = {}
    for info in matrices:
        # the same rule as run_profile (it is the same function): points a matrix cannot take are never computed
        missing = len(missing_points(cached_points(folder, info.name), info, grid))
        if missing:
            out[info.name] = info.shape[0] * info.shape[1] * missing
    return out


def share_fisher(ctx: Context, source, matrices, settings: ProfileSettings, cache_dir: Path, progress: bool):
    """The objective's weights computed (or loaded from the cache) once, by rank 0. Fisher weights (a few vectors per
    matrix) are sent to every rank: no two processes write the same cache file, and hosts need not share the cache
    folder. Output statistics (an n x n matrix per input group) are not sent: the other ranks wait for rank 0 and
    read them from the cache, so a host that does not share rank 0's cache folder computes its own copy."""
    result = None
    if ctx.info.rank == 0:
        result = calibration_weights(source, matrices, settings, Path(cache_dir), ctx.device, progress)
    if settings.objective != "output":
        return broadcast(result, ctx.info.rank)
    broadcast(None, ctx.info.rank)  # rank 0 has written the statistics
    if ctx.info.rank == 0:
        return result
    return calibration_weights(source, matrices, settings, Path(cache_dir), ctx.device, False)


@dataclass
class RankReport:
    rank: int
    host: str
    device: str
    threads: int
    matrices: int
    points: int
    compute_seconds: float
    seconds: float


@dataclass
class DistributedSummary:
    world: int
    backend: str
    settings: str
    assigned_cost: list[int]
    ranks: list[RankReport] = field(default_factory=list)
    merged_files: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        per = "/".join(str(r.matrices) for r in self.ranks)
        comp = "/".join(f"{r.compute_seconds:.1f}" for r in self.ranks)
        return (f"distributed: {self.world} ranks ({self.backend}, {self.ranks[0].device}, {self.ranks[0].threads} "
                f"thread(s) each); matrices per rank {per}; compute s {comp}; {self.seconds:.1f} s")


def merge_entries(folder: Path, entries: Mapping[str, dict]) -> int:
    """Write into `folder` the cache entries (matrix name -> cache document) that it lacks, keeping the points it
    has; returns how many files were written. With a shared cache folder every entry is already there."""

    written = 0
    for name, doc in entries.items():
        have = cached_points(folder, name)
        if any(label not in have for label in doc["points"]):
            write_json(folder / f"{safe_name(name)}.json", {**doc, "points": {**have, **doc["points"]}})
            written += 1
    return written


def profile_distributed(ctx: Context, source, matrices, settings: ProfileSettings, fisher, fisher_key,
                        cache_dir: Path, progress: bool = True) -> DistributedSummary | None:
    """Profile the matrices still missing from the cache across all ranks; rank 0 returns a summary once every rank's
    results are in its cache, the other ranks return None."""
    import socket

    import torch.distributed as dist

    t0 = time.perf_counter()
    rank, world = ctx.info.rank, ctx.info.world
    key = settings.cache_key(fisher_key)
    folder = cache_folder(Path(cache_dir), source.fingerprint, key)
    assignment = None
    if rank == 0:
        costs = missing_costs(folder, matrices, settings.grid)
        shares = balance(costs, world)
        assignment = (source.fingerprint, shares, [sum(costs[n] for n in s) for s in shares])
    fingerprint, shares, loads = broadcast(assignment, rank)
    if fingerprint != source.fingerprint:
        raise UserError(f"the model files on {socket.gethostname()} differ from rank 0's (fingerprint "
                        f"{source.fingerprint.split(':')[-1][:12]}… vs {fingerprint.split(':')[-1][:12]}…); give every "
                        f"host an identical copy of the model")
    mine = shares[rank]
    _, stats = run_profile(source, matrices, settings, fisher, fisher_key, cache_dir=Path(cache_dir),
                           device=ctx.device, progress=progress and rank == 0, only=set(mine))
    # Every matrix of this share goes to rank 0, also those this host's own cache already held: rank 0 may not
    # share that cache folder.
    entries = {}
    for name in mine:
        path = folder / f"{safe_name(name)}.json"
        if path.exists():
            entries[name] = read_json(path, "rerun the profile", max_depth=8)
    report = RankReport(rank, socket.gethostname(), ctx.device, ctx.threads, len(mine), stats.computed_points,
                        round(stats.compute_seconds, 3), round(stats.seconds, 3))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((report, entries), gathered, dst=0)
    if rank != 0:
        return None
    merged = sum(merge_entries(folder, their_entries) for _, their_entries in gathered)
    return DistributedSummary(world, ctx.backend, key, loads, [r for r, _ in gathered], merged,
                              round(time.perf_counter() - t0, 3))
