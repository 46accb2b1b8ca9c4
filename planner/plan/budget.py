"""Memory budgets: parsed from the command line (bits per parameter, "2.75bits", or bytes of the whole model,
"6GB"), then resolved once per process (resolve_budget) into a ResolvedBudget: the bits a model's planned matrices may
cost, checked against the grid's cheapest plan; with a fine-tune's shape, a bytes budget is read as its peak GPU
memory and the planned matrices' cost is their training cost.

Accepted units (optional space between number and unit):
  bits per planned parameter: bits, bit, bpw, bpp, bits/param, bits/weight (any case)
  bytes of the whole model:   B, kB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); the prefix
                              in any case, the final B upper-case: "b", "Gb" or "mib" is refused as ambiguous
                              (bits or bytes?)
The number may use a decimal point and an exponent ("6e9B", "2.5e-1GB"). A number without a unit is refused:
"2.75" could mean bits or gigabytes. A bits budget covers the planned matrices only, adapters included
(16-bit LoRA factors, r·(m + n)·16 bits per m×n matrix; docs/formulas.md); a bytes budget covers the model as it sits in memory: planned matrices at their configurations plus every
unplanned tensor (embeddings, norms, biases) at its own dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

from ..errors import UserError
from ..model.discover import planned_params, unplanned_bytes
from ..profile.grid import GridPoint
from ..model.fused import tie_groups
from .instance import InfeasibleBudget
from .train_memory import TrainShape, fixed_bytes, train_cost_bits, unplanned_train_bytes

BITS_UNITS = ("bits", "bit", "bpw", "bpp", "bits/param", "bits/weight")


BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# Canonical spelling of each byte unit, for messages that quote the budget back in the user's unit.
_BYTE_UNIT_NAMES = {"b": "B", "kb": "kB", "mb": "MB", "gb": "GB", "tb": "TB",
                    "kib": "KiB", "mib": "MiB", "gib": "GiB", "tib": "TiB"}


_EXAMPLE = "e.g. --budget 2.75bits (bits per parameter) or --budget 6GB (bytes of the whole model)"
_SPEC = re.compile(r"^\s*(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity))"
                   r"\s*(?P<unit>[A-Za-z/]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A parsed budget. kind "bits": value is bits per planned parameter; kind "bytes": value is bytes."""

    kind: str
    value: float
    spec: str
    unit: str = field(default="", compare=False)  # the user's unit, canonical spelling ("bits", "GB", "GiB", ...)
    exact: Fraction | None = field(default=None, repr=False, compare=False)  # value without float rounding

    @property
    def _exact(self) -> Fraction:
        return self.exact if self.exact is not None else Fraction(self.value)

    def total_bits(self, planned_params: int, unplanned_bytes: int = 0) -> int:
        """Bits available to the planned matrices (quantized weights, scales and 16-bit adapters)."""
        if planned_params <= 0:
            raise UserError("the model has no planned matrices; pass a model with linear layers in numbered blocks "
                            "(or --include-head)")
        if self.kind == "bits":
            return math.floor(self._exact * planned_params)
        budget_bytes = math.floor(self._exact)
        if unplanned_bytes >= budget_bytes:
            need = self._in_unit(unplanned_bytes)
            raise UserError(f"budget {self.spec!r} is used up by the unplanned tensors alone "
                            f"({unplanned_bytes:,} bytes = {need}); raise the budget well above {need} "
                            "or give it in bits per parameter, e.g. --budget 2.75bits")
        return (budget_bytes - unplanned_bytes) * 8

    def _in_unit(self, nbytes: float) -> str:
        unit = self.unit if self.kind == "bytes" and self.unit else "GB"
        scale = BYTE_UNITS[unit.lower()]
        return f"{nbytes / scale:.4g} {unit}"

    def format_bits(self, bits: int, planned_params: int, unplanned_bytes: int = 0) -> str:
        """Describe a planned-matrix bit count in this budget's unit, rounded up so it can be pasted as a budget."""
        per_param = bits / planned_params
        if self.kind == "bits":
            up = math.ceil(per_param * 10**4) / 10**4
            return f"{up:.4f}bits ({per_param:.6f} bits/param, {bits:,} bits for {planned_params:,} parameters)"
        total = math.ceil(bits / 8) + unplanned_bytes
        scale = BYTE_UNITS[self.unit.lower()] if self.unit else 10**9
        unit = self.unit or "GB"
        up = math.ceil(total / scale * 10**3) / 10**3
        return (f"{up:.3f}{unit} ({total:,} bytes: {math.ceil(bits / 8):,} for the planned matrices + "
                f"{unplanned_bytes:,} unplanned; {per_param:.4f} bits/param)")


