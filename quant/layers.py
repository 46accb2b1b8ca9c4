"""PackedLinear, a frozen blockwise-quantized weight, and QuantLoRALinear, one plus trainable LoRA adapters (PEFT
naming) computed in one fused function.

The quantized storage lives in registered buffers holding raw bytes (uint8), so `.to(device)` and `state_dict()`
carry it, while `.to(dtype)` / `.half()` cannot touch it (module casts only change floating tensors). The weight
is dequantized on the fly in the compute dtype; a custom autograd function re-dequantizes it in backward instead
of keeping a 16/32-bit copy per layer alive for the whole step, so training memory stays near the packed size.
Which implementation dequantizes (Triton kernel, torch.compile, eager) is each layer's explicit `backend` setting
(set_backend sets it model-wide); nothing here reads the environment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_dequant
from .backends import check_backend, dequant_backend, dequant_codes_compiled, dequant_codes_eager
from .blockwise import TORCH_DTYPES, QuantizedTensor, decode_double_quant, dequantize_codes
from .codebooks import code_table, flat_codebook, lookup
from .config import ADAPTER_BITS, QuantConfig

# Which stored dtype each QuantizedTensor field has (None: depends on the config).
_FIELD_DTYPES = {"codes": torch.uint8, "scale_codes": torch.uint8, "scale_offset": torch.float32}
BUFFER_PREFIX = "q_"


def _field_dtype(config: QuantConfig, field: str) -> torch.dtype:
    if field in _FIELD_DTYPES:
        return _FIELD_DTYPES[field]
    if field == "scale_scales":
        return TORCH_DTYPES[config.dq_dtype]
    return TORCH_DTYPES[config.scale_dtype]  # scales, zeros


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: x's, or autocast's where it is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class PackedRef:
    """What quantized-linear conventions (PEFT, GPTQ's QuantLinear) read as a layer's `qweight`: the device, dtype
    and shape of its packed codes. It reads the live q_codes buffer, so it follows .to(device) instead of pinning the
    codes of the old device in memory; it is not a tensor, so model code that casts activations to a layer's weight
    dtype (T5's) leaves them alone instead of casting them to uint8."""

    def __init__(self, layer: PackedLinear):
        self.layer = layer

    device = property(lambda self: self.layer.q_codes.device)
    dtype = property(lambda self: self.layer.q_codes.dtype)
    shape = property(lambda self: self.layer.q_codes.shape)


class PackedLinear(nn.Module):
    """y = x·dequant(Q)ᵀ + bias: a frozen blockwise-quantized weight, no adapter (what PEFT wraps as `base_layer`).

    Q and bias are buffers; Q is dequantized in the compute dtype in forward and again in backward (only x is kept).
    backend: which dequant implementation runs (dequant_backend's choice; set_backend sets it model-wide).
    lqplan_init: (lora_A (r, in), lora_B (out, r), scaling) an adapter put on this layer starts from (LoftQ factors),
    or None; a plain attribute, never in the state dict."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        if not isinstance(q, QuantizedTensor) or len(q.shape) != 2:
            raise ValueError(f"{type(self).__name__} needs a 2-D QuantizedTensor (out, in); quantize the weight "
                             "matrix first")
        self.config = q.config
        self.out_features, self.in_features = q.shape
        self.lqplan_init: tuple[torch.Tensor, torch.Tensor, float] | None = None
        for field in QuantizedTensor.TENSOR_FIELDS:
            value = getattr(q, field)
            self.register_buffer(BUFFER_PREFIX + field, None if value is None else _as_bytes(value))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # ---- storage ---------------------------------------------------------------------------------------------
    def _field(self, field: str) -> torch.Tensor | None:
        raw = getattr(self, BUFFER_PREFIX + field)
        if raw is None:
            return None
        value = raw.view(_field_dtype(self.config, field))
        return value.reshape(()) if field == "scale_offset" else value

    def quantized(self) -> QuantizedTensor:
        """The frozen weight as a QuantizedTensor (views of this module's buffers, no copy)."""
        fields = {f: self._field(f) for f in QuantizedTensor.TENSOR_FIELDS}
        return QuantizedTensor(self.config, (self.out_features, self.in_features),
                               **{k: v for k, v in fields.items() if v is not None})

    @property
    def quant_nbytes(self) -> int:
        """Bytes of the packed quantized weight (codes, scales, zero-points, second-level scales)."""
        return sum(getattr(self, BUFFER_PREFIX + f).numel() for f in QuantizedTensor.TENSOR_FIELDS
                   if getattr(self, BUFFER_PREFIX + f) is not None)

    @property
    def qweight(self) -> PackedRef:
        return PackedRef(self)

    def packed(self) -> PackedLinear:
        """This layer's frozen part alone: a PackedLinear holding the same buffers (packed storage, bias and any
        other, persistent or not: the same tensors, no copy), with the same backend."""
        base = PackedLinear(self.quantized(), backend=self.backend)
        for name, t in self._buffers.items():
            base.register_buffer(name, t, persistent=name not in self._non_persistent_buffers_set)
        return base

    # ---- math ------------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen weight (out, in) in `dtype`, equal to QuantizedTensor.dequantize().to(dtype) whichever
        backend computes it (dequant_backend for self.backend: the Triton kernel, torch.compile or eager)."""
        cfg = self.config
        numel = self.out_features * self.in_features
        nblocks = cfg.num_blocks(numel)
        device = self.q_codes.device
        backend = dequant_backend(device, cfg, self.backend)
        if backend == "triton":
            return triton_dequant.dequantize(self.q_codes, flat_codebook(cfg.kind, cfg.bits, device), cfg,
                                             (self.out_features, self.in_features), dtype, **self.kernel_scales())
        table = code_table(cfg.kind, cfg.bits, cfg.asymmetric, device, torch.float32)
        if cfg.double_quant:
            nblocks2 = math.ceil(nblocks / cfg.dq_blocksize)
            table2 = code_table("int", cfg.dq_bits, False, device, torch.float32)
            values = lookup(self.q_scale_codes, cfg.dq_bits, nblocks2 * cfg.dq_blocksize, table2)
            scales = decode_double_quant(values, self._field("scale_scales"), self._field("scale_offset"), cfg, nblocks)
        else:
            scales = self._field("scales").float()
        if cfg.asymmetric:
            return dequantize_codes(self.q_codes, table, scales, cfg.bits, cfg.blocksize,
                                    (self.out_features, self.in_features), dtype, self._field("zeros"))
        if backend == "compile":
            return dequant_codes_compiled(self.q_codes, table, scales, cfg.bits, cfg.blocksize, self.out_features,
                                  self.in_features, dtype)
        return dequant_codes_eager(self.q_codes, table, scales, cfg.bits, cfg.blocksize, self.out_features,
                                    self.in_features, dtype)

    def kernel_scales(self) -> dict[str, torch.Tensor]:
        """The block-scale arguments of triton_dequant.dequantize for this layer's storage: the plain scales, or the
        8-bit scale codes with their codebook, second-level scales and offset (double quant)."""
        if not self.config.double_quant:
            return {"scales": self._field("scales")}
        return {"scale_codes": self.q_scale_codes,
                "scale_table": flat_codebook("int", self.config.dq_bits, self.q_codes.device),
                "scale_scales": self._field("scale_scales"), "scale_offset": self._field("scale_offset")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        return _QuantLoRAFunction.apply(x.to(dtype), None, None, None, self, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant={self.config.label}, "
                f"bias={self.bias is not None}")


class QuantLoRALinear(PackedLinear):
    """y = x·dequant(Q)ᵀ + bias + scaling · lora_B(lora_A(dropout(x))): a PackedLinear plus a LoRA adapter, computed
    in one fused autograd function.

    Built from a QuantizedTensor and a decomposition W ≈ Q + A·Bᵀ (A: out x r, B: in x r): lora_B = A / scaling,
    lora_A = Bᵀ, so scaling · lora_B · lora_A equals A·Bᵀ (exactly when scaling is a power of two, e.g. the
    default alpha = rank). `a=None` gives QLoRA's initialisation: lora_A Kaiming-uniform as PEFT, lora_B zero.
    Only lora_A / lora_B are parameters (trainable); Q and bias are frozen buffers. rank 0: no adapter.
    backend: which dequant implementation runs (dequant_backend's choice; set_backend sets it model-wide)."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, rank: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__(q, bias, backend)
        if (a is None) != (b is None):
            raise ValueError("pass both LoRA factors a (out x r) and b (in x r), or neither for a zero-init adapter")
        if a is not None:
            rank = a.shape[1]
            if a.shape != (self.out_features, rank) or b.shape != (self.in_features, rank):
                raise ValueError(f"LoRA factors have shapes {tuple(a.shape)}, {tuple(b.shape)}; a {q.shape} weight "
                                 f"needs ({self.out_features}, r) and ({self.in_features}, r)")
        rank = int(rank or 0)
        if rank < 0 or rank > min(q.shape):
            raise ValueError(f"rank={rank} is invalid for a {q.shape[0]}x{q.shape[1]} matrix")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank if rank else 0.0
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        if rank:
            device = q.device
            if a is None:
                lora_a = torch.empty(rank, self.in_features, device=device, dtype=adapter_dtype)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # PEFT's default for lora_A
                lora_b = torch.zeros(self.out_features, rank, device=device, dtype=adapter_dtype)
            else:
                lora_a = b.T.to(device=device, dtype=adapter_dtype)
                lora_b = (a.float() / self.scaling).to(device=device, dtype=adapter_dtype)
            self.lora_A = nn.Parameter(lora_a.contiguous())
            self.lora_B = nn.Parameter(lora_b.contiguous())
        else:
            self.lora_A = None
            self.lora_B = None

    @property
    def adapter_nbytes16(self) -> int:
        """Adapter bytes at the plan's 16-bit accounting, whatever dtype they are trained in."""
        return ADAPTER_BITS // 8 * self.rank * (self.in_features + self.out_features)

    @property
    def adapter_nbytes(self) -> int:
        """Adapter bytes as actually held (fp32 while training by default)."""
        if not self.rank:
            return 0
        return sum(p.numel() * p.element_size() for p in (self.lora_A, self.lora_B))

    def lora_delta(self) -> torch.Tensor:
        """scaling · lora_B · lora_A in fp32 (zeros for rank 0)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, device=self.q_codes.device)
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """dequant(Q) + scaling · lora_B · lora_A in fp32."""
        return self.dequantize(torch.float32) + self.lora_delta()

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What lora_A reads: the (dropped-out) input; QA-LoRA pools it per group."""
        return self.lora_dropout(x)

    def _adapter_reads_x(self) -> bool:
        """Whether lora_A reads x itself (no dropout, no pooling): then its input gradient is accumulated into the
        base one inside the fused function instead of through a separate autograd branch."""
        return type(self).adapter_input is QuantLoRALinear.adapter_input and not (self.dropout_p and self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        adapter_x = None if not self.rank or self._adapter_reads_x() else self.adapter_input(x).to(dtype)
        return _QuantLoRAFunction.apply(x, adapter_x, self.lora_A, self.lora_B, self, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant={self.config.label}, "
                f"rank={self.rank}, scaling={self.scaling:g}, bias={self.bias is not None}")


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Module name -> packed layer (PackedLinear: with an adapter or without) of `model`, the model itself included."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_backend(model: nn.Module, name: str) -> int:
    """Set the dequant backend of every quantized layer in `model` (the model itself included); returns how many."""
    check_backend(name)
    found = packed_layers(model).values()
    for layer in found:
        layer.backend = name
    return len(found)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _QuantLoRAFunction(torch.autograd.Function):
    """y = x·Wᵀ + bias + s·(xa·lora_Aᵀ)·lora_Bᵀ (the adapter term only where lora_a is given) with W dequantized in forward and again in backward (only x and the
    rank-r product xa·lora_Aᵀ are saved, not W). The adapter's output is accumulated into the base GEMM's output
    (addmm, beta = 1) and its input gradient into the base input gradient, and s is applied to rank-r tensors: no
    full-size elementwise pass (scale, add) per layer (unfused, they cost 6-9% of a 13B-shaped training step on an
    H100: reports/benchmarks.md section 4).
    xa is None when the adapter reads x itself."""

    @staticmethod
    def forward(ctx, x, xa, lora_a, lora_b, layer: PackedLinear, dtype: torch.dtype):
        bias = None if layer.bias is None else layer.bias.to(dtype)
        out = F.linear(x, layer.dequantize(dtype), bias)
        ctx.layer, ctx.dtype = layer, dtype
        ctx.has_adapter = lora_a is not None
        if lora_a is None:
            return out
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        adapter_in = x if xa is None else xa
        h = _rows(adapter_in) @ a.T
        _rows(out).addmm_(h, b.T, alpha=layer.scaling)
        ctx.save_for_backward(adapter_in, h, a, b)
        ctx.separate_adapter_input = xa is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer, dtype = ctx.layer, ctx.dtype
        need_x, need_xa, need_a, need_b = ctx.needs_input_grad[:4]
        g = _rows(grad_out.to(dtype))
        grad_x = grad_xa = grad_a = grad_b = None
        if need_x:
            grad_x = g @ layer.dequantize(dtype)
        if ctx.has_adapter:
            adapter_in, h, a, b = ctx.saved_tensors
            grad_h = g @ b
            if layer.scaling != 1:
                grad_h.mul_(layer.scaling)
            if need_a:
                grad_a = grad_h.T @ _rows(adapter_in)
            if need_b:
                grad_b = g.T @ h
                if layer.scaling != 1:
                    grad_b.mul_(layer.scaling)
            if ctx.separate_adapter_input:
                if need_xa:
                    grad_xa = (grad_h @ a).view(adapter_in.shape)
            elif need_x:
                grad_x.addmm_(grad_h, a)
        if grad_x is not None:
            grad_x = grad_x.view(*grad_out.shape[:-1], layer.in_features)
        if grad_a is not None:
            grad_a = grad_a.to(layer.lora_A.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(layer.lora_B.dtype)
        return grad_x, grad_xa, grad_a, grad_b, None, None
