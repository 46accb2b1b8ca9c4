"""The verbs: each turns parsed arguments into one library call and prints its summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from quant import SolverSettings

from ..api import REPORT_OUTPUTS, budget_curve, evaluate_plan, make_plan, profile_manifest, read_run_stats
from ..corpus import read_text_file
from ..devices import resolve_device
from ..errors import UserError
from ..fsio import read_json
from ..outputs import output_folder
from ..model.discover import discover_matrices, unplanned_bytes
from ..model.memory import memory_table
from ..model.resolve import list_aliases, resolve_model
from ..model.stream import check_unplanned_finite
from ..model.tokenizer import load_tokenizer
from ..plan.budget import parse_budget
from ..plan.document import Plan
from ..plan.ilp import uniform_solutions
from ..model.fused import parse_tie
from ..plan.train_memory import ReferenceWeights, TrainShape, predict
from ..profile.objective import calibration_weights
from ..profile.grid import DEFAULT_RANKS, default_ranks, make_grid
from ..profile.run import run_profile, save_table
from ..profile.settings import ProfileSettings
from ..profile.table import read_profile_csv
from ..report.frames import proof_text
from ..report.render import write_reports
from ..schema import INT, STR, list_of, problem

if TYPE_CHECKING:
    from ..train.settings import TrainSettings

# planner.train (transformers, accelerate, peft) is imported by the verbs that train, evaluate or export, not at
# start-up: `plan` and `profile` never need it, and every start (each torchrun rank too) would load it.


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
    _check_writable(args.out, "--out")
    _check_writable(args.cache, "--cache")
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


def train_shape(args) -> TrainShape | None:
    """The fine-tune a training-memory budget or prediction is for; None without --train-batch."""
    if args.train_batch is None:
        return None
    return TrainShape(args.train_batch, args.seq_len, args.gradient_checkpointing, args.optimizer,
                      args.adapter_dtype)


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


def cmd_plan(args) -> int:
    res = make_plan(args.model, args.budget_spec, args.settings, out_dir=args.out, ilp_solver=args.ilp_solver,
                    time_limit=args.time_limit or None, cache_dir=args.cache, device=args.device,
                    progress=not args.quiet, reports=not args.no_report, train=args.train_shape)
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
    settings = args.settings
    source = resolve_model(args.model)
    matrices = discover_matrices(source, include_head=settings.include_head)
    check_unplanned_finite(source, matrices)
    weights, wkey, _ = calibration_weights(source, matrices, settings, Path(args.cache), resolve_device(args.device),
                                        not args.quiet)
    table, stats = run_profile(source, matrices, settings, weights, wkey, cache_dir=Path(args.cache),
                               device=args.device, progress=not args.quiet)
    out = Path(args.out)
    with output_folder(out, ("profile.csv", "profile.json")) as stage:
        save_table(table, stage, profile_manifest(source, settings, wkey, Path(args.cache)))
    print(f"profile: {len(table)} rows; {stats.summary()} -> {out / 'profile.csv'}")
    return 0


def cmd_report(args) -> int:
    plan = Plan.load(args.plan)
    folder = Path(args.plan).parent
    out = Path(args.out) if args.out else folder
    _check_writable(out, "--out")
    csv = Path(args.profile) if args.profile else folder / "profile.csv"
    if csv.is_dir():
        csv = csv / "profile.csv"
    table, digest = read_profile_csv(csv, with_digest=True)
    _check_profile_matches(plan, table, csv.with_name("profile.json"), digest)
    budget_bits = plan.totals.get("budget_bits", plan.budget.get("bits", plan.totals["bits"]))
    # the phase timings were written after the first render: leaving them out renders what that render did
    stats = {k: v for k, v in read_run_stats(folder, Path(args.plan)).items()
             if not k.startswith("phase_") and k != "seconds_from_process_start"}
    if "solver_seconds" in stats:  # a timing: kept out of plan.json, shown in the totals as the first render did
        plan.solver["seconds"] = stats.pop("solver_seconds")
    with output_folder(out, REPORT_OUTPUTS) as stage:
        paths = write_reports(plan, table, stage, budget_curve(table, plan.totals["params"],
                                                               plan.method.get("tie") or ()),
                              uniform_solutions(table, budget_bits), stats)
    for k, v in paths.items():
        print(f"  {k}: {out / Path(v).name}")
    return 0


_PROFILE_SPEC = {"schema?": STR, "model?": {"fingerprint?": STR}, "fingerprint?": STR, "sha256?": STR,
                 "rows?": INT, "columns?": list_of(STR)}


def _check_profile_matches(plan, table, manifest: Path, digest: str | None = None) -> None:
    """The plan and the profile table must describe the same model (fingerprint in profile.json, matrix names and
    shapes), and profile.csv must be the one profile.json was written with (its sha256)."""
    if manifest.exists():
        fix = "re-create the profile with `lqplan profile`"
        man = read_json(manifest, fix)
        found = problem(man, _PROFILE_SPEC, "profile.json")
        if found:
            raise UserError(f"{manifest} is malformed: {found}; {fix}")
        model = man.get("model") or {}
        fp = man.get("fingerprint") or model.get("fingerprint")
        if fp and fp != plan.fingerprint:
            raise UserError(f"the profile table {manifest.with_name('profile.csv')} is for another model (fingerprint "
                            f"{str(fp).split(':')[-1][:12]}…) than the plan ({plan.model.get('name')!r}, "
                            f"{plan.fingerprint.split(':')[-1][:12]}…); pass --profile with that plan's profile.csv")
        if digest is not None and man.get("sha256") not in (None, digest):
            raise UserError(f"{manifest.with_name('profile.csv')} is not the table {manifest.name} was written with "
                            f"(its sha256 differs: files of two runs mixed, or edited); {fix}")
    missing = sorted({e.name for e in plan.matrices} - set(table["matrix"]))
    if missing:
        raise UserError(f"the profile table lacks {len(missing)} of the plan's matrices (e.g. {missing[0]}): it is "
                        "for another model or grid; pass --profile with that plan's profile.csv")
    shapes = table.drop_duplicates("matrix").set_index("matrix")[["m", "n"]]
    for e in plan.matrices:
        m, n = (int(x) for x in shapes.loc[e.name])
        if e.shape != (m, n):
            raise UserError(f"plan entry {e.name} has shape {list(e.shape)} but the profile measured it as {[m, n]} "
                            "(the plan was edited or is for another model); re-create it with `lqplan plan`")


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


def _fmt(v) -> str:
    return "skipped" if v is None else f"{v:.4f}"


def cmd_memory(args) -> int:
    if args.plan:
        return memory_of_plan(args)
    print(memory_table(args.model).to_string(index=False))
    return 0


def memory_of_plan(args) -> int:
    """`lqplan memory --plan P --train-batch N ...`: the fine-tune's predicted peak GPU memory, term by term."""
    plan = Plan.load(args.plan)
    source = resolve_model(args.model or plan.model.get("source"))
    plan.check_model(source.fingerprint)
    shape = train_shape(args) or TrainShape(1, args.seq_len, args.gradient_checkpointing, args.optimizer,
                                            args.adapter_dtype)
    planned = {e.name for e in plan.matrices}
    matrices = [m for m in discover_matrices(source, include_head=True) if m.name in planned]
    p = predict(source.config, plan.matrices, unplanned_bytes(source, matrices, float_bytes=2), shape,
                reference=ReferenceWeights.of(source.tensors))
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


