"""Property-based tests (hypothesis) of the three parsers of user input: the budget (planner.budget.parse_budget),
the grid (planner.grid.make_grid from the --bits/--blocks/--ranks strings) and the plan document (planner.plan.Plan,
from JSON text or a dict). Documented behaviour: a valid input gives a checked object, anything else raises
planner.errors.UserError with a one-line message; through the CLI, exit code 0 or 2 and never a traceback."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from planner import cli
from planner.errors import UserError
from planner.plan.budget import BITS_UNITS, BYTE_UNITS, parse_budget
from planner.plan.document import SCHEMA, Plan, PlanEntry
from planner.profile.grid import GridPoint, make_grid
from quant.config import SUPPORTED_BITS, SUPPORTED_BLOCKS, QuantConfig

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line(e: UserError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    return msg


def _cli(argv, capsys) -> int:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse answers some inputs itself, with the same one-line format
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lqplan: error: "), err
    else:
        assert err == ""
    return rc


# ---- budgets ---------------------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-10**6, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
    st.from_regex(r"[+-]?(\d{1,6}(\.\d{0,4})?|\.\d{1,4})([eE][+-]?\d{1,3})?", fullmatch=True),
)
UNITS = st.one_of(st.sampled_from(BITS_UNITS + tuple(BYTE_UNITS) + ("GB", "GiB", "MiB", "KB", "b", "B", "")),
                  st.text(alphabet="abcdefghijklmnopqrstuvwxyzBGKMT/", max_size=6))
BUDGETS = st.one_of(st.text(max_size=30),
                    st.builds(lambda n, sp, u: n + sp + u, NUMBERS, st.sampled_from(["", " "]), UNITS))


@FUZZ
@given(BUDGETS)
@example("1.797693134862316e+305kB")  # once an OverflowError: too large for a float
@example("1e400bits")
def test_budget_parser_returns_a_budget_or_a_user_error(spec):
    try:
        b = parse_budget(spec)
    except UserError as e:
        _one_line(e)
        return
    assert b.kind in ("bits", "bytes")
    assert math.isfinite(b.value) and b.value > 0
    if b.kind == "bytes":
        assert b.value >= 1
    assert b.total_bits(10**6, 0) >= 0 if b.kind == "bits" else True


@FUZZ
@given(st.from_regex(r"\d{1,5}(\.\d{1,5})?", fullmatch=True), st.sampled_from(sorted(BYTE_UNITS) + list(BITS_UNITS)))
def test_budget_parser_is_exact_for_valid_specs(num, unit):
    """A valid spec's value is the decimal number times the unit, without float rounding in total_bits."""
    assume(Fraction(num) > 0 and unit != "b")
    b = parse_budget(f"{num}{unit.upper() if unit in BYTE_UNITS else unit}")
    if unit in BITS_UNITS:
        assert b.kind == "bits" and b.total_bits(1000) == math.floor(Fraction(num) * 1000)
    else:
        exact = Fraction(num) * BYTE_UNITS[unit]
        assume(exact >= 1)
        assert b.kind == "bytes" and b.total_bits(10, 0) == math.floor(exact) * 8


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(BUDGETS.filter(lambda s: "\0" not in s))
def test_budget_through_the_cli_never_tracebacks(tmp_path_factory, capsys, spec):
    out = tmp_path_factory.getbasetemp() / "fuzz-out"
    rc = _cli(["plan", f"--budget={spec}", "--model", str(out / "missing-model"), "--out", str(out),
               "--cache", str(out)], capsys)
    assert rc == 2  # a valid budget still stops at the missing model
    assert not out.exists()


# ---- grids -----------------------------------------------------------------------------------------------------

INT_LISTS = st.lists(st.integers(-300, 300), min_size=0, max_size=5).map(lambda v: ",".join(map(str, v)))
GRID_TEXT = st.one_of(INT_LISTS, st.text(alphabet="0123456789,- x.+", max_size=12), st.text(max_size=12))


