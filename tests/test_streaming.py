"""Streaming: a sharded Llama-architecture checkpoint profiles one matrix at a time and its plan covers exactly the
attention and MLP projections of every layer (issue 3, "Must show": streaming)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from planner.cli import main
from planner.model.discover import discover_matrices, planned_params
from planner.model.resolve import resolve_model
from planner.plan.document import Plan

LAYERS = 6
HIDDEN, INTER, VOCAB = 512, 1376, 1000
LLAMA_KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GRID = ["--bits", "2,3", "--blocks", "64", "--ranks", "4", "--iters", "1"]
GRID_POINTS = 2

# Runs in a fresh interpreter so that its peak RSS (VmHWM) is the profile's alone. Two warm-up profiles (layer
# 0, then layer 1: every shape, code path, cache read/write, the prefetch thread and the allocator's arenas; the
# first run leaves ~5 MB of one-time allocations, the second none) set the base, so "peak - base" is what
# streaming the other layers added. A final control loads the whole checkpoint: the meter must see that, or a
# small "peak - base" would prove nothing.
PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from planner.profile.grid import make_grid
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model
    from planner.profile.run import run_profile
    from planner.profile.settings import ProfileSettings
    from quant import SolverSettings

    def maxrss():
        # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's high-water mark across fork + exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024

    folder, cache = sys.argv[1], Path(sys.argv[2])
    src = resolve_model(folder)
    mats = discover_matrices(src)
    grid = make_grid("2,3", "64", "4")
    warm = 0
    for layer in (0, 1):
        _, stats = run_profile(src, mats, ProfileSettings(grid, 1, SolverSettings()), cache_dir=cache, device="cpu", progress=False,
                               only={m.name for m in mats if m.layer == layer})
        warm += stats.computed_points
    base = maxrss()
    table, stats = run_profile(src, mats, ProfileSettings(grid, 1, SolverSettings()), cache_dir=cache, device="cpu",
                               progress=False)
    peak = maxrss()
    from safetensors.torch import load_file
    # clone: copies in memory, as a non-streaming reader would hold them (load_file alone may stay mmapped)
    held = [{k: t.clone() for k, t in load_file(str(f)).items()} for f in src.files]
    control = maxrss()
    print(json.dumps({"base": base, "peak": peak, "control": control, "rows": len(table), "warm_computed": warm,
                      "rest_bytes": 4 * sum(m.numel for m in mats if m.layer > 1), "computed": stats.computed_points,
                      "computed_matrices": len(stats.computed_matrices),
                      "held_bytes": sum(t.numel() * t.element_size() for d in held for t in d.values())}))
""")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    from planner.testing.models import seeded_llama

    folder = tmp_path_factory.mktemp("llama-sharded")
    seeded_llama(VOCAB, HIDDEN, INTER, layers=LAYERS, heads=8, kv_heads=8, tie_word_embeddings=False).save_pretrained(
        folder, max_shard_size="20MB", safe_serialization=True)
    return folder


def _cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS (VmHWM) from Linux /proc")
def test_sharded_llama_profiles_near_one_matrix_and_plans_every_projection(llama_folder, tmp_path):
    src = resolve_model(llama_folder)
    assert len(src.files) >= 3 and (llama_folder / "model.safetensors.index.json").is_file()
    mats = discover_matrices(src)
    largest = max(m.numel for m in mats) * 4  # fp32 bytes, as profiled
    total = planned_params(mats) * 4
    assert largest == INTER * HIDDEN * 4 and total >= 20 * largest  # loading the model would dwarf one matrix

    cache = tmp_path / "cache"
    # A fixed mmap threshold makes glibc return every freed large block at once, so RSS tracks live memory
    # rather than what the allocator chose to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(llama_folder), str(cache)], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    per_layer = len(LLAMA_KINDS)
    assert r["warm_computed"] == 2 * per_layer * GRID_POINTS
    assert r["computed"] == (LAYERS - 2) * per_layer * GRID_POINTS and r["computed_matrices"] == (LAYERS - 2) * 7
    assert r["rows"] == len(mats) * GRID_POINTS
    assert r["rest_bytes"] >= 15 * largest

    extra = r["peak"] - r["base"]
    # streaming: profiling layers 2-5 (18 largest matrices' worth of weights) leaves the peak where one layer's
    # profile put it (measured: +0.2 MiB); holding those weights would add 50 MiB
    assert extra < 2 * largest, f"profiling added {extra / 2**20:.1f} MiB; largest matrix {largest / 2**20:.1f} MiB"
    # the meter works: holding the whole checkpoint shows up in full
    assert r["held_bytes"] >= total
    assert r["control"] - r["peak"] >= 0.8 * r["held_bytes"], r

    # The plan reuses the probe's cache (nothing recomputed) and lists every projection of every layer, only those.
    out = tmp_path / "out"
    rc, text = _cli("plan", "--model", llama_folder, "--budget", "3bits", *GRID, "--cache", cache, "--out", out,
                    "--quiet", "--no-report")
    assert rc == 0
    assert "profile: 0 " in text and f"{len(mats) * GRID_POINTS} from cache" in text, text
    plan = Plan.load(out / "plan.json")
    expected = [f"model.layers.{i}.{k}" for i in range(LAYERS) for k in LLAMA_KINDS]
    assert [e.name for e in plan.matrices] == expected
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
              "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER)}
    assert all(e.shape == shapes[e.name.rsplit(".", 1)[1]] for e in plan.matrices)
    assert plan.totals["bits_per_param"] <= 3.0

    # --include-head adds exactly the (untied) output head, and profiles only it
    rc, text = _cli("plan", "--model", llama_folder, "--budget", "3bits", *GRID, "--cache", cache, "--out", out,
                    "--quiet", "--no-report", "--include-head")
    assert rc == 0 and f"profile: {GRID_POINTS} " in text, text
    names = [e.name for e in Plan.load(out / "plan.json").matrices]
    assert names == expected + ["lm_head"]


@pytest.mark.gpu
def test_cuda_workers_on_their_streams_give_the_single_worker_numbers(llama_folder, tmp_path):
    """Matrices decomposed by several threads, each on its own CUDA stream (the GPU default), give the numbers of
    one at a time exactly: every matrix's kernels and batch sizes are the same, only their interleaving differs."""
    from planner.profile.grid import make_grid
    from planner.profile.run import CUDA_WORKERS, run_profile
    from planner.profile.settings import ProfileSettings
    from quant import SolverSettings

    src = resolve_model(llama_folder)
    mats = discover_matrices(src)
    settings = ProfileSettings(make_grid("2,3,4", "32,64", "8,16"), 2, SolverSettings())
    one, _ = run_profile(src, mats, settings, cache_dir=tmp_path / "a", device="cuda", progress=False, workers=1)
    many, stats = run_profile(src, mats, settings, cache_dir=tmp_path / "b", device="cuda", progress=False)
    assert CUDA_WORKERS > 1 and stats.computed_points == len(one) == len(mats) * 12
    assert one.equals(many)
