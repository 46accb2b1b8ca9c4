"""Data-parallel fine-tuning's set-up: join the torchrun job, wrap the model in DistributedDataParallel (the one
place it is wrapped), and gather a value from every rank."""

from __future__ import annotations

import inspect

import torch

from ..devices import resolve_device
from ..dist import RankInfo, init, rank_info
from ..errors import UserError


def setup_distributed(device=None) -> tuple[RankInfo, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) or in an already joined process group: join it through planner.dist.init
    (NCCL on CUDA, gloo on CPU) and return this rank's place and device (cuda:LOCAL_RANK on GPUs). Otherwise:
    (RankInfo(), the device)."""
    import torch.distributed as dist

    info = rank_info()  # a malformed WORLD_SIZE/LOCAL_RANK is a one-line error
    if not info.active and not (dist.is_available() and dist.is_initialized()):
        return RankInfo(), resolve_device(device)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch has no torch.distributed; run without torchrun")
    ctx = init("auto" if device is None else str(device), info)
    return ctx.info, torch.device(ctx.device)


def join_data_parallel(model, device: torch.device, find_unused_parameters: bool = False):
    """(this rank's place, the module to train): `model` itself in one process; under torchrun `model` (already on
    this rank's device) wrapped in DistributedDataParallel, which all-reduces the gradients in backward."""
    info, rank_device = setup_distributed(device)
    if not info.active:
        return info, model
    if rank_device != device:
        raise UserError(f"the model is on {device} but this rank's device is {rank_device} (LOCAL_RANK); move it "
                        "there first: dist_info, device = planner.train.setup_distributed(); model.to(device)")
    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync on every forward: the frozen packed codes are identical on every rank and never change
    # (torch >= 2.13 spells the option forward_sync_buffers, older versions broadcast_buffers).
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=find_unused_parameters,
                                  **{"forward_sync_buffers" if new_name else "broadcast_buffers": False})
    return info, ddp


def gather(value, info: RankInfo) -> list:
    """`value` from every rank, in rank order (every rank must call)."""
    if not info.active:
        return [value]
    import torch.distributed as dist

    out = [None] * info.world
    dist.all_gather_object(out, value)
    return out
