"""Apply a plan to a model: every planned nn.Linear becomes a QuantLoRALinear holding real packed low-bit storage.

Quantization runs on the target device one matrix at a time (the fp weight is moved there, decomposed, and only
the packed result and the adapters are kept), so peak device memory stays near the quantized model's size.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quant import SolverSettings, quantize
from quant.layers import QuantLoRALinear, set_backend
from quant.lowrank import balance_factors
from quant.methods import get_method
from quant.weighting import Weighting

from ..devices import dequant_backend_from_env, resolve_device
from ..errors import UserError
from ..model.discover import same_module
from ..model.weights import fingerprint as folder_fingerprint
from ..plan.document import Plan, PlanEntry
from ..profile.grid import GridPoint
from ..profile.objective import plan_objective, plan_rounding

log = logging.getLogger("lqplan")
INITS = ("loftq", "qlora", "qalora")
METHODS = ("lora", "qalora")


def solver_from_key(key) -> SolverSettings:
    """SolverSettings from a plan's method.solver: a SolverSettings.key string ("exact", "rand-o32-p2-s0") or dict."""
    if key is None:
        return SolverSettings()
    if isinstance(key, SolverSettings):
        return key
    if isinstance(key, dict):
        return SolverSettings(**key)
    if key == "exact":
        return SolverSettings(method="exact")
    m = re.fullmatch(r"rand-o(\d+)-p(\d+)-s(\d+)(-fp32)?", str(key))
    if not m:
        raise UserError(f"the plan's solver {key!r} is not understood; re-plan, or pass solver=SolverSettings(...)")
    return SolverSettings("randomized", int(m[1]), int(m[2]), int(m[3]), tf32=m[4] is None)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quant_layers(model: nn.Module) -> dict[str, QuantLoRALinear]:
    """Module name -> quantized layer (QuantLoRALinear, QA-LoRA's QALoRALinear included) of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}


def is_linear(module: nn.Module) -> bool:
    """A layer a plan can quantize: nn.Linear, or transformers' Conv1D (GPT-2), which stores its weight (in, out)."""
    return isinstance(module, (nn.Linear, Conv1D))


