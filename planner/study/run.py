"""The whole study: the environment and the lqplan capabilities it needs, every model's task graph
(planner.study.tasks) run side by side by planner.study.runner under one deadline, then the claims, the table, the
plots, the environment and the archive of every run, written to the output folder."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..fsio import write_json, write_text
from . import calls
from .report import plots, render_md
from .runner import Runner
from .settings import StudySettings
from .tasks import ModelStudy, safe

SCHEMA = "lqplan.gpu-study/1"
def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpus": os.cpu_count(), "device": device}
    for dist in ("peft", "tokenizers", "accelerate", "gguf", "PuLP", "highspy"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:  # noqa: BLE001  (absent: recorded as such)
            env[dist] = None
    if torch.cuda.is_available() and device != "cpu":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    return env


def check_capabilities(s: StudySettings, caps: dict) -> None:
    missing = [o for o in s.objectives if o not in calls.supported_objectives(caps)]
    if missing:
        raise UserError(f"this lqplan has no --objective {', '.join(missing)} (plan's objectives: "
                        f"{', '.join(sorted(calls.supported_objectives(caps)))}); merge the objective branch or pass "
                        f"--objectives without {', '.join(missing)}")
    if s.extra.get("kl", True) and not caps["evaluate_plan"]:
        raise UserError("this lqplan's `evaluate` takes no --plan, so no KL before fine-tuning can be measured; "
                        "merge the evaluate branch, or pass --no-kl")


def run_study(s: StudySettings, work: Path, out: Path, command: str = "", log=None) -> dict:
    t0 = time.monotonic()
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = work / "study.log"
    log_file = open(log_path, "a")

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - t0:6.0f} s] {msg}"
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()
        if log:
            log(line)

    say(f"study: {command}")
    threads = max(1, (os.cpu_count() or 2) // s.slots)
    env = calls.child_env(threads)
    caps = calls.capabilities(env)
    check_capabilities(s, caps)
    device = s.device
    gpu_total = None
    environment_ = environment(device)
    if environment_.get("gpu_memory_gb"):
        gpu_total = environment_["gpu_memory_gb"] * s.gpu_fraction
    say(f"environment: {json.dumps(environment_)}")
    runner = Runner(s.slots, gpu_total, t0 + s.deadline_s, env, calls.REPO, say)
    studies = []
    for i, (name, spec) in enumerate(s.models):
        study = ModelStudy(i, name, spec, s, caps, work / safe(name), work / "cache", runner, say)
        study.start()
        studies.append(study)
    runner.run()
    say(f"tasks: {runner.summary()}")
    models = [st.collect() for st in studies]
    result = {"schema": SCHEMA, "command": command, "settings": {**asdict(s), "extra": dict(s.extra)},
              "environment": environment_, "capabilities": caps, "models": models,
              "tasks": {k: {"state": t.state, "seconds": t.seconds, "reason": t.reason, "argv": t.argv}
                        for k, t in runner.tasks.items()},
              "commands": [" ".join(c["argv"]) for c in runner.commands], "seconds": time.monotonic() - t0}
    write_outputs(result, work, out)
    say(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    log_file.close()
    shutil.copyfile(log_path, out / "study.log")
    return result


def write_outputs(result: dict, work: Path, out: Path) -> None:
    """results.json, study.md, the plots, and runs.tar.gz: every plan, report and log under `work`, with the one
    profile table per objective (each plan folder has a copy; the one beside the plan at QLoRA's bits is kept)."""
    write_json(out / "results.json", result)
    write_text(out / "study.md", render_md(result))
    for name, data in plots(result).items():
        (out / name).write_bytes(data)
    keep = {Path(d) for m in result["models"] for d in m.get("profiles", {}).values()}
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if not path.is_file() or rel.parts[0] == "cache" or path.suffix not in (".json", ".csv", ".log", ".md"):
                continue
            if path.name in ("profile.csv", "profile.json") and path.parent not in keep:
                continue
            tar.add(path, arcname=str(Path("runs") / rel))
