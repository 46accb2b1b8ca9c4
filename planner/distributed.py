"""Distributed profiling with torch.distributed: `torchrun --nproc-per-node N -m planner profile|plan ...` (or the
CLI's `--distributed N`, which launches exactly that).

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
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import UserError

log = logging.getLogger("lqplan.distributed")

# Long on purpose: ranks legitimately wait for rank 0's Fisher pass and for the slowest rank's last matrix, and a
# rank that dies is noticed by torchrun's agent (it stops the others), not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


# ---- environment ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job, from the environment torchrun sets."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise UserError("RANK/WORLD_SIZE/LOCAL_RANK in the environment are not integers; launch with torchrun "
                        "or unset them") from None
    return RankInfo(rank, world, local_rank, local_world)


def joined_shard() -> tuple[int, int]:
    """(rank, world) of the process group this process has joined; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: Sequence[float], device) -> list[float]:
    """Element-wise sum of `values` over the joined process group (every rank must call), in float64 on `device`
    (NCCL reduces CUDA tensors only)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a multi-process torchrun job."""
    return rank_info(env).active


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(local_world: int, cores: int | None = None) -> int:
    """Intra-op threads for each of `local_world` processes sharing this host's cores."""
    return max(1, (cores or cpu_cores()) // max(1, local_world))


# ---- work split -----------------------------------------------------------------------------------------------

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
    from .profile import missing_points

    out = {}
    for info in matrices:
        # the same rule as run_profile (it is the same function): points a matrix cannot take are never computed
        missing = len(missing_points(folder, info, grid))
        if missing:
            out[info.name] = info.shape[0] * info.shape[1] * missing
    return out


# ---- the distributed run --------------------------------------------------------------------------------------

@dataclass
class Context:
    info: RankInfo
    device: str
    backend: str
    threads: int


def rank_device(device: str, local_rank: int) -> str:
    """--device for one rank: every CUDA choice becomes this rank's own GPU, cuda:LOCAL_RANK (an explicit cuda:N
    only when N is that GPU: the same cuda:N on every rank would put them all on one GPU)."""
    import torch

    from .devices import resolve_device

    index = re.fullmatch(r"cuda:(\d+)", str(device))
    if index and int(index.group(1)) != local_rank:
        raise UserError(f"--device {device} is not this rank's GPU (cuda:{local_rank}); under torchrun use --device "
                        "cuda or auto (each rank takes cuda:LOCAL_RANK) or --device cpu")
    dev = resolve_device(device)  # auto -> cuda or cpu; checks CUDA is there
    if dev.type != "cuda":
        return str(dev)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"rank {local_rank} on this host has no GPU of its own ({count} visible); start at most "
                        f"{count} processes per host, or use --device cpu")
    return f"cuda:{local_rank}"


def init(device: str = "auto", info: RankInfo | None = None) -> Context:
    """Join the torchrun job: intra-op threads, this rank's device, the process group (NCCL for GPUs, else gloo),
    unless this process has joined one already (a user's own script). Profiling and fine-tuning both start here."""
    import torch
    import torch.distributed as dist

    info = info or rank_info()
    threads = threads_per_rank(info.local_world)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])  # the user's (or the launcher's) choice wins
    torch.set_num_threads(threads)
    dev = rank_device(device, info.local_rank)
    # gloo also works with GPU ranks (only small Python objects travel): the way out where NCCL cannot start
    backend = os.environ.get("LQPLAN_DIST_BACKEND") or ("nccl" if dev.startswith("cuda") else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and not dev.startswith("cuda")):
        raise UserError(f"LQPLAN_DIST_BACKEND={backend} does not fit device {dev}; use gloo (any device) or nccl "
                        f"(CUDA only), or unset it")
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(dev)  # object collectives stage through the current device
        kwargs["device_id"] = torch.device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return Context(RankInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.local_world), dev,
                   backend, threads)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _broadcast(obj, rank: int):
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_fisher(ctx: Context, source, matrices, calib: str, cache_dir: Path, tokens: int, progress: bool):
    """Fisher weights computed (or loaded from the cache) once, by rank 0, and sent to every rank: no two processes
    write the same cache file, and hosts need not share the cache folder."""
    from .api import get_fisher

    result = None
    if ctx.info.rank == 0:
        result = get_fisher(source, matrices, calib, Path(cache_dir), tokens, ctx.device, progress)
    return _broadcast(result, ctx.info.rank)


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
    from .fsio import write_json
    from .profile import _safe_name, cached_points

    written = 0
    for name, doc in entries.items():
        have = cached_points(folder, name)
        if any(label not in have for label in doc["points"]):
            write_json(folder / f"{_safe_name(name)}.json", {**doc, "points": {**have, **doc["points"]}})
            written += 1
    return written


