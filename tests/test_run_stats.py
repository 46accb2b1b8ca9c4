"""run.json: the plan command's statistics beside its plan, with each phase's wall seconds and the seconds from
process start (the mission command's time is counted from there, imports included)."""

from __future__ import annotations

import json

from conftest import seeded_tiny_llama

from planner import cli
from planner.api import make_plan
from planner.profile.grid import make_grid
from planner.profile.settings import ProfileSettings


def test_run_json_times_every_phase_from_process_start(tmp_path, capsys):
    seeded_tiny_llama().save_pretrained(tmp_path / "model")
    settings = ProfileSettings(make_grid("2,4", "64", "8"), iters=1)
    out = tmp_path / "plan"
    make_plan(str(tmp_path / "model"), "7bits", settings, out_dir=out, cache_dir=tmp_path / "cache", device="cpu",
              progress=False)
    stats = json.loads((out / "run.json").read_text())
    phases = {k: v for k, v in stats.items() if k.startswith("phase_")}
    assert set(phases) == {f"phase_{p}_seconds" for p in
                           ("startup", "resolve", "discover", "profile", "solve", "save", "curve", "reports")}
    assert all(v >= 0 for v in phases.values())
    # the phases are disjoint parts of the process's life so far
    assert sum(phases.values()) <= stats["seconds_from_process_start"] + 0.05
    assert stats["phase_profile_seconds"] >= stats["profile_seconds"] - 0.05  # the profile's own timer is inside
    # `lqplan report` renders the same report from the files (the phase timings are not part of it)
    first = (out / "report.md").read_text()
    assert cli.main(["report", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert (tmp_path / "again" / "report.md").read_text() == first