def train_settings(args):
    """The `lqplan train` flags as TrainSettings (which rejects a bad value in one line, before any work)."""
    from ..train.settings import TrainSettings

    return TrainSettings(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         schedule=args.schedule, warmup_steps=args.warmup_steps, max_len=args.max_len,
                         gradient_checkpointing=args.gradient_checkpointing, dropout=not args.no_dropout,
                         eval_every=args.eval_every, eval_texts=args.eval_texts, save_every=args.save_every,
                         resume=args.resume, seed=args.seed, init=args.init, method=args.method,
                         save_model=not args.no_save, optimizer=args.optimizer, adapter_dtype=args.adapter_dtype,
                         reference=not args.no_reference, pack=args.pack)


def cmd_train(args) -> int:
    from ..train.finetune import finetune

    settings = train_settings(args)
    _check_writable(args.out, "--out")  # before quantizing and training, not at the first checkpoint
    if args.data and args.text:
        raise UserError("--data and --text both give the training data; pass one of them")
    texts = read_text_file(args.text) if args.text else None
    if args.data:
        from ..hf.data import load_records  # planner.hf imports transformers' quantizer machinery: only for --data

        texts = load_records(args.data, cache_dir=Path(args.cache) / "datasets", progress=not args.quiet)
    heldout = read_text_file(args.eval_text, "--eval-text") if args.eval_text else None
    from ..train.finetune import finetune

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bars too
    r = finetune(args.plan, settings, model=args.model, out_dir=args.out, texts=texts, device=args.device,
                 progress=not args.quiet, cache_dir=args.cache, heldout=heldout)
    if int(os.environ.get("RANK", "0")) == 0:
        rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        print(f"train: {r['steps']} steps ({r['init']}) x global batch {r['global_batch']} on {r['device']} x "
              f"{r['world_size']}; {r['metric']}: full precision {_fmt(r['full_precision'])}, before "
              f"{r['before']:.4f}, after {r['after']:.4f}; {rate} tokens/s; peak memory "
              f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']}, from process start)")
        p = r.get("predicted_memory") or {}
        predicted = p.get("peak_bytes")
        if predicted and r["peak_memory_kind"] == "cuda_allocated":
            print(f"  memory model: predicted peak {predicted / 2**20:.0f} MiB (its {p['peak_phase']} phase), "
                  f"measured {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_bytes'] / predicted:.3f}x)")
        if r.get("resumed_from") is not None:
            print(f"  resumed from the checkpoint at step {r['resumed_from']}")
        print(f"  report: {Path(args.out) / 'train_report.md'}")
        if r.get("saved"):
            print(f"  quantized model: {r['saved']}")
    return 0


PLAN_ONLY = ("eval_tokens", "stride", "batch_size", "out")
QUANTIZED_ONLY = ("eval_texts",)


def cmd_evaluate(args) -> int:
    from ..train.evaluate import evaluate_quantized

    given = [k for k in (QUANTIZED_ONLY if args.plan else PLAN_ONLY) if getattr(args, k) is not None]
    given += ["stream"] if args.quantized and args.stream else []
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} applies to evaluate {'--quantized' if args.plan else '--plan'}, not "
                        f"{'--plan' if args.plan else '--quantized'}; drop it")
    texts = read_text_file(args.eval_text, "--eval-text") if args.eval_text else None
    if args.plan:
        return evaluate_plan_command(args, texts)
    r = evaluate_quantized(args.quantized, args.model, eval_texts=64 if args.eval_texts is None else args.eval_texts,
                           max_len=args.max_len or 128, device=args.device, texts=texts)
    print(f"{r['metric']} on {r['texts']} {'--eval-text' if texts else 'held-out'} texts: quantized {r['quantized']:.4f}, "
          f"full precision {r['full_precision']:.4f}")
    return 0


