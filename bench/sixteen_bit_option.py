"""Would a 16-bit option for sensitive matrices change the plan? Issue 18's Fisher plan at 2.75 bits ends at 1.14x
QLoRA NF4's perplexity; the grid has no unquantized point, so the planner cannot keep the handful of matrices the
Fisher weights rank highest at 16 bits. This adds that point to a profile table offline and solves again.

The 16-bit row of a matrix stores it as bf16 without an adapter: storage 16 * m * n bits, error 0. Zero is a
lower bound (bf16 rounding is far below any NF4 error), so the Fisher error this reports is the most a 16-bit
option could gain in the planner's objective; what it does after fine-tuning needs a GPU run.

    python bench/sixteen_bit_option.py reports/quality-decoder/profile-fisher.csv --budgets 2.5,2.75,3.0,3.5,4.127,4.7329
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.plan.baselines import SIXTEEN_BIT_LABEL as LABEL  # noqa: E402
from planner.plan.baselines import with_sixteen_bit  # noqa: E402
from planner.plan.ilp import solve  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="a profile.csv (the Fisher-weighted one for the question asked here)")
    p.add_argument("--budgets", default="2.5,2.75,3.0,3.5,4.127,4.7329", help="bits per planned parameter")
    args = p.parse_args(argv)
    table = pd.read_csv(args.table)
    params = int(table.groupby("matrix")[["m", "n"]].first().prod(axis=1).sum())
    extended = with_sixteen_bit(table)
    print(f"{args.table}: {table['matrix'].nunique()} matrices, {params:,} parameters")
    print("| bits | plan error, the grid | with a 16-bit option | ratio | matrices at 16 bits |")
    print("|---|---|---|---|---|")
    for budget in (float(b) for b in args.budgets.split(",")):
        bits = int(budget * params)
        base, ext = solve(table, bits), solve(extended, bits)
        kept = sorted(m for m, label in ext.choice.items() if label == LABEL)
        names = ", ".join(m.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                          for m in kept) or "none"
        print(f"| {budget} | {base.total_error:.4g} | {ext.total_error:.4g} | {ext.total_error / base.total_error:.3f} "
              f"| {len(kept)}: {names} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
