"""The profile cache: <cache>/<model fingerprint>/<settings>/<matrix>.json, one file per matrix
holding every grid point computed so far, replaced atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .grid import GridPoint

log = logging.getLogger("lqplan.profile")


def safe_name(name: str) -> str:
    # Matrix names are dotted module paths; keep them readable but filesystem-safe.
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def cache_folder(cache_dir: Path, fingerprint: str, key: str) -> Path:
    fp = fingerprint.split(":")[-1][:24]
    return Path(cache_dir) / fp / key


def _read_cache(path: Path) -> dict:
    try:
        points = json.loads(path.read_text())["points"]
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        points = None
    if not isinstance(points, dict) or not all(isinstance(v, dict) and "error" in v for v in points.values()):
        log.warning("ignoring unreadable cache file %s (it will be recomputed)", path)
        return {}
    return points


def cached_points(folder: Path, name: str) -> dict:
    return _read_cache(folder / f"{safe_name(name)}.json")


def missing_points(have: dict, info, grid) -> list[GridPoint]:
    """The grid points that apply to matrix `info` and are not among its cached points `have` yet."""
    return [p for p in grid if p.label not in have and p.applies_to(info.shape)]
