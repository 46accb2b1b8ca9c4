"""The planning verbs (plan, profile, report, grid, memory, aliases) and the table of every verb: each turns parsed
arguments into one library call and prints its summary; the verbs that run a model are in model_commands."""

from __future__ import annotations

from pathlib import Path

from quant import SolverSettings

from ..api import make_plan, plan_memory, profile_model, report_plan
from ..devices import resolve_device
from ..errors import UserError
from ..outputs import check_writable
from ..model.discover import discover_matrices
from ..model.memory import memory_table
from ..model.resolve import list_aliases, resolve_model
from ..plan.budget import parse_budget
from ..model.fused import parse_tie
from ..plan.train_memory import TrainShape
from ..profile.grid import DEFAULT_RANKS, default_ranks, make_grid
from ..profile.settings import ProfileSettings
from ..report.frames import proof_text
from .model_commands import cmd_evaluate, cmd_export, cmd_train
from .overwrite import refuse_another_plan


def grid_from_args(args, ranks: str | None = None):
    """The grid the flags describe; `ranks` stands in for a --ranks left out (default_ranks of the model)."""
    given = args.ranks if args.ranks is not None else ranks  # "--ranks=" stays an error, not the default
    return make_grid(args.bits, args.blocks, given if given is not None else ",".join(map(str, DEFAULT_RANKS)),
                     double_quant=not args.no_double_quant, method=args.method, groups=args.groups)


def model_default_ranks(args) -> str | None:
    """--ranks left out: the ranks that suit the model's matrix widths (planner.profile.grid.default_ranks), read
    from its config.json and safetensors headers (no weights loaded); None when --ranks was given."""
    if args.ranks is not None:
        return None
    source = resolve_model(args.model)
    return default_ranks(min(m.shape) for m in discover_matrices(source, include_head=args.include_head))


def prepare(args) -> None:
    """Check `plan` / `profile` arguments and parse them once, before torch or the model is loaded: the output
    folders must be writable, the settings valid and the budget readable. The parsed values ride on `args`
    (args.settings, args.budget_spec) for this process and for every torchrun rank alike."""
    check_writable(args.out, "--out")
    check_writable(args.cache, "--cache")
    resolve_device(args.device)  # a device that is not there fails before the model is read
    args.budget_spec = parse_budget(args.budget) if args.command == "plan" else None
    tie = parse_tie(args.tie) if args.command == "plan" else ()  # before the model is resolved: a typo fails at once
    args.settings = ProfileSettings(grid_from_args(args, model_default_ranks(args)), args.iters,
                                    SolverSettings(method=args.svd), args.calib, args.calib_tokens, args.include_head,
                                    args.objective, rounding=args.rounding, tie=tie)
    if args.quiet and args.calib:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the Fisher model's weight-loading bar: --quiet means no bars at all
    args.train_shape = train_shape(args) if args.command == "plan" else None
    args.inputs = None  # a distributed run resolves the model and budget before its profile (cli.launch)
    if args.command == "plan" and not args.force:
        refuse_another_plan(args.out, budget=args.budget_spec.spec, method=args.settings.method_record(),
                            fingerprint=lambda: resolve_model(args.model).fingerprint,
                            objective=args.settings.objective)


def train_shape(args) -> TrainShape | None:
    """The fine-tune a training-memory budget or prediction is for; None without --train-batch."""
    if args.train_batch is None:
        return None
    return TrainShape(args.train_batch, args.seq_len, args.gradient_checkpointing, args.optimizer,
                      args.adapter_dtype)


