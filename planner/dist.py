"""torch.distributed helpers shared by profiling and fine-tuning: this process's place in a torchrun job,
joining the process group, collectives, and the intra-op threads per rank."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Sequence

from .devices import resolve_device
from .errors import UserError

# Long on purpose: ranks legitimately wait for rank 0's Fisher pass and for the slowest rank's last matrix, and a
# rank that dies is noticed by torchrun's agent (it stops the others), not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


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


def broadcast(obj, rank: int):
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
