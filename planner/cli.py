"""Command line: a thin layer over planner.api. Bad input -> one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError

EXAMPLES = """examples:
  plan --budget 2.75bits --model llama2-13b
  lqplan plan --budget 2.75bits                      # the embedded default model (all-MiniLM-L6-v2)
  lqplan plan --budget 3bits --calib pydoc           # Fisher-weighted (LQ-LoRA data-aware)
  lqplan plan --budget 6GB --model /path/to/hf-folder --bits 2,3,4 --ranks 64
  lqplan memory --model /path/to/folder-with-config.json
  lqplan report --plan lqplan-out/plan.json
"""


def _grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid and decomposition")
    g.add_argument("--bits", default="2,3,4,8", help="NF code widths to consider (default: 2,3,4,8)")
    g.add_argument("--blocks", default="16,32,64,128", help="first-level block sizes (default: 16,32,64,128)")
    g.add_argument("--ranks", default="16,32,64", help="LoRA ranks (default: 16,32,64; 0 = no adapter)")
    g.add_argument("--no-double-quant", action="store_true", help="store fp32 block scales instead of 8-bit ones")
    g.add_argument("--iters", type=int, default=5, help="LoftQ alternating iterations T (default 5; 0 = QLoRA)")
    g.add_argument("--svd", choices=("randomized", "exact"), default="randomized",
                   help="rank-r step: warm-started randomized subspace iteration (default) or exact SVD")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face folder, alias (see `lqplan aliases`) or hub id found in the local HF "
                        "cache; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--include-head", action="store_true", help="also plan the output head (lm_head)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--cache", default=".lqplan-cache", help="profile cache folder (default .lqplan-cache)")
    p.add_argument("--out", default="lqplan-out", help="output folder (default lqplan-out)")
    p.add_argument("--calib", default=None,
                   help="Fisher calibration: a UTF-8 text file, or 'pydoc' (Python's reference prose, built in)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqplan", description="Memory-budget planner for quantized LoRA "
                                     "fine-tuning (QLoRA / LoftQ / LQ-LoRA).", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="profile, solve the ILP and write plan.json + reports",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", required=True, help="bits per planned parameter ('2.75bits') or model bytes "
                   "('6GB', '6GiB', '500MB')")
    p.add_argument("--ilp-solver", choices=("highs", "cbc"), default="highs",
                   help="PuLP solver: HiGHS (default, ~30x faster at 70B size) or PuLP's bundled CBC")
    p.add_argument("--no-report", action="store_true", help="write plan.json only")
    _model_args(p)
    _grid_args(p)

    p = sub.add_parser("profile", help="profile only: decomposition error and cost for every matrix x config")
    _model_args(p)
    _grid_args(p)

    p = sub.add_parser("report", help="(re)write reports from an existing plan and profile table")
    p.add_argument("--plan", required=True, help="plan.json written by `lqplan plan`")
    p.add_argument("--profile", default=None, help="profile.csv (default: beside the plan)")
    p.add_argument("--out", default=None, help="output folder (default: the plan's folder)")

    p = sub.add_parser("grid", help="list the configuration grid with bits per weight")
    _grid_args(p)
    p.add_argument("--shape", default=None, help="show exact storage for an MxN matrix, e.g. 5120x13824")

    p = sub.add_parser("memory", help="dry run: memory of a model at uniform configs, from config.json alone")
    p.add_argument("--model", default=None, help="folder with config.json (weights not needed), alias or default")

    sub.add_parser("aliases", help="list model aliases and their hub ids")
    return parser


def _grid(args):
    from .grid import make_grid

    return make_grid(args.bits, args.blocks, args.ranks, double_quant=not args.no_double_quant)


def _solver(args):
    from quant import SolverSettings

    return SolverSettings(method=args.svd)


def _check_common(args) -> None:
    if args.iters < 0:
        raise UserError(f"--iters {args.iters} is negative; use 0 (plain quantization) to 5")
    if args.calib_tokens <= 0:
        raise UserError(f"--calib-tokens {args.calib_tokens} must be positive, e.g. 16384")


def cmd_plan(args) -> int:
    from .api import make_plan

    _check_common(args)
    res = make_plan(model=args.model, budget=args.budget, out_dir=args.out, grid=_grid(args), iters=args.iters,
                    solver=_solver(args), calib=args.calib, calib_tokens=args.calib_tokens,
                    ilp_solver=args.ilp_solver, cache_dir=args.cache, device=args.device, progress=not args.quiet,
                    reports=not args.no_report, include_head=args.include_head)
    t, s = res.plan.totals, res.plan.solver
    print(f"plan: {len(res.plan.matrices)} matrices, {t['bits_per_param']:.4f} bits/param "
          f"({t['bytes'] / 2**20:.2f} MiB planned, {t['model_bytes'] / 2**20:.2f} MiB model), "
          f"error {t['error']:.6g}; solver {s.get('solver')} {s.get('status')} gap {s.get('gap', 0):.2e}")
    print(f"profile: {res.stats.computed_points} points computed, {res.stats.cached_points} from cache "
          f"({res.stats.seconds:.1f} s)")
    if res.comparison:
        c = res.comparison
        print(f"fisher: weighted error {c['fisher_plan_weighted_error']:.6g} (Fisher plan) vs "
              f"{c['plain_plan_weighted_error']:.6g} (data-free plan); {c['changed_matrices']} matrices differ")
    for k, v in res.paths.items():
        print(f"  {k}: {v}")
    return 0


def cmd_profile(args) -> int:
    from .api import get_fisher
    from .models import discover_matrices, resolve_model
    from .profile import resolve_device, run_profile, save_table, settings_key

    _check_common(args)
    source = resolve_model(args.model)
    matrices = discover_matrices(source, include_head=args.include_head)
    fisher = fkey = None
    if args.calib:
        fisher, fkey = get_fisher(source, matrices, args.calib, Path(args.cache), args.calib_tokens,
                                  resolve_device(args.device), not args.quiet)
    solver = _solver(args)
    table, stats = run_profile(source, matrices, _grid(args), args.iters, solver, fisher, fkey, Path(args.cache),
                               args.device, not args.quiet)
    paths = save_table(table, Path(args.out), {"schema": "lqplan.profile/1", "model": source.name,
                                               "fingerprint": source.fingerprint,
                                               "settings": settings_key(args.iters, solver, fkey)})
    print(f"profile: {len(table)} rows; {stats.computed_points} points computed, {stats.cached_points} from cache "
          f"({stats.seconds:.1f} s) -> {paths[0]}")
    return 0


def cmd_report(args) -> int:
    from .ilp import uniform_solutions
    from .plan import Plan
    from .profile import load_table
    from .report import write_reports

    plan = Plan.load(args.plan)
    folder = Path(args.plan).parent
    table = load_table(Path(args.profile).parent if args.profile else folder)
    paths = write_reports(plan, table, Path(args.out) if args.out else folder, None,
                          uniform_solutions(table, int(plan.totals.get("budget_bits", plan.totals["bits"]))), None)
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return 0


def cmd_grid(args) -> int:
    grid = _grid(args)
    shape = None
    if args.shape:
        try:
            m, n = (int(x) for x in args.shape.lower().split("x"))
            if m <= 0 or n <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--shape {args.shape!r} is not MxN with positive integers, e.g. 5120x13824") from None
        shape = (m, n)
    print(f"{'label':32} {'bits/weight':>11}" + (f" {'bytes':>14} {'bits/param':>10}" if shape else ""))
    for p in grid:
        line = f"{p.label:32} {p.config.bits_per_weight:11.4f}"
        if shape:
            b = p.bits(shape)
            line += f" {b // 8:14d} {b / (shape[0] * shape[1]):10.4f}"
        print(line)
    print(f"{len(grid)} configurations")
    return 0


def cmd_memory(args) -> int:
    from .models import memory_table

    print(memory_table(args.model).to_string(index=False))
    return 0


def cmd_aliases(args) -> int:
    from .models import list_aliases

    for alias, hub in list_aliases().items():
        print(f"{alias:16} {hub}")
    return 0


COMMANDS = {"plan": cmd_plan, "profile": cmd_profile, "report": cmd_report, "grid": cmd_grid,
            "memory": cmd_memory, "aliases": cmd_aliases}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"lqplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lqplan: interrupted; finished work is cached, rerun the same command to resume", file=sys.stderr)
        return 130


def plan_main(argv: list[str] | None = None) -> int:
    """The `plan` console script: `plan --budget 2.75bits --model llama2-13b` == `lqplan plan ...`."""
    return main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
