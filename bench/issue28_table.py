"""The table of bench/gpu_issue28.sh: reads what its steps left in WORK (train reports, the QLoRA anchor's JSON, the
HF route's log, the mission's run.json, the step profiles, each step's wall seconds) and writes OUT.md and OUT.json
with each target beside its measurement. Missing pieces (a step that failed or did not run yet) show as "-".

    python bench/issue28_table.py WORK OUT_PREFIX
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.testing.kernels import render  # noqa: E402

MIB = 2**20


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wall(work: Path, name: str) -> float | None:
    try:
        return float((work / "json" / f"{name}.wall").read_text())
    except (OSError, ValueError):
        return None


def _hf(work: Path) -> dict:
    """The HF route's figures from examples/finetune_hf.py's output."""
    try:
        text = (work / "logs" / "hf.log").read_text()
    except OSError:
        return {}
    out = {}
    if m := re.search(r"peak GPU memory: (\d+) MiB allocated, (\d+) MiB reserved", text):
        out["peak_allocated_bytes"], out["peak_reserved_bytes"] = int(m[1]) * MIB, int(m[2]) * MIB
    if m := re.search(r"peak host memory \(max RSS\): (\d+) MiB", text):
        out["host_max_rss_bytes"] = int(m[1]) * MIB
    if m := re.search(r"'train_samples_per_second': ([\d.]+)", text):
        out["samples_per_s"] = float(m[1])
    return out


def _train(report: dict) -> dict:
    if not report:
        return {}
    cuda = report.get("peak_memory_kind") == "cuda_allocated"
    pred = report.get("predicted_memory") or {}
    return {"peak_allocated_bytes": report.get("peak_memory_bytes") if cuda else None,
            "peak_reserved_bytes": report.get("peak_reserved_bytes"),
            "host_max_rss_bytes": report.get("host_max_rss_bytes"), "tokens_per_s": report.get("tokens_per_s"),
            "predicted_bytes": pred.get("peak_bytes"), "predicted_phase": pred.get("peak_phase"),
            "predicted_phases": pred.get("phases")}


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:,.0f}"


def _num(v, fmt="{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def build(work: Path) -> dict:
    rows = {"lqplan train (defaults, reference pass)": {**_train(_json(work / "train-default" / "train_report.json")),
                                                        "wall_s": _wall(work, "train-default")},
            "lqplan train --no-reference": {**_train(_json(work / "train-noref" / "train_report.json")),
                                            "wall_s": _wall(work, "train-noref")},
            "QLoRA: bnb NF4 + dq + PEFT r16": {**{k: v for k, v in _json(work / "json" / "qlora.json").items()
                                                  if k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                           "host_max_rss_bytes", "tokens_per_s")},
                                               "wall_s": _wall(work, "qlora")},
            "HF route: from_pretrained(LqplanConfig) + PEFT + Trainer": {**_hf(work), "wall_s": _wall(work, "hf")}}
    run = _json(work / "mission" / "lqplan-out" / "run.json")
    mission = {"wall_s": _wall(work, "mission"), **run}
    default, noref = rows["lqplan train (defaults, reference pass)"], rows["lqplan train --no-reference"]
    qlora, hf = rows["QLoRA: bnb NF4 + dq + PEFT r16"], rows["HF route: from_pretrained(LqplanConfig) + PEFT + Trainer"]

    def ratio(a, b):
        return None if a is None or not b else a / b

    checks = {
        "default train peak / its prediction (target 0.95-1.05)":
            ratio(default.get("peak_allocated_bytes"), default.get("predicted_bytes")),
        "--no-reference peak / its prediction (target 0.95-1.05)":
            ratio(noref.get("peak_allocated_bytes"), noref.get("predicted_bytes")),
        "HF route host max RSS / lqplan train's (target <= 2)":
            ratio(hf.get("host_max_rss_bytes"), default.get("host_max_rss_bytes")),
        "HF route GPU peak allocated / lqplan train's (was 6,451 / 7,023 MiB)":
            ratio(hf.get("peak_allocated_bytes"), noref.get("peak_allocated_bytes")),
        "lqplan tokens/s / QLoRA's, --no-reference run (target >= 1.3)":
            ratio(noref.get("tokens_per_s"), qlora.get("tokens_per_s")),
        "lqplan tokens/s / QLoRA's, default run (target >= 1.3)":
            ratio(default.get("tokens_per_s"), qlora.get("tokens_per_s")),
        "mission command wall seconds (target <= 120)": mission.get("wall_s"),
    }
    profiles = {"lqplan": _json(work / "json" / "step_profile.json"),
                "qlora": _json(work / "json" / "qlora.json").get("profile") or {}}
    return {"rows": rows, "mission": mission, "checks": checks, "profiles": profiles}


def markdown(result: dict, env: str) -> str:
    lines = ["# Issue 28 on one GPU (bench/gpu_issue28.sh)", "", env.strip(), "",
             "| run | GPU peak allocated MiB | reserved MiB | predicted MiB (phase) | measured / predicted | "
             "host max RSS MiB | tokens/s | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        pred = r.get("predicted_bytes")
        ratio = (f"{r['peak_allocated_bytes'] / pred:.3f}" if pred and r.get("peak_allocated_bytes") else "-")
        phase = f" ({r.get('predicted_phase')})" if pred else ""
        lines.append(f"| {name} | {_mib(r.get('peak_allocated_bytes'))} | {_mib(r.get('peak_reserved_bytes'))} | "
                     f"{_mib(pred)}{phase} | {ratio} | "
                     f"{_mib(r.get('host_max_rss_bytes'))} | {_num(r.get('tokens_per_s'))} | "
                     f"{_num(r.get('wall_s'), '{:.1f}')} |")
    m = result["mission"]
    lines += ["", "Mission command (`lqplan plan --budget B --model M`, fresh folder, fresh digest memo): "
              f"wall {_num(m.get('wall_s'), '{:.1f}')} s; from process start to the end of the reports "
              f"{_num(m.get('seconds_from_process_start'), '{:.1f}')} s. Phases (s): "
              + ", ".join(f"{k[len('phase_'):-len('_seconds')]} {v:.1f}" for k, v in m.items()
                          if k.startswith("phase_")), ""]
    lines += ["| check | value |", "|---|---|"]
    lines += [f"| {k} | {_num(v, '{:.3f}')} |" for k, v in result["checks"].items()]
    for arm, prof in result["profiles"].items():
        if prof.get("per_step_ms"):
            lines += ["", "```", render(prof, f"{arm} step"), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work, prefix = Path(argv[0]), argv[1]
    result = build(work)
    env = (work / "logs" / "env.log").read_text() if (work / "logs" / "env.log").is_file() else ""
    Path(prefix + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(prefix + ".md").write_text(markdown(result, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
