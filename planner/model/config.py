"""config.json read once and checked: a regular file within the document cap, JSON of bounded depth, an object, and
every field lqplan reads of the right type and within sane bounds, before transformers sees it. A folder that would
need its own Python code (auto_map with a model_type transformers does not know) is refused: lqplan never runs code
from a model folder."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..fsio import read_json
from ..schema import show

CONFIG_FIX = "restore the model's config.json (the one saved with the weights)"

# Integer sizes lqplan (or the skeleton it builds) reads, with an upper bound no real model comes near: a wrong
# value is refused before transformers builds anything (a billion layers would build forever).
SIZE_BOUNDS = {
    "hidden_size": 1 << 18, "intermediate_size": 1 << 20, "num_hidden_layers": 4096, "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14, "head_dim": 1 << 14, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 28,
    "n_embd": 1 << 18, "n_layer": 4096, "n_head": 1 << 14, "n_positions": 1 << 28, "n_inner": 1 << 20,
    "d_model": 1 << 18, "num_layers": 4096, "ffn_dim": 1 << 20, "n_ctx": 1 << 28, "type_vocab_size": 1 << 16,
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
POSITION_KEYS = ("max_position_embeddings", "n_positions")
BOOL_KEYS = ("tie_word_embeddings", "is_decoder", "is_encoder_decoder")
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(config, where, fix: str = CONFIG_FIX) -> dict:
    """`config` (config.json as parsed) checked field by field; returns it. `where` names the file in messages."""
    if not isinstance(config, dict):
        raise UserError(f"{where} is not valid JSON for a model config (not an object); {fix}")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{where}: model_type is {show(model_type)}, not a string; {fix}")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) and a for a in arch)):
        raise UserError(f"{where}: architectures is {show(arch)}, not a list of class names such as "
                        f"[\"LlamaForCausalLM\"]; {fix}")
    for key, bound in SIZE_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= bound:
            raise UserError(f"{where}: {key} is {show(value)}, not an integer from 1 to {bound:,}; {fix}")
    for key in BOOL_KEYS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise UserError(f"{where}: {key} is {show(config[key])}, not true or false; {fix}")
    if config.get("auto_map") is not None:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise UserError(f"{where} asks for the model folder's own Python code (auto_map) for model_type "
                            f"{model_type!r}, which transformers does not know; lqplan never runs code from a model "
                            f"folder: use a model transformers supports natively")
    text = config.get("text_config")
    if isinstance(text, dict):
        check_config({k: v for k, v in text.items() if k != "auto_map"}, f"{where} (text_config)", fix)
    return config


def read_config(path, fix: str = CONFIG_FIX) -> dict:
    """config.json at `path` (a file, or a folder holding one), read and checked (check_config)."""
    path = Path(path)
    if path.is_dir() and not path.name.endswith(".json"):
        path = path / "config.json"
    if not path.exists() and not path.is_symlink() and path.parent.is_dir():
        raise UserError(f"{path.parent} has no config.json, so its architecture is unknown; {fix}")
    return check_config(read_json(path, fix), path, fix)


def layers_held(keys) -> int | None:
    """How many numbered layer blocks the weights hold (the largest first number in a tensor name, plus one);
    None when no name has a number."""
    found = [int(m.group(1)) for k in keys if (m := _LAYER_RE.search(k))]
    return max(found) + 1 if found else None


def check_layers_against_weights(config: dict, keys, where, fix: str) -> None:
    """A config may not claim more layer blocks than the weights hold (a huge count would build for ever)."""
    held = layers_held(keys)
    if held is None:
        return
    for key in LAYER_KEYS:
        value = config.get(key)
        if _is_int(value) and value > held:
            raise UserError(f"{where} says {key}={value} but the weights hold {held} layer blocks (config and weights "
                            f"disagree); {fix}")


def positions(config) -> int | None:
    """The model's position limit (max_position_embeddings / n_positions), None when it has none."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    for key in POSITION_KEYS:
        value = get(key)
        if _is_int(value):
            return value
    return None
