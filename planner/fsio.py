"""Files in and out. Every file lqplan reads goes through read_regular: a regular file within a stated size cap, so a
FIFO never hangs a run and /dev/zero never fills the memory. Writes are atomic (temp file in the same folder, fsync,
rename: a killed run leaves old or new, never half), temp files are named so that the next run can tell a dead
writer's from a live one's. Whole output folders: planner.outputs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

TEMP_SUFFIX = ".tmp"

# Size caps of what lqplan reads, stated in the refusal. Documents: plan.json, run.json, profile.json, manifests,
# config.json, the shard index, caches (a 70B plan is ~0.3 MB). Tables: profile.csv. Text: calibration, training
# and evaluation text.
DOC_CAP = 64 << 20
TABLE_CAP = 512 << 20
TEXT_CAP = 1 << 30
JSON_DEPTH = 64  # no document lqplan reads nests deeper than ~6 levels


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a plan or report should get the same mode as any other file the user writes.
_FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def size_text(n: int) -> str:
    """Bytes in the unit a person reads best (binary units, as the caps are powers of two)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


# ---- paths given by the user ------------------------------------------------------------------------------------

NAME_MAX = 255  # bytes per path component on every common Linux / macOS file system


def user_path(value, option: str = "path") -> Path:
    """A path from the user, ~ expanded, checked for what the OS would refuse with a traceback: an unknown ~user,
    a component longer than NAME_MAX bytes, a NUL byte."""
    text = os.fspath(value)
    if "\0" in text:
        raise UserError(f"{option} {text!r} contains a NUL character; pass a real path")
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        user = text.split("/", 1)[0]
        raise UserError(f"{option} {text}: {user} names no user on this machine; write the path out in full") from None
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise UserError(f"{option} {text[:60]}...: a path component is {size} bytes long, more than the "
                            f"{NAME_MAX} a file name may have; use shorter names")
    return path


def os_reason(e: OSError, fix: str) -> str:
    """An OSError as its cause and `fix`, or the fix its kind calls for (a full disk, a name too long)."""
    if e.errno == errno.ENAMETOOLONG:
        return "a name in the path is longer than the file system allows (255 bytes); use shorter names"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror}; free disk space or choose another folder (--out, --cache)"
    return f"{e.strerror or e}; {fix}"


