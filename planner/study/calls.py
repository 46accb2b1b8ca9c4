"""Every `lqplan` command the study runs, one function each, and the readers of what they write. The flag names of
`--objective` and `evaluate --plan` live here only; `capabilities` reads the installed CLI's help so that a
missing flag is named before any GPU work rather than after."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from ..errors import UserError

REPO = Path(__file__).resolve().parents[2]


def lqplan(*args: str) -> list[str]:
    return [sys.executable, "-m", "planner", *args]


def child_env(threads: int) -> dict[str, str]:
    """A child's environment: this checkout first on PYTHONPATH (a device's carried packages kept after it), a
    share of the CPU cores, no progress bars."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "PYTHONUNBUFFERED": "1"}


def capabilities(env: dict | None = None) -> dict:
    """What the installed `lqplan` offers: the --objective choices of `plan`/`profile`, whether `evaluate` takes
    --plan, and the evaluate flags the study passes when present."""
    def help_of(verb: str) -> str:
        done = subprocess.run(lqplan(verb, "--help"), capture_output=True, text=True, cwd=REPO, env=env)
        if done.returncode != 0:
            raise UserError(f"`lqplan {verb} --help` failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return done.stdout

    plan_help, eval_help = help_of("plan"), help_of("evaluate")
    m = re.search(r"--objective \{([^}]*)\}", plan_help)
    return {"objectives": m.group(1).split(",") if m else None,
            "evaluate_plan": bool(re.search(r"--plan\b", eval_help)),
            "evaluate_flags": sorted(set(re.findall(r"(--[a-z][a-z-]+)", eval_help))),
            "tie": "--tie" in plan_help}


def supported_objectives(caps: dict) -> set[str]:
    """Without --objective, a profile is data-free, or Fisher-weighted with --calib."""
    return set(caps["objectives"]) if caps["objectives"] else {"data-free", "fisher"}


def objective_args(objective: str, caps: dict, calib: str, calib_tokens: int) -> list[str]:
    flag = ["--objective", objective] if caps["objectives"] else []
    if objective == "data-free":
        return flag
    return [*flag, "--calib", calib, "--calib-tokens", str(calib_tokens)]


def grid_args(s) -> list[str]:
    return ["--bits", s.bits, "--blocks", s.blocks, "--ranks", s.ranks, "--iters", str(s.iters)]


def plan_argv(model: str, objective: str, budget: float, s, caps: dict, out: Path, cache: Path) -> list[str]:
    return lqplan("plan", "--budget", f"{budget}bits", "--model", model, *grid_args(s),
                  *objective_args(objective, caps, s.calib, s.calib_tokens), "--out", str(out), "--cache", str(cache),
                  "--device", s.device, "--no-report", "--quiet")


def evaluate_argv(plan: Path, s, caps: dict, out: Path, cache: Path) -> list[str]:
    """KL(fp ‖ quantized) and perplexity of the plan's model with its initial adapters, on evaluate's own default
    held-out tokens and BOS-first windows (a QLoRA plan document says iters 0: plain quantization with
    zero-product adapters). --cache: where a Fisher or output-aware plan's weights are read."""
    flags = set(caps["evaluate_flags"])
    args = ["evaluate", "--plan", str(plan), "--out", str(out), "--device", s.device]
    args += ["--cache", str(cache)] if "--cache" in flags else []
    args += ["--eval-tokens", str(s.kl_tokens)] if s.kl_tokens and "--eval-tokens" in flags else []
    args += ["--quiet"] if "--quiet" in flags else []
    return lqplan(*args)


EVALUATE_FILE = "evaluate.json"


def read_evaluate(out: Path) -> dict:
    """kl (nats/token), ppl and fp_ppl (both on the same windows), tokens scored, from evaluate.json."""
    path = Path(out) / EVALUATE_FILE
    r = json.loads(path.read_text())
    if not isinstance(r.get("kl"), (int, float)):
        raise UserError(f"{path} has no number under 'kl' (keys: {', '.join(r)}); planner/study/calls.py "
                        "read_evaluate reads evaluate.json")
    ppl = r.get("perplexity") if isinstance(r.get("perplexity"), dict) else {}
    tokens = r.get("tokens") if isinstance(r.get("tokens"), dict) else {}
    return {"kl": float(r["kl"]), "ppl": ppl.get("quantized"), "fp_ppl": ppl.get("full_precision"),
            "tokens": tokens.get("scored"), "top1_agreement": r.get("top1_agreement"),
            "tokenizer": tokens.get("tokenizer")}


def train_argv(plan: Path, init: str, seed: int, s, out: Path, cache: Path) -> list[str]:
    return lqplan("train", "--plan", str(plan), "--init", init, "--seed", str(seed), "--steps", str(s.steps),
                  "--batch-size", str(s.batch_size), "--max-len", str(s.max_len), "--lr", repr(s.lr),
                  "--eval-texts", str(s.eval_texts), "--out", str(out), "--cache", str(cache), "--device", s.device,
                  "--no-save", "--quiet")


TRAIN_FILE = "train_report.json"


def read_train(out: Path) -> dict:
    r = json.loads((Path(out) / TRAIN_FILE).read_text())
    losses = [h["loss"] for h in r.get("history", []) if "loss" in h]
    return {"ppl_before": r["before"], "ppl_after": r["after"], "fp_ppl": r.get("full_precision"),
            "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan,
            "train_seconds": r.get("train_seconds"), "quantize_seconds": r.get("quantize_seconds"),
            "tokens_per_s": r.get("tokens_per_s"), "peak_memory_bytes": r.get("peak_memory_bytes"),
            "bytes_match_plan": r.get("bytes_match_plan"), "device": r.get("device")}
