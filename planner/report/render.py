"""Human-readable reports of a plan: report.md, a self-contained report.html, allocation.csv and PNG figures."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..fsio import write_bytes, write_text
from ..plan.document import Plan
from ..plan.ilp import uniform_solutions

_INT = re.compile(r"^\d+$")


HOW_TO_READ = (
    ("Totals", "bits/param counts everything the plan stores for the planned matrices (quantized codes, scales, "
     "second-level scales and the 16-bit LoRA adapters) divided by their parameter count; bytes is the same in bytes."),
    ("Error", "the sum over matrices of the (Fisher-weighted if calibration was used) squared Frobenius error "
     "||W - Q - A·Bᵀ||², so large matrices weigh more; compare errors between plans of the same model only."),
    ("Optimality", "solver status 'optimal' means proven optimal: no plan within the budget has a total error "
     "smaller by more than the MIP tolerance (relative 1e-6); the proof line says what proved it (the LP bound "
     "itself, reduced-cost fixing, or the MIP solver's search). 'feasible' means a time limit stopped the search."),
    ("LP bound and gap", "the LP relaxation bound is the exact optimum of the problem with fractional choices "
     "allowed: no plan can have a smaller total error. The gap to it, (error - bound) / error, includes the "
     "integrality gap (whole configurations cannot fill the budget exactly), so a proven-optimal plan usually has "
     "a small non-zero gap; it bounds how much better any plan could be."),
    ("Fisher comparison", "with --calib, the plan minimises the Fisher-weighted error; it is compared with the "
     "data-free plan for the same budget and grid, both measured by the Fisher-weighted error (and the plain one)."),
    ("Heatmaps", "each matrix's bits/param (incl. adapters) and LoRA rank by layer (rows) and matrix type (columns): "
     "brighter cells are where the budget went."),
    ("Error-budget curve", "the best error reachable at each budget (line) against one configuration for every matrix "
     "(points); the vertical distance at equal bits is what mixing configurations buys."),
)


def parse_name(name: str) -> tuple[int | None, str]:
    """Layer index and matrix type from a dotted name: the first integer component is the layer, the components
    after it the type ("model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")); no integer -> (None, name)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INT.match(part):
            rest = ".".join(parts[i + 1:])
            return int(part), rest or ".".join(parts[:i])
    return None, name


