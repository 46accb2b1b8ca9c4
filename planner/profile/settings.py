"""What a profile is computed with, as one frozen value validated once: the grid, the LoftQ iterations, the
low-rank solver, the Fisher calibration source, whether the output head is planned, and the fused groups whose
members the plan gives one configuration (planner.plan.tie). Its cache key names the numbers it produces (a tie
changes the plan, not the profile, so it is not in the key)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quant import SolverSettings
from quant.engine import ENGINE_VERSION

from ..errors import UserError
from ..plan.tie import parse_tie
from .grid import GridPoint, make_grid


@dataclass(frozen=True)
class ProfileSettings:
    grid: tuple[GridPoint, ...] = field(default_factory=lambda: tuple(make_grid()))
    iters: int = 5
    solver: SolverSettings = field(default_factory=SolverSettings)
    calib: str | None = None  # "pydoc" or a text file; None: data-free
    calib_tokens: int = 16384
    include_head: bool = False
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

    def cache_key(self, fisher_key: str | None = None) -> str:
        # The engine version is part of the key, so numbers from an older engine are never silently reused.
        return f"T{self.iters}-{self.solver.key}-e{ENGINE_VERSION}-f{fisher_key or 'none'}"

    def data_free(self) -> ProfileSettings:
        return replace(self, calib=None)

    def method_record(self) -> dict:
        """How the profile was made, as plan.json records it (fisher filled in by the caller), and the tie when
        there is one (plans without one keep the bytes they always had)."""
        return {"iters": self.iters, "solver": self.solver.key, "grid": [p.label for p in self.grid],
                **({"tie": list(self.tie)} if self.tie else {})}
