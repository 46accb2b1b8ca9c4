"""The decoder study on one GPU: lqplan's plans per objective against QLoRA and uniform LoftQ at equal
bits on real decoders, KL before and perplexity after the same fine-tune, claims (a)-(e) with their numbers.

    python bench/gpu_study.py --device cuda --model smollm2-135m --model gemma3-270m --out reports/quality-decoder/gpu
    python bench/gpu_study.py --tiny --work /tmp/study --out /tmp/study-out          # CPU smoke run, a tiny decoder

On the device machine the models come from the staged folders (docs/gpu-study.md: bench/device_stage.py prepares
the pieces and prints the exact calls). --model NAME=FOLDER names a folder; NAME alone is an alias. Work files
(plans, profiles, every task's log and report) go to --work; a rerun with the same --work resumes, running only what
has no output yet. --deadline-at (epoch seconds) or --deadline (seconds from start): no task starts that would end
later, and what still runs then is stopped, so the report is always written. --out receives results.json,
study.md, ppl_vs_bits.png, kl_vs_bits.png, study.log and runs.tar.gz (six files)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.errors import UserError  # noqa: E402
from planner.study.report import task_states  # noqa: E402
from planner.study.run import run_study  # noqa: E402
from planner.study.settings import OBJECTIVES, StudySettings, tiny_settings  # noqa: E402
from planner.testing.models import save_tiny_decoder  # noqa: E402


def parse_models(values: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        name, _, folder = v.partition("=")
        out.append((name, folder or name))
    return tuple(out)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--budgets {text!r}: give comma-separated numbers, e.g. 2.5,2.75,3") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME[=FOLDER]",
                   help="a model, in the order they get the GPU (repeat for several)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random decoder")
    p.add_argument("--work", default=".lqplan-study", help="work folder; a rerun resumes (default .lqplan-study)")
    p.add_argument("--out", default="reports/quality-decoder/gpu", help="report folder")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default auto; --tiny: cpu)")
    p.add_argument("--budgets", default=None, help="bits/param, comma-separated (QLoRA's own bits are added)")
    p.add_argument("--objectives", default=None, help=f"some of {','.join(OBJECTIVES)} (default all)")
    p.add_argument("--headline", default=None, help="the objective the claims are judged on (default output)")
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--max-len", int), ("--lr", float),
                       ("--eval-texts", int), ("--seeds", int), ("--key-seeds", int), ("--slots", int),
                       ("--gpu-fraction", float), ("--deadline", float), ("--iters", int), ("--calib-tokens", int),
                       ("--qlora-rank", int), ("--kl-tokens", int)):
        p.add_argument(flag, type=kind, default=None)
    for flag in ("--bits", "--blocks", "--ranks"):
        p.add_argument(flag, default=None, help="the grid (default NF 2,3,4 x 16,32,64,128 x 8,16,32)")
    p.add_argument("--deadline-at", type=float, default=None, metavar="EPOCH",
                   help="the deadline as a Unix time (the device call's own start + its limit)")
    p.add_argument("--no-kl", action="store_true", help="skip KL before fine-tuning (an lqplan without evaluate --plan)")
    args = p.parse_args(argv)
    try:
        models = parse_models(args.model)
        work = Path(args.work)
        if args.tiny:
            models = models or (("tiny", str(save_tiny_decoder(work / "tiny-model"))),)
            s = tiny_settings(models)
        else:
            if not models:
                raise UserError("no model given; pass --model NAME[=FOLDER], e.g. --model smollm2-135m")
            s = StudySettings(models=models)
        over = {k: v for k, v in {
            "budgets": floats(args.budgets) if args.budgets else None,
            "objectives": tuple(args.objectives.split(",")) if args.objectives else None,
            "headline": args.headline, "steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len,
            "lr": args.lr, "eval_texts": args.eval_texts, "seeds": args.seeds, "key_seeds": args.key_seeds,
            "slots": args.slots, "gpu_fraction": args.gpu_fraction, "iters": args.iters,
            "calib_tokens": args.calib_tokens, "qlora_rank": args.qlora_rank, "kl_tokens": args.kl_tokens,
            "bits": args.bits,
            "blocks": args.blocks, "ranks": args.ranks, "device": args.device,
            "deadline_s": (args.deadline_at - time.time()) if args.deadline_at else args.deadline}.items()
            if v is not None}
        if "objectives" in over and "headline" not in over and s.headline not in over["objectives"]:
            over["headline"] = over["objectives"][-1]
        s = replace(s, **over, extra={"kl": not args.no_kl})
        command = "python bench/gpu_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = run_study(s, work, Path(args.out), command=command)
    except UserError as e:
        print(f"gpu_study: error: {e}", file=sys.stderr)
        return 2
    for m in result["models"]:
        print(f"{m['name']}: fp ppl {m['fp_ppl']}, tokenizer {m['tokenizer']['status']}"
              + (f", SKIPPED: {m['skipped']}" if m.get("skipped") else ""))
        for c in m["claims"]:
            print(f"  ({c['id']}) {c['status']}: {c['claim']}")
    print(f"tasks {json.dumps(task_states(result))}, {result['seconds']:.0f} s; report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
