"""The whole default grid (NF 2,3,4,8 x blocks 16,32,64,128 dq x ranks 16,32,64, T=5) on a Llama-2-13B-shaped
model with random weights, streamed from safetensors shards on disk through the real path (planner.profile.run_profile).

Writes the model once (bf16, one shard per layer, reused if present), times the run, then times one layer again
with timing hooks (read / quantize / svd / other; the hooks synchronise the GPU, so that run is a bit slower).
With --layers < 40 the wall time is also extrapolated linearly to 40 layers (said so in the output).

    python bench/bench_grid.py [--layers 40] [--model-dir /tmp/lqplan-13b-random] [--iters 5] [--out grid.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant.fastgrid as fastgrid  # noqa: E402
from planner.model import stream  # noqa: E402
from planner.model.discover import discover_matrices  # noqa: E402
from planner.model.resolve import resolve_model  # noqa: E402
from planner.profile.grid import make_grid  # noqa: E402
from planner.profile.run import run_profile  # noqa: E402
from planner.profile.settings import ProfileSettings  # noqa: E402

LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40}
TINY = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 4}
FULL_LAYERS = 40


def write_model(folder: Path, dims: dict, layers: int, seed: int = 0) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False, **dims}
    h, f = dims["hidden_size"], dims["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    for i in range(layers):
        name = f"model-{i:05d}.safetensors"
        tensors = {f"model.layers.{i}.{k}.weight": (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
                   for k, s in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if i == 0:
            tensors["model.embed_tokens.weight"] = (torch.randn(1024, h, generator=gen) * 0.02).to(torch.bfloat16)
            tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = (torch.randn(1024, h, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))  # last: its presence marks a complete model


class StageTimer:
    """Wraps the read, quantize and low-rank functions with synchronised timers (restored on exit)."""

    def __init__(self, device):
        self.device, self.seconds, self._saved = device, defaultdict(float), []

    def _wrap(self, owner, attr, stage):
        original = getattr(owner, attr)
        timer = self

        def wrapped(*a, **k):
            if timer.device.type == "cuda":
                torch.cuda.synchronize(timer.device)
            t0 = time.perf_counter()
            out = original(*a, **k)
            if timer.device.type == "cuda":
                torch.cuda.synchronize(timer.device)
            timer.seconds[stage] += time.perf_counter() - t0
            return out

        self._saved.append((owner, attr, original))
        setattr(owner, attr, wrapped)

    def __enter__(self):
        self._wrap(stream, "load_matrix", "read")
        self._wrap(fastgrid._Quantizer, "__call__", "quantize")
        self._wrap(fastgrid, "_subspace", "svd")
        self._wrap(fastgrid, "_rayleigh_ritz", "svd")
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=FULL_LAYERS)
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "lqplan-13b-random"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--blocks", default="16,32,64,128")
    ap.add_argument("--ranks", default="16,32,64")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the instrumented one-layer run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: hidden 64, 2 layers, ranks 4,8, blocks 16,64")
    args = ap.parse_args(argv)
    dims = LLAMA2_13B
    if args.tiny:
        dims, args.layers, args.ranks, args.blocks = TINY, 2, "4,8", "16,64"
        args.model_dir = str(Path(tempfile.gettempdir()) / "lqplan-tiny-random")

    folder = Path(args.model_dir)
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        have = json.loads(cfg_path.read_text())
        if have.get("num_hidden_layers") != args.layers or have.get("hidden_size") != dims["hidden_size"]:
            shutil.rmtree(folder)
    if not cfg_path.exists():
        t0 = time.perf_counter()
        write_model(folder, dims, args.layers)
        print(f"wrote a random {args.layers}-layer model to {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        print(f"reusing the model at {folder}")

    source = resolve_model(str(folder))
    matrices = discover_matrices(source)
    grid = make_grid(args.bits, args.blocks, args.ranks)
    from planner.devices import resolve_device
    device = resolve_device(args.device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {len(matrices)} matrices "
          f"x {len(grid)} grid points, T={args.iters}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        table, stats = run_profile(source, matrices, ProfileSettings(grid, args.iters), cache_dir=Path(cache) / "run",
                                   device=args.device, progress=False)
        wall = time.perf_counter() - t0
        points = len(table)
        result = {"layers": args.layers, "matrices": len(matrices), "grid": len(grid), "iters": args.iters,
                  "points": points, "wall_s": wall, "compute_s": stats.compute_seconds,
                  "ms_per_point": 1e3 * wall / max(points, 1), "device": str(device), "torch": torch.__version__}
        print(f"whole grid: {wall:.1f} s wall for {points} points ({result['ms_per_point']:.1f} ms/point, "
              f"compute {stats.compute_seconds:.1f} s, the rest reads + cache writes)")
        if args.layers != FULL_LAYERS and not args.tiny:
            result["extrapolated_40_layers_s"] = wall * FULL_LAYERS / args.layers
            print(f"EXTRAPOLATED to {FULL_LAYERS} layers (linear in layers, measured {args.layers}): "
                  f"{result['extrapolated_40_layers_s'] / 60:.1f} min (target <= 10 min)")
        if not args.no_breakdown:
            first = [m for m in matrices if m.layer == matrices[0].layer] if hasattr(matrices[0], "layer") \
                else matrices[:7]
            with StageTimer(device) as timer:
                t0 = time.perf_counter()
                run_profile(source, first, ProfileSettings(grid, args.iters), cache_dir=Path(cache) / "staged",
                            device=args.device, progress=False)
                staged = time.perf_counter() - t0
            stages = dict(timer.seconds)
            stages["other"] = staged - sum(stages.values())
            result["breakdown_one_layer_s"] = stages
            print(f"breakdown over {len(first)} matrices (synchronised timers, {staged:.1f} s): " +
                  ", ".join(f"{k} {v:.2f} s ({100 * v / staged:.0f}%)" for k, v in stages.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
