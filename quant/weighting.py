"""What a matrix's error is weighted by, and the weighted norm itself.

Two weightings of the residual E = W − Q − A·Bᵀ of an (m, n) matrix (docs/objectives.md):

- diagonal Fisher (LQ-LoRA): F_ij ≈ r_i·c_j, error ‖D_r·E·D_c‖²_F with D_r = diag(√r), D_c = diag(√c);
- output-aware (Kronecker-factored Fisher): error ‖D_r·E·L‖²_F with L the lower Cholesky factor of the damped input
  second moment R = E[x·xᵀ] (so ‖E·L‖²_F = E‖E·x‖², the layer's output error over its inputs) and optional row
  weights r_i = E[(∂ℓ/∂y_i)²]. LQ-LoRA's r·cᵀ is the case where R is diagonal.

A `Weighting` holds the weights as given (any device, validated once); `Metric` is its square-rooted form on the
matrix's device, with the three operations every decomposition needs: weigh a residual, measure its error, and map
a rank-r factorisation of the weighted target back to the plain adapter. Both weightings keep the rank-r step exact:
the truncated SVD of D_r(W − Q)·K = UΣVᵀ (K = D_c or L) gives A = D_r⁻¹U√Σ, B = K⁻ᵀV√Σ."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lowrank import exact_lowrank

# Ridge added to R before its Cholesky factor: λ·mean(diag R)·I (GPTQ's "percdamp" uses the same form, 0.01).
DEFAULT_DAMPING = 0.01


@dataclass(frozen=True, eq=False)
class Weighting:
    """The weights of one (m, n) matrix's error. rows: (m,) row (output) weights r_i >= 0, or None for none (output
    kind only). cols: (n,) column weights c_j >= 0 (diagonal kind). chol: (n, n) lower-triangular L with positive
    diagonal, R_damped = L·Lᵀ (output kind). Exactly one of cols / chol is set."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    chol: torch.Tensor | None = None

    @classmethod
    def diagonal(cls, rows: torch.Tensor, cols: torch.Tensor) -> "Weighting":
        return cls(rows=rows, cols=cols)

    @classmethod
    def output(cls, chol: torch.Tensor, rows: torch.Tensor | None = None) -> "Weighting":
        return cls(rows=rows, chol=chol)

    @property
    def kind(self) -> str:
        return "output" if self.chol is not None else "diagonal"

    def to(self, device) -> "Weighting":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Weighting(move(self.rows), move(self.cols), move(self.chol))


def _check_vector(v, size: int, what: str) -> None:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{what} must be a 1-D tensor, got {type(v).__name__}; convert with torch.as_tensor")
    if v.shape != (size,):
        raise ValueError(f"{what} have shape {tuple(v.shape)}; the matrix needs ({size},)")
    if not torch.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    if not v.sum() > 0:
        raise ValueError(f"{what} are all zero (no gradient reached this matrix); drop them or calibrate on more "
                         "data")


