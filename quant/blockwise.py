"""Blockwise absmax (or min/max) quantization into real packed storage, with optional double quantization.

W is flattened row-major into blocks of `blocksize` consecutive values (zero-padded at the end); each block
keeps one scale (and, for asymmetric INT, one zero-point). Codes are chosen against the scale as it is actually
stored (after dtype rounding or double quantization), so dequantize() is the exact inverse of what is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codebooks import code_table, codebook, int_codebook, lookup, nearest_code
from .config import QuantConfig
from .packing import pack_codes, unpack_codes

# The torch dtype of each stored-dtype name a QuantConfig uses.
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class QuantizedTensor:
    """A quantized matrix as it is stored: packed codes plus (possibly quantized) block scales.

    Fields that a configuration does not use are None. All tensors live on one device."""

    config: QuantConfig
    shape: tuple[int, ...]
    codes: torch.Tensor  # packed uint8
    scales: torch.Tensor | None = None  # (nblocks,) in config.scale_dtype, no double quant
    zeros: torch.Tensor | None = None  # (nblocks,) block minimum, asymmetric INT only
    scale_codes: torch.Tensor | None = None  # packed uint8 codes of (scale - offset), double quant
    scale_scales: torch.Tensor | None = None  # (nblocks2,) in config.dq_dtype
    scale_offset: torch.Tensor | None = None  # () fp32 mean of the first-level scales

    TENSOR_FIELDS = ("codes", "scales", "zeros", "scale_codes", "scale_scales", "scale_offset")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSOR_FIELDS if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Real bytes held by this tensor's storage."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "QuantizedTensor":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedTensor(self.config, self.shape, **moved)

    def block_scales(self) -> torch.Tensor:
        """The first-level scales as fp32, exactly as dequantization uses them."""
        cfg = self.config
        if not cfg.double_quant:
            return self.scales.float()
        nblocks = cfg.num_blocks(self.numel)
        nblocks2 = math.ceil(nblocks / cfg.dq_blocksize)
        table2 = int_codebook(cfg.dq_bits, device=self.device)
        codes2 = unpack_codes(self.scale_codes, cfg.dq_bits, nblocks2 * cfg.dq_blocksize)
        return decode_double_quant(table2[codes2.long()], self.scale_scales, self.scale_offset, cfg, nblocks)

    def codes_unpacked(self) -> torch.Tensor:
        """Codes as a (nblocks, blocksize) uint8 tensor."""
        cfg = self.config
        nblocks = cfg.num_blocks(self.numel)
        return unpack_codes(self.codes, cfg.bits, nblocks * cfg.blocksize).view(nblocks, cfg.blocksize)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cfg = self.config
        table = code_table(cfg.kind, cfg.bits, cfg.asymmetric, self.device, torch.float32)
        return dequantize_codes(self.codes, table, self.block_scales(), cfg.bits, cfg.blocksize, self.shape, dtype,
                                self.zeros if cfg.asymmetric else None)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, config: QuantConfig, shape, tensors: dict[str, torch.Tensor], prefix: str = ""):
        fields = {k: tensors[prefix + k] for k in cls.TENSOR_FIELDS if prefix + k in tensors}
        return cls(config, tuple(shape), **fields)


def dequantize_codes(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, bits: int, blocksize: int,
                     shape, dtype: torch.dtype, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of `shape` in `dtype` from packed codes: each code's value (`table`: codebooks.code_table in fp32)
    times its block's fp32 scale, plus the block's zero-point where there is one; computed in fp32 and rounded once
    to `dtype` (a 16-bit lookup-times-scale would round three times, as much error as 8-bit quantization itself).
    The one eager dequantization: QuantizedTensor and QuantLoRALinear compute it, torch.compile fuses it, and the
    Triton kernel is tested against it bit for bit."""
    nblocks = scales.shape[0]
    values = lookup(codes, bits, nblocks * blocksize, table).view(nblocks, blocksize) * scales[:, None]
    if zeros is not None:
        values = values + zeros.float()[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(*shape).to(dtype)


def _check_input(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if not torch.isfinite(w).all():
        raise ValueError("weight tensor contains NaN or Inf values; fix or drop the matrix before quantizing")


def cast_to(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """x in the stored dtype a config names ("fp32", "fp16", "bf16"): the rounding scales get when stored."""
    return x.to(TORCH_DTYPES[dtype_name])


def decode_double_quant(scale_values: torch.Tensor, scale_scales: torch.Tensor, scale_offset: torch.Tensor,
                        cfg: QuantConfig, nblocks: int) -> torch.Tensor:
    """The fp32 first-level scales of double-quantized storage, from the values of its scale codes (flat, whole
    second-level blocks): code value · second-level scale + offset, in that order (the Triton kernel's too)."""
    s = scale_values.view(-1, cfg.dq_blocksize) * scale_scales.float()[:, None]
    return s.reshape(-1)[:nblocks] + scale_offset.float()


def double_quantize(absmax: torch.Tensor, cfg: QuantConfig):
    """Quantize the first-level scales minus their mean to dq_bits in blocks of dq_blocksize (QLoRA).

    Returns the packed scale codes, the second-level scales (dq_dtype), the offset and the fp32 scales as stored."""
    nblocks = absmax.numel()
    nblocks2 = math.ceil(nblocks / cfg.dq_blocksize)
    offset = absmax.mean()
    centered = torch.zeros(nblocks2 * cfg.dq_blocksize, device=absmax.device, dtype=torch.float32)
    centered[:nblocks] = absmax - offset
    centered = centered.view(nblocks2, cfg.dq_blocksize)
    s2 = cast_to(centered.abs().amax(dim=1), cfg.dq_dtype)
    s2f = s2.float()
    table2 = int_codebook(cfg.dq_bits, device=absmax.device)
    normalized = torch.where(s2f[:, None] > 0, centered / s2f[:, None].clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes2 = nearest_code(normalized, table2)
    stored_scales = decode_double_quant(table2[codes2.long()], s2, offset, cfg, nblocks)
    return pack_codes(codes2, cfg.dq_bits), s2, offset.reshape(()), stored_scales


# Elements normalised and looked up per step: bounds the pass's temporaries (fp32 quotients, int64 bucket
# indices) to ~100 MB whatever the matrix, instead of ~20 bytes per element of a 28672 x 8192 matrix at once.
CHUNK_ELEMENTS = 1 << 22


def quantize_blocks(w: torch.Tensor, cfg: QuantConfig):
    """Codes (nblocks, B) uint8, the fp32 scales and zero-points as stored, and the stored tensors."""
    numel = w.numel()
    nblocks = cfg.num_blocks(numel)
    if numel == nblocks * cfg.blocksize and w.dtype == torch.float32 and w.is_contiguous():
        blocks = w.view(nblocks, cfg.blocksize)  # no padding needed: no copy
    else:
        flat = torch.zeros(nblocks * cfg.blocksize, device=w.device, dtype=torch.float32)
        flat[:numel] = w.reshape(-1).float()
        blocks = flat.view(nblocks, cfg.blocksize)

    stored = {}
    zero_f = None
    if cfg.asymmetric:
        lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
        zeros = cast_to(lo, cfg.scale_dtype)
        scales = cast_to(hi - lo, cfg.scale_dtype)
        scale_f, zero_f = scales.float(), zeros.float()
        stored.update(scales=scales, zeros=zeros)
    else:
        absmax = torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1))  # = |blocks|.amax(1), without the copy
        if cfg.double_quant:
            scale_codes, s2, offset, scale_f = double_quantize(absmax, cfg)
            stored.update(scale_codes=scale_codes, scale_scales=s2, scale_offset=offset)
        else:
            scales = cast_to(absmax, cfg.scale_dtype)
            scale_f = scales.float()
            stored.update(scales=scales)

    # A zero scale (an all-zero block, or a scale that double quantization rounded to 0) maps to code of 0.0.
    safe = torch.where(scale_f == 0, torch.ones_like(scale_f), scale_f)
    table = codebook(cfg.kind, cfg.bits, cfg.asymmetric, device=w.device)
    codes = torch.empty(nblocks, cfg.blocksize, dtype=torch.uint8, device=w.device)
    rows = max(1, CHUNK_ELEMENTS // cfg.blocksize)
    for i in range(0, nblocks, rows):
        part = blocks[i:i + rows] if zero_f is None else blocks[i:i + rows] - zero_f[i:i + rows, None]
        normalized = (part / safe[i:i + rows, None]).masked_fill_(scale_f[i:i + rows, None] == 0, 0.0)
        codes[i:i + rows] = nearest_code(normalized, table)
    return codes, scale_f, zero_f, stored


def quantize(w: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Blockwise-quantize `w` (any shape, any float dtype, CPU or CUDA) with `config` into packed storage."""
    _check_input(w)
    codes, _, _, stored = quantize_blocks(w, config)
    return QuantizedTensor(config, tuple(w.shape), codes=pack_codes(codes, config.bits), **stored)


def quantize_dequantize(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """q(w) as fp32, without packing: equals quantize(w, config).dequantize() (tested), at a fraction of the cost.
    The LoftQ loop and the profiler call this on every step."""
    _check_input(w)
    codes, scale_f, zero_f, _ = quantize_blocks(w, config)
    table = codebook(config.kind, config.bits, config.asymmetric, device=w.device)
    values = table[codes.long()] * scale_f[:, None]
    if zero_f is not None:
        values = values + zero_f[:, None]
    return values.reshape(-1)[: w.numel()].view(w.shape)
