"""Which matrices a plan covers, read from the model's own structure (transformers builds the skeleton on the
meta device from config.json) and matched to the safetensors keys.

What a plan covers ("planned matrices"): every nn.Linear (and transformers' Conv1D, GPT-2 style, transposed
to (out, in)) inside a numbered layer block -- the attention and MLP projections. Never planned: embeddings,
norms, poolers, classifiers and other modules outside the layer blocks, matrices whose smaller side is below
MIN_MATRIX_SIDE (e.g. MoE router gates, 8 x 4096), and the output head unless include_head=True (a head tied to
the input embeddings stays unplanned even then: quantizing it would change the input embeddings too).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from ..errors import UserError
from .config import check_config, read_config
from .hfload import auto_config, config_from_dict, meta_skeleton
from .resolve import ModelSource
from .weights import FLOAT_CODES, ST_DTYPES

MIN_MATRIX_SIDE = 16  # smaller matrices are not worth a block-quantized code + adapter (router gates, tiny heads)
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class MatrixInfo:
    """One planned matrix. shape is (out, in) as nn.Linear stores it; `transposed` marks a Conv1D tensor stored
    (in, out), which iter_matrices transposes. layer is the first number in the module path (None outside blocks);
    kind is the path after that number, e.g. "self_attn.q_proj" (the full name for a head)."""
    name: str
    tensor_key: str
    file: Path
    shape: tuple[int, int]
    dtype: str
    layer: int | None
    kind: str
    transposed: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class _Linear(NamedTuple):
    name: str
    shape: tuple[int, int]  # (out, in)
    transposed: bool        # stored (in, out): transformers' Conv1D
    layer: int | None
    kind: str
    is_head: bool
    tied: bool


def load_config(where: str | os.PathLike | dict):
    """A transformers config from a folder, a config.json path or a dict, checked first (planner.model.config);
    None when transformers doesn't know the architecture, a UserError when it cannot read the values."""
    if isinstance(where, dict):
        return config_from_dict(check_config(where, "the model config"))
    read_config(where)
    return auto_config(where, unknown_ok=True)


def build_skeleton(hf_config):
    """The model on the meta device, buffers too (no memory, no init): the config's architectures in turn, then the
    causal-LM and base auto classes; None if transformers can't build it."""
    tries = [{"architecture": a} for a in getattr(hf_config, "architectures", None) or []]
    for kwargs in [*tries, {"causal": True}, {"causal": False}]:
        try:
            return meta_skeleton(hf_config, meta_buffers=True, **kwargs)
        except Exception:  # noqa: BLE001 - any failure to build means "try the next class, then fall back"
            continue
    return None


def ends_with_path(name: str, tail: str) -> bool:
    """Whether dotted module path `name` ends with the whole components of `tail`: "model.layers.0.self_attn.q_proj"
    ends with "q_proj" and "self_attn.q_proj", not with "_proj"."""
    return name == tail or name.endswith("." + tail)


def same_module(a: str, b: str) -> bool:
    """Whether module paths `a` and `b` name the same module up to a base-model prefix on either side ("model.",
    "bert."): a plan made on the base model applied to a wrapper, or the reverse."""
    return ends_with_path(a, b) or ends_with_path(b, a)


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end():] or name


def skeleton_linears(model) -> list[_Linear]:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            shape, transposed = tuple(mod.weight.shape), False
        elif isinstance(mod, Conv1D):
            shape, transposed = tuple(mod.weight.shape[::-1]), True
        else:
            continue
        layer, kind = _layer_and_kind(name)
        is_head = mod is head
        if layer is None and not is_head:
            continue  # pooler, classifier, projector: outside the layer blocks
        tied = is_head and inp is not None and getattr(inp, "weight", None) is mod.weight
        out.append(_Linear(name, shape, transposed, layer, kind, is_head, tied))
    return out