# ---- reading ----------------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path, fix: str, what: str = "", cap: int | None = None) -> os.stat_result:
    """stat() of `path`, which must be a regular file (symbolic links followed) of at most `cap` bytes; every other
    outcome is a UserError naming `what` the file is for and `fix`."""
    name = f"{what} {path}" if what else str(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{name} does not exist; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {name}: {os_reason(e, fix)}") from None
    except ValueError:  # an embedded NUL
        raise UserError(f"{name} is not a valid path; {fix}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{name} is a folder, not a file; {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{name} is {_kind(st.st_mode)}, not a regular file; {fix}")
    if cap is not None and st.st_size > cap:
        raise UserError(f"{name} is {size_text(st.st_size)}, more than the {size_text(cap)} lqplan reads from such "
                        f"a file; {fix}")
    return st


def read_regular(path, fix: str, what: str = "", cap: int = DOC_CAP) -> bytes:
    """The bytes of a regular file of at most `cap` bytes (see check_regular). Opened non-blocking and checked
    again on the open descriptor, so a file swapped for a FIFO between the checks cannot hang the read."""
    check_regular(path, fix, what, cap)
    name = f"{what} {path}" if what else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UserError(f"cannot read {name}: {os_reason(e, fix)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{name} is {_kind(st.st_mode)}, not a regular file; {fix}")
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(fd, min(left, 8 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise UserError(f"cannot read {name}: {os_reason(e, fix)}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > cap:
        raise UserError(f"{name} grew past the {size_text(cap)} lqplan reads from such a file; {fix}")
    return data


_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text, counted without recursion (strings skipped)."""
    import numpy as np

    text = _JSON_STRING.sub(b'""', raw)
    a = np.frombuffer(text, dtype=np.uint8)
    steps = (np.isin(a, (0x5B, 0x7B)).astype(np.int64) - np.isin(a, (0x5D, 0x7D)).astype(np.int64))
    return int(np.cumsum(steps).max()) if steps.size else 0


def parse_json(raw: bytes, name: str, fix: str, max_depth: int = JSON_DEPTH, object_pairs_hook=None):
    """JSON bytes -> object, every failure a UserError: not UTF-8, nested deeper than max_depth (checked before the
    parser, which recurses), not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not valid JSON: not UTF-8 (byte {e.start}); {fix}") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise UserError(f"{name} is not valid JSON for lqplan: it nests {depth} levels deep, more than the "
                        f"{max_depth} any of its documents has; {fix}")
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise UserError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, a duplicate key (hook)
        raise UserError(f"{name} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"{fix}") from None


def read_json(path, fix: str, what: str = "", cap: int = DOC_CAP, max_depth: int = JSON_DEPTH):
    """A JSON document from a regular file (read_regular), parsed with bounded depth (parse_json)."""
    name = f"{what} {path}" if what else str(path)
    return parse_json(read_regular(path, fix, what, cap), name, fix, max_depth)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_paragraphs(text: str) -> list[str]:
    # CRLF (Windows) and CR-only (old Mac) line ends read as LF; a line of only spaces or tabs is a blank line
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in re.split(r"\n[ \t\f\v]*\n", text) if p.strip()]


def read_paragraphs(path: Path, what: str, fix: str, cap: int = TEXT_CAP) -> list[str]:
    """Paragraphs (split on blank lines; any line-end convention) of a UTF-8 plain-text file, for calibration,
    training and evaluation text. Every way the file can be unusable is a UserError naming `what` the file is for;
    `fix` says what to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; pass one UTF-8 text file ({fix})")
    raw = read_regular(path, f"pass a readable UTF-8 text file ({fix})", what, cap)
    if b"\0" in raw[:4096]:
        raise UserError(f"{what} {path} looks binary; pass plain UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 (byte {e.start}); convert it, e.g. with iconv") from None
    paragraphs = _split_paragraphs(text)
    if not paragraphs or sum(len(p) for p in paragraphs) < 20:
        raise UserError(f"{what} {path} has no text; give it at least a few sentences")
    return paragraphs


# ---- temp files of lqplan's own naming ----------------------------------------------------------------------------

# Every temp file or folder is named .<target name>.<host>-<pid>.<random>.tmp: a later run removes those whose
# process is gone (same host) and any older than STALE_AFTER_S, never a live writer's.
STALE_AFTER_S = 600.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\..+\.([0-9a-f]{8})-(\d+)\.[^./]+\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of lqplan's own temp files or folders."""
    return _TEMP_RE.match(name) is not None


def _tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def temp_prefix(name: str) -> str:
    return f".{name}.{_tag()}."


def _owner_gone(name: str) -> bool:
    m = _TEMP_RE.match(name)
    if m is None or m.group(1) != _HOST:
        return False
    pid = int(m.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> int:
    """Delete the temp files and folders that killed lqplan writers left in `folder` (they are never read as
    results): those whose writer process is gone, and any untouched for `older_than_s` (a live writer on another
    host of a shared cache keeps its own). Returns how many went."""
    removed = 0
    cutoff = time.time() - older_than_s
    try:
        entries = list(Path(folder).glob(f".*{TEMP_SUFFIX}"))
    except OSError:
        return 0
    for tmp in entries:
        try:
            st = tmp.lstat()
            if not (_owner_gone(tmp.name) or st.st_mtime < cutoff):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def fsync_dir(folder: Path) -> None:
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


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`. A path that exists
    and is not a regular file (a device, a FIFO, a folder) is never replaced."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {os_reason(e, 'choose another folder (--out, --cache)')}") from None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UserError(f"cannot write {path}: it is {_kind(st.st_mode)}, which lqplan never replaces; "
                        "choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {os_reason(e, 'choose a writable folder (--out, --cache)')}") from None
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
        fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        fix = "free disk space or choose another folder (--out, --cache)"
        raise UserError(f"cannot write {path}: {os_reason(e, fix)}") from None
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
