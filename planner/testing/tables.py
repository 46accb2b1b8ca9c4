"""MCKP instances for the planner's exact solver: near-symmetric Llama-shaped tables and real profile.csv files.

Near-symmetric = every layer of a matrix type shares one error model and differs only by 1e-4 relative noise per
(layer, configuration): the hard case for branch and bound (millions of near-equal plans), and the shape
of a real model whose layers look alike. Storage is exact (planner.profile.grid.GridPoint.bits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..profile.grid import make_grid

# (out, in) as stored by torch.nn.Linear, per decoder layer.
LLAMA_13B = {"self_attn.q_proj": (5120, 5120), "self_attn.k_proj": (5120, 5120), "self_attn.v_proj": (5120, 5120),
             "self_attn.o_proj": (5120, 5120), "mlp.gate_proj": (13824, 5120), "mlp.up_proj": (13824, 5120),
             "mlp.down_proj": (5120, 13824)}
LLAMA_70B = {"self_attn.q_proj": (8192, 8192), "self_attn.k_proj": (1024, 8192), "self_attn.v_proj": (1024, 8192),
             "self_attn.o_proj": (8192, 8192), "mlp.gate_proj": (28672, 8192), "mlp.up_proj": (28672, 8192),
             "mlp.down_proj": (8192, 28672)}
MODELS = {"13b": (LLAMA_13B, 40), "70b": (LLAMA_70B, 80)}
PROFILE_COLUMNS = ("matrix", "label", "error", "storage_bits", "m", "n")


def near_symmetric_table(model: str = "13b", seed: int = 0, layers: int | None = None,
                         noise: float = 1e-4) -> pd.DataFrame:
    """L layers x 7 Llama matrix types x the default 48-point grid (bits 2,3,4,8 x blocks 16..128 x ranks 16..64).

    error = numel * 1e-4 * c_t * 2^(-2 bits) * (1 + slope_t log2(block/16)) * (1 - gain_t log2(rank/16)), with
    (c_t, slope_t, gain_t) drawn once per matrix type t and shared by all its layers, times lognormal(0, noise) per
    (layer, configuration)."""
    shapes, default_layers = MODELS[model]
    layers = default_layers if layers is None else int(layers)
    rng = np.random.default_rng(seed)
    grid = make_grid()
    bits = np.array([p.config.bits for p in grid], dtype=float)
    block = np.array([p.config.blocksize for p in grid], dtype=float)
    rank = np.array([p.rank for p in grid], dtype=float)
    labels = [p.label for p in grid]
    per_type = {}
    for kind, (m, n) in shapes.items():
        c, slope, gain = rng.lognormal(0.0, 0.6), rng.uniform(0.05, 0.25), rng.uniform(0.02, 0.12)
        base = m * n * 1e-4 * c * 2.0 ** (-2 * bits) * (1 + slope * np.log2(block / 16)) * (1 - gain * np.log2(rank / 16))
        per_type[kind] = (m, n, base, [p.bits((m, n)) for p in grid])
    frames = []
    for layer in range(layers):
        for kind, (m, n, base, cost) in per_type.items():
            frames.append(pd.DataFrame({"matrix": f"model.layers.{layer}.{kind}", "m": m, "n": n, "label": labels,
                                        "error": base * rng.lognormal(0.0, noise, size=len(grid)),
                                        "storage_bits": cost}))
    return pd.concat(frames, ignore_index=True)


def load_profile(path: str | Path) -> pd.DataFrame:
    """A real profile table (lqplan's profile.csv): the columns the planner needs, checked."""
    table = pd.read_csv(path)
    missing = [c for c in PROFILE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: profile.csv lacks columns {missing}")
    return table.loc[:, list(PROFILE_COLUMNS)]


def params_of(table: pd.DataFrame) -> int:
    shapes = table.drop_duplicates("matrix")
    return int((shapes["m"].astype(np.int64) * shapes["n"].astype(np.int64)).sum())
