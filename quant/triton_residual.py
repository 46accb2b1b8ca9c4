"""A Triton kernel for the profiler's quantization residual in one pass: out = w − dequant(quant(x)) for blockwise
codebook quantization with given per-block scales.

Hand-written because the eager chain (divide, bucketize, gather, scale, subtract, copy) reads and writes the
m x n matrix about a dozen times per LoftQ step, and no library quantizes to lqplan's codebooks; this reads x and w
once and writes out once. Bit for bit equal to the eager path (quant.fastgrid's quantizer): IEEE division
(div_rn, not Triton's approximate `/`), the code as the number of codebook midpoints strictly below the scaled
value (torch.bucketize's right=False), and no FMA contraction of the final `w − value · scale`.

Like quant.triton_dequant, it runs on CUDA tensors with Triton installed, or in Triton's CPU interpreter
(TRITON_INTERPRET=1, which the tests use)."""

from __future__ import annotations

import functools

import torch

from .triton_dequant import available, interpreting, triton_module

VALUES_PER_PROGRAM = 2048


def supports(bits: int) -> bool:
    """Codebooks of 2^bits values with bits in 1..8 (a branch-free binary search of bits steps)."""
    return 1 <= bits <= 8


@functools.cache
def _kernel(interpret: bool):
    """Compile on first use: @triton.jit reads TRITON_INTERPRET when it runs (the tests set it after import); one
    kernel per mode (`interpret`), as quant.triton_dequant."""
    triton = triton_module()
    tl = triton.language

    @triton.jit
    def residual(w, x, scales, mids, table, out, numel, block, BITS: tl.constexpr, VALUES: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * VALUES + tl.arange(0, VALUES)
        mask = idx < numel
        xv = tl.load(x + idx, mask=mask, other=0.0)
        s = tl.load(scales + idx // block, mask=mask, other=1.0)
        safe = tl.where(s == 0.0, 1.0, s)  # a zero scale dequantizes every code to 0: any code will do
        v = tl.math.div_rn(xv, safe)
        # Number of midpoints < v (2^BITS − 1 sorted midpoints): after the steps of sizes 2^(BITS−1) .. 1,
        # pos + step − 1 never exceeds the last midpoint's index.
        pos = (idx * 0).to(tl.int32)
        for i in tl.static_range(BITS):
            probe = tl.load(mids + pos + ((1 << (BITS - 1 - i)) - 1), mask=mask, other=float("inf"))
            pos = tl.where(probe < v, pos + (1 << (BITS - 1 - i)), pos)
        value = tl.load(table + pos, mask=mask, other=0.0) * s
        wv = tl.load(w + idx, mask=mask, other=0.0)
        tl.store(out + idx, wv - value, mask=mask)

    return residual


def residual_into(out: torch.Tensor, w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor,
                  mids: torch.Tensor, table: torch.Tensor, blocksize: int, bits: int) -> torch.Tensor:
    """out = w − table[bucketize(x / scale, mids)] · scale with one fp32 scale per run of `blocksize` elements of
    x's flat order (the last block may be short). All contiguous fp32 on one device; returns out."""
    if not supports(bits):
        raise ValueError(f"the residual kernel handles 1..8-bit codebooks, got {bits} bits")
    if not available(x.device):
        raise ValueError("the residual kernel needs a CUDA tensor and Triton (or TRITON_INTERPRET=1)")
    for name, t in (("out", out), ("w", w), ("x", x), ("scales", scales), ("mids", mids), ("table", table)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32")
    if not (out.shape == w.shape == x.shape) or mids.numel() != (1 << bits) - 1 or table.numel() != 1 << bits:
        raise ValueError("out, w and x must have one shape, and the codebook 2^bits values with 2^bits − 1 midpoints")
    numel = x.numel()
    grid = (-(-numel // VALUES_PER_PROGRAM),)
    options = {} if interpreting() else {"enable_fp_fusion": False, "num_warps": 4}
    # The block size is a runtime argument: one compiled kernel per code width, not per (width, block size).
    _kernel(interpreting())[grid](w, x, scales, mids, table, out, numel, blocksize, BITS=bits,
                                  VALUES=VALUES_PER_PROGRAM, **options)
    return out
