"""Fused groups: which of a model's matrices serving engines load as one fused matrix (q/k/v, gate/up), found by
the end of their module path, whole components only, under one parent module (so within one layer):
Llama/Gemma/Mistral/Qwen's q_proj, k_proj, v_proj and gate_proj, up_proj; BERT's attention.self.query/key/value.
A group that matches nothing in a model (gate_up in BERT, whose MLP has no gate) ties nothing. Already-fused
matrices (GPT-2's c_attn, Phi-3's qkv_proj) are one matrix and need no tie. How a plan ties them: planner.plan.tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import UserError
from .discover import ends_with_path

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
