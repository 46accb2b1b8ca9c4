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


def heatmaps(alloc: pd.DataFrame) -> bytes | None:
    """Bits/param and LoRA rank by layer (rows) and matrix type (columns) of allocation_frame's rows, as one PNG
    (None when no matrix has a layer index)."""
    d = alloc.loc[alloc["layer"].notna()]
    if d.empty:
        return None
    types = list(dict.fromkeys(d["type"]))
    layers = sorted(int(x) for x in d["layer"].unique())
    fig, axes = _pyplot().subplots(1, 2, figsize=(4 + 1.2 * len(types), 1.5 + 0.28 * len(layers)), squeeze=False)
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
    ax.set_xlabel("bits per parameter (incl. adapters)")
    ax.set_ylabel("total error")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)
