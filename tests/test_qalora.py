"""QA-LoRA: exact merging into zero-points, pooled-adapter shapes, the group-constant low-rank step, costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.blockwise import quantize, quantize_dequantize
from quant.config import QuantConfig
from quant.lowrank import SolverSettings
from quant.qalora import (
    QALoRALinear,
    adapter_weight,
    expand_groups,
    group_constant_lowrank,
    group_means,
    max_rank,
    qalora_decompose,
    qalora_matrix_bits,
)

UP = "encoder.layer.0.intermediate.dense.weight"  # 1536 x 384: in = 384
DOWN = "encoder.layer.0.output.dense.weight"  # 384 x 1536: in = 1536
QUERY = "encoder.layer.0.attention.self.query.weight"  # 384 x 384
EXACT = SolverSettings(method="exact")


def int_config(bits: int = 4, g: int = 32, scale_dtype: str = "fp32") -> QuantConfig:
    return QuantConfig(kind="int", bits=bits, blocksize=g, double_quant=False, asymmetric=True,
                       scale_dtype=scale_dtype)


def linear_from(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.normal_()
    return lin


def train_adapter(layer: QALoRALinear, steps: int = 5) -> None:
    """A few SGD steps on a random regression target; only the adapter may change."""
    base = {k: v.clone() for k, v in layer.named_buffers()}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(32, layer.in_features)
    target = torch.randn(32, layer.out_features)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    assert layer.lora_B.abs().max() > 1e-3, "training did not move the adapter; the merge test would be vacuous"
    for k, v in layer.named_buffers():
        assert torch.equal(v, base[k]), f"training changed the frozen buffer {k}"


# ---- forward and merge ------------------------------------------------------------------------------------------
def test_pooled_adapter_equals_group_constant_full_size_lora_a():
    torch.manual_seed(1)
    g, m, n, r = 32, 24, 128, 3
    layer = QALoRALinear.from_linear(linear_from(torch.randn(m, n)), int_config(4, g), rank=r, alpha=6.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(5, 7, n)
    base = F.linear(x, layer.dequantize(), layer.bias)
    # pool then lora_A == a full-size lora_A' whose columns are lora_A[:, j]/g throughout group j.
    full_a = expand_groups(layer.lora_A.detach(), g) / g
    expected = base + layer.scaling * x @ (layer.lora_B.detach() @ full_a).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    delta = layer.lora_delta()
    assert torch.equal(delta.view(m, n // g, g), delta.view(m, n // g, g)[..., :1].expand(m, n // g, g))
    torch.testing.assert_close(delta, layer.scaling * layer.lora_B.detach() @ full_a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_after_training_is_exact_and_moves_only_zero_points(bits, bias):
    torch.manual_seed(bits)
    g, m, n = 32, 48, 128
    layer = QALoRALinear.from_linear(linear_from(torch.randn(m, n) * 0.05, bias), int_config(bits, g), rank=4,
                                     alpha=8.0)
    train_adapter(layer)
    zeros_before = layer.q_zeros.clone()
    merged = layer.merge()

    assert merged.rank == 0 and merged.lora_A is None and list(merged.parameters()) == []
    assert torch.equal(merged.q_codes, layer.q_codes)  # packed codes byte-identical
    assert torch.equal(merged.q_scales, layer.q_scales)
    assert torch.equal(layer.q_zeros, zeros_before)  # the source layer is left as it was
    shift = merged._field("zeros").double() - layer._field("zeros").double()
    expected_shift = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).reshape(-1) / g
    # fp32 rounding of β' = β + c is below 1e-8 here (|β'| < 0.3); the shifts themselves are ~1e-4.
    torch.testing.assert_close(shift, expected_shift, rtol=0, atol=1e-7)
    assert (shift != 0).all()  # every (row, group) zero-point moved
    assert merged.quant_nbytes == layer.quant_nbytes == int_config(bits, g).storage_bytes(m * n)

    torch.testing.assert_close(merged.dequantize(), layer.merged_weight(), rtol=0, atol=1e-6)
    x = torch.randn(16, n)
    torch.testing.assert_close(merged(x), layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_merge_random_adapter_on_real_matrix(minilm_weights):
    w = minilm_weights[DOWN]
    layer = QALoRALinear.from_linear(linear_from(w), int_config(4, 128), rank=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.1)
        layer.lora_B.normal_(std=0.1)
    merged = layer.merge()
    assert torch.equal(merged.q_codes, layer.q_codes) and torch.equal(merged.q_scales, layer.q_scales)
    torch.testing.assert_close(merged.dequantize(), layer.merged_weight(), rtol=0, atol=1e-6)
    x = torch.randn(8, w.shape[1])
    torch.testing.assert_close(merged(x), layer(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_dtype, mantissa", [("fp16", 11), ("bf16", 8)])
def test_merge_with_16_bit_zero_points_loses_only_their_rounding(scale_dtype, mantissa):
    torch.manual_seed(3)
    g, m, n = 32, 40, 128
    layer = QALoRALinear.from_linear(linear_from(torch.randn(m, n)), int_config(4, g, scale_dtype), rank=4)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    merged = layer.merge()
    assert merged._field("zeros").dtype == layer._field("zeros").dtype != torch.float32
    exact = layer.merged_weight()
    err = (merged.dequantize() - exact).abs()
    beta = expand_groups(merged._field("zeros").float().view(m, n // g), g).abs()
    # Rounding to a p-bit significand moves a value by at most |v|·2^-p (plus fp32 noise of the sum).
    assert (err <= beta * 2.0 ** -mantissa + 1e-6).all()
    assert err.max() > 1e-5  # the loss is real: fp32 zero-points are needed for an fp32-exact merge


# ---- shapes and layout on real MiniLM matrices ------------------------------------------------------------------
@pytest.mark.parametrize("name", [UP, DOWN])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_pooled_adapter_shapes_and_row_group_layout(minilm_weights, name, g):
    w = minilm_weights[name]
    m, n = w.shape
    rank = min(8, max_rank(w.shape, g))
    layer = QALoRALinear.from_linear(linear_from(w), int_config(4, g), rank=rank)
    assert layer.lora_A.shape == (rank, n // g) and layer.lora_B.shape == (m, rank)
    assert layer.adapter_nbytes16 == 2 * rank * (m + n // g)
    # Block j of row i of the row-major flattening is group j of row i: scale = max − min, zero = min.
    groups = w.view(m, n // g, g)
    assert torch.equal(layer._field("zeros").view(m, n // g), groups.amin(dim=2))
    assert torch.equal(layer._field("scales").view(m, n // g), groups.amax(dim=2) - groups.amin(dim=2))
    # Zero-initialised product: the layer starts as the plain quantized linear.
    x = torch.randn(4, n)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    torch.testing.assert_close(layer(x), F.linear(x, quantize_dequantize(w, int_config(4, g)), layer.bias))


def test_in_features_not_multiple_of_group_size_raises():
    w = torch.randn(8, 96)
    cfg = int_config(4, 64)
    with pytest.raises(ValueError, match="multiple of the group size"):
        QALoRALinear.from_linear(linear_from(w), cfg, rank=1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        QALoRALinear(quantize(w, cfg))
    with pytest.raises(ValueError, match="multiple of the group size"):
        qalora_decompose(w, cfg, rank=1, iters=1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        qalora_matrix_bits(cfg, (8, 96), 1)


def test_invalid_configs_ranks_and_inits_raise():
    lin = linear_from(torch.randn(16, 128))
    with pytest.raises(ValueError, match="asymmetric INT"):
        QALoRALinear.from_linear(lin, QuantConfig(kind="nf", bits=4, blocksize=32), rank=1)
    with pytest.raises(ValueError, match="rank <= min"):
        QALoRALinear.from_linear(lin, int_config(4, 32), rank=5)  # in/g = 4
    with pytest.raises(ValueError, match="init='loftq' only"):
        QALoRALinear.from_linear(lin, int_config(4, 32), rank=2, iters=2)
    with pytest.raises(ValueError, match="iters >= 1"):
        QALoRALinear.from_linear(lin, int_config(4, 32), rank=2, init="loftq")
    with pytest.raises(ValueError, match="not supported"):
        QALoRALinear.from_linear(lin, int_config(4, 32), rank=2, init="gaussian")
    with pytest.raises(ValueError, match=r"\(16, r\) and \(4, r\)"):
        QALoRALinear(quantize(lin.weight.detach(), int_config(4, 32)), a=torch.zeros(16, 2), b=torch.zeros(128, 2))


def test_state_dict_round_trip():
    lin = linear_from(torch.randn(16, 128))
    layer = QALoRALinear.from_linear(lin, int_config(3, 32), rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    fresh = QALoRALinear(quantize(torch.randn(16, 128), int_config(3, 32)), torch.zeros(16), rank=2, alpha=4.0)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


# ---- decomposition ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bits", [(UP, 2), (DOWN, 4)])
def test_decompose_beats_plain_quantization_in_one_step(minilm_weights, name, bits):
    w = minilm_weights[name]
    g = 64
    cfg = int_config(bits, g)
    rank = min(8, max_rank(w.shape, g))
    plain = qalora_decompose(w, cfg, rank, 0, solver=EXACT).error
    assert plain == pytest.approx(float((w - quantize_dequantize(w, cfg)).double().pow(2).sum()), rel=1e-9)
    one = qalora_decompose(w, cfg, rank, 1, solver=EXACT)
    assert one.error < plain * (1 - 1e-3)  # measured 0.3–4 % lower on MiniLM
    dec = qalora_decompose(w, cfg, rank, 3, solver=EXACT)
    # Closed form of step 1: ‖R‖² − g·Σ_{k≤r} σ_k(R̄)² with R = W − q(W).
    residual = (w - quantize_dequantize(w, cfg)).double()
    sigma = torch.linalg.svdvals(group_means(residual, g))
    assert dec.errors[0] == pytest.approx(float(residual.pow(2).sum() - g * sigma[:rank].pow(2).sum()), rel=1e-5)
    # Min/max quantization absorbs group-constant shifts: later steps cannot improve and the first is returned.
    assert dec.best_iter == 1 and not dec.regressed
    assert dec.errors[0] == one.error and dec.error <= one.error  # more iterations never return a worse iterate
    assert max(dec.errors) <= dec.errors[0] * (1 + 1e-4)
    # The returned storage and adapter reproduce the reported error.
    recon = dec.q.dequantize() + adapter_weight(dec.lora_a, dec.lora_b, g)
    assert float((w - recon).double().pow(2).sum()) == pytest.approx(dec.error, rel=1e-6)
    assert dec.lora_a.shape == (rank, w.shape[1] // g) and dec.lora_b.shape == (w.shape[0], rank)


def test_group_constant_shift_is_absorbed_by_zero_points(minilm_weights):
    w = minilm_weights[QUERY]
    g = 32
    shift = expand_groups(torch.randn(w.shape[0], w.shape[1] // g) * 0.05, g)
    plain, shifted = quantize(w, int_config(4, g)), quantize(w - shift, int_config(4, g))
    assert torch.equal(plain.codes, shifted.codes)
    torch.testing.assert_close(shifted.dequantize(), plain.dequantize() - shift, rtol=0, atol=1e-6)


def test_zero_rank_or_zero_iters_is_plain_quantization(minilm_weights):
    w = minilm_weights[QUERY]
    cfg = int_config(2, 64)
    for rank, iters in [(0, 3), (4, 0)]:
        dec = qalora_decompose(w, cfg, rank, iters)
        assert torch.equal(dec.q.codes, quantize(w, cfg).codes) and dec.best_iter == 0
        assert dec.lora_a.shape == (rank, 6) and not dec.lora_a.any() and not dec.lora_b.any()


def test_randomized_solver_matches_exact(minilm_weights):
    w = minilm_weights[UP]
    cfg = int_config(3, 32)
    exact = qalora_decompose(w, cfg, 8, 1, solver=EXACT).error
    assert qalora_decompose(w, cfg, 8, 1, solver=SolverSettings()).error == pytest.approx(exact, rel=1e-6)


def test_group_constant_lowrank_is_optimal_against_brute_force():
    torch.manual_seed(5)
    m, g, groups, r = 7, 3, 4, 2
    n = g * groups
    res = torch.randn(m, n, dtype=torch.float64)
    expand = torch.kron(torch.eye(groups, dtype=torch.float64), torch.ones(1, g, dtype=torch.float64))  # E

    # Unconstrained rank: least squares over M in ‖R − M·E‖ gives the group means.
    m_ls = torch.linalg.lstsq(expand.T, res.T).solution.T
    torch.testing.assert_close(m_ls, group_means(res, g))

    lora_b, lora_a, _ = group_constant_lowrank(res, g, r, EXACT)
    ours = float((res - adapter_weight(lora_a, lora_b, g)).pow(2).sum())
    sigma = torch.linalg.svdvals(group_means(res, g))
    closed = float((res - expand_groups(group_means(res, g), g)).pow(2).sum() + g * sigma[r:].pow(2).sum())
    assert ours == pytest.approx(closed, rel=1e-12)

    # Brute force: alternating least squares on ‖R − X·Y·E‖ from many random starts never beats the SVD step.
    pinv_e = torch.linalg.pinv(expand)
    als = []
    for _ in range(20):
        x = torch.randn(m, r, dtype=torch.float64)
        for _ in range(300):
            y = torch.linalg.pinv(x) @ res @ pinv_e
            x = res @ torch.linalg.pinv(y @ expand)
        als.append(float((res - x @ y @ expand).pow(2).sum()))
    assert min(als) >= ours * (1 - 1e-10)
    assert min(als) == pytest.approx(ours, rel=1e-8)
    # Projecting the unconstrained rank-r SVD of R onto group-constant matrices is worse.
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    naive = expand_groups(group_means(u[:, :r] * s[:r] @ vh[:r], g), g)
    assert float((res - naive).pow(2).sum()) > ours * (1 + 1e-6)


def test_from_linear_loftq_carries_the_decomposition(minilm_weights):
    w = minilm_weights[QUERY]
    cfg = int_config(2, 32)
    lin = linear_from(w)
    dec = qalora_decompose(w, cfg, 6, 2)
    layer = QALoRALinear.from_linear(lin, cfg, rank=6, iters=2, init="loftq", alpha=24.0)  # scaling 4
    assert layer.scaling == 4.0 and torch.equal(layer.q_codes, dec.q.codes)
    assert float((w - layer.merged_weight()).double().pow(2).sum()) == pytest.approx(dec.error, rel=1e-5)
    # Merging the initialisation yields a pure INT-2 layer closer to W than min/max quantization.
    merged = layer.merge()
    plain = float((w - quantize_dequantize(w, cfg)).double().pow(2).sum())
    merged_err = float((w - merged.dequantize()).double().pow(2).sum())
    assert merged_err == pytest.approx(dec.error, rel=1e-5) and merged_err < plain * (1 - 1e-3)


# ---- cost -------------------------------------------------------------------------------------------------------
def test_matrix_bits_hand_counted():
    # int4, g=64, fp32 scale + zero, 384 x 1536, rank 8:
    # codes 384·1536·4/8 = 294,912 B; 9,216 groups × 8 B = 73,728 B; total 368,640 B = 2,949,120 bits;
    # adapters 16 · 8 · (384 + 1536/64) = 52,224 bits (plain LoRA: 16 · 8 · (384 + 1536) = 245,760).
    cfg = int_config(4, 64)
    assert qalora_matrix_bits(cfg, (384, 1536), 8) == 2_949_120 + 52_224
    assert cfg.matrix_bits((384, 1536), 8) - qalora_matrix_bits(cfg, (384, 1536), 8) == 245_760 - 52_224
    # int3, g=32, fp16 scale + zero, 48 x 128, rank 2: codes 6,144·3/8 = 2,304 B; 192 groups × 4 B = 768 B;
    # 3,072 B = 24,576 bits; adapters 16 · 2 · (48 + 4) = 1,664 bits.
    cfg3 = int_config(3, 32, "fp16")
    assert qalora_matrix_bits(cfg3, (48, 128), 2) == 24_576 + 1_664
    layer = QALoRALinear(quantize(torch.randn(48, 128), cfg3), rank=2)
    assert 8 * (layer.quant_nbytes + layer.adapter_nbytes16) == qalora_matrix_bits(cfg3, (48, 128), 2)


# ---- Fisher weighting -------------------------------------------------------------------------------------------
def test_weighted_group_constant_lowrank_is_optimal_against_brute_force():
    torch.manual_seed(6)
    m, g, groups, r = 6, 4, 3, 2
    n = g * groups
    res = torch.randn(m, n, dtype=torch.float64)
    dr, dc = torch.rand(m, dtype=torch.float64) + 0.2, torch.rand(n, dtype=torch.float64) + 0.2
    expand = torch.kron(torch.eye(groups, dtype=torch.float64), torch.ones(1, g, dtype=torch.float64))

    def werr(low):
        return float((dr[:, None] * (res - low) * dc[None, :]).pow(2).sum())

    lora_b, lora_a, _ = group_constant_lowrank(res, g, r, EXACT, dr=dr, dc=dc)
    ours = werr(adapter_weight(lora_a, lora_b, g))
    # Weighted alternating least squares over M = X·Y (vec form: D_r X Y E D_c) from many starts never beats it.
    wvec = (dr[:, None] * dc[None, :]).reshape(-1)
    best = []
    for _ in range(10):
        x = torch.randn(m, r, dtype=torch.float64)
        for _ in range(200):
            # Y given X: least squares of ‖D_r(R − X·Y·E)D_c‖ in vec(Y).
            design = torch.kron(x, expand.T.contiguous()) * wvec[:, None]  # vec(X Y E) = (X ⊗ Eᵀ) vec(Y), row-major
            y = torch.linalg.lstsq(design, res.reshape(-1) * wvec).solution.view(r, groups)
            design = torch.kron(torch.eye(m, dtype=torch.float64), (y @ expand).T.contiguous()) * wvec[:, None]
            x = torch.linalg.lstsq(design, res.reshape(-1) * wvec).solution.view(m, r)
        best.append(werr(x @ y @ expand))
    assert min(best) >= ours * (1 - 1e-9)
    assert min(best) == pytest.approx(ours, rel=1e-7)
    # The unweighted step is worse in the weighted norm (the weights change the answer).
    plain_b, plain_a, _ = group_constant_lowrank(res, g, r, EXACT)
    assert werr(adapter_weight(plain_a, plain_b, g)) > ours * (1 + 1e-6)
    # Unit weights reproduce the unweighted factors.
    ones_b, ones_a, _ = group_constant_lowrank(res, g, r, EXACT, dr=torch.ones(m, dtype=torch.float64),
                                               dc=torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(adapter_weight(ones_a, ones_b, g), adapter_weight(plain_a, plain_b, g))


def test_fisher_weighted_decomposition_lowers_the_weighted_error(minilm_weights):
    w = minilm_weights[DOWN]
    cfg = int_config(3, 64)
    gen = torch.Generator().manual_seed(0)
    fisher = (torch.rand(w.shape[0], generator=gen) ** 4, torch.rand(w.shape[1], generator=gen) ** 4)
    weighted = qalora_decompose(w, cfg, 8, 1, fisher=fisher, solver=EXACT)
    plain = qalora_decompose(w, cfg, 8, 1, solver=EXACT)
    dr, dc = fisher[0].sqrt(), fisher[1].sqrt()

    def werr(d):
        res = w - d.q.dequantize() - adapter_weight(d.lora_a, d.lora_b, 64)
        return float((dr[:, None] * res * dc[None, :]).double().pow(2).sum())

    assert weighted.error == pytest.approx(werr(weighted), rel=1e-5)
    assert werr(weighted) < werr(plain) * (1 - 1e-3)
    same = qalora_decompose(w, cfg, 8, 1, fisher=(torch.ones(w.shape[0]), torch.ones(w.shape[1])), solver=EXACT)
    assert same.error == pytest.approx(plain.error, rel=1e-6)
    with pytest.raises(ValueError, match="fisher weights have shapes"):
        qalora_decompose(w, cfg, 8, 1, fisher=(fisher[1], fisher[0]), solver=EXACT)


# ---- the profiler's numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
def test_profile_matrix_dispatches_qalora_points(minilm_weights, weighted):
    from quant.engine import profile_matrix

    w = minilm_weights[UP]  # 1536 x 384
    cfg = int_config(2, 64, "fp16")
    gen = torch.Generator().manual_seed(1)
    fisher = (torch.rand(w.shape[0], generator=gen) + 0.1, torch.rand(w.shape[1], generator=gen) + 0.1) \
        if weighted else None
    dr, dc = (fisher[0].sqrt(), fisher[1].sqrt()) if weighted else (torch.ones(w.shape[0]), torch.ones(w.shape[1]))
    got = profile_matrix(w, [(cfg, 4, "qalora"), (cfg, 0, "qalora"), (cfg, 4)], iters=5, fisher=fisher,
                         solver=EXACT)
    # Independent reference: Q and the pooled adapter, expanded to the dense weight A·(B pooled → n columns).
    dec = qalora_decompose(w, cfg, 4, 1, fisher=fisher, solver=EXACT)
    dense = dec.lora_b @ expand_groups(dec.lora_a, 64) / 64
    res = w - dec.q.dequantize() - dense
    plain = w - quantize_dequantize(w, cfg)
    assert got[0].error == pytest.approx(float((dr[:, None] * res * dc).double().pow(2).sum()), rel=1e-6)
    assert got[0].error_unweighted == pytest.approx(float(res.double().pow(2).sum()), rel=1e-6)
    assert got[0].quant_error == pytest.approx(float((dr[:, None] * plain * dc).double().pow(2).sum()), rel=1e-6)
    assert got[0].best_iter == 1 and got[0].error < got[0].quant_error
    assert got[1].error == pytest.approx(got[0].quant_error, rel=1e-9) and got[1].best_iter == 0
    # The LoRA point with the same quantizer: a full-width adapter, the ordinary decomposition.
    from quant import decompose

    assert got[2].error == pytest.approx(decompose(w, cfg, 4, 5, fisher=fisher, solver=EXACT).error, rel=1e-9)
    with pytest.raises(ValueError, match="method"):
        profile_matrix(w, [(cfg, 4, "gptq")], iters=1)


def test_balance_factors_keeps_the_product_bit_for_bit():
    from quant.lowrank import balance_factors

    torch.manual_seed(7)
    a = torch.randn(40, 5) * 1e4  # Fisher-weighted factors: D_r⁻¹U√Σ with row weights ~1e-8 ...
    b = torch.randn(30, 5) * 1e-4  # ... and D_c⁻¹V√Σ
    a[:, 4] = 0  # a rank the residual did not need stays as it is
    a2, b2 = balance_factors(a, b)
    assert torch.equal(a2 @ b2.T, a @ b.T)
    ratio = b2[:, :4].norm(dim=0) / a2[:, :4].norm(dim=0)
    assert ((ratio >= 0.5) & (ratio <= 2)).all()
    assert torch.equal(b2[:, 4], b[:, 4]) and not a2[:, 4].any()


def test_fisher_weighted_qalora_factors_are_balanced(minilm_weights):
    w = minilm_weights[QUERY]
    fisher = (torch.rand(w.shape[0]) * 1e-8 + 1e-9, torch.rand(w.shape[1]) + 0.1)  # LQ-LoRA's raw row scale
    dec = qalora_decompose(w, int_config(3, 32), 4, 1, fisher=fisher, solver=EXACT)
    ratio = dec.lora_a.norm(dim=1) / dec.lora_b.norm(dim=0)
    assert ((ratio > 0.25) & (ratio < 4)).all()  # balanced up to the power of two and the g^(1/4) split
    # Without balancing lora_B would be ~1e4 times lora_A; balanced, both are as large as the unweighted factors.
    plain = qalora_decompose(w, int_config(3, 32), 4, 1, solver=EXACT)
    for got, ref in ((dec.lora_a, plain.lora_a), (dec.lora_b, plain.lora_b)):
        assert 0.1 < float(got.norm() / ref.norm()) < 10


def test_both_decompositions_take_their_settings_in_one_order_by_keyword():
    import inspect

    from quant.decompose import decompose
    from quant.methods import METHODS

    def shape(f):
        return [(p.name, p.kind) for p in inspect.signature(f).parameters.values()]

    lora, qalora = shape(decompose), shape(qalora_decompose)
    assert qalora == [p for p in lora if p[0] != "rounding"], (lora, qalora)
    keyword = {n for n, kind in lora if kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword == {"fisher", "solver", "rounding"}
    assert shape(METHODS["lora"].decompose) == shape(METHODS["qalora"].decompose)
