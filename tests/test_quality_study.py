"""Smoke test of the quality study (bench/quality_study.py --quick on CPU): every arm runs, every output is written,
the bytes each applied model holds equal its plan's, and the measured errors reproduce the profiled ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from planner.study import quality_encoder_report as report
from planner.study.quality_encoder import main  # bench/quality_study.py's command line


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    assert main(["--out", str(out), "--cache", str(out / "cache"), "--device", "cpu", "--quick", "--quiet"]) == 0
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


def test_every_arm_runs_at_every_budget_with_exact_bytes(quick_run):
    _, result = quick_run
    assert result["budgets"] == [2.75, 3.5]
    rows = result["rows"]
    assert {(r["budget"], r["arm"]) for r in rows} == {(b, a) for b in (2.75, 3.5) for a in report.ARMS}
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


def test_claims_follow_from_the_numbers(quick_run):
    _, result = quick_run
    assert len(result["claims"]) == 3 and {c["status"] for c in result["claims"]} <= {"PASS", "FAIL"}
    assert all(c["reason"] for c in result["claims"] if c["status"] == "FAIL")  # a failed claim says why
    first = result["claims"][0]
    ilp = {r["budget"]: r for r in result["rows"] if r["arm"] == "ilp"}
    wins = [ilp[b]["table_error"] < result["uniform_best"][str(b)]["total_error"] for b in (2.75, 3.5)]
    assert first["status"] == ("PASS" if all(wins) else "FAIL")
    # Recomputing the claims from the stored rows gives the same verdicts.
    again = report.check_claims(result["rows"], result["uniform_best"], result["budgets"])
    assert [c["status"] for c in again] == [c["status"] for c in result["claims"]]


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--budgets", "2.5,x", "--quick"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--steps", "0", "--quick"]) == 2
    assert not list(tmp_path.iterdir())  # rejected before any work


def test_errors_only_reproduces_the_errors_and_skips_the_downstream_claims(quick_run, tmp_path):
    _, full = quick_run
    out = tmp_path / "errors"
    cache = Path(full["command"].split("--cache ")[1].split()[0])  # the quick run's profile cache: no re-profiling
    assert main(["--out", str(out), "--cache", str(cache), "--device", "cpu", "--quick", "--quiet",
                       "--errors-only"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in result["claims"][1:]] == ["NOT RUN", "NOT RUN"]
    assert result["claims"][0]["status"] == full["claims"][0]["status"]
    assert not (out / "cosine_vs_bits.png").exists() and (out / "error_vs_bits.png").stat().st_size > 0
    errors = {(r["budget"], r["arm"]): r["total_error"] for r in full["rows"]}
    for r in result["rows"]:  # same plans, same deterministic decompositions: the same errors, to the bit
        assert r["total_error"] == errors[(r["budget"], r["arm"])]
        assert r["cos_after_mean"] is None or math.isnan(r["cos_after_mean"])


def test_merge_of_per_budget_runs_equals_one_run(quick_run, tmp_path):
    _, full = quick_run
    cache = full["command"].split("--cache ")[1].split()[0]
    parts = []
    for budget in ("3.5", "2.75"):  # out of order on purpose: the merge sorts by budget
        parts.append(tmp_path / budget)
        assert main(["--out", str(parts[-1]), "--cache", cache, "--device", "cpu", "--quick", "--quiet",
                           "--budgets", budget]) == 0
    merged = tmp_path / "merged"
    assert main(["--merge", *map(str, parts), "--out", str(merged)]) == 0
    result = json.loads((merged / "results.json").read_text())
    assert result["budgets"] == [2.75, 3.5] and result["complete"]
    assert [(r["budget"], r["arm"]) for r in result["rows"]] == [(r["budget"], r["arm"]) for r in full["rows"]]
    assert [r["total_error"] for r in result["rows"]] == [r["total_error"] for r in full["rows"]]
    assert [c["status"] for c in result["claims"]] == [c["status"] for c in full["claims"]]
    assert "Merged from 2 runs" in (merged / "quality.md").read_text()
    assert main(["--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m2")]) == 2
