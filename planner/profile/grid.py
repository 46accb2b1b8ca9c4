"""The configuration grid: (quantization config, LoRA rank, method) points, parsed from CLI strings and validated.

method "lora" (LoftQ / LQ-LoRA / QLoRA: full-width adapters, any quantizer) or "qalora" (QA-LoRA: asymmetric INT-k in
groups of g input columns, adapters on the group-pooled input that merge into the zero-points; quant/qalora.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from quant import QuantConfig
from quant.methods import METHODS as ADAPTER_METHODS
from quant.methods import get_method

from ..errors import UserError
from ..model.ranks import DEFAULT_RANKS, default_ranks  # noqa: F401 (the grid's defaults; default_ranks re-exported)

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_BLOCKS = (16, 32, 64, 128)
METHODS = tuple(ADAPTER_METHODS)
GRID_METHODS = ("lora", "qalora", "both")
DEFAULT_GROUPS = (32, 64, 128)  # QA-LoRA group sizes g


# QA-LoRA (like the GPTQ kernels it builds on) stores scale and zero-point per (row, group) in fp16.
DEFAULT_QALORA_SCALE_DTYPE = "fp16"


@dataclass(frozen=True)
class GridPoint:
    """One candidate configuration for a matrix: how it is quantized, the rank of its adapter, and the method
    ("lora": a full-width LoRA adapter; "qalora": QA-LoRA's group-pooled adapter, needs an asymmetric INT config
    without double quantization)."""

    config: QuantConfig
    rank: int
    method: str = "lora"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"grid point method {self.method!r} is not supported; use one of {METHODS}")
        try:
            get_method(self.method).check_config(self.config)
        except ValueError as e:
            raise UserError(str(e)) from None

    @property
    def label(self) -> str:
        # LoRA labels are the profile cache's keys and stay as they always were; QA-LoRA ones get a prefix.
        base = f"{self.config.label}-r{self.rank}"
        return base if self.method == "lora" else f"qalora-{base}"

    def applies_to(self, shape: tuple[int, int]) -> bool:
        """Whether this point is profiled for a matrix of `shape`. LoRA points: always (a rank above min(shape) is
        an error the profiler reports). QA-LoRA points: only when in % g == 0 and rank <= min(out, in/g) — the
        grid's QA-LoRA ranks are skipped where the pooled adapter cannot have them."""
        return get_method(self.method).applies_to(self.config, tuple(shape), self.rank)

    def bits(self, shape: tuple[int, int]) -> int:
        """Exact plan cost in bits of one (out, in) matrix at this point: quantized storage as stored plus 16-bit
        adapters, r·(m + n) for LoRA and r·(m + n/g) for QA-LoRA's pooled lora_A."""
        try:
            return get_method(self.method).matrix_bits(self.config, tuple(shape), self.rank)
        except ValueError as e:
            raise UserError(f"{self.label} does not apply to a {shape[0]}x{shape[1]} matrix: {e}") from None

    def adapter_params(self, shape: tuple[int, int]) -> int:
        """Trainable adapter values of one (out, in) matrix at this point (the plan counts each at 16 bits)."""
        return get_method(self.method).adapter_params(self.config, tuple(shape), self.rank)

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "rank": self.rank, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> "GridPoint":
        d = dict(d)
        rank = d.pop("rank")
        method = d.pop("method", "lora")  # documents written before QA-LoRA points existed are LoRA
        return cls(QuantConfig.from_dict(d), int(rank), str(method))


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--{what} {text!r} is not a comma-separated list of integers; e.g. --{what} 2,3,4") from None
    if not values:
        raise UserError(f"--{what} is empty; give at least one value, e.g. --{what} 4")
    return values


def make_grid(bits="2,3,4,8", blocks="16,32,64,128", ranks="16,32,64", kind: str = "nf",
              double_quant: bool = True, dq_bits: int = 8, dq_blocksize: int = 256, dq_dtype: str = "fp32",
              method: str = "lora", qalora_bits=None, groups="32,64,128",
              qalora_scale_dtype: str = DEFAULT_QALORA_SCALE_DTYPE) -> list[GridPoint]:
    """The grid as GridPoints, in a stable order (LoRA points first, then QA-LoRA points).

    method "lora": every bits x blocks x ranks with `kind` / double-quant settings. method "qalora": asymmetric
    INT-k points, (qalora_bits, default `bits`) x groups x ranks, scale and zero-point per (row, group) stored as
    `qalora_scale_dtype`; ranks above what a matrix's pooled adapter allows (min(out, in/g)) are skipped per
    matrix when profiling (GridPoint.applies_to). method "both": the union."""
    if method not in GRID_METHODS:
        raise UserError(f"--method {method!r} is not supported; use one of {', '.join(GRID_METHODS)}")
    bits_v, ranks_v = _ints(bits, "bits"), _ints(ranks, "ranks")
    for r in ranks_v:
        if r < 0:
            raise UserError(f"--ranks contains {r}; ranks must be >= 0 (0 = no adapter)")
    points = []
    if method in ("lora", "both"):
        blocks_v = _ints(blocks, "blocks")
        for b, blk, r in itertools.product(sorted(set(bits_v)), sorted(set(blocks_v)), sorted(set(ranks_v))):
            try:
                cfg = QuantConfig(kind=kind, bits=b, blocksize=blk, double_quant=double_quant,
                                  dq_bits=dq_bits, dq_blocksize=dq_blocksize, dq_dtype=dq_dtype)
            except ValueError as e:
                raise UserError(f"invalid grid: {e}") from None
            points.append(GridPoint(cfg, r))
    if method in ("qalora", "both"):
        qbits_v = bits_v if qalora_bits is None else _ints(qalora_bits, "qalora-bits")
        groups_v = _ints(groups, "groups")
        for b, g, r in itertools.product(sorted(set(qbits_v)), sorted(set(groups_v)), sorted(set(ranks_v))):
            try:
                cfg = QuantConfig(kind="int", bits=b, blocksize=g, double_quant=False, asymmetric=True,
                                  scale_dtype=qalora_scale_dtype)
            except ValueError as e:
                raise UserError(f"invalid QA-LoRA grid: {e}") from None
            points.append(GridPoint(cfg, r, "qalora"))
    return points
