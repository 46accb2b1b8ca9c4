"""Atomic file writes: temp file in the same folder, fsync, rename. A killed run leaves old or new, never half."""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a plan or report should get the same mode as any other file the user writes.
_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    # The rename itself must survive a power cut, not only the file's bytes; not every OS can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = 600.0) -> int:
    """Delete temp files that a killed writer left in `folder` (they are never read as results); returns how many.
    Only files untouched for `older_than_s` go: another live process (a distributed profile) may be writing one."""
    removed = 0
    cutoff = time.time() - older_than_s
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable folder (--out, --cache)") from None
    try:
        os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        # again: a writer may have replaced the temp file with one of its own (safetensors' save_file does, 0600)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another folder "
                        "(--out, --cache)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_paragraphs(path: Path, what: str, fix: str) -> list[str]:
    """Paragraphs (split on blank lines) of a UTF-8 plain-text file, for calibration and training text. Every way
    the file can be unusable is a UserError naming `what` the file is for; `fix` says what to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; pass one UTF-8 text file ({fix})")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}; pass a readable UTF-8 text file") from None
    if b"\0" in raw[:4096]:
        raise UserError(f"{what} {path} looks binary; pass plain UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 (byte {e.start}); convert it, e.g. with iconv") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs or sum(len(p) for p in paragraphs) < 20:
        raise UserError(f"{what} {path} has no text; give it at least a few sentences")
    return paragraphs
