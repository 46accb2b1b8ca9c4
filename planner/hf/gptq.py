"""Whole-model export of a QA-LoRA model, adapters merged, into GPTQ's integer layout, and the reader that rebuilds
a torch model from such a folder (docs/gptq-layout.md).

The folder is a standard Hugging Face one: config.json (the model's config plus a GPTQ `quantization_config`),
model.safetensors (per quantized module `qweight`, `scales`, `g_idx`, `offsets` or `qzeros`, and `bias`; every
other weight as held) and the tokenizer when given. A plan mixes bits and group sizes, so quantization_config has
the most common (bits, group_size) as its default and a gptqmodel-style `dynamic` map ("+:^name$" -> the module's
own bits / group_size, "-:^name$" -> a linear layer left unquantized) plus `modules_in_block_to_quantize` for
optimum, which reads one bits / group_size only. checkpoint_format "lqplan_offsets" is exact; "gptq" (v1) and
"gptq_v2" are what GPTQ loaders read, with integer zeros that round QA-LoRA's merged ones (quant.gptq_pack).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quant.gptq_pack import (
    CHECKPOINT_FORMATS,
    EXACT_FORMAT,
    GPTQLinear,
    dequantize_gptq,
    qalora_to_gptq,
)
from quant.methods import method_of
from quant.qalora import QALoRALinear

from .. import __version__
from ..errors import UserError
from ..fsio import atomic_path, write_json
from ..model.config import read_config
from ..model.hfload import auto_config, meta_skeleton
from ..model.weights import read_header_table
from ..train.apply import is_linear, out_in, quant_layers, set_module

LAYOUT = "lqplan.gptq/1"
WEIGHTS = "model.safetensors"
log = logging.getLogger(__name__)


# ---- export -------------------------------------------------------------------------------------------------
def check_exportable(model: nn.Module) -> dict[str, QALoRALinear]:
    """The model's quantized layers, all QA-LoRA, or one UserError naming the first that is not and the fix."""
    layers = quant_layers(model)
    if not layers:
        raise UserError("the model has no quantized layers; run planner.train.apply_plan(model, plan) with a QA-LoRA "
                        "plan first")
    other = [n for n, layer in layers.items() if not isinstance(layer, QALoRALinear)]
    if other:
        first = layers[other[0]]
        raise UserError(f"{len(other)} of {len(layers)} quantized layers are not QA-LoRA (e.g. {other[0]}: "
                        f"{first.config.label} with a {method_of(first).title} adapter); GPTQ stores integer codes "
                        "with a zero-point per group and only QA-LoRA's adapter merges into those (NF codes are not "
                        "integers): re-plan with --method qalora, or export plain weights with export_merged")
    return layers


def _dynamic_key(name: str, keep: bool) -> str:
    return ("+:^" if keep else "-:^") + re.escape(name) + "$"


def block_list(model: nn.Module, names) -> str | None:
    """The one nn.ModuleList of repeated blocks holding every quantized module ("model.layers", "encoder.layer"), for
    optimum, which guesses it from a list of known names and fails on others; None when there is no single one."""
    found = set()
    for name in names:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        found.add(next((p for p in prefixes if isinstance(model.get_submodule(p), nn.ModuleList)), None))
    return found.pop() if len(found) == 1 else None


def quantization_config(model: nn.Module, layers: dict[str, QALoRALinear], checkpoint_format: str,
                        stats: dict) -> dict:
    """config.json's quantization_config: GPTQConfig's fields, the per-module map and lqplan's own record."""
    shapes = {n: (layer.config.bits, layer.group_size) for n, layer in layers.items()}
    (bits, group), _ = Counter(shapes.values()).most_common(1)[0]
    dynamic = {_dynamic_key(n, True): {"bits": b, "group_size": g} for n, (b, g) in shapes.items()
               if (b, g) != (bits, group)}
    dynamic.update({_dynamic_key(n, False): {} for n, m in model.named_modules() if is_linear(m) and n not in layers})
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": False, "desc_act": False,
            "checkpoint_format": checkpoint_format, "format": checkpoint_format, "dynamic": dynamic,
            "block_name_to_quantize": block_list(model, layers), "modules_in_block_to_quantize": [sorted(layers)],
            "meta": {"quantizer": [f"lqplan:{__version__}"], "lqplan": {"layout": LAYOUT, "merged": "qalora", **stats}}}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk: fsio reports it as an I/O error
            raise OSError(str(e)) from None


def _weight_error(tensors: dict, layer: QALoRALinear, checkpoint_format: str) -> tuple[float, float, float]:
    """(max |Δw|, ‖Δw‖², ‖W‖²) of the stored layout against the merged layer's dense fp32 weight W."""
    want = layer.merged_weight()
    diff = dequantize_gptq(tensors, layer.config.bits, checkpoint_format) - want
    return float(diff.abs().max()), float(diff.double().pow(2).sum()), float(want.double().pow(2).sum())


