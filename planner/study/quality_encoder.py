"""The quality study on the embedded encoder (bench/quality_study.py runs it): at equal bits per parameter, does
lqplan's planned mix beat uniform QLoRA, uniform LoftQ and QA-LoRA on real weights, before and after the same
fine-tuning budget?

    python bench/quality_study.py --out reports/quality --device cuda --seeds 3     # the study (one H100)
    python bench/quality_study.py --out /tmp/quality --device cpu --quick           # CPU smoke run (< 1 min)

Model: the embedded all-MiniLM-L6-v2 (36 planned matrices, 10.6M parameters). Budgets (bits per planned parameter,
adapters included at 16 bits, as every lqplan plan counts them): 2.25, 2.5, 2.75, 3.0, 3.5, 4.127.
Ranks suit the 384-wide model: grid ranks 2, 4, 8, 16 (no rank 0: every planned matrix keeps an adapter to fine-tune;
rank 2 is what lets anything with an adapter fit 2.25 bits/param). On MiniLM an adapter is costly:
rank r adds 16·r·(m + n)/(m·n) bits per weight, 1.33 bits/param at rank 16 on a 384x384 matrix and 0.0625·r bits per
parameter over the whole model, so QLoRA's NF4 + double quant (4.127 bits) plus any adapter exceeds every budget here.

Arms at each budget (planner.plan.baselines; each uses the largest configuration that fits; "n/a" when none does):
  qlora       QLoRA: NF + double quant, blocks of 64 (QLoRA's recipe), zero-initialised adapters; NF4 where it fits,
              else NF3 / NF2; most bits first, then the largest rank.
  loftq       uniform LoftQ: the uniform NF configuration (one label for every matrix, rank > 0) of least error.
  ilp         lqplan's ILP plan, data-free (LoftQ decompositions, unweighted error).
  ilp_fisher  lqplan's ILP plan with Fisher weights from pydoc calibration text (LQ-LoRA's data-aware variant).
  qalora      QA-LoRA: the uniform asymmetric INT-k / group-g configuration (fp16 scale + zero per (row, group),
              group-pooled adapter, rank > 0) of least error; ranks above min(out, in/g) do not exist, so on 384-wide
              inputs g=128 allows rank <= 3 and g=64 rank <= 6.
The grid is profiled once (data-free, then Fisher-weighted) on the chosen device and reused for every budget.
For each arm: bits/param actual (the plan's exact bytes, checked against the bytes the applied model holds), total
reconstruction error Σ‖W − Q − adapter‖² and its Fisher-weighted form, both measured on the applied layers, and the
teacher cosine (mean cosine between the quantized and the full-precision model's mean-pooled embeddings) on held-out
pydoc text before and after fine-tuning the adapters by distillation (planner.train.train) for the same number of
steps, over several seeds (mean ± std). Identical plans at several budgets are run once.
Writes <out>/quality.md, results.json, error_vs_bits.png and cosine_vs_bits.png, each atomically.
"""

from __future__ import annotations

import copy
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from quant import NF4_QLORA, SolverSettings

from ..corpus import load_calib, real_text_splits
from ..devices import resolve_device
from ..model.discover import discover_matrices, planned_params
from ..model.resolve import resolve_model
from ..model.tokenizer import load_tokenizer, tokenizer_digest
from ..plan.baselines import Arm, build_plan, choose_arms, profiled_error
from ..plan.document import Plan
from ..plan.ilp import uniform_solutions
from ..profile.fisher import compute_fisher, get_fisher
from ..profile.grid import GridPoint, make_grid
from ..profile.run import run_profile
from ..profile.settings import ProfileSettings
from ..train.apply import apply_plan, quantized_bytes, trainable_parameters
from ..train.evaluate import sentence_embeddings
from ..train.loop import train
from ..train.settings import TrainSettings
from .claims import fmt, mean_std
from .quality import measure_errors, study_main, study_parser, with_overrides
from .quality_encoder_report import merge_results, write_outputs

SCHEMA = "lqplan.quality/1"
BUDGETS = (2.25, 2.5, 2.75, 3.0, 3.5, 4.127)