def parse_budget(spec: str) -> Budget:
    """Parse a --budget string; see the module docstring for the accepted forms."""
    text = "" if spec is None else str(spec)
    if not text.strip():
        raise UserError(f"the budget is empty; {_EXAMPLE}")
    match = _SPEC.match(text)
    if not match:
        raise UserError(f"budget {text!r} is not a number followed by a unit; {_EXAMPLE}")
    num, unit = match.group("num"), match.group("unit")
    number = float(num)
    if not math.isfinite(number):
        raise UserError(f"budget {text!r} is not a finite number; {_EXAMPLE}")
    if number <= 0:
        raise UserError(f"budget {text!r} must be greater than zero; {_EXAMPLE}")
    if not unit:
        raise UserError(f"budget {text!r} has no unit (bits per parameter or bytes?); write {num}bits or {num}GB; "
                        f"{_EXAMPLE}")
    if unit == "b":
        raise UserError(f"budget {text!r}: lower-case 'b' is ambiguous; write {num}B for bytes or {num}bits for "
                        "bits per parameter")
    if unit.lower() in BYTE_UNITS and unit.endswith("b"):
        # "60Gb" is gigabits in the usual notation; reading it as gigabytes would plan 8x the memory
        raise UserError(f"budget {text!r}: a lower-case 'b' in {unit!r} reads as bits, not bytes; write "
                        f"{num}{_BYTE_UNIT_NAMES[unit.lower()]} for bytes or {num}bits for bits "
                        "per parameter")
    exact = Fraction(num)  # from the decimal text, so 2.85bits * params is not subject to float rounding
    low = unit.lower()
    if low in BITS_UNITS:
        return Budget("bits", float(exact), text.strip(), "bits", exact)
    if low in BYTE_UNITS:
        exact_bytes = exact * BYTE_UNITS[low]
        if exact_bytes < 1:
            raise UserError(f"budget {text!r} is less than one byte; {_EXAMPLE}")
        if exact_bytes > 2**100:  # beyond any memory, and beyond a float once the unit multiplies it
            raise UserError(f"budget {text!r} is far larger than any memory; {_EXAMPLE}")
        return Budget("bytes", float(exact_bytes), text.strip(), _BYTE_UNIT_NAMES[low], exact_bytes)
    known = ", ".join(BITS_UNITS + tuple(_BYTE_UNIT_NAMES.values()))
    raise UserError(f"budget {text!r} has unknown unit {unit!r}; use one of {known}; {_EXAMPLE}")


