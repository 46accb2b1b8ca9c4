"""The plan document: versioned JSON (schema lqplan.plan/1) that training scripts and other tools read.

Layout:
  schema, created_by, model {name, source, fingerprint, architecture}, budget {spec, kind, value, bits},
  method {iters, solver, fisher, tie (only when tied), tie_cost}, solver {solver, status, gap, objective, bound} (no timings: same inputs, same bytes),
  totals {params, bits, bits_per_param, bytes, model_bytes, error},
  matrices [{name, shape, kind, bits, blocksize, double_quant, dq_bits, dq_blocksize, dq_dtype, scale_dtype,
             asymmetric, rank, method, error, bytes}]
`bytes` of a matrix is its exact quantized storage plus 16-bit adapters (GridPoint.bits / 8). An entry's method is
"lora" (a full-width adapter) or "qalora" (QA-LoRA's group-pooled adapter); plans written before QA-LoRA existed
have no method key and read as "lora". A plan with method.tie (fused groups, planner.plan.tie) is refused unless every
group's members share one configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from quant import QuantConfig

from ..errors import UserError
from ..fsio import read_json, write_json
from ..schema import BOOL, INT, NUM, STR, any_of, list_of, map_of, one_of, optional, problem, show
from ..profile.grid import GridPoint
from ..model.fused import parse_tie, tie_groups

SCHEMA = "lqplan.plan/1"

# Every field a reader of plan.json uses (report, memory, train, evaluate, export, the HF quantizer), with its type;
# the matrix entries' numbers are checked by PlanEntry.from_dict. Other fields are kept as they are.
_TRAIN = {"batch": INT, "seq_len": INT, "gradient_checkpointing": BOOL, "optimizer": STR, "adapter_dtype": STR,
          "fixed_bytes?": INT, "predicted_peak_bytes?": INT, "terms?": map_of(NUM), "phases?": map_of(NUM)}
_COMPARISON = {"objective?": one_of("output"), "fisher_plan_weighted_error?": NUM, "plain_plan_weighted_error?": NUM,
               "fisher_plan_unweighted_error?": NUM, "plain_plan_unweighted_error?": NUM,
               "plain_plan_bits_per_param?": NUM, "changed_matrices?": INT, "matrices?": INT}
_CALIB = {"source": STR, "key": STR, "tokens": INT, "tokenizer?": STR, "comparison?": _COMPARISON}
_TIE_COST = {"tied_error": NUM, "untied_error": NUM, "tied_bits": INT, "untied_bits": INT,
             "tied_bits_per_param?": NUM, "untied_bits_per_param?": NUM, "relative_error_increase?": NUM,
             "untied_status?": optional(STR), "groups?": INT, "tied_matrices?": INT, "changed_matrices?": INT}
PLAN_SPEC = {
    "schema": STR, "created_by?": STR,
    "model": {"name?": STR, "source?": optional(STR), "fingerprint?": STR, "architecture?": STR,
              "weights?": optional(STR)},
    "budget": {"spec?": STR, "kind?": STR, "value?": optional(NUM), "bits?": INT, "train?": _TRAIN},
    "method?": {"iters?": INT, "solver?": STR, "grid?": list_of(STR), "explicit?": list_of(STR),
                # the calibration record, or (plans written by the benches) the calibration source's name
                "fisher?": optional(any_of(STR, _CALIB)),
                "objective?": one_of("data-free", "fisher", "output"),
                "output?": optional({**_CALIB, "damping": NUM, "rounding?": one_of("nearest", "gptq")}),
                "tie?": list_of(STR), "tie_cost?": optional(_TIE_COST)},
    "solver?": {"solver?": STR, "name?": STR, "status?": STR, "proof?": optional(STR), "objective?": optional(NUM),
                "bound?": optional(NUM), "gap?": optional(NUM), "seconds?": NUM, "mip_rel_tol?": NUM},
    "totals": {"params?": INT, "bits?": INT, "bits_per_param?": NUM, "bytes?": INT, "model_bytes?": INT,
               "unplanned_bytes?": INT, "error?": NUM, "budget_bits?": INT},
    "matrices": list_of({"name": STR, "kind?": STR, "double_quant?": BOOL, "asymmetric?": BOOL, "dq_dtype?": STR,
                         "scale_dtype?": STR, "method?": STR}),
}
PLAN_FIX = "re-create it with `lqplan plan`"


# Wall-clock figures differ run to run; plan.json leaves them out so the same inputs give the same bytes
# (the in-memory plan keeps them for the report).
VOLATILE_SOLVER_KEYS = ("seconds",)


@dataclass
class PlanEntry:
    name: str
    shape: tuple[int, int]
    point: GridPoint
    error: float
    bytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), **self.point.config.to_dict(),
                "rank": self.point.rank, "method": self.point.method, "error": self.error, "bytes": self.bytes}

    @classmethod
    def of(cls, name: str, shape, point: GridPoint, error: float) -> "PlanEntry":
        """An entry whose bytes are its configuration's exact cost (the only value a valid plan accepts)."""
        shape = (int(shape[0]), int(shape[1]))
        return cls(name, shape, point, float(error), point.bits(shape) // 8)

    @classmethod
    def from_dict(cls, d: dict) -> "PlanEntry":
        """An entry as plan.json stores it, every field checked: integers are JSON integers (3.0 is not a bit
        width: it would become the label nf3.0), the rank fits the shape, the error is finite and >= 0."""
        name = d["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"matrix name {name!r} is not a non-empty string")
        for key in _INT_KEYS:
            if key in d and not _is_int(d[key]):
                raise ValueError(f"matrix {name!r}: {key}={d[key]!r} is not an integer")
        cfg = QuantConfig.from_record(d)
        if not _is_int(d["rank"]) or d["rank"] < 0:
            raise ValueError(f"matrix {name!r}: rank={d['rank']!r} is not an integer >= 0")
        method = d.get("method", "lora")
        if not isinstance(method, str):
            raise ValueError(f"matrix {name!r}: method={method!r} is not a string")
        point = GridPoint(cfg, d["rank"], method)
        shape = d["shape"]
        if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(x) and x > 0 for x in shape):
            raise ValueError(f"matrix {name!r} has shape {shape!r}; a planned matrix is [out, in] with both > 0")
        shape = (shape[0], shape[1])
        if point.rank > min(shape) or not point.applies_to(shape):
            raise ValueError(f"matrix {name!r}: rank {point.rank} ({point.method}) does not fit its shape "
                             f"{list(shape)} (at most min(out, in) for LoRA, min(out, in/g) for QA-LoRA)")
        error = d["error"]
        if isinstance(error, bool) or not isinstance(error, (int, float)) or not math.isfinite(error) or error < 0:
            raise ValueError(f"matrix {name!r}: error={error!r} is not a finite number >= 0")
        if not _is_int(d["bytes"]):
            raise ValueError(f"matrix {name!r}: bytes={d['bytes']!r} is not an integer")
        return cls(name, shape, point, float(error), d["bytes"])


_INT_KEYS = ("bits", "blocksize", "dq_bits", "dq_blocksize")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Plan:
    model: dict
    budget: dict
    matrices: list[PlanEntry]
    totals: dict
    solver: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    created_by: str = "lqplan"

    @classmethod
    def from_entries(cls, model: dict, budget: dict, entries: list[PlanEntry], *, unplanned_bytes: int | None = None,
                     budget_bits: int | None = None, solver: dict | None = None, method: dict | None = None,
                     created_by: str = "lqplan") -> "Plan":
        """The one way a plan is built: totals are computed from the entries (never passed in), so they add up.
        `unplanned_bytes` (every tensor the plan does not cover) adds model_bytes; `budget_bits` is recorded."""
        params = sum(e.shape[0] * e.shape[1] for e in entries)
        total = sum(e.bytes for e in entries)
        totals = {"params": params, "bits": total * 8, "bits_per_param": total * 8 / params if params else 0.0,
                  "bytes": total}
        if unplanned_bytes is not None:
            totals.update(model_bytes=total + unplanned_bytes, unplanned_bytes=unplanned_bytes)
        totals["error"] = sum(e.error for e in entries)
        if budget_bits is not None:
            totals["budget_bits"] = budget_bits
        return cls(model=model, budget=budget, matrices=list(entries), totals=totals, solver=dict(solver or {}),
                   method=dict(method or {}), created_by=created_by)

    # ---- lookups ---------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.model.get("fingerprint", "")

    def by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.matrices}

    def check_model(self, fingerprint: str) -> None:
        """Raise if this plan was made for another model."""
        if fingerprint != self.fingerprint:
            raise UserError(f"the plan was made for model {self.model.get('name')!r} (fingerprint "
                            f"{self.fingerprint[:16]}…), not this one ({fingerprint[:16]}…); re-plan for this model")

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created_by": self.created_by, "model": self.model, "budget": self.budget,
                "method": self.method,
                "solver": {k: v for k, v in self.solver.items() if k not in VOLATILE_SOLVER_KEYS},
                "totals": self.totals,
                "matrices": [e.to_dict() for e in self.matrices]}

    def save(self, path) -> None:
        self.validate()
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d) -> "Plan":
        if not isinstance(d, dict):
            raise UserError("the plan is not a JSON object; pass a plan.json written by `lqplan plan`")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise UserError(f"plan schema {show(schema)} is not supported (this lqplan reads {SCHEMA!r}); "
                            "re-plan with this version")
        found = problem(d, PLAN_SPEC)
        if found:
            raise UserError(f"the plan is malformed: {found}; {PLAN_FIX}")
        try:
            if not isinstance(d["matrices"], list) or not d["matrices"]:
                raise ValueError("it lists no matrices")
            stored = dict(d["totals"])
            plan = cls(model=dict(d["model"]), budget=dict(d["budget"]),
                       matrices=[PlanEntry.from_dict(m) for m in d["matrices"]], totals=stored,
                       solver=dict(d.get("solver", {})), method=dict(d.get("method", {})),
                       created_by=str(d.get("created_by", "lqplan")))
            plan.validate()  # inside the try: a wrong type in a checked field is malformed input, not a crash
            plan.totals = _recomputed_totals(plan, stored)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UserError(f"the plan is malformed ({type(e).__name__}: {e}); re-create it with `lqplan plan`") from None
        return plan

    @classmethod
    def load(cls, path) -> "Plan":
        """plan.json from a regular file within the document cap and nesting bound (planner.fsio.read_json)."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise UserError(f"plan file {path} does not exist; create one with `lqplan plan`")
        return cls.from_dict(read_json(path, "pass a plan.json written by `lqplan plan`, or re-create it", "plan file"))

    def validate(self) -> None:
        """Check internal consistency: unique names, bytes equal to the configs' exact cost, totals add up."""
        names = [e.name for e in self.matrices]
        if len(set(names)) != len(names):
            raise UserError("the plan lists a matrix twice; re-create it with `lqplan plan`")
        for e in self.matrices:
            expect = e.point.bits(e.shape) // 8
            if e.bytes != expect:
                raise UserError(f"plan entry {e.name}: bytes={e.bytes} but its configuration costs {expect}; "
                                "the plan was edited or is corrupt; re-create it")
        total = sum(e.bytes for e in self.matrices)
        for key, value in (("bytes", total), ("bits", 8 * total),
                           ("params", sum(e.shape[0] * e.shape[1] for e in self.matrices))):
            if key in self.totals and self.totals[key] != value:
                raise UserError(f"plan totals.{key}={self.totals[key]!r} but the matrices add up to {value}; "
                                "re-create the plan")
        fp = self.model.get("fingerprint", "")
        if not isinstance(fp, str):
            raise UserError(f"plan model.fingerprint {fp!r} is not a string; re-create the plan")
        for where, key in ((self.totals, "unplanned_bytes"), (self.totals, "budget_bits"), (self.budget, "bits")):
            if key in where and not (_is_int(where[key]) and where[key] >= 0):
                raise UserError(f"plan {key}={where[key]!r} is not an integer >= 0; re-create the plan")
        self._check_tie()

    def _check_tie(self) -> None:
        """With method.tie recorded, the members of every tied group share one configuration."""
        if "tie" not in self.method:
            return
        tie = self.method["tie"]
        if not isinstance(tie, list):
            raise UserError(f"plan method.tie {tie!r} is not a list of group names; re-create the plan")
        by = self.by_name()
        for g in tie_groups(by, parse_tie(tie, "plan method.tie")):
            labels = [by[m].point.label for m in g.members]
            if any(by[m].point != by[g.members[0]].point for m in g.members):
                pairs = ", ".join(f"{m} {label}" for m, label in zip(g.members, labels))
                raise UserError(f"the plan ties {g.name} but the members of {g.item} differ ({pairs}); the plan was "
                                "edited or is corrupt; re-create it with `lqplan plan --tie`")


def _recomputed_totals(plan: Plan, stored: dict) -> dict:
    """The totals a reader shows: recomputed from the entries (as Plan.from_entries computes them), with only
    what the entries cannot tell (the unplanned bytes, the budget) taken from the document."""
    unplanned, budget_bits = stored.get("unplanned_bytes"), stored.get("budget_bits")
    return Plan.from_entries(plan.model, plan.budget, plan.matrices, unplanned_bytes=unplanned,
                             budget_bits=budget_bits).totals
