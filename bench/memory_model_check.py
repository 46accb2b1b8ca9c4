"""The training-memory model against the GPU: for each plan, the student is built once, then each setting
(checkpointing on/off x batch sizes) trains a few steps with the allocator's peak counter reset before it (the
resident model is the same for every setting, and its build peaks lower: packed weights plus one fp32 matrix), and
the peak allocated bytes are set beside planner.plan.train_memory's prediction for that setting.

    python bench/memory_model_check.py --model /var/tmp/llama13b --plans P275/plan.json P4/plan.json \
        --batches 1,4 --seq-len 512 --out reports/memory-raw/model_check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import real_text_splits  # noqa: E402
from planner.model.resolve import resolve_model  # noqa: E402
from planner.plan.document import Plan  # noqa: E402
from planner.train.apply import LayerRecipe  # noqa: E402
from planner.train.build import build_student  # noqa: E402
from planner.train.finetune import predicted_memory  # noqa: E402
from planner.train.loop import train  # noqa: E402
from planner.train.settings import TrainSettings  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--plans", nargs="+", required=True)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    from transformers import AutoConfig

    from planner.model.tokenizer import load_tokenizer

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    source = resolve_model(args.model)
    config = AutoConfig.from_pretrained(source.folder)
    tok = load_tokenizer(source.folder)
    texts = real_text_splits()["train"]
    rows = []
    for plan_path in args.plans:
        plan = Plan.load(plan_path)
        student = build_student(source, plan, config, LayerRecipe.of(plan, init="qlora"), causal=True, device=dev,
                                dtype=torch.bfloat16 if cuda else torch.float32)
        for ckpt in (False, True):
            for batch in (int(b) for b in args.batches.split(",")):
                s = TrainSettings(steps=args.steps, batch_size=batch, max_len=args.seq_len, gradient_checkpointing=ckpt,
                                  eval_texts=1, save_model=False, reference=False)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                train(student, tok, texts, s, objective="causal", progress=False)
                measured = torch.cuda.max_memory_allocated(dev) if cuda else 0  # a CPU run only checks the script
                predicted = predicted_memory(source, plan, s, torch.bfloat16)  # the GPU's training dtype
                row = {"plan": plan_path, "bits_per_param": plan.totals["bits_per_param"], "batch": batch,
                       "seq_len": args.seq_len, "gradient_checkpointing": ckpt, "measured_peak_bytes": measured,
                       "predicted_peak_bytes": predicted["train_peak_bytes"],
                       "ratio": measured / predicted["train_peak_bytes"],
                       "terms": predicted["terms"]}
                print(json.dumps({k: v for k, v in row.items() if k != "terms"}), flush=True)
                rows.append(row)
        del student
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
