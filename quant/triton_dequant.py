"""A Triton kernel that dequantizes a packed blockwise weight in one pass: unpack → codebook lookup → block scale
(double-quantized scales decoded in the same pass) → the compute dtype.

Hand-written because no library dequantizes lqplan's mixed storage: bitsandbytes' kernel covers NF4/FP4 only,
and torch.compile's kernel for the eager code left the training step at 1.9x bitsandbytes' time on an H100.
Results equal the eager path (QuantizedTensor.dequantize, then one rounding to the dtype) bit for bit: the scale
is decoded as (code value · second-level scale) + offset with FMA contraction off, as PyTorch's separate kernels
compute it.

Triton is optional: `available()` says whether the kernel can run here (a CUDA tensor and an importable Triton, or
Triton's CPU interpreter when TRITON_INTERPRET=1, which the tests use)."""

from __future__ import annotations

import functools
import os

import torch

from .config import QuantConfig

# Values each program writes; a power of two (Triton block shapes must be).
_VALUES_PER_PROGRAM = 4096
# (packed bytes read together, codes they hold) per code width when the codes are read byte by byte: every group
# starts at a byte boundary.
_GROUPS = {2: (1, 4), 3: (3, 8), 4: (1, 2), 8: (2, 2)}
# Codes per int32 word when the packed buffer can be read as aligned 32-bit words: 4-byte loads instead of single
# bytes (NF4: 0.78-0.94x the byte kernel's time on an H100). 3-bit codes stay on bytes: a 3-word, 32-code group was
# measured 2-9% slower than 3-byte groups (reports/benchmarks.md section 4).
_WORD_CODES = {2: 16, 4: 8, 8: 4}


