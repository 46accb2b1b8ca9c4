"""The report's PNG figures: the allocation heatmaps and the error-budget curve (matplotlib, loaded on first use)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from ..plan.document import Plan


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn (it takes a second to load,
    which every CLI start would pay otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _cell_label(label: str) -> str:
    """A configuration label as a heatmap cell shows it: the code and block size ('nf3-b128-dq8/256-r8' ->
    'nf3-b128'); the rank has its own panel, or the title when it is the same everywhere."""
    return "-".join(label.split("-")[:2])


def heatmap_panels(alloc: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, title) of each heatmap: bits/param always; the rank only where the plan gives matrices different
    ranks (a single rank is named in the bits panel's title instead of a flat panel)."""
    ranks = sorted({int(r) for r in alloc["rank"]})
    if len(ranks) == 1:
        return [("bits_per_param", f"bits/param (incl. adapters); LoRA rank {ranks[0]} on every matrix")]
    return [("bits_per_param", "bits/param (incl. adapters)"), ("rank", "LoRA rank")]


def heatmaps(alloc: pd.DataFrame) -> bytes | None:
    """heatmap_panels by layer (rows) and matrix type (columns) of allocation_frame's rows, as one PNG; the
    bits/param cells carry their configuration (None when no matrix has a layer index)."""
    d = alloc.loc[alloc["layer"].notna()]
    if d.empty:
        return None
    types = list(dict.fromkeys(d["type"]))
    layers = sorted(int(x) for x in d["layer"].unique())
    panels = heatmap_panels(d)
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(1 + 3 * len(panels) + 1.2 * len(types),
                                                            1.5 + 0.32 * len(layers)), squeeze=False)
    labels = d.assign(cell=d["label"].map(_cell_label)).pivot_table(
        index="layer", columns="type", values="cell", aggfunc="first").reindex(index=layers, columns=types)
    for ax, (col, title) in zip(axes[0], panels):
        grid = d.pivot_table(index="layer", columns="type", values=col, aggfunc="mean").reindex(index=layers,
                                                                                              columns=types)
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        step = max(1, len(layers) // 40)
        ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=8)
        ax.set_xlabel("matrix type")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if len(layers) * len(types) <= 300:
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                if math.isnan(v):
                    continue
                text = f"{labels.iat[i, j]}\n{v:.2f}" if col == "bits_per_param" else f"{v:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white")
    fig.tight_layout()
    return _png(fig)


def curve_title(curve: pd.DataFrame | None) -> str:
    """The error-budget figure's title: what the line is, the budgets it spans and those of its budgets (below
    the first it spans) that no plan fits."""
    title = "least total error at each budget"
    if curve is None or curve.empty:
        return title
    fits = curve.loc[curve["total_error"].notna(), "budget_bits_per_param"]
    if fits.empty:
        return f"{title}: no budget from {curve['budget_bits_per_param'].min():.3g} to " \
               f"{curve['budget_bits_per_param'].max():.3g} bits/param fits"
    start = f"{fits.min():.3g}–{fits.max():.3g} bits/param"
    below = sorted(b for b in curve["budget_bits_per_param"] if b < fits.min())
    if below:
        names = ", ".join(f"{b:.3g}" for b in below)
        return f"{title}, {start}\n(no plan fits its smaller budgets: {names} bits/param)"
    return f"{title}, {start}"


def curve_plot(curve: pd.DataFrame | None, uniform: pd.DataFrame | None, plan: Plan) -> bytes | None:
    """The error-budget curve, the uniform configurations and this plan as one PNG (None when there is neither a
    curve nor a uniform configuration)."""
    if (curve is None or curve.empty) and (uniform is None or uniform.empty):
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    if curve is not None and not curve.empty:
        ok = curve.loc[curve["total_error"].notna()]
        ax.plot(ok["bits_per_param"], ok["total_error"], "o-", color="C0", label="best plan at each budget")
    if uniform is not None and not uniform.empty and "bits_per_param" in uniform.columns:
        ax.scatter(uniform["bits_per_param"], uniform["total_error"], color="C1", s=14,
                   label="one configuration everywhere")
    t = plan.totals
    if t.get("bits_per_param") is not None and t.get("error") is not None:
        ax.scatter([t["bits_per_param"]], [t["error"]], marker="*", s=180, color="C3", zorder=5, label="this plan")
    ax.set_title(curve_title(curve), fontsize=10)
    ax.set_xlabel("bits per parameter (incl. adapters)")
    ax.set_ylabel("total error")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)
