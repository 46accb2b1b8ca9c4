"""Executor benchmark: plan -> apply -> fine-tune -> evaluate, LQ-LoRA plans at two budgets against a QLoRA baseline.

Model: a Llama-architecture decoder (default: hidden 768, intermediate 2048, 12 layers, 12 heads, vocabulary 30522
= the embedded MiniLM tokenizer, ~132M parameters), seeded random init, optionally pre-trained in full precision for
a few hundred steps on the pydoc train split so that quantization has structure to destroy; saved as safetensors.
Its weights are NOT a released checkpoint: absolute perplexities mean little, the comparison is like-for-like.

Arms: LQ-LoRA/LoftQ plans from planner.api.make_plan at 2.75 and 4.127 bits per parameter (adapters included, as
the plan counts them), and QLoRA (uniform NF4 b64 double-quant, zero-init adapters of rank 64). For each arm:
quantization time, bytes held vs the plan, fine-tuning (next-token loss) tokens/s and peak memory of a training
step, perplexity on held-out pydoc text before and after fine-tuning, next to the full-precision model's.

    python bench/executor_gpu.py --out bench-executor            # on a GPU (H100: about 4-5 minutes)
    python bench/executor_gpu.py --tiny --out /tmp/executor-tiny # CPU smoke test (~1-2 minutes)

Writes OUT/executor.json (everything) and OUT/executor.md (the table, the command and the environment).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import real_text_splits  # noqa: E402
from planner.fsio import write_json, write_text  # noqa: E402
from planner.model.resolve import default_model_path  # noqa: E402
from planner.profile.grid import GridPoint, make_grid  # noqa: E402
from planner.testing.models import add_shape_args, llama_config, set_tiny_shape  # noqa: E402
from planner.train.apply import (  # noqa: E402
    apply_plan,
    explicit_plan,
    memory_report,
    quantized_bytes,
)
from planner.train.evaluate import perplexity  # noqa: E402
from planner.train.finetune import peak_memory  # noqa: E402
from planner.train.loop import train  # noqa: E402
from planner.train.settings import TrainSettings  # noqa: E402
from quant import NF4_QLORA  # noqa: E402

RANDOM_NOTE = ("the weights are a seeded random initialisation of a Llama architecture{pre}, not a released "
               "checkpoint: perplexities are not comparable to published numbers; the arms are compared like-for-like")


_T0 = time.perf_counter()


def phase(msg: str) -> None:
    """A timestamped progress line (stderr, flushed): a run cut off by a time limit still shows where it was."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(folder: Path, args, tok, texts, device) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(tok, args))
    info = {"params": sum(p.numel() for p in model.parameters()), "pretrain_steps": args.pretrain_steps}
    if args.pretrain_steps:
        model.to(device)
        t = time.perf_counter()
        pretrain = TrainSettings(steps=args.pretrain_steps, batch_size=args.batch_size, max_len=args.seq_len,
                                 lr=args.pretrain_lr, warmup_steps=min(50, args.pretrain_steps // 5),
                                 schedule="cosine", seed=args.seed)
        hist = train(model, tok, texts, pretrain, objective="causal", progress=not args.quiet)
        info.update(pretrain_seconds=round(time.perf_counter() - t, 1), pretrain_final_loss=hist[-1]["loss"])
        model.to("cpu")
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return info


def load_fp(folder, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)


def run_arm(name: str, plan, init: str, folder: Path, args, tok, splits, device, fp_ppl) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # on CPU; moved matrix by matrix
    sync(device)
    t = time.perf_counter()
    apply_plan(model, plan, model_path=folder, device=device, init=init, iters=None if init == "loftq" else 0,
               alpha=args.alpha, progress=not args.quiet)
    sync(device)
    quant_seconds = time.perf_counter() - t
    phase(f"{name}: applied in {quant_seconds:.1f} s")
    held = quantized_bytes(model)
    mem = memory_report(model)
    apply_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    ppl_before = perplexity(model, tok, splits["heldout"], max_len=args.seq_len, stride=args.seq_len // 2,
                            batch_size=args.eval_batch)
    phase(f"{name}: perplexity before {ppl_before:.2f}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    # Fine-tuning text the pre-training never saw (the calib split): on the memorised train split the adapters
    # only overfit further and held-out perplexity rises for every arm, which measures nothing about quantization.
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, max_len=args.seq_len, lr=args.lr,
                             grad_accum=args.grad_accum, gradient_checkpointing=args.grad_ckpt, seed=args.seed)
    history = train(model, tok, splits[args.finetune_split], settings, objective="causal", progress=not args.quiet)
    # CUDA: the allocator's peak during training; CPU: the process's peak resident set (everything so far)
    train_peak = peak_memory(device)["peak_memory_bytes"]
    phase(f"{name}: fine-tuned {args.steps} steps")
    ppl_after = perplexity(model, tok, splits["heldout"], max_len=args.seq_len, stride=args.seq_len // 2,
                           batch_size=args.eval_batch)
    phase(f"{name}: perplexity after {ppl_after:.2f}")
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    steady = rates[min(5, len(rates) - 1):]  # the first steps include allocator and kernel warm-up
    result = {
        "arm": name, "init": init, "plan_bits_per_param": plan.totals["bytes"] * 8 / plan.totals["params"],
        "configs": sorted({e.point.label for e in plan.matrices}),
        "quantize_seconds": round(quant_seconds, 2),
        "plan_bytes": plan.totals["bytes"], "held_bytes": held, "bytes_match_plan": held == plan.totals["bytes"],
        "memory": mem, "apply_peak_bytes": apply_peak,
        "train_peak_bytes": train_peak,
        "train_peak_kind": peak_memory(device)["peak_memory_kind"],
        "train_peak_above_model_bytes": train_peak - base_alloc if device.type == "cuda" else None,
        "tokens_per_s": statistics.median(steady) if steady else None,
        "loss_first": history[0]["loss"], "loss_last": statistics.mean(h["loss"] for h in history[-10:]),
        "ppl_fp": fp_ppl, "ppl_before": ppl_before, "ppl_after": ppl_after,
    }
    del model
    return result


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Model: Llama {meta['model']['params'] / 1e6:.1f}M parameters, {meta['planned_matrices']} planned "
             f"matrices; device {meta['device']}; {meta['steps']} steps x {meta['tokens_per_step']} tokens "
             f"of fine-tuning on the {meta['args']['finetune_split']} split (pre-training used the train split; "
             f"perplexity is on the held-out split).",
             f"Note: {meta['note']}.",
             "Train peak: the CUDA allocator's peak during fine-tuning (GPU), or the process's peak resident set "
             "size (CPU).", "",
             "| arm | bits/param (plan) | quantize s | bytes held = plan | train peak | tokens/s | "
             "ppl fp | ppl before | ppl after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['plan_bits_per_param']:.3f} | {r['quantize_seconds']:.1f} | "
                     f"{r['held_bytes']:,} ({'yes' if r['bytes_match_plan'] else 'NO'}) | "
                     f"{fmt_bytes(r['train_peak_bytes'])} | {r['tokens_per_s']:.0f} | {r['ppl_fp']:.2f} | "
                     f"{r['ppl_before']:.2f} | {r['ppl_after']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-executor", help="results folder: executor.json + executor.md")
    p.add_argument("--tiny", action="store_true", help="a small model and few steps: a CPU smoke test")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: alpha = rank, scaling 1)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing during fine-tuning")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="full-precision steps on the train split before quantizing (0: pure random weights)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--budgets", default=None,
                   help="comma-separated (default 2.75bits,4.127bits; --tiny: 3.5bits,5bits)")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--iters", type=int, default=3, help="LoftQ alternating steps (profile and apply)")
    p.add_argument("--qlora-rank", type=int, default=64)
    p.add_argument("--finetune-split", default="calib", choices=["calib", "train"],
                   help="text the arms are fine-tuned on (pre-training uses train; evaluation uses heldout)")
    p.add_argument("--eval-batch", type=int, default=8)
    add_shape_args(p)
    p.add_argument("--workdir", default=None, help="where the model and plans go (default: a temp folder)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        # adapters cost rank*(m+n)*16 bits: on 128-wide matrices rank 4 alone is 1 bit/param, hence higher budgets
        args.budgets = args.budgets or "3.5bits,5bits"
        set_tiny_shape(args)
        args.steps = min(args.steps, 12)
        args.batch_size, args.seq_len, args.eval_batch = 2, 64, 4
        args.pretrain_steps = min(args.pretrain_steps, 20)
        args.blocks, args.ranks, args.bits, args.iters, args.qlora_rank = "32,64", "2,4", "2,4,8", 1, 8
        args.lr = 2e-3
    args.budgets = args.budgets or "2.75bits,4.127bits"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers import AutoTokenizer

    from planner.api import make_plan  # imported late so --help works without it
    from planner.profile.settings import ProfileSettings

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.model_max_length = 10**9  # whole texts are tokenized, then cut into blocks / windows: no length warning
    splits = real_text_splits()
    if args.tiny:
        splits = {k: v[:60] for k, v in splits.items()}
        splits["heldout"] = splits["heldout"][:12]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lqplan-executor-"))
    folder = work / "model"
    model_info = build_model(folder, args, tok, splits["train"], device)

    phase(f"model built and saved: {model_info}")
    fp = load_fp(folder, device)
    fp_ppl = perplexity(fp, tok, splits["heldout"], max_len=args.seq_len, stride=args.seq_len // 2,
                        batch_size=args.eval_batch)
    fp_bytes = sum(p.numel() * p.element_size() for p in fp.parameters())
    del fp

    grid = make_grid(bits=args.bits, blocks=args.blocks, ranks=args.ranks)
    arms = []
    plan_seconds = {}
    plan_stats = {}
    for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
        t = time.perf_counter()
        phase(f"planning {budget}")
        result = make_plan(str(folder), budget, ProfileSettings(grid, args.iters), out_dir=work / f"plan-{budget}",
                           cache_dir=work / "cache", device=str(device), progress=not args.quiet,
                           reports=False)
        plan_seconds[budget] = round(time.perf_counter() - t, 1)
        plan_stats[budget] = {"profile": result.stats.summary(), "profile_seconds": round(result.stats.seconds, 1),
                              "solver": {k: v for k, v in result.plan.solver.items() if k != "objective"}}
        phase(f"planned {budget} in {plan_seconds[budget]} s: {plan_stats[budget]}")
        arms.append((f"LQ-LoRA {budget}", result.plan, "loftq"))
    planned = [e.name for e in arms[0][1].matrices]
    from transformers import AutoModelForCausalLM

    skeleton = AutoModelForCausalLM.from_pretrained(folder)
    qlora_plan = explicit_plan(skeleton, GridPoint(NF4_QLORA, args.qlora_rank), model_path=folder, names=planned,
                               iters=0, name="qlora-baseline")
    del skeleton
    arms.append((f"QLoRA NF4 r{args.qlora_rank}", qlora_plan, "qlora"))

    results = []
    for name, plan, init in arms:
        r = run_arm(name, plan, init, folder, args, tok, splits, device, fp_ppl)
        results.append(r)
        if not args.quiet:
            print(json.dumps({k: r[k] for k in ("arm", "quantize_seconds", "bytes_match_plan", "tokens_per_s",
                                                "ppl_before", "ppl_after")}), flush=True)

    pre = (f" followed by {args.pretrain_steps} full-precision training steps on pydoc text"
           if args.pretrain_steps else "")
    meta = {
        "note": RANDOM_NOTE.format(pre=pre), "model": model_info, "device": str(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"),
        "torch": torch.__version__, "planned_matrices": len(planned), "fp_bytes": fp_bytes, "fp_ppl": fp_ppl,
        "steps": args.steps, "tokens_per_step": args.batch_size * args.grad_accum * args.seq_len,
        "plan_seconds": plan_seconds, "plan_stats": plan_stats, "args": vars(args), "workdir": str(work),
        "text": {k: len(v) for k, v in splits.items()},
    }
    table = markdown(results, meta)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    meta.update(command=command, total_seconds=round(time.perf_counter() - started, 1))
    md = "\n".join([table, "", f"Command: `{command}`", "",
                    f"Environment: torch {meta['torch']}, device {meta['device']}; total wall time "
                    f"{meta['total_seconds']:.0f} s (pre-training {model_info.get('pretrain_seconds', 0)} s, "
                    f"planning {sum(plan_seconds.values()):.1f} s)."])
    print(md)
    out = Path(args.out)
    write_json(out / "executor.json", {"schema": "lqplan.bench.executor/1", "meta": meta, "results": results,
                                       "table": table})
    write_text(out / "executor.md", md + "\n")
    print(f"results: {out / 'executor.json'} and {out / 'executor.md'}")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
