"""What a plan's report says, as data frames and sentences: the allocation per matrix, layer and type, the totals
with the optimality claim, and the comparisons with the data-free and the untied plan (planner.report.render
formats them)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import UserError
from ..plan.document import Plan
from ..plan.ilp import error_budget_curve

_INT = re.compile(r"^\d+$")
CURVE_BITS_PER_PARAM = (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.127, 4.5, 5.0)


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


def group_frame(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """allocation_frame's rows summed per `key` ("layer" or "type"): matrices, parameters, bits/param, mean rank,
    bytes, error and its share of the total."""
    d = df.assign(params=df["m"] * df["n"])
    if key == "layer":
        d = d.assign(layer=d["layer"].astype(object).where(d["layer"].notna(), "(none)"))
    g = d.groupby(key, sort=False).agg(matrices=("name", "size"), params=("params", "sum"), bytes=("bytes", "sum"),
                                        mean_rank=("rank", "mean"), error=("error", "sum"))
    g["bits_per_param"] = g["bytes"] * 8 / g["params"]
    total_error = d["error"].sum()
    g["error_share"] = g["error"] / total_error if total_error > 0 else np.nan
    return g.reset_index()[[key, "matrices", "params", "bits_per_param", "mean_rank", "bytes", "error", "error_share"]]


GAP_ROW = "gap to LP relaxation bound (includes the integrality gap)"
BOUND_ROW = "LP relaxation bound"


_PROOFS = {"lp-bound": "the greedy plan meets the LP relaxation bound",
           "fixing": "reduced-cost fixing left one candidate per matrix",
           "mip": "the MIP solver's branch and bound",
           "dp": "exact dynamic program over the budget after reduced-cost fixing, states pruned by LP bounds"}


def proof_text(s: dict) -> str | None:
    """The optimality claim in words: what proved it and, where the proof allows a relative tolerance (the greedy
    plan meeting the LP bound, the MIP solver's search), which; reduced-cost fixing and the dynamic program are
    exact over the candidates the fixing kept, which include every plan within the tolerance."""
    status = s.get("status")
    if status is None:
        return None
    tol = s.get("mip_rel_tol")
    exact = s.get("proof") in ("fixing", "dp")
    within = f" within relative MIP tolerance {float(tol):g}" if tol is not None and not exact else ""
    if status == "optimal":
        how = _PROOFS.get(s.get("proof") or "", s.get("proof") or "")
        return f"proven optimal{within}" + (f" ({how})" if how else "")
    return f"not proven optimal (status {status}); see the gap to the LP relaxation bound"


def totals_frame(plan: Plan) -> pd.DataFrame:
    t, s, b = plan.totals, plan.solver, plan.budget
    rows = [("budget", b.get("spec", "")), ("budget bits", b.get("bits")),
            ("planned parameters", t.get("params")), ("bits/param", t.get("bits_per_param")),
            ("bits", t.get("bits")), ("bytes", t.get("bytes")), ("model bytes", t.get("model_bytes")),
            ("total error", t.get("error")),
            ("tie", ", ".join(map(str, plan.method["tie"])) if plan.method.get("tie") else None),
            ("solver", s.get("solver", s.get("name"))),
            ("solver status", s.get("status")), ("optimality proof", proof_text(s)),
            (BOUND_ROW, s.get("bound")), (GAP_ROW, s.get("gap")), ("solver seconds", s.get("seconds"))]
    return pd.DataFrame([(k, v) for k, v in rows if v is not None], columns=["quantity", "value"])


# (section title, weighted-error row, plan column, ratio column, the plan's name in the note) per objective
_COMPARISON_NAMES = {
    "fisher": ("Fisher weighting vs the data-free plan", "Fisher-weighted error", "Fisher plan", "Fisher / data-free",
               "The Fisher plan minimises the Fisher-weighted error"),
    "output": ("Output-aware objective vs the data-free plan", "output error ||D_r(W - Q - A·Bᵀ)L||²",
               "output-aware plan", "output-aware / data-free", "The output-aware plan minimises the output error"),
}


def comparison_names(comparison: dict) -> tuple:
    """(section title, weighted-error row, plan column, ratio column, note) for the comparison's objective."""
    return _COMPARISON_NAMES[comparison.get("objective", "fisher")]


def plan_comparison(plan: Plan) -> dict | None:
    """The weighted plan's comparison with the data-free plan as plan.json keeps it (Fisher or output objective)."""
    for key in ("fisher", "output"):
        record = plan.method.get(key)
        if isinstance(record, dict) and record.get("comparison"):
            return record["comparison"]
    return None


def fisher_frame(comparison: dict | None) -> pd.DataFrame | None:
    """The weighted (Fisher or output-aware) plan against the data-free plan (api.fisher_comparison), one row per
    measure."""
    if not comparison:
        return None
    c = comparison
    _, weighted, column, ratio, _ = comparison_names(c)
    rows = [(weighted, c.get("fisher_plan_weighted_error"), c.get("plain_plan_weighted_error")),
            ("plain error ||W - Q - A·Bᵀ||²", c.get("fisher_plan_unweighted_error"),
             c.get("plain_plan_unweighted_error"))]
    df = pd.DataFrame([r for r in rows if r[1] is not None and r[2] is not None],
                      columns=["measure", column, "data-free plan"])
    df[ratio] = df[column] / df["data-free plan"]
    return df


def tie_frame(method: dict) -> pd.DataFrame | None:
    """The tied plan against the untied optimum at the same budget (api.tie_comparison), one row per plan."""
    c = method.get("tie_cost")
    keys = ("tied_error", "untied_error", "tied_bits", "untied_bits")
    if not isinstance(c, dict) or not all(isinstance(c.get(k), (int, float)) for k in keys):
        return None
    rows = [("tied (this plan)", c["tied_error"], c["tied_bits"], c.get("tied_bits_per_param")),
            ("untied, same budget", c["untied_error"], c["untied_bits"], c.get("untied_bits_per_param"))]
    df = pd.DataFrame(rows, columns=["plan", "total error", "bits", "bits/param"])
    untied = float(c["untied_error"])
    df["error vs untied"] = [f"{(float(c['tied_error']) - untied) / untied:+.3%}" if untied > 0 else "", ""]
    return df


def tie_note(method: dict) -> str:
    """The sentence under the tie section: how many matrices the tie joined and how many the untied plan changes."""
    c = method["tie_cost"]
    status = c.get("untied_status")
    unproven = f" The untied plan is not proven optimal (status {status})." if status not in (None, "optimal") else ""
    return (f"Tie {', '.join(map(str, method.get('tie') or []))}: {c.get('tied_matrices')} matrices in "
            f"{c.get('groups')} fused groups share their group's configuration. Matrices configured differently in "
            f"the untied plan: {c.get('changed_matrices')}.{unproven}")


def fisher_note(comparison: dict) -> str:
    """The sentence under the objective comparison: how many matrices differ, and which row must not be worse."""
    changed, total = comparison.get("changed_matrices"), comparison.get("matrices")
    of = f" of {total}" if total is not None else ""
    return (f"Matrices whose configuration differs between the two plans: {changed}{of}. "
            f"{comparison_names(comparison)[4]}, "
            "so it should not be above the data-free plan's on that row.")


def budget_curve(table: pd.DataFrame, params: int, tie=()) -> pd.DataFrame | None:
    """The reports' error-budget curve: the ILP re-solved at CURVE_BITS_PER_PARAM, with the plan's tie (None when
    it cannot be)."""
    budgets = [int(b * params) for b in sorted({round(b, 3) for b in CURVE_BITS_PER_PARAM})]
    try:
        return error_budget_curve(table, budgets, tie=tie)
    except UserError:
        return None
