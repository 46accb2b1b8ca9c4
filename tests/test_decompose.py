"""LoftQ / LQ-LoRA decomposition W ≈ Q + A·Bᵀ on real MiniLM matrices: monotonicity, exactness of the
(weighted) rank-r step, the randomized solver's accuracy, and input validation."""

from __future__ import annotations

import pytest
import torch

from quant import QuantConfig, SolverSettings, decompose, quantize

EXACT = SolverSettings(method="exact")
RANDOMIZED = SolverSettings()  # the default solver the profiler uses

# Three real shapes: square, tall (up-projection) and wide (down-projection).
SQUARE = "encoder.layer.0.attention.self.query.weight"  # 384 x 384
TALL = "encoder.layer.1.intermediate.dense.weight"  # 1536 x 384
WIDE = "encoder.layer.2.output.dense.weight"  # 384 x 1536


def nf(bits: int, blocksize: int = 64) -> QuantConfig:
    return QuantConfig("nf", bits, blocksize)  # QLoRA's double quantization (8-bit / 256 / fp32)


def sq_error(w, q, a, b, rows=None, cols=None) -> float:
    """‖D_r(W − Q − A·Bᵀ)D_c‖²_F in float64, D = diag(√weights); unweighted without weights."""
    r = (w.double() - q.dequantize().double() - a.double() @ b.double().T)
    if rows is not None:
        r = r * rows.double()[:, None] * cols.double()[None, :]
    return float(r.pow(2).sum())