def out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), the orientation plans, quantized layers and nn.Linear use."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def resolve_names(model: nn.Module, plan: Plan) -> dict[str, str]:
    """Plan entry name -> module name in `model`. Exact names win; otherwise one module whose name ends with the
    entry's (plan made on the base model, applied to a wrapper) or whose name the entry ends with (the reverse)."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if is_linear(m)]
    mapping = {}
    for entry in plan.matrices:
        name = entry.name
        if name in modules and is_linear(modules[name]):
            found = [name]
        else:
            found = [n for n in linears if same_module(n, name)]
        if not found:
            if name in modules:
                raise UserError(f"planned matrix {name!r} is a {type(modules[name]).__name__}, not torch.nn.Linear "
                                "(already quantized?); apply the plan to a freshly loaded model")
            example = ", ".join(linears[:3]) or "none"
            raise UserError(f"planned matrix {name!r} is not a linear layer of this model (its linear layers look "
                            f"like: {example}); apply the plan to the model it was made for")
        if len(found) > 1:
            raise UserError(f"planned matrix {name!r} matches several layers ({', '.join(found[:4])}); "
                            "use full module names in the plan")
        linear = modules[found[0]]
        if tuple(out_in(linear).shape) != tuple(entry.shape):
            raise UserError(f"planned matrix {name!r} has shape {list(entry.shape)} in the plan but "
                            f"{list(out_in(linear).shape)} in the model; re-plan for this model")
        mapping[name] = found[0]
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise UserError("two plan entries resolve to the same layer; use full module names in the plan")
    return mapping


def check_fingerprint(model: nn.Module, plan: Plan, model_path=None, fingerprint: str | None = None) -> None:
    """The plan must be for this model: compare fingerprints (given, or of `model_path`, or of the folder the
    model was loaded from)."""
    if fingerprint is None:
        folder = model_path
        if folder is None:
            guess = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
            folder = guess if guess and (Path(guess) / "config.json").is_file() else None
        if folder is None:
            raise UserError("cannot tell which model folder this model came from; pass model_path=<hf folder> or "
                            "fingerprint=planner.model.weights.fingerprint(folder) to apply_plan")
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"model_path {folder} is not a Hugging Face model folder (no config.json); "
                            "pass the folder the plan was made from")
        fingerprint = folder_fingerprint(folder)
    plan.check_model(fingerprint)


def freeze_base(model: nn.Module) -> None:
    """Only LoRA adapters train: everything else (embeddings, norms, unplanned layers) is frozen."""
    layers = quant_layers(model)
    adapter_ids = set()
    for layer in layers.values():
        for p in layer.parameters():
            if p is not getattr(layer, "bias", None):
                adapter_ids.add(id(p))
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def explicit_plan(model: nn.Module, choose, *, model_path=None, fingerprint: str | None = None, names=None,
                  iters: int = 5, name: str | None = None) -> Plan:
    """A plan with configurations chosen by hand instead of by the ILP: a uniform baseline (choose = one GridPoint,
    e.g. QLoRA's NF4 b64 dq rank 64) or any rule (choose(index, name, shape) -> GridPoint). `names`: the module
    names to plan (default: every nn.Linear except an output head named lm_head). Errors are not profiled (0)."""

    if fingerprint is None:
        if model_path is None:
            raise UserError("explicit_plan needs model_path=<hf folder> or fingerprint=... to tie the plan to "
                            "the model")
        fingerprint = folder_fingerprint(model_path)
    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    if names is None:
        names = [n for n in linears if n.rpartition(".")[2] != "lm_head"]
    entries = []
    for i, n in enumerate(names):
        if n not in linears:
            raise UserError(f"{n!r} is not a linear layer of this model; pass names of nn.Linear modules")
        shape = tuple(out_in(linears[n]).shape)
        point = choose if isinstance(choose, GridPoint) else choose(i, n, shape)
        entries.append(PlanEntry.of(n, shape, point, 0.0))
    labels = sorted({e.point.label for e in entries})
    return Plan.from_entries({"name": name or type(model).__name__, "source": str(model_path or ""),
                              "fingerprint": fingerprint, "architecture": type(model).__name__},
                             {"spec": "explicit", "kind": "explicit", "value": None,
                              "bits": sum(e.bytes for e in entries) * 8},
                             entries, method={"iters": iters, "explicit": labels})


def _entry_methods(plan: Plan, method: str | None) -> dict[str, str]:
    """Plan entry name -> the method its layer is built with: the entry's own, or `method` for every entry."""
    if method is None:
        return {e.name: e.point.method for e in plan.matrices}
    if method not in METHODS:
        raise UserError(f"method={method!r} is not supported; use one of {METHODS} or None (each entry's own)")
    if method == "lora":
        mixed = [e.name for e in plan.matrices if e.point.method != "lora"]
        if mixed:
            raise UserError(f"the plan has {len(mixed)} QA-LoRA entries (e.g. {mixed[0]}); method='lora' cannot "
                            "build them: pass method=None to follow the plan, or re-plan with --method lora")
    else:  # every entry must make a QA-LoRA layer, checked before the first layer of the model is replaced

        for e in plan.matrices:
            point = GridPoint(e.point.config, e.point.rank, "qalora")  # UserError for a config QA-LoRA cannot use
            if not point.applies_to(e.shape):
                raise UserError(f"{e.name} ({e.shape[0]}x{e.shape[1]}, {e.point.label}) cannot be a QA-LoRA layer: "
                                f"its input width must be a multiple of the group {e.point.config.blocksize} and the "
                                "rank at most min(out, in/group); pass method=None or re-plan with --method qalora")
    return {e.name: method for e in plan.matrices}


def build_layer(entry, method: str, w: torch.Tensor, bias, init: str, iters: int, weights, alpha, dropout: float,
                 solver: SolverSettings, adapter_dtype: torch.dtype, rounding: str = "nearest") -> QuantLoRALinear:
    """The quantized layer of one plan entry from its fp32 weight `w` (on the target device)."""
    rank, config, kind = entry.point.rank, entry.point.config, get_method(method)
    zero_init = init == "qlora" or rank == 0 or iters == 0  # LoftQ with 0 steps is QLoRA's initialisation
    try:
        if zero_init:
            return kind.layer(quantize(w, config), bias, rank=rank, alpha=alpha, dropout=dropout,
                              adapter_dtype=adapter_dtype)
        q, a, b = kind.decompose(w, config, rank, iters, fisher=weights, solver=solver, rounding=rounding)
        if weights is not None and kind.balance_weighted:
            a, b = balance_factors(a, b)  # the product is kept exactly
        return kind.layer(q, bias, a, b, alpha=alpha, dropout=dropout, adapter_dtype=adapter_dtype)
    except ValueError as e:
        raise UserError(f"cannot build a {kind.title} layer for {entry.name}: {e}") from None


@dataclass(frozen=True)
class LayerRecipe:
    """How each plan entry's layer is built, settled once: its method, the initialisation, LoftQ's iterations and
    solver, and the weights of the plan's objective for the weighted decomposition: name -> (rows, cols) for LQ-LoRA's
    Fisher, or the output statistics (planner.profile.output_stats.OutputStats, name -> quant.weighting.Weighting)
    for the output-aware objective (CLoQ's calibrated adapters, alternated with Q as LoftQ does)."""
    methods: dict
    init: str
    iters: int
    solver: SolverSettings
    fisher: dict | None = None
    rounding: str = "nearest"  # the output objective's quantizer step (quant.decompose), as the plan was profiled

    @classmethod
    def of(cls, plan: Plan, init: str = "loftq", method: str | None = None, iters: int | None = None,
           solver: SolverSettings | None = None, fisher: dict | None = None) -> "LayerRecipe":
        if init not in INITS:
            raise UserError(f"init={init!r} is not supported; use one of {INITS}")
        if init == "qalora":
            if method not in (None, "qalora"):
                raise UserError(f"init='qalora' with method={method!r} contradict each other; pass method='qalora', "
                                "init='loftq'")
            method, init = "qalora", "loftq"
        if fisher is None and plan_objective(plan.method) != "data-free" and init == "loftq":
            log.warning("the plan was made with the %s objective; pass fisher=... (planner.profile.objective."
                        "plan_weights) to decompose the same way", plan_objective(plan.method))
        if fisher is not None:
            missing = [e.name for e in plan.matrices if e.name not in fisher]
            if missing:
                raise UserError(f"fisher weights lack {len(missing)} planned matrices (e.g. {missing[0]}); compute "
                                "them for this plan's model or pass fisher=None")
        return cls(_entry_methods(plan, method), init, int(plan.method.get("iters", 5) if iters is None else iters),
                   solver or solver_from_key(plan.method.get("solver")), fisher,
                   plan_rounding(plan.method) if fisher is not None else "nearest")

    def layer(self, entry, w: torch.Tensor, bias, alpha, dropout: float, adapter_dtype: torch.dtype):
        weights = None if self.fisher is None else self.fisher.get(entry.name)
        if weights is not None:
            weights = weights.to(w.device) if isinstance(weights, Weighting) else tuple(t.to(w.device) for t in weights)
        return build_layer(entry, self.methods[entry.name], w, bias, self.init, self.iters, weights, alpha, dropout,
                           self.solver, adapter_dtype, self.rounding)

    def progress(self, entries):
        from tqdm.auto import tqdm

        kinds = "+".join(sorted(set(self.methods.values())))
        return tqdm(entries, desc=f"quantize ({kinds}, {self.init})", unit="matrix", dynamic_ncols=True)


def apply_plan(model: nn.Module, plan: Plan, *, model_path=None, fingerprint: str | None = None, device=None,
               init: str = "loftq", iters: int | None = None, fisher: dict | None = None, alpha: float | None = None,
               dropout: float = 0.0, solver: SolverSettings | None = None,
               adapter_dtype: torch.dtype = torch.float32, progress: bool = True,
               method: str | None = None) -> nn.Module:
    """Replace each planned nn.Linear of `model` (in place; the model is also returned) by a quantized-LoRA layer.

    Each entry's layer follows the entry's method (plan.json "method"; a plan may mix both):
      "lora"   -> QuantLoRALinear (full-width adapter);
      "qalora" -> quant.qalora.QALoRALinear (asymmetric INT-k in groups of g, adapter on the group-pooled input,
                  merge() folds it into the zero-points).
    method="lora" | "qalora" forces one method for every entry instead (QA-LoRA needs asymmetric INT configs, and
    forcing it on LoRA entries holds fewer adapter bytes than the plan counts); None (default) follows the plan.

    init="loftq": LoftQ / LQ-LoRA. quant.decompose(W, entry config, entry rank, iters) (QA-LoRA entries:
        quant.qalora.qalora_decompose) with `iters` from the plan's method (default 5) and optional weights of the
        plan's objective, `fisher[name]` = (rows, cols) for Fisher plans, or the output statistics of an output-aware
        plan (planner.profile.objective.plan_weights gives either); the adapters start at the decomposition, so the
        layer's weight Q + adapter approximates W.
    init="qlora" (or "loftq" with iters=0): Q = q(W) and PEFT's zero-product adapter (lora_A Kaiming-uniform,
        lora_B zero; two zero factors would never receive a gradient).
    init="qalora": the older spelling of method="qalora" with init="loftq".
    alpha: LoRA alpha per layer (scaling = alpha / rank); None means alpha = rank (scaling 1, exact split).
    Adapters are kept in `adapter_dtype` (fp32 for training); the plan counts them at 16 bits, see
    quantized_bytes(). The plan's fingerprint must match the model (model_path / fingerprint / model.name_or_path).
    Quantization runs on `device` (default: CUDA when available), one matrix at a time; the model ends there.
    """
    if not isinstance(plan, Plan):
        raise UserError(f"apply_plan needs a planner.plan.Plan, got {type(plan).__name__}; load one with Plan.load")
    r = LayerRecipe.of(plan, init, method, iters, solver, fisher)
    backend = dequant_backend_from_env()
    check_fingerprint(model, plan, model_path, fingerprint)
    dev = resolve_device(device)
    mapping = resolve_names(model, plan)
    entries = r.progress(plan.matrices) if progress else plan.matrices
    model.requires_grad_(False)
    for entry in entries:
        name = mapping[entry.name]
        linear = model.get_submodule(name)
        with torch.no_grad():
            w = out_in(linear).detach().to(dev, torch.float32)
            bias = None if linear.bias is None else linear.bias.detach().to(dev)
            layer = r.layer(entry, w, bias, alpha, dropout, adapter_dtype)
            del w
        set_module(model, name, layer)
        del linear
    set_backend(model, backend)
    model.to(dev)
    freeze_base(model)
    log.info("applied plan: %d matrices quantized (%s) on %s", len(mapping), r.init, dev)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the planned matrices as the plan counts them: the quantized layers' packed buffers (codes, scales,
    zero-points, second-level scales and offset) plus their adapters at 16 bits per value (QA-LoRA layers: the
    pooled r x in/g lora_A). Adapters trained in fp32 actually hold twice that; memory_report() gives both."""
    return sum(layer.quant_nbytes + layer.adapter_nbytes16 for layer in quant_layers(model).values())


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the model, split: packed quantized weights, adapters (16-bit accounting and as held),
    everything else (unplanned weights, biases of quantized layers, buffers)."""
    quant = adapters16 = adapters_held = 0
    counted = set()
    for layer in quant_layers(model).values():
        quant += layer.quant_nbytes
        adapters16 += layer.adapter_nbytes16
        adapters_held += layer.adapter_nbytes
        counted.update(id(getattr(layer, "q_" + f)) for f in ("codes", "scales", "zeros", "scale_codes",
                                                               "scale_scales", "scale_offset"))
        counted.update(id(p) for n, p in layer.named_parameters() if n.startswith("lora_"))
    other = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                       list(model.parameters()) + list(model.buffers())}.values()
                if id(t) not in counted)
    return {"quantized_bytes": quant, "adapter_bytes_16bit": adapters16, "adapter_bytes_held": adapters_held,
            "plan_accounted_bytes": quant + adapters16, "other_bytes": other}
