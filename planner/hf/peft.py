"""PEFT LoRA over the lqplan-quantized base: adapters are standard PEFT LoRA (save_pretrained / from_pretrained,
multiple adapters, dropout, disable_adapters, merge) while every planned matrix stays packed.

The base is a model whose planned layers are packed layers without an adapter ("lqplan base layers": PackedLinear,
or a rank-0 QuantLoRALinear, which computes the same), each optionally carrying `lqplan_init = (lora_A, lora_B,
scaling)`, its LoftQ factors. A model quantized through transformers (LqplanConfig) has that form; split_adapters()
makes it from apply_plan's output, putting each layer's PackedLinear (its packed buffers, shared) in its place.
LqplanLoraLinear is the PEFT layer for such a base: PEFT's `base_layer` is the packed layer, whose forward is its
own (packed weight, dequantized on the fly in forward and again in backward), plus PEFT's LoRA branch. It is
registered through LoraConfig._register_custom_module, PEFT's public hook for layer types it does not know, so
every config used with an lqplan base must be registered: lqplan_lora_config, get_lqplan_peft_model and
load_lqplan_adapter do it.

QA-LoRA layers are refused: their adapter reads the group-pooled input, which PEFT's LoRA cannot express.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from quant.layers import PackedLinear, QuantLoRALinear, packed_layers
from quant.methods import method_of

from ..errors import UserError
from ..model.discover import same_module
from ..plan.document import Plan
from ..train.apply import is_linear, set_module
from .config import LqplanConfig

INITS = ("loftq", "qlora")


def check_lora_method(name: str, layer: PackedLinear) -> None:
    """QA-LoRA's pooled adapter is not a PEFT LoRA: refuse it with the way out."""
    if isinstance(layer, QuantLoRALinear) and method_of(layer).name != "lora":
        raise UserError(f"{name} is a QA-LoRA layer, whose group-pooled adapter PEFT's LoRA cannot express; "
                        "train it with lqplan's own loop (planner.train) or re-plan with --method lora")


class LqplanLoraLinear(PeftLoraLinear):
    """PEFT LoRA on an lqplan base layer (a PackedLinear without adapter): y = base(x) + Σ scaling·B·A·dropout(x)
    over the active adapters. The forward, adapters, dropout, disabling and mixed-adapter batches are PEFT's
    Linear's. PEFT places a new adapter on the device of the base's `weight`, else `qweight`: PackedLinear.qweight
    (a PackedRef).

    A new adapter starts at the base layer's LoftQ factors when its config was registered with loftq=True
    (lqplan_lora_config's default), else PEFT's way. merge() cannot keep the base packed (folding B·A into 2-4-bit
    codes means requantizing, a new error): it makes the base a dense nn.Linear holding dequant(Q) + Σ scaling·B·A in
    `merge_dtype` (the model's float dtype, which register() records; else the bias dtype, else fp32) and keeps the
    packed layer aside, so unmerge() restores it exactly. merge_and_unload() therefore gives plain nn.Linear layers:
    a dense model."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        packed = base_layer
        if isinstance(packed, BaseTunerLayer):
            raise UserError("an lqplan layer takes one PEFT LoRA wrapper, not a stack of PEFT tuners; unload the "
                            "other tuner first")
        check_lora_method(kwargs.get("target_name") or type(packed).__name__, packed)
        if isinstance(packed, QuantLoRALinear) and packed.rank:
            raise UserError(f"{kwargs.get('target_name', 'a layer')} already has an lqplan adapter (rank "
                            f"{packed.rank}); call planner.hf.peft.split_adapters(model) first, or use "
                            "get_lqplan_peft_model, which does")
        if config.lora_bias or config.fan_in_fan_out:
            raise UserError("lqplan layers take LoRA without lora_bias and with fan_in_fan_out=False; drop those "
                            "LoraConfig options")
        self.merge_dtype = getattr(config, "lqplan_dtype", None)
        self._packed = ()  # the packed base while merged: a tuple, so it is not a submodule in the state dict
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup warns on layer types it does not know; the lqplan layer knows its shape
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}  # DoRA and the other variants read a dense base weight

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError:
            raise UserError("lqplan layers take plain LoRA (no DoRA or other LoRA variant: they need a dense base "
                            "weight); drop the variant option from the LoraConfig") from None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if getattr(config, "lqplan_loftq", False) and self.init_from_lqplan(adapter_name):
            self.packed_base().lqplan_init = None  # the adapter holds the factors now: no second copy kept

    def packed_base(self) -> PackedLinear:
        """The packed lqplan layer under this adapter, merged or not."""
        return self._packed[0] if self._packed else self.get_base_layer()

    @torch.no_grad()
    def init_from_lqplan(self, adapter_name: str) -> bool:
        """Start `adapter_name` at the base layer's LoftQ factors (then Q + adapter ≈ W, as in apply_plan's model),
        rescaling B when PEFT's scaling differs from theirs; returns False when the base carries none."""
        init = self.packed_base().lqplan_init
        if init is None or adapter_name not in self.lora_A:
            return False
        a, b, scaling = init
        r = self.r[adapter_name]
        if tuple(a.shape) != (r, self.in_features) or tuple(b.shape) != (self.out_features, r):
            raise UserError(f"the LoftQ factors have rank {a.shape[0]} but the adapter has r={r}; keep the plan's "
                            "ranks (no r / rank_pattern override) or pass init='qlora'")
        for module in (self.lora_A[adapter_name], self.lora_B[adapter_name]):
            if module.weight.dtype != torch.float32:  # PEFT made them in a bf16 base's dtype: keep the factors exact
                module.float()
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        weight_a.copy_(a)
        weight_b.copy_(b.float() * (scaling / self.scaling[adapter_name]))
        return True

    def dense_dtype(self) -> torch.dtype:
        bias = self.packed_base().bias
        return self.merge_dtype or (bias.dtype if bias is not None else torch.float32)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        # Summed in fp32 and rounded once to the dense dtype.
        w = base.dequantize(torch.float32) if not self._packed else base.weight.float()
        for name in names:
            w = w + self.get_delta_weight(name).float()
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
        if self._packed:
            base.weight.copy_(w.to(base.weight.dtype))
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=w.device,
                              dtype=self.dense_dtype())
            dense.weight.copy_(w)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            self._packed = (base,)
            self.base_layer = dense
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            return
        dense = self.get_base_layer()
        self.base_layer = self._packed[0].to(dense.weight.device)  # the packed layer, unchanged: exact
        self._packed = ()
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lqplan." + super().__repr__()