def allocation_frame(plan: Plan, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per planned matrix, in plan order."""
    rows = []
    for e in plan.matrices:
        layer, mtype = parse_name(e.name)
        m, n = e.shape
        cfg = e.point.config
        rows.append({"name": e.name, "layer": layer, "type": mtype, "m": m, "n": n, "label": e.point.label,
                     "bits": cfg.bits, "blocksize": cfg.blocksize, "rank": e.point.rank, "error": e.error,
                     "bytes": e.bytes, "bits_per_param": e.bytes * 8 / (m * n)})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    if table is not None and "error_unweighted" in table.columns and len(df):
        lookup = table.assign(matrix=table["matrix"].astype(str)).set_index(["matrix", "label"])["error_unweighted"]
        keys = pd.MultiIndex.from_arrays([df["name"], df["label"]])
        df["error_unweighted"] = lookup.reindex(keys).to_numpy()
    return df


def _group(df: pd.DataFrame, key: str) -> pd.DataFrame:
    d = df.assign(params=df["m"] * df["n"])
    if key == "layer":
        d = d.assign(layer=d["layer"].astype(object).where(d["layer"].notna(), "(none)"))
    g = d.groupby(key, sort=False).agg(matrices=("name", "size"), params=("params", "sum"), bytes=("bytes", "sum"),
                                        mean_rank=("rank", "mean"), error=("error", "sum"))
    g["bits_per_param"] = g["bytes"] * 8 / g["params"]
    total_error = d["error"].sum()
    g["error_share"] = g["error"] / total_error if total_error > 0 else np.nan
    return g.reset_index()[[key, "matrices", "params", "bits_per_param", "mean_rank", "bytes", "error", "error_share"]]


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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _heatmaps(alloc: pd.DataFrame) -> bytes | None:
    d = alloc.loc[alloc["layer"].notna()]
    if d.empty:
        return None
    types = list(dict.fromkeys(d["type"]))
    layers = sorted(int(x) for x in d["layer"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(types), 1.5 + 0.28 * len(layers)), squeeze=False)
    for ax, col, title, fmt in ((axes[0][0], "bits_per_param", "bits/param (incl. adapters)", "{:.2f}"),
                                (axes[0][1], "rank", "LoRA rank", "{:.0f}")):
        grid = d.pivot_table(index="layer", columns="type", values=col, aggfunc="mean").reindex(index=layers,
                                                                                              columns=types)
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        step = max(1, len(layers) // 40)
        ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=8)
        ax.set_xlabel("matrix type")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if len(layers) * len(types) <= 300:
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                if not math.isnan(v):
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="white")
    fig.tight_layout()
    return _png(fig)


def _curve_plot(curve: pd.DataFrame | None, uniform: pd.DataFrame | None, plan: Plan) -> bytes | None:
    if (curve is None or curve.empty) and (uniform is None or uniform.empty):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if curve is not None and not curve.empty:
        ok = curve.loc[curve["total_error"].notna()]
        ax.plot(ok["bits_per_param"], ok["total_error"], "o-", color="C0", label="best plan at each budget")
    if uniform is not None and not uniform.empty and "bits_per_param" in uniform.columns:
        ax.scatter(uniform["bits_per_param"], uniform["total_error"], color="C1", s=14,
                   label="one configuration everywhere")
    t = plan.totals
    if t.get("bits_per_param") is not None and t.get("error") is not None:
        ax.scatter([t["bits_per_param"]], [t["error"]], marker="*", s=180, color="C3", zorder=5, label="this plan")
    ax.set_xlabel("bits per parameter (incl. adapters)")
    ax.set_ylabel("total error")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


GAP_ROW = "gap to LP relaxation bound (includes the integrality gap)"
BOUND_ROW = "LP relaxation bound"


_PROOFS = {"lp-bound": "the greedy plan meets the LP relaxation bound",
           "fixing": "reduced-cost fixing left one candidate per matrix",
           "mip": "the MIP solver's branch and bound",
           "dp": "exact dynamic program over the budget after reduced-cost fixing, states pruned by LP bounds"}


def proof_text(s: dict) -> str | None:
    """The optimality claim in words: what proved it and within which MIP tolerance."""
    status = s.get("status")
    if status is None:
        return None
    tol = s.get("mip_rel_tol")
    within = f" within relative MIP tolerance {float(tol):g}" if tol is not None else ""
    if status == "optimal":
        how = _PROOFS.get(s.get("proof") or "", s.get("proof") or "")
        return f"proven optimal{within}" + (f" ({how})" if how else "")
    return f"not proven optimal (status {status}); see the gap to the LP relaxation bound"


def _totals_frame(plan: Plan) -> pd.DataFrame:
    t, s, b = plan.totals, plan.solver, plan.budget
    rows = [("budget", b.get("spec", "")), ("budget bits", b.get("bits")),
            ("planned parameters", t.get("params")), ("bits/param", t.get("bits_per_param")),
            ("bits", t.get("bits")), ("bytes", t.get("bytes")), ("model bytes", t.get("model_bytes")),
            ("total error", t.get("error")), ("solver", s.get("solver", s.get("name"))),
            ("solver status", s.get("status")), ("optimality proof", proof_text(s)),
            (BOUND_ROW, s.get("bound")), (GAP_ROW, s.get("gap")), ("solver seconds", s.get("seconds"))]
    return pd.DataFrame([(k, v) for k, v in rows if v is not None], columns=["quantity", "value"])


def fisher_frame(comparison: dict | None) -> pd.DataFrame | None:
    """The Fisher plan against the data-free plan (api.fisher_comparison), one row per measure."""
    if not comparison:
        return None
    c = comparison
    rows = [("Fisher-weighted error", c.get("fisher_plan_weighted_error"), c.get("plain_plan_weighted_error")),
            ("plain error ||W - Q - A·Bᵀ||²", c.get("fisher_plan_unweighted_error"),
             c.get("plain_plan_unweighted_error"))]
    df = pd.DataFrame([r for r in rows if r[1] is not None and r[2] is not None],
                      columns=["measure", "Fisher plan", "data-free plan"])
    df["Fisher / data-free"] = df["Fisher plan"] / df["data-free plan"]
    return df


def _fisher_note(comparison: dict) -> str:
    changed, total = comparison.get("changed_matrices"), comparison.get("matrices")
    of = f" of {total}" if total is not None else ""
    return (f"Matrices whose configuration differs between the two plans: {changed}{of}. The Fisher plan minimises "
            "the Fisher-weighted error, so it should not be above the data-free plan's on that row.")


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} B"


def _totals_md(plan: Plan) -> str:
    # Exact figures (not _fmt's rounding), so the report can be checked against plan.json.
    lines = []
    for k, v in _totals_frame(plan).itertuples(index=False):
        if k == "bits/param":
            v = f"{float(v):.6f}"
        elif k in ("total error", BOUND_ROW):
            v = repr(float(v))
        elif k == GAP_ROW:
            v = f"{float(v):.3e}"
        elif k == "solver seconds":
            v = f"{float(v):.3f}"
        elif isinstance(v, (int, np.integer)):
            v = f"{int(v):,}" + (f" ({_human_bytes(int(v))})" if k.endswith("bytes") else "")
        lines.append((k, str(v)))
    return _md_table(pd.DataFrame(lines, columns=["quantity", "value"]))


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
    heat = _heatmaps(alloc)
    if heat is not None:
        images["heatmap.png"] = heat
    curve_png = _curve_plot(curve, uniform, plan)
    if curve_png is not None:
        images["error_budget.png"] = curve_png
    for name, data in images.items():
        paths[name.replace(".", "_")] = out / name
        write_bytes(out / name, data)

    per_layer, per_type = _group(alloc, "layer"), _group(alloc, "type")
    extra = dict(extra or {})
    fisher = plan.method.get("fisher")
    comparison = extra.pop("fisher_comparison", None) or (fisher.get("comparison") if isinstance(fisher, dict)
                                                          else None)
    fisher_df = fisher_frame(comparison)
    run = {"model": plan.model.get("name", ""), **({"weights": plan.model["weights"]} if plan.model.get("weights")
                                                   else {}), "matrices": len(plan.matrices), **extra}
    if table is not None and len(table):
        run["configurations profiled per matrix"] = int(table.groupby("matrix").size().max())
    run_df = pd.DataFrame([(k, str(v)) for k, v in run.items()], columns=["item", "value"])
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
            run_df = pd.DataFrame([(k, str(v)) for k, v in run.items()], columns=["item", "value"])

    sections = [("Totals", None, "totals"), ("Run", run_df, None)]
    if fisher_df is not None:
        sections.append(("Fisher weighting vs the data-free plan", fisher_df, "fisher"))
    sections += [("Allocation per layer", per_layer, None), ("Allocation per matrix type", per_type, None)]
    if uni_df is not None:
        sections.append(("Uniform configurations (the same one for every matrix)", uni_df, None))
    title = f"lqplan report: {plan.model.get('name', 'model')}"

    md = [f"# {title}", ""]
    for head, df, special in sections:
        md += [f"## {head}", "", _totals_md(plan) if special == "totals" else _md_table(df), ""]
        if special == "fisher":
            md += [_fisher_note(comparison), ""]
        if special == "totals":
            for name in images:
                md += [f"![{name}]({name})", ""]
    md += ["## How to read this report", "", *(f"- **{k}**: {v}" for k, v in HOW_TO_READ),
           "- Per-matrix details are in `allocation.csv`.", ""]
    write_text(paths["report_md"], "\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"]
    for head, df, special in sections:
        body.append(f"<h2>{html.escape(head)}</h2>")
        body.append(_html_table(_totals_frame(plan) if special == "totals" else df))
        if special == "fisher":
            body.append(f"<p>{html.escape(_fisher_note(comparison))}</p>")
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
