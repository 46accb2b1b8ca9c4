"""The decoder quality study's claims (a)-(d), its report quality.md and its error and perplexity plots
(planner.study.quality_decoder runs the study)."""

from __future__ import annotations

import math

from .claims import fmt
from .quality import error_claim, row_of, verdict
from .report import png_bytes

ARM_NAMES = {"qlora": "QLoRA (NF4+dq b64, zero-init)", "loftq": "uniform LoftQ", "ilp": "lqplan (data-free)",
             "ilp_fisher": "lqplan (Fisher)", "qalora": "QA-LoRA (uniform INT)"}
ARMS = tuple(ARM_NAMES)
CLAIMS = ("(a) At every budget the plan's reconstruction error is below every uniform configuration that fits",
          "(b) At QLoRA's own bits the plan's perplexity after fine-tuning is <= QLoRA's",
          "(c) The 2.75-bit plan's perplexity after fine-tuning is within 10% of QLoRA NF4's (at QLoRA's own bits)",
          "(d) The Fisher plan's perplexity after fine-tuning is <= the data-free plan's at every budget")


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


