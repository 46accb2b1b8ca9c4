"""Is the planner's error the right proxy? On one real decoder, on the CPU: per objective (data-free, diagonal
Fisher, output-aware) a plan at each budget and every uniform configuration of the grid decomposed the same way,
each scored with `lqplan evaluate --plan` (KL(fp ‖ quantized) before fine-tuning); Spearman ρ between the predicted
total error and the measured KL per objective, and KL at equal bits against every uniform configuration that fits.

    OMP_NUM_THREADS=1 python bench/proxy_study.py --model smollm2-135m --work .lqplan-proxy/smollm2 \
        --out reports/quality-decoder/proxy

Every step is an `lqplan` process (planner.study.calls); a rerun with the same --work resumes, and the report
(OUT/proxy-MODEL.json and .md) is rewritten after every evaluation, so a run cut short reports what it measured.
Order: the plans of every objective, then the uniform configurations, blocks of 64 first."""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..fsio import write_json, write_text
from ..model.discover import discover_matrices, planned_params
from ..model.resolve import resolve_model
from ..plan.document import Plan
from ..profile.grid import make_grid
from ..profile.table import read_profile_csv
from . import calls
from .arms import predicted_error, uniform_plan
from .claims import spearman
from .settings import OBJECTIVES, StudySettings
from .tokens import known_answer


@dataclass(frozen=True)
class ProxySettings:
    budgets: tuple[float, ...] = (2.5, 2.75, 3.0, 3.5, 4.127)
    objectives: tuple[str, ...] = OBJECTIVES
    bits: str = "2,3,4"
    blocks: str = "64,128"
    ranks: str = "8"
    iters: int = 5
    calib_tokens: int = 8192
    kl_tokens: int = 2048
    stride: int = 512


