"""Training step (forward + backward) of a Llama-2-13B-shaped projection stack: lqplan's QuantLoRALinear vs
bitsandbytes NF4 Linear4bit + a LoRA adapter, same shapes, same rank, bf16 compute.

One "block" is the 7 projections of a decoder layer chained as a = o(q(x) + k(x) + v(x)); y = a + down(silu(gate(a))
* up(a)) (attention itself is left out: it is the same for both). Variants: lqplan NF4 b64 dq (QLoRA's 4.127 bits),
lqplan mixed NF2/NF3/NF4, each with every dequant backend that runs here (the Triton kernel and torch.compile on
CUDA; eager on CPU), and bitsandbytes NF4 (double quant) + hand-made LoRA (A, B in bf16, same init scale). Prints
median step time, the ratio to bitsandbytes, and peak memory.

    python bench/bench_step.py [--blocks 1] [--tokens 2048] [--rank 64] [--steps 10] [--out step.json] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import QuantConfig  # noqa: E402
from quant.blockwise import quantize  # noqa: E402
from quant.layers import QuantLoRALinear, dequant_backend  # noqa: E402

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


class BnbLoRA(nn.Module):
    """bitsandbytes Linear4bit (NF4, double quant, bf16 compute) + a LoRA adapter, as PEFT's lora.Linear4bit adds it."""

    def __init__(self, w, rank, device):
        super().__init__()
        import bitsandbytes as bnb

        out_f, in_f = w.shape
        self.base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4")
        self.base.weight = bnb.nn.Params4bit(w.to(torch.bfloat16).cpu(), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
        self.base.to(device)
        self.lora_A = nn.Parameter(torch.randn(rank, in_f, device=device, dtype=torch.bfloat16) / in_f ** 0.5)
        self.lora_B = nn.Parameter(torch.randn(out_f, rank, device=device, dtype=torch.bfloat16) * 1e-3)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


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
            else:
                bits = MIXED[kind] if variant.startswith("lqplan-mixed") else 4
                layers[kind] = lqplan_layer(w, bits, rank, device)
            del w
        blocks.append(Block(layers))
    return nn.Sequential(*blocks)


def backend_runs(backend, device):
    """Whether LQPLAN_DEQUANT=backend really runs that backend for the benchmark's configurations here."""
    os.environ["LQPLAN_DEQUANT"] = backend
    try:
        return all(dequant_backend(device, QuantConfig("nf", bits, 64, double_quant=True)) == backend
                   for bits in set(MIXED.values()))
    finally:
        del os.environ["LQPLAN_DEQUANT"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model, x, steps, device):
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 2):  # two warm-up steps
        sync(device)
        t0 = time.perf_counter()
        loss = model(x).float().square().mean()
        loss.backward()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        for p in params:
            p.grad = None
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x sequence (default 4 x 512)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: hidden 128, intermediate 320, 64 tokens")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dims = (5120, 13824)
    if args.tiny:
        dims, args.tokens, args.rank, args.steps = (128, 320), 64, 8, 3
    backends = [b for b in ("triton", "compile", "eager") if backend_runs(b, device)]
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
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}; "
          f"{args.blocks} block(s) of 7 projections {dims[0]}/{dims[1]}, {args.tokens} tokens, rank {args.rank}, bf16")
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(args.tokens, dims[0], generator=gen)).to(device=device, dtype=torch.bfloat16)
    rows = {}
    for variant in variants:
        gc.collect()  # the previous variant's layers must be gone before "resident" is read
        if variant.endswith("]"):
            os.environ["LQPLAN_DEQUANT"] = variant[variant.index("[") + 1:-1]
        model = build(variant, args.blocks, dims, args.rank, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        secs = bench(model, x, args.steps, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
        rows[variant] = {"step_s": secs, "peak_activation_bytes": peak, "resident_bytes": base}
        mem = f", resident {base / 2**20:.0f} MiB, step peak +{peak / 2**20:.0f} MiB" if peak is not None else ""
        print(f"{variant:30s} {secs * 1e3:8.2f} ms/step{mem}", flush=True)
        del model
    if "bnb-nf4+lora" in rows:
        ref = rows["bnb-nf4+lora"]["step_s"]
        for v in variants[1:]:
            print(f"ratio {v} / bnb-nf4+lora: {rows[v]['step_s'] / ref:.3f} (target <= 1)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "dims": dims, "tokens": args.tokens,
                                              "rank": args.rank, "blocks": args.blocks, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
