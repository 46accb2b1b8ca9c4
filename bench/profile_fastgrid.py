"""Where one matrix's grid time goes on a GPU, and what each candidate change buys: the default 48-point grid
(NF 2/3/4/8 x blocks 16/32/64/128 dq x ranks 16/32/64, T=5) on 13B-shaped matrices (seeded Student-t), timed
for several variants of quant.fastgrid in one run, with each variant's errors against the eager baseline, then a
torch.profiler table of the default variant's kernels.

    python bench/profile_fastgrid.py [--shapes 13824x5120,5120x5120] [--iters 5] [--out profile_fastgrid.json]

Variants: eager (the residual computed by the eager ops), fused (quant.triton_residual, the default), fused+tf32
(fp32 matrix products on TF32 tensor cores), fused+host-eigh (the small eigenproblems on the CPU)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import QuantConfig, fastgrid, triton_residual

BITS, BLOCKS, RANKS = (2, 3, 4, 8), (16, 32, 64, 128), (16, 32, 64)


def points():
    return [(QuantConfig(bits=b, blocksize=bs, double_quant=True), r) for b in BITS for bs in BLOCKS for r in RANKS]


def student_t(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=gen)
    chi = torch.randn((5,) + tuple(shape), generator=gen).square().sum(0)
    return (u / (chi / 5).sqrt() * 0.02).cuda()


def run(w, pts, iters):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fastgrid.profile_grid(w, pts, iters)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(pts), [p.error for p in res]


def host_eigh(original):
    def patched(a):
        lam, vec = original(a.cpu())
        return lam.to(a.device), vec.to(a.device)
    return patched


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="13824x5120,5120x5120")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="profile_fastgrid.json")
    args = p.parse_args()
    pts = points()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": args.iters, "shapes": {}}
    eigh = torch.linalg.eigh
    for shape_text in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_text.split("x"))
        w = student_t(shape, 0)
        rows = {}
        variants = ["eager", "fused", "fused+tf32", "fused+host-eigh"]
        for variant in variants:
            torch.backends.cuda.matmul.allow_tf32 = variant.endswith("tf32")
            avail = triton_residual.available
            if variant == "eager":
                triton_residual.available = lambda device: False
            if variant.endswith("host-eigh"):
                torch.linalg.eigh = host_eigh(eigh)
            try:
                run(w, pts[:6], 1)  # warm-up: kernels compiled, allocator primed
                ms, errs = run(w, pts, args.iters)
            finally:
                triton_residual.available = avail
                torch.linalg.eigh = eigh
                torch.backends.cuda.matmul.allow_tf32 = False
            rows[variant] = {"ms_per_point": ms * 1e3, "errors": errs}
            base = rows["eager"]["errors"]
            ratios = [e / b for e, b in zip(errs, base) if b > 0]
            rows[variant]["error_ratio_max"] = max(ratios)
            rows[variant]["error_ratio_min"] = min(ratios)
            print(f"{shape_text} {variant:16s} {ms * 1e3:7.2f} ms/point  error vs eager "
                  f"{min(ratios):.6f}..{max(ratios):.6f}", flush=True)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fastgrid.profile_grid(w, pts[:12], args.iters)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        print(table, flush=True)
        rows["profile_table"] = table
        out["shapes"][shape_text] = rows
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
