"""The decoder quality study's settings and its jobs: one job applies a plan to the full-precision model, measures
its reconstruction error, fine-tunes the adapters with the next-token loss and scores held-out perplexity before
and after; run_jobs runs them in this process or as `--worker` subprocesses, reusing finished ones."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import SolverSettings

from ..corpus import real_text_splits
from ..devices import resolve_device
from ..errors import UserError
from ..fsio import write_json
from ..model.tokenizer import load_tokenizer, tokenizer_digest
from ..plan.document import Plan
from ..profile.fisher import load_fisher
from ..train.apply import apply_plan, quantized_bytes
from ..train.evaluate import perplexity
from ..train.loop import train
from ..train.settings import TrainSettings
from .quality import measure_errors


@dataclass
class Settings:
    model: str = "smollm2-135m"
    budgets: tuple = (2.5, 2.75, 3.0, 3.5, 4.127)  # QLoRA's own bits are added (qlora_budget)
    seeds: int = 3
    # Seeds for the arms the claims compare (QLoRA, both plans, at QLoRA's own bits and at 2.75), when more than
    # `seeds`: the other arms' differences are many seed-stds wide, so one device session runs them once.
    key_seeds: int = 0
    lora_bits: str = "2,3,4"  # NF8 plus an adapter cannot fit 4.5 bits
    lora_blocks: str = "16,32,64,128"
    lora_ranks: str = "8,16,32"  # planner.profile.grid.default_ranks for 576- and 640-wide matrices
    qlora_rank: int = 16
    qalora_bits: str = "2,3,4"
    qalora_groups: str = "32,64,128"
    qalora_ranks: str = "4,8,16"  # 640-wide inputs at g=128 allow rank <= 5
    iters: int = 5
    steps: int = 200
    batch_size: int = 8
    max_len: int = 256
    lr: float = 2e-4  # lqplan train's default (QLoRA's for small models); not tuned per arm
    eval_texts: int = 64
    eval_len: int = 256
    calib_tokens: int = 16384
    device: str = "auto"
    tiny: bool = False


def tiny_settings(model: str) -> Settings:
    """The CPU smoke run on a tiny random decoder: 2 budgets + QLoRA's, 1 seed, a 3-point LoRA grid, 2 steps on
    short blocks. It exercises every arm, the job runner and every output; its numbers mean nothing."""
    return Settings(model=model, budgets=(2.75, 3.5), seeds=1, lora_bits="2,4", lora_blocks="64", lora_ranks="4",
                    qlora_rank=4, qalora_bits="2", qalora_groups="64", qalora_ranks="4", iters=1, steps=2,
                    batch_size=2, max_len=32, eval_texts=4, eval_len=64, calib_tokens=256, tiny=True)


def worker_env() -> dict[str, str]:
    """A worker's environment: this checkout's planner first on PYTHONPATH (the study may run from a checkout that
    is not installed)."""
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}


class Context:
    """What every job of one process shares, loaded once: tokenizer, pristine fp model, texts, Fisher weights."""

    def __init__(self, folder: str, settings: Settings, fisher_path: Path):
        from transformers import AutoModelForCausalLM

        self.folder, self.settings = folder, settings
        self.device = resolve_device(settings.device)
        self.tokenizer = load_tokenizer(folder)
        self.tokenizer_digest = tokenizer_digest(self.tokenizer)
        self.pristine = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        splits = real_text_splits()
        self.heldout, self.train_texts = splits["heldout"][:settings.eval_texts], splits["train"]
        self.fisher = load_fisher(fisher_path)

    def perplexity(self, model) -> float:
        s = self.settings
        return perplexity(model, self.tokenizer, self.heldout, max_len=s.eval_len, stride=s.eval_len // 2,
                          batch_size=8)


def run_job(job: dict, ctx: Context) -> dict:
    s, solver = ctx.settings, SolverSettings()
    t0 = time.perf_counter()
    plan = Plan.load(job["plan"])
    model = copy.deepcopy(ctx.pristine)
    torch.manual_seed(job["seed"])  # QLoRA's Kaiming-initialised lora_A depends on it
    apply_plan(model, plan, model_path=ctx.folder, device=ctx.device, init=job["init"], iters=s.iters,
               fisher=ctx.fisher if job["fisher"] else None, solver=solver, progress=False)
    model.to(ctx.device)
    out = {"seed": job["seed"], "bytes_held": quantized_bytes(model), "tokenizer": ctx.tokenizer_digest}
    if job["measure"]:
        out.update(measure_errors(model, plan, ctx.pristine, ctx.fisher))
    settings = TrainSettings(steps=s.steps, batch_size=s.batch_size, max_len=s.max_len, lr=s.lr, seed=job["seed"])
    history = train(model, ctx.tokenizer, ctx.train_texts, settings, objective="causal", eval_fn=ctx.perplexity,
                    progress=False)
    evals = [h["eval"] for h in history if "eval" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    out.update(ppl_before=evals[0], ppl_after=evals[-1], loss_first=losses[0], loss_last=losses[-1],
               seconds=time.perf_counter() - t0)
    return out


def worker_main(job_dir: Path) -> int:
    """`--worker DIR`: run the one job described by DIR/job.json, write DIR/result.json."""
    job = json.loads((job_dir / "job.json").read_text())
    settings = Settings(**{**job["settings"], "budgets": tuple(job["settings"]["budgets"])})
    ctx = Context(job["folder"], settings, Path(job["fisher_path"]))
    write_json(job_dir / "result.json", {"job": job, "result": run_job(job, ctx)})
    return 0


def run_jobs(jobs: list[dict], parallel: int, log, ctx: Context, collect: bool = False) -> dict[str, dict]:
    """Each job's result by its key; a job whose result.json holds the same job is not run again. parallel 1: in
    this process with `ctx`; else each job in a subprocess of its own (`--worker`), `parallel` at a time.
    collect: run nothing; take every finished job's result by its key (its device and paths may differ)."""
    results, todo = {}, []
    for job in jobs:
        done = Path(job["dir"]) / "result.json"
        try:
            saved = json.loads(done.read_text())
            same = {k: v for k, v in saved["job"]["settings"].items() if k != "device"} == \
                {k: v for k, v in json.loads(json.dumps(job["settings"])).items() if k != "device"}
            if saved["job"] == json.loads(json.dumps(job)) or (collect and same):  # JSON: tuples read back as lists
                results[job["key"]] = saved["result"]
                continue
        except (OSError, ValueError, KeyError):
            pass
        todo.append(job)
    if collect:
        if todo:
            log(f"not run (collect): {', '.join(j['key'] for j in todo)}")
        return results
    for job in todo:
        write_json(Path(job["dir"]) / "job.json", job)
    if parallel <= 1:
        for job in todo:
            results[job["key"]] = run_job(job, ctx)
            write_json(Path(job["dir"]) / "result.json", {"job": job, "result": results[job["key"]]})
            log(f"{job['key']}: ppl {results[job['key']]['ppl_before']:.2f} -> {results[job['key']]['ppl_after']:.2f}")
        return results
    running: list[tuple[dict, subprocess.Popen]] = []
    pending = list(todo)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            with open(Path(job["dir"]) / "worker.log", "w") as f:
                running.append((job, subprocess.Popen([sys.executable, "-m", "planner.study.quality_decoder", "--worker", job["dir"]],
                                                      stdout=f, stderr=subprocess.STDOUT, env=worker_env())))
        time.sleep(0.5)
        for job, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((job, proc))
            if proc.returncode != 0:
                raise UserError(f"job {job['key']} failed (exit {proc.returncode}); see {job['dir']}/worker.log")
            results[job["key"]] = json.loads((Path(job["dir"]) / "result.json").read_text())["result"]
            log(f"{job['key']}: ppl {results[job['key']]['ppl_before']:.2f} -> {results[job['key']]['ppl_after']:.2f}")
    return results


