"""Time the planner's ILP at 13B and 70B size: the exact solver (planner.plan.mckp) against HiGHS and CBC through PuLP.

Instances (planner/testing/tables.py): near-symmetric Llama-2-13B (280 matrices) and -70B (560 matrices) tables x the
default 48-point grid, every layer of a type sharing one error model up to 1e-4 relative noise (the hard case for
branch and bound), plus any real profile.csv given with --profile. Per instance and budget: the default solve
(dominance, exact LP bound, greedy + local-search incumbent, reduced-cost fixing, then the bounded sparse DP), and
the same steps 1-4 followed by HiGHS and by CBC with a time limit, each said proven or not; wall time includes
preparing the model from the table. --methods runs the older comparison on the random-factor 70B table (each
solver with and without steps 3-4).

    python bench/bench_ilp.py [--models 13b,70b] [--budgets 2.5,2.75,3.0,3.5,4.127] [--profile path/profile.csv]
                              [--mip-time-limit 60] [--threads 2] [--repeat 3] [--skip-mip] [--seed 0]
                              [--tie qkv,gate_up]
    python bench/bench_ilp.py --methods [--budget 2.75] [--cbc-time-limit 400] [--skip-plain]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.plan.ilp import InfeasibleBudget, solve  # noqa: E402
from planner.profile.grid import make_grid  # noqa: E402
from planner.testing.tables import LLAMA_70B, load_profile, near_symmetric_table, params_of  # noqa: E402

LLAMA2_70B = LLAMA_70B  # (out, in) as stored by torch.nn.Linear
BUDGETS = "2.5,2.75,3.0,3.5,4.127"


def llama70b_table(seed: int = 0, layers: int = 80) -> pd.DataFrame:
    """Random factors per matrix (not near-symmetric): e = numel * c_i * 2^(-2*bits) * f_i(block) * g_i(rank)."""
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


def _timed(table, budget, repeat, **kwargs):
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        sol = solve(table, budget, **kwargs)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), sol


def bench_instance(name: str, table: pd.DataFrame, budgets: list[float], args) -> list[dict]:
    params = params_of(table)
    print(f"== {name}: {table['matrix'].nunique()} matrices x {table.groupby('matrix').size().max()} configs, "
          f"{params:,} params" + (f", tie {args.tie}" if args.tie else ""), flush=True)
    out = []
    for bpp in budgets:
        budget = int(bpp * params)
        try:
            wall, sol = _timed(table, budget, args.repeat, threads=args.threads, tie=args.tie)
        except InfeasibleBudget as exc:  # small real matrices: the scales and adapters alone can exceed it
            print(f"{bpp:5.3f} bits/param  infeasible: the smallest plan takes {exc.min_bits / params:.4f}", flush=True)
            continue
        row = {"instance": name, "bpp": bpp, "exact_s": wall, "proof": sol.proof, "objective": sol.objective,
               "bound": sol.bound}
        line = (f"{bpp:5.3f} bits/param  exact {wall:6.3f} s ({sol.status}, {sol.proof or 'not proven'})  "
                f"objective {sol.objective:.10g}  LP gap {sol.gap:.2e}  kept {sol.pruned['in_model']}")
        for solver in () if args.skip_mip else ("highs", "cbc"):
            w, s = _timed(table, budget, 1, solver=solver, threads=args.threads, time_limit=args.mip_time_limit,
                          exact_dp=False, tie=args.tie)
            proved = "proved" if s.status == "optimal" else "NOT proved"
            row |= {f"{solver}_s": w, f"{solver}_proved": s.status == "optimal", f"{solver}_ratio": s.objective / sol.objective}
            line += f"  | {solver} {w:6.2f} s {proved}, objective ratio {s.objective / sol.objective:.9f}"
        print(line, flush=True)
        out.append(row)
    return out


def compare_methods(args) -> None:
    """The earlier comparison: default (DP) vs steps 1-4 + MIP vs plain MIP, HiGHS and CBC, on llama70b_table."""
    t0 = time.perf_counter()
    table = llama70b_table(args.seed)
    params = params_of(table)
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
            wall, sol = _timed(table, budget, args.repeat if fix else 1, solver=solver, threads=args.threads,
                               time_limit=limit, fix_by_bound=fix, exact_dp=dp)
            results[(mode, solver)] = (wall, sol)
            print(f"{mode:7s} {'dp' if dp else solver:5s} wall {wall:8.3f} s  status {sol.status} "
                  f"({sol.proof or 'not proven'})  objective {sol.objective:.10g}  LP bound {sol.bound:.10g}  "
                  f"gap {sol.gap:.3e}  bits/param {sol.total_bits / params:.6f}  pruned {sol.pruned}", flush=True)
    wd, sd = results[("default", "highs")]
    for mode, _, dp in modes:
        if dp:
            continue
        (wh, sh), (wc, sc) = results[(mode, "highs")], results[(mode, "cbc")]
        print(f"{mode}: HiGHS/DP wall-time ratio {wh / wd:.2f}; objective ratio {sh.objective / sd.objective:.12f}")
        same = "same choice" if sh.choice == sc.choice else "different choice"
        print(f"{mode}: CBC/HiGHS wall-time ratio {wc / wh:.2f}; objective ratio {sc.objective / sh.objective:.12f} "
              f"({same})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="13b,70b", help="near-symmetric instances to run ('' for none)")
    ap.add_argument("--budgets", default=BUDGETS, help="bits per parameter, comma-separated")
    ap.add_argument("--profile", action="append", default=[], help="a real profile.csv (repeatable)")
    ap.add_argument("--mip-time-limit", type=float, default=60.0, help="seconds per HiGHS / CBC run")
    ap.add_argument("--skip-mip", action="store_true", help="time only the exact solver")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the exact solver (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie", default="", help="fused groups solved as one item each (planner.plan.tie), e.g. qkv,gate_up")
    ap.add_argument("--methods", action="store_true", help="the earlier method comparison on the random 70B table")
    ap.add_argument("--budget", type=float, default=2.75, help="--methods: bits per parameter")
    ap.add_argument("--cbc-time-limit", type=float, default=400.0, help="--methods: CBC's limit")
    ap.add_argument("--skip-plain", action="store_true", help="--methods: do not time the plain ILP")
    args = ap.parse_args(argv)
    if args.methods:
        compare_methods(args)
        return
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg(), flush=True)  # the machine is shared
    rows = []
    for model in [m for m in args.models.split(",") if m.strip()]:
        rows += bench_instance(f"near-symmetric {model}", near_symmetric_table(model, seed=args.seed), budgets, args)
    for path in args.profile:
        rows += bench_instance(str(path), load_profile(path), budgets, args)
    if rows:
        worst = max(rows, key=lambda r: r["exact_s"])
        print(f"slowest exact solve: {worst['exact_s']:.3f} s ({worst['instance']}, {worst['bpp']} bits/param)")
    print("load average (1, 5, 15 min): %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
