import math

import pytest

from planner.errors import UserError
from planner.plan.budget import Budget, parse_budget


@pytest.mark.parametrize("spec, kind, value, unit", [
    ("2.75bits", "bits", 2.75, "bits"),
    ("2.75 bits", "bits", 2.75, "bits"),
    (" 4bit ", "bits", 4.0, "bits"),
    ("2.5bpw", "bits", 2.5, "bits"),
    ("3BITS/PARAM", "bits", 3.0, "bits"),
    ("6GB", "bytes", 6e9, "GB"),
    ("6 GB", "bytes", 6e9, "GB"),  # "6 gb" reads as gigabits: refused (tests/test_robustness.py)
    ("6GiB", "bytes", 6 * 2**30, "GiB"),
    ("500MB", "bytes", 5e8, "MB"),
    ("500MiB", "bytes", 500 * 2**20, "MiB"),
    ("6e9B", "bytes", 6e9, "B"),
    ("2.5e-1GB", "bytes", 2.5e8, "GB"),
    ("1.5kB", "bytes", 1500.0, "kB"),
    ("1TiB", "bytes", float(2**40), "TiB"),
])
def test_parse_accepted_forms(spec, kind, value, unit):
    b = parse_budget(spec)
    assert (b.kind, b.value, b.unit, b.spec) == (kind, value, unit, spec.strip())


@pytest.mark.parametrize("spec, words", [
    ("", "empty"),
    ("2.75", "no unit"),
    ("6e9", "no unit"),
    ("0bits", "greater than zero"),
    ("-2bits", "greater than zero"),
    ("0GB", "greater than zero"),
    ("nanbits", "finite"),
    ("infGB", "finite"),
    ("2.75 furlongs", "unknown unit"),
    ("2.75b", "ambiguous"),
    ("bits", "not a number"),
    ("2..5bits", "not a number"),
    ("2.5 GB extra", "not a number"),
    ("0.5B", "less than one byte"),
])
def test_parse_rejects_with_example(spec, words):
    with pytest.raises(UserError) as exc:
        parse_budget(spec)
    msg = str(exc.value)
    assert words in msg
    assert "\n" not in msg
    assert "e.g." in msg or "write" in msg


def test_bits_budget_is_exact_for_decimal_specs():
    # 2.85 is not representable in binary; the budget must still be floor(2.85 * params) exactly.
    params = 10**15 + 7
    assert parse_budget("2.85bits").total_bits(params, unplanned_bytes=123) == (285 * params) // 100
    assert parse_budget("2.75bits").total_bits(1000) == 2750
    assert parse_budget("2.75bits").total_bits(3) == 8  # floor(8.25)


def test_bytes_budget_subtracts_unplanned_tensors():
    b = parse_budget("6GB")
    assert b.total_bits(10**9, unplanned_bytes=10**9) == 5 * 10**9 * 8
    assert parse_budget("1GiB").total_bits(1, 0) == 2**30 * 8
    assert parse_budget("1.0000000005GB").total_bits(1, 0) == 1_000_000_000 * 8  # floor to whole bytes


def test_bytes_budget_used_up_by_unplanned():
    with pytest.raises(UserError, match="unplanned tensors alone"):
        parse_budget("500MB").total_bits(10**6, unplanned_bytes=600 * 10**6)
    with pytest.raises(UserError, match="unplanned tensors alone"):
        parse_budget("500MB").total_bits(10**6, unplanned_bytes=500 * 10**6)


def test_no_planned_params():
    with pytest.raises(UserError, match="no planned matrices"):
        parse_budget("3bits").total_bits(0)


def test_format_bits_rounds_up_to_a_feasible_spec():
    params = 3 * 10**6
    bits = 6_000_001  # 2.000000333 bits/param: the quoted figure must not be below it
    text = parse_budget("1.5bits").format_bits(bits, params)
    assert text.startswith("2.0001bits")
    up = parse_budget(text.split()[0]).total_bits(params)
    assert up >= bits
    text = parse_budget("1GB").format_bits(8 * 10**9 + 8, params, unplanned_bytes=5 * 10**8)
    assert text.startswith("1.501GB")
    assert "1,500,000,001 bytes" in text
    assert parse_budget(text.split()[0]).total_bits(params, 5 * 10**8) >= 8 * 10**9 + 8


def test_budget_is_frozen_and_comparable():
    a, b = parse_budget("6GB"), parse_budget("6GB")
    assert a == b
    with pytest.raises(AttributeError):
        a.value = 1.0  # type: ignore[misc]
    assert Budget("bits", 2.0, "2bits").total_bits(10) == 20
    assert math.isclose(parse_budget("2.75bits").value, 2.75)
