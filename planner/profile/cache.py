"""The profile cache: <cache>/<model fingerprint>/<settings>/<matrix>.json, one file per matrix
holding every grid point computed so far, replaced atomically."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

from ..errors import UserError
from ..fsio import read_json
from .grid import GridPoint

log = logging.getLogger("lqplan.profile")

# The cache folder every verb uses unless told otherwise (profiles, calibration statistics, reference metrics).
DEFAULT_CACHE = Path(".lqplan-cache")


_NAME_MAX = 200  # characters of a cache file name before ".json": file systems allow 255 bytes


def safe_name(name: str) -> str:
    """A matrix name as a cache file name: readable (dotted module paths stay as they are) but filesystem-safe,
    ASCII, and bounded in length (a longer name keeps its start and a digest of the whole)."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in name)
    if safe.startswith("."):
        safe = "_" + safe[1:]  # never a hidden file (temp files are hidden)
    if len(safe) > _NAME_MAX:
        safe = f"{safe[:_NAME_MAX - 17]}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return safe


def cache_folder(cache_dir: Path, fingerprint: str, key: str) -> Path:
    fp = fingerprint.split(":")[-1][:24]
    return Path(cache_dir) / fp / key


def _read_cache(path: Path) -> dict:
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        doc = read_json(path, "it will be recomputed", max_depth=8)
        points = doc["points"] if isinstance(doc, dict) else None
    except (UserError, KeyError):
        points = None
    if not isinstance(points, dict) or not all(_complete(v) for v in points.values()):
        log.warning("ignoring unreadable cache file %s (it will be recomputed)", path)
        return {}
    return points


# Every field the profile table takes from a cached point (run.build_table), with the check its value must pass.
POINT_FIELDS = {
    "error": lambda v: _number(v) and math.isfinite(v) and v >= 0,
    "error_unweighted": lambda v: _number(v) and math.isfinite(v) and v >= 0,
    "quant_error": lambda v: _number(v) and (math.isnan(v) or v >= 0),
    "best_iter": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "regressed": lambda v: isinstance(v, bool),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _complete(point) -> bool:
    """A cached point a table can be built from; anything less makes the whole file unreadable (recomputed)."""
    return isinstance(point, dict) and all(k in point and ok(point[k]) for k, ok in POINT_FIELDS.items())


def cached_points(folder: Path, name: str) -> dict:
    return _read_cache(folder / f"{safe_name(name)}.json")


def missing_points(have: dict, info, grid) -> list[GridPoint]:
    """The grid points that apply to matrix `info` and are not among its cached points `have` yet."""
    return [p for p in grid if p.label not in have and p.applies_to(info.shape)]