def lqplan_wrappers(model: nn.Module) -> dict[str, LqplanLoraLinear]:
    """Module name -> PEFT LoRA layer over an lqplan base layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LqplanLoraLinear)}


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unplanned weights (what its activations are in): the merged layers' dtype."""
    return next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n),
                torch.float32)


def check_init(init: str) -> None:
    if init not in INITS:
        raise UserError(f"init={init!r} is not supported; use one of {INITS}")


def register(config: LoraConfig, *, loftq: bool = False, dtype: torch.dtype | None = None) -> LoraConfig:
    """`config` with LqplanLoraLinear registered for lqplan base layers (PEFT reads the mapping when it injects).
    loftq: new adapters start at their base layer's LoftQ factors (where it has them). dtype: the merged layers'.
    Both are plain attributes of the config object, like PEFT's own mapping: adapter_config.json does not get them."""
    config._register_custom_module({PackedLinear: LqplanLoraLinear})
    config.lqplan_loftq, config.lqplan_dtype = bool(loftq), dtype
    return config


def base_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Module name -> packed layer of `model` (a PeftModel's base layers included, merged ones too; apply_plan's
    layers with their adapters, which split_adapters separates); QA-LoRA refused."""
    wrappers = lqplan_wrappers(model)
    wrapped = {id(w.get_base_layer()) for w in wrappers.values()}
    found = {n: w.packed_base() for n, w in wrappers.items()}
    found.update({n: m for n, m in packed_layers(model).items() if id(m) not in wrapped})
    if not found:
        raise UserError("the model has no lqplan-quantized layers; quantize it with apply_plan or "
                        "from_pretrained(..., quantization_config=LqplanConfig(plan)) first")
    for name, layer in found.items():
        check_lora_method(name, layer)
    return found


def split_adapters(model: nn.Module) -> nn.Module:
    """Replace each QuantLoRALinear (apply_plan's, load_quantized's, LqplanConfig's rank-0 ones) by its PackedLinear,
    which shares the packed buffers and bias (no copy) and carries the adapter, if any, as lqplan_init (else the
    layer's own lqplan_init); in place, returned."""
    for name, layer in base_layers(model).items():
        if isinstance(layer, QuantLoRALinear):
            base = layer.packed()
            if layer.rank:
                base.lqplan_init = (layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
            else:
                base.lqplan_init = layer.lqplan_init
            set_module(model, name, base)
    return model


def kept_dense(model: nn.Module) -> list[str]:
    """Names of the linears that the LqplanConfig the model was loaded with keeps in full precision
    (modules_to_not_convert); none for a model quantized otherwise."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if not isinstance(config, LqplanConfig) or not config.modules_to_not_convert:
        return []
    return [n for n, m in model.named_modules() if is_linear(m) and config.skips(n)]


def plan_ranks(plan: Plan, names, kept=()) -> dict[str, int]:
    """Module name -> the plan's rank, plan entries matched to `names` as apply_plan matches them; an entry that
    matches none of them but one of `kept` (planned, but loaded in full precision: kept_dense) is left out."""
    if not isinstance(plan, Plan):
        raise UserError(f"plan must be a planner.plan.Plan, got {type(plan).__name__}; load one with Plan.load")

    def matching(e, candidates):
        return [n for n in candidates if same_module(n, e.name)]

    out = {}
    for e in plan.matrices:
        if e.point.method != "lora":
            raise UserError(f"plan entry {e.name} is QA-LoRA, whose group-pooled adapter PEFT's LoRA cannot "
                            "express; train it with lqplan's own loop (planner.train) or re-plan with --method lora")
        found = matching(e, names)
        if not found and len(matching(e, kept)) == 1:
            continue  # a dense nn.Linear: no lqplan layer to put an adapter on
        if len(found) != 1:
            raise UserError(f"plan entry {e.name} matches {len(found)} quantized layers of this model; pass the "
                            "plan the model was quantized with")
        out[found[0]] = e.point.rank
    return out


def lqplan_lora_config(model: nn.Module, plan: Plan | None = None, *, init: str = "loftq", **kw) -> LoraConfig:
    """A registered LoraConfig whose target_modules are the model's quantized layers with a rank, the per-matrix
    ranks (rank_pattern) from `plan`, else from each layer's LoftQ factors or adapter, and alpha_pattern keeping
    each layer's LoftQ scaling (alpha = rank, scaling 1, where there is none). init: see get_lqplan_peft_model;
    plain peft.get_peft_model (or TRL's peft_config=) with this config starts the adapters the same way. Other
    LoraConfig options pass through `kw`; r= or lora_alpha= there sets one value for every layer instead."""
    check_init(init)
    layers = base_layers(model)
    from_plan = plan_ranks(plan, list(layers), kept_dense(model)) if plan is not None else {}
    ranks, alphas = {}, {}
    for name, layer in layers.items():
        init_factors = layer.lqplan_init
        adapter_rank = layer.rank if isinstance(layer, QuantLoRALinear) else 0
        if plan is not None:
            rank = from_plan.get(name)
        else:
            rank = init_factors[0].shape[0] if init_factors else adapter_rank
        if rank:
            ranks[name] = int(rank)
            scaling = init_factors[2] if init_factors else (layer.scaling if adapter_rank else 1.0)
            alphas[name] = float(scaling * rank)
    if plan is not None and not ranks:
        raise UserError("every plan entry has rank 0 (no adapter); re-plan with a budget that leaves adapters")
    targets = sorted(ranks) if ranks else sorted(layers)  # no rank known anywhere: PEFT's r for every layer
    # PEFT matches pattern keys as regular expressions against module paths: escape the dots.
    options = {"target_modules": targets, "lora_dropout": 0.0, "bias": "none",
               "r": Counter(ranks.values()).most_common(1)[0][0] if ranks else 8,
               "lora_alpha": Counter(alphas.values()).most_common(1)[0][0] if alphas else 8,
               "rank_pattern": {} if "r" in kw else {re.escape(n): r for n, r in ranks.items()},
               "alpha_pattern": {} if "lora_alpha" in kw else {re.escape(n): a for n, a in alphas.items()}}
    for key in ("rank_pattern", "alpha_pattern"):
        options[key].update(kw.pop(key, None) or {})
    return register(LoraConfig(**{**options, **kw}), loftq=init == "loftq", dtype=float_dtype(model))


def get_lqplan_peft_model(model: nn.Module, plan: Plan | None = None, *, config: LoraConfig | None = None,
                          adapter_name: str = "default", init: str = "loftq", **kw) -> PeftModel:
    """A PeftModel over the lqplan-quantized `model` (adapters of apply_plan's model are split off first).

    config: a LoraConfig (registered here), default lqplan_lora_config(model, plan, **kw).
    init="loftq": each adapter starts at its layer's LoftQ factors where the layer has them, so the outputs at
    step 0 equal apply_plan's model (up to fp rounding: PEFT adds the branches in another order); elsewhere, and
    with init="qlora", PEFT's default (lora_A Kaiming-uniform, lora_B zero). The factors are dropped from the base
    layers once copied: the adapter holds them now."""
    check_init(init)
    if config is not None and (plan is not None or kw):
        raise UserError("pass either config= or plan / LoraConfig options, not both")
    split_adapters(model)
    if config is None:
        config = lqplan_lora_config(model, plan, init=init, **kw)
    else:
        config = register(config, loftq=init == "loftq", dtype=float_dtype(model))
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_lqplan_adapter(model: nn.Module, adapter_dir, adapter_name: str = "default", is_trainable: bool = False,
                        **kw) -> PeftModel:
    """PeftModel.from_pretrained(model, adapter_dir, ...) over the lqplan-quantized `model`, with the adapter's
    config registered for lqplan layers (a config read from adapter_config.json is not). Nothing is dequantized:
    the base layers stay packed. Adapters already on the model (apply_plan's) are replaced by the loaded one."""
    if Path(adapter_dir).is_dir() and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); write one with "
                        "peft_model.save_pretrained or export_peft")
    if Path(adapter_dir).is_dir() and not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; lqplan loads adapters from safetensors only "
                        "(a pickled .bin can run code): re-save it with safe_serialization=True")
    split_adapters(model)
    for layer in base_layers(model).values():
        layer.lqplan_init = None  # the loaded adapter replaces the LoftQ factors
    config = register(LoraConfig.from_pretrained(str(adapter_dir)), dtype=float_dtype(model))
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kw)