def lognormal_weights(m: int, n: int, seed: int = 1):
    # Row and column weights spread over more than an order of magnitude, like a diagonal Fisher.
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(m, generator=g)), torch.exp(torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def square(minilm_weights):
    return minilm_weights[SQUARE]


# ---- LoftQ against plain quantization --------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_every_iteration_beats_plain_quantization(square, bits):
    cfg = nf(bits)
    plain = decompose(square, cfg, 16, iters=0).error
    d5 = decompose(square, cfg, 16, iters=5)
    assert len(d5.errors) == 5
    for t in range(1, 6):
        d = decompose(square, cfg, 16, iters=t)
        assert d.errors == d5.errors[:t]  # seeded and deterministic: T steps are a prefix of T + 1 steps
        assert d.error <= plain
    assert all(e < plain for e in d5.errors)  # a non-zero adapter removes some of the residual


def test_first_step_is_plain_quantization_plus_the_best_rank_r_residual(square):
    # T = 1: Q = q(W), then the rank-r SVD of W − Q removes exactly its 16 largest squared singular values.
    cfg = nf(3)
    d = decompose(square, cfg, 16, iters=1, solver=EXACT)
    residual = square.double() - quantize(square, cfg).dequantize().double()
    s = torch.linalg.svdvals(residual)
    assert d.error == pytest.approx(float(s[16:].pow(2).sum()), rel=1e-4)
    assert torch.equal(d.q.dequantize(), quantize(square, cfg).dequantize())


def test_error_falls_with_bits(minilm_weights):
    w = minilm_weights[TALL]
    for iters in (0, 2):
        errors = [decompose(w, nf(b), 16, iters=iters).error for b in (2, 3, 4, 8)]
        assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4, errors


@pytest.mark.parametrize("bits", [2, 4])
def test_error_falls_with_rank(minilm_weights, bits):
    w = minilm_weights[WIDE]
    errors = [decompose(w, nf(bits), r, iters=2).error for r in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2], errors


def test_best_iterate_is_returned(square):
    # NF2 is coarse enough that the error path is not monotone in every matrix; whatever it does, the returned
    # iterate is the best one and its error is what its (Q, A, B) really give.
    d = decompose(square, nf(2, 16), 32, iters=5)
    assert d.error == min(d.errors)
    assert 1 <= d.best_iter <= 5 and d.errors[d.best_iter - 1] == d.error
    assert d.a.shape == (384, 32) and d.b.shape == (384, 32)
    assert sq_error(square, d.q, d.a, d.b) == pytest.approx(d.error, rel=1e-6)


# ---- Fisher weighting (LQ-LoRA) ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [SQUARE, TALL])
def test_fisher_weighting_lowers_the_weighted_error(minilm_weights, name):
    w = minilm_weights[name]
    rows, cols = lognormal_weights(*w.shape)
    cfg = nf(3)
    for iters, solver in ((1, EXACT), (5, RANDOMIZED)):
        weighted = decompose(w, cfg, 32, iters=iters, fisher=(rows, cols), solver=solver)
        plain = decompose(w, cfg, 32, iters=iters, solver=solver)
        ours = sq_error(w, weighted.q, weighted.a, weighted.b, rows.sqrt(), cols.sqrt())
        assert ours == pytest.approx(weighted.error, rel=1e-5)  # the reported error is ‖D_r(W−Q−ABᵀ)D_c‖²
        theirs = sq_error(w, plain.q, plain.a, plain.b, rows.sqrt(), cols.sqrt())
        assert ours < 0.97 * theirs, (iters, ours, theirs)


@pytest.mark.parametrize("name,rank", [(SQUARE, 16), (TALL, 64)])
def test_weighted_rank_r_step_is_exact(minilm_weights, name, rank):
    # For a fixed Q the optimum of ‖D_r(R − ABᵀ)D_c‖² over rank-r ABᵀ is the sum of the trailing squared singular
    # values of D_r R D_c (Eckart–Young after the change of variables); iters=1 fixes Q = q(W).
    w = minilm_weights[name]
    rows, cols = lognormal_weights(*w.shape, seed=2)
    cfg = nf(2)
    dr, dc = rows.double().sqrt(), cols.double().sqrt()
    target = dr[:, None] * (w.double() - quantize(w, cfg).dequantize().double()) * dc[None, :]
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    optimum = float(s[rank:].pow(2).sum())

    d = decompose(w, cfg, rank, iters=1, fisher=(rows, cols), solver=EXACT)
    assert torch.equal(d.q.dequantize(), quantize(w, cfg).dequantize())
    assert d.error == pytest.approx(optimum, rel=1e-4)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = dr[:, None] * (d.a.double() @ d.b.double().T) * dc[None, :]
    assert float((got - best).norm() / best.norm()) < 1e-4

    # The randomized solver cannot beat the optimum; one cold-started step (no warm start yet) comes close.
    rand = decompose(w, cfg, rank, iters=1, fisher=(rows, cols), solver=RANDOMIZED)
    assert optimum * (1 - 1e-5) <= rand.error <= optimum * 1.03


# ---- the randomized solver against exact SVD --------------------------------------------------------------
@pytest.mark.parametrize("name", [SQUARE, TALL, WIDE])
def test_randomized_solver_within_one_percent_of_exact(minilm_weights, name):
    w = minilm_weights[name]
    ratios = {}
    for bits in (2, 3, 4):
        for rank in (16, 32, 64):
            exact = decompose(w, nf(bits), rank, iters=5, solver=EXACT).error
            rand = decompose(w, nf(bits), rank, iters=5, solver=RANDOMIZED).error
            ratios[bits, rank] = rand / exact
    assert all(0.99 <= r <= 1.01 for r in ratios.values()), ratios


def test_randomized_solver_is_seeded(square):
    d1 = decompose(square, nf(3), 16, iters=3)
    d2 = decompose(square, nf(3), 16, iters=3)
    assert d1.errors == d2.errors and torch.equal(d1.a, d2.a) and torch.equal(d1.b, d2.b)


# ---- no adapter -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,iters", [(0, 5), (16, 0), (0, 0)])
def test_no_adapter_is_plain_quantization(square, rank, iters):
    cfg = nf(4)
    q = quantize(square, cfg)
    plain = float((square - q.dequantize()).double().pow(2).sum())
    d = decompose(square, cfg, rank, iters=iters)
    assert d.a.shape == (384, rank) and d.b.shape == (384, rank)
    assert torch.count_nonzero(d.a) == 0 and torch.count_nonzero(d.b) == 0
    assert d.error == plain and d.errors == [plain] and d.best_iter == 0
    assert all(torch.equal(v, q.tensors()[k]) for k, v in d.q.tensors().items())

    rows, cols = lognormal_weights(384, 384)
    dw = decompose(square, cfg, rank, iters=iters, fisher=(rows, cols))
    assert dw.error == pytest.approx(sq_error(square, q, d.a, d.b, rows.sqrt(), cols.sqrt()), rel=1e-6)


def test_full_rank_adapter_removes_the_residual():
    w = torch.randn(20, 30)
    d = decompose(w, nf(2, 16), 20, iters=1, solver=EXACT)
    assert d.error < 1e-9 * float(w.double().pow(2).sum())


# ---- invalid input ----------------------------------------------------------------------------------------
def test_invalid_inputs_raise_clear_value_errors():
    w = torch.randn(10, 20)
    with pytest.raises(ValueError, match=r"bits=5 is not supported; use one of"):
        QuantConfig("nf", 5, 64)
    with pytest.raises(ValueError, match=r"blocksize=0 is not supported; use one of"):
        QuantConfig("nf", 4, 0)
    with pytest.raises(ValueError, match=r"rank=11 is invalid for a 10x20 matrix; use 0 <= rank <= 10"):
        decompose(w, nf(4), 11)
    with pytest.raises(ValueError, match=r"rank=-1 is invalid"):
        decompose(w, nf(4), -1)
    with pytest.raises(ValueError, match=r"iters=-1 is invalid; use an integer >= 0"):
        decompose(w, nf(4), 4, iters=-1)
    for bad in (torch.randn(200), torch.randn(2, 10, 20)):
        with pytest.raises(ValueError, match=r"needs a 2-D weight matrix \(out, in\), got a \d-D tensor"):
            decompose(bad, nf(4), 4)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = w.clone()
        bad[2, 3] = value
        with pytest.raises(ValueError, match="NaN or Inf values; fix or drop the matrix"):
            decompose(bad, nf(4), 4)
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        decompose(w, {"bits": 4}, 4)


def test_invalid_fisher_weights_raise():
    w = torch.randn(10, 20)
    rows, cols = torch.rand(10) + 0.1, torch.rand(20) + 0.1
    shape_msg = r"the matrix needs \(10,\) and \(20,\)"
    for fisher in ((cols, rows), (rows[:9], cols), (rows, cols[:, None]), (torch.rand(10, 20), cols)):
        with pytest.raises(ValueError, match=shape_msg):
            decompose(w, nf(4), 4, fisher=fisher)
    for fisher in ((rows,), (rows, cols, cols), rows):
        with pytest.raises(ValueError, match=r"\(row_weights, col_weights\) pair"):
            decompose(w, nf(4), 4, fisher=fisher)
    with pytest.raises(ValueError, match="pair of 1-D tensors, got \\(list, list\\); convert with torch.as_tensor"):
        decompose(w, nf(4), 4, fisher=(rows.tolist(), cols.tolist()))
    for bad in (-rows, torch.where(rows > 0.5, float("nan"), rows), torch.where(rows > 0.5, float("inf"), rows)):
        with pytest.raises(ValueError, match="finite and non-negative"):
            decompose(w, nf(4), 4, fisher=(bad, cols))
    with pytest.raises(ValueError, match="all zero on one side .* drop fisher for it or calibrate on more data"):
        decompose(w, nf(4), 4, fisher=(torch.zeros(10), cols))
    # Some zero weights are fine: they are floored, and the adapter stays finite.
    d = decompose(w, nf(4), 4, fisher=(torch.where(rows > 0.5, 0.0, rows), cols))
    assert torch.isfinite(d.a).all() and torch.isfinite(d.b).all()