def profile_distributed(ctx: Context, source, matrices, grid, iters: int, solver, fisher, fisher_key,
                        cache_dir: Path, progress: bool = True) -> DistributedSummary | None:
    """Profile the matrices still missing from the cache across all ranks; rank 0 returns a summary once every rank's
    results are in its cache, the other ranks return None."""
    import socket

    import torch.distributed as dist

    from .profile import _safe_name, cache_folder, run_profile, settings_key

    t0 = time.perf_counter()
    rank, world = ctx.info.rank, ctx.info.world
    key = settings_key(iters, solver, fisher_key)
    folder = cache_folder(Path(cache_dir), source.fingerprint, key)
    assignment = None
    if rank == 0:
        costs = missing_costs(folder, matrices, grid)
        shares = balance(costs, world)
        assignment = (source.fingerprint, shares, [sum(costs[n] for n in s) for s in shares])
    fingerprint, shares, loads = _broadcast(assignment, rank)
    if fingerprint != source.fingerprint:
        raise UserError(f"the model files on {socket.gethostname()} differ from rank 0's (fingerprint "
                        f"{source.fingerprint.split(':')[-1][:12]}… vs {fingerprint.split(':')[-1][:12]}…); give every "
                        f"host an identical copy of the model")
    mine = shares[rank]
    _, stats = run_profile(source, matrices, grid, iters, solver, fisher, fisher_key, Path(cache_dir), ctx.device,
                           progress and rank == 0, only=set(mine))
    # Every matrix of this share goes to rank 0, also those this host's own cache already held: rank 0 may not
    # share that cache folder.
    entries = {}
    for name in mine:
        path = folder / f"{_safe_name(name)}.json"
        if path.exists():
            entries[name] = json.loads(path.read_text())
    report = RankReport(rank, socket.gethostname(), ctx.device, ctx.threads, len(mine), stats.computed_points,
                        round(stats.compute_seconds, 3), round(stats.seconds, 3))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((report, entries), gathered, dst=0)
    if rank != 0:
        return None
    merged = sum(merge_entries(folder, their_entries) for _, their_entries in gathered)
    return DistributedSummary(world, ctx.backend, key, loads, [r for r, _ in gathered], merged,
                              round(time.perf_counter() - t0, 3))


def run_cli_distributed(args, command: Callable) -> int:
    """`lqplan plan|profile` inside a torchrun job: the profile is spread over the ranks, then rank 0 runs the
    ordinary command, which finds every point in the cache."""
    from . import cli
    from .fsio import write_json
    from .models import discover_matrices, resolve_model

    _check_args(args)  # a typo should fail before the long profile
    grid, solver = cli._grid(args), cli._solver(args)
    ctx = init(args.device)
    try:
        source = resolve_model(args.model)
        matrices = discover_matrices(source, include_head=args.include_head)
        if args.command == "plan":
            from .api import resolve_budget

            resolve_budget(source, matrices, grid, args.budget)  # infeasible: fail now, not after the profile
        progress = not args.quiet
        variants = [(None, None)]
        if args.calib:
            variants = [share_fisher(ctx, source, matrices, args.calib, Path(args.cache), args.calib_tokens,
                                     progress)]
            if args.command == "plan":
                variants.append((None, None))  # make_plan also solves the data-free plan for its comparison
        summaries = []
        for fisher, fkey in variants:
            s = profile_distributed(ctx, source, matrices, grid, args.iters, solver, fisher, fkey, Path(args.cache),
                                    progress)
            if s is not None:
                summaries.append(s)
                print(s.line(), file=sys.stderr)
    finally:
        shutdown()
    if ctx.info.rank != 0:
        return 0
    write_json(Path(args.out) / "distributed.json", {"schema": "lqplan.distributed/1",
                                                     "runs": [s.to_dict() for s in summaries]})
    args.device = ctx.device
    return command(args)


# ---- launching ------------------------------------------------------------------------------------------------

def strip_distributed(argv: Sequence[str]) -> list[str]:
    """argv without `--distributed N` / `--distributed=N` (argparse also accepts unique prefixes, e.g. --dist)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        opt = tok.split("=", 1)[0]
        if len(opt) >= 4 and "--distributed".startswith(opt):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def launch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs `lqplan <argv>` in `nproc` processes on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "planner", *strip_distributed(argv)]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run `lqplan <argv>` under torchrun with `nproc` processes; returns torchrun's exit code."""
    env = dict(os.environ)
    # torchrun would set 1 and warn; each rank sets its own share of the cores anyway
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    proc = subprocess.Popen(launch_command(argv, nproc), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun too (same process group); let it stop its workers before we leave
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def cli_entry(args, argv: Sequence[str], command: Callable) -> int | None:
    """The CLI's hook for `plan` and `profile`: under torchrun, the distributed run; with --distributed N > 1,
    launch torchrun; otherwise None (run the command in this process)."""
    n = getattr(args, "distributed", None)
    if under_torchrun():
        return run_cli_distributed(args, command)
    if n is None:
        return None
    if n < 1:
        raise UserError(f"--distributed {n} is not a process count; use 2 or more (one per GPU), or leave it out")
    if n == 1:
        return None
    _check_args(args)  # bad input fails here, once, not in every rank
    _check_inputs(args)
    return launch(argv, n)


def _check_inputs(args) -> None:
    """What the parent can check before starting the workers (where each rank would print the error and torchrun
    add its own traceback): the model, the budget against the grid's cheapest plan, the calibration text."""
    from . import cli
    from .api import resolve_budget
    from .fisher import load_calib
    from .models import discover_matrices, resolve_model

    source = resolve_model(args.model)
    matrices = discover_matrices(source, include_head=args.include_head)
    if args.command == "plan":
        resolve_budget(source, matrices, cli._grid(args), args.budget)
    if args.calib:
        load_calib(args.calib)


def _check_args(args) -> None:
    from . import cli
    from .budget import parse_budget

    cli._check_common(args)
    cli._grid(args)
    cli._solver(args)
    if args.command == "plan":
        parse_budget(args.budget)
