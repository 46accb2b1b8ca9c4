"""What the two quality studies (bench/quality_study.py on the embedded encoder, bench/quality_decoder.py on a
decoder) share: the reconstruction error measured on an applied model, the claims' verdicts and the
reconstruction-error claim, and the command line: the common options, their overrides of a study's settings, the
error line and the summary."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from quant.weighting import fisher_scales

from ..errors import UserError
from ..plan.document import Plan


@torch.no_grad()
def measure_errors(model, plan: Plan, teacher, fisher) -> dict:
    """Σ‖W − Q − adapter‖² and Σ‖D_r(W − Q − adapter)D_c‖² over the applied layers (QA-LoRA: the pooled adapter's
    dense equivalent), against the full-precision teacher's weights (which may stay on the CPU: each matrix is
    compared on the applied layer's device)."""
    total = weighted = 0.0
    for e in plan.matrices:
        merged = model.get_submodule(e.name).merged_weight()
        w = teacher.get_submodule(e.name).weight.float().to(merged.device)
        res = w - merged
        total += float(res.double().pow(2).sum())
        rows, cols = fisher[e.name]
        dr, dc = fisher_scales((rows, cols), w.device)
        weighted += float((dr[:, None] * res * dc[None, :]).double().pow(2).sum())
    return {"total_error": total, "fisher_error": weighted}


def row_of(rows, budget, arm):
    """The result row of `arm` at `budget`, or None."""
    return next((r for r in rows if r["budget"] == budget and r["arm"] == arm), None)


def verdict(claim: str, ok: bool, compared: int, not_compared: str, failed: str, detail: list[str]) -> dict:
    """PASS when every compared budget agreed and at least one was compared; else FAIL with the reason."""
    passed = ok and compared > 0
    return {"claim": claim, "status": "PASS" if passed else "FAIL",
            "reason": "" if passed else (not_compared if not compared else failed), "detail": detail}


def error_claim(rows: list[dict], uniform_best: dict, budgets, claim: str) -> dict:
    """The data-free ILP plan's profiled error against every uniform configuration that fits, per budget."""
    parts, ok, compared = [], True, 0
    for b in budgets:
        ilp, uni = row_of(rows, b, "ilp"), uniform_best.get(str(b))
        if ilp is None or ilp.get("table_error") is None or uni is None:  # a plan not fine-tuned still has one
            parts.append(f"{b}: no uniform configuration fits" if uni is None else f"{b}: ILP infeasible")
            continue
        compared += 1
        win = ilp["table_error"] < uni["total_error"]
        ok &= win
        parts.append(f"{b}: ILP {ilp['table_error']:.4g} vs best uniform {uni['label']} {uni['total_error']:.4g} "
                     f"({100 * (ilp['table_error'] / uni['total_error'] - 1):+.1f}%)" + ("" if win else " NOT lower"))
    return verdict(claim, ok, compared, "no budget where a uniform configuration fits",
                    "the optimal plan is uniform at some budget (a tie is not 'lower')", parts)


def with_overrides(settings, args):
    """`settings` with --budgets, --seeds, --steps and --lr applied where given."""
    if args.budgets:
        try:
            budgets = tuple(float(x) for x in args.budgets.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--budgets {args.budgets!r} is not a list of numbers, e.g. 2.5,3.0") from None
        settings = replace(settings, budgets=budgets)
    for name in ("seeds", "steps", "lr"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{name} {value} must be positive")
            settings = replace(settings, **{name: value})
    return settings


def print_summary(result: dict, out: Path) -> None:
    """The claims' verdicts and where the outputs went, on stdout."""
    for c in result["claims"]:
        print(f"{c['status']}: {c['claim']}" + (f" ({c['reason']})" if c["reason"] else ""))
    print(f"wrote {out / 'quality.md'}, results.json and plots in {result['seconds']:.0f} s")


def study_parser(doc: str, out: str, defaults, small_flag: str, small,
                 budgets_note: str = "") -> argparse.ArgumentParser:
    """The options both studies take; the help names the study's `defaults` and those of its smoke run `small`
    (--quick, --tiny)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"fine-tuning seeds per arm (default {defaults.seeds}; --{small_flag}: {small.seeds})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per run (default {defaults.steps}; --{small_flag}: {small.steps})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate of the adapters (default {defaults.lr:g})")
    p.add_argument("--budgets", default=None,
                   help="comma-separated bits/param (default " + ",".join(f"{b:g}" for b in defaults.budgets) + ")"
                   + budgets_note)
    p.add_argument("--cache", default=".lqplan-cache", help="profile/Fisher cache folder, shared with `lqplan` "
                   "(default .lqplan-cache)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def study_main(script: str, argv: list[str] | None, run) -> int:
    """A study's command line around `run(command)`, which returns (result, output folder), or (None, None) when
    there is nothing to summarise: the command as typed goes to `run` for the report, a UserError is one line on
    stderr (exit 2), and the claims' verdicts are printed."""
    command = f"python bench/{script}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        result, out = run(command.strip())
    except UserError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print_summary(result, out)
    return 0
