"""What `lqplan report` renders again from files: a plan.json, the profile table it was made from (checked to
belong to it: same model, same matrices and shapes, the profile.csv its profile.json was written with) and the run
statistics the first render showed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..fsio import read_json
from ..plan.document import Plan
from ..profile.table import read_profile_csv
from ..schema import INT, STR, list_of, problem
from .run_stats import read_run_stats

_PROFILE_SPEC = {"schema?": STR, "model?": {"fingerprint?": STR}, "fingerprint?": STR, "sha256?": STR,
                 "rows?": INT, "columns?": list_of(STR)}


def read_report_sources(plan_path, profile=None) -> tuple[Plan, pd.DataFrame, dict]:
    """(plan, profile table, run statistics) for re-rendering the reports of `plan_path`. `profile`: profile.csv or
    its folder (default: beside the plan). The statistics are those the first render showed: the phase timings,
    written after it, are left out, and the solver's seconds go back into plan.solver (kept out of plan.json)."""
    plan_path = Path(plan_path)
    plan = Plan.load(plan_path)
    folder = plan_path.parent
    csv = Path(profile) if profile else folder / "profile.csv"
    if csv.is_dir():
        csv = csv / "profile.csv"
    table, digest = read_profile_csv(csv, with_digest=True)
    check_profile_matches(plan, table, csv.with_name("profile.json"), digest)
    stats = {k: v for k, v in read_run_stats(folder, plan_path).items()
             if not k.startswith("phase_") and k != "seconds_from_process_start"}
    if "solver_seconds" in stats:
        plan.solver["seconds"] = stats.pop("solver_seconds")
    return plan, table, stats


def check_profile_matches(plan, table, manifest: Path, digest: str | None = None) -> None:
    """The plan and the profile table must describe the same model (fingerprint in profile.json, matrix names and
    shapes), and profile.csv must be the one profile.json was written with (its sha256)."""
    if manifest.exists():
        fix = "re-create the profile with `lqplan profile`"
        man = read_json(manifest, fix)
        found = problem(man, _PROFILE_SPEC, "profile.json")
        if found:
            raise UserError(f"{manifest} is malformed: {found}; {fix}")
        model = man.get("model") or {}
        fp = man.get("fingerprint") or model.get("fingerprint")
        if fp and fp != plan.fingerprint:
            raise UserError(f"the profile table {manifest.with_name('profile.csv')} is for another model (fingerprint "
                            f"{str(fp).split(':')[-1][:12]}…) than the plan ({plan.model.get('name')!r}, "
                            f"{plan.fingerprint.split(':')[-1][:12]}…); pass --profile with that plan's profile.csv")
        if digest is not None and man.get("sha256") not in (None, digest):
            raise UserError(f"{manifest.with_name('profile.csv')} is not the table {manifest.name} was written with "
                            f"(its sha256 differs: files of two runs mixed, or edited); {fix}")
    missing = sorted({e.name for e in plan.matrices} - set(table["matrix"]))
    if missing:
        raise UserError(f"the profile table lacks {len(missing)} of the plan's matrices (e.g. {missing[0]}): it is "
                        "for another model or grid; pass --profile with that plan's profile.csv")
    shapes = table.drop_duplicates("matrix").set_index("matrix")[["m", "n"]]
    for e in plan.matrices:
        m, n = (int(x) for x in shapes.loc[e.name])
        if e.shape != (m, n):
            raise UserError(f"plan entry {e.name} has shape {list(e.shape)} but the profile measured it as {[m, n]} "
                            "(the plan was edited or is for another model); re-create it with `lqplan plan`")
