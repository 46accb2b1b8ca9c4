"""Command line: a thin layer over planner.api. Bad input -> one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
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


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr naming the problem and the fix, exit code 2."""

    def error(self, message: str):
        hint = f"see `{self.prog} --help`"
        if "expected one argument" in message:
            hint = "a value starting with '-' must be attached with '=', e.g. --budget=VALUE; " + hint
        self.exit(2, f"lqplan: error: {message}; {hint}\n")


def _grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid and decomposition")
    g.add_argument("--bits", default="2,3,4,8", help="NF code widths to consider (default: 2,3,4,8)")
    g.add_argument("--blocks", default="16,32,64,128", help="first-level block sizes (default: 16,32,64,128)")
    g.add_argument("--ranks", default="16,32,64", help="LoRA ranks (default: 16,32,64; 0 = no adapter)")
    g.add_argument("--no-double-quant", action="store_true", help="store fp32 block scales instead of 8-bit ones")
    g.add_argument("--method", choices=("lora", "qalora", "both"), default="lora",
                   help="lora: NF configs with LoRA adapters (default); qalora: QA-LoRA points (asymmetric INT --bits "
                        "in groups of --groups input columns, fp16 scale+zero, group-pooled adapters); both: the union")
    g.add_argument("--groups", default="32,64,128", help="QA-LoRA group sizes g (default: 32,64,128)")
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
    p.add_argument("--distributed", type=int, default=None, metavar="N",
                   help="profile with N processes on this host (one per GPU) via torchrun; under torchrun itself "
                        "the job's ranks are used (see docs/distributed.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lqplan", description="Memory-budget planner for quantized LoRA "
                                     "fine-tuning (QLoRA / LoftQ / LQ-LoRA).", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="profile, solve the ILP and write plan.json + reports",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", required=True, help="bits per planned parameter ('2.75bits') or model bytes "
                   "('6GB', '6GiB', '500MB')")
    p.add_argument("--ilp-solver", choices=("highs", "cbc"), default="highs",
                   help="MIP solver through PuLP, for instances too large for the exact DP: HiGHS (default) or "
                   "PuLP's bundled CBC")
    p.add_argument("--time-limit", type=_seconds, default=60.0, metavar="SECONDS",
                   help="seconds the ILP may branch to prove optimality; then the best plan found is kept, marked "
                   "'feasible' with its gap (default 60; 0 = no limit)")
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
    _train_parsers(sub)
    return parser


def _grid(args):
    from .grid import make_grid

    return make_grid(args.bits, args.blocks, args.ranks, double_quant=not args.no_double_quant, method=args.method,
                     groups=args.groups)


def _solver(args):
    from quant import SolverSettings

    return SolverSettings(method=args.svd)


