"""Dequantization throughput on Llama-2-13B matrix shapes: lqplan's Triton kernel (NF2/NF3/NF4, block 64, double
quant; a sweep of its launch parameters) and torch.compile's kernel vs bitsandbytes' `dequantize_4bit` (NF4, double
quant), bf16 output, timed side by side in one run with CUDA events. Prints microseconds per matrix, effective
bandwidth (packed bytes read + bf16 bytes written) and the ratio to bitsandbytes. The training step dequantizes
every weight twice (forward and backward), so this kernel sets the step's overhead over a bf16 model.

    python bench/bench_dequant.py [--iters 50] [--out dequant.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import QuantConfig, triton_dequant  # noqa: E402
from quant.blockwise import quantize  # noqa: E402
from quant.layers import QuantLoRALinear, flat_codebook  # noqa: E402

SHAPES = {"attn 5120x5120": (5120, 5120), "mlp 13824x5120": (13824, 5120)}
SWEEP = {"values_per_program": (1024, 2048, 4096, 8192), "num_warps": (2, 4, 8)}


def timed(fn, iters):
    """Median microseconds of fn() over `iters` calls, CUDA events around each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_dequant needs a CUDA GPU (the kernels under test are GPU kernels)")
    device = torch.device("cuda")
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - the anchor is optional; say why it is missing
        bnbf = None
        print(f"bitsandbytes anchor skipped: {type(e).__name__}: {e}")
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 output")
    rows = []
    for (label, shape), bits in itertools.product(SHAPES.items(), (4, 3, 2)):
        w = torch.randn(shape, device=device) * 0.02
        cfg = QuantConfig("nf", bits, 64, double_quant=True)
        layer = QuantLoRALinear(quantize(w, cfg))
        moved = layer.quant_nbytes + w.numel() * 2
        scales = layer.kernel_scales()
        table = flat_codebook("nf", bits, device)
        found = {}
        for vpp, warps in itertools.product(SWEEP["values_per_program"], SWEEP["num_warps"]):
            us = timed(lambda: triton_dequant.dequantize(layer.q_codes, table, cfg, shape, torch.bfloat16,
                                                         values_per_program=vpp, num_warps=warps, **scales), args.iters)
            found[(vpp, warps)] = us
        best = min(found, key=found.get)
        default = found[(triton_dequant._VALUES_PER_PROGRAM, 4)]
        layer.backend = "compile"
        compiled = timed(lambda: layer.dequantize(torch.bfloat16), args.iters)
        layer.backend = "auto"
        row = {"shape": label, "bits": bits, "bytes_moved": moved, "triton_default_us": default,
               "triton_best_us": found[best], "triton_best": {"values_per_program": best[0], "num_warps": best[1]},
               "compile_us": compiled, "sweep_us": {f"{v}/{n}": t for (v, n), t in found.items()}}
        if bnbf is not None and bits == 4:
            packed, state = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            row["bnb_us"] = timed(lambda: bnbf.dequantize_4bit(packed, state), args.iters)
        rows.append(row)
        gbs = moved / default / 1e3
        anchor = (f", bnb {row['bnb_us']:.1f} us (ratio {default / row['bnb_us']:.3f})" if "bnb_us" in row else "")
        print(f"{label} NF{bits}: triton {default:.1f} us ({gbs:.0f} GB/s; best {found[best]:.1f} us at "
              f"{best[0]} values/program, {best[1]} warps), compile {compiled:.1f} us{anchor}", flush=True)
        del layer, w
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device),
                                              "torch": torch.__version__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