@dataclass
class Settings:
    """What one run of the study is (its command line's options change these)."""

    budgets: tuple = BUDGETS
    seeds: int = 3
    lora_bits: str = "2,3,4"  # NF8 cannot fit under 4.127 bits with an adapter: profiling it would be wasted
    lora_blocks: str = "16,32,64,128"
    # No rank 0: every planned matrix keeps an adapter to fine-tune (with rank 0 allowed, the error-minimising ILP
    # drops most adapters at <= 2.5 bits on MiniLM and then cannot recover by fine-tuning); rank 2 makes 2.25 fit.
    lora_ranks: str = "2,4,8,16"
    qalora_bits: str = "2,3,4"
    qalora_groups: str = "32,64,128"
    qalora_ranks: str = "2,4,8,16"
    iters: int = 5
    steps: int = 200
    batch_size: int = 8
    max_len: int = 128
    lr: float = 1e-3  # 60-step CPU check at NF2: 1e-3 beat 5e-4 and 2e-4 for QLoRA and LoftQ init alike
    eval_texts: int = 64
    calib_tokens: int = 16384
    layers: int | None = None  # plan only the first N transformer layers (None: all 6)
    device: str = "auto"
    quick: bool = False
    finetune: bool = True  # False (--errors-only): errors and cosine at initialisation only, claims 2-3 not run


def quick_settings() -> Settings:
    """The CPU smoke run: 2 budgets, 1 seed, the first layer (6 matrices), a 3-point grid, 2 training steps on
    short sequences. It exercises every arm and output; its numbers mean nothing."""
    return Settings(budgets=(2.75, 3.5), seeds=1, lora_bits="2,3", lora_blocks="64", lora_ranks="4",
                    qalora_bits="2", qalora_groups="64", qalora_ranks="4", iters=1, steps=2, batch_size=2,
                    max_len=32, eval_texts=4, calib_tokens=64, layers=1, quick=True)


# ---- one run: apply, measure, fine-tune, evaluate ----------------------------------------------------------------
def _cosine(model, tokenizer, texts, teacher_emb, max_len: int) -> float:
    emb = sentence_embeddings(model, tokenizer, texts, max_len=max_len)
    return float(torch.nn.functional.cosine_similarity(emb, teacher_emb, dim=-1).mean())


def run_arm(plan: Plan, arm: Arm, seed: int, ctx: dict, settings: Settings, solver: SolverSettings,
            measure: bool) -> dict:
    t0 = time.perf_counter()
    folder = ctx["folder"]
    model = copy.deepcopy(ctx["pristine"])
    torch.manual_seed(seed)  # QLoRA's Kaiming-initialised lora_A depends on it
    apply_plan(model, plan, model_path=folder, device=ctx["device"], init=arm.init, iters=settings.iters,
               fisher=ctx["fisher"] if arm.fisher else None, solver=solver, progress=False)
    out = {"seed": seed, "bytes_held": quantized_bytes(model)}
    if measure:
        out.update(measure_errors(model, plan, ctx["teacher"], ctx["fisher"]))
    evaluate = lambda m: _cosine(m, ctx["tokenizer"], ctx["heldout"], ctx["teacher_emb"], settings.max_len)  # noqa
    if not settings.finetune:
        cos = evaluate(model)
        out.update(cos_before=cos, cos_after=None, loss_first=None, loss_last=None)
    elif trainable_parameters(model):
        train_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, max_len=settings.max_len,
                                       lr=settings.lr, seed=seed)
        history = train(model, ctx["tokenizer"], ctx["train"], train_settings, objective="distill",
                        teacher=ctx["teacher"], eval_fn=evaluate, progress=False)
        evals = [h["eval"] for h in history if "eval" in h]
        losses = [h["loss"] for h in history if "loss" in h]
        out.update(cos_before=evals[0], cos_after=evals[-1], loss_first=losses[0], loss_last=losses[-1])
    else:  # every matrix at rank 0: nothing to train
        cos = evaluate(model)
        out.update(cos_before=cos, cos_after=cos, loss_first=None, loss_last=None)
    out["seconds"] = time.perf_counter() - t0
    del model
    return out


