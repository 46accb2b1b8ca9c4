"""The LoftQ alternating loop, written once: Q ← q(W − L), L ← rank-r fit of W − Q, `iters` times, keeping the
best iterate and saying whether a step made the error worse.

The variants plug in their steps and own nothing of the control flow: quant.decompose (exact or randomized SVD,
one configuration), quant.fastgrid (many configurations batched, errors left on the device until the end) and
quant.qalora (L constant within each group of input columns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .blockwise import QuantizedTensor, quantize, quantize_dequantize
from .config import QuantConfig
from .lowrank import SolverSettings
from .weighting import Metric, check_weighting

# Relative slack under which an error increase across LoftQ steps counts as float noise, not a regression.
LORA_NOISE = 1e-6


@dataclass
class Trace:
    errors: list  # per step, as `measure` returned it (floats, or the batched variant's device tensors)
    best_iter: int | None = None  # 1-based step of the kept iterate (None: not selected, keep_best=False)
    regressed: bool | None = None
    best: tuple | None = None  # (what was quantized, the low-rank step's result) of that step


def check_matrix(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = f"{w.dim()}-D tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"decompose needs a 2-D weight matrix (out, in), got a {got}")
    if w.numel() == 0:
        raise ValueError("decompose got an empty matrix")
    if not torch.isfinite(w).all():
        raise ValueError("weight matrix contains NaN or Inf values; fix or drop the matrix before decomposing")


def prepare(w: torch.Tensor, weights, solver: SolverSettings | None):
    """The inputs of a one-matrix loop: (W in fp32, its Metric, solver) with the weights (None, a diagonal Fisher
    pair or a quant.weighting.Weighting) checked and put on W's device, the solver defaulting to the randomized one."""
    weights = check_weighting(weights, tuple(w.shape))
    w = w.float()
    return w, Metric.of(weights, w.device), solver or SolverSettings()


def plain_quantization(w: torch.Tensor, config: QuantConfig, metric: Metric) -> tuple[QuantizedTensor, float]:
    """T = 0 (or rank 0): Q = q(W) with no adapter, and its (weighted) error measured on the packed storage."""
    q = quantize(w, config)
    return q, metric.error(w - q.dequantize())


def plain_error(w: torch.Tensor, config: QuantConfig, metric: Metric) -> float:
    """The (weighted) error of q(W) alone, without packing."""
    return metric.error(w - quantize_dequantize(w, config))


def requantize(w: torch.Tensor, config: QuantConfig, dense: Callable[[Any], torch.Tensor]):
    """The quantizer step of the one-matrix variants: low (the previous low-rank result, None on step 1) ->
    (W − L, W − q(W − L)) with L = dense(low). Step 1 quantizes W itself (W − 0 has the same bits)."""
    def step(low):
        target = w if low is None else w - dense(low)
        return target, w - quantize_dequantize(target, config)
    return step


def _improves(err, best_err, tie_noise: float) -> bool:
    return best_err is None or err < best_err * (1 - tie_noise)


def pick_best(errors: list[float], regress_noise: float, tie_noise: float = 0.0) -> tuple[int, bool]:
    """(0-based index of the kept step, whether some step rose above the best before it by more than
    regress_noise, relatively). The kept step is the first whose error is below every earlier one by more than
    tie_noise (0: the first minimum)."""
    best, regressed = None, False
    for t, err in enumerate(errors):
        regressed = regressed or (t > 0 and err > min(errors[:t]) * (1 + regress_noise))
        if _improves(err, None if best is None else errors[best], tie_noise):
            best = t
    return best, regressed


def alternate(iters: int, quantize_step, lowrank_step, measure, *, regress_noise: float, tie_noise: float = 0.0,
              keep_best: bool = True) -> Trace:
    """Run `iters` LoftQ steps: (quantized, residual) = quantize_step(low) with low the previous step's low-rank
    result (None on step 1), low = lowrank_step(residual), error = measure(residual, low).

    keep_best: errors are floats; the best step's (quantized, low) is kept as the loop goes (one iterate held, not
    all) and Trace says which step it was and whether the loop regressed. Without it (a batch of chains whose
    errors stay on the device) the caller picks per chain with pick_best once the errors are on the host."""
    low = None
    errors: list = []
    best = best_err = None
    for _ in range(iters):
        quantized, residual = quantize_step(low)
        low = lowrank_step(residual)
        err = measure(residual, low)
        errors.append(err)
        if keep_best and _improves(err, best_err, tie_noise):
            best, best_err = (quantized, low), err
    if not keep_best:
        return Trace(errors)
    index, regressed = pick_best(errors, regress_noise, tie_noise)
    return Trace(errors, index + 1, regressed, best)
