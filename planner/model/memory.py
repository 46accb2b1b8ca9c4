"""Dry-run memory estimate of a model at uniform configurations, from config.json alone."""

from __future__ import annotations

from typing import Sequence

from ..errors import UserError
from ..fsio import user_path
from .config import read_config
from .discover import MIN_MATRIX_SIDE, build_skeleton, load_config, skeleton_linears
from .packaged import PACKAGED, packaged_folder
from .ranks import default_ranks
from .resolve import (
    ALIASES,
    EMBEDDED_ALIAS,
    ModelSource,
    default_model_path,
    find_in_cache,
    is_hub_id,
    resolve_model,
)


def _config_source(model) -> tuple[object, str]:
    """The transformers config for memory_table; only config.json is needed (a cached snapshot may lack weights)."""
    if model is None:
        return load_config(default_model_path()), EMBEDDED_ALIAS
    if isinstance(model, ModelSource):
        return load_config(model.folder), model.name
    if isinstance(model, dict):
        return load_config(model), model.get("model_type", "config")
    p = user_path(model, "--model")
    if p.exists():
        target = p / "config.json" if p.is_dir() else p
        if not target.exists() and not target.is_symlink():
            raise UserError(f"{p} has no config.json; pass the model folder or its config.json")
        read_config(target, "restore the model's config.json")
        return load_config(target), p.name
    text = str(model)
    if text == EMBEDDED_ALIAS:
        return load_config(default_model_path()), text
    if text in PACKAGED:
        return load_config(packaged_folder(text)), text
    hub_id = ALIASES.get(text) or (text if is_hub_id(text) else None)
    if hub_id is None:
        resolve_model(text)  # raises the one-line "not a folder, alias or hub id" error
    return load_config(find_in_cache(hub_id, config_only=True)), text


def memory_table(model, bits: Sequence[int] = (4, 3, 2), ranks: Sequence[int] | None = None,
                 include_head: bool = False, configs: Sequence[tuple] | None = None):
    """Dry-run memory estimate from config.json alone (a folder with only config.json, a config.json path, a
    config dict, a ModelSource or any --model spec): a pandas DataFrame, one row per configuration.

    Rows: "fp16" (every parameter 16-bit), then per NF bit width in `bits` the QLoRA-style double-quantized
    config (block 64, 8-bit scales in blocks of 256) without adapters and with 16-bit adapters of each rank in
    `ranks` (default: the ranks `lqplan plan` profiles for this model, planner.model.ranks.default_ranks).
    `configs` replaces those with explicit (QuantConfig, rank) pairs. Unplanned parameters (embeddings, norms,
    biases, head) count as 16-bit. Columns: config, rank, planned_params, other_params, bits_per_param (planned
    matrices incl. adapters), planned_GiB, other_GiB, total_GiB (binary units, as every size lqplan prints)."""
    import pandas as pd

    from quant.config import QuantConfig

    hf_config, name = _config_source(model)
    model_obj = build_skeleton(hf_config) if hf_config is not None else None
    if model_obj is None:
        raise UserError(f"transformers cannot build the architecture of {name} from its config.json; upgrade "
                        f"transformers or pass a model it supports")
    shapes = [lin.shape for lin in skeleton_linears(model_obj)
              if min(lin.shape) >= MIN_MATRIX_SIDE and (not lin.is_head or (include_head and not lin.tied))]
    total = sum(p.numel() for p in model_obj.parameters())  # parameters() yields tied weights once
    planned = sum(m * n for m, n in shapes)
    other = total - planned
    if ranks is None:
        ranks = [int(r) for r in default_ranks(min(s) for s in shapes).split(",")]
    if configs is None:
        configs = [("fp16", 0)]
        for b in bits:
            configs += [(QuantConfig(bits=b), r) for r in (0, *(r for r in ranks if r))]
    rows = []
    for cfg, r in configs:
        if cfg == "fp16":
            planned_bits = 16 * planned + sum(16 * r * (m + n) for m, n in shapes)
            label = "fp16"
        else:
            planned_bits = sum(cfg.matrix_bits((m, n), r) for m, n in shapes)
            label = cfg.label
        rows.append({
            "config": label, "rank": r, "planned_params": planned, "other_params": other,
            "bits_per_param": planned_bits / planned if planned else float("nan"),
            "planned_GiB": planned_bits / 8 / 2**30, "other_GiB": 2 * other / 2**30,
            "total_GiB": (planned_bits / 8 + 2 * other) / 2**30,
        })
    table = pd.DataFrame(rows)
    table.attrs["model"] = name
    return table
