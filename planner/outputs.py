"""Output folders written as a unit: built aside in a temp folder and swapped in whole, so a failed, interrupted or
killed run leaves the previous folder and never a mix of two runs (a new plan.json beside an older report)."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .fsio import DIR_MODE, TEMP_SUFFIX, fsync_dir, is_temp_name, os_reason, remove_stale_temps, temp_prefix

_CARRY_LIMIT = 10_000  # entries of other files carried into a rebuilt folder; beyond it the folder is updated in place


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system can't."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry(target: Path, stage: Path, replaced: set[str]) -> bool:
    """Hard-link what `target` holds besides the files this run replaces into `stage` (files the new build has win);
    False when that is not possible or too much (the caller then updates the folder in place)."""
    names = [p.name for p in target.iterdir() if p.name not in replaced and not os.path.lexists(stage / p.name)
             and not is_temp_name(p.name)]
    count = 0
    for name in names:
        src = target / name
        if src.is_dir() and not src.is_symlink():
            for _root, dirs, files in os.walk(src):
                count += len(dirs) + len(files)
                if count > _CARRY_LIMIT:
                    return False
        count += 1
        if count > _CARRY_LIMIT:
            return False
    try:
        for name in names:
            src, dst = target / name, stage / name
            if src.is_symlink() or not src.is_dir():
                os.link(src, dst, follow_symlinks=False)
            else:
                shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
    except OSError:
        return False
    return True


def _holds_cwd(folder: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    folder = folder.resolve()
    return cwd == folder or folder in cwd.parents


def _publish(stage: Path, target: Path, replaced: set[str]) -> None:
    if not target.exists():
        os.rename(stage, target)
        fsync_dir(target.parent)
        return
    if not _holds_cwd(target) and _carry(target, stage, replaced):
        os.chmod(stage, stat.S_IMODE(target.stat().st_mode))
        if _exchange(stage, target):
            shutil.rmtree(stage, ignore_errors=True)  # now the previous folder
        else:
            aside = target.with_name(f"{temp_prefix(target.name)}{secrets.token_hex(4)}{TEMP_SUFFIX}")
            os.rename(target, aside)
            os.rename(stage, target)
            shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(target.parent)
        return
    # in place (the folder holds the working directory, or too much else): each file replaced atomically, and the
    # previous run's files that this one did not write removed, so no mix of runs remains
    new = {p.name for p in stage.iterdir()}
    for p in sorted(stage.iterdir(), key=lambda p: p.name == "plan.json"):  # plan.json, which the rest serves, last
        dst = target / p.name
        if p.is_dir() and not p.is_symlink():
            if dst.is_dir() and not dst.is_symlink():
                old = dst.with_name(f"{temp_prefix(dst.name)}{secrets.token_hex(4)}{TEMP_SUFFIX}")
                os.rename(dst, old)
                os.rename(p, dst)
                shutil.rmtree(old, ignore_errors=True)
                continue
        os.replace(p, dst)
    for name in replaced - new:
        gone = target / name
        if gone.is_dir() and not gone.is_symlink():
            shutil.rmtree(gone, ignore_errors=True)
        else:
            gone.unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)
    fsync_dir(target)


@contextmanager
def output_folder(folder: str | os.PathLike, replaced: Iterable[str] = ()):
    """Write an output folder as a unit: yield an empty temp folder beside `folder` to build the new contents in;
    on success it takes the place of `folder` in one atomic swap, so a failed or killed run leaves the previous
    folder whole and never a mix of two runs. `replaced`: the names (files or folders) of what this kind of run
    writes; the previous run's ones go even where this run writes fewer (a plan without reports), while every
    other file in the folder is kept (carried over as hard links). A folder holding the working directory is
    updated in place, file by file. Stale temp files and folders of killed runs beside and inside it are removed
    first."""
    target = Path(os.path.realpath(folder))  # a link to a folder: the folder is rebuilt, the link kept
    if target.exists() and not target.is_dir():
        raise UserError(f"cannot write the output folder {target}: it is a file; choose another folder (--out)")
    # a folder holding the working directory is updated in place: its staging folder goes inside it
    home = target if target.is_dir() and _holds_cwd(target) else target.parent
    try:
        home.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        if target.is_dir():
            remove_stale_temps(target)
        stage = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=home))
        os.chmod(stage, DIR_MODE)
    except OSError as e:
        fix = "choose a writable folder (--out)"
        raise UserError(f"cannot write the output folder {target}: {os_reason(e, fix)}") from None
    try:
        yield stage
        _publish(stage, target, set(replaced))
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        fix = "free disk space or choose another folder (--out)"
        raise UserError(f"cannot write the output folder {target}: {os_reason(e, fix)}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_writable(folder, option: str) -> None:
    """Fail before any work (and without creating anything) when `folder` could never be written."""
    path = probe = Path(folder).expanduser()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the nearest existing ancestor decides whether the folder can be created
    if not probe.is_dir():
        raise UserError(f"{option} {folder} cannot be created: {probe} is a file, not a folder; "
                        f"choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise UserError(f"{option} {folder} {what}; choose a folder you can write to with {option}")

