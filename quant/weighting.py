"""LQ-LoRA's row/column Fisher weighting F_ij ≈ r_i·c_j: checking the weights, their square-root scales
D_r = diag(√r), D_c = diag(√c), and the weighted squared error ‖D_r·R·D_c‖²_F."""

from __future__ import annotations

import torch


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


def sqrt_weights(v: torch.Tensor) -> torch.Tensor:
    """√v in fp32, the diagonal of D_r or D_c for one side's weights v."""
    # A zero weight would make D⁻¹ infinite; floor it at a tiny fraction of the mean (LQ-LoRA does the same).
    v = v.float()
    floor = v.mean().clamp_min(torch.finfo(torch.float32).tiny) * 1e-6
    return v.clamp_min(floor).sqrt()


def fisher_scales(fisher, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dr, dc) = the square-rooted (row_weights, col_weights) on `device`, or (None, None) without weights."""
    if fisher is None:
        return None, None
    return sqrt_weights(fisher[0]).to(device), sqrt_weights(fisher[1]).to(device)


def weigh(r: torch.Tensor, dr: torch.Tensor | None, dc: torch.Tensor | None) -> torch.Tensor:
    """D_r·R·D_c (R itself without weights); R may be a batch (…, m, n)."""
    return r if dr is None else dr[:, None] * r * dc[None, :]


def weighted_error(residual: torch.Tensor, dr: torch.Tensor | None, dc: torch.Tensor | None) -> float:
    """‖D_r·R·D_c‖²_F (‖R‖²_F without weights), summed in float64."""
    return float(weigh(residual, dr, dc).double().pow(2).sum())
