"""The Triton dequant kernel (quant/triton_dequant.py) against the eager path, through QuantLoRALinear.

On a GPU the kernel runs compiled; without one it runs in Triton's CPU interpreter (TRITON_INTERPRET=1) when
Triton is installed, and these tests skip when it is not (CPU wheels of torch ship without Triton). The backend
choice itself (auto / forced / fallback) is tested everywhere."""

from __future__ import annotations

import itertools

import pytest
import torch

from quant import QuantConfig, triton_dequant
from quant.blockwise import quantize
from quant.layers import QuantLoRALinear, dequant_backend, flat_codebook, set_backend

HAVE_TRITON = triton_dequant.triton_module() is not None
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (CPU torch wheel)")


@pytest.fixture
def device(monkeypatch):
    """CUDA when there is one; else the CPU through Triton's interpreter."""
    if CUDA:
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def dequant_with(layer, backend, dtype, monkeypatch):
    layer.backend = backend
    assert dequant_backend(layer.q_codes.device, layer.config, backend) == backend, f"{backend} did not run"
    return layer.dequantize(dtype)


def rounded_like_the_kernel(exact: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The eager values in `dtype` as the kernel must round them: to nearest even on a GPU (as torch does); Triton's
    CPU interpreter emulates fp32 -> bf16 by truncation, so there the expectation is truncated instead."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return (exact.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return exact.to(dtype)


# 37 x 29 = 1073 weights: not a multiple of any block size, nor of 8 codes per 3 bytes.
CASES = list(itertools.product([2, 3, 4, 8], [16, 64, 128], [False, True]))


@needs_triton
@pytest.mark.parametrize("bits,blocksize,double_quant", CASES)
def test_kernel_equals_eager_dequant_bit_for_bit(bits, blocksize, double_quant, device, monkeypatch):
    gen = torch.Generator().manual_seed(bits * 1000 + blocksize)
    w = torch.randn(37, 29, generator=gen) * 0.05
    layer = QuantLoRALinear(quantize(w, QuantConfig("nf", bits, blocksize, double_quant=double_quant)).to(device))
    exact = dequant_with(layer, "eager", torch.float32, monkeypatch)
    assert torch.equal(exact.cpu(), layer.quantized().dequantize().cpu())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kernel = dequant_with(layer, "triton", dtype, monkeypatch)
        assert kernel.dtype == dtype and kernel.shape == (37, 29)
        assert torch.equal(kernel, rounded_like_the_kernel(exact, dtype, device)), f"{dtype} differs"


@needs_triton
def test_kernel_symmetric_int_codebook_and_a_layer_larger_than_one_program(device, monkeypatch):
    w = torch.randn(96, 130, generator=torch.Generator().manual_seed(7))  # 12480 values: 4 programs at 4 bits
    for cfg in (QuantConfig("int", 4, 32), QuantConfig("nf", 3, 64, double_quant=True)):
        layer = QuantLoRALinear(quantize(w, cfg).to(device))
        exact = dequant_with(layer, "eager", torch.float32, monkeypatch)
        assert torch.equal(dequant_with(layer, "triton", torch.float32, monkeypatch), exact)


@needs_triton
@pytest.mark.parametrize("bits,words", [(2, True), (3, False), (4, True), (8, True)])
def test_word_and_byte_reads_of_the_codes_give_the_same_weight(bits, words, device, monkeypatch):
    """Aligned 2/4/8-bit buffers are read as int32 words (3-bit codes always as bytes); a buffer starting at an odd
    byte falls back to byte reads. Both must decode the eager values."""
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits))
    cfg = QuantConfig("nf", bits, 64, double_quant=True)
    layer = QuantLoRALinear(quantize(w, cfg).to(device))
    exact = dequant_with(layer, "eager", torch.float32, monkeypatch)
    aligned = layer.q_codes
    shifted = torch.empty(aligned.numel() + 1, dtype=torch.uint8, device=device)[1:]
    shifted.copy_(aligned)
    assert triton_dequant._layout(aligned, cfg)[1] is words
    assert triton_dequant._layout(shifted, cfg)[1] is False  # not 4-byte aligned: byte groups
    for codes in (aligned, shifted):
        got = triton_dequant.dequantize(codes, flat_codebook("nf", bits, device), cfg, (40, 96), torch.float32,
                                        **layer.kernel_scales())
        assert torch.equal(got, exact)


