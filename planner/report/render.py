"""Human-readable reports of a plan: report.md, a self-contained report.html, allocation.csv and PNG figures,
formatted and written from planner.report.frames' content and planner.report.figures' images."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..fsio import size_text, write_bytes, write_text
from ..plan.document import Plan
from ..plan.ilp import uniform_solutions
from ..timing import PhaseClock
from .figures import curve_plot, heatmaps
from .frames import (
    BOUND_ROW,
    GAP_ROW,
    allocation_frame,
    budget_curve,
    comparison_names,
    fisher_frame,
    fisher_note,
    group_frame,
    plan_comparison,
    tie_frame,
    tie_note,
    totals_frame,
)

REPORT_OUTPUTS = ("allocation.csv", "report.md", "report.html", "heatmap.png", "error_budget.png")

HOW_TO_READ = (
    ("Totals", "bits/param counts everything the plan stores for the planned matrices (quantized codes, scales, "
     "second-level scales and the 16-bit LoRA adapters) divided by their parameter count; bytes is the same in bytes."),
    ("Error", "the sum over matrices of the (Fisher-weighted if calibration was used) squared Frobenius error "
     "||W - Q - A·Bᵀ||², so large matrices weigh more; compare errors between plans of the same model only."),
    ("Optimality", "solver status 'optimal' means proven optimal: no plan within the budget has a smaller total "
     "error; the proof line says what proved it: reduced-cost fixing and the exact dynamic program are exact, the LP "
     "bound itself and the MIP solver's search hold within a relative tolerance (1e-6), which the line then names. "
     "'feasible' means a time limit stopped the search."),
    ("LP bound and gap", "the LP relaxation bound is the exact optimum of the problem with fractional choices "
     "allowed: no plan can have a smaller total error. The gap to it, (error - bound) / error, includes the "
     "integrality gap (whole configurations cannot fill the budget exactly), so a proven-optimal plan usually has "
     "a small non-zero gap; it bounds how much better any plan could be."),
    ("Fisher comparison", "with --calib, the plan minimises the Fisher-weighted error; it is compared with the "
     "data-free plan for the same budget and grid, both measured by the Fisher-weighted error (and the plain one)."),
    ("Tie", "with --tie, the members of each fused group (q/k/v, gate/up of one layer) share one configuration, as "
     "serving engines that fuse them require; the plan is the best tied plan, compared with the best untied plan "
     "at the same budget: the relative error increase is what the tie costs. The curve and the uniform "
     "configurations are tied plans too (one configuration everywhere satisfies every tie)."),
    ("Sizes", "bytes are also given in binary units: 1 KiB = 1024 bytes, 1 MiB = 1024² bytes, 1 GiB = 1024³ bytes "
     "(as everywhere lqplan prints a size)."),
    ("Heatmaps", "each matrix's bits/param (incl. adapters), with its configuration (code and block size), by layer "
     "(rows) and matrix type (columns): brighter cells are where the budget went. A second panel shows the LoRA "
     "rank where the plan gives matrices different ranks; otherwise the title names the one rank."),
    ("Error-budget curve", "the best error reachable at each budget (line) against one configuration for every matrix "
     "(points); the vertical distance at equal bits is what mixing configurations buys. The line spans the "
     "budgets from 2.25 to 5 bits/param that some plan fits; the title names those too small for any plan."),
)


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return f"{v:.6g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    # Hand-written: pandas' to_markdown needs the optional `tabulate` package, which lqplan does not depend on.
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# The Run section's rows in words; a key not listed here is shown as it is.
RUN_LABELS = {"profile_seconds": "profiling time this run (s)",
              "computed_points": "(matrix, configuration) points computed this run",
              "cached_points": "points read from the profile cache",
              "cached_profile_seconds": "computing time of the cached points when they were profiled (s)",
              "computed_matrices": "matrices profiled this run",
              "total_seconds": "profile to reports, this run (s)"}


def run_frame(run: dict) -> pd.DataFrame:
    """The Run section: each item in words (RUN_LABELS); a cache-time row only where points came from the cache."""
    rows = [(RUN_LABELS.get(k, k), str(v)) for k, v in run.items()
            if not (k == "cached_profile_seconds" and not run.get("cached_points"))]
    return pd.DataFrame(rows, columns=["item", "value"])


def _totals_md(plan: Plan) -> str:
    # Exact figures (not _fmt's rounding), so the report can be checked against plan.json.
    lines = []
    for k, v in totals_frame(plan).itertuples(index=False):
        if k == "bits/param":
            v = f"{float(v):.6f}"
        elif k in ("total error", BOUND_ROW):
            v = repr(float(v))
        elif k == GAP_ROW:
            v = f"{float(v):.3e}"
        elif k == "solver seconds":
            v = f"{float(v):.3f}"
        elif isinstance(v, (int, np.integer)):
            v = f"{int(v):,}" + (f" ({size_text(int(v))})" if k.endswith("bytes") else "")
        lines.append((k, str(v)))
    return _md_table(pd.DataFrame(lines, columns=["quantity", "value"]))


def plan_reports(plan: Plan, table: pd.DataFrame, out_dir, extra: dict | None = None,
                 clock: PhaseClock | None = None) -> dict[str, Path]:
    """The reports of a plan and its profile table, as `lqplan plan` renders them and `lqplan report` again: the
    error-budget curve at the plan's parameter count and tie, the uniform configurations against its budget.
    `clock` times the "curve" and "reports" phases."""
    clock = clock or PhaseClock()
    budget_bits = plan.totals.get("budget_bits", plan.budget.get("bits", plan.totals["bits"]))
    with clock("curve"):
        curve = budget_curve(table, plan.totals["params"], plan.method.get("tie") or ())
        uniform = uniform_solutions(table, budget_bits)
    with clock("reports"):
        return write_reports(plan, table, out_dir, curve, uniform, extra)


def write_reports(plan: Plan, table: pd.DataFrame | None, out_dir, curve: pd.DataFrame | None = None,
                  uniform: pd.DataFrame | None = None, extra: dict | None = None) -> dict[str, Path]:
    """Write report.md, report.html (images inlined), allocation.csv and PNGs into out_dir; return their paths.

    table: the profile table (adds error_unweighted to the CSV when present). curve: error_budget_curve output;
    uniform: uniform_solutions output. extra: more key/value lines for the "run" section (model, timings, ...)."""
    out = Path(out_dir)
    alloc = allocation_frame(plan, table)
    if uniform is None and table is not None and len(table) and plan.budget.get("bits") is not None:
        uniform = uniform_solutions(table, int(plan.budget["bits"]))
    paths = {"allocation_csv": out / "allocation.csv", "report_md": out / "report.md",
             "report_html": out / "report.html"}
    write_text(paths["allocation_csv"], alloc.to_csv(index=False))

    images: dict[str, bytes] = {}
    heat = heatmaps(alloc)
    if heat is not None:
        images["heatmap.png"] = heat
    curve_png = curve_plot(curve, uniform, plan)
    if curve_png is not None:
        images["error_budget.png"] = curve_png
    for name, data in images.items():
        paths[name.replace(".", "_")] = out / name
        write_bytes(out / name, data)

    per_layer, per_type = group_frame(alloc, "layer"), group_frame(alloc, "type")
    extra = dict(extra or {})
    comparison = extra.pop("fisher_comparison", None) or plan_comparison(plan)
    fisher_df = fisher_frame(comparison)
    run = {"model": plan.model.get("name", ""), **({"weights": plan.model["weights"]} if plan.model.get("weights")
                                                   else {}), "matrices": len(plan.matrices), **extra}
    if table is not None and len(table):
        run["configurations profiled per matrix"] = int(table.groupby("matrix").size().max())
    run_df = run_frame(run)
    uni_df = None
    if uniform is not None and not uniform.empty:
        cols = [c for c in ("label", "bits_per_param", "total_bits", "total_error", "fits") if c in uniform.columns]
        uni_df = uniform[cols]
        fitting = uniform.loc[uniform["fits"]] if "fits" in uniform.columns else uniform.iloc[:0]
        if not fitting.empty and plan.totals.get("error"):
            best = fitting.loc[fitting["total_error"].idxmin()]
            run["best uniform configuration within the budget"] = (
                f"{best['label']} (error {best['total_error']:.6g}, "
                f"{best['total_error'] / plan.totals['error']:.3f}x this plan's)")
            run_df = run_frame(run)

    sections = [("Totals", None, "totals"), ("Run", run_df, None)]
    tie_df = tie_frame(plan.method)
    if tie_df is not None:
        sections.append(("Tied groups vs the untied plan", tie_df, "tie"))
    if fisher_df is not None:
        sections.append((comparison_names(comparison)[0], fisher_df, "fisher"))
    sections += [("Allocation per layer", per_layer, None), ("Allocation per matrix type", per_type, None)]
    if uni_df is not None:
        sections.append(("Uniform configurations (the same one for every matrix)", uni_df, None))
    title = f"lqplan report: {plan.model.get('name', 'model')}"

    md = [f"# {title}", ""]
    for head, df, special in sections:
        md += [f"## {head}", "", _totals_md(plan) if special == "totals" else _md_table(df), ""]
        if special == "fisher":
            md += [fisher_note(comparison), ""]
        if special == "tie":
            md += [tie_note(plan.method), ""]
        if special == "totals":
            for name in images:
                md += [f"![{name}]({name})", ""]
    md += ["## How to read this report", "", *(f"- **{k}**: {v}" for k, v in HOW_TO_READ),
           "- Per-matrix details are in `allocation.csv`.", ""]
    write_text(paths["report_md"], "\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"]
    for head, df, special in sections:
        body.append(f"<h2>{html.escape(head)}</h2>")
        body.append(_html_table(totals_frame(plan) if special == "totals" else df))
        if special == "fisher":
            body.append(f"<p>{html.escape(fisher_note(comparison))}</p>")
        if special == "tie":
            body.append(f"<p>{html.escape(tie_note(plan.method))}</p>")
        if special == "totals":
            for name, data in images.items():
                b64 = base64.b64encode(data).decode("ascii")
                body.append(f'<p><img alt="{name}" src="data:image/png;base64,{b64}"></p>')
    how = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in HOW_TO_READ)
    body.append(f"<h2>How to read this report</h2><ul>{how}</ul>")
    body.append("<h2>Per-matrix allocation</h2>" + _html_table(alloc))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f0f0f0}"
             "img{max-width:100%}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    write_text(paths["report_html"], doc)
    return paths
