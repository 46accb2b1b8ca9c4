"""Dropping a file's memory-mapped pages from this process's resident set.

A loader that maps every safetensors shard (transformers' from_pretrained keeps all of them open until the load ends)
holds every page it has read as part of the process's resident memory: a 26 GB checkpoint ends up as 26 GB of RSS
even though each tensor was copied elsewhere right after it was read. madvise(MADV_DONTNEED) on a file mapping
unmaps its pages from this process: the file and the page cache keep them, and a later read faults them in again
with the same bytes. safetensors maps files private and writable (copy-on-write); there the advice would also
discard pages written since, so a private mapping is advised only while it holds no such page (smaps' Anonymous
is 0), and a shared writable one never. Linux only (/proc/self/smaps); elsewhere release_mapped_pages does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Iterable

MADV_DONTNEED = 4
SMAPS = Path("/proc/self/smaps")
_MADVISE = []


def _madvise():
    if not _MADVISE:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _MADVISE.append(libc.madvise)
    return _MADVISE[0]


def _file_ids(paths: Iterable[str | Path]) -> set[tuple[int, int, int]]:
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    return out


def clean_mappings(paths: Iterable[str | Path]) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `paths` (matched by device and inode) whose pages all equal the
    file's: read-only mappings, and private ones no page of which was written (copied on write)."""
    wanted = _file_ids(paths)
    if not wanted:
        return []
    try:
        lines = SMAPS.read_text().splitlines()
    except OSError:
        return []
    out, current = [], None
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header
            current = None
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            perms = fields[1]
            if (major, minor, int(fields[4])) in wanted and ("w" not in perms or perms[3] == "p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = [start, end, "w" not in perms]  # a writable one is clean only once smaps says so
                out.append(current)
        elif current is not None and fields[:1] == ["Anonymous:"]:
            current[2] = int(fields[1]) == 0
    return [(start, end) for start, end, clean in out if clean]


def release_mapped_pages(paths: Iterable[str | Path]) -> int:
    """Drop this process's resident pages of its clean mappings of `paths` (clean_mappings); returns the bytes of
    address space advised (0 where nothing is mapped or the system has no /proc/self/smaps)."""
    ranges = clean_mappings(paths)
    if not ranges:
        return 0
    madvise = _madvise()
    return sum(end - start for start, end in ranges if madvise(start, end - start, MADV_DONTNEED) == 0)
