"""Training step (forward + backward) of a Llama-2-13B-shaped projection stack: lqplan's QuantLoRALinear vs
bitsandbytes NF4 Linear4bit + a LoRA adapter, same shapes, same rank, bf16 compute.

One "block" is the 7 projections of a decoder layer chained as a = o(q(x) + k(x) + v(x)); y = a + down(silu(gate(a))
* up(a)) (attention itself is left out: it is the same for both). Variants: lqplan NF4 b64 dq (QLoRA's 4.127 bits),
lqplan mixed NF2/NF3/NF4, each with every dequant backend that runs here (the Triton kernel and torch.compile on
CUDA; eager on CPU); the anchors are bitsandbytes NF4 (double quant) + a lean hand-made LoRA (A, B in bf16, same
init scale, no scaling multiply: the fastest unfused form) and, where PEFT is installed, the same Linear4bit layers
with PEFT's own LoRA injected (what users run). All models are built first; the timing then runs `--repeats`
rounds, each variant in turn (so drift hits all alike); a round times `--steps` consecutive steps synchronised once,
as a training loop runs. Reported: the median over rounds of the time per step, the spread, the ratio to the lean
bitsandbytes anchor, the GPU kernel time per step (torch.profiler), resident and peak memory.

    python bench/bench_step.py [--blocks 1] [--tokens 2048] [--rank 64] [--steps 20] [--repeats 7]
                               [--backends triton,compile,eager] [--out step.json] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.devices import resolve_device  # noqa: E402
from quant import QuantConfig  # noqa: E402
from quant.blockwise import quantize  # noqa: E402
from quant.layers import QuantLoRALinear, dequant_backend, set_backend  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MIXED = {"q": 3, "k": 2, "v": 4, "o": 3, "gate": 2, "up": 3, "down": 4}


def shapes(hidden, inter):
    return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


class Block(nn.Module):
    def __init__(self, layers: dict):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        p = self.layers
        a = p["o"](p["q"](x) + p["k"](x) + p["v"](x))
        return a + p["down"](F.silu(p["gate"](a)) * p["up"](a))


def bnb_linear4bit(w, device):
    """bitsandbytes Linear4bit holding `w` in NF4 with double quant, bf16 compute."""
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.to(torch.bfloat16).cpu(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    return layer.to(device)


class BnbLoRA(nn.Module):
    """bitsandbytes Linear4bit + a lean LoRA adapter: base(x) + B(A(x)) in bf16, without the scaling multiply PEFT
    applies (the fastest unfused form)."""

    def __init__(self, w, rank, device):
        super().__init__()
        out_f, in_f = w.shape
        self.base = bnb_linear4bit(w, device)
        self.lora_A = nn.Parameter(torch.randn(rank, in_f, device=device, dtype=torch.bfloat16) / in_f ** 0.5)
        self.lora_B = nn.Parameter(torch.randn(out_f, rank, device=device, dtype=torch.bfloat16) * 1e-3)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


def peft_bnb_block(layers_bnb: dict, rank: int) -> "Block":
    """Block of bare Linear4bit layers with PEFT's LoRA injected into all seven (B set non-zero like the others)."""
    from peft import LoraConfig, inject_adapter_in_model

    block = Block(layers_bnb)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(KINDS))
    block = inject_adapter_in_model(config, block)
    gen = torch.Generator().manual_seed(1)
    for name, module in block.named_modules():
        if name.endswith((".lora_A", ".lora_B")):
            module.to(torch.bfloat16)  # bf16 adapters as in the other variants (PEFT creates fp32 ones)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    return block


def lqplan_layer(w, bits, rank, device):
    q = quantize(w, QuantConfig(kind="nf", bits=bits, blocksize=64, double_quant=True))
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(w.shape[0], rank, generator=gen) * 1e-3
    b = torch.randn(w.shape[1], rank, generator=gen) / w.shape[1] ** 0.5
    return QuantLoRALinear(q.to(device), a=a.to(device), b=b.to(device), adapter_dtype=torch.bfloat16)


def build(variant, n_blocks, dims, rank, device):
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(n_blocks):
        layers = {}
        for kind, shape in shapes(*dims).items():
            w = (torch.randn(shape, generator=gen) * 0.02).to(device)
            if variant == "bnb-nf4+lora":
                layers[kind] = BnbLoRA(w, rank, device)
            elif variant == "bnb-nf4+peft-lora":
                layers[kind] = bnb_linear4bit(w, device)
            else:
                bits = MIXED[kind] if variant.startswith("lqplan-mixed") else 4
                layers[kind] = lqplan_layer(w, bits, rank, device)
            del w
        blocks.append(peft_bnb_block(layers, rank) if variant == "bnb-nf4+peft-lora" else Block(layers))
    return nn.Sequential(*blocks)


def backend_runs(backend, device):
    """Whether the dequant backend really runs for the benchmark's configurations here."""
    return all(dequant_backend(device, QuantConfig("nf", bits, 64, double_quant=True), backend) == backend
               for bits in set(MIXED.values()))


def select_backend(model, variant):
    """Set the dequant backend named in an lqplan variant ("lqplan-nf4[triton]") on its layers; anchors name none."""
    if variant.endswith("]"):
        set_backend(model, variant[variant.index("[") + 1:-1])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(model, x, params):
    loss = model(x).float().square().mean()
    loss.backward()
    for p in params:
        p.grad = None


