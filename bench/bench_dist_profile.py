"""Distributed profiling benchmark: a Llama-2-13B-shaped model with random weights, profiled by one process and then
by N torchrun ranks (one GPU each, NCCL; gloo on CPU); prints wall times and the speedup and checks that both
runs produced the same profile table and the same cache values, bit for bit.

    python bench/bench_dist_profile.py --layers 8 --out reports/dist_profile_h200x2.json        # 2-GPU host
    python bench/bench_dist_profile.py --tiny --device cpu --out /tmp/dist_tiny.json            # CPU smoke test

The model (40 layers x 7 matrices = 280 in full; --layers cuts the depth) is written once as fp16 safetensors shards
under --workdir and reused while its shape and seed are unchanged. Each run gets a fresh cache folder. On CPU every
process (the single one included) runs max(1, cores // N) intra-op threads: CPU float reductions round differently
with another thread count, so only that comparison can be bit-exact (on GPUs threads do not enter the numbers).
Exit code 1 when the two tables differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.dist import threads_per_rank  # noqa: E402
from planner.fsio import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
              "num_key_value_heads": 40, "num_hidden_layers": 40, "vocab_size": 32000}
TINY = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 512}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def llama_config(shape: dict, layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, **shape, "num_hidden_layers": layers}


def _layer_tensors(cfg: dict, layer: int, seed: int) -> dict[str, torch.Tensor]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    out = {}
    for j, name in enumerate(PROJECTIONS):
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 16 + j)
        # rows scaled 0.5-1.5x, as in trained weights, so blocks' absmax scales differ across the matrix
        w = torch.randn(shapes[name], generator=g) * 0.02
        w *= torch.rand(shapes[name][0], 1, generator=g).add_(0.5)
        out[f"model.layers.{layer}.{name}.weight"] = w.half()
    out[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    out[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return out


def make_model(folder: Path, shape: dict, layers: int, seed: int) -> Path:
    """A Llama-shaped Hugging Face folder with random fp16 weights, one shard per layer; reused when complete."""
    from safetensors.torch import save_file

    cfg = llama_config(shape, layers)
    marker = folder / "bench-model.json"
    spec = {"config": cfg, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    total = layers + 1
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shards = [{"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).half(),
               "model.norm.weight": torch.ones(h, dtype=torch.float16),
               "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).half()}]
    for i in range(total):
        tensors = shards[0] if i == 0 else _layer_tensors(cfg, i - 1, seed)
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        print(f"  wrote {name} ({sum(t.numel() for t in tensors.values()) * 2 / 2**30:.2f} GiB)", flush=True)
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(folder / "config.json", cfg)
    write_json(marker, spec)
    print(f"model: {folder} written in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def _cache_values(cache: Path) -> dict:
    out = {}
    for f in sorted(cache.rglob("*.json")):
        doc = json.loads(f.read_text())
        if "points" not in doc:
            continue
        for point in doc["points"].values():
            point.pop("seconds", None)  # wall time, not a result
        out[str(f.relative_to(cache))] = doc
    return out


def run_profile_cli(model: Path, work: Path, tag: str, grid_args: list[str], device: str, nproc: int,
                    env: dict) -> dict:
    cache, out = work / f"cache-{tag}", work / f"out-{tag}"
    for p in (cache, out):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [sys.executable, "-m", "planner", "profile", "--model", str(model), "--cache", str(cache), "--out", str(out),
           "--device", device, "--quiet", *grid_args]
    if nproc > 1:
        cmd += ["--distributed", str(nproc)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr[-4000:])
    if res.returncode != 0:
        raise SystemExit(f"run {tag} failed with exit code {res.returncode}")
    rec = {"nproc": nproc, "command": " ".join(cmd), "wall_s": round(wall, 2), "cache": str(cache), "out": str(out)}
    if nproc > 1:
        runs = json.loads((out / "distributed.json").read_text())["runs"]
        rec["profile_s"] = runs[0]["seconds"]
        rec["ranks"] = runs[0]["ranks"]
        rec["assigned_cost"] = runs[0]["assigned_cost"]
    else:
        m = re.search(r"matrices, \d+ from cache \(([\d.]+) s\)", res.stdout)
        rec["profile_s"] = float(m.group(1)) if m else None
    rec["points"] = int(re.search(r"profile: (\d+) rows", res.stdout).group(1))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 256-wide Llama and a 2-point grid (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the 13B shape (default 8; full model 40)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    ap.add_argument("--bits", default=None, help="grid subset (default: the CLI's default grid; --tiny: 2,4)")
    ap.add_argument("--blocks", default=None, help="grid subset (default: the CLI's; --tiny: 64)")
    ap.add_argument("--ranks", default=None, help="LoRA ranks (default: the CLI's; --tiny: 8)")
    ap.add_argument("--iters", type=int, default=None, help="LoftQ iterations (default 5; --tiny: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/lqplan-dist-bench", help="model, caches and outputs")
    ap.add_argument("--out", default="dist_profile.json", help="JSON result file")
    a = ap.parse_args(argv)

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        device = "cuda"
        if torch.cuda.device_count() < a.nproc:
            raise SystemExit(f"--nproc {a.nproc} needs {a.nproc} GPUs, {torch.cuda.device_count()} visible; "
                             f"lower --nproc or use --device cpu")
    shape = TINY if a.tiny else LLAMA2_13B
    layers = a.layers or (TINY["num_hidden_layers"] if a.tiny else 8)
    tiny_grid = {"bits": "2,4", "blocks": "64", "ranks": "8", "iters": 1}
    grid_args = []
    for key in ("bits", "blocks", "ranks", "iters"):
        value = getattr(a, key)
        if value is None and a.tiny:
            value = tiny_grid[key]
        if value is not None:
            grid_args += [f"--{key}", str(value)]

    work = Path(a.workdir)
    model = make_model(work / ("model-tiny" if a.tiny else "model-13b-shape") / f"L{layers}-s{a.seed}", shape, layers,
                       a.seed)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(threads_per_rank(a.nproc))  # the single run too: see the docstring

    single = run_profile_cli(model, work, "1", grid_args, device, 1, env)
    multi = run_profile_cli(model, work, str(a.nproc), grid_args, device, a.nproc, env)
    same_csv = (Path(single["out"]) / "profile.csv").read_bytes() == (Path(multi["out"]) / "profile.csv").read_bytes()
    same_cache = _cache_values(Path(single["cache"])) == _cache_values(Path(multi["cache"]))

    gpus = [torch.cuda.get_device_name(i) for i in range(a.nproc)] if device == "cuda" else []
    result = {
        "benchmark": "distributed profiling", "device": device, "gpus": gpus, "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "model": {"shape": "tiny llama" if a.tiny else "Llama-2-13B", **shape, "layers": layers,
                  "matrices": layers * len(PROJECTIONS), "folder": str(model)},
        "grid_args": grid_args, "runs": [single, multi],
        "speedup_wall": round(single["wall_s"] / multi["wall_s"], 3),
        "speedup_profile": (round(single["profile_s"] / multi["profile_s"], 3)
                            if single["profile_s"] and multi["profile_s"] else None),
        "identical_profile_csv": same_csv, "identical_cache_values": same_cache,
    }
    write_json(Path(a.out), result)
    print(f"1 process: {single['wall_s']:.1f} s wall ({single['profile_s']} s profiling); "
          f"{a.nproc} processes: {multi['wall_s']:.1f} s wall ({multi['profile_s']} s profiling); "
          f"speedup {result['speedup_wall']:.2f}x wall, {result['speedup_profile']}x profiling; "
          f"tables identical: {same_csv}, cache values identical: {same_cache} -> {a.out}")
    return 0 if same_csv and same_cache else 1


if __name__ == "__main__":
    sys.exit(main())