def cmd_plan(args) -> int:
    res = make_plan(args.model, args.budget_spec, args.settings, out_dir=args.out, ilp_solver=args.ilp_solver,
                    time_limit=args.time_limit or None, cache_dir=args.cache, device=args.device,
                    progress=not args.quiet, reports=not args.no_report, train=args.train_shape, inputs=args.inputs)
    t, s = res.plan.totals, res.plan.solver
    print(f"plan: {len(res.plan.matrices)} matrices, {t['bits_per_param']:.4f} bits/param "
          f"({t['bytes'] / 2**20:.2f} MiB planned, {t['model_bytes'] / 2**20:.2f} MiB model), "
          f"error {t['error']:.6g}")

    print(f"solver: {proof_text(s)}; gap to LP relaxation bound {s.get('gap', 0):.2e} "
          f"(includes the integrality gap)")
    if s.get("status") != "optimal":
        print(f"solver: the time limit ({args.time_limit:g} s) stopped the proof; the plan is the best found, within "
              f"the gap above of optimal. --time-limit 0 waits for the proof")
    print(f"profile: {res.stats.summary()}")
    train = res.plan.budget.get("train")
    if train:
        print(f"memory: the fine-tune (batch {train['batch']} x {train['seq_len']}, checkpointing "
              f"{'on' if train['gradient_checkpointing'] else 'off'}) is predicted to peak at "
              f"{train['predicted_peak_bytes'] / 1e9:.2f} GB of the {res.plan.budget['spec']} budget "
              f"(`lqplan memory --plan` prints the terms)")
    if res.tie_cost:
        c = res.tie_cost
        print(f"tie: {','.join(res.plan.method['tie'])} joins {c['tied_matrices']} matrices in {c['groups']} groups; "
              f"error {c['tied_error']:.6g} vs {c['untied_error']:.6g} untied at the same budget "
              f"({100 * c['relative_error_increase']:+.2f}%)")
    if res.comparison:
        c = res.comparison
        if c.get("objective") == "output":
            print(f"output: output error {c['fisher_plan_weighted_error']:.6g} (output-aware plan) vs "
                  f"{c['plain_plan_weighted_error']:.6g} (data-free plan); {c['changed_matrices']} matrices differ")
        else:
            print(f"fisher: weighted error {c['fisher_plan_weighted_error']:.6g} (Fisher plan) vs "
                  f"{c['plain_plan_weighted_error']:.6g} (data-free plan); {c['changed_matrices']} matrices differ")
    for k, v in res.paths.items():
        print(f"  {k}: {v}")
    return 0


def cmd_profile(args) -> int:
    table, stats, csv = profile_model(args.model, args.settings, out_dir=args.out, cache_dir=args.cache,
                                      device=args.device, progress=not args.quiet, inputs=args.inputs)
    print(f"profile: {len(table)} rows; {stats.summary()} -> {csv}")
    return 0


def cmd_report(args) -> int:
    check_writable(Path(args.out) if args.out else Path(args.plan).parent, "--out")
    for k, v in report_plan(args.plan, profile=args.profile, out_dir=args.out).items():
        print(f"  {k}: {v}")
    return 0


def cmd_grid(args) -> int:
    shape = None
    if args.shape:
        try:
            m, n = (int(x) for x in args.shape.lower().split("x"))
            if m <= 0 or n <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--shape {args.shape!r} is not MxN with positive integers, e.g. 5120x13824") from None
        shape = (m, n)
    grid = grid_from_args(args, default_ranks([min(shape)]) if shape else None)
    print(f"{'label':32} {'bits/weight':>11}" + (f" {'bytes':>14} {'bits/param':>10}" if shape else ""))
    for p in grid:
        line = f"{p.label:32} {p.config.bits_per_weight:11.4f}"
        if shape and (not p.applies_to(shape) or p.rank > min(shape)):
            why = "rank > min(out, in)" if p.method == "lora" else "rank > min(out, in/g) or in % g != 0"
            line += f" {'n/a (' + why + ')':>25}"
        elif shape:
            b = p.bits(shape)
            line += f" {b // 8:14d} {b / (shape[0] * shape[1]):10.4f}"
        print(line)
    print(f"{len(grid)} configurations")
    return 0


def cmd_memory(args) -> int:
    if args.plan:
        return memory_of_plan(args)
    print(memory_table(args.model).to_string(index=False))
    return 0


def memory_of_plan(args) -> int:
    """`lqplan memory --plan P --train-batch N ...`: the fine-tune's predicted peak GPU memory, term by term."""
    shape = train_shape(args) or TrainShape(1, args.seq_len, args.gradient_checkpointing, args.optimizer,
                                            args.adapter_dtype)
    p = plan_memory(args.plan, shape, model=args.model)
    ckpt = "on" if shape.gradient_checkpointing else "off"
    print(f"predicted peak GPU memory of the fine-tune: {p['peak_bytes'] / 2**30:.2f} GiB (batch {shape.batch} x "
          f"{shape.seq_len} tokens, checkpointing {ckpt}, {shape.optimizer}, {shape.adapter_dtype} adapters), in "
          f"its {p['peak_phase']} phase")
    for term, value in p["terms"].items():
        print(f"  {term:18} {value / 2**30:9.3f} GiB")
    for phase, value in p["phases"].items():
        print(f"  phase {phase:12} {value / 2**30:9.3f} GiB")
    return 0


def cmd_aliases(args) -> int:
    for alias, hub in list_aliases().items():
        print(f"{alias:16} {hub}")
    return 0


COMMANDS = {"plan": cmd_plan, "profile": cmd_profile, "report": cmd_report, "grid": cmd_grid,
            "memory": cmd_memory, "aliases": cmd_aliases, "train": cmd_train, "evaluate": cmd_evaluate,
            "export": cmd_export}
