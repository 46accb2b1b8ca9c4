"""The output-aware objective ‖D_r(W − Q − A·Bᵀ)L‖²_F (quant.weighting) checked against brute force on small
matrices: the closed form against explicit samples, CLoQ's adapter against Eckart–Young, perturbations, random
candidates and a generic optimiser, and the two special cases that must reduce to the older objectives exactly
(R = I: unweighted; diagonal R: LQ-LoRA's diagonal Fisher)."""

from __future__ import annotations

import pytest
import torch

from quant import QuantConfig, SolverSettings, decompose, quantize
from quant.engine import profile_matrix
from quant.fastgrid import profile_grid
from quant.weighting import Metric, Weighting, calibrated_adapter, check_weighting, damped_cholesky

EXACT = SolverSettings(method="exact")
QUERY = "encoder.layer.0.attention.self.query.weight"  # 384 x 384


def nf(bits: int, blocksize: int = 64) -> QuantConfig:
    return QuantConfig("nf", bits, blocksize)


def samples(count: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few outlier features and correlated columns, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    x[:, :3] *= 8
    mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    return x @ mix


def second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / len(x)


def row_weights(m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(m, generator=g))


def output_error(e: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """The brute-force objective: mean over the samples of Σ_i r_i·((W − Q − ABᵀ)x)_i², in float64."""
    y = x.double() @ e.double().T  # (samples, m)
    if rows is not None:
        y = y * rows.double().sqrt()
    return float(y.pow(2).sum(1).mean())


def small_case(m=24, n=32, count=400, seed=0):
    g = torch.Generator().manual_seed(seed + 10)
    w = torch.randn(m, n, generator=g)
    x = samples(count, n, seed)
    return w, x, row_weights(m, seed + 1)


# ---- (a) the closed form is the expected output error -----------------------------------------------------
@pytest.mark.parametrize("with_rows", [False, True])
def test_closed_form_equals_mean_output_error_over_the_samples(with_rows):
    w, x, rows = small_case()
    rows = rows if with_rows else None
    chol = damped_cholesky(second_moment(x), damping=0.0)  # R exactly the samples' second moment
    q = quantize(w, nf(2, 16)).dequantize()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(24, 3, generator=g), torch.randn(32, 3, generator=g)
    e = w - q - a @ b.T
    metric = Metric.of(check_weighting(Weighting.output(chol, rows), e.shape), "cpu")
    assert metric.error(e) == pytest.approx(output_error(e, x, rows), rel=1e-5)
    # and the decomposition reports that same quantity for what it returns
    d = decompose(w, nf(2, 16), 4, iters=3, fisher=Weighting.output(chol, rows), solver=EXACT)
    assert d.error == pytest.approx(output_error(w - d.q.dequantize() - d.a @ d.b.T, x, rows), rel=1e-5)


def test_damping_adds_a_ridge_of_the_mean_diagonal():
    x = samples(10, 16)  # fewer samples than features: R is singular, only the ridge makes it factorable
    r = second_moment(x)
    with pytest.raises(ValueError, match="not positive definite; use a damping > 0"):
        damped_cholesky(r, 0.0)
    chol = damped_cholesky(r, 0.01).double()
    want = r + 0.01 * r.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(chol @ chol.T, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(chol, torch.tril(chol))


# ---- (b) CLoQ's adapter is the optimum for a fixed Q --------------------------------------------------------
@pytest.mark.parametrize("with_rows", [False, True])
def test_calibrated_adapter_meets_the_eckart_young_bound(with_rows):
    w, x, rows = small_case()
    rows = rows if with_rows else None
    chol = damped_cholesky(second_moment(x))
    weights = Weighting.output(chol, rows)
    residual = w - quantize(w, nf(2, 16)).dequantize()
    metric = Metric.of(weights, "cpu")
    s = torch.linalg.svdvals(metric.weigh(residual).double())
    for rank in (1, 4, 8):
        a, b = calibrated_adapter(residual, rank, weights)
        got = metric.error(residual - a @ b.T)
        assert got == pytest.approx(float(s[rank:].pow(2).sum()), rel=1e-4)
        # iters=1 is q(W) followed by this adapter: the decomposition's first step is CLoQ's initialisation
        d = decompose(w, nf(2, 16), rank, iters=1, fisher=weights, solver=EXACT)
        assert d.error == pytest.approx(got, rel=1e-5)


def test_no_perturbation_or_random_candidate_beats_the_calibrated_adapter():
    w, x, rows = small_case()
    weights = Weighting.output(damped_cholesky(second_moment(x)), rows)
    metric = Metric.of(weights, "cpu")
    residual = (w - quantize(w, nf(2, 16)).dequantize()).double()
    rank = 4
    a, b = (t.double() for t in calibrated_adapter(residual.float(), rank, weights))
    best = metric.error(residual - a @ b.T)
    g = torch.Generator().manual_seed(7)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(20):
            da = torch.randn(a.shape, generator=g, dtype=torch.float64) * scale * a.abs().mean()
            db = torch.randn(b.shape, generator=g, dtype=torch.float64) * scale * b.abs().mean()
            assert metric.error(residual - (a + da) @ (b + db).T) >= best * (1 - 1e-6)
    for _ in range(200):  # random rank-r candidates, each with its least-squares best B for a random A
        ra = torch.randn(24, rank, generator=g, dtype=torch.float64)
        cand = ra @ torch.linalg.lstsq(ra, residual).solution  # minimises the plain norm for that column space
        assert metric.error(residual - cand) >= best
    # the unweighted optimum (LoftQ's adapter for this Q) is worse in the output norm
    ua, ub = calibrated_adapter(residual.float(), rank)
    assert metric.error(residual - ua.double() @ ub.double().T) > best * 1.01


def test_a_generic_optimiser_does_not_beat_the_calibrated_adapter():
    torch.manual_seed(0)
    w, x, rows = small_case(m=12, n=16, count=200)
    weights = Weighting.output(damped_cholesky(second_moment(x)), rows)
    metric = Metric.of(weights, "cpu")
    residual = (w - quantize(w, nf(2, 16)).dequantize()).double()
    chol, dr = metric.chol.double(), metric.dr.double()
    rank = 2
    a, b = (t.double() for t in calibrated_adapter(residual.float(), rank, weights))
    best = metric.error(residual - a @ b.T)

    def loss(pa, pb):
        return (dr[:, None] * ((residual - pa @ pb.T) @ chol)).pow(2).sum()

    found = []
    for seed in range(2):  # low-rank factorisation has no spurious local minima: two random starts suffice
        g = torch.Generator().manual_seed(seed)
        pa = torch.randn(12, rank, generator=g, dtype=torch.float64, requires_grad=True)
        pb = torch.randn(16, rank, generator=g, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([pa, pb], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = loss(pa, pb)
            value.backward()
            return value

        opt.step(closure)
        found.append(float(loss(pa, pb).detach()))
    assert min(found) >= best * (1 - 1e-6)
    assert min(found) == pytest.approx(best, rel=1e-4)  # the optimiser reaches the same optimum


# ---- (c) R = I without row weights is today's unweighted decomposition ------------------------------------
@pytest.mark.parametrize("solver", [EXACT, SolverSettings()])
def test_identity_covariance_reduces_to_the_unweighted_decomposition_exactly(minilm_weights, solver):
    w = minilm_weights[QUERY][:128, :192]
    eye = Weighting.output(torch.eye(192))
    for cfg, rank, iters in ((nf(2, 16), 8, 3), (nf(4, 64), 16, 2), (nf(3, 32), 0, 1)):
        plain = decompose(w, cfg, rank, iters, solver=solver)
        same = decompose(w, cfg, rank, iters, fisher=eye, solver=solver)
        assert same.errors == plain.errors and same.best_iter == plain.best_iter
        assert torch.equal(same.a, plain.a) and torch.equal(same.b, plain.b)
        assert torch.equal(same.q.dequantize(), plain.q.dequantize())


def test_identity_covariance_reduces_to_the_unweighted_grid_exactly(minilm_weights):
    w = minilm_weights[QUERY]
    points = [(nf(2, 64), 16), (nf(4, 32), 8), (nf(3, 64), 0)]
    plain = profile_grid(w, points, 3)
    same = profile_grid(w, points, 3, Weighting.output(torch.eye(384)))
    assert [(r.error, r.error_unweighted, r.quant_error, r.best_iter) for r in same] == \
        [(r.error, r.error_unweighted, r.quant_error, r.best_iter) for r in plain]


# ---- (d) diagonal R is LQ-LoRA's diagonal Fisher ------------------------------------------------------------
def test_diagonal_covariance_matches_the_diagonal_fisher_objective(minilm_weights):
    w = minilm_weights[QUERY][:96, :128]
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.rand(96, generator=g) + 0.05, torch.exp(torch.randn(128, generator=g))
    chol = damped_cholesky(torch.diag(cols), damping=0.0)
    assert torch.allclose(chol.diagonal(), cols.sqrt(), rtol=1e-6)
    output, diagonal = Weighting.output(chol, rows), Weighting.diagonal(rows, cols)
    e = torch.randn(96, 128, generator=g)
    assert Metric.of(output, "cpu").error(e) == pytest.approx(Metric.of(diagonal, "cpu").error(e), rel=1e-6)
    for cfg, rank, iters in ((nf(2, 16), 8, 3), (nf(4, 64), 4, 1)):
        a = decompose(w, cfg, rank, iters, fisher=output, solver=EXACT)
        b = decompose(w, cfg, rank, iters, fisher=(rows, cols), solver=EXACT)
        assert a.errors == pytest.approx(b.errors, rel=1e-5)
        assert torch.allclose(a.a @ a.b.T, b.a @ b.b.T, rtol=1e-3, atol=1e-4 * float((b.a @ b.b.T).abs().max()))


# ---- the batched grid and the validation -----------------------------------------------------------------
def test_batched_grid_within_one_percent_of_exact_output_aware_loftq(minilm_weights):
    w = minilm_weights[QUERY]  # rank 16 + 32 oversampling < a quarter of 384: the subspace iteration runs
    x = samples(1000, 384, seed=4)
    weights = Weighting.output(damped_cholesky(second_moment(x)), row_weights(384))
    points = [(nf(2, 64), 16), (nf(4, 64), 16)]
    got = profile_grid(w, points, 3, weights)
    want = profile_matrix(w, points, 3, weights, EXACT)
    for g, e in zip(got, want):
        assert 0.98 < g.error / e.error <= 1.01
        assert g.quant_error == pytest.approx(e.quant_error, rel=1e-5)
        assert g.error_unweighted == pytest.approx(e.error_unweighted, rel=0.05)


def test_invalid_weightings_raise():
    w = torch.randn(6, 8)
    chol = torch.eye(8)
    with pytest.raises(ValueError, match=r"factor has shape \(6, 6\); the matrix needs \(8, 8\)"):
        decompose(w, nf(2, 16), 2, fisher=Weighting.output(torch.eye(6)))
    with pytest.raises(ValueError, match="lower-triangular"):
        decompose(w, nf(2, 16), 2, fisher=Weighting.output(chol + torch.triu(torch.ones(8, 8), 1)))
    with pytest.raises(ValueError, match="positive diagonal"):
        decompose(w, nf(2, 16), 2, fisher=Weighting.output(torch.diag(torch.tensor([1.0] * 7 + [0.0]))))
    with pytest.raises(ValueError, match=r"row weights have shape \(5,\); the matrix needs \(6,\)"):
        decompose(w, nf(2, 16), 2, fisher=Weighting.output(chol, torch.ones(5)))
    with pytest.raises(ValueError, match="exactly one of cols"):
        decompose(w, nf(2, 16), 2, fisher=Weighting(rows=torch.ones(6)))
    with pytest.raises(ValueError, match="second moment is zero"):
        damped_cholesky(torch.zeros(4, 4))


# ---- error-compensating (GPTQ) rounding ----------------------------------------------------------------------
def test_gptq_rounding_with_identity_covariance_is_round_to_nearest():
    from quant.errcomp import gptq_quantize

    w, _, _ = small_case(m=20, n=48)
    for cfg in (nf(2, 16), nf(4, 64), QuantConfig("int", 3, 32, double_quant=False)):
        got, want = gptq_quantize(w, cfg, torch.eye(48)), quantize(w, cfg)
        assert all(torch.equal(got.tensors()[k], v) for k, v in want.tensors().items())


def test_gptq_update_is_the_optimal_compensation_and_beats_nearest():
    from quant.codebooks import nf_codebook

    # Each column's code is the nearest code of that column's value in the continuous minimiser of (w - q)ᵀH(w - q)
    # over the columns not yet quantized, the earlier ones fixed at their codes (GPTQ's closed-form update).
    from quant.errcomp import gptq_quantize

    g = torch.Generator().manual_seed(11)
    n = 16
    w = torch.randn(3, n, generator=g)
    x = samples(200, n, seed=2)
    chol = damped_cholesky(second_moment(x))
    h = (chol.double() @ chol.double().T)
    cfg = QuantConfig("nf", 2, 16, double_quant=False)
    q = gptq_quantize(w, cfg, chol)
    got = q.dequantize().double()
    scale = q.block_scales().double().repeat_interleave(16).view(3, n)
    table = nf_codebook(2).double()
    for i in range(3):
        for j in range(n):
            fixed, free = slice(0, j), slice(j, n)
            delta = got[i, fixed] - w[i, fixed].double()  # the quantized prefix's error
            # minimiser of the quadratic over the free columns: v = w_F - H_FF⁻¹ H_F,prefix · delta
            v = w[i, free].double() - torch.linalg.solve(h[free, free], h[free, fixed] @ delta)
            nearest = table[(v[0] / scale[i, j] - table).abs().argmin()] * scale[i, j]
            assert float(got[i, j]) == pytest.approx(float(nearest), rel=1e-6, abs=1e-9)
    metric = Metric.of(Weighting.output(chol), "cpu")
    assert metric.error(w - q.dequantize()) < metric.error(w - quantize(w, cfg).dequantize())


def test_gptq_rounding_lies_between_the_exhaustive_optimum_and_nearest():
    import itertools

    from quant.codebooks import nf_codebook
    from quant.errcomp import gptq_quantize

    g = torch.Generator().manual_seed(12)
    n = 6  # one padded block of 16: every one of the 4^6 code choices is tried under the same stored scale
    x = samples(100, n, seed=3)
    chol = damped_cholesky(second_moment(x))
    cfg = QuantConfig("nf", 2, 16, double_quant=False)
    metric = Metric.of(Weighting.output(chol), "cpu")
    table = nf_codebook(2)
    beaten = 0
    for _ in range(4):
        w = torch.randn(1, n, generator=g)
        scale = quantize(w, cfg).block_scales()[0]
        best = min(metric.error(w - (table[list(c)] * scale)[None]) for c in itertools.product(range(4), repeat=n))
        got = metric.error(w - gptq_quantize(w, cfg, chol).dequantize())
        nearest = metric.error(w - quantize(w, cfg).dequantize())
        assert best * (1 - 1e-6) <= got <= nearest * (1 + 1e-6)
        beaten += got < nearest * (1 - 1e-3)
    assert beaten >= 1  # the compensation changes some codes for the better
