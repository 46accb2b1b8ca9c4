"""A solver's choice of one configuration per matrix, turned into the plan document with the model, budget, method
and the solver's proof recorded."""

from __future__ import annotations

import pandas as pd

from quant import QuantConfig

from .. import __version__
from ..profile.grid import GridPoint
from .budget import ResolvedBudget
from .document import Plan, PlanEntry
from .ilp import RTOL


def plan_from_solution(source, matrices, table: pd.DataFrame, solution, budget: ResolvedBudget,
                       method: dict) -> Plan:
    """The plan of `solution.choice` (matrix -> configuration label) read from the profile `table`, with the
    model, the resolved budget, the method record and what proved the solution optimal."""
    chosen = table.set_index(["matrix", "label"])
    entries = []
    for info in matrices:
        label = solution.choice[info.name]
        row = chosen.loc[(info.name, label)]
        adapter = row["method"] if "method" in row.index and isinstance(row["method"], str) else "lora"
        point = GridPoint(QuantConfig.from_record(row), int(row["rank"]), adapter)
        entries.append(PlanEntry.of(info.name, info.shape, point, row["error"]))
    solver_info = {k: getattr(solution, k) for k in ("solver", "status", "proof", "objective", "bound", "gap",
                                                     "seconds") if hasattr(solution, k)}
    solver_info["mip_rel_tol"] = RTOL  # "optimal" means proven within this relative tolerance of the total error
    return Plan.from_entries(
        source.record(), budget.record(), entries, unplanned_bytes=budget.unplanned, budget_bits=budget.bits,
        solver=solver_info, method=method, created_by=f"lqplan {__version__}")
