"""Data-parallel fine-tuning: `lqplan train` under torchrun with 2 gloo processes on CPU gives the loss curve and
the adapters of a 1-process run with the same global batch (batch 2 x 2 ranks x 2 accumulation = 4 x 1 x 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, subprocess_env

from planner.cli import main
from planner.train.checkpoint import CHECKPOINT, load_checkpoint

STEPS = 4
ARGS = ["--steps", str(STEPS), "--save-every", str(STEPS), "--grad-accum", "2", "--max-len", "16",
        "--eval-texts", "2", "--lr", "2e-3", "--no-dropout", "--no-save", "--quiet", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def plan_file(encoder_plan_file):
    return encoder_plan_file(2)


def report(out: Path) -> dict:
    return json.loads((out / "train_report.json").read_text())


@pytest.mark.slow  # torchrun and two training ranks, beside a one-process reference
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(plan_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = subprocess_env()
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "planner", "train", "--plan", str(plan_file), "--out", str(two), "--batch-size", "2",
                           *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train: ") == 1  # only rank 0 prints
    assert main(["train", "--plan", str(plan_file), "--out", str(one), "--batch-size", "4", *ARGS]) == 0

    r1, r2 = report(one), report(two)
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["global_batch"] == r2["global_batch"] == 8
    l1 = torch.tensor([h["loss"] for h in r1["history"] if "loss" in h], dtype=torch.float64)
    l2 = torch.tensor([h["loss"] for h in r2["history"] if "loss" in h], dtype=torch.float64)
    assert len(l1) == len(l2) == STEPS
    assert l1[-1] < 0.9 * l1[0]  # it trains, so equal curves are not two flat lines
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert r2["after"] == pytest.approx(r1["after"], rel=1e-5)
    a1, a2 = load_checkpoint(one / CHECKPOINT), load_checkpoint(two / CHECKPOINT)
    assert a2["settings"]["world"] == 2 and len(a2["rng"]) == 2  # each rank's RNG state, for an exact resume
    # Adam divides by sqrt(v): a coordinate whose gradient is ~0 can move by up to lr per step on a 1e-7 difference
    # in summation order, hence an absolute tolerance (measured: worst 7e-6, a handful of 110k coordinates).
    for name, value in a1["adapters"].items():
        torch.testing.assert_close(a2["adapters"][name], value, rtol=1e-4, atol=5e-5)


def test_setup_distributed_refuses_a_malformed_torchrun_environment(monkeypatch):
    from planner.errors import UserError
    from planner.train.parallel import setup_distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="not integers"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info, dev = setup_distributed("cpu")
    assert not info.active and dev.type == "cpu"
