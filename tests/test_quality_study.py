"""Smoke test of the quality study (bench/quality_study.py --quick on CPU): every arm runs, every output is written,
the bytes each applied model holds equal its plan's, and the measured errors reproduce the profiled ones."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "bench" / "quality_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("quality_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    assert study.main(["--out", str(out), "--cache", str(out / "cache"), "--device", "cpu", "--quick", "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_output(quick_run):
    out, result = quick_run
    assert result["schema"] == "lqplan.quality/1"
    assert (out / "cache").is_dir()  # the profile was cached where it was told
    for name in ("quality.md", "results.json", "error_vs_bits.png", "cosine_vs_bits.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "error_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind
    md = (out / "quality.md").read_text()
    assert "python bench/quality_study.py" in md and md.count("**PASS**") + md.count("**FAIL**") == 3


def test_every_arm_runs_at_every_budget_with_exact_bytes(quick_run, study):
    _, result = quick_run
    assert result["budgets"] == [2.75, 3.5]
    rows = result["rows"]
    assert {(r["budget"], r["arm"]) for r in rows} == {(b, a) for b in (2.75, 3.5) for a in study.ARMS}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows)  # the quick grid has a fitting configuration for every arm at both budgets
    for r in ok:
        assert r["bytes_match"] and r["bytes_held"] == r["plan_bytes"]
        assert r["bits_per_param"] <= r["budget"] + 1e-12
        assert 0 < r["cos_before_mean"] <= 1 and 0 < r["cos_after_mean"] <= 1
        assert math.isfinite(r["total_error"]) and r["fisher_error"] > 0
        assert len(r["seeds"]) == 1
    # The applied layers reproduce the profiled decompositions (QA-LoRA's pooled adapter included).
    assert result["max_table_mismatch"] < 1e-4
    qalora = next(r for r in ok if r["arm"] == "qalora")
    assert qalora["config"].startswith("qalora-int2-b64")
    qlora = next(r for r in ok if r["arm"] == "qlora" and r["budget"] == 2.75)
    assert qlora["init"] == "qlora" and qlora["config"] == "nf2-b64-dq8/256-r4"


def test_claims_follow_from_the_numbers(quick_run, study):
    _, result = quick_run
    assert len(result["claims"]) == 3 and {c["status"] for c in result["claims"]} <= {"PASS", "FAIL"}
    assert all(c["reason"] for c in result["claims"] if c["status"] == "FAIL")  # a failed claim says why
    first = result["claims"][0]
    ilp = {r["budget"]: r for r in result["rows"] if r["arm"] == "ilp"}
    wins = [ilp[b]["table_error"] < result["uniform_best"][str(b)]["total_error"] for b in (2.75, 3.5)]
    assert first["status"] == ("PASS" if all(wins) else "FAIL")
    # Recomputing the claims from the stored rows gives the same verdicts.
    again = study.check_claims(result["rows"], result["uniform_best"], result["budgets"])
    assert [c["status"] for c in again] == [c["status"] for c in result["claims"]]


def test_bad_options_are_one_line_errors(study, tmp_path, capsys):
    assert study.main(["--out", str(tmp_path), "--budgets", "2.5,x", "--quick"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert study.main(["--out", str(tmp_path), "--steps", "0", "--quick"]) == 2
    assert not list(tmp_path.iterdir())  # rejected before any work
