"""run.json: the run statistics (timings, points computed and cached) `lqplan plan` leaves beside a plan, and read
back for its reports only while they belong to that plan.json."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..fsio import read_json, sha256_file
from ..schema import INT, NUM, STR, problem

log = logging.getLogger("lqplan")

RUN_STATS = "run.json"

_RUN_SPEC = {"profile_seconds?": NUM, "computed_points?": INT, "cached_points?": INT, "computed_matrices?": INT,
             "cached_profile_seconds?": NUM,
             "total_seconds?": NUM, "solver_seconds?": NUM, "plan_sha256?": STR}


def read_run_stats(folder: Path, plan_path: Path | None = None) -> dict:
    """The run statistics `make_plan` left beside a plan (run.json), or {} when there are none readable or they
    were measured for another plan.json than `plan_path`'s: they only decorate the report, so such a file is
    skipped with a warning rather than refused."""
    path = Path(folder) / RUN_STATS
    if not path.exists():
        return {}
    try:
        stats = read_json(path, "it is skipped")
    except UserError as e:
        log.warning("ignoring run statistics: %s", e)
        return {}
    found = problem(stats, _RUN_SPEC, "run.json")
    if found is None and not all(isinstance(v, (int, float, str)) for v in stats.values()):
        found = "run.json holds a value that is not a number or a string"
    if found:
        log.warning("ignoring unreadable run statistics %s: %s", path, found)
        return {}
    digest = stats.pop("plan_sha256", None)
    if plan_path is not None and digest is not None and Path(plan_path).is_file() and \
            digest != sha256_file(plan_path):
        log.warning("ignoring run statistics %s: they were measured for another plan.json", path)
        return {}
    return stats
