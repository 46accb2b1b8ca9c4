"""The budget's one path from the CLI to the solver: resolve_budget makes one ResolvedBudget per process (parse,
unplanned or training terms, the feasibility check before any profiling), make_plan and the solver take it, and the
solver's record names what found the plan."""

from __future__ import annotations

import json

import pytest
from conftest import seeded_tiny_llama

import planner.api as api
import planner.plan.budget as budget_mod
from planner.errors import UserError
from planner.model.discover import discover_matrices, unplanned_bytes
from planner.model.resolve import resolve_model
from planner.plan.budget import ResolvedBudget, resolve_budget
from planner.plan.instance import InfeasibleBudget
from planner.plan.train_memory import TrainShape, fixed_bytes, train_cost_bits
from planner.profile.grid import make_grid
from planner.profile.settings import ProfileSettings

GRID = make_grid("2,4", "64", "8")
SETTINGS = ProfileSettings(GRID, iters=1)
SHAPE = TrainShape(1, 16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    seeded_tiny_llama().save_pretrained(folder)
    source = resolve_model(str(folder))
    return folder, source, discover_matrices(source)


def _cheapest(matrices, cost) -> int:
    return sum(min(cost(p, tuple(m.shape)) for p in GRID if p.applies_to(tuple(m.shape))) for m in matrices)


def test_bits_budget_resolves_to_storage_bits_and_checks_the_cheapest_plan(model):
    _, source, matrices = model
    rb = resolve_budget(source, matrices, GRID, "7bits")
    params = sum(m.shape[0] * m.shape[1] for m in matrices)
    assert isinstance(rb, ResolvedBudget)
    assert (rb.bits, rb.params, rb.unplanned, rb.fixed) == (7 * params, params, unplanned_bytes(source, matrices),
                                                            rb.unplanned)
    assert rb.min_bits == _cheapest(matrices, lambda p, s: p.bits(s))
    assert rb.record() == {"spec": "7bits", "kind": "bits", "value": 7.0, "bits": 7 * params}
    with pytest.raises(InfeasibleBudget, match="raise it to at least") as e:
        resolve_budget(source, matrices, GRID, "0.5bits")
    assert e.value.min_bits == rb.min_bits


def test_training_budget_is_checked_in_training_cost_before_profiling(model):
    _, source, matrices = model
    fixed = fixed_bytes(source.config, unplanned_bytes(source, matrices, float_bytes=2), SHAPE, 8)
    train_min = _cheapest(matrices, lambda p, s: train_cost_bits(p, s, SHAPE))
    store_min = _cheapest(matrices, lambda p, s: p.bits(s))
    assert train_min > store_min  # adapters' training state costs more than their 16-bit storage
    enough = f"{fixed + train_min // 8 + 1}B"
    rb = resolve_budget(source, matrices, GRID, enough, train=SHAPE)
    assert (rb.fixed, rb.min_bits, rb.train) == (fixed, train_min, SHAPE)
    assert rb.bits == (fixed + train_min // 8 + 1 - fixed) * 8
    # between the storage minimum and the training minimum: refused now, in the budget's unit, not after the profile
    short = f"{fixed + (store_min + train_min) // 16}B"
    with pytest.raises(InfeasibleBudget, match=r"raise it to at least .*B \(") as e:
        resolve_budget(source, matrices, GRID, short, train=SHAPE)
    assert e.value.min_bits == train_min
    with pytest.raises(UserError, match="must be in bytes"):
        resolve_budget(source, matrices, GRID, "7bits", train=SHAPE)
    with pytest.raises(UserError, match="besides the planned matrices"):
        resolve_budget(source, matrices, GRID, f"{fixed}B", train=SHAPE)


def test_make_plan_resolves_the_budget_once_and_reuses_given_inputs(model, tmp_path, monkeypatch):
    folder, _, _ = model
    calls = []
    real = budget_mod.resolve_budget
    monkeypatch.setattr(api, "resolve_budget", lambda *a, **k: calls.append(a) or real(*a, **k))
    kw = dict(cache_dir=tmp_path / "cache", device="cpu", progress=False, reports=False)
    first = api.make_plan(str(folder), "7bits", SETTINGS, out_dir=tmp_path / "a", **kw)
    assert len(calls) == 1
    inputs = api.resolve_inputs(str(folder), SETTINGS, "7bits")
    api.make_plan(out_dir=tmp_path / "b", inputs=inputs, **kw)
    assert len(calls) == 2  # resolve_inputs' one call; make_plan reused it
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()
    # the solver's record names what found the plan (the exact DP or a bound), as the Solution does
    assert first.plan.solver["solver"] == first.plan.solver["proof"] != "highs"


def test_training_plan_fits_its_budget_in_training_cost(model, tmp_path):
    folder, source, matrices = model
    fixed = fixed_bytes(source.config, unplanned_bytes(source, matrices, float_bytes=2), SHAPE, 8)
    spec = f"{fixed + _cheapest(matrices, lambda p, s: train_cost_bits(p, s, SHAPE)) // 8 + 4096}B"
    res = api.make_plan(str(folder), spec, SETTINGS, out_dir=tmp_path / "p", cache_dir=tmp_path / "cache",
                        device="cpu", progress=False, reports=False, train=SHAPE)
    train = res.plan.budget["train"]
    assert train["fixed_bytes"] == fixed and train["batch"] == 1 and train["seq_len"] == 16
    spent = sum(train_cost_bits(e.point, e.shape, SHAPE) for e in res.plan.matrices)
    assert spent <= res.plan.budget["bits"] == (int(spec[:-1]) - fixed) * 8


def test_each_verb_is_one_api_call_that_agrees_with_make_plan(model, tmp_path, capsys):
    """`lqplan profile` writes the profile.csv `lqplan plan` wrote for the same settings; `lqplan memory --plan`
    predicts the peak a training plan recorded; `lqplan report` renders the plan's report.md again."""
    from planner import cli

    folder, source, matrices = model
    fixed = fixed_bytes(source.config, unplanned_bytes(source, matrices, float_bytes=2), SHAPE, 8)
    spec = f"{fixed + _cheapest(matrices, lambda p, s: train_cost_bits(p, s, SHAPE)) // 8 + 4096}B"
    flags = ["--model", str(folder), "--bits", "2,4", "--blocks", "64", "--ranks", "8", "--iters", "1",
             "--cache", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]
    plan_dir = tmp_path / "plan"
    assert cli.main(["plan", "--budget", spec, "--train-batch", "1", "--seq-len", "16", *flags,
                     "--out", str(plan_dir)]) == 0
    assert cli.main(["profile", *flags, "--out", str(tmp_path / "prof")]) == 0
    assert (tmp_path / "prof" / "profile.csv").read_bytes() == (plan_dir / "profile.csv").read_bytes()
    capsys.readouterr()
    recorded = json.loads((plan_dir / "plan.json").read_text())["budget"]["train"]
    predicted = api.plan_memory(plan_dir / "plan.json", SHAPE)
    assert predicted["peak_bytes"] == recorded["predicted_peak_bytes"] and predicted["terms"] == recorded["terms"]
    assert cli.main(["memory", "--plan", str(plan_dir / "plan.json"), "--train-batch", "1", "--seq-len", "16"]) == 0
    assert f"{recorded['predicted_peak_bytes'] / 2**30:.2f} GiB" in capsys.readouterr().out
    assert cli.main(["report", "--plan", str(plan_dir / "plan.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == (plan_dir / "report.md").read_text()
