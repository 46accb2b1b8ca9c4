"""The QLoRA anchor for the memory runs: bitsandbytes NF4 + double quantization loaded through transformers
(BitsAndBytesConfig, bf16 compute), PEFT LoRA of rank 16 on the seven projections, AdamW, the same pydoc token
blocks and batch as `lqplan train`, gradient checkpointing in train mode (transformers only checkpoints then).
Prints one JSON line: GPU peaks from process start (allocated, reserved), host max RSS, tokens/s, load seconds.
--profile-steps N: N more steps under torch.profiler after the timed ones, their time per step by kind of kernel
(planner/testing/kernels.py) in the JSON under "profile" (the peaks and tokens/s are read before them).

    python bench/qlora_anchor.py --model /var/tmp/llama13b --batch-size 4 --max-len 512 --steps 20 \
        --gradient-checkpointing --out reports/memory-raw/qlora.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import real_text_splits  # noqa: E402
from planner.train.data import causal_blocks  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile-steps", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PROJECTIONS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - t0
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = AutoTokenizer.from_pretrained(args.model)
    blocks = causal_blocks(tok, real_text_splits()["train"], args.max_len)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    rates = []

    def step():
        ids = blocks[torch.randint(len(blocks), (args.batch_size,), generator=gen)].to(dev)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        rates.append(ids.numel() / (time.perf_counter() - t))
        return loss

    for _ in range(args.steps):
        loss = step()
    result = {"arm": "qlora-bnb-nf4-dq+peft", "model": args.model, "batch_size": args.batch_size,
              "max_len": args.max_len, "steps": args.steps, "rank": args.rank,
              "gradient_checkpointing": args.gradient_checkpointing,
              "checkpointing_active": bool(getattr(model, "is_gradient_checkpointing", False)),
              "load_seconds": round(load_seconds, 2), "tokens_per_s": statistics.median(rates[3:] or rates),
              "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
              "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev),
              "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "final_loss": float(loss.detach()), "trainable_params": sum(q.numel() for q in params)}
    if args.profile_steps:
        from planner.testing.kernels import summarize
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                step()
        result["profile"] = summarize(prof, args.profile_steps)
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