def _match_key(name: str, keys: set[str], by_tail: dict[str, list[str]]) -> str | None:
    """The safetensors key of module `name`'s weight. Checkpoints differ from the skeleton by a base-model prefix
    ("model.", "bert.", "transformer.") in either direction, so match by suffix when the exact key is absent."""
    w = name + ".weight"
    if w in keys:
        return w
    parts = w.split(".")
    # strip only prefix components before the layer number: a tail without it could match another layer
    first_number = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 2)
    for drop in range(first_number + 1):
        tail = ".".join(parts[drop:])
        if drop and tail in keys:
            return tail
        hits = [k for k in by_tail.get(".".join(parts[-2:]), []) if ends_with_path(k, tail)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _fallback_matrices(source: ModelSource, include_head: bool) -> list[MatrixInfo]:
    """For architectures transformers can't build: every 2-D float *.weight inside a numbered block with both
    sides >= MIN_MATRIX_SIDE, minus embeddings and norms, as stored (assumed (out, in)), in natural key order."""
    skip = re.compile(r"(embed|norm|(^|\.)ln|wte|wpe)", re.IGNORECASE)
    out = []
    for key in sorted(source.tensors, key=_natural_key):
        e = source.tensors[key]
        if len(e.shape) != 2 or not key.endswith(".weight") or e.dtype not in FLOAT_CODES or skip.search(key):
            continue
        name = key[: -len(".weight")]
        layer, kind = _layer_and_kind(name)
        is_head = include_head and name.split(".")[-1] in ("lm_head", "embed_out") and layer is None
        if (layer is None and not is_head) or min(e.shape) < MIN_MATRIX_SIDE:
            continue
        out.append(MatrixInfo(name, key, e.file, (e.shape[0], e.shape[1]), ST_DTYPES[e.dtype], layer, kind))
    return out


def discover_matrices(source: ModelSource, include_head: bool = False) -> list[MatrixInfo]:
    """The planned matrices of `source` in the model's own (layer-major) order; see the module docstring for
    what is planned. Raises UserError when config.json and the weights disagree."""
    hf_config = load_config(source.folder)
    model = build_skeleton(hf_config) if hf_config is not None else None
    if model is None:
        found = _fallback_matrices(source, include_head)
        if not found:
            raise UserError(f"found no weight matrices in numbered layer blocks of {source.folder}; transformers "
                            f"does not know model_type {source.config.get('model_type')!r}: upgrade transformers "
                            f"or pass a supported model")
        return found
    _check_architecture(source, model)
    keys = set(source.tensors)
    by_tail: dict[str, list[str]] = {}
    for k in keys:
        by_tail.setdefault(".".join(k.split(".")[-2:]), []).append(k)
    fix = "use the config.json that was saved with these weights"
    out = []
    used: dict[str, str] = {}
    for lin in skeleton_linears(model):
        if min(lin.shape) < MIN_MATRIX_SIDE:
            continue
        if lin.is_head and (not include_head or lin.tied):
            continue
        key = _match_key(lin.name, keys, by_tail)
        if key is None:
            if lin.is_head:
                continue  # head tied in the checkpoint although the config doesn't say so: not stored separately
            raise UserError(f"config.json of {source.name} has module {lin.name} but no tensor {lin.name}.weight "
                            f"is in the safetensors files (config and weights disagree); {fix}")
        if key in used:
            raise UserError(f"modules {used[key]} and {lin.name} of config.json both map to tensor {key} "
                            f"(config and weights disagree); {fix}")
        used[key] = lin.name
        e = source.tensors[key]
        expect = lin.shape[::-1] if lin.transposed else lin.shape
        if tuple(e.shape) != tuple(expect):
            raise UserError(f"config.json of {source.name} disagrees with the weights: {key} is {list(e.shape)} in "
                            f"{e.file.name} but the config implies {list(expect)}; {fix}")
        if e.dtype not in FLOAT_CODES:
            raise UserError(f"{key} is stored as {e.dtype}, not floating point (already quantized?); "
                            f"use the original 16/32-bit checkpoint")
        out.append(MatrixInfo(lin.name, key, e.file, lin.shape, ST_DTYPES[e.dtype], lin.layer, lin.kind,
                              lin.transposed))
    if not out:
        raise UserError(f"{source.folder} has no plannable matrices (no linear layer of at least {MIN_MATRIX_SIDE} x "
                        f"{MIN_MATRIX_SIDE} in a numbered layer block); pass a transformer model with its layers")
    return out


def _check_architecture(source: ModelSource, model) -> None:
    """config.json's architectures must name the class the weights were saved from: a class of another model
    type, or one whose weight matrices the checkpoint lacks (or holds others), would be recorded in plan.json and
    built by `train` although it is not this model."""
    import transformers

    arch = (source.config.get("architectures") or [None])[0]
    fix = "set architectures in config.json to the class the weights were saved from"
    named = getattr(transformers, arch, None) if arch else None
    kind = getattr(getattr(named, "config_class", None), "model_type", None)
    if kind and source.config.get("model_type") and kind != source.config["model_type"]:
        raise UserError(f"config.json names {arch}, a {kind!r} model, but its model_type is "
                        f"{source.config['model_type']!r}; {fix}")
    if arch is None or type(model).__name__ != arch:
        return  # not built from the named class (unknown to transformers): nothing more to compare
    keys = set(source.tensors)
    by_tail: dict[str, list[str]] = {}
    for k in keys:
        by_tail.setdefault(".".join(k.split(".")[-2:]), []).append(k)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    matched = set()
    for name, p in model.named_parameters():
        if p.dim() != 2 or not name.endswith(".weight"):
            continue
        key = _match_key(name[: -len(".weight")], keys, by_tail)
        if key is not None:
            matched.add(key)
        elif p is not head_weight:  # a head may be tied in the checkpoint although the config doesn't say so
            raise UserError(f"config.json names {arch}, whose {name} is not in the weights of {source.name} (they "
                            f"were saved from another class); {fix}")
    extra = sorted(k for k, e in source.tensors.items() if k.endswith(".weight") and len(e.shape) == 2
                   and e.dtype in FLOAT_CODES and k not in matched)
    if extra:
        raise UserError(f"the weights of {source.name} hold {extra[0]}, which config.json's {arch} has no place for "
                        f"(they were saved from another class); {fix}")


def is_causal_lm(config) -> bool:
    """Whether a model is a causal (decoder) LM, decided here for every stage (Fisher loss, fine-tuning objective,
    evaluation metric). `config`: a transformers config or a config.json dict. The architectures string decides
    when present (…ForCausalLM, GPT-2's …LMHeadModel); a config without one (Gemma 3 saved from a GGUF, say) is
    causal when transformers' auto mapping has a causal-LM class for its model_type and no masked-LM one (BERT has
    both: BertLMHeadModel exists, but a plain BERT config is an encoder's)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    architectures = get("architectures") or []
    if architectures:
        return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if get("is_decoder", False):
        return True
    kind = get("model_type")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def planned_params(matrices: Sequence[MatrixInfo]) -> int:
    """Weights covered by the plan."""
    return sum(m.numel for m in matrices)


def unplanned_bytes(source: ModelSource, matrices: Sequence[MatrixInfo], float_bytes: int | None = None) -> int:
    """Bytes of every tensor in the safetensors files that the plan does not cover (embeddings, norms, biases,
    heads...): what a GB budget must hold besides the planned matrices. At the stored dtype, or with floating
    tensors at `float_bytes` per value (the dtype a fine-tune holds them in)."""
    planned = {m.tensor_key for m in matrices}
    return sum(math.prod(e.shape) * float_bytes if float_bytes and e.dtype in FLOAT_CODES else e.nbytes
               for k, e in source.tensors.items() if k not in planned)
