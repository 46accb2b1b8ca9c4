"""Baseline plans from profile tables (planner.plan.baselines): the 16-bit option that bench/sixteen_bit_option.py
adds to a table."""

from __future__ import annotations

import pandas as pd

from planner.plan.baselines import SIXTEEN_BIT_LABEL, with_sixteen_bit
from planner.plan.ilp import solve


def test_sixteen_bit_rows_are_added_per_matrix_and_taken_only_where_they_pay():
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
    assert solve(ext, 800).choice == {"a": "nf4", "b": "nf4"}  # 16 bits does not fit beside anything
    best = solve(ext, 1800)  # a at 16 bits (error 0) + b at 2 bits beats both at 4 bits (1.5)
    assert best.choice == {"a": SIXTEEN_BIT_LABEL, "b": "nf2"} and best.total_error == 1.0