def _adapter_note(grid: list[GridPoint], shapes: list[tuple[int, int]], budget_bits: int, params: int,
                  adapter_bits: int = 16) -> str:
    """Why an infeasible budget is infeasible when adapters are the cause: what the grid's smallest rank costs on
    this model and the largest rank that would still fit next to the cheapest quantization. adapter_bits: what one
    adapter parameter costs (16 at rest; its training state in a fine-tune's budget)."""
    lora = [p for p in grid if p.method == "lora"]
    ranks = sorted({p.rank for p in lora})
    if not ranks or ranks[0] == 0:
        return ""
    per_rank = sum(adapter_bits * (m + n) for m, n in shapes)  # r·(m + n) adapter parameters per matrix
    configs = {p.config for p in lora}
    quant_min = sum(min(c.matrix_bits(s, 0) for c in configs) for s in shapes)
    note = (f"; rank-{ranks[0]} adapters alone cost {ranks[0] * per_rank / params:.4f} bits/param on this model "
            f"(the cheapest quantization alone {quant_min / params:.4f})")
    fit = (budget_bits - quant_min) // per_rank
    if fit < 1:
        return note + ("; not even rank-1 adapters fit beside it: raise the budget or add cheaper quantization "
                       "(--bits 2, larger --blocks)")
    top = 1 << (int(fit).bit_length() - 1)  # largest power of two that fits
    example = ",".join(str(r) for r in (top // 2, top, top * 2) if r >= 1)
    return note + f"; lower --ranks so the smallest is at most {fit} (e.g. --ranks {example})"


def check_budget_feasible(grid: list[GridPoint], matrices, budget_bits: int, describe, tie=(),
                          train: TrainShape | None = None) -> int:
    """Raise InfeasibleBudget before profiling when every matrix at its cheapest grid point exceeds the budget
    (storage does not depend on the profile); return that smallest plan's bits. tie: fused groups whose members
    take one grid point (planner.plan.tie), so a group's cheapest is the cheapest point all its members take.
    train: costs are the points' training costs (train_cost_bits), as the solver counts them for a fine-tune."""
    shape_of = {m.name: tuple(int(x) for x in m.shape) for m in matrices}
    shapes = list(shape_of.values())
    groups = tie_groups(shape_of, tie) if tie else []
    tied = {n for g in groups for n in g.members}
    items = [[shape_of[n] for n in g.members] for g in groups] + [[s] for n, s in shape_of.items() if n not in tied]

    def cost(p, s):
        return p.bits(s) if train is None else train_cost_bits(p, s, train)

    min_bits = 0
    for item in items:
        costs = [sum(cost(p, s) for s in item) for p in grid if all(p.applies_to(s) for s in item)]
        if not costs:
            if len(item) == 1:
                raise UserError(f"no grid point applies to a {item[0][0]}x{item[0][1]} matrix; widen the grid "
                                "(--bits/--blocks/--ranks)")
            raise UserError(f"no grid point applies to all of the tied shapes {item}; widen the grid "
                            "(--bits/--blocks/--ranks/--groups) or leave that group out of --tie")
        min_bits += min(costs)
    if budget_bits < min_bits:
        params = sum(m * n for m, n in shapes)
        each = "every matrix at its cheapest configuration of the grid" + (
            ", each tied group at the cheapest one all its members take" if groups else "")
        adapter_bits = 16 if train is None else 8 * train.bytes_per_adapter_param
        raise InfeasibleBudget.below(budget_bits, min_bits, describe, each,
                                     _adapter_note(grid, shapes, budget_bits, params, adapter_bits))
    return min_bits


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget made concrete for one model's planned matrices and grid, and checked against the grid's cheapest plan
    (resolve_budget makes it, once per process): what the solver may spend and how to word a bit count."""

    budget: Budget
    bits: int  # what the planned matrices may cost: their storage, or with `train` their training cost
    params: int  # planned parameters
    unplanned: int  # bytes of every unplanned tensor at its stored dtype (plan.json's unplanned_bytes)
    fixed: int  # bytes of the budget the planned matrices cannot use: `unplanned`, or the fine-tune's fixed terms
    min_bits: int  # the grid's smallest plan, in the same cost as `bits`
    train: TrainShape | None = None  # set: the budget is the fine-tune's peak GPU memory

    def describe(self, bits: int) -> str:
        """A bit count of the planned matrices in the user's unit (Budget.format_bits)."""
        return self.budget.format_bits(bits, self.params, self.fixed)

    def record(self) -> dict:
        """plan.json's budget record."""
        b = self.budget
        return {"spec": b.spec, "kind": b.kind, "value": b.value, "bits": self.bits}


def resolve_budget(source, matrices, grid, budget: "str | Budget", tie=(),
                   train: TrainShape | None = None) -> ResolvedBudget:
    """Parse `budget` (a --budget string or a Budget), turn it into bits for these matrices and check it against the
    grid's cheapest plan (with `tie`'s groups each at one grid point) before any profiling: a typo or an infeasible
    budget fails in a second, not after hours. `train`: the budget, in bytes, is the fine-tune's peak GPU memory;
    what its fixed terms (activations, logits, unplanned tensors at bf16, workspace) leave pays for the planned
    matrices' packed storage and adapter training state."""
    budget_obj = budget if isinstance(budget, Budget) else parse_budget(budget)
    params = planned_params(matrices)
    unplanned = unplanned_bytes(source, matrices)
    fixed = unplanned
    if train is not None:
        if budget_obj.kind != "bytes":
            raise UserError(f"--train-batch/--seq-len make the budget the fine-tune's GPU memory, so it must be in "
                            f"bytes, not {budget_obj.spec!r}; pass e.g. --budget 24GB")
        ranks = max((p.rank for p in grid), default=0)
        fixed = fixed_bytes(source.config, unplanned_train_bytes(source, matrices), train, ranks)
        if fixed >= budget_obj.value:
            raise UserError(f"the fine-tune's memory besides the planned matrices (activations, logits, unplanned "
                            f"tensors at bf16, workspace) is {fixed / 1e9:.2f} GB, more than the budget "
                            f"{budget_obj.spec!r}; add --gradient-checkpointing, lower --train-batch or --seq-len, "
                            "or raise the budget")
    bits = budget_obj.total_bits(params, fixed)
    resolved = ResolvedBudget(budget_obj, bits, params, unplanned, fixed, 0, train)
    return replace(resolved, min_bits=check_budget_feasible(grid, matrices, bits, resolved.describe, tie, train))