# ---- the study ---------------------------------------------------------------------------------------------------
def run_study(settings: Settings, out_dir: Path, cache_dir: Path, progress: bool = True, command: str = "") -> dict:
    from transformers import AutoModel

    t_start = time.perf_counter()
    dev = resolve_device(settings.device)
    solver = SolverSettings()
    source = resolve_model(None)
    matrices = [m for m in discover_matrices(source)
                if settings.layers is None or m.layer is None or m.layer < settings.layers]
    params = planned_params(matrices)
    lora_grid = make_grid(settings.lora_bits, settings.lora_blocks, settings.lora_ranks)
    qalora_grid = make_grid(settings.qalora_bits, ranks=settings.qalora_ranks, method="qalora",
                            groups=settings.qalora_groups)
    points = {p.label: p for p in lora_grid + qalora_grid}
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    t0 = time.perf_counter()
    if settings.quick:  # a couple of short sequences: the smoke run only needs weights of the right shape
        names = [m.name for m in matrices]
        fisher = compute_fisher(source.folder, names, load_calib("pydoc"), settings.calib_tokens,
                                seq_len=settings.max_len, batch_size=2, device=str(dev))
        fkey = f"quick-{settings.calib_tokens}"
    else:
        fisher, fkey, _ = get_fisher(source, matrices, "pydoc", cache_dir, settings.calib_tokens, dev, progress)
    free, _ = run_profile(source, matrices, ProfileSettings(lora_grid + qalora_grid, settings.iters, solver),
                          cache_dir=cache_dir, device=str(dev), progress=progress)
    weighted, _ = run_profile(source, matrices, ProfileSettings(lora_grid, settings.iters, solver), fisher, fkey,
                              cache_dir=cache_dir, device=str(dev), progress=progress)
    profile_seconds = time.perf_counter() - t0
    log(f"profile: {len(free)} data-free + {len(weighted)} Fisher rows in {profile_seconds:.1f} s")

    folder = source.folder
    tokenizer = load_tokenizer(folder)
    tokenizer_id = tokenizer_digest(tokenizer)
    pristine = AutoModel.from_pretrained(folder, dtype=torch.float32)
    teacher = copy.deepcopy(pristine).to(dev).eval()
    splits = real_text_splits()
    heldout = splits["heldout"][:settings.eval_texts]
    ctx = {"folder": folder, "pristine": pristine, "device": dev, "fisher": fisher, "teacher": teacher,
           "tokenizer": tokenizer,
           "heldout": heldout, "train": splits["train"],
           "teacher_emb": sentence_embeddings(teacher, tokenizer, heldout, max_len=settings.max_len)}

    min_rank = min(int(r) for r in settings.lora_ranks.split(",") if int(r) > 0)
    nf4 = GridPoint(NF4_QLORA, min_rank)

    def header() -> dict:
        return {"schema": SCHEMA, "command": command, "settings": asdict(settings), "device": str(dev),
                "host": platform.node(), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                "model": {"name": source.name, "fingerprint": source.fingerprint, "matrices": len(matrices)},
                "tokenizer": tokenizer_id, "params": params, "budgets": list(settings.budgets),
                "qlora_nf4_bits": round(sum(nf4.bits(m.shape) for m in matrices) / params, 4),
                "profile": {"seconds": profile_seconds, "rows_free": len(free), "rows_fisher": len(weighted),
                            "grid": [p.label for p in lora_grid + qalora_grid]},
                "_t_start": t_start}

    rows, done, uniform_best, mismatch = [], {}, {}, 0.0
    for i, budget in enumerate(settings.budgets):
        budget_bits = int(budget * params)
        uni = uniform_solutions(free, budget_bits)
        uni = uni.loc[uni["fits"]].sort_values("total_error", kind="mergesort")
        uniform_best[str(budget)] = None if uni.empty else {
            "label": uni.iloc[0]["label"], "total_error": float(uni.iloc[0]["total_error"]),
            "bits_per_param": float(uni.iloc[0]["total_bits"]) / params}
        for arm in choose_arms(free, weighted, budget, budget_bits):
            row = {"budget": budget, "arm": arm.arm, "status": "n/a", "reason": arm.reason}
            if arm.choice is None:
                rows.append(row)
                continue
            table = weighted if arm.fisher else free
            plan = build_plan(source, matrices, points, arm, table, settings.iters, solver)
            key = (arm.init, arm.fisher, tuple(sorted(arm.choice.items())))
            if key not in done:
                runs = [run_arm(plan, arm, seed, ctx, settings, solver, measure=(seed == 0))
                        for seed in range(settings.seeds)]
                done[key] = (runs, f"{budget}/{arm.arm}")
                log(f"{budget} bits {arm.arm:10s} {arm.describe:34s} cos {runs[0]['cos_before']:.4f} -> "
                    f"{fmt(mean_std(r['cos_after'] for r in runs)[0], '.4f')} ({sum(r['seconds'] for r in runs):.1f} s)")
            runs, first = done[key]
            counts: dict[str, int] = {}
            for e in plan.matrices:
                counts[e.point.label] = counts.get(e.point.label, 0) + 1
            table_error = profiled_error(arm, free, weighted)
            measured = runs[0]["total_error"]
            mismatch = max(mismatch, abs(measured / table_error - 1) if table_error else 0.0)
            adapter_bits = sum(e.point.bits(e.shape) - 8 * e.point.config.storage_bytes(e.shape[0] * e.shape[1])
                               for e in plan.matrices)
            row.update(status="ok", config=arm.describe, configs=counts, init=arm.init, fisher=arm.fisher,
                       adapter_bits_per_param=adapter_bits / params,
                       adapter_matrices=sum(1 for e in plan.matrices if e.point.rank > 0),
                       bits_per_param=plan.totals["bits_per_param"], plan_bytes=plan.totals["bytes"],
                       bytes_held=runs[0]["bytes_held"], bytes_match=runs[0]["bytes_held"] == plan.totals["bytes"],
                       total_error=measured, fisher_error=runs[0]["fisher_error"], table_error=table_error,
                       ilp_objective=plan.totals["error"],
                       same_run_as=first if first != f"{budget}/{arm.arm}" else None,
                       seeds=[{k: v for k, v in r.items()} for r in runs])
            for k in ("cos_before", "cos_after", "loss_last"):
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std((r[k] for r in runs), math.nan)
            rows.append(row)
        if i + 1 < len(settings.budgets):  # a run cut short still leaves the budgets it finished
            write_outputs(out_dir, header(), rows, uniform_best, mismatch, list(settings.budgets[:i + 1]), False)
        log(f"budget {budget} done at {time.perf_counter() - t_start:.0f} s")

    return write_outputs(out_dir, header(), rows, uniform_best, mismatch, list(settings.budgets), True)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "reports/quality", Settings(), "quick", quick_settings())
    p.add_argument("--ranks", default=None, help="adapter ranks of both grids (default 2,4,8,16; 0 lets the ILP "
                   "drop adapters)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 budgets, 1 seed, first layer, tiny grid, 2 steps")
    p.add_argument("--errors-only", action="store_true", help="no fine-tuning: reconstruction and Fisher-weighted "
                   "errors and the cosine at initialisation, for every arm and budget (claim 1 only; ~15 min on 2 "
                   "CPU cores)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge finished runs (their --out folders, e.g. one "
                   "budget per process run in parallel) into --out; computes nothing")
    args = p.parse_args(argv)

    def run(command: str):
        settings = with_overrides(quick_settings() if args.quick else Settings(), args)
        if args.ranks:
            settings = replace(settings, lora_ranks=args.ranks,
                               qalora_ranks=",".join(r for r in args.ranks.split(",") if r.strip() not in ("", "0")))
        settings = replace(settings, device=args.device)
        if args.errors_only:
            settings = replace(settings, finetune=False, seeds=1)
        out = Path(args.out)
        if args.merge:
            return merge_results([Path(d) for d in args.merge], out, command), out
        return run_study(settings, out, Path(args.cache), progress=not args.quiet, command=command), out

    return study_main("quality_study", argv, run)


if __name__ == "__main__":
    sys.exit(main())
