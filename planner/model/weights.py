"""safetensors files: one header parser (checked against the file's size) and the model
fingerprint built from it."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError

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
