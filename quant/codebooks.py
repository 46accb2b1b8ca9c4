"""Codebooks: NormalFloat (NF-k, quantiles of N(0,1), QLoRA's construction) and uniform INT-k, in [-1, 1]; the
nearest code of a value, and the cached value tables that turn packed codes back into values."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from scipy.special import ndtri  # N(0,1)'s quantile function: what scipy.stats.norm.ppf computes, at a third of the import

from .packing import unpack_codes

NF_OFFSET = 0.9677083  # QLoRA / bitsandbytes: the outermost quantile used for the NF tables

# bitsandbytes' NF4 table as its kernels hard-code it. The construction below reproduces it bit for bit with
# current scipy; NF4 still uses the published values so that a different scipy's ppf cannot shift a bit.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@lru_cache(maxsize=None)
def nf_construction(bits: int) -> tuple[float, ...]:
    """The QLoRA construction of NF-k as a tuple of fp32 values."""
    half = 2 ** (bits - 1)
    # Probabilities from an fp32 torch.linspace and values cast to fp32 before normalising, as bitsandbytes
    # does: a float64 linspace lands one ulp off on 8 of NF4's 16 values.
    positive = ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].numpy()).tolist()
    negative = (-ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    values = values / values.max()
    return tuple(values.tolist())


def nf_codebook(bits: int, device=None) -> torch.Tensor:
    """NF-k: 2^k sorted fp32 values in [-1, 1] with 0 exact; NF4 equals bitsandbytes' table."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"NF codebooks exist for bits in (2, 3, 4, 8), not {bits}")
    values = NF4_PUBLISHED if bits == 4 else nf_construction(bits)
    return torch.tensor(values, dtype=torch.float32, device=device)


def int_codebook(bits: int, asymmetric: bool = False, device=None) -> torch.Tensor:
    """Uniform INT-k: 2^k evenly spaced values, in [-1, 1] (symmetric absmax) or [0, 1] (asymmetric min/max)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"INT codebooks exist for bits in (2, 3, 4, 8), not {bits}")
    lo = 0.0 if asymmetric else -1.0
    return torch.linspace(lo, 1.0, 2**bits, dtype=torch.float32, device=device)


def codebook(kind: str, bits: int, asymmetric: bool = False, device=None) -> torch.Tensor:
    if kind == "nf":
        return nf_codebook(bits, device)
    if kind == "int":
        return int_codebook(bits, asymmetric, device)
    raise ValueError(f"unknown codebook kind {kind!r}; use 'nf' or 'int'")


def midpoints(table: torch.Tensor) -> torch.Tensor:
    """The decision boundaries between consecutive sorted codebook values, each the largest value of the table's
    dtype not above the exact midpoint: x <= that boundary iff x <= the exact midpoint."""
    # The exact midpoint of two fp32 values is a float64; an fp32 midpoint rounded up would send x equal to it
    # to the farther value, so round each midpoint down to the largest fp32 not above it.
    exact = (table[1:].double() + table[:-1].double()) / 2
    mids = exact.to(table.dtype)
    return torch.where(mids.double() > exact, torch.nextafter(mids, torch.full_like(mids, -float("inf"))), mids)


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for every element of x (uint8).

    bucketize against the midpoints equals argmin |x - t_j|, without the (numel x 2^k) temporary an argmin
    needs. Ties go to the lower value, as argmin's first-index rule does."""
    return torch.bucketize(x, midpoints(table), right=False).to(torch.uint8)


@lru_cache(maxsize=None)
def code_table(kind: str, bits: int, asymmetric: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Values of the codes in one packed byte: (256, 8/bits) for 2/4/8 bits, so a byte indexes its codes' values
    directly without unpacking; (2^3, 1) for 3-bit codes, which straddle bytes and are unpacked first. Cached per
    device and dtype: the forward pass runs once per layer and step."""
    table = codebook(kind, bits, asymmetric, device=device).to(dtype)
    if bits == 3:
        return table[:, None]
    shifts = torch.arange(8 // bits, device=device, dtype=torch.int32) * bits
    byte_codes = (torch.arange(256, device=device, dtype=torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return table[byte_codes]


def lookup(packed: torch.Tensor, bits: int, count: int, table: torch.Tensor) -> torch.Tensor:
    """The values (flat) of the first `count` codes in `packed`, with `table` from code_table. The gather is
    F.embedding, several times faster on CPU than advanced indexing."""
    if bits == 3:
        packed = unpack_codes(packed, 3, count)
    return F.embedding(packed.int(), table).reshape(-1)[:count]


@lru_cache(maxsize=None)
def flat_codebook(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    """The 2^bits fp32 codebook values on `device`, cached: the Triton kernel indexes it by code."""
    return codebook(kind, bits, False, device=device).float().contiguous()
