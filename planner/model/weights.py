"""safetensors files: one header parser (checked against the file's size) and the model fingerprint (every byte
of config.json and the weights)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from .digests import file_digests

# safetensors dtype code -> torch dtype name; only floating types can be planned
ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


class TensorEntry(NamedTuple):
    """One tensor as a safetensors header describes it."""
    file: Path
    dtype: str          # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    nbytes: int


def _config_identity(cfg: Path) -> bytes:
    """config.json as canonical JSON (key order and whitespace do not change a model's identity)."""
    fix = "restore the model's config.json (the one saved with the weights)"
    if not cfg.is_file():
        raise UserError(f"{cfg} is a folder, not a file; {fix}") if cfg.is_dir() else UserError(
            f"{cfg.parent} has no config.json, so its architecture is unknown; {fix}")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{cfg} is not valid JSON (empty or corrupt); {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {cfg}: {e.strerror or e}; {fix}") from None
    return json.dumps(config, sort_keys=True).encode()


def fingerprint(folder: str | Path) -> str:
    """A model's identity: sha256 over config.json (canonical JSON) and, per safetensors file in name order, its
    name and the sha256 of every byte in it. Any change to any tensor changes it, so a profile cached for other
    weights is never reused. Files are hashed in parallel at disk speed, and each file's digest is memoized by
    (path, size, mtime, ctime, inode) in a small JSON file (planner.model.digests), so a rerun on unchanged files
    reads only their stat."""
    folder = Path(folder)
    h = hashlib.sha256()
    h.update(_config_identity(folder / "config.json"))
    files = sorted(folder.glob("*.safetensors"))
    for p, digest in zip(files, file_digests(files)):
        h.update(p.name.encode() + b"\0" + digest.encode() + b"\0")
    return "sha256:" + h.hexdigest()


def read_header_table(path: Path) -> dict[str, TensorEntry]:
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
    table, used = {}, 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
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
        used = max(used, end)
    if used != data_size:  # safetensors refuses such a file when it opens it; say so before any work
        raise UserError(f"{path} has {data_size - used} bytes after its tensor data (corrupt, or another file was "
                        f"appended); {fix}")
    return table

