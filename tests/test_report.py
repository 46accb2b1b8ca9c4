import re

import numpy as np
import pandas as pd
import pytest

from planner.plan.document import Plan, PlanEntry
from planner.plan.ilp import error_budget_curve, solve, uniform_solutions
from planner.profile.grid import make_grid
from planner.report.frames import allocation_frame, parse_name
from planner.report.render import write_reports

SHAPES = {"attention.self.query": (64, 64), "intermediate.dense": (256, 64), "output.dense": (64, 256)}


def small_table(layers=3, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    grid = make_grid(bits="2,4", blocks="16,64", ranks="8,16")
    names = [(f"encoder.layer.{i}.{k}", s) for i in range(layers) for k, s in SHAPES.items()]
    names.append(("pooler.dense", (64, 64)))  # no layer index
    rows = []
    for name, (m, n) in names:
        c = rng.lognormal(0, 0.5)
        for p in grid:
            err = m * n * c * 2.0 ** (-2 * p.config.bits) * (1 + p.config.blocksize / 256) * (1 - p.rank / 64)
            rows.append({"matrix": name, "m": m, "n": n, "label": p.label, "error": err,
                         "error_unweighted": 2 * err, "storage_bits": p.bits((m, n))})
    return pd.DataFrame(rows)


def make_plan(table: pd.DataFrame, bpp: float):
    points = {p.label: p for p in make_grid(bits="2,4", blocks="16,64", ranks="8,16")}
    shapes = table.drop_duplicates("matrix").set_index("matrix")[["m", "n"]]
    params = int((shapes["m"] * shapes["n"]).sum())
    budget = int(bpp * params)
    sol = solve(table, budget)
    errors = table.set_index(["matrix", "label"])["error"]
    entries = []
    for name, label in sol.choice.items():
        shape = (int(shapes.loc[name, "m"]), int(shapes.loc[name, "n"]))
        point = points[label]
        entries.append(PlanEntry.of(name, shape, point, errors[(name, label)]))
    plan = Plan.from_entries({"name": "tiny-bert", "fingerprint": "abc"},
                             {"spec": f"{bpp}bits", "kind": "bits", "value": bpp, "bits": budget}, entries,
                             solver={"name": sol.solver, "status": sol.status, "gap": sol.gap,
                                     "objective": sol.objective, "bound": sol.bound, "seconds": sol.seconds})
    assert plan.totals["params"] == params and plan.totals["error"] == pytest.approx(sol.total_error)
    plan.validate()
    return plan, params


@pytest.mark.parametrize("name, layer, kind", [
    ("model.layers.3.self_attn.q_proj", 3, "self_attn.q_proj"),
    ("encoder.layer.0.attention.self.query", 0, "attention.self.query"),
    ("transformer.h.11.mlp.c_fc", 11, "mlp.c_fc"),
    ("pooler.dense", None, "pooler.dense"),
    ("blocks.7", 7, "blocks"),
])
def test_parse_name(name, layer, kind):
    assert parse_name(name) == (layer, kind)


def test_write_reports(tmp_path):
    table = small_table()
    plan, params = make_plan(table, 5.0)
    curve = error_budget_curve(table, [int(b * params) for b in (4.0, 5.0, 6.0, 8.0)])
    uniform = uniform_solutions(table, plan.budget["bits"])
    paths = write_reports(plan, table, tmp_path / "rep", curve=curve, uniform=uniform,
                          extra={"profile seconds": 12.5})
    for key in ("report_md", "report_html", "allocation_csv", "heatmap_png", "error_budget_png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert not list((tmp_path / "rep").glob(".*.tmp"))  # atomic writes left no temporaries

    page = paths["report_html"].read_text(encoding="utf-8")
    srcs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.IGNORECASE)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page.lower() and "<script" not in page.lower()

    csv = pd.read_csv(paths["allocation_csv"])
    assert len(csv) == len(plan.matrices)
    assert list(csv["name"]) == [e.name for e in plan.matrices]
    assert {"name", "layer", "type", "m", "n", "bits", "blocksize", "rank", "error", "bytes",
            "bits_per_param", "error_unweighted"} <= set(csv.columns)
    assert csv["bytes"].sum() == plan.totals["bytes"]
    assert np.allclose(csv["bits_per_param"], csv["bytes"] * 8 / (csv["m"] * csv["n"]))
    assert np.allclose(csv["error_unweighted"], 2 * csv["error"])
    pooler = csv.loc[csv["name"] == "pooler.dense"].iloc[0]
    assert np.isnan(pooler["layer"]) and pooler["type"] == "pooler.dense"
    q0 = csv.loc[csv["name"] == "encoder.layer.0.attention.self.query"].iloc[0]
    assert (q0["layer"], q0["type"]) == (0, "attention.self.query")

    md = paths["report_md"].read_text(encoding="utf-8")
    t = plan.totals
    assert f"| bits/param | {t['bits_per_param']:.6f} |" in md
    assert f"| bytes | {t['bytes']:,} (" in md
    assert f"| total error | {float(t['error'])!r} |" in md
    assert f"| planned parameters | {params:,} |" in md
    assert f"| solver status | {plan.solver['status']} |" in md
    assert "![heatmap.png](heatmap.png)" in md and "## How to read this report" in md
    assert "| profile seconds | 12.5 |" in md
    # per-layer table: one row per layer plus the matrix without a layer, bytes adding up to the total
    layer_rows = re.findall(r"^\| (\d+|\(none\)) \| (\d+) \| [\d,]+ \| [\d.]+ \| [\d.]+ \| ([\d,]+) \|", md, re.M)
    assert [r[0] for r in layer_rows] == ["0", "1", "2", "(none)"]
    assert sum(int(r[2].replace(",", "")) for r in layer_rows) == t["bytes"]


def test_write_reports_minimal_inputs(tmp_path):
    table = small_table(layers=1)
    plan, _ = make_plan(table, 6.0)
    paths = write_reports(plan, None, tmp_path)  # no table, curve or uniform: no curve figure, still a report
    assert "error_budget_png" not in paths and paths["heatmap_png"].is_file()
    assert len(allocation_frame(plan)) == len(plan.matrices)
    paths = write_reports(plan, table, tmp_path)  # the uniform comparison is derived from the table
    assert "Uniform configurations" in paths["report_md"].read_text(encoding="utf-8")


@pytest.mark.parametrize("proof, within", [("dp", False), ("fixing", False), ("lp-bound", True), ("mip", True)])
def test_proof_names_the_tolerance_only_where_the_proof_uses_it(proof, within):
    from planner.report.frames import proof_text

    text = proof_text({"status": "optimal", "proof": proof, "mip_rel_tol": 1e-6})
    assert text.startswith("proven optimal") and ("within relative MIP tolerance 1e-06" in text) == within, text


def test_run_section_in_words_keeps_what_the_cache_cost_to_compute(tmp_path):
    from planner.report.render import RUN_LABELS, run_frame

    rerun = {"model": "m", "profile_seconds": 0.06, "computed_points": 0, "cached_points": 1728,
             "computed_matrices": 0, "cached_profile_seconds": 520.85, "total_seconds": 0.72}
    items = dict(run_frame(rerun).itertuples(index=False))
    assert not set(rerun) - {"model"} & set(items), items  # no raw key left
    assert items[RUN_LABELS["cached_profile_seconds"]] == "520.85"
    first = {**rerun, "computed_points": 1728, "cached_points": 0, "cached_profile_seconds": 0.0}
    assert RUN_LABELS["cached_profile_seconds"] not in dict(run_frame(first).itertuples(index=False))

    table = small_table(layers=1)
    plan, _ = make_plan(table, 6.0)
    md = write_reports(plan, table, tmp_path, extra=rerun)["report_md"].read_text(encoding="utf-8")
    assert f"| {RUN_LABELS['cached_profile_seconds']} | 520.85 |" in md and "profile_seconds" not in md
    assert re.search(r"\| bytes \| [\d,]+ \([\d.]+ (KiB|MiB)\) \|", md) and " MB)" not in md and " kB)" not in md


def test_heatmap_shows_the_rank_panel_only_when_ranks_differ():
    from planner.report.figures import _cell_label, heatmap_panels

    table = small_table()
    plan, _ = make_plan(table, 5.0)
    alloc = allocation_frame(plan, table)
    one = alloc.assign(rank=8)
    assert [c for c, _ in heatmap_panels(one)] == ["bits_per_param"]
    assert "LoRA rank 8 on every matrix" in heatmap_panels(one)[0][1]
    two = alloc.assign(rank=[8, 16] * (len(alloc) // 2) + [8] * (len(alloc) % 2))
    assert [c for c, _ in heatmap_panels(two)] == ["bits_per_param", "rank"]
    assert _cell_label("nf3-b128-dq8/256-r8") == "nf3-b128"


def test_curve_title_says_where_plans_start_to_fit():
    from planner.report.figures import curve_title

    table = small_table()
    _, params = make_plan(table, 5.0)
    curve = error_budget_curve(table, [int(b * params) for b in (1.0, 2.5, 5.0, 6.0)])
    assert curve["total_error"].isna().iloc[0] and curve["total_error"].notna().iloc[-1]
    start = curve.loc[curve["total_error"].notna(), "budget_bits_per_param"].min()
    title = curve_title(curve)
    assert title.startswith("least total error at each budget") and f"{start:.3g}–6 bits/param" in title
    assert "no plan fits its smaller budgets: 1, 2.5 bits/param" in title, title
    assert "no plan fits" not in curve_title(curve.loc[curve["total_error"].notna()])
