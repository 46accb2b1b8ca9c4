"""Bring the GPU study's inputs onto the device machine in pieces of one call each (planner/study/stage.py says
how and why), and print the exact device calls.

    python bench/device_stage.py prepare --models smollm2-135m,gemma3-270m   # here, in the checkout the calls send
    python3 bench/device_stage.py put .stage/piece-01                        # device: one call per piece
    python3 bench/device_stage.py install --models smollm2-135m,gemma3-270m  # device: the last call, then the study
    python3 bench/device_stage.py status                                     # device: which pieces are there

prepare writes .stage/ (git-ignored): the pieces, manifest.json and RUN.md, the calls in order with their carry
lists. --folder ALIAS=PATH takes a model folder assembled here instead of resolving the alias."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.study import stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDY_ARGS = ""


def run_md(manifest: dict, models: list[str], study_args: str, stage_dir: str) -> str:
    cmds = stage.run_commands(manifest, models, study_args, stage_dir)
    need = stage.pieces_for(manifest, models)
    check = ("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "
             "'import torch, transformers; print(torch.__version__, transformers.__version__)'; ")
    lines = [f"# Device calls for the GPU study ({', '.join(models)})", "",
             f"Made by `python bench/device_stage.py prepare --models {','.join(models)}`; payload "
             f"{manifest['total'] / 1e6:.1f} MB in {len(manifest['pieces'])} pieces of at most "
             f"{manifest['piece_size'] / 1e6:.1f} MB. Make the calls back to back: a warm machine keeps /var/tmp only "
             "about 30 s after a call. Each `put` prints which pieces the machine holds; if one says pieces are "
             "missing, the machine was given back: start again from call 1.", ""]
    for i, (cmd, piece) in enumerate(zip(cmds, need), 1):
        first = check if i == 1 else ""
        last = i == len(cmds)
        call = {"command": first + cmd, "carry": [f"{stage_dir}/{stage.MANIFEST}", f"{stage_dir}/{piece['name']}"],
                "timeout_s": 600 if last else 180}
        if last:
            call["command"] = "T=$(( $(date +%s) + 575 )); " + call["command"] + " --deadline-at $T"
        if len(call["command"]) > 2000:
            raise stage.StageError(f"call {i} is {len(call['command'])} characters, over the device's 2,000")
        lines += [f"## Call {i} of {len(cmds)}" + (": last piece, install, the study" if last else ""), "",
                  "```json", json.dumps(call, indent=1), "```", ""]
    folders = " ".join(f"--model {m}={stage.DEVICE_MODELS}/{m}" for m in models)
    resume = {"command": f"T=$(( $(date +%s) + 575 )); export PYTHONPATH={stage.DEVICE_SITE} PYTHONUNBUFFERED=1; "
                         f"python3 bench/gpu_study.py --device cuda {folders} {study_args} --work /var/tmp/lqstudy "
                         "--out $OUT --deadline-at $T".replace("  ", " "), "timeout_s": 600}
    lines += ["## If the study was cut at its deadline: resume on the same warm machine", "",
              "The same study, same work folder: only what has no output yet runs. Within 30 s of the last call.", "",
              "```json", json.dumps(resume, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--models", default="smollm2-135m,gemma3-270m")
    q.add_argument("--folder", action="append", default=[], metavar="ALIAS=PATH")
    q.add_argument("--stage", default=".stage")
    q.add_argument("--study-args", default=STUDY_ARGS, help="extra gpu_study.py arguments for the last call")
    q = sub.add_parser("put")
    q.add_argument("piece")
    q.add_argument("--manifest", default=None, help="default: manifest.json beside the piece")
    q = sub.add_parser("install")
    q.add_argument("--models", required=True)
    sub.add_parser("status")
    args = p.parse_args(argv)
    try:
        if args.verb == "prepare":
            models = [m for m in args.models.split(",") if m]
            given = dict(f.split("=", 1) for f in args.folder)
            folders = {}
            for m in models:
                if m in given:
                    folders[m] = Path(given[m])
                else:
                    from planner.model.resolve import resolve_model

                    folders[m] = resolve_model(m).folder
            stage_dir = REPO / args.stage
            manifest = stage.prepare(folders, stage_dir, REPO)
            (stage_dir / "RUN.md").write_text(run_md(manifest, models, args.study_args, args.stage))
            print(f"prepared {len(manifest['pieces'])} pieces ({manifest['total'] / 1e6:.1f} MB) in {stage_dir}; "
                  f"the device calls are in {stage_dir / 'RUN.md'}")
        elif args.verb == "put":
            piece = Path(args.piece)
            print(stage.put(piece, Path(args.manifest) if args.manifest else piece.parent / stage.MANIFEST))
        elif args.verb == "install":
            stage.install([m for m in args.models.split(",") if m])
        else:
            print(stage.status())
    except stage.StageError as e:
        print(f"device_stage: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
