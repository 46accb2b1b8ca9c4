"""The study's table (study.md) and plots (perplexity after fine-tuning and KL before it, against bits/param)."""

from __future__ import annotations

import io
import math

from .claims import after_text, fmt

ARM_NAMES = {"qlora": "QLoRA (NF4 b64 dq, zero-init)", "loftq": "uniform LoftQ"}


def arm_name(arm: dict) -> str:
    return ARM_NAMES.get(arm["kind"]) or f"lqplan ({arm['objective']})"


def _env_line(env: dict) -> str:
    gpu = env.get("gpu") or "no GPU"
    return (f"{gpu} ({env.get('nvidia_smi') or '-'}), Python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}, PEFT {env.get('peft')}, tokenizers {env.get('tokenizers')}, {env['cpus']} CPUs, "
            f"host {env['host']}")


def render_md(r: dict) -> str:
    s = r["settings"]
    lines = ["# Decoder study: lqplan plans against QLoRA and uniform LoftQ at equal bits", "",
             f"Command: `{r['command']}`  ", f"Environment: {_env_line(r['environment'])}  ",
             f"Grid: NF {s['bits']} x blocks {s['blocks']} (double quant) x ranks {s['ranks']}, LoftQ T={s['iters']}; "
             f"objectives {', '.join(s['objectives'])} (claims judged on **{s['headline']}**), calibration "
             f"{s['calib']} ({s['calib_tokens']} tokens)  ",
             f"Fine-tune, the same for every arm: {s['steps']} steps of {s['batch_size']} x {s['max_len']} tokens of the "
             f"pydoc train split, lr {s['lr']:g}; {s['seeds']} seed(s), {s['key_seeds']} for QLoRA and the plans at "
             f"QLoRA's bits and at {s['near_budget']} bits. Perplexity on {s['eval_texts']} held-out pydoc paragraphs, "
             f"windows of {s['max_len']} tokens, each starting with BOS; KL(fp ‖ quantized) before fine-tuning, "
             "initial adapters.  ",
             f"Wall time {r['seconds']:.0f} s of a {s['deadline_s']:.0f} s deadline; tasks: "
             + ", ".join(f"{n} {k}" for k, n in task_states(r).items()), ""]
    for m in r["models"]:
        lines += model_md(m, s)
    lines += ["## Commands", "", "Every process the study ran, in launch order (the study itself: the command above).",
              "", "```", *r["commands"], "```", ""]
    return "\n".join(lines)


def task_states(r: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in r["tasks"].values():
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out


def model_md(m: dict, s: dict) -> list[str]:
    tok = m["tokenizer"]
    w = ", ".join(f"{k} {v[:16]}…" for k, v in m["weights_sha256"].items())
    lines = [f"## {m['name']} ({m['architecture']}, {m['matrices']} planned matrices, {m['params']:,} parameters)", "",
             f"Folder `{m['folder']}`, fingerprint `{m['fingerprint']}`, weights sha256 {w}"
             + (f"; {m['weights']}" if m.get("weights") else "") + "  ",
             f"Tokenizer: known-answer check **{tok['status']}**"
             + (f" ({tok['tokens']} tokens for the known text, expected {tok['expected_tokens']})"
                if tok.get("expected_tokens") is not None else "")
             + f", {tok['class']}, BOS id {tok['bos_id']}, digest `{tok['digest']}`  ",
             f"Full-precision perplexity: **{fmt(m['fp_ppl'], '.3f')}** (same windows, same run); QLoRA's own bits: "
             f"{m['qlora_bits']}", ""]
    if m.get("skipped"):
        return lines + [f"**Not run:** {m['skipped']}", ""]
    lines += ["### Claims", ""]
    for c in m["claims"]:
        lines.append(f"- **({c['id']}) {c['status']}** {c['claim']}")
        lines += [f"  - {d}" for d in c["detail"]]
    head = s["headline"]
    lines += ["", "### Arms", "", f"| bits | arm | configuration | bits/param | predicted error ({head}) | KL before | "
              "ppl before | ppl after | status |", "|---|---|---|---|---|---|---|---|---|"]
    order = {"qlora": 0, "loftq": 1, "plan": 2}
    rows = []
    for a in m["arms"].values():
        for b in a["budgets"]:
            rows.append((b, order[a["kind"]], a["objective"] or "", a))
    for b, _, _, a in sorted(rows, key=lambda x: x[:3]):
        same = f" (= {a['same_as']})" if a.get("same_as") else ""
        lines.append(f"| {b} | {arm_name(a)} | {a['config']}{same} | {a['bits_per_param']:.4f} | "
                     f"{fmt(a['predicted'].get(head))} | {fmt(a.get('kl'))} | {fmt(a.get('ppl_before_mean'), '.3f')} | "
                     f"{after_text(a)} | {a['status']} |")
    lines += ["", "### Every uniform configuration that fits, before fine-tuning (claim a)", "",
              "| configuration | bits/param | predicted error (data-free) | KL before | ppl before |", "|---|---|---|---|---|"]
    for u in sorted(m["uniform"].values(), key=lambda u: u["bits"]):
        lines.append(f"| {u['label']} | {u['bits_per_param']:.4f} | {fmt(u['predicted'].get('data-free'))} | "
                     f"{fmt(u.get('kl'))} | {fmt(u.get('ppl_init'), '.3f')} |")
    return lines + [""]


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def plots(r: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in r["models"] if not m.get("skipped")]
    out = {}
    if not models:
        return out
    for name, key, ylabel in (("ppl_vs_bits.png", "ppl_after_mean", "held-out perplexity after fine-tuning"),
                              ("kl_vs_bits.png", "kl", "KL(fp ‖ quantized) before fine-tuning")):
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
        for ax, m in zip(axes[0], models):
            if key == "kl":
                pts = [(u["bits_per_param"], u["kl"]) for u in m["uniform"].values() if _num(u.get("kl"))]
                if pts:
                    ax.scatter(*zip(*pts), color="0.6", s=14, label="uniform configurations")
            groups: dict[str, list] = {}
            for a in m["arms"].values():
                if a.get("same_as") or not _num(a.get(key)):
                    continue
                err = (a.get("ppl_after_std") or 0.0) if key == "ppl_after_mean" else 0.0
                groups.setdefault(arm_name(a), []).append((a["bits_per_param"], a[key], err))
            for label, pts in sorted(groups.items()):
                xs, ys, es = zip(*sorted(pts))
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=label,
                            ls="none" if label == ARM_NAMES["qlora"] else "-")
            if key == "ppl_after_mean" and _num(m.get("fp_ppl")):
                ax.axhline(m["fp_ppl"], color="k", ls="--", lw=1, label="full precision")
            ax.set_yscale("log")
            ax.set_title(m["name"])
            ax.set_xlabel("bits per parameter (adapters included)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        out[name] = png_bytes(fig)
        plt.close(fig)
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v) and v > 0
