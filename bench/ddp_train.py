"""Data-parallel fine-tuning benchmark: the same fine-tune on 1 GPU and on 2 GPUs (torchrun + DDP, NCCL), with the
same global batch; loss curves, their difference, tokens/s and the speedup, written to a JSON file + a table.

Model: a Llama-architecture decoder (default: hidden 768, intermediate 2048, 12 layers, 12 heads, the embedded
MiniLM tokenizer's 30522-token vocabulary, ~132M parameters), seeded random init, saved as safetensors with the
tokenizer. Plan: NF2/NF3/NF4 blocks of 64 alternating over the matrices, rank 16, LoftQ (1 step). Each run is
`lqplan train` launched by torchrun (--nproc-per-node 1 with batch 2B, then 2 with batch B per rank).

    python bench/ddp_train.py --out ddp-train.json                  # on a 2-GPU host (H200: ~3 minutes)
    python bench/ddp_train.py --tiny --out /tmp/ddp-train-tiny.json # CPU smoke test, 2 gloo processes (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planner.fsio import write_json, write_text  # noqa: E402
from planner.testing.models import add_shape_args, llama_config, set_tiny_shape  # noqa: E402

PLAN_BITS = (2, 3, 4)


def build_model(folder: Path, args) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from planner.model.resolve import default_model_path
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(tok, args))
    model.save_pretrained(folder, safe_serialization=True)
    tok.model_max_length = 10**9  # whole texts are tokenized, then cut into blocks: no length warning
    tok.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "hidden": args.hidden, "layers": args.layers,
            "intermediate": args.intermediate, "heads": args.heads, "vocab": tok.vocab_size}


def write_plan(folder: Path, path: Path, rank: int) -> dict:
    from transformers import AutoModelForCausalLM

    from planner.profile.grid import GridPoint
    from planner.train.apply import explicit_plan
    from quant import QuantConfig

    skeleton = AutoModelForCausalLM.from_pretrained(folder)
    plan = explicit_plan(skeleton, lambda i, name, shape: GridPoint(QuantConfig(bits=PLAN_BITS[i % 3], blocksize=64),
                                                                      rank),
                         model_path=folder, iters=1, name="ddp-bench")
    plan.save(path)
    return {"matrices": len(plan.matrices), "bits_per_param": plan.totals["bits_per_param"],
            "bytes": plan.totals["bytes"]}


def run(nproc: int, batch_size: int, folder: Path, plan: Path, out: Path, args) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "planner", "train", "--plan", str(plan), "--model", str(folder), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(batch_size), "--grad-accum", str(args.grad_accum),
           "--max-len", str(args.seq_len), "--lr", str(args.lr), "--eval-texts", str(args.eval_texts),
           "--device", args.device, "--no-dropout", "--no-save", "--seed", str(args.seed)]
    if args.quiet:
        cmd.append("--quiet")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"ddp_train: the {nproc}-process run failed (exit {proc.returncode})")
    return json.loads((out / "train_report.json").read_text()), wall


def summarise(report: dict, wall: float) -> dict:
    steps = [h for h in report["history"] if "loss" in h]
    rates = [h["tokens_per_s"] for h in steps]
    steady = rates[min(5, len(rates) - 1):]  # the first steps include allocator and kernel warm-up
    return {"world_size": report["world_size"], "batch_size_per_rank": report["batch_size"],
            "global_batch": report["global_batch"], "losses": [h["loss"] for h in steps],
            "tokens_per_s": statistics.median(steady), "train_seconds": report["train_seconds"],
            "wall_seconds": round(wall, 1), "peak_memory_bytes": report["peak_memory_bytes"],
            "peak_memory_kind": report["peak_memory_kind"], "ppl_fp": report["full_precision"],
            "ppl_before": report["before"], "ppl_after": report["after"], "device": report["device"]}


def markdown(one: dict, two: dict, meta: dict) -> str:
    rows = [("processes", one["world_size"], two["world_size"]),
            ("batch per rank x ranks x accumulation", f"{one['batch_size_per_rank']} x 1 x {meta['grad_accum']}",
             f"{two['batch_size_per_rank']} x 2 x {meta['grad_accum']}"),
            ("tokens/s (median, after 5 steps)", f"{one['tokens_per_s']:.0f}", f"{two['tokens_per_s']:.0f}"),
            ("training seconds", f"{one['train_seconds']:.1f}", f"{two['train_seconds']:.1f}"),
            ("peak memory per rank", f"{one['peak_memory_bytes'] / 2**20:.0f} MiB",
             f"{two['peak_memory_bytes'] / 2**20:.0f} MiB"),
            ("loss first / last", f"{one['losses'][0]:.4f} / {one['losses'][-1]:.4f}",
             f"{two['losses'][0]:.4f} / {two['losses'][-1]:.4f}"),
            ("held-out perplexity before / after", f"{one['ppl_before']:.2f} / {one['ppl_after']:.2f}",
             f"{two['ppl_before']:.2f} / {two['ppl_after']:.2f}")]
    lines = [f"Model: Llama {meta['model']['params'] / 1e6:.1f}M parameters (random init), plan "
             f"{meta['plan']['bits_per_param']:.3f} bits/param over {meta['plan']['matrices']} matrices; "
             f"{meta['steps']} steps x {meta['global_batch']} sequences x {meta['seq_len']} tokens; {meta['device']}.",
             "", "| | 1 process | 2 processes (DDP) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"Speedup (tokens/s): {meta['speedup']:.2f}x. Loss curves: max |difference| "
              f"{meta['loss_max_abs_diff']:.2e}, max relative {meta['loss_max_rel_diff']:.2e} over {meta['steps']} "
              "steps (bf16 autocast and the all-reduce's summation order on GPUs; fp32 on CPU)."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ddp-train.json", help="JSON results file (a .md table is written beside it)")
    p.add_argument("--tiny", action="store_true", help="a small model on CPU with 2 gloo processes: a smoke test")
    p.add_argument("--device", default=None, help="cuda (default when 2 GPUs are present) or cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank in the 2-process run")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every planned matrix")
    p.add_argument("--eval-texts", type=int, default=16)
    add_shape_args(p)
    p.add_argument("--workdir", default=None, help="where the model, plan and runs go (default: a temp folder)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        set_tiny_shape(args)
        args.steps, args.batch_size, args.seq_len, args.eval_texts, args.rank = 6, 2, 32, 2, 4
        args.lr, args.grad_accum = 2e-3, 2
        args.device = args.device or "cpu"
    if args.device is None:
        args.device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
    if args.device.startswith("cuda") and torch.cuda.device_count() < 2:
        p.error(f"--device {args.device} needs 2 GPUs, this host has {torch.cuda.device_count()}; use --tiny on CPU")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lqplan-ddp-"))
    folder, plan = work / "model", work / "plan.json"
    model_info = build_model(folder, args)
    plan_info = write_plan(folder, plan, args.rank)
    one, wall1 = run(1, 2 * args.batch_size, folder, plan, work / "run-1", args)
    two, wall2 = run(2, args.batch_size, folder, plan, work / "run-2", args)
    s1, s2 = summarise(one, wall1), summarise(two, wall2)
    l1, l2 = torch.tensor(s1["losses"], dtype=torch.float64), torch.tensor(s2["losses"], dtype=torch.float64)
    meta = {"model": model_info, "plan": plan_info, "device": (torch.cuda.get_device_name(0)
                                                               if args.device.startswith("cuda") else "cpu"),
            "torch": torch.__version__, "steps": args.steps, "grad_accum": args.grad_accum, "seq_len": args.seq_len,
            "global_batch": s1["global_batch"], "speedup": s2["tokens_per_s"] / s1["tokens_per_s"],
            "loss_max_abs_diff": float((l1 - l2).abs().max()),
            "loss_max_rel_diff": float(((l1 - l2).abs() / l1.abs()).max()), "args": vars(args),
            "workdir": str(work)}
    assert s1["global_batch"] == s2["global_batch"], "the two runs must have the same global batch"
    table = markdown(s1, s2, meta)
    print(table)
    out = Path(args.out)
    write_json(out, {"schema": "lqplan.bench.ddp-train/1", "meta": meta, "one_process": s1, "two_processes": s2,
                     "table": table})
    write_text(out.with_suffix(".md"), table + "\n")
    print(f"results: {out} and {out.with_suffix('.md')}")
    return {"meta": meta, "one": s1, "two": s2}


if __name__ == "__main__":
    main()
