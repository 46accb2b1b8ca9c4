"""Which torch device to run on: 'auto', a device name or a torch.device in, a checked torch.device out; and which
dequant backend the quantized layers use ($LQPLAN_DEQUANT, read here at the edge, never inside quant/)."""

from __future__ import annotations

import os

import torch

from quant.layers import DEQUANT_BACKENDS

from .errors import UserError


def resolve_device(device=None) -> torch.device:
    """None/'auto' -> $LQPLAN_DEVICE when set, else cuda when there is one, else cpu; anything else must name a
    torch device that is present."""
    if device is None or device == "auto":
        device = os.environ.get("LQPLAN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but no CUDA device is available; use --device cpu "
                        "(device='cpu' from Python)")
    return dev


def dequant_backend_from_env() -> str:
    """$LQPLAN_DEQUANT (auto when unset): triton|compile|eager forces that dequant backend where it can run."""
    choice = os.environ.get("LQPLAN_DEQUANT", "auto")
    if choice not in DEQUANT_BACKENDS:
        raise UserError(f"LQPLAN_DEQUANT={choice!r} is not one of {', '.join(DEQUANT_BACKENDS)}; unset it for auto")
    return choice
