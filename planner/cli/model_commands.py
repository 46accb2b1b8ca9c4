"""The verbs that run a planned model: `lqplan train`, `lqplan evaluate` and `lqplan export`, each one library call
and its printed summary. planner.train (torch, transformers, peft) is imported inside each verb, not at start-up."""

from __future__ import annotations

import os
from pathlib import Path

from ..api import evaluate_plan
from ..corpus import read_text_file
from ..errors import UserError
from ..model.tokenizer import load_tokenizer
from ..outputs import check_writable, output_folder
from ..plan.document import Plan


def _fmt(v) -> str:
    return "skipped" if v is None else f"{v:.4f}"


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
    check_writable(args.out, "--out")  # before quantizing and training, not at the first checkpoint
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

    check_writable(args.out or Path(args.plan).parent, "--out")
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
    check_writable(args.out, "--out")
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
