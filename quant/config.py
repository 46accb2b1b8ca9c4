"""Quantization configurations: one frozen dataclass, validated in one place, with exact storage cost."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_BLOCKS = (16, 32, 64, 128, 256)
SCALE_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
KINDS = ("nf", "int")
ADAPTER_BITS = 16  # LoRA factors are stored in 16-bit (bf16/fp16) as in QLoRA/LoftQ


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy once packed (8/k per byte; 3-bit: 8 codes in 3 bytes)."""
    if bits == 3:
        return 3 * math.ceil(count / 8)
    per_byte = 8 // bits
    return math.ceil(count / per_byte)


_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def _has_type(value, kind: type) -> bool:
    """isinstance with bool kept apart from int, and numpy's integer and bool scalars (a pandas row's) accepted."""
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, kind)


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    kind: "nf" (NormalFloat codebook, symmetric absmax) or "int" (uniform; `asymmetric` adds a zero-point per block).
    bits: code width k. blocksize: weights per first-level scale.
    double_quant: quantize the first-level scales (minus their mean) to `dq_bits` in blocks of `dq_blocksize`,
    each block keeping one `dq_dtype` scale (QLoRA: 8 bits, 256, fp32). Without it, scales are stored as `scale_dtype`.
    """

    kind: str = "nf"
    bits: int = 4
    blocksize: int = 64
    double_quant: bool = True
    dq_bits: int = 8
    dq_blocksize: int = 256
    dq_dtype: str = "fp32"
    scale_dtype: str = "fp32"
    asymmetric: bool = False

    def __post_init__(self) -> None:
        # strict types first: 4.0 == 4 and "no" is truthy, so a loose value would pass the checks below as another
        for name, kind in (("kind", str), ("bits", int), ("blocksize", int), ("double_quant", bool),
                           ("dq_bits", int), ("dq_blocksize", int), ("dq_dtype", str), ("scale_dtype", str),
                           ("asymmetric", bool)):
            if not _has_type(getattr(self, name), kind):
                raise ValueError(f"{name}={getattr(self, name)!r} is not {_TYPE_WORDS[kind]}")
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind {self.kind!r} is not supported; use one of {KINDS}")
        choices = [("bits", SUPPORTED_BITS), ("blocksize", SUPPORTED_BLOCKS), ("scale_dtype", tuple(SCALE_DTYPE_BYTES))]
        if self.double_quant:
            choices += [("dq_bits", SUPPORTED_BITS), ("dq_blocksize", SUPPORTED_BLOCKS),
                        ("dq_dtype", tuple(SCALE_DTYPE_BYTES))]
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                shown = repr(value) if isinstance(value, str) else value
                raise ValueError(f"{name}={shown} is not supported; use one of {allowed}")
        if self.asymmetric and self.kind != "int":
            raise ValueError("asymmetric (zero-point) quantization needs kind='int'; NF codebooks are symmetric")
        if self.asymmetric and self.double_quant:
            raise ValueError("asymmetric INT quantization stores scale and zero-point per block; set double_quant=False")

    # ---- cost -------------------------------------------------------------------------------------------
    @property
    def bits_per_weight(self) -> float:
        """Nominal bits per weight (docs/formulas.md): k + scale bits / B (+ second-level scale bits / (B*B2)).

        Exact for tensors whose size is a multiple of B*B2; `storage_bytes` adds padding and the per-tensor offset."""
        k, b = self.bits, self.blocksize
        if not self.double_quant:
            per_block = 8 * SCALE_DTYPE_BYTES[self.scale_dtype] * (2 if self.asymmetric else 1)
            return k + per_block / b
        return k + self.dq_bits / b + 8 * SCALE_DTYPE_BYTES[self.dq_dtype] / (b * self.dq_blocksize)

    def num_blocks(self, numel: int) -> int:
        return math.ceil(numel / self.blocksize)

    def storage_bytes(self, numel: int) -> int:
        """Exact bytes a QuantizedTensor of `numel` weights holds: packed codes of the padded tensor, scales
        (and zero-points), and for double quantization the packed scale codes, second-level scales and the
        fp32 mean that was subtracted from the scales."""
        nblocks = self.num_blocks(numel)
        codes = packed_nbytes(nblocks * self.blocksize, self.bits)
        if not self.double_quant:
            per_block = SCALE_DTYPE_BYTES[self.scale_dtype] * (2 if self.asymmetric else 1)
            return codes + nblocks * per_block
        nblocks2 = math.ceil(nblocks / self.dq_blocksize)
        scale_codes = packed_nbytes(nblocks2 * self.dq_blocksize, self.dq_bits)
        return codes + scale_codes + nblocks2 * SCALE_DTYPE_BYTES[self.dq_dtype] + 4

    def matrix_bits(self, shape: tuple[int, int], rank: int = 0) -> int:
        """A plan's cost of one (m, n) matrix in bits: exact quantized storage plus 16-bit rank-r adapters."""
        m, n = shape
        return 8 * self.storage_bytes(m * n) + ADAPTER_BITS * rank * (m + n)

    # ---- naming -----------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Short stable name, e.g. nf4-b64-dq8/256 or int3-b32-asym."""
        s = f"{self.kind}{self.bits}-b{self.blocksize}"
        if self.double_quant:
            s += f"-dq{self.dq_bits}/{self.dq_blocksize}"
            if self.dq_dtype != "fp32":
                s += f"-{self.dq_dtype}"
        elif self.scale_dtype != "fp32":
            s += f"-s{self.scale_dtype}"
        if self.asymmetric:
            s += "-asym"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown quantization config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_record(cls, record) -> "QuantConfig":
        """The config held in a wider flat record, its fields beside others (a plan.json matrix entry, a profile.csv
        row): other keys are ignored, absent fields take their defaults, numpy scalars (a pandas row's) become
        Python values."""
        values = {k: record[k] for k in CONFIG_FIELDS if k in record}
        return cls(**{k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})


# The fields in their order: to_dict's keys, the configuration columns of plan.json entries and profile.csv.
CONFIG_FIELDS = tuple(f.name for f in fields(QuantConfig))


NF4_QLORA = QuantConfig(kind="nf", bits=4, blocksize=64, double_quant=True, dq_bits=8, dq_blocksize=256, dq_dtype="fp32")
