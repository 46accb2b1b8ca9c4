"""What a tie costs on a real profile: the optimal plan's total error untied and with each tie at the same budgets,
the relative increase, the bits each plan uses and the solve time (planner.plan.ilp.solve, tie=).

    python bench/tie_cost.py --profile reports/quality-decoder/profile-datafree.csv [--budgets 2.5,2.75,3.0,3.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.plan.ilp import InfeasibleBudget, solve  # noqa: E402
from planner.plan.instance import table_params  # noqa: E402
from planner.model.fused import tie_groups  # noqa: E402
from planner.profile.table import read_profile_csv  # noqa: E402

TIES = ((), ("qkv",), ("gate_up",), ("qkv", "gate_up"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="append", required=True, help="a profile.csv (repeatable)")
    ap.add_argument("--budgets", default="2.5,2.75,3.0,3.5,4.127", help="bits per parameter, comma-separated")
    args = ap.parse_args(argv)
    print("| profile | budget | tie | groups | total error | vs untied | bits/param | solve s |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.profile:
        table = read_profile_csv(Path(path))
        params = table_params(table)
        names = table["matrix"].unique()
        for bpp in (float(b) for b in args.budgets.split(",") if b.strip()):
            untied = None
            for tie in TIES:
                t0 = time.perf_counter()
                try:
                    sol = solve(table, int(bpp * params), tie=tie)
                except InfeasibleBudget:
                    print(f"| {Path(path).name} | {bpp} | {','.join(tie) or '-'} | | infeasible | | | |")
                    continue
                seconds = time.perf_counter() - t0
                untied = untied if tie else sol
                vs = f"{sol.total_error / untied.total_error - 1:+.3%}" if tie and untied else ""
                print(f"| {Path(path).name} | {bpp} | {','.join(tie) or '-'} | {len(tie_groups(names, tie))} | "
                      f"{sol.total_error:.6g} | {vs} | {sol.total_bits / params:.4f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
