"""QuantLoRALinear's fused forward/backward (one autograd function for the frozen base and the adapter) against
the same layer written with ordinary autograd ops on the dequantized weight, in float64 so the comparison is
tight, and through torch.autograd.gradcheck (finite differences)."""

from __future__ import annotations

import pytest
import torch

from quant import QuantConfig
from quant.blockwise import quantize
from quant.layers import PackedLinear, QuantLoRALinear, set_backend
from quant.qalora import QALoRALinear

GEN = torch.Generator().manual_seed(11)
W = torch.randn(24, 64, generator=GEN) * 0.1


def reference(layer: QuantLoRALinear, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ + bias + s·(adapter_input(x)·Aᵀ)·Bᵀ with plain ops (dropout off)."""
    w = layer.dequantize(x.dtype)
    y = x @ w.T + (0 if layer.bias is None else layer.bias.to(x.dtype))
    if not layer.rank:
        return y
    pooled = layer.pool(x) if isinstance(layer, QALoRALinear) else x
    return y + layer.scaling * (pooled @ lora_a.T) @ lora_b.T


def make(kind: str, alpha: float | None = None, bias: bool = True) -> QuantLoRALinear:
    b = torch.randn(24, generator=GEN) if bias else None
    if kind == "qalora":
        cfg = QuantConfig("int", 4, 16, double_quant=False, asymmetric=True, scale_dtype="fp16")
        layer = QALoRALinear(quantize(W, cfg), b, rank=3, alpha=alpha)
    else:
        layer = QuantLoRALinear(quantize(W, QuantConfig("nf", 3, 16)), b, rank=0 if kind == "rank0" else 4,
                                alpha=alpha, adapter_dtype=torch.float64)
    layer = layer.double()
    if layer.rank:
        with torch.no_grad():  # a non-zero lora_B, so every gradient path carries signal
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=GEN, dtype=torch.float64))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=GEN, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("kind,alpha,bias", [("lora", None, True), ("lora", 2.0, False), ("lora", 16.0, True),
                                             ("rank0", None, True), ("qalora", 6.0, True)])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_fused_layer_equals_plain_autograd(kind, alpha, bias, x_needs_grad):
    layer = make(kind, alpha, bias)
    x = torch.randn(2, 5, 64, generator=GEN, dtype=torch.float64)
    if not layer.rank and not x_needs_grad:
        assert not layer(x).requires_grad  # a frozen layer on a constant input: nothing to differentiate
        return
    grads = {}
    for name in ("fused", "plain"):
        xi = x.clone().requires_grad_(x_needs_grad)
        params = [p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B) if p is not None]
        if name == "fused":
            for p in (layer.lora_A, layer.lora_B):
                if p is not None:
                    p.grad = None
            y = layer(xi)
        else:
            y = reference(layer, xi, *params) if params else reference(layer, xi, None, None)
        torch.testing.assert_close(y, reference(layer, x, layer.lora_A, layer.lora_B), rtol=1e-12, atol=1e-12)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        got = [xi.grad] if x_needs_grad else [None]
        got += [p.grad for p in ((layer.lora_A, layer.lora_B) if name == "fused" else params) if p is not None]
        grads[name] = got
    assert (grads["fused"][0] is None) == (not x_needs_grad)
    for fused, plain in zip(grads["fused"], grads["plain"]):
        if plain is not None:
            torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["lora", "qalora"])
def test_fused_layer_passes_gradcheck(kind):
    layer = make(kind, alpha=2.0)
    x = torch.randn(3, 64, generator=GEN, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: torch.func.functional_call(layer, {"lora_A": a, "lora_B": b}, (x,)), (x, a, b))


def test_dropout_gives_the_adapter_its_own_input_and_gradient():
    layer = QuantLoRALinear(quantize(W, QuantConfig("nf", 4, 16)), rank=4, dropout=0.5).double()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=GEN, dtype=torch.float64))
    x = torch.randn(6, 64, generator=GEN, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    layer.train()(x).sum().backward()
    gx = x.grad.clone()
    # The same dropout mask, applied by hand.
    torch.manual_seed(5)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    x2 = x.detach().clone().requires_grad_(True)
    w = layer.dequantize(torch.float64)
    (x2 @ w.T + layer.scaling * ((x2 * mask) @ layer.lora_A.T) @ layer.lora_B.T).sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-10, atol=1e-10)
    assert not torch.equal(gx, torch.ones(6, 1, dtype=torch.float64) * w.sum(0))  # the adapter term is there


@pytest.mark.parametrize("kind", ["lora", "qalora"])
def test_packed_part_shares_storage_and_computes_the_frozen_base(kind):
    """layer.packed() is the frozen half alone: the same buffer tensors (state-dict keys less lora_*), and its
    forward and input gradient equal the layer's with the adapter zeroed, bit for bit."""
    layer = make(kind)
    base = layer.packed()
    assert type(base) is PackedLinear and base.backend == layer.backend and base.lqplan_init is None
    assert list(base.state_dict()) == [k for k in layer.state_dict() if not k.startswith("lora_")]
    assert all(t is getattr(layer, n) for n, t in base.named_buffers())
    assert torch.equal(base.dequantize(torch.float64), layer.dequantize(torch.float64))
    x = torch.randn(2, 5, 64, generator=GEN, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.zero_()
    outs, grads = [], []
    for module in (layer, base):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert not base(x).requires_grad  # no parameter: a constant input gives a constant output


def test_packed_linear_qweight_follows_the_codes():
    layer = PackedLinear(quantize(W, QuantConfig("nf", 4, 16)))
    ref = layer.qweight
    assert not isinstance(ref, torch.Tensor)  # model code casting activations to weight.dtype must not see uint8
    assert (ref.device, ref.dtype, ref.shape) == (layer.q_codes.device, torch.uint8, layer.q_codes.shape)
    layer.to("meta")
    assert ref.device.type == "meta"  # reads the live buffer, not the one it was made with
    assert set_backend(torch.nn.Sequential(layer, make("lora")), "eager") == 2
