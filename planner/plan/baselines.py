"""Baseline plans at a budget, from profile tables: the configuration each reference method would use (QLoRA,
uniform LoftQ, QA-LoRA) beside the planner's own ILP plans, as plan documents, with the error each was profiled
at; and a 16-bit option added to a table (every matrix kept unquantized, without an adapter) to ask whether the
grid lacks it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from quant import SolverSettings

from ..model.discover import planned_params
from ..profile.grid import GridPoint
from .document import Plan, PlanEntry
from .ilp import InfeasibleBudget, solve, uniform_solutions

SIXTEEN_BIT_LABEL = "bf16-r0"


@dataclass
class Arm:
    """One baseline at one budget: the label each matrix takes, how its adapters start, and why it is absent."""

    arm: str
    budget: float
    choice: dict[str, str] | None = None  # matrix -> grid label; None: nothing fits
    init: str = "loftq"
    fisher: bool = False
    reason: str = ""
    describe: str = ""


def uniform_fits(table: pd.DataFrame, budget_bits: int, keep) -> pd.DataFrame:
    """uniform_solutions restricted to the rows `keep` selects, fitting ones only, with each label's bits/rank."""
    sub = table.loc[keep(table)]
    # Only labels every planned matrix has are uniform (a QA-LoRA rank can exist for some shapes only).
    cover = sub.groupby("label")["matrix"].nunique()
    sub = sub.loc[sub["label"].isin(cover.index[cover == table["matrix"].nunique()])]
    if sub.empty:
        return sub
    uni = uniform_solutions(sub, budget_bits)
    uni = uni.loc[uni["fits"]].copy()
    first = sub.drop_duplicates("label").set_index("label")
    for col in ("bits", "rank", "blocksize"):
        uni[col] = uni["label"].map(first[col]).astype(int)
    return uni


def choose_arms(free, fisher_table, budget: float, budget_bits: int) -> list[Arm]:
    """The five baselines at one budget, each the largest configuration that fits: QLoRA (NF + double quant, blocks
    of 64, most bits then the largest rank, zero-initialised), uniform LoftQ (the NF label of least error), the
    ILP plan data-free and Fisher-weighted, QA-LoRA (the uniform INT label of least error)."""
    names = list(dict.fromkeys(free["matrix"]))
    arms = []

    def uniform_arm(arm, uni, order, init, what):
        if uni.empty:
            return Arm(arm, budget, reason=f"no {what} fits {budget} bits/param")
        best = uni.sort_values(order[0], ascending=order[1], kind="mergesort").iloc[0]
        return Arm(arm, budget, {n: best["label"] for n in names}, init, describe=best["label"])

    lora = lambda t: t["method"] == "lora"  # noqa: E731
    qlora_rows = lambda t: lora(t) & (t["kind"] == "nf") & t["double_quant"].astype(bool) & (t["blocksize"] == 64) \
        & (t["rank"] > 0)  # noqa: E731
    arms.append(uniform_arm("qlora", uniform_fits(free, budget_bits, qlora_rows), (["bits", "rank"], [False, False]),
                            "qlora", "QLoRA configuration (NF + dq, blocks of 64, rank > 0)"))
    arms.append(uniform_arm("loftq", uniform_fits(free, budget_bits, lambda t: lora(t) & (t["kind"] == "nf")
                                              & (t["rank"] > 0)), (["total_error"], [True]), "loftq",
                            "uniform NF configuration with an adapter"))
    for arm, table in (("ilp", free), ("ilp_fisher", fisher_table)):
        sub = table.loc[table["method"] == "lora"]
        try:
            sol = solve(sub, budget_bits)
        except InfeasibleBudget as e:
            arms.append(Arm(arm, budget, reason=f"infeasible: {e}"))
            continue
        labels = sorted(set(sol.choice.values()))
        arms.append(Arm(arm, budget, dict(sol.choice), "loftq", arm == "ilp_fisher",
                        describe=f"{len(labels)} configs" if len(labels) > 1 else labels[0]))
    arms.append(uniform_arm("qalora", uniform_fits(free, budget_bits, lambda t: (t["method"] == "qalora")
                                               & (t["rank"] > 0)), (["total_error"], [True]), "loftq",
                            "QA-LoRA configuration (rank <= min(out, in/g) for every matrix)"))
    return arms


def build_plan(source, matrices, points: dict[str, GridPoint], arm: Arm, table, iters: int,
               solver: SolverSettings) -> Plan:
    """The arm's choice as a plan document over `matrices`, each entry carrying its profiled error."""
    indexed = table.set_index(["matrix", "label"])
    entries = []
    for info in matrices:
        point = points[arm.choice[info.name]]
        shape = tuple(int(x) for x in info.shape)
        entries.append(PlanEntry.of(info.name, shape, point, indexed.loc[(info.name, point.label), "error"]))
    return Plan.from_entries(source.record(), {"spec": f"{arm.budget}bits", "kind": "bits", "value": arm.budget,
                                               "bits": int(arm.budget * planned_params(matrices))}, entries,
                             method={"iters": iters, "solver": solver.key,
                                     "fisher": "pydoc" if arm.fisher else None, "arm": arm.arm})


def profiled_error(arm: Arm, free, weighted) -> float:
    """The arm's unweighted reconstruction error as profiled: LoftQ/QA-LoRA decompositions (data-free table),
    plain quantization for QLoRA's zero-initialised adapters, the Fisher-weighted decompositions for ilp_fisher."""
    table = weighted if arm.fisher else free
    column = "quant_error" if arm.init == "qlora" else ("error_unweighted" if arm.fisher else "error")
    picked = table.set_index(["matrix", "label"]).loc[list(arm.choice.items()), column]
    return math.fsum(float(x) for x in picked)


def with_sixteen_bit(table: pd.DataFrame) -> pd.DataFrame:
    """`table` plus one row per matrix storing it as bf16 without an adapter: 16 * m * n bits, error 0 (a lower
    bound: bf16 rounding is far below any NF4 error)."""
    shapes = table.groupby("matrix", sort=False)[["m", "n"]].first().reset_index()
    rows = shapes.assign(label=SIXTEEN_BIT_LABEL, error=0.0, storage_bits=16 * shapes["m"] * shapes["n"])
    return pd.concat([table[["matrix", "m", "n", "label", "error", "storage_bits"]], rows], ignore_index=True)
