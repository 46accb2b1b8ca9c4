"""The plan document: versioned JSON (schema lqplan.plan/1) that training scripts and other tools read.

Layout:
  schema, created_by, model {name, source, fingerprint, architecture}, budget {spec, kind, value, bits},
  method {iters, solver, fisher}, solver {solver, status, gap, objective, bound} (no timings: same inputs, same bytes),
  totals {params, bits, bits_per_param, bytes, model_bytes, error},
  matrices [{name, shape, kind, bits, blocksize, double_quant, dq_bits, dq_blocksize, dq_dtype, scale_dtype,
             asymmetric, rank, method, error, bytes}]
`bytes` of a matrix is its exact quantized storage plus 16-bit adapters (GridPoint.bits / 8). An entry's method is
"lora" (a full-width adapter) or "qalora" (QA-LoRA's group-pooled adapter); plans written before QA-LoRA existed
have no method key and read as "lora".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from quant import QuantConfig

from ..errors import UserError
from ..fsio import write_json
from ..profile.grid import GridPoint

SCHEMA = "lqplan.plan/1"


# Wall-clock figures differ run to run; plan.json leaves them out so the same inputs give the same bytes
# (the in-memory plan keeps them for the report).
VOLATILE_SOLVER_KEYS = ("seconds",)


_CONFIG_KEYS = ("kind", "bits", "blocksize", "double_quant", "dq_bits", "dq_blocksize", "dq_dtype", "scale_dtype",
                "asymmetric")


@dataclass
class PlanEntry:
    name: str
    shape: tuple[int, int]
    point: GridPoint
    error: float
    bytes: int

    def to_dict(self) -> dict:
        cfg = self.point.config.to_dict()
        return {"name": self.name, "shape": list(self.shape), **{k: cfg[k] for k in _CONFIG_KEYS},
                "rank": self.point.rank, "method": self.point.method, "error": self.error, "bytes": self.bytes}

    @classmethod
    def of(cls, name: str, shape, point: GridPoint, error: float) -> "PlanEntry":
        """An entry whose bytes are its configuration's exact cost (the only value a valid plan accepts)."""
        shape = (int(shape[0]), int(shape[1]))
        return cls(name, shape, point, float(error), point.bits(shape) // 8)

    @classmethod
    def from_dict(cls, d: dict) -> "PlanEntry":
        cfg = QuantConfig.from_dict({k: d[k] for k in _CONFIG_KEYS if k in d})
        point = GridPoint(cfg, int(d["rank"]), str(d.get("method", "lora")))
        shape = tuple(int(x) for x in d["shape"])
        if len(shape) != 2:
            raise ValueError(f"matrix {d['name']!r} has shape {list(shape)}; a planned matrix is 2-D")
        return cls(str(d["name"]), shape, point, float(d["error"]), int(d["bytes"]))


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
            raise UserError(f"plan schema {schema!r} is not supported (this lqplan reads {SCHEMA!r}); "
                            "re-plan with this version")
        try:
            plan = cls(model=dict(d["model"]), budget=dict(d["budget"]),
                       matrices=[PlanEntry.from_dict(m) for m in d["matrices"]], totals=dict(d["totals"]),
                       solver=dict(d.get("solver", {})), method=dict(d.get("method", {})),
                       created_by=str(d.get("created_by", "lqplan")))
            plan.validate()  # inside the try: a wrong type in a checked field is malformed input, not a crash
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UserError(f"the plan is malformed ({type(e).__name__}: {e}); re-create it with `lqplan plan`") from None
        return plan

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"plan file {path} does not exist; create one with `lqplan plan`") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read plan file {path}: {e}; pass a plan.json written by `lqplan plan`") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "re-create it with `lqplan plan`") from None
        except RecursionError:
            raise UserError(f"plan file {path} nests too deeply to be a plan; re-create it with `lqplan plan`") from None
        return cls.from_dict(data)

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
        if "bytes" in self.totals and int(self.totals["bytes"]) != total:
            raise UserError(f"plan totals.bytes={self.totals['bytes']} but the matrices add up to {total}; "
                            "re-create the plan")
