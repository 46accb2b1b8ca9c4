"""Ties in the plan: fused groups (planner.model.fused) whose members get one configuration.

vLLM-style engines load q/k/v as one fused matrix and gate/up as another, and serve one quantization format per
fused matrix. A tie (`--tie qkv,gate_up`) gives every member of such a group one grid label: the same bits,
blocksize, double quantization and rank. The knapsack then sees each group as one item whose storage and error at
a label are its members' sums, over the labels every member has (a rank or QA-LoRA group size that one member's
shape cannot take is a label that member has no row for, so the group cannot take it either); the choice is
expanded back to the members, so a plan still lists every matrix with its own error and bytes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from ..model.fused import TieGroup

def group_table(table: pd.DataFrame, groups: Sequence[TieGroup]) -> pd.DataFrame:
    """The profile table with each group's members replaced by one item: at every label all members have, the sum
    of their storage and errors (and the fused shape: the members' rows stacked, when they share their inputs).
    Raises UserError when a group's members have no label in common."""
    if not groups:
        return table
    cols = [c for c in ("matrix", "label", "error", "storage_bits", "m", "n") if c in table.columns]
    df = table.loc[:, cols].assign(matrix=table["matrix"].astype(str), label=table["label"].astype(str))
    item_of = {m: g.item for g in groups for m in g.members}
    pos_of = {m: i for g in groups for i, m in enumerate(g.members)}
    size_of = {g.item: len(g.members) for g in groups}
    member = df["matrix"].isin(item_of)
    rows = df.loc[member].assign(item=df.loc[member, "matrix"].map(item_of), pos=df.loc[member, "matrix"].map(pos_of))
    count = rows.groupby(["item", "label"], sort=False)["pos"].transform("size")
    common = rows.loc[count.to_numpy() == rows["item"].map(size_of).to_numpy()]
    present = set(pd.unique(common["item"]))
    missing = [g for g in groups if g.item not in present]
    if missing:
        g = missing[0]
        raise UserError(f"the {g.name} group {g.item} has no configuration that all its members have (a rank "
                        f"or group size fits one member's shape only); widen --ranks/--groups or leave "
                        f"{g.name} out of --tie")
    # members in fused order, so the float sums do not depend on the table's row order
    common = common.sort_values(["item", "label", "pos"], kind="mergesort")
    agg = common.groupby(["item", "label"], sort=False).agg(error=("error", "sum"),
                                                            storage_bits=("storage_bits", "sum"))
    agg = agg.reset_index().rename(columns={"item": "matrix"})
    if "m" in cols and "n" in cols:
        shapes = rows.drop_duplicates("matrix").assign(size=lambda d: d["m"] * d["n"])
        by_item = shapes.groupby("item").agg(m=("m", "sum"), n=("n", "first"), inputs=("n", "nunique"),
                                             size=("size", "sum"))
        stacked = by_item["inputs"] == 1  # q/k/v and gate/up share their input: the fused matrix stacks rows
        by_item["m"] = by_item["m"].where(stacked, by_item["size"])
        by_item["n"] = by_item["n"].where(stacked, 1)
        agg = agg.join(by_item[["m", "n"]].astype(np.int64), on="matrix")
    return pd.concat([df.loc[~member], agg], ignore_index=True)


def expand_choice(choice: dict[str, str], groups: Sequence[TieGroup]) -> dict[str, str]:
    """A choice over group items and single matrices as one label per matrix, in sorted matrix order."""
    members = {g.item: g.members for g in groups}
    out = {}
    for name, label in choice.items():
        for m in members.get(name, (name,)):
            out[m] = label
    return dict(sorted(out.items()))
