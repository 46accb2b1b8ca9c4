"""Content digests of weight files for the model fingerprint: sha256 over every byte, hashed in parallel at disk
speed and memoized per file by its stat, so that rerunning on unchanged files costs one stat per file.

A file's digest is sha256 over the sha256 of each PIECE-byte piece in order (a hash tree of depth one): the pieces
hash on separate threads, so one large shard uses every core (hashlib releases the GIL on large buffers). The memo
(a small JSON file, LQPLAN_DIGEST_MEMO, default ~/.cache/lqplan/file-digests.json; "off" disables it) maps an
absolute path to (size, mtime_ns, ctime_ns, inode, device) and the digest: any write to the file changes its
mtime and ctime, so a stale entry is never used. The digest itself depends only on the bytes."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..fsio import check_regular, read_json, remove_stale_temps, user_path, write_json

log = logging.getLogger("lqplan")

MEMO_ENV = "LQPLAN_DIGEST_MEMO"
PIECE = 64 << 20  # bytes per independently hashed piece
_CHUNK = 8 << 20  # read size inside a piece
_MEMO_ENTRIES = 4096  # the memo keeps the newest entries only: it is a speedup, not a record
_MEMO_CAP = 16 << 20  # bytes: 4096 entries take ~1 MB


def memo_path() -> Path | None:
    """Where the digest memo lives (None: no memo)."""
    value = os.environ.get(MEMO_ENV)
    if value is not None:
        if value.strip().lower() in ("", "0", "off", "none"):
            return None
        try:
            return user_path(value, MEMO_ENV)
        except UserError as e:
            log.warning("not using the digest memo: %s", e)
            return None
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lqplan" / "file-digests.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO would hang the hash, a device never end
        check_regular(path, "re-download the model", "weights file")
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
    """The memo's entries; {} when there is none. One that is unreadable (not a regular file, too large, corrupt,
    nested too deeply) is ignored with a warning: every digest is recomputed, nothing else depends on it."""
    if path is None or not (path.exists() or path.is_symlink()):
        return {}
    try:
        memo = read_json(path, f"unset {MEMO_ENV} or point it at a file of its own", f"{MEMO_ENV} memo",
                         cap=_MEMO_CAP, max_depth=3)
    except UserError as e:
        log.warning("ignoring the digest memo: %s", e)
        return {}
    if not isinstance(memo, dict):
        log.warning("ignoring the digest memo %s: not a JSON object", path)
        return {}
    return {k: v for k, v in memo.items() if isinstance(v, dict) and isinstance(v.get("stat"), str)
            and isinstance(v.get("sha256"), str)}


def _write_memo(path: Path | None, memo: dict) -> None:
    if path is None:
        return
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):  # a device, FIFO, folder or link: never replaced
        if not stat.S_ISLNK(st.st_mode) or not path.is_file():
            log.warning("not updating the digest memo %s: it is not a regular file", path)
            return
        path = path.resolve()  # a link to a regular file: update the file, keep the link
    try:
        if path.parent.is_dir():
            remove_stale_temps(path.parent)
        write_json(path, dict(list(memo.items())[-_MEMO_ENTRIES:]))
    except (UserError, OSError):
        pass  # a read-only or full cache folder only costs the next run a rehash


def file_digests(files: Sequence[Path], workers: int | None = None, memo: bool = True) -> list[str]:
    """The content digest (hex) of each file, in order; see the module docstring. memo=False: neither read nor
    write the memo (files about to be renamed: their entries would never be used)."""
    files = [Path(f).resolve() for f in files]
    memo_file = memo_path() if memo else None
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
