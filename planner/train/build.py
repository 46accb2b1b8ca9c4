"""Models built straight from the safetensors shards, never from a full-precision copy in memory.

build_student(): the quantized student. Its skeleton is made without memory (model.hfload.meta_skeleton);
each planned matrix is read from its shard, decomposed and packed on the device one at a time (the device holds
the packed model plus one matrix in fp32 and the decomposition's workspace; the host one tensor), and every other
tensor (embeddings, norms, head, biases) is loaded once, at its training dtype, onto the device."""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from quant.layers import set_backend

from ..errors import UserError
from ..model.discover import MatrixInfo, discover_matrices, same_module
from ..model.hfload import meta_skeleton
from ..model.resolve import ModelSource
from ..model.stream import load_matrix
from ..plan.document import Plan
from .apply import LayerRecipe, freeze_base, set_module


def checkpoint_key(name: str, keys) -> str | None:
    """The safetensors key of model tensor `name`: the same name, or the one key that differs from it by a
    base-model prefix in either direction ("model.", "bert.", ...)."""
    if name in keys:
        return name
    hits = [k for k in keys if same_module(k, name)]
    return hits[0] if len(hits) == 1 else None


def skeleton(config, causal: bool) -> nn.Module:
    """The model of `config` with every parameter on the meta device (no memory); buffers computed at init (rotary
    frequencies, position ids) stay real."""
    model = meta_skeleton(config, causal=causal)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head is then the input embeddings' tensor: nothing to load for it
    return model.eval()


def load_tensors(model: nn.Module, source: ModelSource, names: list[str], device, dtype: torch.dtype | None) -> None:
    """Fill model tensors `names` (state names) from the checkpoint, one shard open at a time; floating tensors
    become `dtype` (None: as stored), others keep their dtype."""
    by_file = defaultdict(list)
    for name in names:
        key = checkpoint_key(name, source.tensors)
        if key is None:
            raise UserError(f"the model folder {source.folder} has no tensor for {name}; config.json and the "
                            "weights disagree: use the config.json saved with these weights")
        by_file[source.tensors[key].file].append((name, key))
    for file, pairs in by_file.items():
        # opened per shard: a handle kept open keeps every touched page of its mmap resident
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, key in pairs:
                t = f.get_tensor(key).to(device)  # cast on the device: a GPU converts far faster than the host
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                set_module_tensor_to_device(model, name, device, value=t, dtype=t.dtype)


def meta_names(model: nn.Module) -> list[str]:
    seen, out = set(), []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.is_meta and id(t) not in seen:
            seen.add(id(t))
            out.append(name)
    return out


def _planned_infos(source: ModelSource, plan: Plan) -> dict[str, MatrixInfo]:
    infos = {m.name: m for m in discover_matrices(source, include_head=True)}
    missing = [e.name for e in plan.matrices if e.name not in infos]
    if missing:
        raise UserError(f"planned matrix {missing[0]!r} is not a planned matrix of {source.folder}; apply the plan "
                        "to the model it was made for")
    for e in plan.matrices:
        if tuple(infos[e.name].shape) != tuple(e.shape):
            raise UserError(f"planned matrix {e.name!r} has shape {list(e.shape)} in the plan but "
                            f"{list(infos[e.name].shape)} in the model; re-plan for this model")
    return infos


def build_student(source: ModelSource, plan: Plan, config, recipe: LayerRecipe, *, causal: bool, device,
                  dtype: torch.dtype, alpha: float | None = None, dropout: float = 0.0,
                  adapter_dtype: torch.dtype = torch.float32, backend: str = "auto",
                  progress: bool = False) -> nn.Module:
    """The quantized student of `plan` for the model in `source`, built on `device` (see the module docstring),
    each layer as `recipe` says; `dtype`: the training dtype of the unplanned tensors."""
    infos = _planned_infos(source, plan)
    model = skeleton(config, causal)
    entries = recipe.progress(plan.matrices) if progress else plan.matrices
    for entry in entries:
        info = infos[entry.name]
        w = load_matrix(info, device, torch.float32)
        bias_key = info.tensor_key.removesuffix("weight") + "bias"
        bias = None
        if bias_key in source.tensors:
            with safe_open(str(source.tensors[bias_key].file), framework="pt", device="cpu") as f:
                bias = f.get_tensor(bias_key).to(device, torch.float32)
        with torch.no_grad():
            layer = recipe.layer(entry, w, bias, alpha, dropout, adapter_dtype)
        del w
        set_module(model, entry.name, layer)
    load_tensors(model, source, meta_names(model), device, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head shares the input embeddings loaded above
    model.to(device)  # the buffers computed at init
    freeze_base(model)
    set_backend(model, backend)
    return model
