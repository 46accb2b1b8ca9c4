"""Time the planner's ILP on a Llama-2-70B-sized instance: 560 matrices x the default 48-point grid, 2.75 bits/param.

Errors are synthetic but shaped like real profiles: e = numel * c_i * 2^(-2*bits) * f_i(block) * g_i(rank) * noise,
with seeded per-matrix factors. Each solver runs with the full method (dominance, exact LP bound, greedy warm start,
reduced-cost fixing) and as the plain ILP (dominance only); wall time includes preparing the model from the table.

    python bench/bench_ilp.py [--budget 2.75] [--threads 2] [--cbc-time-limit 400] [--repeat 3] [--seed 0] [--skip-plain]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.plan.ilp import solve  # noqa: E402
from planner.profile.grid import make_grid  # noqa: E402

LLAMA2_70B = {  # (out, in) as stored by torch.nn.Linear
    "self_attn.q_proj": (8192, 8192), "self_attn.k_proj": (1024, 8192), "self_attn.v_proj": (1024, 8192),
    "self_attn.o_proj": (8192, 8192), "mlp.gate_proj": (28672, 8192), "mlp.up_proj": (28672, 8192),
    "mlp.down_proj": (8192, 28672),
}


def llama70b_table(seed: int = 0, layers: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    grid = make_grid()
    cost = {(shape, p.label): p.bits(shape) for shape in set(LLAMA2_70B.values()) for p in grid}
    bits = np.array([p.config.bits for p in grid], dtype=float)
    block = np.array([p.config.blocksize for p in grid], dtype=float)
    rank = np.array([p.rank for p in grid], dtype=float)
    rows = []
    for layer in range(layers):
        for kind, (m, n) in LLAMA2_70B.items():
            c = rng.lognormal(0.0, 0.6)  # how hard this matrix is to quantize
            block_slope = rng.uniform(0.05, 0.25)  # error growth per doubling of the block
            rank_gain = rng.uniform(0.02, 0.12)  # error removed per doubling of the rank (spectrum decay)
            err = (m * n * 1e-4 * c * 2.0 ** (-2 * bits) * (1 + block_slope * np.log2(block / 16))
                   * (1 - rank_gain * np.log2(rank / 16)) * rng.lognormal(0.0, 0.01, size=len(grid)))
            name = f"model.layers.{layer}.{kind}"
            for p, e in zip(grid, err):
                rows.append((name, m, n, p.label, float(e), cost[((m, n), p.label)]))
    return pd.DataFrame(rows, columns=["matrix", "m", "n", "label", "error", "storage_bits"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2.75, help="bits per parameter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cbc-time-limit", type=float, default=400.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the full method per solver (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-plain", action="store_true", help="do not time the plain ILP (CBC can take minutes)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    table = llama70b_table(args.seed)
    params = int((table.drop_duplicates("matrix").eval("m * n")).sum())
    budget = int(args.budget * params)
    print(f"instance: {table['matrix'].nunique()} matrices x {table['label'].nunique()} configs, "
          f"{params:,} params, budget {args.budget} bits/param = {budget:,} bits "
          f"(table built in {time.perf_counter() - t0:.1f} s)")

    results = {}
    # "default": what `lqplan plan` runs (steps 1-4, then the exact DP); "full": steps 1-4, then the MIP solver;
    # "plain": the MIP solver alone.
    modes = [("default", True, True), ("full", True, False)] + ([] if args.skip_plain else [("plain", False, False)])
    for mode, fix, dp in modes:
        for solver in (("highs",) if dp else ("highs", "cbc")):  # the DP does not call a solver
            limit = args.cbc_time_limit if solver == "cbc" else None
            runs = []
            for _ in range(args.repeat if fix else 1):
                t = time.perf_counter()
                sol = solve(table, budget, solver=solver, threads=args.threads, time_limit=limit, fix_by_bound=fix,
                            exact_dp=dp)
                runs.append(time.perf_counter() - t)
            wall = statistics.median(runs)
            results[(mode, solver)] = (wall, sol)
            print(f"{mode:7s} {'dp' if dp else solver:5s} wall {wall:8.3f} s (runs {', '.join(f'{r:.3f}' for r in runs)})  "
                  f"status {sol.status} ({sol.proof or 'not proven'})  objective {sol.objective:.10g}  "
                  f"LP bound {sol.bound:.10g}  gap {sol.gap:.3e}  bits/param {sol.total_bits / params:.6f}  "
                  f"pruned {sol.pruned}", flush=True)
    wd, sd = results[("default", "highs")]
    for mode, _, dp in modes:
        if dp:
            continue
        (wh, sh), (wc, sc) = results[(mode, "highs")], results[(mode, "cbc")]
        print(f"{mode}: HiGHS/DP wall-time ratio {wh / wd:.2f}; objective ratio {sh.objective / sd.objective:.12f}")
        same = "same choice" if sh.choice == sc.choice else "different choice"
        print(f"{mode}: CBC/HiGHS wall-time ratio {wc / wh:.2f}; objective ratio {sc.objective / sh.objective:.12f} "
              f"({same})")


if __name__ == "__main__":
    main()
