"""The study's reference arms as plan documents made from the data-free profile: QLoRA (NF4, blocks of 64, double
quant, zero-product adapters) and every uniform configuration of the grid (LoftQ-initialised), through the same
plan_from_solution as `lqplan plan`, so they are plans like any other."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from quant import NF4_QLORA

from ..model.discover import planned_params, unplanned_bytes
from ..plan.assemble import plan_from_solution
from ..plan.budget import parse_budget, resolve_budget
from ..profile.grid import GridPoint, make_grid


def qlora_point(rank: int) -> GridPoint:
    return GridPoint(NF4_QLORA, rank)


def qlora_bits(matrices, rank: int) -> float:
    """QLoRA's own bits/param on these matrices (NF4 b64 dq + rank-`rank` adapters), rounded up to 1e-4 so its
    configuration fits the budget it names."""
    point = qlora_point(rank)
    exact = sum(point.bits(m.shape) for m in matrices) / planned_params(matrices)
    return math.ceil(exact * 1e4) / 1e4


def budget_bits(source, matrices, bits_per_param: float) -> int:
    """A bits/param budget in bits, as `lqplan plan --budget Xbits` counts it."""
    return parse_budget(f"{bits_per_param}bits").total_bits(planned_params(matrices), unplanned_bytes(source, matrices))


def uniform_points(s, matrices, max_bits: int) -> list[GridPoint]:
    """The grid's LoRA points (rank > 0) that every matrix can take and that fit `max_bits` used everywhere."""
    out = []
    for p in make_grid(s.bits, s.blocks, s.ranks):
        if p.rank <= 0 or not all(p.applies_to(m.shape) and p.rank <= min(m.shape) for m in matrices):
            continue
        if sum(p.bits(m.shape) for m in matrices) <= max_bits:
            out.append(p)
    return out


@dataclass
class _Uniform:
    """The one field plan_from_solution reads from a solver's answer."""
    choice: dict


def uniform_plan(source, matrices, table: pd.DataFrame, point: GridPoint, method: dict, zero_init: bool = False):
    """The plan that gives every matrix `point`. zero_init: QLoRA's plain quantization with zero-product adapters
    (iters 0, the entry errors are the quantization errors)."""
    if zero_init:
        table = table.assign(error=table["quant_error"])
        method = {**method, "iters": 0}
    bits = sum(point.bits(m.shape) for m in matrices)
    spec = math.ceil(bits / planned_params(matrices) * 1e4) / 1e4
    budget = resolve_budget(source, matrices, [point], f"{spec}bits")
    return plan_from_solution(source, matrices, table, _Uniform({m.name: point.label for m in matrices}), budget,
                              method)


def best_uniform(uniform: dict[str, dict], bits: int) -> str | None:
    """The label of the uniform configuration with the least data-free profiled error among those that fit."""
    fits = [(u["table_error"], label) for label, u in uniform.items() if u["bits"] <= bits]
    return min(fits)[1] if fits else None


def predicted_error(table: pd.DataFrame, choice: dict[str, str], zero_init: bool) -> float:
    """The planner's predicted total error of a choice (matrix -> label) under one objective's profile table:
    its `error` column, or its `quant_error` column for zero-product adapters."""
    column = "quant_error" if zero_init else "error"
    indexed = table.set_index(["matrix", "label"])[column]
    return math.fsum(float(indexed[(name, label)]) for name, label in choice.items())