def export_gptq(model: nn.Module, out_dir, checkpoint_format: str = EXACT_FORMAT, tokenizer=None) -> Path:
    """Write a QA-LoRA model with merged adapters as a GPTQ-layout folder; returns the folder.

    checkpoint_format: "lqplan_offsets" (default) keeps QA-LoRA's fractional merged zero-points as fp32 `offsets`
    and fp32 scales: load_gptq reproduces the merged model to fp32 rounding. "gptq" / "gptq_v2" write GPTQ's
    integer qzeros (fp16 scales) that transformers' GPTQ path and gptqmodel read; rounding the zero-points costs up
    to half a quantization step per group, recorded in quantization_config.meta.lqplan and logged."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserError(f"checkpoint format {checkpoint_format!r} is not supported; use one of {CHECKPOINT_FORMATS}")
    layers = check_exportable(model)
    tensors, counts, worst, sq_err, sq_ref = {}, Counter(), 0.0, 0.0, 0.0
    for name, layer in layers.items():
        try:
            packed, info = qalora_to_gptq(layer, checkpoint_format)
        except ValueError as e:
            raise UserError(f"{name}: {e}; leave this matrix out of the plan to export it") from None
        counts.update(info)
        max_err, sq, ref = _weight_error(packed, layer, checkpoint_format)
        worst, sq_err, sq_ref = max(worst, max_err), sq_err + sq, sq_ref + ref
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    prefixes = tuple(n + "." for n in layers)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(prefixes) or t is None or id(t) in seen:
            continue  # tied weights are stored once: transformers (and load_gptq) re-tie them
        seen.add(id(t))
        tensors[name] = t.detach()
    stats = {"clamped_zeros": counts["clamped_zeros"], "mirrored_groups": counts["mirrored_groups"],
             "max_abs_weight_error": worst,
             "relative_weight_error": (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0}
    if checkpoint_format != EXACT_FORMAT:
        log.warning("GPTQ integer zero-points round QA-LoRA's merged ones: relative weight error %.3g, max %.3g "
                    "(%d zeros clamped); checkpoint_format=%r keeps them exact", stats["relative_weight_error"],
                    worst, stats["clamped_zeros"], EXACT_FORMAT)
    out = Path(out_dir)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise UserError("the model has no Hugging Face config; GPTQ export works on transformers models")
    doc = json.loads(config.to_json_string())
    doc["architectures"] = [type(model).__name__]
    doc["quantization_config"] = quantization_config(model, layers, checkpoint_format, stats)
    _save_tensors(out / WEIGHTS, tensors)
    write_json(out / "config.json", doc)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---- reading ------------------------------------------------------------------------------------------------
def module_settings(qc: dict, name: str) -> tuple[int, int] | None:
    """(bits, group_size) of module `name` under quantization_config `qc`: the first `dynamic` pattern that matches
    it (gptqmodel's rule; "-:" means not quantized -> None), else the defaults."""
    for pattern, override in (qc.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        try:
            matched = re.match(regex, name)
        except re.error as e:
            raise UserError(f"the folder's quantization_config has the invalid dynamic pattern {pattern!r} ({e}); "
                            "re-export it with `lqplan export --format gptq`") from None
        if matched:
            if negative:
                return None
            return int(override.get("bits", qc["bits"])), int(override.get("group_size", qc["group_size"]))
    return int(qc["bits"]), int(qc["group_size"])


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not a GPTQ folder (needs config.json and {WEIGHTS}); write one with export_gptq "
                        "or `lqplan export --format gptq`")
    doc = read_config(path, "re-export the model")
    qc = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise UserError(f"{path} has no GPTQ quantization_config; export the model with export_gptq")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS or qc.get("group_size", 0) in (-1, 0):
        raise UserError(f"{path}: checkpoint format {fmt!r} with group_size {qc.get('group_size')} is not readable "
                        f"here; this reader takes {CHECKPOINT_FORMATS} with a positive group size")
    return qc


def _skeleton(folder: Path, config_doc_arch: str | None) -> nn.Module:
    config = auto_config(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain skeleton: load_gptq swaps the layers in itself
    return meta_skeleton(config, config_doc_arch or "")


def load_gptq(folder, device=None) -> nn.Module:
    """Rebuild the model of a GPTQ-layout folder: its quantized modules become GPTQLinear (inference only), every
    other weight is read as stored. For the exact format the outputs are the merged QA-LoRA model's."""
    folder = Path(folder)
    qc = _read_config(folder)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    arch = (read_config(folder / "config.json", "re-export the model").get("architectures") or [None])[0]
    read_header_table(folder / WEIGHTS, "re-export the model")  # lqplan checks every header before safetensors
    try:
        tensors = load_file(str(folder / WEIGHTS), device=str(device or "cpu"))
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {folder / WEIGHTS} ({type(e).__name__}: {e}); re-export the model") from None
    model = _skeleton(folder, arch)
    for name in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        settings = module_settings(qc, name)
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if settings is None or target is None or not is_linear(target):
            raise UserError(f"{folder}: {name}.qweight belongs to no quantized linear layer of "
                            f"{type(model).__name__}; the folder does not match its config.json, re-export it")
        parts = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "scales", "g_idx", "offsets", "qzeros")
                 if f"{name}.{k}" in tensors}
        try:
            out_f, in_f = out_in(target).shape
            layer = GPTQLinear(parts, *settings, in_f, out_f, tensors.pop(f"{name}.bias", None), fmt)
        except ValueError as e:
            raise UserError(f"{folder}: {name}: {e}; re-export the model") from None
        set_module(model, name, layer)
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise UserError(f"{folder} holds {unexpected[0]} (and {len(unexpected) - 1} more) that "
                        f"{type(model).__name__} lacks; the folder does not match its config.json, re-export it")
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UserError(f"{folder} lacks {left[0]} (and {len(left) - 1} more); the folder is incomplete, re-export it")
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model.to(device)  # buffers the skeleton computed (rotary tables) are not in the file
    return model.eval()
