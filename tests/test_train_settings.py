"""TrainSettings rejects every bad value in one line (library and `lqplan train`, before anything is written), and a
run whose loss turns non-finite stops with one line, keeps its last good checkpoint and saves no model."""

from __future__ import annotations

import math

import pytest

import planner.train.loop as loop
from planner.cli import main
from planner.errors import UserError
from planner.train.checkpoint import CHECKPOINT, load_checkpoint
from planner.train.settings import TrainSettings

NAN, INF = float("nan"), float("inf")

BAD = [  # (keyword arguments, the message's words)
    ({"steps": 0}, "--steps 0 must be >= 1"),
    ({"steps": 2.5}, "--steps 2.5 must be a whole number >= 1"),
    ({"steps": True}, "--steps True must be a whole number >= 1"),
    ({"batch_size": 0}, "--batch-size 0 must be >= 1"),
    ({"grad_accum": 0}, "--grad-accum 0 must be >= 1"),
    ({"eval_texts": 0}, "--eval-texts 0 must be >= 1"),
    ({"log_every": 0}, "log_every=0 must be >= 1"),
    ({"max_len": 1}, "--max-len 1 must be >= 2"),
    ({"warmup_steps": -1}, "--warmup-steps -1 must be >= 0 (0 = off)"),
    ({"save_every": -1}, "--save-every -1 must be >= 0 (0 = off)"),
    ({"eval_every": -1}, "--eval-every -1 must be >= 0 (0 = off)"),
    ({"lr": NAN}, "--lr nan must be a finite positive number, e.g. 2e-4"),
    ({"lr": INF}, "--lr inf must be a finite positive number"),
    ({"lr": -1.0}, "--lr -1.0 must be a finite positive number"),
    ({"lr": 0.0}, "--lr 0.0 must be a finite positive number"),
    ({"lr": "2e-4"}, "--lr '2e-4' must be a finite positive number"),
    ({"weight_decay": NAN}, "weight_decay=nan must be a finite number >= 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
    ({"max_grad_norm": INF}, "max_grad_norm=inf must be a finite number >= 0"),
    ({"schedule": "linear"}, "--schedule 'linear' is not supported; use one of"),
    ({"init": "random"}, "--init 'random' is not supported; use one of"),
    ({"method": "dora"}, "--method 'dora' is not supported; use one of"),
    ({"bf16": "yes"}, "bf16='yes' is not supported"),
    ({"seed": "0"}, "--seed '0' must be a whole number"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[f"{k}={v!r}" for (kw, _) in BAD for k, v in kw.items()])
def test_each_bad_setting_is_one_line(kwargs, message):
    with pytest.raises(UserError) as e:
        TrainSettings(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_settings_are_frozen_and_keyed_for_resume():
    s = TrainSettings(lr=1e-3, max_grad_norm=None, schedule="cosine", steps=7, method="qalora", init="qlora")
    with pytest.raises(AttributeError):
        s.lr = 1.0  # frozen: the settings a run started with are the ones it reports and checkpoints
    assert s.resume_key()["steps"] == 7  # a cosine run's LR curve depends on it
    assert "steps" not in TrainSettings().resume_key()  # a constant-LR run may be extended
    with pytest.raises(UserError, match="need an output folder"):
        TrainSettings(save_every=2).check_checkpoint_folder(None)


CLI_BAD = [
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--lr", "nan"], "--lr nan must be a finite positive number, e.g. 2e-4"),
    (["--lr", "inf"], "--lr inf must be a finite positive number"),
    (["--lr", "-1"], "--lr -1.0 must be a finite positive number"),
    (["--max-len", "1"], "--max-len 1 must be >= 2"),
    (["--grad-accum", "0"], "--grad-accum 0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1 must be >= 0"),
    (["--save-every", "-1"], "--save-every -1 must be >= 0"),
    (["--eval-every", "-1"], "--eval-every -1 must be >= 0"),
    (["--eval-texts", "0"], "--eval-texts 0 must be >= 1"),
]


@pytest.mark.parametrize("args, message", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_train_command_refuses_bad_settings_before_writing(args, message, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")  # never read: the settings fail first
    out = tmp_path / "out"
    assert main(["train", "--plan", str(plan), "--out", str(out), "--quiet", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lqplan: error: ") and message in err, err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(encoder_plan_file, tmp_path,
                                                                            monkeypatch, capsys):
    real, calls = loop.distill_step_loss, []

    def nan_at_step_2(*args, **kwargs):  # one micro-batch per step: the second call is step 2
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * NAN if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "distill_step_loss", nan_at_step_2)
    plan, out = encoder_plan_file(3), tmp_path / "run"
    capsys.readouterr()  # making the plan may have shown a weight-loading bar
    code = main(["train", "--plan", str(plan), "--out", str(out), "--steps", "4", "--save-every", "1",
                 "--batch-size", "2", "--max-len", "16", "--eval-texts", "2", "--lr", "2e-3", "--quiet",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "the training loss became non-finite (nan) at step 2" in err, err
    assert "lower --lr" in err
    state = load_checkpoint(out / CHECKPOINT)
    assert state["step"] == 1  # the step-2 state was never written over it
    assert [h["step"] for h in state["history"] if "loss" in h] == [1]
    assert all(math.isfinite(float(v.abs().max())) for v in state["adapters"].values())
    assert not (out / "quantized").exists() and not (out / "train_report.json").exists()
