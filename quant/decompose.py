"""W ≈ Q + A·Bᵀ: LoftQ's alternating quantize ↔ rank-r SVD, with LQ-LoRA's row/column Fisher weighting.

With F_ij ≈ r_i·c_j and D_r = diag(√r), D_c = diag(√c), the weighted rank-r step is exact: the SVD of
D_r(W − Q)D_c = UΣVᵀ gives A = D_r⁻¹U√Σ, B = D_c⁻¹V√Σ, and the error is ‖D_r(W − Q − ABᵀ)D_c‖²_F.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockwise import QuantizedTensor, quantize, quantize_dequantize
from .config import QuantConfig
from .lowrank import SolverSettings, exact_lowrank, randomized_lowrank

# Relative slack under which an error increase across LoftQ steps counts as float noise, not a regression.
NOISE = 1e-6


@dataclass
class Decomposition:
    q: QuantizedTensor
    a: torch.Tensor  # (m, r): PEFT's lora_B
    b: torch.Tensor  # (n, r): PEFT's lora_A transposed
    error: float  # (weighted) squared Frobenius error of the returned iterate
    errors: list[float] = field(default_factory=list)  # per iteration (index 0: plain quantization when iters=0)
    best_iter: int = 0  # 1-based iteration whose iterate is returned (0: plain quantization)
    regressed: bool = False  # an iteration increased the error beyond noise; the best iterate is returned


def check_matrix(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = f"{w.dim()}-D tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"decompose needs a 2-D weight matrix (out, in), got a {got}")
    if w.numel() == 0:
        raise ValueError("decompose got an empty matrix")
    if not torch.isfinite(w).all():
        raise ValueError("weight matrix contains NaN or Inf values; fix or drop the matrix before decomposing")


def check_fisher(fisher, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    if fisher is None:
        return None
    try:
        rows, cols = fisher
    except (TypeError, ValueError):
        raise ValueError("fisher must be a (row_weights, col_weights) pair of 1-D tensors") from None
    if not (isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor)):
        raise ValueError("fisher must be a (row_weights, col_weights) pair of 1-D tensors, got "
                         f"({type(rows).__name__}, {type(cols).__name__}); convert with torch.as_tensor")
    m, n = shape
    if rows.shape != (m,) or cols.shape != (n,):
        raise ValueError(f"fisher weights have shapes {tuple(rows.shape)}, {tuple(cols.shape)}; "
                         f"the matrix needs ({m},) and ({n},)")
    if not (torch.isfinite(rows).all() and torch.isfinite(cols).all()) or (rows < 0).any() or (cols < 0).any():
        raise ValueError("fisher weights must be finite and non-negative")
    if not (rows.sum() > 0 and cols.sum() > 0):
        # All-zero weights make every error 0 and blow A or B up by 1/√floor; no ranking can come from that.
        raise ValueError("fisher weights are all zero on one side (no gradient reached this matrix); "
                         "drop fisher for it or calibrate on more data")
    return rows, cols


def _sqrt_weights(v: torch.Tensor) -> torch.Tensor:
    # A zero weight would make D⁻¹ infinite; floor it at a tiny fraction of the mean (LQ-LoRA does the same).
    v = v.float()
    floor = v.mean().clamp_min(torch.finfo(torch.float32).tiny) * 1e-6
    return v.clamp_min(floor).sqrt()


def weighted_error(residual: torch.Tensor, dr: torch.Tensor | None, dc: torch.Tensor | None) -> float:
    if dr is None:
        return float(residual.double().pow(2).sum())
    return float((dr[:, None] * residual * dc[None, :]).double().pow(2).sum())


def decompose(w: torch.Tensor, config: QuantConfig, rank: int, iters: int = 5, fisher=None,
              solver: SolverSettings | None = None) -> Decomposition:
    """LoftQ / LQ-LoRA decomposition of one matrix.

    iters=0 or rank=0: plain quantization Q = q(W) with a zero adapter (QLoRA). Otherwise `iters` alternating
    steps Q ← q(W − ABᵀ), (A, B) ← rank-r (weighted) SVD of W − Q. The best iterate is returned; `regressed`
    says if some step made the error worse beyond float noise."""
    check_matrix(w)
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    m, n = w.shape
    if not isinstance(rank, int) or rank < 0 or rank > min(m, n):
        raise ValueError(f"rank={rank} is invalid for a {m}x{n} matrix; use 0 <= rank <= {min(m, n)}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters} is invalid; use an integer >= 0")
    solver = solver or SolverSettings()
    weights = check_fisher(fisher, (m, n))
    w = w.float()
    dr, dc = (None, None) if weights is None else (_sqrt_weights(weights[0]).to(w.device),
                                                   _sqrt_weights(weights[1]).to(w.device))

    zeros_a = torch.zeros(m, rank, device=w.device)
    zeros_b = torch.zeros(n, rank, device=w.device)
    if rank == 0 or iters == 0:
        q = quantize(w, config)
        err = weighted_error(w - q.dequantize(), dr, dc)
        return Decomposition(q, zeros_a, zeros_b, err, [err], 0, False)

    generator = torch.Generator(device=w.device).manual_seed(solver.seed)
    a, b = zeros_a, zeros_b
    start = None
    best = None
    errors: list[float] = []
    regressed = False
    for t in range(1, iters + 1):
        target_q = w - a @ b.T
        residual = w - quantize_dequantize(target_q, config)
        target = residual if dr is None else dr[:, None] * residual * dc[None, :]
        if solver.method == "exact":
            a, b = exact_lowrank(target, rank)
        else:
            a, b, start = randomized_lowrank(target, rank, solver, start, generator)
        if dr is not None:
            a, b = a / dr[:, None], b / dc[:, None]
        err = weighted_error(residual - a @ b.T, dr, dc)
        if errors and err > min(errors) * (1 + NOISE):
            regressed = True
        errors.append(err)
        if best is None or err < best[3]:
            best = (target_q, a, b, err, t)
    target_q, a, b, err, t = best
    # Pack only the iterate we return: quantization is deterministic, so this is the Q the error was measured on.
    return Decomposition(quantize(target_q, config), a.contiguous(), b.contiguous(), err, errors, t, regressed)