@FUZZ
@given(GRID_TEXT, GRID_TEXT, GRID_TEXT)
def test_grid_parser_returns_points_or_a_user_error(bits, blocks, ranks):
    try:
        grid = make_grid(bits, blocks, ranks)
    except UserError as e:
        _one_line(e)
        return
    values = [{int(x) for x in s.split(",") if x.strip()} for s in (bits, blocks, ranks)]
    assert len(grid) == math.prod(len(v) for v in values)
    assert len({p.label for p in grid}) == len(grid)
    for p in grid:
        assert p.config.bits in SUPPORTED_BITS and p.config.blocksize in SUPPORTED_BLOCKS and p.rank >= 0
        assert GridPoint.from_dict(p.to_dict()) == p


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(GRID_TEXT, GRID_TEXT, GRID_TEXT, st.one_of(st.none(), st.text(alphabet="0123456789x-", max_size=8)))
def test_grid_through_the_cli_never_tracebacks(capsys, bits, blocks, ranks, shape):
    argv = ["grid", f"--bits={bits}", f"--blocks={blocks}", f"--ranks={ranks}"]
    if shape is not None:
        argv.append(f"--shape={shape}")
    _cli(argv, capsys)


# ---- plan documents --------------------------------------------------------------------------------------------

def _valid_plan() -> dict:
    entries = []
    for i, (shape, cfg, rank) in enumerate([((64, 64), QuantConfig(bits=4), 8), ((128, 64), QuantConfig(bits=2,
                                            blocksize=32), 0), ((64, 128), QuantConfig(bits=8, blocksize=128), 16)]):
        point = GridPoint(cfg, rank)
        entries.append(PlanEntry(f"layers.{i}.proj", shape, point, 0.5 * i, point.bits(shape) // 8))
    total = sum(e.bytes for e in entries)
    plan = Plan(model={"name": "m", "fingerprint": "sha256:" + "0" * 64}, budget={"spec": "4bits", "bits": 10**6},
                matrices=entries, totals={"params": 20480, "bytes": total, "bits": total * 8},
                solver={"solver": "highs", "status": "optimal"}, method={"iters": 1})
    return plan.to_dict()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=12)


@st.composite
def mutated_plans(draw):
    """A valid plan with one value replaced, one key deleted or one key added, anywhere in the tree."""
    doc = _valid_plan()
    node = doc
    while True:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[key] = draw(JSON)
        elif action == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(JSON)
        else:
            node.append(draw(JSON))
        break
    return doc


def _load_or_user_error(text_or_doc, tmp_path=None):
    try:
        if isinstance(text_or_doc, str):
            path = tmp_path / "plan.json"
            path.write_text(text_or_doc, encoding="utf-8", errors="surrogatepass")
            plan = Plan.load(path)
        else:
            plan = Plan.from_dict(text_or_doc)
    except UserError as e:
        _one_line(e)
        return None
    # whatever loads is internally consistent and survives a round trip unchanged
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(plan.to_dict(), sort_keys=True)  # NaN-safe
    assert sum(e.bytes for e in plan.matrices) == sum(e.point.bits(e.shape) // 8 for e in plan.matrices)
    return plan


def test_the_unmutated_plan_loads():
    assert _load_or_user_error(_valid_plan()) is not None


@FUZZ
@given(mutated_plans())
def test_mutated_plans_load_or_raise_a_user_error(doc):
    _load_or_user_error(doc)


@FUZZ
@given(JSON)
def test_random_json_is_never_a_plan(doc):
    with pytest.raises(UserError) as e:
        Plan.from_dict(doc)
    _one_line(e.value)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(JSON.map(json.dumps), st.text(max_size=40), mutated_plans().map(lambda d: json.dumps(d)[:200]),
                 st.just("[" * 3000), st.just('{"schema": "' + SCHEMA + '"}')))
def test_plan_files_load_or_raise_a_user_error(tmp_path_factory, text):
    _load_or_user_error(text, tmp_path_factory.mktemp("plan"))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(JSON.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_report_on_a_bad_plan_never_tracebacks(tmp_path_factory, capsys, text):
    folder = tmp_path_factory.mktemp("report")
    (folder / "plan.json").write_text(text, encoding="latin-1")
    assert _cli(["report", "--plan", str(folder / "plan.json")], capsys) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json"]


def test_a_broken_matrix_entry_is_named():
    """A bad value deep inside a matrix entry is reported by name, not as a generic failure."""
    doc = copy.deepcopy(_valid_plan())
    doc["matrices"][1]["blocksize"] = 48
    with pytest.raises(UserError, match="blocksize=48"):
        Plan.from_dict(doc)