def run(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=calls.child_env(1), cwd=calls.REPO)
    if done.returncode != 0:
        raise UserError(f"{' '.join(argv[2:5])}… failed (exit {done.returncode}); see {log}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an alias (smollm2-135m, gemma3-270m) or a folder")
    p.add_argument("--work", required=True, help="work folder; a rerun resumes")
    p.add_argument("--out", default="reports/quality-decoder/proxy")
    p.add_argument("--budgets", default=None)
    p.add_argument("--objectives", default=None)
    p.add_argument("--kl-tokens", type=int, default=None)
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report from the plans and evaluations already in --work")
    args = p.parse_args(argv)
    s = ProxySettings()
    if args.budgets:
        s = replace(s, budgets=tuple(float(x) for x in args.budgets.split(",")))
    if args.objectives:
        s = replace(s, objectives=tuple(args.objectives.split(",")))
    if args.kl_tokens:
        s = replace(s, kl_tokens=args.kl_tokens)
    command = "OMP_NUM_THREADS=1 python bench/proxy_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    work, out = Path(args.work).resolve(), Path(args.out)
    cache = work / "cache"
    source = resolve_model(args.model)
    matrices = discover_matrices(source)
    name = args.model.replace("/", "_")
    token_check = known_answer(args.model, source.folder)
    study = StudySettings(models=((name, args.model),), bits=s.bits, blocks=s.blocks, ranks=s.ranks, iters=s.iters,
                          qlora_rank=int(s.ranks.split(",")[0]),
                          calib_tokens=s.calib_tokens, kl_tokens=s.kl_tokens, device="cpu")
    caps = calls.capabilities(calls.child_env(1))
    t0 = time.time()
    rows: list[dict] = []
    tables: dict = {}

    def evaluate(row: dict) -> None:
        folder = work / "kl" / row["id"].replace(":", "-").replace("/", "_")
        if not (folder / calls.EVALUATE_FILE).is_file():
            if args.report_only:
                return
            argv_ = calls.evaluate_argv(Path(row["plan"]), study, caps, folder, cache)
            run([*argv_, "--stride", str(s.stride)], folder / "task.log")
        row.update(calls.read_evaluate(folder))
        report(source, matrices, s, rows, token_check, command, out, name, time.time() - t0)

    # Plans: the first budget profiles the grid, the others reuse the cached profile.
    for obj in s.objectives:
        for b in s.budgets:
            folder = work / "plans" / f"{obj}-{b}"
            if not (folder / "plan.json").is_file():
                if args.report_only:
                    continue
                run(calls.plan_argv(str(source.folder), obj, b, study, caps, folder, cache), folder / "task.log")
            tables.setdefault(obj, read_profile_csv(folder / "profile.csv"))
            plan = Plan.load(folder / "plan.json")
            choice = {e.name: e.point.label for e in plan.matrices}
            same = next((r for r in rows if r["objective"] == obj and r["choice"] == choice), None)
            row = {"id": f"{obj}@{b}", "kind": "plan", "objective": obj, "budget": b, "plan": str(folder / "plan.json"),
                   "bits_per_param": plan.totals["bits_per_param"], "choice": choice,
                   "predicted": predicted_error(tables[obj], choice, False), "same_as": same and same["id"]}
            rows.append(row)
    for row in [r for r in rows if not r["same_as"]]:
        evaluate(row)
    for r in rows:
        if r["same_as"]:
            r.update({k: v for k, v in next(x for x in rows if x["id"] == r["same_as"]).items()
                      if k in ("kl", "ppl", "fp_ppl", "tokens", "top1_agreement", "tokenizer")})
    # Uniform configurations, decomposed as each objective decomposes (its plan's method names its weights).
    points = [q for q in make_grid(s.bits, s.blocks, s.ranks)
              if q.rank > 0 and all(q.applies_to(m.shape) and q.rank <= min(m.shape) for m in matrices)]
    for obj in [o for o in s.objectives if o in tables]:
        first = next(r for r in rows if r["objective"] == obj)
        method = json.loads(Path(first["plan"]).read_text())["method"]
        for q in points:
            path = work / "plans" / f"uniform-{obj}-{q.label.replace('/', '_')}" / "plan.json"
            if not path.is_file():
                uniform_plan(source, matrices, tables[obj], q, {**method, "arm": "uniform"}).save(path)
            plan = Plan.load(path)
            choice = {m.name: q.label for m in matrices}
            rows.append({"id": f"uniform:{obj}:{q.label}", "kind": "uniform", "objective": obj, "budget": None,
                         "label": q.label, "plan": str(path), "bits_per_param": plan.totals["bits_per_param"],
                         "choice": choice, "predicted": predicted_error(tables[obj], choice, False), "same_as": None})
    # the smallest blocks first across objectives, so a run cut short has every objective's coarsest comparison
    block = {q.label: q.config.blocksize for q in points}
    for row in sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: (block[r["label"]],
                                                                                   s.objectives.index(r["objective"]))):
        evaluate(row)
    report(source, matrices, s, rows, token_check, command, out, name, time.time() - t0)
    print(f"proxy_study: {name} done in {time.time() - t0:.0f} s; {out}/proxy-{name}.md")
    return 0


def report(source, matrices, s: ProxySettings, rows, token_check, command, out: Path, name: str, seconds: float):
    import torch
    import transformers

    summary = summarize(rows, s.objectives, s.budgets)
    result = {"schema": "lqplan.proxy-study/1", "command": command, "model": name, "fingerprint": source.fingerprint,
              "tokenizer": token_check, "planned_params": planned_params(matrices), "settings": s.__dict__,
              "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), 1 thread per process",
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "seconds": round(seconds), **summary,
              "rows": [{k: v for k, v in r.items() if k != "choice"} for r in rows]}
    write_json(out / f"proxy-{name}.json", result)
    write_text(out / f"proxy-{name}.md", render(result))


