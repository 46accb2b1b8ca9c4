"""Smoke test of the decoder quality study (bench/quality_decoder.py --tiny on CPU): a tiny random decoder without
`architectures`, every arm at every budget plus QLoRA's own bits, the job runner in this process and as
subprocesses (--parallel) giving the same numbers, and every output written."""

from __future__ import annotations

import json
import math

import pytest

from planner.study import quality_decoder_report as report
from planner.study.quality_decoder import main  # bench/quality_decoder.py's command line

pytestmark = pytest.mark.slow  # about 30 s on 2 cores, the --parallel rerun of finished jobs 10 s more


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality-decoder")
    assert main(["--tiny", "--out", str(out), "--cache", str(out / "cache"), "--device", "cpu", "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tiny_run_writes_every_output_with_four_verdicts(tiny_run):
    out, result = tiny_run
    assert result["schema"] == "lqplan.quality-decoder/1"
    for name in ("quality.md", "results.json", "error_vs_bits.png", "ppl_vs_bits.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "quality.md").read_text()
    assert "python bench/quality_decoder.py --tiny" in md and "Full-precision perplexity" in md
    assert md.count("**PASS**") + md.count("**FAIL**") == 4 and "BOS first" in md
    assert "torch" in result["environment"]


def test_every_arm_runs_at_every_budget_and_qloras_own_bits(tiny_run):
    _, result = tiny_run
    q = result["qlora_bits"]
    assert result["budgets"] == [2.75, 3.5, q] and 4.5 < q < 4.6  # NF4 b64 dq + rank-4 adapters on 256-wide
    rows = result["rows"]
    assert {(r["budget"], r["arm"]) for r in rows} == {(b, a) for b in result["budgets"] for a in report.ARMS}
    qlora = next(r for r in rows if r["budget"] == q and r["arm"] == "qlora")
    assert qlora["config"] == "nf4-b64-dq8/256-r4" and qlora["init"] == "qlora"
    for r in rows:
        assert r["status"] == "ok" and r["bytes_match"] and r["bits_per_param"] <= r["budget"] + 1e-12
        assert r["total_error"] == pytest.approx(r["table_error"], rel=1e-4)
        assert 1 < r["ppl_after_mean"] < 2 * 30522 and math.isfinite(r["ppl_before_mean"])
    assert 1 < result["full_precision_ppl"] < 2 * 30522


def test_parallel_jobs_reuse_finished_results_and_match(tiny_run):
    out, result = tiny_run
    rerun = out / "runs" / "2.75-ilp-s0" / "result.json"
    before = json.loads(rerun.read_text())["result"]
    rerun.unlink()  # this one job runs again, in a subprocess; every other result is read back
    assert main(["--tiny", "--out", str(out), "--cache", str(out / "cache"), "--device", "cpu", "--quiet",
                       "--parallel", "2"]) == 0
    again = json.loads((out / "results.json").read_text())
    after = json.loads(rerun.read_text())["result"]
    assert (out / "runs" / "2.75-ilp-s0" / "worker.log").is_file()
    # another process may use other thread counts: float sums differ in the last digits, not more
    assert after["ppl_after"] == pytest.approx(before["ppl_after"], rel=1e-3)
    assert after["total_error"] == pytest.approx(before["total_error"], rel=1e-5)
    same = [r.get("ppl_after_mean") for r in again["rows"] if (r["budget"], r["arm"]) != (2.75, "ilp")]
    assert same == [r.get("ppl_after_mean") for r in result["rows"] if (r["budget"], r["arm"]) != (2.75, "ilp")]
