"""Where `lqplan train`'s step spends its time: the student built from the shards as `lqplan train` builds it, the
training loop's own step (planner.train.loop.train: bf16 autocast on a GPU, the fused quantized-LoRA layers,
checkpointing as asked) run for --warmup steps (Triton compiles, cuBLAS picks its kernels), then --steps more
under torch.profiler; prints the time per step by kind of kernel (planner/testing/kernels.py) and writes it as JSON.
QLoRA's side of the same table: bench/qlora_anchor.py --profile-steps N.

    python bench/step_profile.py --model M --plan P --batch-size 4 --max-len 512 --gradient-checkpointing \
        --out step_profile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.testing.kernels import render, summarize  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoTokenizer

    from planner.corpus import real_text_splits
    from planner.devices import dequant_backend_from_env, resolve_device
    from planner.model.resolve import resolve_model
    from planner.plan.document import Plan
    from planner.train.apply import LayerRecipe
    from planner.train.build import build_student
    from planner.train.loop import train
    from planner.train.settings import TrainSettings

    dev = resolve_device(None)
    plan = Plan.load(args.plan)
    student = build_student(resolve_model(args.model), plan, AutoConfig.from_pretrained(args.model),
                            LayerRecipe.of(plan, "qlora"), causal=True, device=dev,
                            dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                            backend=dequant_backend_from_env())
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = real_text_splits()["train"]
    s = TrainSettings(steps=args.warmup, batch_size=args.batch_size, max_len=args.max_len, save_model=False,
                      gradient_checkpointing=args.gradient_checkpointing, eval_texts=1)
    train(student, tok, texts, s, progress=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        history = train(student, tok, texts, dataclasses.replace(s, steps=args.steps), progress=False)
    summary = {"arm": "lqplan", "plan": args.plan, "batch_size": args.batch_size, "max_len": args.max_len,
               "gradient_checkpointing": args.gradient_checkpointing, **summarize(prof, args.steps),
               "tokens_per_s_under_profiler": [round(h["tokens_per_s"]) for h in history if "tokens_per_s" in h]}
    print(render(summary, "lqplan train step"))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