def check_fisher(fisher, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A diagonal Fisher pair (row_weights, col_weights) checked against the matrix shape (None passes)."""
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


def check_weighting(weights, shape) -> Weighting | None:
    """`weights` (None, a diagonal (rows, cols) pair, or a Weighting) as a checked Weighting for an (m, n) matrix."""
    if weights is None:
        return None
    if not isinstance(weights, Weighting):
        return Weighting.diagonal(*check_fisher(weights, shape))
    m, n = shape
    if (weights.cols is None) == (weights.chol is None):
        raise ValueError("a Weighting needs exactly one of cols (diagonal Fisher) or chol (input covariance factor)")
    if weights.cols is not None:
        check_fisher((weights.rows, weights.cols), shape)
        return weights
    if weights.rows is not None:
        _check_vector(weights.rows, m, "row weights")
    chol = weights.chol
    if not isinstance(chol, torch.Tensor) or chol.shape != (n, n):
        got = tuple(chol.shape) if isinstance(chol, torch.Tensor) else type(chol).__name__
        raise ValueError(f"the input covariance factor has shape {got}; the matrix needs ({n}, {n})")
    diag = chol.diagonal()
    if not torch.isfinite(chol).all() or not (diag > 0).all():
        raise ValueError("the input covariance factor must be finite with a positive diagonal (a Cholesky factor "
                         "of a damped covariance; see quant.weighting.damped_cholesky)")
    if torch.count_nonzero(torch.triu(chol, 1)):
        raise ValueError("the input covariance factor must be lower-triangular (torch.linalg.cholesky's L)")
    return weights


def damped_cholesky(second_moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """L (fp32, lower-triangular) with L·Lᵀ = R + damping·mean(diag R)·I, factored in float64.

    The ridge makes R positive definite when fewer tokens than input features were seen, or some features never
    vary, and keeps L⁻¹ (which maps the adapter back) well conditioned. damping=0 factors R itself (it must then be
    positive definite)."""
    r = second_moment.double()
    if r.dim() != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"the input second moment must be a square matrix, got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("the input second moment contains NaN or Inf values; recompute the calibration statistics")
    if not damping >= 0:
        raise ValueError(f"damping={damping!r} must be a number >= 0, e.g. 0.01")
    r = (r + r.T) / 2
    mean = float(r.diagonal().mean())
    if not mean > 0:
        raise ValueError("the input second moment is zero (no input reached this matrix); calibrate on more data")
    n = r.shape[0]
    chol, info = torch.linalg.cholesky_ex(r + damping * mean * torch.eye(n, dtype=r.dtype, device=r.device))
    if int(info) != 0:
        raise ValueError("the input second moment is not positive definite; use a damping > 0")
    return chol.float()


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


@dataclass(frozen=True, eq=False)
class Metric:
    """A weighted Frobenius norm on one device: dr (m,) = √row weights or None; then either dc (n,) = √column weights
    (diagonal) or chol (n, n) = L (output-aware); all None: the plain norm."""

    dr: torch.Tensor | None = None
    dc: torch.Tensor | None = None
    chol: torch.Tensor | None = None

    @classmethod
    def of(cls, weights: Weighting | None, device) -> "Metric":
        """The metric of a checked Weighting (check_weighting) on `device`; the plain norm for None."""
        if weights is None:
            return cls()
        if weights.chol is None:
            return cls(*fisher_scales((weights.rows, weights.cols), device))
        dr = None if weights.rows is None else sqrt_weights(weights.rows).to(device)
        return cls(dr=dr, chol=weights.chol.float().to(device))

    @property
    def plain(self) -> bool:
        return self.dr is None and self.chol is None

    @property
    def output(self) -> bool:
        return self.chol is not None

    def weigh(self, r: torch.Tensor) -> torch.Tensor:
        """The weighted residual: D_r·R·D_c, or D_r·R·L; R itself for the plain norm. R may be a batch (…, m, n)."""
        if self.chol is None:
            return weigh(r, self.dr, self.dc)
        t = r @ self.chol.to(r.dtype)
        return t if self.dr is None else self.dr[:, None] * t

    def error(self, residual: torch.Tensor) -> float:
        """The squared weighted norm of one residual, summed in float64."""
        if self.chol is None:
            return weighted_error(residual, self.dr, self.dc)
        return float(self.weigh(residual).double().pow(2).sum())

    def unmap(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (a, b) of the weighted target's rank-r fit (…, m, r), (…, n, r) -> the plain adapter's (A, B):
        A = D_r⁻¹·a and B = D_c⁻¹·b, or B = L⁻ᵀ·b, so that D_r·A·Bᵀ·K = a·bᵀ."""
        if self.plain:
            return a, b
        if self.dr is not None:
            a = a / self.dr[:, None]
        if self.chol is None:
            return a, b / self.dc[:, None]
        return a, torch.linalg.solve_triangular(self.chol.T, b, upper=True)


def calibrated_adapter(residual: torch.Tensor, rank: int, weights: Weighting | None = None):
    """The rank-r (A, B) minimising ‖D_r(residual − A·Bᵀ)K‖²_F (K = D_c or L; the plain norm without weights):
    the exact truncated SVD of the weighted residual, mapped back (for the output weighting, CLoQ's calibrated
    initialisation given Q, with residual = W − Q). Returns A (m × r), B (n × r), fp32."""
    if residual.dim() != 2:
        raise ValueError(f"the residual must be a 2-D matrix, got {residual.dim()}-D")
    m, n = residual.shape
    if not isinstance(rank, int) or not 0 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} is invalid for a {m}x{n} matrix; use 0 <= rank <= {min(m, n)}")
    metric = Metric.of(check_weighting(weights, (m, n)), residual.device)
    return metric.unmap(*exact_lowrank(metric.weigh(residual.float()), rank))
