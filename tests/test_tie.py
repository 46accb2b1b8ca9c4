"""Fused groups (--tie qkv,gate_up): the members of each group get one configuration, the tied optimum against brute
force and against the untied optimum, the exact DP against the MIP on a grouped instance, plan documents that break
a recorded tie, and one CLI run on a tiny Llama folder."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import seeded_tiny_llama
from test_ilp import near_symmetric_table

from planner import cli
from planner.errors import UserError
from planner.plan.budget import check_budget_feasible
from planner.plan.document import Plan, PlanEntry
from planner.plan.ilp import RTOL, InfeasibleBudget, error_budget_curve, solve, uniform_solutions, verify
from planner.plan.instance import Instance
from planner.model.fused import parse_tie, tie_groups, untied_names
from planner.plan.tie import group_table
from planner.profile.grid import make_grid
from planner.profile.settings import ProfileSettings

BOTH = ("qkv", "gate_up")
# A GQA decoder layer: k and v are a quarter of q's rows.
LLAMA = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
         "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
         "mlp.down_proj": (64, 128)}


def llama_table(layers=2, seed=0, grid=None) -> pd.DataFrame:
    """Grid labels on GQA Llama shapes, errors shaped like real profiles with a per-matrix scale, so the untied
    optimum gives the members of a group different configurations."""
    rng = np.random.default_rng(seed)
    grid = grid or make_grid("2,3,4", "32,64", "0,8")
    rows = []
    for layer in range(layers):
        for kind, (m, n) in LLAMA.items():
            c = rng.lognormal(0, 1.0)
            for p in grid:
                err = (m * n * c * 2.0 ** (-2 * p.config.bits) * (1 + p.config.blocksize / 128)
                       * (1 - p.rank / 32) * rng.lognormal(0, 0.05))
                rows.append({"matrix": f"model.layers.{layer}.{kind}", "m": m, "n": n, "label": p.label,
                             "error": err, "storage_bits": p.bits((m, n))})
    return pd.DataFrame(rows)


def params_of(table) -> int:
    shapes = table.drop_duplicates("matrix")
    return int((shapes["m"] * shapes["n"]).sum())


def members_agree(choice: dict, groups) -> bool:
    return all(len({choice[m] for m in g.members}) == 1 for g in groups)


def brute_force(table: pd.DataFrame, budget: int, groups=()) -> float | None:
    """Least error within budget over every combination of one label per item (a group or a single matrix)."""
    grouped = group_table(table, list(groups))
    items = [g[["storage_bits", "error"]].to_numpy() for _, g in grouped.groupby("matrix", sort=True)]
    best = None
    for combo in itertools.product(*items):
        if sum(int(r[0]) for r in combo) <= budget:
            e = math.fsum(r[1] for r in combo)
            best = e if best is None else min(best, e)
    return best


# ---- recognising the groups ------------------------------------------------------------------------------------

def test_groups_are_recognised_by_whole_name_components_under_one_parent():
    names = [f"model.layers.{i}.{k}" for i in range(2) for k in LLAMA]
    groups = tie_groups(names, BOTH)
    assert [(g.name, g.members) for g in groups] == [  # in model order
        (group, members) for i in (0, 1) for group, members in (
            ("qkv", tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv")),
            ("gate_up", (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj")))]
    assert groups[0].item == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    bert = [f"encoder.layer.0.attention.self.{k}" for k in ("query", "key", "value")] + [
        "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense"]
    assert [g.members for g in tie_groups(bert, BOTH)] == [tuple(bert[:3])]
    assert untied_names(bert, BOTH) == ["gate_up"]  # BERT's MLP has no gate
    # self- and cross-attention of one decoder layer are two groups; "xq_proj" is not "q_proj"; a lone member is
    # no group
    dec = ["d.layers.0.self_attn.q_proj", "d.layers.0.self_attn.k_proj", "d.layers.0.encoder_attn.q_proj",
           "d.layers.0.encoder_attn.v_proj", "d.layers.0.self_attn.xq_proj", "d.layers.0.mlp.gate_proj"]
    assert [g.members for g in tie_groups(dec, BOTH)] == [tuple(dec[:2]), tuple(dec[2:4])]


@pytest.mark.parametrize("value, want", [("qkv", ("qkv",)), ("gate_up, qkv,qkv", BOTH), (["gate_up"], ("gate_up",)),
                                         (None, ()), ((), ())])
def test_parse_tie(value, want):
    assert parse_tie(value) == want
    assert ProfileSettings(tie=value).tie == want


@pytest.mark.parametrize("value, words", [("qvk", "'qvk' is not a fused group"), ("", "names no group"),
                                          ("qkv,,gate_up", "'' is not a fused group"), (3, "not a list")])
def test_bad_tie_values_are_one_user_error(value, words):
    with pytest.raises(UserError, match=words):
        ProfileSettings(tie=value)


def test_tie_is_recorded_in_the_method_but_not_in_the_profile_cache_key():
    plain, tied = ProfileSettings(), ProfileSettings(tie="gate_up,qkv")
    assert tied.cache_key() == plain.cache_key()
    assert tied.method_record()["tie"] == ["qkv", "gate_up"] and "tie" not in plain.method_record()


# ---- the grouped instance --------------------------------------------------------------------------------------

def test_grouped_rows_are_the_members_sums_over_the_labels_every_member_has():
    table = llama_table(layers=1)
    k = "model.layers.0.self_attn.k_proj"
    gone = table.loc[table["matrix"] == k, "label"].iloc[-1]
    table = table.loc[~((table["matrix"] == k) & (table["label"] == gone))]  # a label k's shape cannot take
    groups = tie_groups(table["matrix"].unique(), BOTH)
    grouped = group_table(table, groups)
    qkv = grouped.loc[grouped["matrix"] == groups[0].item].set_index("label")
    members = table.loc[table["matrix"].isin(groups[0].members)]
    assert gone not in qkv.index and len(qkv) == table["label"].nunique() - 1
    for label, row in qkv.iterrows():
        mine = members.loc[members["label"] == label]
        assert row["storage_bits"] == mine["storage_bits"].sum()
        assert row["error"] == pytest.approx(mine["error"].sum(), rel=1e-15)
    assert (qkv["m"] == 64 + 16 + 16).all() and (qkv["n"] == 64).all()  # the fused matrix, rows stacked
    assert params_of(grouped) == params_of(table)
    budget = int(table.groupby("matrix")["storage_bits"].max().sum())  # everything fits
    sol = solve(table, budget, tie=BOTH)
    assert sol.choice["model.layers.0.self_attn.q_proj"] != gone  # the best label, unavailable to the group


def test_a_group_without_a_common_label_is_one_user_error():
    table = pd.DataFrame({"matrix": ["l.0.q_proj", "l.0.k_proj", "l.0.o_proj"], "label": ["a", "b", "a"],
                          "error": [1.0, 1.0, 1.0], "storage_bits": [8, 8, 8]})
    with pytest.raises(UserError, match="has no configuration that all its members have"):
        solve(table, 100, tie=("qkv",))


# ---- the tied optimum ------------------------------------------------------------------------------------------

def test_tied_members_get_one_configuration_and_the_totals_are_their_own_rows():
    table = llama_table(layers=3)
    budget = int(3.5 * params_of(table))
    untied, tied = solve(table, budget), solve(table, budget, tie=BOTH)
    groups = tie_groups(table["matrix"].unique(), BOTH)
    assert len(groups) == 6 and not members_agree(untied.choice, groups)  # the tie binds here
    assert members_agree(tied.choice, groups) and tied.status == "optimal"
    verify(table, tied, budget)  # every matrix, its own rows' totals, within the budget
    assert list(tied.choice) == sorted(tied.choice) == sorted(untied.choice)
    assert tied.total_error > untied.total_error and tied.total_bits <= budget


@pytest.mark.parametrize("seed", range(3))
def test_tied_optimum_is_brute_force_and_never_below_the_untied_one(seed):
    rng = np.random.default_rng(seed)
    table = llama_table(layers=1, seed=seed, grid=make_grid("2,3,4", "32,64", "0"))
    groups = tie_groups(table["matrix"].unique(), BOTH)
    lo = int(group_table(table, groups).groupby("matrix")["storage_bits"].min().sum())
    hi = int(table.groupby("matrix")["storage_bits"].max().sum())
    agreed = bound = 0
    for frac in sorted(rng.uniform(0, 1, size=4).tolist()) + [0.0, 1.0]:
        budget = lo + int(frac * (hi - lo))
        untied, tied = solve(table, budget), solve(table, budget, tie=BOTH)
        assert members_agree(tied.choice, groups)
        assert tied.total_error == pytest.approx(brute_force(table, budget, groups), rel=RTOL)
        assert tied.total_error >= untied.total_error * (1 - RTOL)
        if members_agree(untied.choice, groups):  # the untied optimum is a tied plan: the tie costs nothing
            assert tied.total_error == pytest.approx(untied.total_error, rel=1e-12)
            agreed += 1
        else:
            bound += 1
    assert agreed and bound  # both cases were met: at the full budget (every matrix at its best) and below it


def test_tie_costs_nothing_when_the_untied_optimum_already_agrees():
    # k and v copy q's shape and rows, up copies gate's. At the budgets where the LP relaxation is integral (its
    # breakpoints) it is the untied optimum; where that plan gives every copy one label it is a tied plan, and the
    # tied optimum must be the same plan.
    table = llama_table(layers=1, grid=make_grid("2,3,4", "32,64", "0"))
    for copy, first in (("self_attn.k_proj", "self_attn.q_proj"), ("self_attn.v_proj", "self_attn.q_proj"),
                        ("mlp.up_proj", "mlp.gate_proj")):
        rows = table.loc[table["matrix"] == f"model.layers.0.{first}"].assign(matrix=f"model.layers.0.{copy}")
        table = pd.concat([table.loc[table["matrix"] != f"model.layers.0.{copy}"], rows], ignore_index=True)
    groups = tie_groups(table["matrix"].unique(), BOTH)
    inst = Instance(table)
    agreed = 0
    for budget in (inst.min_bits + inst.inc_cum).tolist():
        if agreed == 3:
            break
        untied = solve(table, budget)
        if members_agree(untied.choice, groups) and len(set(untied.choice.values())) > 1:  # and not uniform
            tied = solve(table, budget, tie=BOTH)
            assert tied.total_error == pytest.approx(untied.total_error, rel=1e-12)
            assert tied.choice == untied.choice
            agreed += 1
    assert agreed >= 3


def test_exact_dp_and_mip_agree_on_a_grouped_instance():
    table = near_symmetric_table(layers=2, seed=1)  # BERT names: q/k/v of every layer tied
    assert len(tie_groups(table["matrix"].unique(), BOTH)) == 2
    lo = int(group_table(table, tie_groups(table["matrix"].unique(), BOTH)).groupby("matrix")["storage_bits"]
             .min().sum())
    hi = int(table.groupby("matrix")["storage_bits"].max().sum())
    proofs = set()
    for frac in (0.1, 0.3, 0.6, 0.9):
        b = lo + int(frac * (hi - lo))
        dp = solve(table, b, tie=BOTH)
        mip = solve(table, b, tie=BOTH, exact_dp=False, fix_by_bound=False, time_limit=None)
        assert dp.status == mip.status == "optimal" and mip.proof == "mip"
        assert dp.total_error == pytest.approx(mip.total_error, rel=RTOL)
        proofs.add(dp.proof)
    assert "dp" in proofs  # the DP itself ran, not only the LP bound


def test_curve_and_uniform_configurations_with_a_tie():
    table = llama_table(layers=2)
    params = params_of(table)
    budgets = [int(b * params) for b in (3.0, 3.5, 4.0, 6.0)]
    tied = error_budget_curve(table, budgets, tie=BOTH)
    untied = error_budget_curve(table, budgets)
    assert (tied["status"] == "optimal").all() and tied["total_error"].is_monotonic_decreasing
    assert (tied["total_error"] >= untied["total_error"] * (1 - RTOL)).all()
    assert (tied["lp_bound"] <= tied["total_error"] * (1 + RTOL)).all()
    assert tied["budget_bits_per_param"].tolist() == pytest.approx([3.0, 3.5, 4.0, 6.0], abs=1e-4)
    for b, err in zip(budgets, tied["total_error"]):
        assert err == pytest.approx(solve(table, b, tie=BOTH).total_error, rel=1e-12)
        fits = uniform_solutions(table, b).query("fits")  # one configuration everywhere is a tied plan
        assert len(fits) and (fits["total_error"] >= err * (1 - RTOL)).all()


def test_infeasible_tied_budget_names_the_tied_minimum():
    table = llama_table(layers=1)
    tied_min = int(group_table(table, tie_groups(table["matrix"].unique(), BOTH))
                   .groupby("matrix")["storage_bits"].min().sum())
    with pytest.raises(InfeasibleBudget, match="each tied group at the cheapest") as info:
        solve(table, tied_min - 1, tie=BOTH)
    assert info.value.min_bits == tied_min
    solve(table, tied_min, tie=BOTH)


def test_budget_check_before_profiling_prices_a_group_at_one_point():
    # Two points: "a" applies to both members (cheap for k, dear for q), "b" only to q (cheap for q).
    a = SimpleNamespace(method="lora", rank=0, applies_to=lambda s: True, bits=lambda s: 100 if s[0] == 64 else 10)
    b = SimpleNamespace(method="lora", rank=0, applies_to=lambda s: s[0] == 64, bits=lambda s: 50)
    mats = [SimpleNamespace(name="l.0.q_proj", shape=(64, 64)), SimpleNamespace(name="l.0.k_proj", shape=(16, 64))]
    assert check_budget_feasible([a, b], mats, 10**9, str) == 50 + 10
    assert check_budget_feasible([a, b], mats, 10**9, str, ("qkv",)) == 100 + 10  # q must take "a" with k
    with pytest.raises(InfeasibleBudget, match="each tied group at the cheapest one all its members take"):
        check_budget_feasible([a, b], mats, 109, str, ("qkv",))
    with pytest.raises(UserError, match="no grid point applies to all of the tied shapes"):
        check_budget_feasible([b, SimpleNamespace(**{**vars(a), "applies_to": lambda s: s[0] == 16})], mats, 10**9,
                              str, ("qkv",))


# ---- the plan document and the CLI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """`lqplan plan --tie qkv,gate_up` on a tiny GQA Llama folder (k/v 32 x 64), then `lqplan report` on its plan."""
    root = tmp_path_factory.mktemp("tie")
    seeded_tiny_llama().save_pretrained(root / "llama")
    argv = ["plan", "--budget", "4.5bits", "--model", str(root / "llama"), "--bits", "2,3,4", "--blocks", "32,64",
            "--ranks", "0,4", "--iters", "1", "--tie", "qkv,gate_up", "--out", str(root / "out"), "--cache",
            str(root / "cache"), "--quiet"]
    assert cli.main(argv) == 0
    assert cli.main(["report", "--plan", str(root / "out" / "plan.json"), "--out", str(root / "report")]) == 0
    return root


def test_cli_plan_ties_every_group_and_reports_the_cost(tied_run, capsys):
    doc = json.loads((tied_run / "out" / "plan.json").read_text())
    plan = Plan.load(tied_run / "out" / "plan.json")
    by = plan.by_name()
    assert len(by) == 14 and doc["method"]["tie"] == ["qkv", "gate_up"]
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert by[f"{attn}.k_proj"].shape == (32, 64)  # GQA
        assert len({by[f"{attn}.{p}_proj"].point for p in "qkv"}) == 1
        assert by[f"{mlp}.gate_proj"].point == by[f"{mlp}.up_proj"].point
    cost = doc["method"]["tie_cost"]
    assert cost["groups"] == 4 and cost["tied_matrices"] == 10
    assert cost["tied_error"] == pytest.approx(plan.totals["error"], rel=1e-12)
    assert cost["tied_bits"] == plan.totals["bits"] <= plan.budget["bits"] and cost["untied_bits"] <= plan.budget["bits"]
    assert cost["tied_error"] >= cost["untied_error"] * (1 - RTOL) and cost["untied_status"] == "optimal"
    assert cost["relative_error_increase"] == pytest.approx(cost["tied_error"] / cost["untied_error"] - 1)
    # The same numbers from the profile table alone.
    table = pd.read_csv(tied_run / "out" / "profile.csv")
    assert solve(table, plan.budget["bits"]).total_error == pytest.approx(cost["untied_error"], rel=1e-12)
    for folder in ("out", "report"):  # written by `plan`, then again by `report` from plan.json and profile.csv
        md = (tied_run / folder / "report.md").read_text()
        assert "## Tied groups vs the untied plan" in md and "| tie | qkv, gate_up |" in md
        assert f"{cost['relative_error_increase']:+.3%}" in md


def test_a_plan_that_breaks_its_recorded_tie_is_refused(tied_run):
    doc = json.loads((tied_run / "out" / "plan.json").read_text())
    Plan.from_dict(doc)
    k = next(m for m in doc["matrices"] if m["name"] == "model.layers.1.self_attn.k_proj")
    old = k["bytes"]
    k["rank"] = 4 - k["rank"]  # the other rank of the grid, with consistent bytes and totals
    k["bytes"] = PlanEntry.from_dict(k).point.bits((32, 64)) // 8
    doc["totals"].update(bytes=doc["totals"]["bytes"] - old + k["bytes"])
    doc["totals"].update(bits=8 * doc["totals"]["bytes"])
    untied = {**doc, "method": {k2: v for k2, v in doc["method"].items() if k2 != "tie"}}
    Plan.from_dict(untied)  # without the tie recorded the same entries are a valid plan
    with pytest.raises(UserError, match=r"ties qkv but the members of model\.layers\.1\.self_attn\.\{q_proj"):
        Plan.from_dict(doc)
    with pytest.raises(UserError, match="'qvk' is not a fused group"):
        Plan.from_dict({**untied, "method": {**untied["method"], "tie": ["qvk"]}})
