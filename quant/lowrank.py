"""Rank-r factorisations R ≈ A·Bᵀ: exact truncated SVD, a randomized subspace iteration that can be
warm-started from the previous call's right singular vectors (the LoftQ loop changes R only a little per step),
and the exact power-of-two rebalancing of a factor pair."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SolverSettings:
    """How the rank-r step is solved. "exact": torch.linalg.svd; "randomized": subspace iteration with
    `oversample` extra columns and `power_iters` power iterations, warm-started across LoftQ steps, seeded."""

    method: str = "randomized"
    oversample: int = 32
    # 3, not 2: over 6 MiniLM matrices x NF2/3/4 x ranks 16/32/64 x 4 seeds (T=5), 2 power iterations landed up to
    # 1.6% above exact-SVD LoftQ (5 of 216 above 1%); 3 stayed within 0.9946-1.0094 at about the same cost.
    power_iters: int = 3
    seed: int = 0
    # fp32 products of the randomized solver on TF32 tensor cores (CUDA only; planner.profile applies it for a whole
    # profile): on the default grid for 13B shapes, errors within 7.4e-5 relative of full-fp32 products, and the
    # 13824x5120 grid 1.8x faster on an H200 (reports/benchmarks.md). CPU results do not depend on it.
    tf32: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("exact", "randomized"):
            raise ValueError(f"solver method {self.method!r} is not supported; use 'exact' or 'randomized'")
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError("solver oversample and power_iters must be >= 0")

    @property
    def key(self) -> str:
        if self.method == "exact":
            return "exact"
        return f"rand-o{self.oversample}-p{self.power_iters}-s{self.seed}" + ("" if self.tf32 else "-fp32")


@contextlib.contextmanager
def matmul_precision(settings: SolverSettings):
    """CUDA fp32 matrix products at TF32 while the block runs when the randomized solver asks for it, restored after.
    A process-wide switch: enter it once around work that may run on several threads, never per thread."""
    on = settings.method == "randomized" and settings.tf32
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 refuses to read the legacy allow_tf32 once the newer fp32_precision was set: use the newer one
    # where it exists
    name, value = ("fp32_precision", "tf32" if on else "ieee") if hasattr(matmul, "fp32_precision") else \
        ("allow_tf32", on)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def exact_lowrank(r: torch.Tensor, rank: int):
    """A = U√Σ, B = V√Σ of the rank-`rank` truncated SVD of r."""
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return _split(u, s, vh, rank)


def randomized_lowrank(r: torch.Tensor, rank: int, settings: SolverSettings, start: torch.Tensor | None = None,
                       generator: torch.Generator | None = None):
    """Randomized rank-`rank` SVD by subspace iteration (Halko et al.). `start` (n x l) replaces the Gaussian
    test matrix: passing the previous step's right singular vectors makes each LoftQ step cheap and accurate.
    Returns A, B and the right singular vectors to warm-start the next call."""
    m, n = r.shape
    width = min(rank + settings.oversample, m, n)
    if start is not None and start.shape == (n, width):
        omega = start
    else:
        omega = torch.randn(n, width, device=r.device, dtype=r.dtype, generator=generator)
    y, _ = torch.linalg.qr(r @ omega)
    for _ in range(settings.power_iters):
        z, _ = torch.linalg.qr(r.T @ y)
        y, _ = torch.linalg.qr(r @ z)
    small = y.T @ r  # (width x n)
    u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
    a, b = _split(y @ u_s, s, vh, rank)
    return a, b, vh.T.contiguous()


def balance_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one component of a·bᵀ (a: m × r, b: n × r) by a power of two so that its two factors have
    about equal norms; the product is unchanged bit for bit (power-of-two scaling is exact in floating point).

    Why: Fisher-weighted factors D_r⁻¹U√Σ and D_c⁻¹V√Σ inherit the weights' absolute scale (LQ-LoRA's row weights
    are mean squared gradients, ~1e-8 on MiniLM), leaving one factor ~1e4 times the other; Adam then moves the tiny
    factor by ~lr per step, a huge relative change amplified by the big one (measured: held-out teacher cosine
    0.90 -> 0.55 in 3 steps at lr 5e-4)."""
    na, nb = a.float().norm(dim=0), b.float().norm(dim=0)
    ok = (na > 0) & (nb > 0)
    exponent = torch.where(ok, torch.round(0.5 * torch.log2(torch.where(ok, nb / na, torch.ones_like(na)))),
                           torch.zeros_like(na))
    scale = torch.exp2(exponent).to(a.dtype)
    return (a * scale).contiguous(), (b / scale.to(b.dtype)).contiguous()
