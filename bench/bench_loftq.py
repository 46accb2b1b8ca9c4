"""Per (matrix, config) LoftQ cost and error: lqplan's fast profiler vs PEFT `loftq_init` vs lqplan's exact-SVD LoftQ.

Llama-2-13B shapes, NF4 block 64 without double quantization (PEFT quantizes with bitsandbytes NF4,
compress_statistics=False: the same quantizer), rank 64, T = 1 and 5, heavy-tailed random weights (Student-t, 5
degrees of freedom, std 0.02), side by side in one run. Errors are ‖W − Q − A·Bᵀ‖²_F (float64) with each method's
own returned tensors (PEFT: W − qweight − lora_B·lora_A); lqplan reports its best iterate, PEFT returns its last.

    python bench/bench_loftq.py [--shapes 5120x5120,13824x5120,5120x13824] [--rank 64] [--iters 1,5]
                                [--no-peft] [--no-exact] [--repeat 3] [--out loftq.json] [--tiny]

--tiny: a CPU smoke run (small shapes; PEFT needs CUDA + bitsandbytes and is skipped with a message).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import QuantConfig, SolverSettings  # noqa: E402
from quant.decompose import decompose  # noqa: E402
from quant.fastgrid import profile_grid  # noqa: E402
from quant.lowrank import matmul_precision  # noqa: E402

NF4_PEFT = QuantConfig(kind="nf", bits=4, blocksize=64, double_quant=False)  # bnb NF4 as PEFT's loftq_init uses it


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def heavy_tailed(m, n, seed, device):
    gen = torch.Generator().manual_seed(seed)
    # Student-t(5) = N / sqrt(chi2_5 / 5), drawn from one seeded generator; std of t5 is sqrt(5/3).
    z = torch.randn(m, n, generator=gen)
    chi = torch.randn(5, m, n, generator=gen).square().sum(0) / 5
    return (z / chi.sqrt() * (0.02 / (5 / 3) ** 0.5)).to(device)


def peft_status(device) -> str | None:
    """None if PEFT's loftq_init can run here, else why not."""
    if device.type != "cuda":
        return "PEFT loftq_init needs CUDA (it quantizes with bitsandbytes on 'cuda')"
    try:
        import bitsandbytes  # noqa: F401
        from peft.utils.loftq_utils import loftq_init  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: skip PEFT, say why
        return f"bitsandbytes/peft not importable ({type(e).__name__}: {e})"
    return None


def sq_err(w, q, a, b):
    return float((w.double() - q.double() - a.double() @ b.double()).pow(2).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="5120x5120,13824x5120,5120x13824", help="out x in, comma-separated")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", default="1,5")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of lqplan's fast path (median)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-exact", action="store_true", help="skip lqplan's exact-SVD LoftQ reference")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: shapes 128x192,192x128, rank 8")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shapes, args.rank, args.repeat = "128x192,192x128", 8, 1
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    iters_list = [int(t) for t in args.iters.split(",")]
    why_no_peft = "--no-peft" if args.no_peft else peft_status(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"config {NF4_PEFT.label}, rank {args.rank}")
    if why_no_peft:
        print(f"PEFT skipped: {why_no_peft}")
    rows = []
    solver = SolverSettings()
    exact = SolverSettings(method="exact")
    for si, (m, n) in enumerate(shapes):
        w = heavy_tailed(m, n, args.seed + si, device)

        def ours(points, iters, w=w):
            # the profiler's own settings: TF32 products on CUDA (SolverSettings.tf32), as planner.profile runs it
            with matmul_precision(solver):
                return profile_grid(w, points, iters, solver=solver)

        # Warm-up: CUDA context, cuBLAS/cuSOLVER handles, allocator, the residual kernel's compile (not counted).
        ours([(NF4_PEFT, args.rank)], 1)
        for iters in iters_list:
            row = {"shape": [m, n], "iters": iters, "rank": args.rank}
            times = []
            for _ in range(args.repeat):
                res, secs = timed(lambda: ours([(NF4_PEFT, args.rank)], iters), device)
                times.append(secs)
            row["ours_s"], row["ours_err"] = statistics.median(times), res[0].error
            # The grid way: all 4 blocksizes x 3 ranks of NF4 in one call; time per point.
            grid = [(QuantConfig(bits=4, blocksize=b, double_quant=False), r) for b in (16, 32, 64, 128)
                    for r in (16, 32, 64) if r <= min(m, n)]
            _, secs = timed(lambda: ours(grid, iters), device)
            row["ours_grid_point_s"] = secs / len(grid)
            if not args.no_exact:
                d, secs = timed(lambda: decompose(w, NF4_PEFT, args.rank, iters, solver=exact), device)
                row["exact_s"], row["exact_err"] = secs, d.error
            if not why_no_peft:
                from peft.utils.loftq_utils import loftq_init

                loftq_init(w, 4, args.rank, 1)  # warm-up
                (q, lora_a, lora_b), secs = timed(lambda: loftq_init(w, 4, args.rank, iters), device)
                row["peft_s"], row["peft_err"] = secs, sq_err(w, q, lora_b, lora_a)
            rows.append(row)
            line = (f"{m}x{n} T={iters}: ours {row['ours_s'] * 1e3:8.1f} ms "
                    f"(grid-batched {row['ours_grid_point_s'] * 1e3:.1f} ms/point)")
            if "peft_s" in row:
                line += (f" | PEFT {row['peft_s']:.2f} s  speed-up x{row['peft_s'] / row['ours_s']:.0f}"
                         f" (grid x{row['peft_s'] / row['ours_grid_point_s']:.0f})"
                         f"  err ours/PEFT {row['ours_err'] / row['peft_err']:.4f}")
            if "exact_s" in row:
                line += f" | exact {row['exact_s']:.2f} s  err ours/exact {row['ours_err'] / row['exact_err']:.4f}"
            print(line, flush=True)
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                              "peft_skipped": why_no_peft, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
