"""What the decompositions and the profiler return: plain result records, in a module of their own so that the
modules producing them (decompose, qalora, engine, fastgrid) need not import one another for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockwise import QuantizedTensor


@dataclass(frozen=True)
class PointResult:
    """The profiler's numbers for one (config, rank[, method]) grid point of one matrix."""

    error: float  # (Fisher-weighted if weights were given) squared Frobenius error of the best iterate
    error_unweighted: float  # plain squared Frobenius error of the same iterate
    quant_error: float  # weighted error of plain quantization q(W), no adapter (T = 0)
    best_iter: int
    regressed: bool
    seconds: float


@dataclass
class Decomposition:
    """W ≈ Q + A·Bᵀ (quant.decompose)."""

    q: QuantizedTensor
    a: torch.Tensor  # (m, r): PEFT's lora_B
    b: torch.Tensor  # (n, r): PEFT's lora_A transposed
    error: float  # (weighted) squared Frobenius error of the returned iterate
    errors: list[float] = field(default_factory=list)  # per iteration (index 0: plain quantization when iters=0)
    best_iter: int = 0  # 1-based iteration whose iterate is returned (0: plain quantization)
    regressed: bool = False  # an iteration increased the error beyond noise; the best iterate is returned


@dataclass
class QALoRADecomposition:
    """W ≈ Q + lora_B·lora_A·E/g with a group-pooled adapter (quant.qalora)."""

    q: QuantizedTensor
    lora_a: torch.Tensor  # (r, in/g): acts on the pooled input
    lora_b: torch.Tensor  # (out, r)
    error: float  # ‖W − Q − lora_B·lora_A·E/g‖²_F of the returned iterate (Fisher-weighted when weights were given)
    errors: list[float] = field(default_factory=list)  # per iteration (index 0: plain quantization when iters=0)
    best_iter: int = 0  # 1-based iteration returned (0: plain quantization)
    regressed: bool = False  # a step increased the error beyond float noise; the best iterate is returned

    # decompose()'s naming, so that QALoRALinear(d.q, bias, d.a, d.b) reads as QuantLoRALinear(d.q, bias, d.a, d.b).
    @property
    def a(self) -> torch.Tensor:  # (out, r)
        return self.lora_b

    @property
    def b(self) -> torch.Tensor:  # (in/g, r)
        return self.lora_a.T
