"""The full-precision model's metric on held-out text without the full-precision model in memory: the model runs
with one layer block on the device at a time (each block is loaded from its shard just before it runs and
released after, so a 13B model's reference perplexity needs a few GB of device memory instead of 52 GB), and the
result is cached by model fingerprint and evaluation-text digest, so it is computed once per model and text."""

from __future__ import annotations

import gc
import hashlib
import math
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from ..errors import UserError
from ..fsio import read_json, write_json
from ..model.resolve import ModelSource
from ..model.tokenizer import bos_id, short_digest, tokenizer_digest
from .build import load_tensors, meta_names, skeleton
from .evaluate import perplexity


def layer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The numbered layer blocks (children of a ModuleList) that hold most of a transformer's weights."""
    return [(f"{name}.{i}" if name else str(i), block) for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) for i, block in enumerate(mod)]


def streamed_reference(source: ModelSource, config, *, causal: bool, device, dtype=torch.float32) -> nn.Module:
    """The full-precision model in `dtype` whose layer blocks are loaded onto `device` just before they run and
    released after (forward hooks); everything outside the blocks is loaded once. For inference only."""
    model = skeleton(config, causal)
    blocks = layer_blocks(model)
    inside = tuple(name + "." for name, _ in blocks)
    load_tensors(model, source, [n for n in meta_names(model) if not n.startswith(inside)], device, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, block in blocks:
        names = [f"{name}.{n}" for n in meta_names(block)]

        def fetch(module, args, names=names):
            load_tensors(model, source, names, device, dtype)

        def release(module, args, output, names=names):
            for n in names:
                set_module_tensor_to_device(model, n, "meta")

        block.register_forward_pre_hook(fetch)
        block.register_forward_hook(release)
    for name, buf in model.named_buffers():
        if not buf.is_meta:
            set_module_tensor_to_device(model, name, device, value=buf)
    return model



def text_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def _cache_path(source: ModelSource, tokenizer, texts: list[str], max_len: int, stride: int, cache_dir) -> Path | None:
    if cache_dir is None:
        return None
    # windows start with BOS where the tokenizer has one: a value cached before that (no "-bos") is not reused;
    # the model fingerprint covers the weights only, so the key names the tokenizer too
    bos = "-bos" if bos_id(tokenizer) is not None else ""
    key = f"ppl-{text_digest(texts)}-L{max_len}-S{stride}-fp32{bos}-tok_{short_digest(tokenizer_digest(tokenizer))}"
    return Path(cache_dir) / source.fingerprint.split(":")[-1][:24] / "reference" / f"{key}.json"


def cached_reference_perplexity(source: ModelSource, tokenizer, texts: list[str], *, max_len: int, stride: int,
                                cache_dir=None) -> float | None:
    """reference_perplexity's cached value, or None where it would have to be computed."""
    path = _cache_path(source, tokenizer, texts, max_len, stride, cache_dir)
    if path is None:
        return None
    try:
        value = read_json(path, "it is recomputed")["perplexity"] if path.exists() else None
    except (UserError, KeyError, TypeError):
        return None  # unreadable: computed again
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def reference_perplexity(source: ModelSource, config, tokenizer, texts: list[str], *, max_len: int, stride: int,
                         device, cache_dir=None) -> float:
    """The full-precision (fp32) model's perplexity on `texts`, streamed layer by layer and cached in
    cache_dir/<fingerprint>/reference/ by the text's digest and the window settings."""
    cached = cached_reference_perplexity(source, tokenizer, texts, max_len=max_len, stride=stride, cache_dir=cache_dir)
    if cached is not None:
        return cached
    model = streamed_reference(source, config, causal=True, device=device)
    # the same window batches as the quantized model's evaluation, so the figures compare like for like
    value = perplexity(model, tokenizer, texts, max_len=max_len, stride=stride, device=device)
    # The model sits in reference cycles (its hooks close over it; transformers' construction leaves frames that hold
    # it), so dropping the name frees nothing: its fp32 embeddings and head would stay allocated into training.
    del model
    gc.collect()
    path = _cache_path(source, tokenizer, texts, max_len, stride, cache_dir)
    if path is not None:
        write_json(path, {"perplexity": value, "texts": len(texts), "max_len": max_len, "stride": stride,
                          "tokenizer": tokenizer_digest(tokenizer)})
    return value