@needs_triton
def test_forward_and_backward_through_the_kernel_equal_eager(device, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen)
    a, b = torch.randn(48, 4, generator=gen) * 0.1, torch.randn(64, 4, generator=gen) * 0.1
    q = quantize(w, QuantConfig("nf", 3, 32, double_quant=True))
    x = torch.randn(5, 64, generator=gen).to(device)
    results = {}
    for backend in ("eager", "triton"):
        layer = QuantLoRALinear(q.to(device), a=a.to(device), b=b.to(device), backend=backend)
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        results[backend] = (out.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad)
    for eager, kernel in zip(results["eager"], results["triton"]):
        assert torch.equal(eager, kernel)


# ---- backend choice (runs everywhere) -----------------------------------------------------------------------------
def test_kernel_declines_what_it_does_not_handle():
    assert triton_dequant.supports(QuantConfig("nf", 4, 64, double_quant=True))
    assert triton_dequant.supports(QuantConfig("int", 2, 128))
    assert not triton_dequant.supports(QuantConfig("int", 2, 64, double_quant=False, asymmetric=True,
                                                   scale_dtype="fp16"))
    assert not triton_dequant.supports(QuantConfig("nf", 4, 64, double_quant=True, dq_bits=4))
    with pytest.raises(ValueError, match="eager path"):
        triton_dequant.dequantize(torch.zeros(8, dtype=torch.uint8), torch.zeros(16),
                                  QuantConfig("nf", 4, 64, double_quant=True, dq_bits=4), (2, 4), torch.float32)


def test_backend_falls_back_where_the_kernel_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    cfg = QuantConfig("nf", 4, 64, double_quant=True)
    for forced in ("auto", "triton", "compile", "eager"):
        assert dequant_backend(cpu, cfg, forced) == "eager"  # no GPU, no interpreter: only eager runs on the CPU
    assert dequant_backend(cpu, QuantConfig("nf", 4, 64, double_quant=True, dq_bits=4), "auto") == "eager"


@needs_triton
def test_auto_prefers_the_kernel_and_declines_unsupported_configs(device, monkeypatch):
    assert dequant_backend(device, QuantConfig("nf", 2, 16), "auto") == "triton"
    asym = QuantConfig("int", 2, 64, double_quant=False, asymmetric=True, scale_dtype="fp16")
    assert dequant_backend(device, asym, "auto") == "eager"


def test_a_misspelled_backend_is_named_with_the_choices():
    with pytest.raises(ValueError, match="'trition' is not one of auto, triton, compile, eager"):
        dequant_backend(torch.device("cpu"), QuantConfig("nf", 4, 64), "trition")
    with pytest.raises(ValueError, match="'trition' is not one of"):
        QuantLoRALinear(quantize(torch.randn(4, 64), QuantConfig("nf", 4, 64)), backend="trition")


def test_set_backend_sets_every_quantized_layer_of_a_model():
    q = quantize(torch.randn(8, 64), QuantConfig("nf", 4, 64))
    model = torch.nn.Sequential(QuantLoRALinear(q), torch.nn.ReLU(), QuantLoRALinear(q, backend="eager"))
    assert [m.backend for m in model if isinstance(m, QuantLoRALinear)] == ["auto", "eager"]
    assert set_backend(model, "compile") == 2
    assert [m.backend for m in model if isinstance(m, QuantLoRALinear)] == ["compile", "compile"]
    with pytest.raises(ValueError, match="not one of"):
        set_backend(model, "fast")


def test_the_planner_reads_lqplan_dequant_once_at_the_edge(monkeypatch):
    from planner.devices import dequant_backend_from_env
    from planner.errors import UserError

    monkeypatch.delenv("LQPLAN_DEQUANT", raising=False)
    assert dequant_backend_from_env() == "auto"
    monkeypatch.setenv("LQPLAN_DEQUANT", "eager")
    assert dequant_backend_from_env() == "eager"
    monkeypatch.setenv("LQPLAN_DEQUANT", "trition")
    with pytest.raises(UserError, match="LQPLAN_DEQUANT='trition' is not one of auto, triton, compile, eager"):
        dequant_backend_from_env()
