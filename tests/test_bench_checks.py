"""The offline checks in bench/ that the quality-decoder report cites: the 16-bit option solved on a profile
table (bench/sixteen_bit_option.py) and the device-vs-CPU perplexity check (bench/decoder_gpu_check.py), run here
on the CPU, where every combination must equal its own reference."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sixteen_bit_rows_are_added_per_matrix_and_taken_only_where_they_pay():
    from planner.plan.baselines import SIXTEEN_BIT_LABEL, with_sixteen_bit

    # two 10x10 matrices (100 params each): a 2-bit point (error 5 on "a", 1 on "b") and a 4-bit point (error 1 / 0.5)
    table = pd.DataFrame([
        {"matrix": "a", "m": 10, "n": 10, "label": "nf2", "error": 5.0, "storage_bits": 200},
        {"matrix": "a", "m": 10, "n": 10, "label": "nf4", "error": 1.0, "storage_bits": 400},
        {"matrix": "b", "m": 10, "n": 10, "label": "nf2", "error": 1.0, "storage_bits": 200},
        {"matrix": "b", "m": 10, "n": 10, "label": "nf4", "error": 0.5, "storage_bits": 400},
    ])
    ext = with_sixteen_bit(table)
    added = ext[ext["label"] == SIXTEEN_BIT_LABEL]
    assert list(added["matrix"]) == ["a", "b"] and list(added["storage_bits"]) == [1600, 1600]
    assert (added["error"] == 0).all() and len(ext) == 6
    from planner.plan.ilp import solve

    assert solve(ext, 800).choice == {"a": "nf4", "b": "nf4"}  # 16 bits does not fit beside anything
    best = solve(ext, 1800)  # a at 16 bits (error 0) + b at 2 bits beats both at 4 bits (1.5)
    assert best.choice == {"a": SIXTEEN_BIT_LABEL, "b": "nf2"} and best.total_error == 1.0


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
