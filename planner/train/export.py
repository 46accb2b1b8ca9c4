"""Save / load a quantized model, and export it as plain Hugging Face weights or as a PEFT LoRA adapter.

Quantized folder (save_quantized): model.safetensors with every tensor of the model as held — the quantized
layers' packed buffers (uint8), adapters, unplanned weights and buffers — plus config.json, plan.json and
lqplan_manifest.json (which modules are quantized, their configuration, rank and scaling). load_quantized()
rebuilds the architecture from config.json with empty weights and fills it: outputs are bit-identical.

Exports: export_merged() writes dequant(Q) + scaling·lora_B·lora_A as a standard folder for AutoModel;
export_peft() writes a PEFT adapter (per-module ranks via rank_pattern / alpha_pattern) next to the packed base
(the quantized folder without adapters; planner.hf.peft loads the adapter over it), or with dense=True next to a
dequantized base folder so that PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter) reproduces it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quant import QuantConfig
from quant.blockwise import QuantizedTensor
from quant.layers import BUFFER_PREFIX, PackedLinear, QuantLoRALinear, packed_layers
from quant.methods import get_method, method_of
from quant.qalora import QALoRALinear

from .. import __version__
from ..devices import dequant_backend_from_env
from ..errors import UserError
from ..fsio import atomic_path, write_json, write_text
from ..model.config import read_config
from ..model.digests import file_digests
from ..model.hfload import auto_config, meta_skeleton
from ..model.weights import read_header_table
from ..plan.document import Plan
from ..outputs import output_folder
from .apply import freeze_base, quant_layers, set_module

from .manifest import MANIFEST, RESAVE, SCHEMA, WEIGHTS, check_parts, read_manifest

QUANTIZED_FILES = (WEIGHTS, "config.json", "plan.json", MANIFEST)


def _check_layers(model: nn.Module) -> dict[str, QuantLoRALinear]:
    layers = quant_layers(model)
    if not layers:
        raise UserError("the model has no quantized layers; run planner.train.apply_plan(model, plan) first")
    return layers




def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt", **(metadata or {})})
        except SafetensorError as e:  # a full disk surfaces as SafetensorError: let fsio report it as an I/O error
            raise OSError(str(e)) from None


def _all_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer (non-persistent ones too, so the rebuild needs no recomputation), with tensors
    shared under several names stored once: returns (tensors, alias -> stored name)."""
    tensors, aliases, seen = {}, {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, aliases


def _config_json(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise UserError("the model has no Hugging Face config; save/export works on transformers models")
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    return config.to_json_string()


def _layer_manifest(layer: PackedLinear) -> dict:
    """How load_quantized rebuilds the layer. A PackedLinear without adapter (a PEFT base layer) is written as what
    it computes: a rank-0 LoRA layer."""
    adapted = isinstance(layer, QuantLoRALinear)
    rank = layer.rank if adapted else 0
    return {"config": layer.config.to_dict(), "shape": [layer.out_features, layer.in_features],
            "method": method_of(layer).name if adapted else "lora", "rank": rank,
            "alpha": layer.alpha if adapted else 0.0, "dropout": layer.dropout_p if adapted else 0.0,
            "bias": layer.bias is not None,
            "adapter_dtype": None if not rank else str(layer.lora_A.dtype).removeprefix("torch.")}


def save_quantized(model: nn.Module, plan: Plan, out_dir) -> Path:
    """Write the quantized model (packed storage, adapters, everything else) to `out_dir`; returns the folder."""
    layers = packed_layers(model)
    if not layers:
        _check_layers(model)
    out = Path(out_dir)
    tensors, aliases = _all_tensors(model)
    manifest = {
        "schema": SCHEMA, "created_by": f"lqplan {__version__}", "architecture": type(model).__name__,
        "weights": WEIGHTS, "aliases": aliases,
        "layers": {name: _layer_manifest(layer) for name, layer in layers.items()},
    }
    # written aside and swapped in whole: a killed save leaves the previous folder, never new weights beside
    # another plan; the manifest holds every part's digest, so load_quantized refuses a folder mixed any other way
    with output_folder(out, QUANTIZED_FILES) as stage:
        _save_tensors(stage / WEIGHTS, tensors)
        write_text(stage / "config.json", _config_json(model))
        plan.save(stage / "plan.json")
        parts = (WEIGHTS, "config.json", "plan.json")
        manifest["files"] = dict(zip(parts, file_digests([stage / p for p in parts], memo=False)))
        write_json(stage / MANIFEST, manifest)
    return out


def _skeleton(folder: Path, architecture: str) -> nn.Module:
    read_config(folder, RESAVE)
    return meta_skeleton(auto_config(folder), architecture)  # buffers real, overwritten from the file


def load_quantized(folder, device=None) -> tuple[nn.Module, Plan]:
    """Rebuild a model written by save_quantized: (model, plan). Adapters are trainable, the rest frozen."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    plan = Plan.load(folder / "plan.json")
    check_parts(folder, manifest, plan)
    read_header_table(folder / manifest["weights"], RESAVE)  # lqplan checks every header before safetensors reads it
    try:
        tensors = load_file(str(folder / manifest["weights"]), device=str(device or "cpu"))
    except (OSError, SafetensorError, KeyError, TypeError) as e:  # SafetensorError: a truncated or corrupt file
        raise UserError(f"cannot read the weights of {folder} ({type(e).__name__}: {e}); re-save the model with "
                        "`lqplan train` (or save_quantized)") from None
    model = _skeleton(folder, manifest["architecture"])
    backend = dequant_backend_from_env()
    for name, info in manifest["layers"].items():
        prefix = name + "."
        try:
            config = QuantConfig.from_dict(info["config"])
        except (ValueError, TypeError) as e:
            raise UserError(f"{folder}: layer {name}: {e}; {RESAVE}") from None
        fields = {}
        for field in QuantizedTensor.TENSOR_FIELDS:
            raw = tensors.pop(prefix + BUFFER_PREFIX + field, None)
            if raw is not None:
                fields[field] = raw  # raw bytes; QuantLoRALinear stores bytes as they are
        q = QuantizedTensor(config, tuple(info["shape"]), **fields)
        try:
            cls = get_method(info.get("method") or "lora").layer  # folders written before QA-LoRA: lora
        except ValueError as e:
            raise UserError(f"{folder}: layer {name}: {e}; re-save the model with save_quantized") from None
        layer = cls(q, tensors.pop(prefix + "bias", None), rank=info["rank"], alpha=info["alpha"],
                    dropout=info["dropout"], backend=backend)
        # The raw fields went in as uint8 and QuantLoRALinear keeps uint8 views: identical bytes.
        if info["rank"]:
            layer.lora_A = nn.Parameter(tensors.pop(prefix + "lora_A"))
            layer.lora_B = nn.Parameter(tensors.pop(prefix + "lora_B"))
        set_module(model, name, layer)
    for alias, target in manifest["aliases"].items():
        if alias not in tensors and target in tensors:
            tensors[alias] = tensors[target]
    _fill(model, tensors, folder)
    freeze_base(model)
    model.eval()
    return model, plan


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Assign every remaining parameter and buffer from `tensors` (shared names get the same tensor)."""
    done = {}
    slots = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    quant_prefixes = tuple(n + "." for n in quant_layers(model))
    for name, current in slots:
        if name.startswith(quant_prefixes):
            continue
        if name not in tensors:
            if current is not None and current.device.type != "meta":
                continue  # a buffer the skeleton computed and the file lacks (none when saved by save_quantized)
            raise UserError(f"{folder} lacks tensor {name!r}; the folder is incomplete, re-save it")
        value = tensors[name]
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if id(value) in done:
            value = done[id(value)]
        elif attr in module._parameters:
            value = nn.Parameter(value, requires_grad=False)
        done[id(tensors[name])] = value
        if attr in module._parameters:
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise UserError(f"{folder} does not fill {leftover[0]} (and {len(leftover) - 1} more); re-save the model")


def _plain_state(model: nn.Module, merge: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The persistent state dict of the equivalent plain model: quantized layers become `weight` (+ `bias`)."""
    layers = _check_layers(model)
    out = {}
    for name, layer in layers.items():
        w = layer.merged_weight() if merge else layer.dequantize(torch.float32)
        out[f"{name}.weight"] = w.to(dtype)
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().to(dtype)
    quant_prefixes = tuple(n + "." for n in layers)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(quant_prefixes) or t is None:
            continue
        if id(t) in seen:
            continue  # tied weights: transformers re-ties them on load
        seen.add(id(t))
        out[name] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return out


def _write_plain(model: nn.Module, folder: Path, state: dict, dtype: torch.dtype, tokenizer=None) -> Path:
    _save_tensors(folder / WEIGHTS, state)
    write_text(folder / "config.json", _config_json(model, dtype))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def export_merged(model: nn.Module, out_dir, dtype: torch.dtype = torch.float32, tokenizer=None) -> Path:
    """A standard Hugging Face folder whose planned weights are dequant(Q) + scaling·lora_B·lora_A."""
    return _write_plain(model, Path(out_dir), _plain_state(model, True, dtype), dtype, tokenizer)


def _plain_lora_a(layer: QuantLoRALinear) -> torch.Tensor:
    """lora_A as a standard LoRA's (r × in). QA-LoRA's reads the input averaged over groups of g, which is the same
    linear map as its columns repeated g times and divided by g: PEFT has no pooled adapter, so it gets that."""
    a = layer.lora_A.detach()
    if isinstance(layer, QALoRALinear):
        return a.float().repeat_interleave(layer.group_size, dim=1) / layer.group_size
    return a


def _save_packed_base(model: nn.Module, layers: dict, plan: Plan, folder: Path) -> None:
    """save_quantized of the model with every quantized layer swapped for its packed part for the duration (saved as
    a rank-0 LoRA layer, a QA-LoRA one too: without an adapter the two compute the same)."""
    try:
        for name, layer in layers.items():
            set_module(model, name, layer.packed())
        save_quantized(model, plan, folder)
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)


def export_peft(model: nn.Module, out_dir, dtype: torch.dtype = torch.float32, tokenizer=None, *,
                plan: Plan | None = None, dense: bool = False, final_dir=None) -> tuple[Path, Path]:
    """(base_dir, adapter_dir) under out_dir. adapter = a standard PEFT LoRA adapter: target_modules = the quantized
    modules with rank > 0, per-module r / lora_alpha (rank_pattern, alpha_pattern), weights in `dtype`.

    base (default) = the packed quantized folder: save_quantized of the model with the adapters taken out (needs
    the `plan`); nothing is dequantized. planner.hf.peft.load_lqplan_adapter(load_quantized(base)[0], adapter)
    reproduces the model. dense=True: base = dequant(Q) as a standard folder in `dtype` (a full-size copy of every
    planned matrix, what lqplan wrote before) for PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter)
    without lqplan installed. `final_dir`: where out_dir will be once published (the adapter records its base's
    path there), when out_dir is a staging folder."""
    from peft import LoraConfig

    out = Path(out_dir)
    base_dir, adapter_dir = out / "base", out / "adapter"
    layers = _check_layers(model)
    adapted = {n: l for n, l in layers.items() if l.rank}
    if not adapted:
        raise UserError("no quantized layer has an adapter (all ranks are 0); export_merged is all there is to write")
    if dense:
        _write_plain(model, base_dir, _plain_state(model, False, dtype), dtype, tokenizer)
    elif not isinstance(plan, Plan):
        raise UserError("export_peft writes the packed base with its plan: pass plan=<the model's Plan>, or "
                        "dense=True for a dequantized base folder")
    else:
        _save_packed_base(model, layers, plan, base_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(base_dir)
    first = next(iter(adapted.values()))
    # PEFT matches rank/alpha pattern keys as regular expressions: escape the dots of module paths.
    config = LoraConfig(r=first.rank, lora_alpha=first.alpha, lora_dropout=0.0, bias="none",
                        target_modules=sorted(adapted),
                        base_model_name_or_path=str((Path(final_dir or out) / "base").resolve()),
                        rank_pattern={re.escape(n): l.rank for n, l in adapted.items()},
                        alpha_pattern={re.escape(n): l.alpha for n, l in adapted.items()})
    config_dict = config.to_dict()
    for k, v in config_dict.items():
        if isinstance(v, set):
            config_dict[k] = sorted(v)
    weights = {}
    for name, layer in adapted.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = _plain_lora_a(layer).to(dtype)
        weights[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().to(dtype)
    _save_tensors(adapter_dir / "adapter_model.safetensors", weights)
    write_json(adapter_dir / "adapter_config.json", config_dict)
    return base_dir, adapter_dir