def step_time(model, x, steps, device):
    """Seconds per step over `steps` consecutive forward+backward steps, synchronised once at the end as a training
    loop runs (the host queues the next step while the GPU works), after one warm-up step."""
    params = [p for p in model.parameters() if p.requires_grad]
    one_step(model, x, params)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(model, x, params)
    sync(device)
    return (time.perf_counter() - t0) / steps


def kernel_ms_per_step(model, x, steps, device):
    """GPU kernel time per step (sum of every kernel's own time, from torch.profiler): the step's device work
    without host gaps, steadier than wall time on a shared machine."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_time(model, x, steps, device)
    events = prof.key_averages()
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) for e in events)
    return total / 1e3 / (steps + 1)  # microseconds -> ms; step_time also runs one warm-up step


def cuda_bytes(device):
    """Bytes allocated on `device` after dropping cuBLAS's workspaces (64 MiB or so, allocated through PyTorch's
    allocator on a handle's first GEMM and kept: without this, every variant measured after the first one would
    look that much larger)."""
    if device.type != "cuda":
        return 0
    sync(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    return torch.cuda.memory_allocated(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x sequence (default 4 x 512)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per round, timed together")
    ap.add_argument("--repeats", type=int, default=7, help="rounds over all variants")
    ap.add_argument("--backends", default="triton,compile,eager",
                    help="lqplan dequant backends to time, comma-separated (those that cannot run here are left out)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: hidden 128, intermediate 320, 64 tokens")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dims = (5120, 13824)
    if args.tiny:
        dims, args.tokens, args.rank, args.steps, args.repeats = (128, 320), 64, 8, 3, 2
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(wanted) - {"triton", "compile", "eager"})
    if unknown:
        ap.error(f"--backends: {', '.join(unknown)} not among triton, compile, eager")
    backends = [b for b in wanted if backend_runs(b, device)]
    variants = [f"{scheme}[{b}]" for scheme in ("lqplan-nf4", "lqplan-mixed-nf2/3/4") for b in backends]
    why_no_bnb = None
    if device.type != "cuda":
        why_no_bnb = "bitsandbytes Linear4bit needs CUDA here"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means: skip the baseline, say why
            why_no_bnb = f"bitsandbytes not importable ({type(e).__name__}: {e})"
    if why_no_bnb:
        print(f"bitsandbytes baseline skipped: {why_no_bnb}")
    else:
        variants.insert(0, "bnb-nf4+lora")
        try:
            import peft  # noqa: F401

            variants.insert(1, "bnb-nf4+peft-lora")
        except Exception as e:  # noqa: BLE001 - PEFT is an optional second anchor
            print(f"PEFT anchor skipped: {type(e).__name__}: {e}")
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}; "
          f"{args.blocks} block(s) of 7 projections {dims[0]}/{dims[1]}, {args.tokens} tokens, rank {args.rank}, bf16")
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(args.tokens, dims[0], generator=gen)).to(device=device, dtype=torch.bfloat16)
    models, rows = {}, {}
    for variant in variants:
        gc.collect()
        before = cuda_bytes(device)
        models[variant] = build(variant, args.blocks, dims, args.rank, device)
        select_backend(models[variant], variant)
        rows[variant] = {"resident_bytes": cuda_bytes(device) - before, "rounds_s": []}
    for r in range(args.repeats):
        for variant in variants:
            if r == 0 and device.type == "cuda":
                base = cuda_bytes(device)
                torch.cuda.reset_peak_memory_stats(device)
            secs = step_time(models[variant], x, args.steps, device)
            if r == 0 and device.type == "cuda":
                rows[variant]["peak_activation_bytes"] = torch.cuda.max_memory_allocated(device) - base
            rows[variant]["rounds_s"].append(secs)
    if device.type == "cuda":
        for variant in variants:
            rows[variant]["kernel_ms"] = kernel_ms_per_step(models[variant], x, args.steps, device)
    for variant in variants:
        row = rows[variant]
        row["step_s"] = statistics.median(row["rounds_s"])
        spread = f"[{min(row['rounds_s']) * 1e3:.2f}-{max(row['rounds_s']) * 1e3:.2f}]"
        kernels = f", GPU kernels {row['kernel_ms']:.2f} ms" if "kernel_ms" in row else ""
        mem = (f"{kernels}, resident {row['resident_bytes'] / 2**20:.1f} MiB, step peak +{row['peak_activation_bytes'] / 2**20:.0f}"
               f" MiB" if device.type == "cuda" else "")
        print(f"{variant:30s} {row['step_s'] * 1e3:8.2f} ms/step {spread}{mem}", flush=True)
    if "bnb-nf4+lora" in rows:
        ref = rows["bnb-nf4+lora"]
        for v in variants[1:]:
            per_round = [a / b for a, b in zip(rows[v]["rounds_s"], ref["rounds_s"])]
            rows[v]["ratio_to_bnb"] = rows[v]["step_s"] / ref["step_s"]
            rows[v]["round_ratios"] = per_round
            kernels = (f", GPU kernel time {rows[v]['kernel_ms'] / ref['kernel_ms']:.3f}" if "kernel_ms" in ref else "")
            print(f"ratio {v} / bnb-nf4+lora: {rows[v]['ratio_to_bnb']:.3f} (per round: median "
                  f"{statistics.median(per_round):.3f}, {min(per_round):.3f}-{max(per_round):.3f}, below 1 in "
                  f"{sum(r < 1 for r in per_round)} of {len(per_round)}{kernels}; target <= 1)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "dims": dims, "tokens": args.tokens,
                                              "rank": args.rank, "blocks": args.blocks, "steps": args.steps,
                                              "repeats": args.repeats, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
