"""W ≈ Q + A·Bᵀ for one matrix: LoftQ's alternating quantize ↔ rank-r SVD (exact or randomized), plain, with
LQ-LoRA's row/column Fisher weighting, or output-aware (quant.weighting).

With F_ij ≈ r_i·c_j and D_r = diag(√r), D_c = diag(√c), the weighted rank-r step is exact: the SVD of
D_r(W − Q)D_c = UΣVᵀ gives A = D_r⁻¹U√Σ, B = D_c⁻¹V√Σ, and the error is ‖D_r(W − Q − ABᵀ)D_c‖²_F. Output-aware,
D_c becomes L, the Cholesky factor of the layer's damped input second moment: the SVD of D_r(W − Q)L gives
A = D_r⁻¹U√Σ, B = L⁻ᵀV√Σ (CLoQ's calibrated adapter for that Q) and the error ‖D_r(W − Q − ABᵀ)L‖²_F.
"""

from __future__ import annotations

import torch

from .blockwise import quantize
from .config import QuantConfig
from .errcomp import gptq_quantize, inverse_hessian_factor
from .loftq import (
    LORA_NOISE,
    alternate,
    check_matrix,
    plain_quantization,
    prepare,
    requantize,
)
from .lowrank import SolverSettings, exact_lowrank, randomized_lowrank
from .results import Decomposition


ROUNDINGS = ("nearest", "gptq")


def decompose(w: torch.Tensor, config: QuantConfig, rank: int, iters: int = 5, *, fisher=None,
              solver: SolverSettings | None = None, rounding: str = "nearest") -> Decomposition:
    """LoftQ / LQ-LoRA decomposition of one matrix.

    iters=0 or rank=0: plain quantization Q = q(W) with a zero adapter (QLoRA). Otherwise `iters` alternating
    steps Q ← q(W − ABᵀ), (A, B) ← rank-r (weighted) SVD of W − Q. The best iterate is returned; `regressed`
    says if some step made the error worse beyond float noise. fisher: None (plain norm), LQ-LoRA's
    (row_weights, col_weights) pair, or a quant.weighting.Weighting (diagonal or output-aware). rounding: "nearest"
    (every weight to its nearest code) or "gptq" (quant.errcomp's error-compensating codes under the output-aware
    weighting's input covariance; same scales and storage)."""
    check_matrix(w)
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    m, n = w.shape
    if not isinstance(rank, int) or rank < 0 or rank > min(m, n):
        raise ValueError(f"rank={rank} is invalid for a {m}x{n} matrix; use 0 <= rank <= {min(m, n)}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters} is invalid; use an integer >= 0")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not supported; use one of {ROUNDINGS}")
    w, metric, solver = prepare(w, fisher, solver)
    if rounding == "gptq" and not metric.output:
        raise ValueError("rounding='gptq' compensates errors under an input covariance: pass the output-aware "
                         "Weighting (quant.weighting.Weighting.output)")
    gptq = rounding == "gptq"
    factor = inverse_hessian_factor(metric.chol) if gptq else None

    if rank == 0 or iters == 0:
        if gptq:
            q = gptq_quantize(w, config, metric.chol, factor)
            err = metric.error(w - q.dequantize())
        else:
            q, err = plain_quantization(w, config, metric)
        return Decomposition(q, torch.zeros(m, rank, device=w.device), torch.zeros(n, rank, device=w.device),
                             err, [err], 0, False)

    generator = torch.Generator(device=w.device).manual_seed(solver.seed)
    start = None  # the randomized solver's warm start: the previous step's right singular vectors

    def lowrank_step(residual):
        nonlocal start
        target = metric.weigh(residual)
        if solver.method == "exact":
            a, b = exact_lowrank(target, rank)
        else:
            a, b, start = randomized_lowrank(target, rank, solver, start, generator)
        return metric.unmap(a, b)

    def measure(residual, low):
        return metric.error(residual - low[0] @ low[1].T)

    def gptq_step(low):
        target = w if low is None else w - low[0] @ low[1].T
        q = gptq_quantize(target, config, metric.chol, factor)
        return q, w - q.dequantize()

    step = gptq_step if gptq else requantize(w, config, lambda low: low[0] @ low[1].T)
    trace = alternate(iters, step, lowrank_step, measure, regress_noise=LORA_NOISE)
    kept, (a, b) = trace.best
    # Pack only the iterate we return: quantization is deterministic, so this is the Q the error was measured on.
    q = kept if gptq else quantize(kept, config)
    return Decomposition(q, a.contiguous(), b.contiguous(), trace.errors[trace.best_iter - 1], trace.errors,
                         trace.best_iter, trace.regressed)
