"""The adapter methods a matrix can be planned with, each described in one place: "lora" (LoftQ / LQ-LoRA /
QLoRA: a full-width adapter over any quantizer) and "qalora" (QA-LoRA: asymmetric INT-k in groups with a
group-pooled adapter that merges into the zero-points). Callers look a method up by name (or by its layer)
instead of branching on the name: storage cost, which shapes it applies to, its decomposition, the layer that
holds it, and the adapter's dense (out, in) product."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .blockwise import QuantizedTensor
from .config import QuantConfig
from .decompose import decompose
from .layers import QuantLoRALinear
from .lowrank import SolverSettings
from .qalora import (
    QALoRALinear,
    adapter_weight,
    check_qalora_config,
    max_rank,
    qalora_decompose,
    qalora_matrix_bits,
    useful_steps,
)


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    title: str  # for messages
    layer: type[QuantLoRALinear]
    check_config: Callable[[QuantConfig], None]  # ValueError for a quantizer the method cannot use
    matrix_bits: Callable[[QuantConfig, tuple[int, int], int], int]  # exact storage + 16-bit adapters
    applies_to: Callable[[QuantConfig, tuple[int, int], int], bool]
    adapter_params: Callable[[QuantConfig, tuple[int, int], int], int]
    # (w, config, rank, iters, *, fisher, solver[, rounding]), as quant.decompose -> (Q, a, b) with W ≈ Q + dense(a, b)
    decompose: Callable[..., tuple[QuantizedTensor, torch.Tensor, torch.Tensor]]
    dense: Callable[[torch.Tensor, torch.Tensor, QuantConfig], torch.Tensor]
    # Fisher-weighted factors are badly scaled for training; rescaling them keeps the product (see balance_factors)
    balance_weighted: bool


def _lora_decompose(w, config, rank, iters, *, fisher, solver: SolverSettings, rounding: str = "nearest"):
    d = decompose(w, config, rank, iters, fisher=fisher, solver=solver, rounding=rounding)
    return d.q, d.a, d.b


def _qalora_decompose(w, config, rank, iters, *, fisher, solver: SolverSettings, rounding: str = "nearest"):
    if rounding != "nearest":
        raise ValueError("QA-LoRA layers round to nearest; error-compensating rounding is for LoRA points")
    d = qalora_decompose(w, config, rank, useful_steps(iters), fisher=fisher, solver=solver)
    return d.q, d.a, d.b


def _qalora_applies(config: QuantConfig, shape, rank: int) -> bool:
    m, n = (int(x) for x in shape)
    return n % config.blocksize == 0 and rank <= max_rank((m, n), config.blocksize)


LORA = AdapterMethod(
    name="lora", title="LoRA", layer=QuantLoRALinear, check_config=lambda config: None,
    matrix_bits=lambda config, shape, rank: config.matrix_bits(shape, rank),
    applies_to=lambda config, shape, rank: True,  # a rank above min(shape) is an error the profiler reports
    adapter_params=lambda config, shape, rank: rank * (shape[0] + shape[1]),
    decompose=_lora_decompose, dense=lambda a, b, config: a @ b.T, balance_weighted=True)

QALORA = AdapterMethod(
    name="qalora", title="QA-LoRA", layer=QALoRALinear, check_config=check_qalora_config, matrix_bits=qalora_matrix_bits,
    applies_to=_qalora_applies, decompose=_qalora_decompose,
    adapter_params=lambda config, shape, rank: rank * (shape[0] + shape[1] // config.blocksize),
    # QALoRALinear's (a, b) are (lora_B, lora_Aᵀ): the pooled adapter's dense form expands lora_A over the groups
    dense=lambda a, b, config: adapter_weight(b.T, a, config.blocksize), balance_weighted=False)

METHODS: dict[str, AdapterMethod] = {m.name: m for m in (LORA, QALORA)}


def get_method(name: str) -> AdapterMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is not supported; use one of {tuple(METHODS)}") from None


def method_of(layer: QuantLoRALinear) -> AdapterMethod:
    """The method whose layer class `layer` is (the most derived match: QALoRALinear is a QuantLoRALinear)."""
    return max((m for m in METHODS.values() if isinstance(layer, m.layer)), key=lambda m: len(m.layer.__mro__))
