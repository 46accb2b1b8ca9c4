"""The fused residual kernel (quant.triton_residual) equals the profiler's eager quantizer bit for bit: codes at
midpoint ties, zero blocks, a short last block, every code width of the default grid, double-quantized scales.
On a GPU it runs compiled; without one in Triton's CPU interpreter, and these tests skip without Triton."""

import pytest
import torch

from quant import QuantConfig, fastgrid, triton_dequant, triton_residual

HAVE_TRITON = triton_dequant.triton_module() is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (CPU torch wheel)")


@pytest.fixture(params=["interpret", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _inputs(shape, seed, device):
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample(shape) * 0.02
    x = w + torch.randn(shape, generator=gen) * 1e-3
    x[0, :32] = 0.0  # a zero block: scale 0
    return w.to(device).contiguous(), x.to(device).contiguous()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("blocksize,dq", [(16, True), (64, True), (128, False)])
def test_residual_equals_eager(device, bits, blocksize, dq):
    config = QuantConfig(bits=bits, blocksize=blocksize, double_quant=dq)
    quant = fastgrid._Quantizer(config, device)
    w, x = _inputs((48, 80), bits * 1000 + blocksize, device)
    x[1, :8] = quant.mids[: 8 % quant.mids.numel()].repeat(8)[:8] * x[1].abs().max()  # values on midpoints
    expected = w - quant(x)
    out = torch.empty_like(w)
    triton_residual.residual_into(out, w, x, quant.scales(quant.blocks(x)), quant.mids, quant.table, blocksize, bits)
    assert torch.equal(out, expected)


def test_short_last_block_equals_eager(device):
    config = QuantConfig(bits=3, blocksize=64, double_quant=True)
    quant = fastgrid._Quantizer(config, device)
    w, x = _inputs((7, 45), 5, device)  # 315 elements: the last block holds 59
    out = torch.empty_like(w)
    quant.residual_into(out, w, x)
    assert torch.equal(out, w - quant(x))


def test_profile_grid_numbers_unchanged_by_the_kernel(device, monkeypatch):
    w, _ = _inputs((64, 96), 9, device)
    points = [(QuantConfig(bits=b, blocksize=32, double_quant=True), r) for b in (2, 4) for r in (0, 4)]
    fused = fastgrid.profile_grid(w, points, iters=2)
    monkeypatch.setattr(triton_residual, "available", lambda device: False)
    eager = fastgrid.profile_grid(w, points, iters=2)
    assert [p.error for p in fused] == [p.error for p in eager]


def test_bad_arguments_are_refused(device):
    w = torch.zeros(4, 8, device=device)
    with pytest.raises(ValueError, match="1..8-bit"):
        triton_residual.residual_into(w, w, w, torch.ones(1, device=device), torch.zeros(1023, device=device),
                                      torch.zeros(1024, device=device), 32, 10)
    with pytest.raises(ValueError, match="float32"):
        triton_residual.residual_into(w.double(), w, w, torch.ones(1, device=device), torch.zeros(3, device=device),
                                      torch.zeros(4, device=device), 32, 2)
