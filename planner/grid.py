"""The configuration grid: (quantization config, LoRA rank) points, parsed from CLI strings and validated."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from quant import QuantConfig

from .errors import UserError

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_BLOCKS = (16, 32, 64, 128)
DEFAULT_RANKS = (16, 32, 64)


@dataclass(frozen=True)
class GridPoint:
    """One candidate configuration for a matrix: how it is quantized and the rank of its LoRA adapter."""

    config: QuantConfig
    rank: int

    @property
    def label(self) -> str:
        return f"{self.config.label}-r{self.rank}"

    def bits(self, shape: tuple[int, int]) -> int:
        return self.config.matrix_bits(shape, self.rank)

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict) -> "GridPoint":
        d = dict(d)
        rank = d.pop("rank")
        return cls(QuantConfig.from_dict(d), int(rank))


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--{what} {text!r} is not a comma-separated list of integers; e.g. --{what} 2,3,4") from None
    if not values:
        raise UserError(f"--{what} is empty; give at least one value, e.g. --{what} 4")
    return values


def make_grid(bits="2,3,4,8", blocks="16,32,64,128", ranks="16,32,64", kind: str = "nf",
              double_quant: bool = True, dq_bits: int = 8, dq_blocksize: int = 256, dq_dtype: str = "fp32") -> list[GridPoint]:
    """All combinations of bits x blocks x ranks as GridPoints, in a stable order."""
    bits_v, blocks_v, ranks_v = _ints(bits, "bits"), _ints(blocks, "blocks"), _ints(ranks, "ranks")
    for r in ranks_v:
        if r < 0:
            raise UserError(f"--ranks contains {r}; ranks must be >= 0 (0 = no adapter)")
    points = []
    for b, blk, r in itertools.product(sorted(set(bits_v)), sorted(set(blocks_v)), sorted(set(ranks_v))):
        try:
            cfg = QuantConfig(kind=kind, bits=b, blocksize=blk, double_quant=double_quant,
                              dq_bits=dq_bits, dq_blocksize=dq_blocksize, dq_dtype=dq_dtype)
        except ValueError as e:
            raise UserError(f"invalid grid: {e}") from None
        points.append(GridPoint(cfg, r))
    return points
