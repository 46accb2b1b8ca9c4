"""safetensors files: one header parser (checked against the file's size) and the model fingerprint (every byte
of config.json and the weights)."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..fsio import check_regular, json_depth, os_reason
from .config import read_config
from .digests import file_digests

# safetensors dtype code -> torch dtype name; only floating types can be planned
ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool", "F8_E8M0": "float8_e8m0fnu",
}


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E8M0": 1}


FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


class TensorEntry(NamedTuple):
    """One tensor as a safetensors header describes it."""
    file: Path
    dtype: str          # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    nbytes: int


def _config_identity(cfg: Path) -> bytes:
    """config.json as canonical JSON (key order and whitespace do not change a model's identity)."""
    return json.dumps(read_config(cfg), sort_keys=True).encode()


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


HEADER_CAP = 100_000_000  # bytes: safetensors' own limit on the JSON header
HEADER_DEPTH = 3          # {"name": {"shape": [...]}}: nothing in a header nests deeper
MAX_DIMS = 16
MAX_NAME = 4096           # characters of a tensor name (real ones are under 200)
_FIX = "re-download the model or re-save it with save_pretrained(..., safe_serialization=True)"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the name {k[:80]!r} occurs twice")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _header_entry(key: str, meta, malformed) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor's header entry; anything else is malformed(problem)."""
    if len(key) > MAX_NAME:
        malformed(f"a tensor name is {len(key)} characters long (more than {MAX_NAME})")
    if not isinstance(meta, dict):
        malformed(f"the entry of tensor {key!r} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        malformed(f"tensor {key!r} has no {missing[0]}")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(code, str) or code not in ST_DTYPES:
        malformed(f"tensor {key!r} has the unknown dtype {str(code)[:20]!r} (known: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(s) for s in shape):
        malformed(f"tensor {key!r} has shape {str(shape)[:60]}, not a list of at most {MAX_DIMS} integers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets)
            or offsets[0] > offsets[1]):
        malformed(f"tensor {key!r} has data_offsets {str(offsets)[:60]}, not [begin, end] integers with "
                  "0 <= begin <= end")
    return code, tuple(shape), offsets[0], offsets[1]


def read_header_table(path: Path, fix: str = _FIX) -> dict[str, TensorEntry]:
    """Parse and check one safetensors file before safetensors or json sees it, with bounds of its own: a regular
    file; a header length within HEADER_CAP and the file; a JSON object nesting at most HEADER_DEPTH deep with
    unique names; __metadata__ a map of strings to strings; every tensor a known dtype, a shape of integers >= 0
    and offsets whose span is exactly dtype x shape bytes; the tensors' data contiguous, without overlap, gap or
    trailing bytes (a truncated download fails here, not halfway through profiling). Every failure is one line
    naming the file and the fix."""
    st = check_regular(path, fix, "weights file")
    size = st.st_size
    if size < 8:
        raise UserError(f"{path} is not a safetensors file (only {size} bytes); {fix}")

    def malformed(problem: str):
        raise UserError(f"{path} has a malformed safetensors header: {problem} (corrupt file); {fix}")

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > HEADER_CAP:
                malformed(f"it claims {n:,} bytes of header, more than safetensors' limit of {HEADER_CAP:,}")
            if n > size - 8:
                raise UserError(f"{path} is truncated or not safetensors (header says {n} bytes, file has {size}); "
                                f"{fix}")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {os_reason(e, fix)}") from None
    if not raw.startswith(b"{"):  # safetensors' own rule
        raise UserError(f"{path} has an unreadable safetensors header (it does not start with '{{'; corrupt file); "
                        f"{fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} has an unreadable safetensors header (not UTF-8 JSON; corrupt file); {fix}") from None
    depth = json_depth(raw)
    if depth > HEADER_DEPTH:
        malformed(f"it nests {depth} levels deep; a header nests at most {HEADER_DEPTH}")
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as e:
        problem = str(e) if "occurs twice" in str(e) else None
        if problem:
            malformed(problem)
        raise UserError(f"{path} has an unreadable safetensors header (corrupt file); {fix}") from None
    if not isinstance(header, dict):
        malformed("it is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        malformed("__metadata__ must map names to strings")
    data_size = size - 8 - n
    table, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        code, shape, start, end = _header_entry(key, entry, malformed)
        numel = math.prod(shape)
        if numel * _ST_ITEMSIZE[code] != end - start:
            malformed(f"tensor {key!r} ({code} {list(shape)}) should take {numel * _ST_ITEMSIZE[code]} bytes but its "
                      f"offsets span {end - start}")
        table[key] = TensorEntry(path, code, shape, end - start)
        spans.append((start, end, key))
    reached, last = 0, None
    for start, end, key in sorted(spans):
        if start < reached:
            malformed(f"tensors {last!r} and {key!r} overlap")
        if start > reached:
            malformed(f"{start - reached} bytes before tensor {key!r} belong to no tensor")
        if end > data_size:
            raise UserError(f"{path} is truncated: tensor {key!r} ends at byte {end} of the data but the file holds "
                            f"only {data_size}; {fix}")
        reached, last = end, key
    if reached != data_size:  # safetensors refuses such a file when it opens it; say so before any work
        raise UserError(f"{path} has {data_size - reached} bytes after its tensor data (corrupt, or another file was "
                        f"appended); {fix}")
    return table
