"""Which torch device to run on: 'auto', a device name or a torch.device in, a checked torch.device out; and which
dequant backend the quantized layers use ($LQPLAN_DEQUANT, read here at the edge, never inside quant/)."""

from __future__ import annotations

import os
import re

import torch

from quant.backends import DEQUANT_BACKENDS

from .errors import UserError


_DEVICE_RE = re.compile(r"(cpu|cuda)(?::(\d{1,4}))?")


def resolve_device(device=None) -> torch.device:
    """None/'auto' -> $LQPLAN_DEVICE when set, else cuda when there is one, else cpu. Otherwise only cpu, cuda and
    cuda:N are accepted (the devices lqplan runs on), cuda only where one is available and N only below the
    number of GPUs; anything else is a UserError naming what to pass."""
    where = "--device"
    if device is None or device == "auto":
        if os.environ.get("LQPLAN_DEVICE"):
            device, where = os.environ["LQPLAN_DEVICE"], "LQPLAN_DEVICE"
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device) if isinstance(device, torch.device) else device
    m = _DEVICE_RE.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if m is None:
        raise UserError(f"{where} {str(text)[:40]!r} is not a device lqplan runs on; use auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise UserError(f"{where} {text} is not a device lqplan runs on; use cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{where} {text} asked for CUDA but no CUDA device is available; use --device cpu "
                        "(device='cpu' from Python)")
    if index is not None and int(index) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"{where} {text}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; pass one of "
                        "those")
    return torch.device("cuda" if index is None else f"cuda:{int(index)}")


def dequant_backend_from_env() -> str:
    """$LQPLAN_DEQUANT (auto when unset): triton|compile|eager forces that dequant backend where it can run."""
    choice = os.environ.get("LQPLAN_DEQUANT", "auto")
    if choice not in DEQUANT_BACKENDS:
        raise UserError(f"LQPLAN_DEQUANT={choice!r} is not one of {', '.join(DEQUANT_BACKENDS)}; unset it for auto")
    return choice