@functools.lru_cache(maxsize=None)
def triton_module():
    """The triton module, or None when it is not installed or unusable."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton (CPU wheels of torch) or a broken install: the caller falls back
        return None
    return triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(config: QuantConfig) -> bool:
    """Configurations the kernel handles: symmetric codebooks (NF, symmetric INT), codes of 2/3/4/8 bits, scales
    plain or double-quantized with 8-bit second-level codes (QLoRA's). Anything else takes the eager path."""
    if config.asymmetric or config.bits not in _GROUPS or config.blocksize % _GROUPS[config.bits][1]:
        return False  # the kernel reads one scale per byte group, so a group must not straddle two blocks
    return not config.double_quant or config.dq_bits == 8


def available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device`."""
    if triton_module() is None:
        return False
    return device.type == "cuda" or interpreting()


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """Compile-on-first-use: the @triton.jit decorator reads TRITON_INTERPRET when it runs, so it must not run at
    import time (the tests switch the interpreter on after importing quant). One kernel per mode (`interpret`): a
    kernel decorated under the interpreter would run interpreted on CUDA tensors too."""
    triton = triton_module()
    tl = triton.language

    @triton.jit
    def dequant(codes, table, scales, scale_codes, scale_table, scale_scales, scale_offset, out, numel,
                BITS: tl.constexpr, WORDS: tl.constexpr, GROUP_BYTES: tl.constexpr, GROUP_CODES: tl.constexpr,
                GROUPS: tl.constexpr, BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # code groups of this program
        first = g * GROUP_CODES  # element index of each group's first code
        gmask = first < numel
        j = tl.arange(0, GROUP_CODES)
        if WORDS:  # `codes` is the buffer seen as int32; an arithmetic shift is harmless under the mask
            word = tl.load(codes + g, mask=gmask, other=0)
        else:  # byte by byte, little-endian, as quant.packing packs them
            word = tl.load(codes + g * GROUP_BYTES, mask=gmask, other=0).to(tl.int32)
            if GROUP_BYTES >= 2:
                word = word | (tl.load(codes + g * GROUP_BYTES + 1, mask=gmask, other=0).to(tl.int32) << 8)
            if GROUP_BYTES >= 3:
                word = word | (tl.load(codes + g * GROUP_BYTES + 2, mask=gmask, other=0).to(tl.int32) << 16)
        code = (word[:, None] >> (j[None, :] * BITS)) & ((1 << BITS) - 1)
        idx = first[:, None] + j[None, :]
        mask = idx < numel
        value = tl.load(table + code, mask=mask, other=0.0)
        # A group's codes share one block (a group never straddles one: supports() and _layout check it): one
        # scale per group, not per code.
        block = first // BLOCK
        if DOUBLE_QUANT:
            scode = tl.load(scale_codes + block, mask=gmask, other=0).to(tl.int32)
            s2 = tl.load(scale_scales + block // DQ_BLOCK, mask=gmask, other=0.0).to(tl.float32)
            scale = tl.load(scale_table + scode, mask=gmask, other=0.0) * s2 + tl.load(scale_offset)
        else:
            scale = tl.load(scales + block, mask=gmask, other=0.0).to(tl.float32)
        tl.store(out + idx, (value * scale[:, None]).to(out.dtype.element_ty), mask=mask)

    return dequant


def _layout(codes: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, bool, int, int]:
    """How the kernel reads `codes`: (the buffer, possibly seen as int32, whether as int32 words, bytes per byte
    group, codes per group). Words need 4-byte alignment, a whole number of them, and groups that do not straddle
    blocks; otherwise bytes."""
    word_codes = _WORD_CODES.get(config.bits)
    if (word_codes and config.blocksize % word_codes == 0 and codes.numel() % 4 == 0 and codes.data_ptr() % 4 == 0
            and codes.is_contiguous()):
        return codes.view(torch.int32), True, 0, word_codes
    group_bytes, group_codes = _GROUPS[config.bits]
    return codes, False, group_bytes, group_codes


def dequantize(codes: torch.Tensor, table: torch.Tensor, config: QuantConfig, shape: tuple[int, int],
               dtype: torch.dtype, scales: torch.Tensor | None = None, scale_codes: torch.Tensor | None = None,
               scale_table: torch.Tensor | None = None, scale_scales: torch.Tensor | None = None,
               scale_offset: torch.Tensor | None = None, values_per_program: int = _VALUES_PER_PROGRAM,
               num_warps: int = 4) -> torch.Tensor:
    """The (out, in) weight in `dtype` from the packed buffers of a QuantizedTensor: `codes` (uint8), `table` the
    codebook values (fp32, 2^bits), and either `scales` (plain) or `scale_codes` (uint8, 8-bit), `scale_table`
    (fp32, 256), `scale_scales` and `scale_offset` (double quant). All on one device. `values_per_program` and
    `num_warps` are launch parameters (bench/bench_dequant.py sweeps them)."""
    if not supports(config):
        raise ValueError(f"the Triton dequant kernel does not handle {config.label}; use the eager path")
    numel = shape[0] * shape[1]
    out = torch.empty(shape, device=codes.device, dtype=dtype)
    packed, words, group_bytes, group_codes = _layout(codes, config)
    groups = max(values_per_program // group_codes, 1)
    grid = (-(-numel // (groups * group_codes)),)
    dq = config.double_quant
    dummy = table  # pointer arguments the configuration does not read
    options = {} if interpreting() else {"enable_fp_fusion": False, "num_warps": num_warps}
    _kernel(interpreting())[grid](packed, table, dummy if dq else scales, scale_codes if dq else dummy,
                    scale_table if dq else dummy, scale_scales if dq else dummy, scale_offset if dq else dummy,
                    out, numel, BITS=config.bits, WORDS=words, GROUP_BYTES=group_bytes, GROUP_CODES=group_codes,
                    GROUPS=groups, BLOCK=config.blocksize, DOUBLE_QUANT=dq, DQ_BLOCK=config.dq_blocksize if dq else 1,
                    **options)
    return out
