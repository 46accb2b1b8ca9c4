"""The encoder quality study's claims, report and outputs (planner.study.quality_encoder runs it): each claim's
verdict from the result rows, quality.md, the error and cosine plots, results.json, and one report merged from runs
made in parallel."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..errors import UserError
from ..fsio import write_bytes, write_json, write_text
from .claims import fmt
from .quality import error_claim, row_of, verdict
from .report import png_bytes


ARMS = ("qlora", "loftq", "ilp", "ilp_fisher", "qalora")
ARM_NAMES = {"qlora": "QLoRA (NF+dq b64, zero-init)", "loftq": "uniform LoftQ", "ilp": "lqplan ILP (data-free)",
             "ilp_fisher": "lqplan ILP (Fisher)", "qalora": "QA-LoRA (uniform INT)"}


# ---- claims ------------------------------------------------------------------------------------------------------
CLAIMS = ("At equal bits/param the ILP plan has lower reconstruction error than every uniform configuration that "
          "fits (NF LoftQ/QLoRA grid and QA-LoRA, any rank)",
          "Fisher weighting lowers the downstream loss (1 - held-out teacher cosine after fine-tuning) further than "
          "the data-free plan",
          "At <= 3 bits/param the ILP plan beats uniform QLoRA after the same fine-tuning")


def check_claims(rows: list[dict], uniform_best: dict, budgets) -> list[dict]:
    # 1. Reconstruction error: the data-free ILP plan against every uniform configuration that fits (profile errors).
    claims = [error_claim(rows, uniform_best, budgets, CLAIMS[0])]
    if not any(r.get("cos_after_mean") == r.get("cos_after_mean") for r in rows if r["status"] == "ok"):
        for claim in CLAIMS[1:]:
            claims.append({"claim": claim, "status": "NOT RUN", "reason": "this run did not fine-tune (--errors-only)",
                           "detail": []})
        return claims
    # 2. Fisher: lower downstream loss (1 − held-out teacher cosine after fine-tuning) than the data-free plan.
    parts, ok, compared = [], True, 0
    for b in budgets:
        f, d = row_of(rows, b, "ilp_fisher"), row_of(rows, b, "ilp")
        if not (f and d and f["status"] == d["status"] == "ok"):
            continue
        compared += 1
        lf, ld = 1 - f["cos_after_mean"], 1 - d["cos_after_mean"]
        spread = max(f["cos_after_std"], d["cos_after_std"])
        win = lf < ld
        ok &= win
        noise = " (the difference is within the seed std)" if abs(lf - ld) < spread else ""
        parts.append(f"{b}: 1-cos {lf:.4g} (Fisher) vs {ld:.4g} (data-free): {'lower' if win else 'NOT lower'}, seed "
                     f"std {spread:.2g}{noise}; Fisher-weighted error {f['fisher_error']:.4g} vs "
                     f"{d['fisher_error']:.4g}")
    claims.append(verdict(
        CLAIMS[1], ok, compared, "no budget to compare",
        "at the budgets marked NOT lower the Fisher plan's held-out loss after fine-tuning is higher although its "
        "Fisher-weighted error is lower: there the lower weighted initial error (Fisher from SimCSE gradients on "
        "pydoc calibration text) did not carry through fine-tuning", parts))
    # 3. At <= 3 bits the plan beats uniform QLoRA after fine-tuning.
    parts, ok, compared = [], True, 0
    for b in budgets:
        if b > 3.0:
            continue
        p, q = row_of(rows, b, "ilp"), row_of(rows, b, "qlora")
        if not (p and p["status"] == "ok"):
            continue
        if not (q and q["status"] == "ok"):
            parts.append(f"{b}: QLoRA does not fit ({q['reason'] if q else 'not run'}); the plan does")
            continue
        compared += 1
        win = p["cos_after_mean"] > q["cos_after_mean"]
        ok &= win
        parts.append(f"{b}: cosine after fine-tuning {p['cos_after_mean']:.4f} ± {p['cos_after_std']:.4f} (plan) vs "
                     f"{q['cos_after_mean']:.4f} ± {q['cos_after_std']:.4f} (QLoRA {q['config']}); adapters "
                     f"{p.get('adapter_bits_per_param', math.nan):.3f} vs {q.get('adapter_bits_per_param', math.nan):.3f} "
                     "bits/param" + ("" if win else " NOT higher"))
    claims.append(verdict(
        CLAIMS[2], ok, compared, "no budget <= 3 bits where both fit",
        "QLoRA's fine-tuned cosine is as high at a budget marked below; the ILP minimises reconstruction error only, "
        "so where it spends the bits on quantization rather than adapters (compare the adapter bits/param) "
        "fine-tuning recovers less", parts))
    return claims


# ---- report ------------------------------------------------------------------------------------------------------
def render_md(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Quality study: planned mix vs uniform QLoRA, LoftQ and QA-LoRA at equal bits",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']['name']} ({result['model']['matrices']} planned matrices, "
        f"{result['params']:,} parameters); device {result['device']}; {result['seconds']:.0f} s in all "
        f"(profiling {result['profile']['seconds']:.0f} s).",
        *([f"Merged from {len(result['parts'])} runs in parallel (one process each, same machine), wall time the "
           "longest: " + "; ".join(f"`{q['command']}` ({q['seconds']:.0f} s)" for q in result["parts"]), ""]
          if result.get("parts") else [""]),
        f"Budgets in bits per planned parameter, adapters included at 16 bits. Grid: NF bits {s['lora_bits']} x "
        f"blocks {s['lora_blocks']} (double quant 8-bit/256) x ranks {s['lora_ranks']}; QA-LoRA INT bits "
        f"{s['qalora_bits']} x groups {s['qalora_groups']} (fp16 scale + zero) x ranks {s['qalora_ranks']}; LoftQ "
        f"iterations {s['iters']}. " + (
            f"Fine-tuning: {s['steps']} steps of distillation to the full-precision model (batch {s['batch_size']}, "
            f"{s['max_len']} tokens, AdamW lr {s['lr']}), {s['seeds']} seed(s)" if s.get("finetune", True) else
            "No fine-tuning (--errors-only): errors and cosine at initialisation") +
        f"; teacher cosine on {s['eval_texts']} held-out pydoc paragraphs.",
        "",
        "Ranks suit the 384-wide model: a rank-r adapter costs 0.0625·r bits/param over MiniLM (1.33 bits/param at "
        f"rank 16 on a 384x384 matrix). QLoRA's NF4 + double quant costs {result['qlora_nf4_bits']} bits/param with "
        "its smallest grid adapter, " + ("above every budget, so the QLoRA arm falls back to NF3/NF2 (same recipe)."
                                         if result["qlora_nf4_bits"] > max(result["budgets"]) else
                                         "so below that budget the QLoRA arm falls back to NF3/NF2 (same recipe)."),
        "",
        "## Claims",
        "",
    ]
    if not result["complete"]:
        lines[-2:-2] = [f"**Partial results**: budgets {result['budgets_done']} of {result['budgets']} are done; the "
                        "claims below cover those only.", ""]
    for c in result["claims"]:
        lines.append(f"- **{c['status']}** — {c['claim']}." + (f" Reason: {c['reason']}." if c["reason"] else ""))
        for d in c["detail"]:
            lines.append(f"  - {d}")
    lines += ["", "## Results", "",
              "| budget | arm | config | bits/param (adapters) | total error | Fisher-weighted error | cosine before | "
              "cosine after | bytes held = plan |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['budget']} | {ARM_NAMES[r['arm']]} | n/a: {r['reason']} | | | | | | |")
            continue
        lines.append(
            f"| {r['budget']} | {ARM_NAMES[r['arm']]} | {r['config']} | {r['bits_per_param']:.4f} "
            f"({r['adapter_bits_per_param']:.3f}) | "
            f"{fmt(r['total_error'])} | {fmt(r['fisher_error'])} | "
            f"{r['cos_before_mean']:.4f} ± {r['cos_before_std']:.4f} | {fmt(r['cos_after_mean'], '.4f')} ± "
            f"{fmt(r['cos_after_std'], '.4f')} | {'yes' if r['bytes_match'] else 'NO'} |")
    lines += ["", "Best uniform configuration per budget (all uniform labels of the data-free profile that fit):", ""]
    for b, u in result["uniform_best"].items():
        lines.append(f"- {b}: " + (f"{u['label']}, {u['bits_per_param']:.4f} bits/param, error {u['total_error']:.4g}"
                                   if u else "none fits"))
    lines += ["", "Errors are measured on the applied layers before fine-tuning (W − Q − adapter; QA-LoRA: the "
              "pooled adapter's dense equivalent); the ILP minimises the profiled error, which they reproduce "
              f"(largest relative difference {result['max_table_mismatch']:.1e}). Cosine: mean ± std over seeds.",
              "", "![error vs bits](error_vs_bits.png)", ""]
    if result["settings"].get("finetune", True):
        lines += ["![cosine vs bits](cosine_vs_bits.png)", ""]
    return "\n".join(lines)


def plots(rows: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for name, key, ylabel in (("error_vs_bits.png", "total_error", "total reconstruction error Σ‖W − Q − L‖²"),
                              ("cosine_vs_bits.png", "cos_after_mean", "teacher cosine after fine-tuning")):
        if not any(r["status"] == "ok" and not math.isnan(r[key]) for r in rows):
            continue  # an --errors-only run has no cosine after fine-tuning
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm in ARMS:
            pts = sorted({(r["bits_per_param"], r[key], r.get("cos_after_std", 0.0)) for r in rows
                          if r["arm"] == arm and r["status"] == "ok" and not math.isnan(r[key])})
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            if key == "cos_after_mean":
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=ARM_NAMES[arm])
            else:
                ax.plot(xs, ys, marker="o", label=ARM_NAMES[arm])
        if key == "total_error":
            ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (actual, adapters included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out[name] = png_bytes(fig, dpi=120)
        plt.close(fig)
    return out


def write_outputs(out_dir, head: dict, rows: list[dict], uniform_best: dict, mismatch: float, budgets_done: list,
                  complete: bool) -> dict:
    """results.json, quality.md and the plots for the budgets done so far (each file replaced atomically)."""
    result = {**head, "complete": complete, "budgets_done": budgets_done, "uniform_best": uniform_best,
              "rows": rows, "claims": check_claims(rows, uniform_best, budgets_done), "max_table_mismatch": mismatch,
              "seconds": time.perf_counter() - head.pop("_t_start", time.perf_counter())}
    out_dir = Path(out_dir)
    for name, data in plots(rows).items():
        write_bytes(out_dir / name, data)
    write_json(out_dir / "results.json", result)
    write_text(out_dir / "quality.md", render_md(result))
    return result


def merge_results(parts: list[Path], out_dir: Path, command: str) -> dict:
    """One report from studies run in parallel, one budget (or several) per process, all with the same settings
    and model: rows in budget order, claims re-checked over the union."""
    results = []
    for part in parts:
        try:
            results.append(json.loads((Path(part) / "results.json").read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"--merge: cannot read {part}/results.json ({e}); give the --out folders of finished "
                            "runs") from None
    first = results[0]
    for r in results[1:]:
        if r["settings"] | {"budgets": None} != first["settings"] | {"budgets": None} or \
                r["model"]["fingerprint"] != first["model"]["fingerprint"]:
            raise UserError("--merge: the parts were run with different settings or models; rerun them alike")
    budgets = sorted({b for r in results for b in r["budgets_done"]})
    rows = sorted((row for r in results for row in r["rows"]), key=lambda row: budgets.index(row["budget"]))
    uniform_best = {str(b): u for r in results for b, u in r["uniform_best"].items()}
    head = {k: v for k, v in first.items() if k not in ("complete", "budgets_done", "uniform_best", "rows", "claims",
                                                       "max_table_mismatch", "seconds")}
    head.update(command=command, budgets=budgets, settings=first["settings"] | {"budgets": budgets},
                _t_start=time.perf_counter() - max(r["seconds"] for r in results),
                parts=[{"command": r["command"], "seconds": r["seconds"]} for r in results])
    return write_outputs(out_dir, head, rows, uniform_best, max(r["max_table_mismatch"] for r in results), budgets,
                         all(r["complete"] for r in results))


