"""GPTQ's integer layout as tensors: bit packing into int32 words, a merged QA-LoRA layer's codes, scales and zeros
in that layout, and GPTQLinear, the layer that computes from it (docs/gptq-layout.md).

Packing (GPTQ / AutoGPTQ / gptqmodel, non-planar): along the packed dimension every 32 codes of k bits form one
little-endian bit stream of k int32 words, code i at bits k·i … k·i+k−1 of the stream. For k = 2, 4, 8 that is
"code j of word w at shift k·j"; for k = 3 three words hold 32 codes, codes 10 and 21 straddling two words.
qweight packs codes along the input dimension, (in·k/32, out); qzeros packs integer zeros along the output
dimension, (in/g, out·k/32). Words are int32 (two's complement), as safetensors and the GPTQ kernels store them.

Values. lqplan's asymmetric INT-k stores per (row, group) a range α = max − min and a zero-point β (QA-LoRA's merge
adds the adapter to β), value = t[q]·α + β with t[q] = q/(2^k − 1). In GPTQ's terms the step is s = α/(2^k − 1)
and the value s·q + β = s·(q − z) with z = −β/s. A merged β is not an integer multiple of s, so three formats:
  "lqplan_offsets" (exact): scales fp32 (s), `offsets` fp32 (β, the value at code 0), no qzeros: w = s·q + β,
                   the merged layer up to one fp32 rounding (docs/gptq-layout.md has the measured error);
  "gptq" (v1) / "gptq_v2": GPTQ-standard, scales fp16 (s), qzeros = round(−β/s) clamped to the k-bit range,
                   stored as z − 1 (v1, z >= 1: a group that wants z = 0 is stored mirrored, codes n − q under
                   scale −s) or z (v2): w = s·(q − z), lossy by up to half a step per group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .qalora import QALoRALinear

WORD_BITS = 32
EXACT_FORMAT = "lqplan_offsets"  # float offsets instead of integer qzeros
CHECKPOINT_FORMATS = (EXACT_FORMAT, "gptq", "gptq_v2")  # GPTQ v1: qzeros hold z − 1; v2: z itself


def check_packable(count: int, bits: int, what: str) -> None:
    """Whole 32-code groups are what GPTQ packs: count·bits must be a multiple of 32 (count % 32 for 3 bits)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ packs 2, 3, 4 or 8-bit codes, not {bits}-bit ones")
    if count <= 0 or (count * bits) % WORD_BITS:
        raise ValueError(f"GPTQ packs {what} in whole int32 words: {count} {bits}-bit codes do not fill them "
                         f"(need a multiple of {WORD_BITS // math.gcd(bits, WORD_BITS)})")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 words in [0, 2^32) as the int32 of the same bits (two's complement), without relying on narrowing casts
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) integer codes < 2^bits -> (K·bits/32, N) int32, each column a GPTQ bit stream along K."""
    k, n = codes.shape
    check_packable(k, bits, "rows")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in 0 .. {(1 << bits) - 1} to pack them in {bits} bits")
    c = codes.to(torch.int64).reshape(k // WORD_BITS, WORD_BITS, n)
    words = torch.zeros(k // WORD_BITS, bits, n, dtype=torch.int64, device=codes.device)
    for i in range(WORD_BITS):  # 32 vectorised steps: code i of every group at stream offset bits·i
        word, shift = divmod(bits * i, WORD_BITS)
        words[:, word] |= (c[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:  # 3-bit codes 10 and 21 spill their high bits into the next word
            words[:, word + 1] |= c[:, i] >> (WORD_BITS - shift)
    return _to_int32(words.reshape(k * bits // WORD_BITS, n))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: (K·bits/32, N) int32 -> (K, N) uint8 codes."""
    rows, n = words.shape
    if rows % bits:
        raise ValueError(f"{rows} packed rows are not whole groups of {bits} words of 32 {bits}-bit codes")
    w = words.to(torch.int64).reshape(rows // bits, bits, n) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.empty(rows // bits, WORD_BITS, n, dtype=torch.uint8, device=words.device)
    for i in range(WORD_BITS):
        word, shift = divmod(bits * i, WORD_BITS)
        value = w[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (w[:, word + 1] << (WORD_BITS - shift))
        out[:, i] = (value & mask).to(torch.uint8)
    return out.reshape(rows // bits * WORD_BITS, n)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(M, N) codes -> (M, N·bits/32) int32 packed along N (GPTQ's qzeros)."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.T, bits).T.contiguous()


# ---- a merged QA-LoRA layer in GPTQ's layout ----------------------------------------------------------------
@torch.no_grad()
def merged_offsets(layer: QALoRALinear) -> torch.Tensor:
    """β' = β + scaling·(lora_B·lora_A)/g per (row, group), (out, in/g) fp32: QALoRALinear.merged_zeros' sum (fp64,
    rounded once) kept in fp32 whatever dtype the layer stores zero-points in, so fp16 configs lose nothing more."""
    q = layer.quantized()
    groups = layer.in_features // layer.group_size
    beta = q.zeros.double().view(layer.out_features, groups)
    if layer.rank:
        beta = beta + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()) / layer.group_size
    return beta.float()


def check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported; use one of {CHECKPOINT_FORMATS}")


@torch.no_grad()
def qalora_to_gptq(layer: QALoRALinear, checkpoint_format: str = EXACT_FORMAT):
    """The GPTQ tensors of `layer` with its adapter merged: ({qweight, scales, g_idx, offsets | qzeros}, info).

    Shapes follow GPTQ: qweight (in·k/32, out) int32, scales (in/g, out), g_idx (in,) int32 = column // g,
    offsets (in/g, out) fp32 or qzeros (in/g, out·k/32) int32. info counts the integer zeros that fell outside the
    storable range ("clamped_zeros") and the groups v1 stores mirrored ("mirrored_groups"); 0 for the exact format."""
    if not isinstance(layer, QALoRALinear):
        raise ValueError(f"GPTQ's layout holds QA-LoRA layers (asymmetric INT with zero-points), not "
                         f"{type(layer).__name__}")
    check_format(checkpoint_format)
    bits, g = layer.config.bits, layer.group_size
    out_f, in_f = layer.out_features, layer.in_features
    check_packable(in_f, bits, "a weight's input columns")
    q = layer.quantized()
    codes = q.codes_unpacked().view(out_f, in_f)
    levels = (1 << bits) - 1
    step = q.scales.double().view(out_f, in_f // g) / levels
    beta = merged_offsets(layer)
    tensors = {"qweight": pack_rows(codes.T, bits),
               "g_idx": (torch.arange(in_f, device=codes.device, dtype=torch.int32) // g)}
    if checkpoint_format == EXACT_FORMAT:
        tensors.update(scales=step.float().T.contiguous(), offsets=beta.T.contiguous())
        return tensors, {"clamped_zeros": 0, "mirrored_groups": 0}
    check_packable(out_f, bits, "integer zeros along the output features")
    s = step.half().double()
    # A zero range (a constant group, codes all 0): w = s·(0 − 1) = β' exactly with s = −β' and z = 1.
    flat = s == 0
    s = torch.where(flat, (-beta.double()).half().double(), s)
    wanted = torch.where(flat, torch.ones_like(s), (-beta.double() / torch.where(flat, 1.0, s)).round())
    flip = torch.zeros_like(flat)
    if checkpoint_format == "gptq":
        # v1 cannot store z = 0 (z − 1 = −1 fills the field with ones, and the loaders' +1 carries into the next
        # one). s·(q − z) = (−s)·((n − q) − (n − z)): mirrored codes, a negated scale and z' = n − z hold the
        # same values, so groups that want z <= 0 are mirrored instead of clamped to z = 1.
        flip = (wanted <= 0) & ~flat
        codes = torch.where(flip.repeat_interleave(g, dim=1), levels - codes, codes)
        s = torch.where(flip, -s, s)
        wanted = torch.where(flip, levels - wanted, wanted)
        tensors["qweight"] = pack_rows(codes.T, bits)
    z = wanted.clamp(1 if checkpoint_format == "gptq" else 0, levels)
    info = {"clamped_zeros": int((z != wanted).sum()), "mirrored_groups": int(flip.sum())}
    stored = z - 1 if checkpoint_format == "gptq" else z
    tensors.update(scales=s.half().T.contiguous(), qzeros=pack_cols(stored.T.to(torch.int64), bits))
    return tensors, info


def dequantize_gptq(tensors: dict, bits: int, checkpoint_format: str = EXACT_FORMAT) -> torch.Tensor:
    """The (out, in) fp32 weight of GPTQ tensors: scales[g_idx]·(q − z[g_idx]) with integer qzeros, or
    scales[g_idx]·q + offsets[g_idx] with float offsets (the exact format). Honors any g_idx (act order)."""
    q = unpack_rows(tensors["qweight"], bits).float()  # (in, out)
    g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].float()[g_idx]
    check_format(checkpoint_format)
    if checkpoint_format == EXACT_FORMAT:
        w = q * scales + tensors["offsets"].float()[g_idx]
    else:
        z = unpack_cols(tensors["qzeros"], bits).float()[:, : scales.shape[1]]
        if checkpoint_format == "gptq":
            z = z + 1  # v1 stores z − 1
        w = scales * (q - z[g_idx])
    return w.T.contiguous()


class GPTQLinear(nn.Module):
    """y = x·Wᵀ + bias with W dequantized from GPTQ tensors (buffers under their GPTQ names) on every call, in fp32
    and cast once to the input's dtype. Inference only: nothing here trains."""

    def __init__(self, tensors: dict, bits: int, group_size: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, checkpoint_format: str = EXACT_FORMAT):
        super().__init__()
        check_format(checkpoint_format)
        self.bits, self.group_size = int(bits), int(group_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.checkpoint_format = checkpoint_format
        expected = {"qweight": (in_features * bits // WORD_BITS, out_features), "g_idx": (in_features,),
                    "scales": (in_features // group_size, out_features)}
        if checkpoint_format == EXACT_FORMAT:
            expected["offsets"] = expected["scales"]
        else:
            expected["qzeros"] = (in_features // group_size, out_features * bits // WORD_BITS)
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"GPTQ tensor {name!r} is missing")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"GPTQ tensor {name!r} has shape {tuple(tensors[name].shape)}, a {bits}-bit "
                                 f"{out_features}x{in_features} layer with groups of {group_size} needs {shape}")
            self.register_buffer(name, tensors[name])
        self.register_buffer("bias", bias)

    def weight_tensors(self) -> dict:
        return {k: v for k, v in self._buffers.items() if k != "bias" and v is not None}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gptq(self.weight_tensors(), self.bits, self.checkpoint_format).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.checkpoint_format}")
