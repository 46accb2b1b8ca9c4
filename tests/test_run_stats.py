"""run.json: the plan command's statistics beside its plan, with each phase's wall seconds and the seconds from
process start (the mission command's time is counted from there, imports included)."""

from __future__ import annotations

import json

import pytest

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


def test_a_cached_rerun_keeps_what_profiling_cost(tmp_path):
    """The rerun reads every point from the cache; its run.json and report still say what computing them took."""
    seeded_tiny_llama().save_pretrained(tmp_path / "model")
    settings = ProfileSettings(make_grid("2,4", "64", "8"), iters=1)
    kw = dict(cache_dir=tmp_path / "cache", device="cpu", progress=False)
    first = make_plan(str(tmp_path / "model"), "7bits", settings, out_dir=tmp_path / "a", **kw)
    again = make_plan(str(tmp_path / "model"), "7bits", settings, out_dir=tmp_path / "b", **kw)
    assert first.stats.cached_points == 0 and first.stats.cached_seconds == 0
    assert again.stats.computed_points == 0 and again.stats.cached_points == first.stats.points
    cache = [p for f in (tmp_path / "cache").rglob("*.json") for p in json.loads(f.read_text()).get("points", {}).values()]
    assert again.stats.cached_seconds == pytest.approx(sum(p["seconds"] for p in cache), rel=1e-9) and cache  # float sums
    assert 0.5 * first.stats.compute_seconds <= again.stats.cached_seconds <= first.stats.compute_seconds + 1e-6
    stats = json.loads((tmp_path / "b" / "run.json").read_text())
    assert stats["cached_profile_seconds"] == round(again.stats.cached_seconds, 2)
    assert "the cached ones took" in again.stats.summary()
    assert "computing time of the cached points" in (tmp_path / "b" / "report.md").read_text(encoding="utf-8")
