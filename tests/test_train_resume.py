"""Crash safety of fine-tuning: a run SIGKILLed mid-step, or while writing a checkpoint, resumes from the last
complete checkpoint and continues the exact loss trajectory of an uninterrupted run (CPU, fp32, deterministic
data order). The killed runs are real `lqplan train` processes; the kill points are made deterministic by a
small driver that patches the data stream / torch.save in the child to SIGKILL itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env

from planner.cli import main
from planner.train.checkpoint import CHECKPOINT, load_checkpoint

STEPS, SAVE_EVERY = 8, 3  # checkpoints after steps 3, 6 and 8
ARGS = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "2", "--grad-accum", "2",
        "--max-len", "16", "--eval-texts", "2", "--lr", "2e-3", "--no-save", "--quiet", "--device", "cpu"]

CHILD = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)  # as the test process (conftest): the same float summation order
import planner.train.data as T

mode, when = sys.argv[1], int(sys.argv[2])
if mode == "micro":  # die when the when-th micro-batch is drawn (mid-step, mid-accumulation)
    draw, calls = T.Batches.next, [0]
    def next_batch(self, device):
        calls[0] += 1
        if calls[0] == when:
            os.kill(os.getpid(), signal.SIGKILL)
        return draw(self, device)
    T.Batches.next = next_batch
else:  # "save": die after the checkpoint of step `when` is fully written to its temp file, before the rename
    save = torch.save
    def save_then_die(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == when:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
from planner.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def plan_file(encoder_plan_file):
    return encoder_plan_file(3)


@pytest.fixture(scope="module")
def uninterrupted(plan_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(["train", "--plan", str(plan_file), "--out", str(out), *ARGS]) == 0
    return out


def killed_run(plan_file, out: Path, tmp_path: Path, mode: str, when: int) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(CHILD)
    env = subprocess_env()
    proc = subprocess.run([sys.executable, str(driver), mode, str(when), "train", "--plan", str(plan_file),
                           "--out", str(out), *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def losses(out: Path) -> list[tuple[int, float]]:
    report = json.loads((out / "train_report.json").read_text())
    return [(h["step"], h["loss"]) for h in report["history"] if "loss" in h]


def assert_same_run(out: Path, reference: Path) -> None:
    got, want = losses(out), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([v for _, v in got], dtype=torch.float64),
                               torch.tensor([v for _, v in want], dtype=torch.float64), rtol=1e-6, atol=1e-9)
    a, b = load_checkpoint(out / CHECKPOINT), load_checkpoint(reference / CHECKPOINT)
    assert a["step"] == b["step"] == STEPS and a["adapters"].keys() == b["adapters"].keys()
    for name, value in a["adapters"].items():
        torch.testing.assert_close(value, b["adapters"][name], rtol=1e-5, atol=1e-7, msg=name)
    ra, rb = (json.loads((p / "train_report.json").read_text()) for p in (out, reference))
    assert ra["after"] == pytest.approx(rb["after"], rel=1e-6)


def test_kill_mid_step_then_resume_continues_the_loss_trajectory(plan_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed_run(plan_file, out, tmp_path, "micro", 2 * 4 + 2)  # second micro-batch of step 5
    assert load_checkpoint(out / CHECKPOINT)["step"] == 3
    assert not (out / "train_report.json").exists()
    assert main(["train", "--plan", str(plan_file), "--out", str(out), "--resume", *ARGS]) == 0
    assert json.loads((out / "train_report.json").read_text())["resumed_from"] == 3
    assert_same_run(out, uninterrupted)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(plan_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed_run(plan_file, out, tmp_path, "save", 6)
    assert load_checkpoint(out / CHECKPOINT)["step"] == 3  # the step-6 file never replaced it
    assert len(list(out.glob(f".{CHECKPOINT}.*.tmp"))) == 1  # the half-finished write, left by the kill
    assert main(["train", "--plan", str(plan_file), "--out", str(out), "--resume", *ARGS]) == 0
    assert not list(out.glob(f".{CHECKPOINT}.*.tmp"))
    assert_same_run(out, uninterrupted)


def test_resume_with_other_settings_is_refused_in_one_line(plan_file, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes((uninterrupted / CHECKPOINT).read_bytes())
    args = list(ARGS)
    args[args.index("--grad-accum") + 1] = "1"
    assert main(["train", "--plan", str(plan_file), "--out", str(out), "--resume", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grad_accum=2" in err and "grad_accum=1" in err, err
    assert not (out / "train_report.json").exists()
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "--plan", str(plan_file), "--out", str(out), "--resume", *ARGS]) == 2
    assert "cannot be read" in capsys.readouterr().err
