"""LqplanConfig: an lqplan plan as a transformers quantization_config (quant_method "lqplan").

The config carries the whole plan document, so a config.json saved with a quantized model says, by itself, how
every planned matrix is stored; it is validated once, when built (a bad plan is a one-line UserError). Pass it as
`from_pretrained(folder, quantization_config=LqplanConfig(plan="plan.json"))`; planner.hf.quantizer registers it
with transformers."""

from __future__ import annotations

import os
from pathlib import Path

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import UserError
from ..plan.document import Plan

QUANT_METHOD = "lqplan"
INITS = ("loftq", "qlora")


def _as_plan(plan) -> Plan:
    if isinstance(plan, Plan):
        # through its document: checked as a read plan is, and the config keeps its own copy
        return Plan.from_dict(plan.to_dict())
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(Path(plan))
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    raise UserError(f"LqplanConfig(plan=...) got a {type(plan).__name__}; pass a planner.plan.Plan, the path of a "
                    "plan.json or its dict")


def _check_names(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"modules_to_not_convert={value!r} is not a list of module names; pass e.g. "
                        "['model.layers.0.mlp.down_proj']")
    return list(value)


class LqplanConfig(QuantizationConfigMixin):
    """How from_pretrained quantizes a model with an lqplan plan.

    plan: a planner.plan.Plan, a plan.json path, or the plan's dict (what to_dict() stores).
    init: "loftq" (default): each planned weight is decomposed W ≈ Q + A·Bᵀ as apply_plan does, Q is the stored
        base and the factors are left on the module as `lqplan_init` for LoRA adapters to start from;
        "qlora": Q = q(W), no factors (adapters start at zero product).
    iters: LoftQ's alternating steps (None: the plan's method.iters, as apply_plan).
    modules_to_not_convert: planned modules to keep in full precision, each named by whole dotted parts of its
        name ("model.layers.0.mlp.down_proj", "down_proj", "layers.0")."""

    def __init__(self, plan, init: str = "loftq", iters: int | None = None,
                 modules_to_not_convert: list[str] | None = None, quant_method: str = QUANT_METHOD, **unknown):
        if quant_method != QUANT_METHOD:
            raise UserError(f"LqplanConfig got quant_method={quant_method!r}; it is {QUANT_METHOD!r} or left out")
        if unknown:
            raise UserError(f"LqplanConfig got unknown options {sorted(unknown)}; it takes plan, init, iters, "
                            "modules_to_not_convert")
        if init not in INITS:
            raise UserError(f"LqplanConfig(init={init!r}) is not supported; use one of {INITS}")
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
            raise UserError(f"LqplanConfig(iters={iters!r}) is not an integer >= 0; pass e.g. iters=5, or None for "
                            "the plan's")
        self.quant_method = QUANT_METHOD
        self.plan = _as_plan(plan)
        self.init = init
        self.iters = iters
        self.modules_to_not_convert = _check_names(modules_to_not_convert)

    def to_dict(self) -> dict:
        """JSON-ready: the plan as its plan.json document, so a saved config.json is self-contained."""
        return {"quant_method": self.quant_method, "plan": self.plan.to_dict(), "init": self.init,
                "iters": self.iters, "modules_to_not_convert": list(self.modules_to_not_convert)}

    def __iter__(self):
        # dict(config) must give what to_dict gives (the mixin's would yield the Plan object itself)
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return isinstance(other, LqplanConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self) -> str:  # the mixin's prints the whole plan
        return (f"LqplanConfig(plan={self.plan.model.get('name')!r} with {len(self.plan.matrices)} matrices, "
                f"init={self.init!r}, iters={self.iters!r}, modules_to_not_convert={self.modules_to_not_convert!r})")

    def skips(self, module_name: str) -> bool:
        """Whether modules_to_not_convert keeps `module_name` in full precision."""
        return any(matches(m, module_name) for m in self.modules_to_not_convert)


def matches(pattern: str, module_name: str) -> bool:
    """A modules_to_not_convert entry names a module by whole dotted parts: "lm_head", "layers.0", "mlp.down_proj"."""
    return f".{pattern}." in f".{module_name}."
