"""The profiler's fast path: the LoftQ / LQ-LoRA error of one matrix for many (config, rank) points at once.

Same contract as quant.engine.profile_matrix (PointResult per point, in the order asked), same algorithm as
quant.decompose with the randomized solver (the same quant.loftq.alternate loop, with batched steps), re-arranged
for throughput on a GPU:

- chains of equal rank (hence equal basis width) run as one batch: every matrix product, orthonormalisation and
  small eigenproblem is one batched call over all configurations, so a 13B-sized matrix costs a few dozen
  kernel launches per LoftQ step for the whole grid instead of per point;
- orthonormalisation is Cholesky-QR with the Gram matrix in float64 (two passes), and the rank-r truncation is a
  Rayleigh-Ritz step on the l x l Gram of Tᵀ·Y: matrix products only, no tall-skinny Householder QR and no
  SVD of an l x n matrix (those dominate torch.svd_lowrank on a GPU);
- a step after the first starts from the previous step's right singular vectors (warm start) and by default
  spends one power iteration, not `power_iters`: the start basis is already close;
- quantize-dequantize skips packing and integer widening (int32 codes, one gather);
- errors stay on the device until the batch ends (one host sync per batch, not per step).

Output-aware weighting (quant.weighting: ‖D_r·E·L‖²) runs the same loop with the weighted residual D_r·(W − Q)·L
formed by one (m, n) x (n, n) product per chain and step, and a fourth (m, n) buffer per chain for the plain
residual; the adapter is mapped back through L⁻ᵀ by a triangular solve.

A point's numbers depend only on (w, config, rank, iters, fisher, settings): the Gaussian start comes from the
solver's seed for that rank's width, never from the batch, so a subset of the grid reproduces the full grid's
numbers (bit for bit on CPU; on CUDA up to the float rounding cuBLAS picks for a different batch size).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from . import triton_residual
from .blockwise import cast_to, double_quantize, quantize_dequantize
from .codebooks import codebook, midpoints
from .config import QuantConfig
from .loftq import LORA_NOISE, alternate, check_matrix, pick_best
from .lowrank import SolverSettings
from .results import PointResult
from .weighting import Metric, check_weighting

# Default cap on the batch's residual stack (chains x m x n fp32), the dominant memory of a batch.
CPU_BATCH_BYTES = 256 << 20
CUDA_BATCH_FRACTION = 0.25  # of the free device memory
# All concurrent calls together (planner.profile's worker threads): three at a quarter each ran the 13B-shaped grid
# on an H200; more workers share the same three quarters.
CUDA_WORKERS_FRACTION = 0.75
# A basis this wide a fraction of min(m, n) costs about what the full width costs, and subspace iteration converges
# slowly there (on MiniLM NF8 rank 64 of 384, 1.02x exact LoftQ even with 6 power iterations): take the full width,
# which makes the step an exact SVD.
FULL_WIDTH_FRACTION = 0.25


class _Quantizer:
    """q(x) for one config, equal to blockwise.quantize_dequantize(x, config) bit for bit."""

    def __init__(self, config: QuantConfig, device):
        self.config = config
        self.fallback = config.asymmetric  # min/max zero-point path: rare in grids, keep the reference code
        table = codebook(config.kind, config.bits, config.asymmetric, device=device)
        self.table, self.mids = table, midpoints(table)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x's flat order as (blocks, blocksize), zero-padded to whole blocks as the reference pads."""
        numel, bs = x.numel(), self.config.blocksize
        if numel % bs:
            flat = torch.zeros(self.config.num_blocks(numel) * bs, device=x.device, dtype=torch.float32)
            flat[:numel] = x.reshape(-1)
            return flat.view(-1, bs)
        return x.reshape(-1, bs)

    def scales(self, blocks: torch.Tensor) -> torch.Tensor:
        """One fp32 scale per block: the absmax, double-quantized or cast to the scale dtype as stored."""
        absmax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1)
        if self.config.double_quant:
            return double_quantize(absmax, self.config)[3]
        return cast_to(absmax, self.config.scale_dtype).float()

    def residual_into(self, out: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out = w − q(x), bit for bit; in one fused pass (quant.triton_residual) where Triton runs."""
        if (self.fallback or not triton_residual.supports(self.config.bits) or not triton_residual.available(x.device)
                or not (x.is_contiguous() and w.is_contiguous() and out.is_contiguous())):
            return torch.sub(w, self(x), out=out)
        return triton_residual.residual_into(out, w, x, self.scales(self.blocks(x)), self.mids, self.table,
                                             self.config.blocksize, self.config.bits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback:
            return quantize_dequantize(x, self.config)
        blocks = self.blocks(x)
        scale = self.scales(blocks)
        # A zero scale dequantizes every code to 0, so dividing by 1 there gives the reference's values.
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.bucketize(blocks / safe[:, None], self.mids, out_int32=True)
        values = self.table[codes] * scale[:, None]
        return values.reshape(-1)[:x.numel()].view(x.shape)


def prepare_device(device: torch.device, configs) -> None:
    """Do once, before several threads profile on `device`, what torch and Triton do lazily on first use and not
    thread-safely: load CUDA's linear-algebra libraries ("lazy wrapper should be called at most once" otherwise)
    and compile the residual kernel for every code width of `configs`."""
    if torch.device(device).type != "cuda":
        return
    eye = torch.eye(2, device=device, dtype=torch.float64)
    torch.linalg.eigh(eye)
    torch.linalg.solve_triangular(torch.linalg.cholesky_ex(eye)[0], eye, upper=False)
    for config in {c for c in configs if isinstance(c, QuantConfig)}:
        quant = _Quantizer(config, device)
        x = torch.ones(2, config.blocksize, device=device)
        quant.residual_into(torch.empty_like(x), x, x)


def batch_budget(device: torch.device, workers: int = 1) -> int | None:
    """The batch memory each of `workers` concurrent profile_grid calls may use, fixed before the threads start so
    that a batch's size does not depend on what the other threads hold at the moment: CUDA_BATCH_FRACTION of the
    free CUDA memory now, as one call alone takes, while `workers` of them stay within CUDA_WORKERS_FRACTION (None on
    CPU: the fixed CPU_BATCH_BYTES)."""
    if torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * min(CUDA_BATCH_FRACTION, CUDA_WORKERS_FRACTION / max(1, workers)))


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning y (batch, rows, l): Cholesky-QR twice, Gram matrix in float64.

    The tiny shift keeps Cholesky defined when y is rank-deficient (its null directions come out ~0, not junk)."""
    y64 = y.double()
    eye = torch.eye(y.shape[-1], dtype=torch.float64, device=y.device)
    for _ in range(2):
        gram = y64.transpose(-1, -2) @ y64
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        shift = (trace * 1e-13 + 1e-200)[..., None, None]
        chol, _ = torch.linalg.cholesky_ex(gram + shift * eye)
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        y64 = y64 @ inv.transpose(-1, -2)
    return y64.float()


def _rayleigh_ritz(t: torch.Tensor, y: torch.Tensor, rank: int):
    """Given orthonormal y (batch, m, l) ≈ the top left singular subspace of t (batch, m, n): A (m x r),
    B (n x r) with A·Bᵀ = the rank-r truncation of y·yᵀ·t, and the next warm start (n x l, orthonormal)."""
    z = t.transpose(-1, -2) @ y  # (batch, n, l) = (yᵀ t)ᵀ
    z64 = z.double()
    lam, vec = torch.linalg.eigh(z64.transpose(-1, -2) @ z64)  # ascending σ², left singular vectors of yᵀt
    lam, vec = lam.flip(-1).clamp_min(0), vec.flip(-1)
    tiny = lam[..., :1] * 1e-30 + 1e-300
    sigma = lam.sqrt()
    inv_sigma = torch.where(lam > tiny, 1 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    v = (z64 @ vec) * inv_sigma[..., None, :]  # right singular vectors (zero where σ = 0)
    root = sigma[..., :rank].sqrt()[..., None, :]
    a = ((y.double() @ vec[..., :rank]) * root).float()
    b = (v[..., :rank] * root).float()
    return a, b, v.float()


def _subspace(t: torch.Tensor, start: torch.Tensor, power_iters: int) -> torch.Tensor:
    y = _orthonormalize(t @ start)
    for _ in range(power_iters):
        z = _orthonormalize(t.transpose(-1, -2) @ y)
        y = _orthonormalize(t @ z)
    return y


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm per batch entry: fp32 norms of rows (short sums, ~1e-8 relative), added in float64
    (a float64 upcast of the whole tensor costs ~15x more)."""
    return torch.linalg.vector_norm(x, dim=-1).double().square().sum(-1)


def _batch_cap(m: int, n: int, device: torch.device, batch_bytes: int | None, output: bool = False) -> int:
    if batch_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            batch_bytes = int(free * CUDA_BATCH_FRACTION)
        else:
            batch_bytes = CPU_BATCH_BYTES
    # Per chain: its residual, the error temporary and a quantizer's temporaries, each m x n fp32 (output-aware: and
    # the plain residual beside the weighted one).
    return max(1, batch_bytes // ((4 if output else 3) * 4 * m * n))


def profile_grid(w: torch.Tensor, points: list[tuple[QuantConfig, int]], iters: int, fisher=None,
                 solver: SolverSettings | None = None, warm_power_iters: int | None = None,
                 batch_bytes: int | None = None) -> list:
    """PointResults (quant.engine's contract) for every (config, rank) point of `w`, in the order of `points`.

    `solver` must be randomized: its seed, oversampling and power iterations (first step) are used.
    warm_power_iters: power iterations in steps 2..iters (default min(1, solver.power_iters)).
    batch_bytes: memory for one batch of chains (default: a quarter of free CUDA memory, 256 MiB on CPU)."""
    check_matrix(w)
    weights = check_weighting(fisher, tuple(w.shape))
    solver = solver or SolverSettings()
    if solver.method != "randomized":
        raise ValueError(f"profile_grid runs the randomized solver, got method={solver.method!r}; "
                         "use quant.engine.profile_matrix for the exact solver")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters={iters} is invalid; use an integer >= 0")
    warm_p = min(1, solver.power_iters) if warm_power_iters is None else int(warm_power_iters)
    if warm_p < 0:
        raise ValueError("warm_power_iters must be >= 0")
    m, n = w.shape
    for config, rank in points:
        if not isinstance(config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
        if not isinstance(rank, int) or rank < 0 or rank > min(m, n):
            raise ValueError(f"rank={rank} is invalid for a {m}x{n} matrix; use 0 <= rank <= {min(m, n)}")

    w = w.float()
    device = w.device
    metric = Metric.of(weights, device)

    quantizers: dict[QuantConfig, _Quantizer] = {}
    for config, _ in points:
        if config not in quantizers:
            quantizers[config] = _Quantizer(config, device)

    results: dict[tuple[QuantConfig, int], object] = {}
    plain: dict[QuantConfig, tuple[float, float]] = {}  # config -> (weighted, unweighted) error of q(W)

    def plain_errors(config):
        if config not in plain:
            t0 = time.perf_counter()
            r = w - quantizers[config](w)
            err = _sq_norms(metric.weigh(r)[None])
            unw = err if metric.plain else _sq_norms(r[None])
            plain[config] = (float(err[0]), float(unw[0]), time.perf_counter() - t0)
        return plain[config]

    unique = list(OrderedDict.fromkeys((c, r) for c, r in points))
    by_rank: dict[int, list[QuantConfig]] = OrderedDict()
    for config, rank in unique:
        if rank == 0 or iters == 0:
            err, unw, secs = plain_errors(config)
            results[(config, rank)] = PointResult(err, unw, err, 0, False, secs)
        else:
            by_rank.setdefault(rank, []).append(config)

    cap = _batch_cap(m, n, device, batch_bytes, metric.output)
    for rank, configs in by_rank.items():
        width = min(rank + solver.oversample, m, n)
        cold_p, warm = solver.power_iters, warm_p
        if width >= FULL_WIDTH_FRACTION * min(m, n):
            width, cold_p, warm = min(m, n), 0, 0
        # Seeded exactly as quant.decompose does, so step 1 starts from the same Gaussian matrix.
        gen = torch.Generator(device=device).manual_seed(solver.seed)
        omega = torch.randn(n, width, device=device, dtype=torch.float32, generator=gen)
        for lo in range(0, len(configs), cap):
            batch = configs[lo:lo + cap]
            t0 = time.perf_counter()
            run = _run_output_chains if metric.output else _run_chains
            errs, unws, quant_err = run(w, [quantizers[c] for c in batch], rank, iters, omega, cold_p, warm, metric)
            errs, unws, quant_err = errs.cpu().tolist(), unws.cpu().tolist(), quant_err.cpu().tolist()
            secs = (time.perf_counter() - t0) / len(batch)
            for i, config in enumerate(batch):
                best, regressed = pick_best(errs[i], LORA_NOISE)
                results[(config, rank)] = PointResult(errs[i][best], unws[i][best], quant_err[i], best + 1, regressed,
                                                      secs)
    return [results[(c, r)] for c, r in points]


def _run_chains(w, quantizers, rank, iters, omega, cold_p, warm_p, metric: Metric):
    """LoftQ chains of one rank, one per quantizer, batched through quant.loftq.alternate. Returns per-chain errors
    (k, iters) weighted and unweighted (float64, on the device) and the weighted error of q(W) (k,)."""
    dr, dc = metric.dr, metric.dc
    k = len(quantizers)
    m, n = w.shape
    t = torch.empty(k, m, n, device=w.device, dtype=torch.float32)
    start = quant_err = None

    def quantize_step(low):
        nonlocal quant_err
        for i, quant in enumerate(quantizers):
            target = w if low is None else torch.addmm(w, low[2][i], low[3][i].T, alpha=-1)
            quant.residual_into(t[i], w, target)
            if dr is not None:
                t[i] *= dr[:, None]
                t[i] *= dc[None, :]
        if quant_err is None:
            quant_err = _sq_norms(t)  # step 1 quantizes W itself: this is q(W)'s error
        return None, t  # no iterate is kept: the profiler needs the numbers only

    def lowrank_step(t):
        # (weighted factors, unweighted factors): the weighted ones measure the error, the others feed the next step.
        nonlocal start
        y = _subspace(t, omega if start is None else start, cold_p if start is None else warm_p)
        a_w, b_w, start = _rayleigh_ritz(t, y, rank)
        if dr is None:
            return a_w, b_w, a_w, b_w
        return a_w, b_w, a_w / dr[:, None], b_w / dc[:, None]

    def measure(t, low):
        a_w, b_w, a, b = low
        err = _sq_norms(torch.baddbmm(t, a_w, b_w.transpose(-1, -2), alpha=-1))
        if dr is None:
            return err, err
        # Undo the weighting of t in place: t becomes the plain residual W − Q for the unweighted error.
        t /= dr[:, None]
        t /= dc[None, :]
        return err, _sq_norms(torch.baddbmm(t, a, b.transpose(-1, -2), alpha=-1))

    trace = alternate(iters, quantize_step, lowrank_step, measure, regress_noise=LORA_NOISE, keep_best=False)
    errs, unws = zip(*trace.errors)
    return torch.stack(errs, 1), torch.stack(unws, 1), quant_err


def _run_output_chains(w, quantizers, rank, iters, omega, cold_p, warm_p, metric: Metric):
    """_run_chains under the output-aware metric ‖D_r·E·L‖²: the plain residuals p (k, m, n) are kept beside the
    weighted ones t = D_r·p·L, the rank-r fit is made on t and mapped back through D_r⁻¹ and L⁻ᵀ for the next step's
    target and the unweighted error."""
    k = len(quantizers)
    m, n = w.shape
    p = torch.empty(k, m, n, device=w.device, dtype=torch.float32)
    t = torch.empty_like(p)
    start = quant_err = None

    def quantize_step(low):
        nonlocal quant_err
        for i, quant in enumerate(quantizers):
            target = w if low is None else torch.addmm(w, low[2][i], low[3][i].T, alpha=-1)
            quant.residual_into(p[i], w, target)
        torch.matmul(p, metric.chol, out=t)
        if metric.dr is not None:
            t.mul_(metric.dr[:, None])
        if quant_err is None:
            quant_err = _sq_norms(t)
        return None, t

    def lowrank_step(t):
        nonlocal start
        y = _subspace(t, omega if start is None else start, cold_p if start is None else warm_p)
        a_w, b_w, start = _rayleigh_ritz(t, y, rank)
        return (a_w, b_w, *metric.unmap(a_w, b_w))

    def measure(t, low):
        a_w, b_w, a, b = low
        err = _sq_norms(torch.baddbmm(t, a_w, b_w.transpose(-1, -2), alpha=-1))
        return err, _sq_norms(torch.baddbmm(p, a, b.transpose(-1, -2), alpha=-1))

    trace = alternate(iters, quantize_step, lowrank_step, measure, regress_noise=LORA_NOISE, keep_best=False)
    errs, unws = zip(*trace.errors)
    return torch.stack(errs, 1), torch.stack(unws, 1), quant_err
