"""The main job end to end on the embedded MiniLM (issue 3, "Must show"): `lqplan plan --budget 2.75bits` through
planner.cli.main on a small grid -- outputs, budget use, ILP vs uniform configurations, Fisher, caching."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import planner.cli.commands
from planner.cli import main
from planner.plan.document import SCHEMA, Plan
from planner.plan.ilp import uniform_solutions

BUDGET = 2.75
GRID = ["--bits", "2,3,4", "--blocks", "64", "--ranks", "4,8", "--iters", "1"]
CONFIGS = 3 * 1 * 2
BIGGER = ["--bits", "2,3,4,8", "--blocks", "64", "--ranks", "4,8", "--iters", "1"]  # one more bit width
NEW_CONFIGS = 1 * 1 * 2
MATRICES = 36
CALIB = ["--calib", "pydoc", "--calib-tokens", "512"]
_COUNTS = re.compile(r"^profile: (\d+)\b.*points computed.*?(\d+) from cache", re.M)


def _cli(*argv) -> tuple[int, str, object]:
    """Run the CLI in-process; return its exit code, stdout and the PlanResult make_plan returned."""
    seen = []
    real = planner.cli.commands.make_plan

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(planner.cli.commands, "make_plan", spy)
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), (seen[-1] if seen else None)


def _counts(text: str) -> tuple[int, int]:
    m = _COUNTS.search(text)
    assert m, f"no 'profile: N points computed, M from cache' line in:\n{text}"
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="session")
def job(tmp_path_factory):
    """Every run of the main job the tests look at, done once: data-free, its rerun, Fisher, a bigger grid."""
    root = tmp_path_factory.mktemp("main-job")
    cache, plain_out = root / "cache", root / "plain"

    def plan(out, grid=GRID, *extra):
        rc, text, res = _cli("plan", "--budget", f"{BUDGET}bits", *grid, "--cache", cache, "--out", out, "--quiet",
                             *extra)
        assert rc == 0, text
        return SimpleNamespace(text=text, res=res, out=Path(out))

    plain = plan(plain_out)
    first_plan_bytes = (plain_out / "plan.json").read_bytes()
    rerun = plan(plain_out)  # exactly the same arguments
    fisher = plan(root / "fisher", GRID, *CALIB)
    bigger = plan(root / "bigger", BIGGER, "--no-report")
    return SimpleNamespace(plain=plain, rerun=rerun, fisher=fisher, bigger=bigger,
                           first_plan_bytes=first_plan_bytes)


def test_outputs_exist_and_the_plan_validates(job):
    out = job.plain.out
    for name in ("plan.json", "report.md", "report.html", "heatmap.png", "allocation.csv", "profile.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plan = Plan.load(out / "plan.json")  # load() validates: bytes per matrix = exact config cost, totals add up
    assert json.loads((out / "plan.json").read_text())["schema"] == SCHEMA
    assert plan.model["name"] == "minilm" and len(plan.matrices) == MATRICES
    assert plan.solver["status"] == "optimal" and plan.solver["proof"] in ("lp-bound", "fixing", "dp", "mip")

    page = (out / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.IGNORECASE)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)  # self-contained
    assert "<link" not in page.lower() and "<script" not in page.lower()

    alloc = pd.read_csv(out / "allocation.csv")
    assert list(alloc["name"]) == [e.name for e in plan.matrices] and alloc["bytes"].sum() == plan.totals["bytes"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| solver status | optimal |" in md
    assert "| gap to LP relaxation bound (includes the integrality gap) |" in md
    # the tolerance is named only for the proofs that hold within it; the DP and reduced-cost fixing are exact
    assert "| optimality proof | proven optimal" in md
    assert ("within relative MIP tolerance 1e-06" in md) == (plan.solver["proof"] in ("lp-bound", "mip")), md


def test_plan_is_within_the_budget_and_uses_it_to_one_config_step(job):
    """'Within one config step': the budget left over is smaller than the cheapest single-matrix upgrade, i.e. no
    matrix can move to any configuration of its grid with a lower error without the plan exceeding the budget."""
    plan, table = Plan.load(job.plain.out / "plan.json"), job.plain.res.table
    params = plan.totals["params"]
    budget_bits = plan.budget["bits"]
    assert budget_bits == int(BUDGET * params)
    assert plan.totals["bits"] <= budget_bits and plan.totals["bits_per_param"] <= BUDGET

    rows = table.set_index(["matrix", "label"])
    chosen = rows.loc[[(e.name, e.point.label) for e in plan.matrices]]
    assert int(chosen["storage_bits"].sum()) == plan.totals["bits"]
    assert chosen["error"].sum() == pytest.approx(plan.totals["error"], rel=1e-12)

    slack = budget_bits - plan.totals["bits"]
    steps = []
    for e in plan.matrices:
        own = rows.loc[(e.name, e.point.label)]
        mine = table.loc[table["matrix"] == e.name]
        better = mine.loc[(mine["storage_bits"] > own["storage_bits"]) & (mine["error"] < own["error"])]
        steps += list(better["storage_bits"] - own["storage_bits"])
    assert steps, "every matrix already has its best configuration: the budget does not bind, the test is void"
    assert slack < min(steps), (slack, min(steps))
    assert BUDGET - plan.totals["bits_per_param"] < min(steps) / params


def test_ilp_beats_every_uniform_configuration_that_fits(job):
    plan, table = job.plain.res.plan, job.plain.res.table
    uniform = uniform_solutions(table, plan.budget["bits"])
    assert len(uniform) == CONFIGS
    fitting = uniform.loc[uniform["fits"]]
    assert len(fitting) >= 2 and (~uniform["fits"]).any()  # some fit and some don't: the comparison has teeth
    assert (fitting["total_bits"] <= plan.budget["bits"]).all()
    assert plan.totals["error"] <= fitting["total_error"].min()
    assert plan.totals["error"] < fitting["total_error"].min()  # on this profile, mixing strictly helps


def test_fisher_changes_the_plan_and_lowers_the_weighted_error(job):
    res, plain = job.fisher.res, Plan.load(job.plain.out / "plan.json")
    fplan = Plan.load(job.fisher.out / "plan.json")
    c = res.comparison
    assert fplan.method["fisher"]["source"] == "pydoc" and fplan.method["fisher"]["comparison"] == c
    assert fplan.totals["bits_per_param"] <= BUDGET

    # the comparison's data-free plan is the data-free run's plan, and the differences are counted right
    assert c["plain_plan_unweighted_error"] == pytest.approx(plain.totals["error"], rel=1e-12)
    differ = sum(1 for e in fplan.matrices if plain.by_name()[e.name].point != e.point)
    assert c["changed_matrices"] == differ >= 1
    assert c["matrices"] == MATRICES
    # the Fisher plan is best on the weighted error; the data-free plan is best on the plain one
    assert c["fisher_plan_weighted_error"] == pytest.approx(fplan.totals["error"], rel=1e-12)
    assert c["fisher_plan_weighted_error"] <= c["plain_plan_weighted_error"]
    assert c["plain_plan_unweighted_error"] <= c["fisher_plan_unweighted_error"]

    assert re.search(r"^fisher: weighted error .* matrices differ$", job.fisher.text, re.M)
    md = (job.fisher.out / "report.md").read_text(encoding="utf-8")
    assert "## Fisher weighting vs the data-free plan" in md
    assert f"| Fisher-weighted error | {c['fisher_plan_weighted_error']:.6g} | {c['plain_plan_weighted_error']:.6g} |" \
        in md
    assert f"differs between the two plans: {differ} of {MATRICES}" in md


def test_rerun_with_the_same_arguments_computes_nothing(job):
    assert job.plain.res.stats.computed_points == MATRICES * CONFIGS
    assert _counts(job.plain.text) == (MATRICES * CONFIGS, 0)
    stats = job.rerun.res.stats
    assert stats.computed_points == 0 and stats.computed_matrices == []
    assert stats.cached_points == MATRICES * CONFIGS
    assert _counts(job.rerun.text) == (0, MATRICES * CONFIGS)
    # same inputs, same plan file, byte for byte
    assert (job.rerun.out / "plan.json").read_bytes() == job.first_plan_bytes
    pd.testing.assert_frame_equal(job.rerun.res.table, job.plain.res.table)


def test_a_bigger_grid_computes_only_the_new_configurations(job):
    stats = job.bigger.res.stats
    assert stats.computed_points == MATRICES * NEW_CONFIGS
    assert len(stats.computed_matrices) == MATRICES
    assert stats.cached_points == MATRICES * CONFIGS
    assert _counts(job.bigger.text) == (MATRICES * NEW_CONFIGS, MATRICES * CONFIGS)
    big, small = job.bigger.res.table, job.plain.res.table
    assert len(big) == MATRICES * (CONFIGS + NEW_CONFIGS)
    assert set(big["bits"]) == {2, 3, 4, 8}
    # the old points are the cached numbers, untouched
    old = big.loc[big["label"].isin(set(small["label"]))].reset_index(drop=True)
    assert np.array_equal(old["error"].to_numpy(), small["error"].to_numpy())


def test_infeasible_budget_names_the_minimum_and_what_the_adapters_cost(tmp_path, capsys):
    # ranks {16, 32, 64} (a 4096-wide model's default) cannot fit 2.75 bits on MiniLM's 384-wide matrices: fails
    # before profiling
    rc = main(["plan", "--budget", "2.75bits", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"),
               "--quiet", "--ranks", "16,32,64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "raise it to at least 3.0660bits" in err
    assert "rank-16 adapters alone cost 1.0000 bits/param" in err and "--ranks 4,8,16" in err
    assert not (tmp_path / "c").exists()  # nothing was profiled

    rc = main(["plan", "--budget", "52MB", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--quiet",
               "--ranks", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "the budget, 52.000MB" in err and "raise it to at least 52.459MB" in err
