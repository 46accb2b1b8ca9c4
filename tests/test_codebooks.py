"""NF and INT codebooks: the published NF4 table, QLoRA's construction for NF2/3/8, nearest-value assignment."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from quant.codebooks import (
    NF_OFFSET,
    codebook,
    int_codebook,
    nearest_code,
    nf_codebook,
    nf_construction,
)

# bitsandbytes' NF4 table (docs/formulas.md), typed in here independently of quant/codebooks.py.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_codebook_is_the_bitsandbytes_table_exactly():
    table = nf_codebook(4)
    assert table.dtype == torch.float32
    assert table.tolist() == BNB_NF4  # the published values are fp32 numbers printed in full: exact equality


def test_nf4_construction_reproduces_the_published_table():
    built = torch.tensor(nf_construction(4), dtype=torch.float64)
    assert (built - torch.tensor(BNB_NF4, dtype=torch.float64)).abs().max().item() <= 2e-7


def _nf_by_formula(bits: int) -> torch.Tensor:
    """docs/formulas.md's formula in float64, independent of the implementation's fp32 path."""
    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor(list(pos) + [0.0] + list(neg), dtype=torch.float64).sort().values
    return values / values.max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_construction_follows_the_formula(bits):
    built = torch.tensor(nf_construction(bits), dtype=torch.float64)
    assert (built - _nf_by_formula(bits)).abs().max().item() <= 2e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_construction_is_bit_identical_to_scipy_stats_norm_ppf(bits):
    """The construction reads N(0,1)'s quantiles from scipy.special.ndtri (a lighter import than scipy.stats):
    every value equals the one norm.ppf gives, so no plan or packed byte changes."""
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF_OFFSET, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    assert nf_construction(bits) == tuple((values / values.max()).tolist())


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_nf_codebook_structure(bits):
    t = nf_codebook(bits)
    assert t.tolist() == list(nf_construction(bits))
    assert t.numel() == 2**bits
    assert bool((t[1:] > t[:-1]).all()), "NF values must be strictly increasing"
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert int((t == 0).sum()) == 1
    # Asymmetric: 2^(k-1) positive values, one fewer negative, so that 0 is exact.
    assert int((t > 0).sum()) == 2 ** (bits - 1)
    assert int((t < 0).sum()) == 2 ** (bits - 1) - 1


def test_nf_lower_bit_positives_are_nf4_subsets():
    # linspace(δ, .5, 5) is every other point of linspace(δ, .5, 9): NF3's positive half is NF4's at even
    # steps, and NF2's inner positive value is NF4's fifth positive value (the quantile at (δ + .5) / 2).
    nf4_pos = [v for v in BNB_NF4 if v > 0][::-1]  # 1.0 first
    nf3_pos = [v for v in nf_construction(3) if v > 0][::-1]
    assert nf3_pos == pytest.approx(nf4_pos[::2], abs=2e-7)
    assert nf_construction(2) == pytest.approx((-1.0, 0.0, BNB_NF4[11], 1.0), abs=2e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_codebooks_are_evenly_spaced(bits):
    n = 2**bits
    sym = int_codebook(bits)
    asym = int_codebook(bits, asymmetric=True)
    assert sym.numel() == asym.numel() == n
    assert sym[0].item() == -1.0 and sym[-1].item() == 1.0
    assert asym[0].item() == 0.0 and asym[-1].item() == 1.0
    # Each value is the exact grid point rounded to fp32 (within half an ulp at 1: 2^-24 < 1e-7).
    i = torch.arange(n, dtype=torch.float64)
    assert (sym.double() - (-1 + 2 * i / (n - 1))).abs().max().item() <= 1e-7
    assert (asym.double() - i / (n - 1)).abs().max().item() <= 1e-7
    assert (sym + sym.flip(0)).abs().max().item() <= 1e-7  # symmetric about 0


def test_codebook_dispatch_and_invalid_inputs():
    assert torch.equal(codebook("nf", 4), nf_codebook(4))
    assert torch.equal(codebook("int", 3, asymmetric=True), int_codebook(3, asymmetric=True))
    with pytest.raises(ValueError, match="bits in"):
        nf_codebook(5)
    with pytest.raises(ValueError, match="bits in"):
        int_codebook(1)
    with pytest.raises(ValueError, match="use 'nf' or 'int'"):
        codebook("fp", 4)


ALL_TABLES = [("nf", b, False) for b in (2, 3, 4, 8)] + [("int", b, a) for b in (2, 3, 4, 8) for a in (False, True)]


@pytest.mark.parametrize("kind,bits,asym", ALL_TABLES)
def test_nearest_code_equals_argmin(kind, bits, asym):
    t = codebook(kind, bits, asym)
    x = torch.randn(50_000) * 0.6  # includes values beyond ±1, which must go to the end values
    codes = nearest_code(x, t)
    assert codes.dtype == torch.uint8
    ref = (x.double()[:, None] - t.double()[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), ref)


@pytest.mark.parametrize("kind,bits,asym", ALL_TABLES)
def test_nearest_code_at_midpoints(kind, bits, asym):
    # x is nearer t[i+1] iff x > (t[i] + t[i+1]) / 2, computed exactly in float64; exact ties go to the lower
    # value (argmin's first index). The fp32 neighbours of each midpoint are the hardest inputs.
    t = codebook(kind, bits, asym)
    exact_mids = (t[1:].double() + t[:-1].double()) / 2
    m32 = exact_mids.float()
    x = torch.cat([m32, torch.nextafter(m32, torch.full_like(m32, 2.0)), torch.nextafter(m32, torch.full_like(m32, -2.0))])
    expected = (x.double()[:, None] > exact_mids[None, :]).sum(dim=1)
    assert torch.equal(nearest_code(x, t).long(), expected)
    representable = m32.double() == exact_mids
    assert torch.equal(nearest_code(m32[representable], t).long(), torch.arange(t.numel() - 1)[representable])
