"""QA-LoRA: group-wise asymmetric INT-k quantization with a group-pooled adapter that merges into the zero-points.

Layout. W is (out, in) and g = config.blocksize. quantize() flattens W row-major into blocks of g values; when
in % g == 0 (required here, ValueError otherwise) block i·(in/g) + j is exactly group j of row i: input columns
j·g .. j·g+g−1. So the per-block scales α and zero-points β, viewed as (out, in/g), are per (row, group); the
dequantized weight is W_q[i, c] = t[code]·α_ij + β_ij with t the [0, 1] INT-k table and j = c // g.

Adapter. pool(x) averages x over each group of g input columns: pool(x) = x·Eᵀ/g with E the (in/g × in) 0/1
expansion (E[j, c] = 1 iff c // g = j). The layer computes
    y = x·W_qᵀ + bias + scaling · lora_B(lora_A(pool(x))),   lora_A: (r × in/g), lora_B: (out × r),
so the adapter acts as the full-size weight L = scaling · lora_B·lora_A·E / g, whose columns are constant within
each group. merge() folds the constant c_ij = scaling·(lora_B·lora_A)[i, j]/g into β_ij: codes and scales are
untouched and the merged layer is again pure INT-k.

Initialisation (LoftQ constrained to this structure). Minimising ‖R − M·E‖_F over M (out × in/g): since
E·Eᵀ = g·I, M* = R·Eᵀ(E·Eᵀ)⁻¹ = R̄, the group means of R, and R − R̄·E is orthogonal to every group-constant
matrix ((R − R̄E)·Eᵀ = 0). Hence for any M
    ‖R − M·E‖² = ‖R − R̄·E‖² + ‖(R̄ − M)·E‖² = ‖R − R̄·E‖² + g·‖R̄ − M‖²,
and under rank(M) ≤ r the minimiser is the rank-r truncated SVD of √g·R̄ = R·Eᵀ/√g (Eckart–Young; E/√g has
orthonormal rows), divided by √g — with equal groups the √g is one scalar, so it is the truncated SVD of R̄, and
the error is ‖R − R̄E‖² + g·Σ_{k>r} σ_k(R̄)². rank(M) ≤ min(out, in/g), which bounds the useful rank.

Fisher weighting (LQ-LoRA's F_ij ≈ r_i·c_j). Minimising ‖D_r(R − M·E)D_c‖² over group-constant M: per row and
group, Σ_{c∈j} c_c (R_ic − M_ij)² = Σ_{c∈j} c_c (R_ic − R̃_ij)² + C_j (R̃_ij − M_ij)² with C_j = Σ_{c∈j} c_c and R̃
the c-weighted group means, so the error is a constant plus ‖D_r(R̃ − M)D_C‖², D_C = diag(√C_j): the rank-r step
stays exact, the truncated SVD of D_r·R̃·D_C. With c ≡ 1 (C_j = g) it is the unweighted step above.

Fact worth knowing: min/max asymmetric quantization is shift-equivariant per group (q(w − c) = q(w) − c up to
rounding of the stored zero-point), so the alternating loop gains everything in its first step: step 1 adds to each
zero-point the best rank-r group-mean correction of the quantization residual; every later step leaves Q + L and the
error unchanged while L grows by that same correction and the zero-points drift the other way (measured on MiniLM:
‖L‖ = 0.51, 1.03, 1.54, … at equal error). The best iterate is returned, ties going to the earliest (smallest L).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blockwise import QuantizedTensor, quantize
from .config import ADAPTER_BITS, QuantConfig
from .layers import QuantLoRALinear
from .loftq import (
    alternate,
    check_matrix,
    plain_error,
    plain_quantization,
    prepare,
    requantize,
)
from .lowrank import SolverSettings, balance_factors, exact_lowrank, randomized_lowrank
from .results import QALoRADecomposition
from .weighting import Metric, check_weighting

# Relative slack for comparing iterates, 100x LoRA's (quant.loftq.LORA_NOISE) and used for ties too: steps after the
# first re-quantize shifted groups, which changes the error only by fp32 rounding of zero-points and codes flipping
# at ties (measured up to ~1e-5 on MiniLM at 8 bits). Kept as it is: the kept iterate, hence profiled numbers, hang on it.
QALORA_NOISE = 1e-4


# ---- validation ---------------------------------------------------------------------------------------------
def check_qalora_config(config: QuantConfig) -> None:
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.kind != "int" or not config.asymmetric or config.double_quant:
        raise ValueError(f"QA-LoRA needs an asymmetric INT quantizer without double quantization, got {config.label}; "
                         "use QuantConfig(kind='int', asymmetric=True, double_quant=False, bits=k, blocksize=g)")


def check_group_shape(shape, group_size: int) -> tuple[int, int]:
    """(out, in) of a QA-LoRA matrix; in must be a multiple of g so that quantization blocks are (row, group)s."""
    if len(shape) != 2:
        raise ValueError(f"QA-LoRA needs a 2-D weight (out, in), got shape {tuple(shape)}")
    m, n = int(shape[0]), int(shape[1])
    if n % group_size:
        raise ValueError(f"QA-LoRA needs in_features ({n}) to be a multiple of the group size g={group_size} so that "
                         f"every quantization block is one (row, group); choose a blocksize that divides {n}")
    return m, n


def max_rank(shape, group_size: int) -> int:
    """The largest useful rank: the pooled adapter product lora_B·lora_A is (out × in/g)."""
    m, n = check_group_shape(shape, group_size)
    return min(m, n // group_size)


def check_rank(rank, shape, group_size: int) -> None:
    limit = max_rank(shape, group_size)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or rank > limit:
        raise ValueError(f"rank={rank!r} is invalid for QA-LoRA on a {shape[0]}x{shape[1]} matrix with groups of "
                         f"{group_size}: the pooled adapter has rank <= min(out, in/g) = {limit}; use 0 <= rank <= "
                         f"{limit} or a smaller group size")


# ---- cost ---------------------------------------------------------------------------------------------------
def qalora_matrix_bits(config: QuantConfig, shape: tuple[int, int], rank: int) -> int:
    """Plan cost of one (out, in) matrix in bits: exact INT-k storage (codes, per-(row, group) scale and zero-point)
    plus 16-bit adapters lora_A (r × in/g) and lora_B (out × r) — the pooled lora_A is g times narrower than LoRA's."""
    check_qalora_config(config)
    m, n = check_group_shape(shape, config.blocksize)
    check_rank(rank, (m, n), config.blocksize)
    return 8 * config.storage_bytes(m * n) + ADAPTER_BITS * rank * (m + n // config.blocksize)


# ---- the group-constant low-rank step -----------------------------------------------------------------------
def group_means(r: torch.Tensor, group_size: int) -> torch.Tensor:
    """R̄ = R·Eᵀ/g: the (out × in/g) means of R over each group of g consecutive columns."""
    m, n = r.shape
    return r.reshape(m, n // group_size, group_size).mean(dim=2)


def expand_groups(m_small: torch.Tensor, group_size: int) -> torch.Tensor:
    """M·E: repeat every column of M g times (the full-size group-constant matrix)."""
    return m_small.repeat_interleave(group_size, dim=1)


def group_constant_lowrank(r: torch.Tensor, group_size: int, rank: int, solver: SolverSettings | None = None,
                           start: torch.Tensor | None = None, generator: torch.Generator | None = None,
                           dr: torch.Tensor | None = None, dc: torch.Tensor | None = None):
    """Best rank-r L = lora_B·lora_A·E/g (columns constant per group) approximating R in Frobenius norm, or in the
    Fisher-weighted norm ‖D_r(R − L)D_c‖ when the square-rooted row/column weights dr (out,), dc (in,) are given.

    Returns lora_B (out × r), lora_A (r × in/g) — balanced factors of g·M with M the optimal rank-r (out × in/g)
    matrix — and the right singular vectors for warm-starting the randomized solver."""
    solver = solver or SolverSettings(method="exact")
    m, n = r.shape
    groups = n // group_size
    if dr is None:
        # SVD of √g·R̄ (R·Eᵀ(EEᵀ)^(-1/2), the general form); with equal groups √g is a scalar and only rescales Σ.
        target = group_means(r, group_size) * math.sqrt(group_size)
        root_c = None
    else:
        cw = (dc * dc).view(groups, group_size)
        c_sum = cw.sum(dim=1)
        weighted_means = (r.view(m, groups, group_size) * cw).sum(dim=2) / c_sum
        root_c = c_sum.sqrt()
        target = dr[:, None] * weighted_means * root_c[None, :]
    if solver.method == "exact":
        a, b = exact_lowrank(target, rank)
    else:
        a, b, start = randomized_lowrank(target, rank, solver, start, generator)
    if dr is not None:
        # Undo the weights: M = D_r⁻¹·a·bᵀ·D_C⁻¹; rescaled so that c ≡ 1 gives the unweighted factors exactly.
        a = a / dr[:, None]
        b = b * (math.sqrt(group_size) / root_c)[:, None]
        a, b = balance_factors(a, b)
    # a·bᵀ = √g·M_r and lora_B·lora_A must be g·M_r: scale each factor by g^(1/4).
    root = group_size ** 0.25
    return (a * root).contiguous(), (b.T * root).contiguous(), start


def adapter_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, group_size: int, scaling: float = 1.0) -> torch.Tensor:
    """The full-size (out × in) weight the pooled adapter acts as: scaling·lora_B·lora_A·E/g (inputs' dtype)."""
    return expand_groups(scaling * (lora_b @ lora_a) / group_size, group_size)


# ---- decomposition ------------------------------------------------------------------------------------------
def qalora_decompose(w: torch.Tensor, config: QuantConfig, rank: int, iters: int = 1, *, fisher=None,
                     solver: SolverSettings | None = None) -> QALoRADecomposition:
    """LoftQ-style initialisation for QA-LoRA: Q ← q(W − L), L ← best rank-r group-constant fit of W − Q.

    iters=0 or rank=0: plain quantization with a zero adapter. The adapter is returned unscaled
    (L = lora_B·lora_A·E/g); a layer with scaling s must divide it by s (from_linear does).
    fisher=(row_weights, col_weights): the low-rank step and the reported error are Fisher-weighted
    (‖D_r(W − Q − L)D_c‖²), as quant.decompose does for LoRA."""
    check_matrix(w)
    check_qalora_config(config)
    g = config.blocksize
    m, n = check_group_shape(w.shape, g)
    check_rank(rank, (m, n), g)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters={iters!r} is invalid; use an integer >= 0")
    w, metric, solver = prepare(w, fisher, solver)
    if metric.output:
        raise ValueError("QA-LoRA's group-pooled adapter takes the data-free or diagonal Fisher objective, not the "
                         "output-aware one; plan QA-LoRA points without --objective output")
    dr, dc = metric.dr, metric.dc
    if rank == 0 or iters == 0:
        q, err = plain_quantization(w, config, metric)
        return QALoRADecomposition(q, torch.zeros(rank, n // g, device=w.device),
                                   torch.zeros(m, rank, device=w.device), err, [err], 0, False)

    generator = torch.Generator(device=w.device).manual_seed(solver.seed)
    start = None  # the randomized solver's warm start

    def lowrank_step(residual):
        nonlocal start
        lora_b, lora_a, start = group_constant_lowrank(residual, g, rank, solver, start, generator, dr, dc)
        return lora_a, lora_b, adapter_weight(lora_a, lora_b, g)

    def measure(residual, low):
        return metric.error(residual - low[2])

    # Ties within float noise keep the earlier iterate: later ones only move mass from zero-points to L.
    trace = alternate(iters, requantize(w, config, lambda low: low[2]), lowrank_step, measure,
                      regress_noise=QALORA_NOISE, tie_noise=QALORA_NOISE)
    target_q, (lora_a, lora_b, _) = trace.best
    # Packing once at the end: quantize() is deterministic, so this is the storage of the returned iterate.
    return QALoRADecomposition(quantize(target_q, config), lora_a, lora_b, trace.errors[trace.best_iter - 1],
                               trace.errors, trace.best_iter, trace.regressed)


def useful_steps(iters: int) -> int:
    """The alternating steps worth running for a LoftQ-style `iters`: at most one, since later ones cannot lower
    the error (shift-equivariance, module docstring) and would only cost time. Profiling, apply_plan and the
    planner's weighted error all take their step count from here, so the profiled error is the applied layer's."""
    return min(int(iters), 1)


def qalora_point_errors(w: torch.Tensor, config: QuantConfig, rank: int, iters: int, fisher=None,
                        solver: SolverSettings | None = None) -> dict:
    """The profiler's numbers for one QA-LoRA grid point (quant.engine.profile_matrix dispatches here).

    error: ‖W − Q − L‖² (Fisher-weighted when weights are given; the decomposition is then weighted too), with
    L = lora_B·lora_A·E/g the dense equivalent of the pooled adapter; error_unweighted: the plain squared error
    of the same iterate; quant_error: (weighted) error of q(W) with no adapter. The iterate is useful_steps(iters)
    steps in, the one apply_plan rebuilds."""
    dec = qalora_decompose(w, config, rank, useful_steps(iters), fisher=fisher, solver=solver)
    w = w.float()
    recon = dec.q.dequantize() + adapter_weight(dec.lora_a, dec.lora_b, config.blocksize)
    unweighted = float((w - recon).double().pow(2).sum())
    plain = dec.error if dec.best_iter == 0 else plain_error(w, config, Metric.of(check_weighting(fisher, w.shape),
                                                                                  w.device))
    return {"error": dec.error, "error_unweighted": unweighted, "quant_error": plain, "best_iter": dec.best_iter,
            "regressed": dec.regressed}


# ---- the layer ----------------------------------------------------------------------------------------------
class QALoRALinear(QuantLoRALinear):
    """y = x·dequant(Q)ᵀ + bias + scaling · lora_B(lora_A(pool(dropout(x)))), Q asymmetric INT-k in groups of g.

    A QuantLoRALinear whose adapter reads the group-pooled input: lora_A is (r × in/g), lora_B (out × r). Storage
    (raw-byte buffers q_codes, q_scales, q_zeros; frozen bias), dequantization and the memory-saving frozen matmul
    are QuantLoRALinear's. Constructor as QuantLoRALinear's: a (out × r) and b (in/g × r) with a·bᵀ = scaling·
    lora_B·lora_A (QALoRADecomposition.a / .b), or neither for PEFT's zero-product initialisation. rank 0 is a
    pure INT-k layer (what merge() returns)."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, a: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, rank: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        if not isinstance(q, QuantizedTensor):
            raise ValueError(f"QALoRALinear needs a QuantizedTensor, got {type(q).__name__}; quantize the weight first")
        check_qalora_config(q.config)
        g = q.config.blocksize
        m, n = check_group_shape(q.shape, g)
        if (a is None) != (b is None):
            raise ValueError("pass both adapter factors a (out x r) and b (in/g x r), or neither for a zero-init adapter")
        if a is not None:
            rank = a.shape[1]
            if tuple(a.shape) != (m, rank) or tuple(b.shape) != (n // g, rank):
                raise ValueError(f"adapter factors have shapes {tuple(a.shape)}, {tuple(b.shape)}; a {m}x{n} weight "
                                 f"with groups of {g} needs ({m}, r) and ({n // g}, r)")
        rank = 0 if rank is None else rank
        check_rank(rank, (m, n), g)
        # The parent stores Q and bias; its adapter would have the wrong (r × in) shape, so it is built here.
        super().__init__(q, bias, rank=0, dropout=dropout, adapter_dtype=adapter_dtype, backend=backend)
        self.group_size = g
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank if rank else 0.0
        if rank:
            device = q.device
            if a is None:
                lora_a = torch.empty(rank, n // g, device=device, dtype=adapter_dtype)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # PEFT's default for lora_A
                lora_b = torch.zeros(m, rank, device=device, dtype=adapter_dtype)
            else:
                lora_a = b.T.to(device=device, dtype=adapter_dtype)
                lora_b = (a.float() / self.scaling).to(device=device, dtype=adapter_dtype)
            self.lora_A = nn.Parameter(lora_a.contiguous())
            self.lora_B = nn.Parameter(lora_b.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, rank: int, iters: int = 0, init: str = "zero",
                    alpha: float | None = None, solver: SolverSettings | None = None,
                    dropout: float = 0.0, fisher=None, adapter_dtype: torch.dtype = torch.float32) -> "QALoRALinear":
        """Quantize `linear` for QA-LoRA. init="zero": Q = q(W) and PEFT's zero-product adapter (iters must be 0);
        init="loftq": qalora_decompose(W, config, rank, iters >= 1, fisher=fisher), so that Q + adapter starts
        nearest to W (in the Fisher-weighted norm when row/column weights are given)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        if init not in ("zero", "loftq"):
            raise ValueError(f"init={init!r} is not supported; use 'zero' or 'loftq'")
        if init == "zero" and iters != 0:
            raise ValueError(f"iters={iters!r} applies to init='loftq' only; pass init='loftq' or iters=0")
        if init == "loftq" and rank and (not isinstance(iters, int) or isinstance(iters, bool) or iters < 1):
            raise ValueError(f"init='loftq' needs iters >= 1 (got {iters!r}); iters=0 is init='zero'")
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if init == "zero" or rank == 0:
            check_qalora_config(config)
            check_rank(rank, check_group_shape(w.shape, config.blocksize), config.blocksize)
            return cls(quantize(w.float(), config), bias, rank=rank, alpha=alpha, dropout=dropout,
                       adapter_dtype=adapter_dtype)
        dec = qalora_decompose(w, config, rank, iters, fisher=fisher, solver=solver)
        return cls(dec.q, bias, dec.a, dec.b, alpha=alpha, dropout=dropout, adapter_dtype=adapter_dtype)

    # ---- math ------------------------------------------------------------------------------------------------
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average x (…, in) over each group of g consecutive features -> (…, in/g)."""
        return x.unflatten(-1, (self.in_features // self.group_size, self.group_size)).mean(dim=-1)

    def lora_delta(self) -> torch.Tensor:
        """The full-size weight the adapter acts as, scaling·lora_B·lora_A·E/g, in fp32 (zeros for rank 0)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, device=self.q_codes.device)
        return adapter_weight(self.lora_A.detach().float(), self.lora_B.detach().float(), self.group_size,
                              self.scaling)

    @property
    def adapter_nbytes16(self) -> int:
        """Adapter bytes at the plan's 16-bit accounting: r·(out + in/g) values."""
        return ADAPTER_BITS // 8 * self.rank * (self.out_features + self.in_features // self.group_size)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.lora_dropout(x))

    # ---- merging ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_zeros(self) -> torch.Tensor:
        """β' = β + scaling·(lora_B·lora_A)/g per (row, group), flat in block order, in the config's scale dtype.

        Summed in fp64 and rounded once. With fp32 zero-points the merge is exact to fp32 rounding of β'. With
        scale_dtype fp16 (bf16) β' keeps 11 (8) significant bits, so merged weights differ from W_q + L by up to
        half an ulp of |β'| (≈ |β'|·2⁻¹¹ for fp16): the integer model is exact only up to that rounding."""
        groups = self.in_features // self.group_size
        beta = self._field("zeros").double().view(self.out_features, groups)
        if self.rank:
            beta = beta + self.scaling * (self.lora_B.double() @ self.lora_A.double()) / self.group_size
        return beta.reshape(-1).to(self._field("zeros").dtype)

    @torch.no_grad()
    def merge(self) -> "QALoRALinear":
        """A new pure INT-k layer (rank 0) whose weight is dequant(Q) + scaling·lora_B·lora_A·E/g: codes and
        scales are copied byte for byte, only the zero-points move. This layer is left unchanged."""
        q = self.quantized()
        merged = QuantizedTensor(self.config, q.shape, codes=q.codes.clone(), scales=q.scales.clone(),
                                 zeros=self.merged_zeros())
        return QALoRALinear(merged, self.bias, rank=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
