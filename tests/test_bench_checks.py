"""The device-vs-CPU perplexity check that the quality-decoder report cites (bench/decoder_gpu_check.py, the script
under test), run here on the CPU, where every combination must equal its own reference."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_decoder_check_on_the_cpu_equals_its_own_reference(tmp_path):
    from planner.testing.models import save_tiny_decoder

    check = load("decoder_gpu_check")
    folder = save_tiny_decoder(tmp_path / "tiny", 256, 512, 512, architectures=False)
    out = tmp_path / "out"
    assert check.main(["--model", str(folder), "--device", "cpu", "--texts", "2", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {(r["model"], r["attn"], r["precision"]) for r in rows} == {
        (m, a, p) for m in ("fp", "nf4") for a in ("sdpa", "eager") for p in ("fp32", "bf16-autocast")}
    for r in rows:
        assert r["ratio"] == 1.0 and r["first_layer_over_tol"] is None, r
        assert len(r["relative_diff_per_layer"]) == 2 and max(r["relative_diff_per_layer"]) == 0.0
    nf4, fp = (next(r for r in rows if r["model"] == m and r["attn"] == "sdpa" and r["precision"] == "fp32")
               for m in ("nf4", "fp"))
    assert nf4["cpu_ppl"] != fp["cpu_ppl"]  # the quantized model is a different model
    assert "| nf4 | eager | fp32 | eager |" in (out / "check.md").read_text()
