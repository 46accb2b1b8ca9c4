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
from planner.testing.models import PROJECTIONS, SHAPES, checkpoint_config, write_layer_seeded_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LLAMA2_13B = SHAPES["llama2-13b"]
TINY = (256, 688, 2, 4, 4)
VOCAB = {"tiny": 512, "13b": 32000}


def make_model(folder: Path, shape: tuple, vocab_size: int, layers: int, seed: int) -> Path:
    """A Llama-shaped Hugging Face folder with random fp16 weights, one shard per layer; reused when complete."""
    cfg = checkpoint_config(shape, vocab_size, "float16", bos=1, eos=2, layers=layers)
    return write_layer_seeded_model(folder, cfg, seed, log=lambda msg: print(msg, flush=True))


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
    layers = a.layers or (TINY[2] if a.tiny else 8)
    tiny_grid = {"bits": "2,4", "blocks": "64", "ranks": "8", "iters": 1}
    grid_args = []
    for key in ("bits", "blocks", "ranks", "iters"):
        value = getattr(a, key)
        if value is None and a.tiny:
            value = tiny_grid[key]
        if value is not None:
            grid_args += [f"--{key}", str(value)]

    work = Path(a.workdir)
    model = make_model(work / ("model-tiny" if a.tiny else "model-13b-shape") / f"L{layers}-s{a.seed}", shape,
                       VOCAB["tiny" if a.tiny else "13b"], layers, a.seed)
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
        "model": {"shape": "tiny llama" if a.tiny else "Llama-2-13B",
                  **dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads"), shape)), "vocab_size": VOCAB["tiny" if a.tiny else "13b"],
                  "layers": layers,
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