def _check_writable(folder, option: str) -> None:
    """Fail before any work (and without creating anything) when `folder` could never be written."""
    path = probe = Path(folder).expanduser()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the nearest existing ancestor decides whether the folder can be created
    if not probe.is_dir():
        raise UserError(f"{option} {folder} cannot be created: {probe} is a file, not a folder; "
                        f"choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise UserError(f"{option} {folder} {what}; choose a folder you can write to with {option}")


def _seconds(text: str) -> float:
    """argparse type for --time-limit: a number of seconds >= 0 (argparse turns the ValueError into a usage error)."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


_seconds.__name__ = "seconds (a number >= 0)"  # argparse words its error with the type's name


def _check_common(args) -> None:
    _check_writable(args.out, "--out")
    _check_writable(args.cache, "--cache")
    if args.iters < 0:
        raise UserError(f"--iters {args.iters} is negative; use 0 (plain quantization) to 5")
    if args.calib_tokens <= 0:
        raise UserError(f"--calib-tokens {args.calib_tokens} must be positive, e.g. 16384")


def cmd_plan(args) -> int:
    from .budget import parse_budget

    _check_common(args)
    parse_budget(args.budget)  # a typo fails here, before torch and the model are loaded
    grid = _grid(args)
    from .api import make_plan

    res = make_plan(model=args.model, budget=args.budget, out_dir=args.out, grid=grid, iters=args.iters,
                    solver=_solver(args), calib=args.calib, calib_tokens=args.calib_tokens,
                    ilp_solver=args.ilp_solver, cache_dir=args.cache, device=args.device, progress=not args.quiet,
                    reports=not args.no_report, include_head=args.include_head,
                    time_limit=args.time_limit or None)
    t, s = res.plan.totals, res.plan.solver
    print(f"plan: {len(res.plan.matrices)} matrices, {t['bits_per_param']:.4f} bits/param "
          f"({t['bytes'] / 2**20:.2f} MiB planned, {t['model_bytes'] / 2**20:.2f} MiB model), "
          f"error {t['error']:.6g}")
    from .report import proof_text

    print(f"solver: {proof_text(s)}; gap to LP relaxation bound {s.get('gap', 0):.2e} "
          f"(includes the integrality gap)")
    if s.get("status") != "optimal":
        print(f"solver: the time limit ({args.time_limit:g} s) stopped the proof; the plan is the best found, within "
              f"the gap above of optimal. --time-limit 0 waits for the proof")
    print(f"profile: {res.stats.summary()}")
    if res.comparison:
        c = res.comparison
        print(f"fisher: weighted error {c['fisher_plan_weighted_error']:.6g} (Fisher plan) vs "
              f"{c['plain_plan_weighted_error']:.6g} (data-free plan); {c['changed_matrices']} matrices differ")
    for k, v in res.paths.items():
        print(f"  {k}: {v}")
    return 0


def cmd_profile(args) -> int:
    from .api import get_fisher
    from .devices import resolve_device
    from .models import discover_matrices, resolve_model
    from .profile import run_profile, save_table, settings_key

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
    print(f"profile: {len(table)} rows; {stats.summary()} -> {paths[0]}")
    return 0


def cmd_report(args) -> int:
    from .ilp import uniform_solutions
    from .plan import Plan
    from .report import write_reports

    plan = Plan.load(args.plan)
    folder = Path(args.plan).parent
    out = Path(args.out) if args.out else folder
    _check_writable(out, "--out")
    csv = Path(args.profile) if args.profile else folder / "profile.csv"
    if csv.is_dir():
        csv = csv / "profile.csv"
    table = _read_profile_csv(csv)
    _check_profile_matches(plan, table, csv.with_name("profile.json"))
    paths = write_reports(plan, table, out, None,
                          uniform_solutions(table, int(plan.totals.get("budget_bits", plan.totals["bits"]))), None)
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return 0


def _read_profile_csv(csv: Path):
    import pandas as pd

    if not csv.is_file():
        raise UserError(f"no profile table at {csv}; pass --profile with the profile.csv written by `lqplan plan` "
                        "or `lqplan profile`")
    try:
        return pd.read_csv(csv)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{csv} is not a readable profile table ({type(e).__name__}); re-create it with "
                        "`lqplan profile`") from None


def _check_profile_matches(plan, table, manifest: Path) -> None:
    """The plan and the profile table must describe the same model (fingerprint in profile.json, matrix names)."""
    import json

    if manifest.is_file():
        try:
            man = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            raise UserError(f"{manifest} is not valid JSON; re-create the profile with `lqplan profile`") from None
        model = man.get("model") if isinstance(man, dict) else None
        fp = man.get("fingerprint") if isinstance(man, dict) else None
        fp = fp or (model.get("fingerprint") if isinstance(model, dict) else None)
        if fp and fp != plan.fingerprint:
            raise UserError(f"the profile table {manifest.with_name('profile.csv')} is for another model (fingerprint "
                            f"{str(fp).split(':')[-1][:12]}…) than the plan ({plan.model.get('name')!r}, "
                            f"{plan.fingerprint.split(':')[-1][:12]}…); pass --profile with that plan's profile.csv")
    if "matrix" not in table.columns:
        raise UserError("the profile table has no 'matrix' column; re-create it with `lqplan profile`")
    missing = sorted({e.name for e in plan.matrices} - set(table["matrix"].astype(str)))
    if missing:
        raise UserError(f"the profile table lacks {len(missing)} of the plan's matrices (e.g. {missing[0]}): it is "
                        "for another model or grid; pass --profile with that plan's profile.csv")


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
        if shape and not p.applies_to(shape):
            line += f" {'n/a (rank > min(out, in/g))':>25}"
        elif shape:
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


# ---- train / evaluate (planner.train.finetune, planner.evaluate.evaluate_quantized) ---------------------------
def _train_parsers(sub) -> None:
    p = sub.add_parser("train", help="apply a plan, fine-tune the adapters on real text, evaluate, save",
                       description="Apply PLAN to its model, fine-tune the LoRA adapters (causal LMs: next-token "
                       "loss; encoders: distillation of the full-precision model), evaluate before/after and the "
                       "full-precision model, write train_report.md/.json and the quantized model to --out. "
                       "Under torchrun (several processes) it trains data-parallel (DDP).")
    p.add_argument("--plan", required=True, help="plan.json written by `lqplan plan`")
    p.add_argument("--model", default=None, help="the model folder (default: the plan's model.source)")
    p.add_argument("--init", choices=("loftq", "qlora"), default="loftq",
                   help="adapters from the LoftQ/LQ-LoRA decomposition (default) or QLoRA's zero-product init")
    p.add_argument("--method", choices=("lora", "qalora"), default=None,
                   help="layer kind for every matrix (default: each plan entry's own; qalora = QA-LoRA)")
    p.add_argument("--text", default=None, help="UTF-8 training text file (default: built-in pydoc prose)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--no-dropout", action="store_true", help="set the model's dropout probabilities to 0")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: before/after only)")
    p.add_argument("--eval-texts", type=int, default=64, help="held-out paragraphs to evaluate on (default 64)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into --out (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt when it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--out", default="lqplan-train", help="output folder (default lqplan-train)")
    p.add_argument("--no-save", action="store_true", help="do not write the quantized model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="evaluate a saved quantized model against its full-precision model")
    p.add_argument("--quantized", required=True, help="folder written by `lqplan train` (OUT/quantized)")
    p.add_argument("--model", default=None, help="full-precision model folder (default: the plan's model.source)")
    p.add_argument("--eval-texts", type=int, default=64, help="held-out paragraphs (default 64)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--device", default="auto")


def cmd_train(args) -> int:
    from .train import finetune, read_text_file

    for flag in ("steps", "batch_size", "grad_accum", "eval_texts"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    for flag in ("save_every", "eval_every", "warmup_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0 (0 = off)")
    if args.max_len < 2:
        raise UserError(f"--max-len {args.max_len} must be >= 2, e.g. 128")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr} must be positive, e.g. 2e-4")
    _check_writable(args.out, "--out")  # before quantizing and training, not at the first checkpoint
    texts = read_text_file(args.text) if args.text else None
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bars too
    r = finetune(args.plan, args.model, args.out, init=args.init, method=args.method, steps=args.steps,
                 batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule,
                 warmup_steps=args.warmup_steps, max_len=args.max_len,
                 gradient_checkpointing=args.gradient_checkpointing, dropout=not args.no_dropout,
                 eval_every=args.eval_every, eval_texts=args.eval_texts, texts=texts, device=args.device,
                 progress=not args.quiet, save_every=args.save_every, resume=args.resume, seed=args.seed,
                 save_model=not args.no_save)
    if int(os.environ.get("RANK", "0")) == 0:
        rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        print(f"train: {r['steps']} steps ({r['init']}) x global batch {r['global_batch']} on {r['device']} x "
              f"{r['world_size']}; {r['metric']}: full precision {r['full_precision']:.4f}, before "
              f"{r['before']:.4f}, after {r['after']:.4f}; {rate} tokens/s; peak memory "
              f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})")
        if r.get("resumed_from") is not None:
            print(f"  resumed from the checkpoint at step {r['resumed_from']}")
        print(f"  report: {Path(args.out) / 'train_report.md'}")
        if r.get("saved"):
            print(f"  quantized model: {r['saved']}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_quantized

    r = evaluate_quantized(args.quantized, args.model, eval_texts=args.eval_texts, max_len=args.max_len,
                           device=args.device)
    print(f"{r['metric']} on {r['texts']} held-out texts: quantized {r['quantized']:.4f}, "
          f"full precision {r['full_precision']:.4f}")
    return 0


COMMANDS = {"plan": cmd_plan, "profile": cmd_profile, "report": cmd_report, "grid": cmd_grid,
            "memory": cmd_memory, "aliases": cmd_aliases, "train": cmd_train, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command in ("plan", "profile"):
            from .distributed import cli_entry

            code = cli_entry(args, list(sys.argv[1:] if argv is None else argv), COMMANDS[args.command])
            if code is not None:
                return code
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
