"""Content digests of weight files for the model fingerprint: sha256 over every byte, hashed in parallel at disk
speed and memoized per file by its stat, so that rerunning on unchanged files costs one stat per file.

A file's digest is sha256 over the sha256 of each PIECE-byte piece in order (a hash tree of depth one): the pieces
hash on separate threads, so one large shard uses every core (hashlib releases the GIL on large buffers). The memo
(a small JSON file, LQPLAN_DIGEST_MEMO, default ~/.cache/lqplan/file-digests.json; "off" disables it) maps an
absolute path to (size, mtime_ns, ctime_ns, inode, device) and the digest: any write to the file changes its
mtime and ctime, so a stale entry is never used. The digest itself depends only on the bytes."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..fsio import write_json

MEMO_ENV = "LQPLAN_DIGEST_MEMO"
PIECE = 64 << 20  # bytes per independently hashed piece
_CHUNK = 8 << 20  # read size inside a piece
_MEMO_ENTRIES = 4096  # the memo keeps the newest entries only: it is a speedup, not a record


def memo_path() -> Path | None:
    """Where the digest memo lives (None: no memo)."""
    value = os.environ.get(MEMO_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lqplan" / "file-digests.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _hash_piece(path: Path, start: int, length: int) -> bytes:
    h = hashlib.sha256()
    buf = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            n = f.readinto(view[: min(len(buf), left)])
            if not n:
                raise UserError(f"{path} shrank while it was being read; rerun once nothing else writes to it")
            h.update(view[:n])
            left -= n
    return h.digest()


def _read_memo(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # absent or damaged: every digest is recomputed, nothing else depends on it
    if not isinstance(memo, dict):
        return {}
    return {k: v for k, v in memo.items() if isinstance(v, dict) and isinstance(v.get("stat"), str)
            and isinstance(v.get("sha256"), str)}


def _write_memo(path: Path | None, memo: dict) -> None:
    if path is None:
        return
    try:
        write_json(path, dict(list(memo.items())[-_MEMO_ENTRIES:]))
    except (UserError, OSError):
        pass  # a read-only or full cache folder only costs the next run a rehash


def file_digests(files: Sequence[Path], workers: int | None = None) -> list[str]:
    """The content digest (hex) of each file, in order; see the module docstring."""
    files = [Path(f).resolve() for f in files]
    memo_file = memo_path()
    memo = _read_memo(memo_file)
    try:
        keys = [_stat_key(f) for f in files]
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror or e}; re-download the model") from None
    todo = [i for i, f in enumerate(files) if memo.get(str(f), {}).get("stat") != keys[i]]
    out = [memo[str(f)]["sha256"] if i not in todo else "" for i, f in enumerate(files)]
    if todo:
        pieces = []
        for i in todo:
            size = int(keys[i].split(":")[0])
            pieces += [(i, start, min(PIECE, size - start)) for start in range(0, size, PIECE)] or [(i, 0, 0)]
        workers = workers or min(len(pieces), os.cpu_count() or 1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lqplan-digest") as pool:
                digests = list(pool.map(lambda p: _hash_piece(files[p[0]], p[1], p[2]), pieces))
        except OSError as e:
            raise UserError(f"cannot read {e.filename}: {e.strerror or e}; re-download the model") from None
        for i in todo:
            tree = hashlib.sha256()
            for (j, _, _), d in zip(pieces, digests):
                if j == i:
                    tree.update(d)
            out[i] = tree.hexdigest()
            if _stat_key(files[i]) != keys[i]:
                raise UserError(f"{files[i]} changed while it was being read; rerun once nothing else writes to it")
            memo.pop(str(files[i]), None)  # re-inserted last: the newest entries are the ones kept
            memo[str(files[i])] = {"stat": keys[i], "sha256": out[i]}
        _write_memo(memo_file, memo)
    return out
