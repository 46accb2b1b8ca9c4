"""Streaming the planned matrices from safetensors, one at a time, optionally with the next one
read on a background thread."""

from __future__ import annotations

import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch
from safetensors import safe_open

from ..errors import UserError
from .discover import MatrixInfo
from .resolve import ModelSource
from .weights import FLOAT_CODES


def load_matrix(info: MatrixInfo, device, dtype):
    """One planned matrix as an (out, in) tensor on `device` in `dtype`, checked finite."""
    # opened per matrix: a handle kept open keeps every touched page of its mmap resident
    with safe_open(str(info.file), framework="pt", device="cpu") as f:
        t = f.get_tensor(info.tensor_key)
    if info.transposed:
        t = t.t()
    t = t.to(device=device).to(dtype=dtype).contiguous()
    check_values(t, f"matrix {info.name} ({info.tensor_key} in {info.file})")
    return t


# Weights above this magnitude overflow float32 when the decomposition error squares and sums them (real weights
# stay below ~1e3; float32 ends at 3.4e38, whose square root is 1.8e19).
MAX_ABS = 1e15


def check_values(t, what: str, limit: float | None = MAX_ABS) -> None:
    """NaN / Inf in `t` (and, with `limit`, values beyond it) are a UserError naming `what`. One reduction is the
    cheap test (aminmax propagates NaN, without a copy of `t`); the exact test only runs on a hit, to say which."""
    if not t.numel() or not t.is_floating_point():
        return
    low, high = torch.aminmax(t)
    peak = max(-float(low), float(high))
    if not (math.isfinite(peak) and math.isfinite(float(low))):
        kind = "NaN" if bool(t.isnan().any()) else "Inf"
        raise UserError(f"{what} contains NaN or Inf ({kind} found); the weights are corrupt: re-download the model")
    if limit is not None and peak > limit:
        raise UserError(f"{what} has values up to {peak:.3g}, which overflow float32 in the decomposition's error "
                        f"computation (it squares them); the weights are corrupt or need rescaling: re-download "
                        f"the model")


def check_unplanned_finite(source: ModelSource, matrices: Sequence[MatrixInfo]) -> None:
    """Every floating tensor the plan does not cover (embeddings, norms, biases, head) is finite: a NaN or Inf in a
    LayerNorm weight plans without complaint but makes training fail or learn nothing. Read one tensor at a time,
    one file open at a time."""
    planned = {m.tensor_key for m in matrices}
    by_file: dict = {}
    for key, e in source.tensors.items():
        if key not in planned and e.dtype in FLOAT_CODES:
            by_file.setdefault(e.file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in keys:
                check_values(f.get_tensor(key), f"tensor {key} in {file} (not planned)", limit=None)


def iter_matrices(source: ModelSource, matrices: Sequence[MatrixInfo], device="cpu", dtype=None,
                  prefetch: bool = False) -> Iterator[tuple[MatrixInfo, "torch.Tensor"]]:
    """Yield (MatrixInfo, tensor (out, in) on `device` as `dtype`, default float32), reading one tensor at a time.

    prefetch=True reads the next matrix on one background thread while the caller works on the current one. It
    starts that read only once the matrix before the current one is freed, so at most two matrices are alive
    (unless the caller keeps references itself)."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    matrices = list(matrices)
    files = set(source.files)
    for m in matrices:
        if m.file not in files:
            raise UserError(f"matrix {m.name} comes from {m.file}, not from model {source.name}; "
                            f"discover the matrices of this model with discover_matrices()")
    if not prefetch:
        for m in matrices:
            yield m, load_matrix(m, device, dtype)
        return

    def load_after(gate: threading.Event, info: MatrixInfo):
        gate.wait()
        return load_matrix(info, device, dtype)

    # freed[j] is set when the tensor of matrix j is garbage-collected; the read of matrix j waits for freed[j-2]
    freed = [threading.Event() for _ in matrices]
    ready = threading.Event()
    ready.set()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lqplan-prefetch") as pool:
        gate = ready
        future = pool.submit(load_after, gate, matrices[0]) if matrices else None
        try:
            for i, m in enumerate(matrices):
                gate.set()  # the caller is back for the next matrix: don't wait on tensors it chose to keep
                t = future.result()
                weakref.finalize(t, freed[i].set)
                if i + 1 < len(matrices):
                    gate = freed[i - 1] if i >= 1 else ready
                    future = pool.submit(load_after, gate, matrices[i + 1])
                else:
                    future = None
                yield m, t
                del t
        finally:
            gate.set()  # an abandoned generator must not leave the worker waiting (shutdown joins it)
            if future is not None:
                future.cancel()
