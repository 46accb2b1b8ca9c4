"""quant.fastgrid: the batched profiler path. Its quantizer must equal the reference bit for bit, its errors must
stay within 1% of exact-SVD LoftQ on real matrices, and a point's numbers must not depend on the other points."""

from __future__ import annotations

import pytest
import torch

from quant import QuantConfig, SolverSettings
from quant.blockwise import quantize_dequantize
from quant.decompose import decompose
from quant.engine import profile_matrix
from quant.fastgrid import _Quantizer, profile_grid

EXACT = SolverSettings(method="exact")
QUERY = "encoder.layer.0.attention.self.query.weight"  # 384 x 384
UP = "encoder.layer.1.intermediate.dense.weight"  # 1536 x 384
DOWN = "encoder.layer.4.output.dense.weight"  # 384 x 1536


def nf(bits, block, dq=True):
    return QuantConfig(kind="nf", bits=bits, blocksize=block, double_quant=dq)


def fisher_for(w, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(w.shape[0], generator=gen) + 0.05, torch.rand(w.shape[1], generator=gen) + 0.05


@pytest.mark.parametrize("config", [
    nf(2, 16), nf(3, 64), nf(4, 64), nf(8, 128), nf(4, 32, dq=False),
    QuantConfig(kind="nf", bits=3, blocksize=64, double_quant=False, scale_dtype="fp16"),
    QuantConfig(kind="int", bits=4, blocksize=64, double_quant=True),
    QuantConfig(kind="int", bits=2, blocksize=32, double_quant=False, asymmetric=True),
])
def test_quantizer_equals_reference_bit_for_bit(minilm_weights, config):
    w = minilm_weights[UP]
    odd = w[:37, :29]  # 1073 values: the last block is padded
    for x in (w, odd, torch.zeros(8, 16)):
        assert torch.equal(_Quantizer(config, x.device)(x), quantize_dequantize(x, config))


@pytest.mark.parametrize("name", [QUERY, UP, DOWN])
def test_errors_within_one_percent_of_exact_loftq(minilm_weights, name):
    w = minilm_weights[name]
    configs = ((2, 64), (3, 32), (4, 64), (8, 128)) if name == QUERY else ((2, 64), (8, 128))
    points = [(nf(b, blk), r) for b, blk in configs for r in (16, 64)]
    got = profile_grid(w, points, iters=5)
    for (config, rank), r in zip(points, got):
        exact = decompose(w, config, rank, 5, solver=EXACT)
        ratio = r.error / exact.error
        assert 0.97 < ratio <= 1.01, f"{config.label} r{rank}: {ratio:.4f} x exact LoftQ"
        assert r.error_unweighted == r.error and 1 <= r.best_iter <= 5


def test_weighted_errors_within_one_percent_of_exact(minilm_weights):
    w = minilm_weights[QUERY]
    fisher = fisher_for(w)
    points = [(nf(2, 64), 16), (nf(4, 64), 64)]
    for (config, rank), r in zip(points, profile_grid(w, points, 5, fisher)):
        exact = decompose(w, config, rank, 5, fisher=fisher, solver=EXACT)
        assert 0.97 < r.error / exact.error <= 1.01
        # The unweighted error of the weighted optimum: same iterate, so close to the exact solver's.
        ex_unw = float((w - exact.q.dequantize() - exact.a @ exact.b.T).double().pow(2).sum())
        assert r.error_unweighted == pytest.approx(ex_unw, rel=0.03)


@pytest.mark.parametrize("weighted", [False, True])
def test_full_width_basis_reproduces_exact_decomposition(weighted):
    # rank + oversample >= min(m, n): the subspace is everything, so the randomized path is the exact SVD and every
    # field must match quant.decompose/profile_matrix with the exact solver.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=gen) * torch.linspace(0.2, 3, 80)
    fisher = fisher_for(w) if weighted else None
    points = [(nf(2, 16), 4), (nf(3, 64, dq=False), 8), (nf(4, 32), 0), (nf(2, 16), 12)]
    got = profile_grid(w, points, 4, fisher, SolverSettings(oversample=48))
    want = profile_matrix(w, points, 4, fisher, EXACT)
    for g, e in zip(got, want):
        assert g.error == pytest.approx(e.error, rel=1e-5)
        assert g.error_unweighted == pytest.approx(e.error_unweighted, rel=1e-5)
        assert g.quant_error == pytest.approx(e.quant_error, rel=1e-6)
        assert (g.best_iter, g.regressed) == (e.best_iter, e.regressed)


def test_subset_batch_split_and_order_give_identical_numbers(minilm_weights):
    w = minilm_weights[DOWN]
    points = [(nf(b, blk), r) for b in (2, 4) for blk in (16, 64) for r in (8, 32)]
    full = profile_grid(w, points, 3)
    subset = profile_grid(w, points[5:1:-2], 3)
    assert [(s.error, s.error_unweighted, s.quant_error, s.best_iter) for s in subset] == \
        [(f.error, f.error_unweighted, f.quant_error, f.best_iter) for f in full[5:1:-2]]
    one_by_one = profile_grid(w, points, 3, batch_bytes=1)  # every chain in its own batch
    assert [r.error for r in one_by_one] == [r.error for r in full]
    again = profile_grid(w, list(reversed(points)), 3)
    assert [r.error for r in reversed(again)] == [r.error for r in full]


def test_plain_points_and_quant_error(minilm_weights):
    w = minilm_weights[QUERY]
    cfg = nf(3, 32)
    plain = float((w - quantize_dequantize(w, cfg)).double().pow(2).sum())
    r0, r16, dup, t0 = profile_grid(w, [(cfg, 0), (cfg, 16), (nf(3, 32), 16)], 2) + profile_grid(w, [(cfg, 16)], 0)
    assert dup == r16
    assert r0.error == pytest.approx(plain, rel=1e-6) and r0.best_iter == 0 and not r0.regressed
    assert r16.quant_error == pytest.approx(plain, rel=1e-6) and r16.error < plain
    assert t0.error == pytest.approx(plain, rel=1e-6) and t0.best_iter == 0


def test_engine_routes_randomized_solver_to_fastgrid(minilm_weights):
    w = minilm_weights[QUERY]
    points = [(nf(4, 64), 16), (nf(2, 64), 16)]
    assert [r.error for r in profile_matrix(w, points, 2)] == [r.error for r in profile_grid(w, points, 2)]


def test_rejects_bad_input(minilm_weights):
    w = minilm_weights[QUERY]
    with pytest.raises(ValueError, match="exact solver"):
        profile_grid(w, [(nf(4, 64), 8)], 1, solver=EXACT)
    with pytest.raises(ValueError, match="rank=999"):
        profile_grid(w, [(nf(4, 64), 999)], 1)
    with pytest.raises(ValueError, match="iters"):
        profile_grid(w, [(nf(4, 64), 8)], -1)
    with pytest.raises(ValueError, match="NaN"):
        profile_grid(torch.full((4, 4), float("nan")), [(nf(4, 16), 1)], 1)


@pytest.mark.gpu
def test_cuda_matches_cpu(minilm_weights):
    w = minilm_weights[UP]
    points = [(nf(b, 64), r) for b in (2, 4) for r in (16, 64)]
    cpu = profile_grid(w, points, 5)
    gpu = profile_grid(w.cuda(), points, 5)
    for c, g in zip(cpu, gpu):
        # CPU and CUDA generators draw different sketches, so the two runs are two samples of the randomized
        # solver: each is within 1% of exact LoftQ (the contract), hence within ~2% of each other, not bit-equal.
        assert g.error == pytest.approx(c.error, rel=2e-2)
        assert g.quant_error == pytest.approx(c.quant_error, rel=1e-5)


def test_solver_key_marks_full_fp32_products_and_reads_back():
    from planner.train.apply import solver_from_key

    assert SolverSettings().key == "rand-o32-p3-s0"  # TF32 is the default: existing caches keep their key
    fp32 = SolverSettings(tf32=False)
    assert fp32.key == "rand-o32-p3-s0-fp32"
    assert solver_from_key(fp32.key) == fp32 and solver_from_key(SolverSettings().key) == SolverSettings()


def test_matmul_precision_sets_and_restores_the_tf32_switch():
    from quant.lowrank import matmul_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with matmul_precision(SolverSettings()):
        assert matmul.fp32_precision == "tf32"
    with matmul_precision(SolverSettings(tf32=False)):
        assert matmul.fp32_precision == "ieee"
    with matmul_precision(SolverSettings(method="exact")):
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before
    matmul.fp32_precision = "ieee"  # a caller that set the newer switch itself (the legacy read would raise)
    try:
        with matmul_precision(SolverSettings()):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


def test_profile_workers_give_the_single_worker_table(tmp_path):
    """Several matrices decomposed at once (the GPU default) write the same cache and table as one at a time;
    on CPU the threads' reductions may round differently, hence the tight tolerance instead of equality."""
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model
    from planner.profile.grid import make_grid
    from planner.profile.run import run_profile
    from planner.profile.settings import ProfileSettings

    source = resolve_model(None)
    matrices = discover_matrices(source)[:6]
    settings = ProfileSettings(make_grid("2,4", "64", "4"), 1, SolverSettings())
    one, s1 = run_profile(source, matrices, settings, cache_dir=tmp_path / "a", device="cpu", progress=False,
                          workers=1)
    many, s2 = run_profile(source, matrices, settings, cache_dir=tmp_path / "b", device="cpu", progress=False,
                           workers=3)
    assert s1.computed_points == s2.computed_points == len(one) == 12
    assert sorted(s2.computed_matrices) == sorted(m.name for m in matrices)
    assert one.drop(columns=["error", "error_unweighted", "quant_error"]).equals(
        many.drop(columns=["error", "error_unweighted", "quant_error"]))
    for col in ("error", "error_unweighted", "quant_error"):
        assert torch.allclose(torch.tensor(one[col].values), torch.tensor(many[col].values), rtol=1e-6, atol=0)
