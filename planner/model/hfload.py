"""Every load through transformers goes through here: local files only, trust_remote_code=False (code in a model
folder never runs, and transformers never stops to ask), safetensors only (nothing is ever unpickled). Its errors
become one-line UserErrors naming the folder."""

from __future__ import annotations

from ..errors import UserError

SAFE = {"local_files_only": True, "trust_remote_code": False}


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _unknown_type(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, (KeyError, ValueError)) and ("model_type" in text or "Unrecognized model" in text
                                                       or "does not recognize this architecture" in text)


def auto_config(where, unknown_ok: bool = False):
    """A transformers config from a folder or a config.json path (already checked by planner.model.config);
    None for a model_type transformers does not know when `unknown_ok`, else a UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(where), **SAFE)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it cannot read
        if unknown_ok and _unknown_type(e):
            return None
        raise UserError(f"transformers cannot read the config.json of {where} ({_reason(e)}); restore the model's "
                        "config.json (the one saved with the weights)") from None


def config_from_dict(d: dict):
    """A transformers config from a config.json dict; None for a model_type transformers does not know."""
    from transformers import CONFIG_MAPPING

    d = dict(d)
    kind = d.pop("model_type", None)
    if kind not in CONFIG_MAPPING:
        return None
    try:
        return CONFIG_MAPPING[kind].from_dict(d)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"transformers cannot read this config ({_reason(e)}); pass the model's config.json") from None


def pretrained(cls, folder, **kwargs):
    """cls.from_pretrained(folder) from the folder's *.safetensors only."""
    try:
        return cls.from_pretrained(str(folder), **SAFE, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"transformers cannot load the model in {folder} ({_reason(e)}); pass a folder with "
                        "config.json and *.safetensors weights") from None


def meta_skeleton(config, architecture: str | None = None, causal: bool = False, meta_buffers: bool = False):
    """The transformers model of `config` with every parameter on the meta device (no memory, no init).
    architecture: the transformers class of that name (a UserError when this transformers version lacks it); None:
    AutoModelForCausalLM if `causal` else AutoModel, never code from the model folder. Buffers computed at init
    (rotary frequencies, position ids) stay real, to be kept or overwritten from the file, unless `meta_buffers`
    (a skeleton read for its shapes only)."""
    import transformers

    if architecture is None:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        make = lambda: auto.from_config(config, trust_remote_code=False)  # noqa: E731
    else:
        cls = getattr(transformers, architecture, None)
        if cls is None or not hasattr(cls, "_from_config"):
            raise UserError(f"architecture {architecture!r} is not in this transformers version; upgrade transformers")
        make = lambda: cls._from_config(config)  # noqa: E731
    if meta_buffers:
        import torch

        context = torch.device("meta")  # accelerate's init_empty_weights(include_buffers=True), without importing it
    else:
        from accelerate import init_empty_weights

        context = init_empty_weights(include_buffers=False)
    with context:
        return make()


def check_tokenizer_fits(tokenizer, config, folder) -> None:
    """A tokenizer whose ids reach past the model's vocabulary would index past the embedding table. Its base
    vocabulary is compared (added special tokens, such as a multimodal model's image token, are left out)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    vocab, size = get("vocab_size"), getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int) and isinstance(size, int) and size > vocab:
        raise UserError(f"the tokenizer in {folder} has {size:,} tokens but the model's vocabulary "
                        f"(vocab_size in config.json) holds {vocab:,}; pass the tokenizer saved with the model")


def check_window(max_len: int, config, option: str = "--max-len") -> None:
    """A window longer than the model's positions would index past its position table."""
    from .config import positions

    limit = positions(config)
    if limit is not None and max_len > limit:
        raise UserError(f"{option} {max_len} is longer than the model's {limit} positions (max_position_embeddings); "
                        f"pass {option} {limit} or less")