def evaluate_plan_command(args, texts) -> int:
    """`lqplan evaluate --plan P`: one evaluate_plan call and its one-screen summary."""
    from ..train.score import HELDOUT

    _check_writable(args.out or Path(args.plan).parent, "--out")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    given = {k: getattr(args, k) for k in ("eval_tokens", "max_len", "stride", "batch_size")
             if getattr(args, k) is not None}  # the others: PlanScorer's defaults
    r = evaluate_plan(args.plan, model=args.model, out_dir=args.out, cache_dir=args.cache, texts=texts,
                      text_source=args.eval_text, device=args.device, stream=True if args.stream else None,
                      progress=not args.quiet, **given)
    p, t, ppl, s = r["plan"], r["tokens"], r["perplexity"], r["seconds"]
    print(f"evaluate: {r['model']['name']} with plan {p['path']} ({p['bits_per_param']:.4f} bits/param, predicted "
          f"error {p['predicted_error']:.6g}; {p['init']} T={p['iters']}, {p['objective']} decomposition)")
    where = "the built-in held-out prose" if t["source"] == HELDOUT else t["source"]
    print(f"  text: {t['scored']} tokens of {where} in {t['windows']} windows of <= {t['max_len']} tokens, stride "
          f"{t['stride']}{', BOS first' if t['bos'] is not None else ''}; token digest {t['digest']}")
    print(f"  KL(fp || quantized): {r['kl']:.6f} nats/token; top-1 agreement {100 * r['top1_agreement']:.2f}%")
    print(f"  perplexity: full precision {ppl['full_precision']:.4f}, quantized {ppl['quantized']:.4f} "
          f"({100 * (ppl['quantized'] / ppl['full_precision'] - 1):+.2f}%)")
    print(f"  time: full-precision pass {s['full_precision']:.1f} s, quantize {s['quantize']:.1f} s, score "
          f"{s['score']:.1f} s on {r['device']}; peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({r['peak_memory_kind']})")
    print(f"  result: {r['path']}")
    return 0


def _source_tokenizer(plan: Plan):
    """The tokenizer of the plan's model folder, or None when it has none (the export is written without it)."""
    source = plan.model.get("source")
    return load_tokenizer(source, required=False) if source and Path(source).is_dir() else None


# Every name an export writes (any format, tokenizer files included): a new export replaces all of them
EXPORT_OUTPUTS = ("model.safetensors", "config.json", "base", "adapter", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
                  "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def cmd_export(args) -> int:
    if args.checkpoint_format is not None and args.format != "gptq":
        raise UserError(f"--checkpoint-format applies to --format gptq, not --format {args.format}; drop it")
    _check_writable(args.out, "--out")
    from ..train.export import export_merged, export_peft, load_quantized

    model, plan = load_quantized(args.quantized)
    tokenizer = _source_tokenizer(plan)
    out = Path(args.out)
    with output_folder(out, EXPORT_OUTPUTS) as stage:
        if args.format == "gptq":
            from ..hf.gptq import export_gptq

            written = [export_gptq(model, stage, args.checkpoint_format or "lqplan_offsets", tokenizer)]
        elif args.format == "merged":
            written = [export_merged(model, stage, tokenizer=tokenizer)]
        else:
            written = list(export_peft(model, stage, tokenizer=tokenizer, plan=plan, final_dir=out))
    written = [out / Path(w).relative_to(stage) for w in written]
    print(f"export: {args.format} -> {', '.join(map(str, written))}" + ("" if tokenizer else " (no tokenizer found "
          f"at the plan's model source {plan.model.get('source')!r})"))
    return 0


COMMANDS = {"plan": cmd_plan, "profile": cmd_profile, "report": cmd_report, "grid": cmd_grid,
            "memory": cmd_memory, "aliases": cmd_aliases, "train": cmd_train, "evaluate": cmd_evaluate,
            "export": cmd_export}
