"""What a profile is computed with, as one frozen value validated once: the grid, the LoftQ iterations, the
low-rank solver, the objective and its calibration source, whether the output head is planned, and the
fused groups whose members the plan gives one configuration (planner.model.fused). Its cache key names the
numbers it produces (a tie changes the plan, not the profile, so it is not in the key).

Objectives (docs/objectives.md): "data-free" ‖W − Q − ABᵀ‖²; "fisher" LQ-LoRA's diagonal Fisher ‖D_r E D_c‖²;
"output" the output-aware ‖D_r E L‖² with L·Lᵀ the damped input second moment. A calibration source without an
objective means "fisher", as it always has."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quant import SolverSettings
from quant.decompose import ROUNDINGS
from quant.engine import ENGINE_VERSION
from quant.weighting import DEFAULT_DAMPING

from ..errors import UserError
from ..model.fused import parse_tie
from .grid import GridPoint, make_grid

OBJECTIVES = ("data-free", "fisher", "output")


@dataclass(frozen=True)
class ProfileSettings:
    grid: tuple[GridPoint, ...] = field(default_factory=lambda: tuple(make_grid()))
    iters: int = 5
    solver: SolverSettings = field(default_factory=SolverSettings)
    calib: str | None = None  # "pydoc" or a text file; None: data-free
    calib_tokens: int = 16384
    include_head: bool = False
    objective: str | None = None  # one of OBJECTIVES; None: "fisher" with a calibration source, else "data-free"
    damping: float = DEFAULT_DAMPING  # output objective: R + damping·mean(diag R)·I before its Cholesky factor
    rounding: str = "nearest"  # output objective: "gptq" compensates rounding errors under R (quant.errcomp)
    tie: tuple[str, ...] = ()  # "qkv", "gate_up"; a "qkv,gate_up" string is read as the --tie flag is

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))  # a list from a caller; frozen means hashable
        object.__setattr__(self, "tie", parse_tie(self.tie))
        if not self.grid:
            raise UserError("the grid is empty; pass at least one --bits/--blocks/--ranks value")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise UserError(f"--iters {self.iters} is negative; use 0 (plain quantization) to 5")
        if not isinstance(self.calib_tokens, int) or self.calib_tokens <= 0:
            raise UserError(f"--calib-tokens {self.calib_tokens} must be positive, e.g. 16384")
        objective = self.objective or ("fisher" if self.calib else "data-free")
        if objective not in OBJECTIVES:
            raise UserError(f"--objective {objective!r} is not supported; use one of {', '.join(OBJECTIVES)}")
        if objective == "data-free" and self.calib:
            raise UserError("--objective data-free reads no calibration text; drop --calib, or pass --objective "
                            "fisher or output")
        if objective != "data-free" and not self.calib:
            raise UserError(f"--objective {objective} needs calibration text; add --calib pydoc (or --calib FILE)")
        if objective == "output" and any(p.method != "lora" for p in self.grid):
            raise UserError("--objective output plans LoRA points only; drop --method qalora/both, or use "
                            "--objective fisher")
        if self.rounding not in ROUNDINGS:
            raise UserError(f"--rounding {self.rounding!r} is not supported; use one of {', '.join(ROUNDINGS)}")
        if self.rounding != "nearest" and objective != "output":
            raise UserError(f"--rounding {self.rounding} compensates errors under the layers' input statistics; add "
                            "--objective output --calib pydoc, or drop --rounding")
        if not (isinstance(self.damping, (int, float)) and 0 < self.damping < float("inf")):
            raise UserError(f"damping {self.damping!r} must be a positive number, e.g. 0.01")
        object.__setattr__(self, "objective", objective)

    def cache_key(self, weights_key: str | None = None) -> str:
        """The profile cache's settings folder. `weights_key` names the calibration statistics (the Fisher weights'
        or the output statistics' key). The engine version is part of the key, so numbers from an older engine are
        never silently reused; data-free and Fisher keys read as they always have."""
        base = f"T{self.iters}-{self.solver.key}-e{ENGINE_VERSION}"
        if self.objective == "output":
            if not weights_key:
                raise ValueError("the output objective's cache key needs the output statistics' key")
            return f"{base}-o{weights_key}-d{self.damping:g}" + ("" if self.rounding == "nearest" else
                                                                 f"-{self.rounding}")
        return f"{base}-f{weights_key or 'none'}"

    def data_free(self) -> ProfileSettings:
        return replace(self, calib=None, objective="data-free", rounding="nearest")

    def method_record(self) -> dict:
        """How the profile was made, as plan.json records it (fisher filled in by the caller), and the tie when
        there is one (plans without one keep the bytes they always had)."""
        return {"iters": self.iters, "solver": self.solver.key, "grid": [p.label for p in self.grid],
                **({"tie": list(self.tie)} if self.tie else {})}