def summarize(rows: list[dict], objectives, budgets) -> dict:
    """Spearman ρ(predicted, KL) per objective over its distinct measured plans; the pairs each objective orders
    against the measured KL; per budget, each objective's plan KL beside the best uniform configuration that fits."""
    measured = [r for r in rows if isinstance(r.get("kl"), float) and not r.get("same_as")]
    rho, counts, misranked = {}, {}, {}
    for obj in objectives:
        mine = [r for r in measured if r["objective"] == obj]
        rho[obj] = spearman([r["predicted"] for r in mine], [r["kl"] for r in mine])
        counts[obj] = len(mine)
        misranked[obj] = [[a["id"], b["id"]] for i, a in enumerate(mine) for b in mine[i + 1:]
                          if (a["predicted"] - b["predicted"]) * (a["kl"] - b["kl"]) < 0]
    best = max((o for o in rho if rho[o] is not None), key=lambda o: rho[o], default=None)
    equal = []
    for b in budgets:
        plans = {r["objective"]: r for r in rows if r["kind"] == "plan" and r["budget"] == b
                 and isinstance(r.get("kl"), float)}
        fits = sorted((r for r in measured if r["kind"] == "uniform" and r["bits_per_param"] <= b),
                      key=lambda r: r["kl"])
        equal.append({"budget": b, "plans": {o: {"kl": r["kl"], "bits_per_param": r["bits_per_param"]}
                                             for o, r in plans.items()},
                      "best_uniform": fits[0]["id"] if fits else None,
                      "best_uniform_kl": fits[0]["kl"] if fits else None, "uniform_fitting": len(fits)})
    return {"spearman": rho, "points_per_objective": counts, "misranked": misranked, "best_objective": best,
            "equal_bits": equal}


def fmt(x, spec=".3f") -> str:
    return "—" if not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(r: dict) -> str:
    lines = [f"# Predicted error against measured KL: {r['model']}", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}; {r['versions']}  ",
             f"Model fingerprint `{r['fingerprint']}`, tokenizer digest `{r['tokenizer'].get('digest')}` "
             f"(known answer: {r['tokenizer'].get('status')}); {r['planned_params']:,} planned parameters.  ",
             f"Grid NF {r['settings']['bits']} × blocks {r['settings']['blocks']} × ranks {r['settings']['ranks']}, "
             f"LoftQ iterations {r['settings']['iters']}; KL on the first {r['settings']['kl_tokens']} held-out "
             f"pydoc tokens, BOS-first windows of 512 (stride {r['settings']['stride']}); the last invocation took "
             f"{r['seconds']} s.", "",
             "## Spearman ρ(predicted total error, measured KL) per objective", "",
             "| objective | plans scored | ρ |", "|---|---|---|"]
    for obj, rho in r["spearman"].items():
        lines.append(f"| {obj} | {r['points_per_objective'][obj]} | {fmt(rho)} |")
    for obj, pairs in r.get("misranked", {}).items():
        if pairs:
            lines.append(f"\n{obj}: {len(pairs)} pair(s) ordered against the measured KL: "
                         + "; ".join(f"{a} vs {b}" for a, b in pairs[:8]) + (" …" if len(pairs) > 8 else ""))
    lines += ["", "## KL at equal bits (plans against every uniform configuration that fits)", "",
              "| budget | " + " | ".join(f"{o} plan KL (bits)" for o in r["spearman"]) +
              " | best uniform that fits | its KL | uniform fitting |",
              "|---|" + "---|" * (len(r["spearman"]) + 3)]
    for e in r["equal_bits"]:
        cells = [f"{fmt(e['plans'][o]['kl'])} ({e['plans'][o]['bits_per_param']:.3f})" if o in e["plans"] else "—"
                 for o in r["spearman"]]
        lines.append(f"| {e['budget']} | " + " | ".join(cells) + f" | {e['best_uniform'] or '—'} | "
                     f"{fmt(e['best_uniform_kl'])} | {e['uniform_fitting']} |")
    lines += ["", "## Every plan", "", "| id | bits/param | predicted error | KL | ppl (fp) | top-1 agreement |",
              "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['id']}{' = ' + row['same_as'] if row.get('same_as') else ''} | "
                     f"{row['bits_per_param']:.3f} | {row['predicted']:.4g} | {fmt(row.get('kl'))} | "
                     f"{fmt(row.get('ppl'), '.2f')} ({fmt(row.get('fp_ppl'), '.2f')}) | "
                     f"{fmt(row.get('top1_agreement'))} |")
    return "\n".join(lines) + "\n"
