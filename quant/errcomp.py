"""Error-compensating rounding under the output-aware norm, in GPTQ's manner (Frantar et al. 2022), for the LoftQ
loop's quantizer step: Q = argmin-ish ‖(T − Q)·L‖²_F over the codes, with L·Lᵀ = H the damped input second moment,
instead of rounding every weight of the target T = W − A·Bᵀ to its nearest code.

The blockwise absmax scales are fixed first from T exactly as blockwise.quantize stores them (double quantization
included), so the storage format and its cost are unchanged; only the codes differ. Columns are then quantized in
order; each column's rounding error e_j, divided by the j-th diagonal entry of U (H⁻¹ = Uᵀ·U, U upper-triangular),
is spread over the columns not yet quantized along U's j-th row, which is GPTQ's closed-form optimal update of the
remaining weights for that error. Rows are independent, so row weights D_r do not change the result. Updates are
applied lazily in column blocks (GPTQ's batching), the arithmetic in float64.

Symmetric codebooks only (NF, symmetric INT): an asymmetric min/max zero-point moves with its block's values."""

from __future__ import annotations

import torch

from .blockwise import QuantizedTensor, quantize_blocks
from .codebooks import codebook, midpoints
from .config import QuantConfig
from .packing import pack_codes

COLUMN_BLOCK = 128  # columns whose updates are applied together (GPTQ's lazy batch)


def inverse_hessian_factor(chol: torch.Tensor) -> torch.Tensor:
    """U (float64, upper-triangular) with Uᵀ·U = H⁻¹ for H = L·Lᵀ, L = `chol`."""
    h_inv = torch.cholesky_inverse(chol.double())
    return torch.linalg.cholesky(h_inv, upper=True)


def gptq_quantize(target: torch.Tensor, config: QuantConfig, chol: torch.Tensor,
                  factor: torch.Tensor | None = None) -> QuantizedTensor:
    """`target` (m, n) quantized with `config` into packed storage, codes chosen column by column with GPTQ's error
    compensation under H = chol·cholᵀ (n, n). `factor`: inverse_hessian_factor(chol), when the caller reuses it."""
    if config.asymmetric:
        raise ValueError("error-compensating rounding needs a symmetric codebook (NF or symmetric INT); "
                         f"{config.label} has a per-block zero-point")
    if target.dim() != 2:
        raise ValueError(f"error-compensating rounding needs a 2-D matrix, got {target.dim()}-D")
    m, n = target.shape
    if chol.shape != (n, n):
        raise ValueError(f"the input covariance factor has shape {tuple(chol.shape)}; the matrix needs ({n}, {n})")
    codes_ref, scale_f, _, stored = quantize_blocks(target.float(), config)
    numel = m * n
    scale = scale_f.repeat_interleave(config.blocksize)[:numel].view(m, n).double()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    table = codebook(config.kind, config.bits, device=target.device)
    mids = midpoints(table)
    table64 = table.double()
    u = inverse_hessian_factor(chol) if factor is None else factor

    w = target.double().clone()
    codes = torch.empty(m, n, dtype=torch.uint8, device=target.device)
    for lo in range(0, n, COLUMN_BLOCK):
        hi = min(lo + COLUMN_BLOCK, n)
        block = w[:, lo:hi]  # a view: updated in place
        errs = torch.empty(m, hi - lo, dtype=torch.float64, device=target.device)
        u_block = u[lo:hi, lo:hi]
        for j in range(hi - lo):
            col = block[:, j]
            s = scale[:, lo + j]
            normalized = torch.where(s == 0, torch.zeros_like(col), col / safe[:, lo + j])
            code = torch.bucketize(normalized.float(), mids, right=False)
            codes[:, lo + j] = code.to(torch.uint8)
            err = (col - table64[code] * s) / u_block[j, j]
            block[:, j:] -= err[:, None] * u_block[j, j:][None, :]
            errs[:, j] = err
        if hi < n:
            w[:, hi:] -= errs @ u[lo:hi, hi:]
    flat = codes_ref.reshape(-1).clone()  # the padding after the last weight keeps the reference's codes
    flat[:numel] = codes.reshape(-1)
    return QuantizedTensor(config, (m, n), codes=pack_codes(flat.view_as(codes_ref), config.bits), **stored)
