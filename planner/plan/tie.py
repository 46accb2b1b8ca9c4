"""Fused groups for serving engines: matrices that must share one configuration.

vLLM-style engines load q/k/v as one fused matrix and gate/up as another, and serve one quantization format per
fused matrix. A tie (`--tie qkv,gate_up`) gives every member of such a group one grid label: the same bits,
blocksize, double quantization and rank. The knapsack then sees each group as one item whose storage and error at
a label are its members' sums, over the labels every member has (a rank or QA-LoRA group size that one member's
shape cannot take is a label that member has no row for, so the group cannot take it either); the choice is
expanded back to the members, so a plan still lists every matrix with its own error and bytes.

Members are recognised by the end of their module path, whole components only, under one parent module (so within
one layer): Llama/Gemma/Mistral/Qwen names q_proj, k_proj, v_proj and gate_proj, up_proj; BERT's
attention.self.query/key/value. A group name that matches nothing in a model (gate_up in BERT, whose MLP has no
gate) ties nothing; make_plan says so in one warning line. Already-fused matrices (GPT-2's c_attn, Phi-3's
qkv_proj) are one matrix and need no tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from ..model.discover import ends_with_path

# group name -> the naming conventions it is recognised in, each the members' module-path tails in fused order.
TIE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "qkv": (("q_proj", "k_proj", "v_proj"),
            ("attention.self.query", "attention.self.key", "attention.self.value")),
    "gate_up": (("gate_proj", "up_proj"),),
}

_EXAMPLE = "e.g. --tie qkv,gate_up"


@dataclass(frozen=True)
class TieGroup:
    """One fused group found in a model: its group name ("qkv"), the knapsack item's name (the members' common
    path with their tails in braces) and the members' matrix names in fused order."""
    name: str
    item: str
    members: tuple[str, ...]


def parse_tie(value, what: str = "--tie") -> tuple[str, ...]:
    """The group names of a tie, in TIE_GROUPS order, each once. `value`: "qkv,gate_up", a sequence of names, or
    None / () for no tie. `what` names the value in messages (the CLI flag, or the plan field)."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not any(parts):
            raise UserError(f"{what} names no group; use {', '.join(TIE_GROUPS)} ({_EXAMPLE}) or leave it out")
    elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        parts = [p.strip() for p in value]
    else:
        raise UserError(f"{what} {value!r} is not a list of group names; use {', '.join(TIE_GROUPS)} ({_EXAMPLE})")
    for p in parts:
        if p not in TIE_GROUPS:
            shown = f" {value!r}" if isinstance(value, str) else ""
            raise UserError(f"{what}{shown}: {p!r} is not a fused group; use {', '.join(TIE_GROUPS)} ({_EXAMPLE})")
    return tuple(g for g in TIE_GROUPS if g in parts)


def tie_groups(names: Iterable[str], tie: Sequence[str]) -> list[TieGroup]:
    """The groups of `tie` among matrix `names` with at least two members present, in order of first member."""
    found: dict[tuple, dict[int, str]] = {}
    for name in dict.fromkeys(str(n) for n in names):
        for group in tie:
            for family, tails in enumerate(TIE_GROUPS[group]):
                for pos, tail in enumerate(tails):
                    if ends_with_path(name, tail):
                        found.setdefault((group, family, name[: len(name) - len(tail)]), {})[pos] = name
    out = []
    for (group, _, _), members in found.items():
        if len(members) < 2:
            continue
        ordered = tuple(members[p] for p in sorted(members))
        out.append(TieGroup(group, _item_name(ordered), ordered))
    return out


def _item_name(members: Sequence[str]) -> str:
    """The members' common dotted prefix and their differing tails in braces: "model.layers.0.self_attn.{q_proj,
    k_proj,v_proj}" (never a matrix name, so the item cannot collide with one)."""
    parts = [m.split(".") for m in members]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    head = ".".join(parts[0][:common])
    return f"{head}{'.' if head else ''}{{{','.join('.'.join(p[common:]) for p in parts)}}}"


def untied_names(names: Iterable[str], tie: Sequence[str]) -> list[str]:
    """The group names of `tie` that tie nothing among `names` (no group of two members or more)."""
    hit = {g.name for g in tie_groups(names, tie)}
    return [g for g in tie if g not in hit]


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
