"""Bring the GPU study's inputs onto the device machine in pieces of one call each (planner/study/stage.py and
install.py say how and why), and print the exact device calls.

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

from planner.study import install, stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDY_ARGS = ""


def run_md(manifest: dict, models: list[str], study_args: str, stage_dir: str) -> str:
    calls = stage.run_calls(manifest, models, study_args, stage_dir)
    check = ("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "
             "'import torch, transformers; print(torch.__version__, transformers.__version__)'; ")
    lines = [f"# Device calls for the GPU study ({', '.join(models)})", "",
             f"Made by `python bench/device_stage.py prepare --models {','.join(models)}`: payload "
             f"{manifest['total'] / 1e6:.1f} MB in {len(manifest['pieces'])} pieces of at most "
             f"{manifest['piece_size'] / 1e6:.1f} MB. Make the calls back to back: a warm machine keeps /var/tmp only "
             "about 30 s after a call. Each `put` prints which pieces the machine holds; one that says pieces are "
             "missing means the machine was given back: start again from call 1. A call that runs the study brings "
             "back its report for the models so far; the next model's pieces follow it, and the study call after "
             "them resumes the earlier model where its deadline stopped it.", ""]
    for i, call in enumerate(calls, 1):
        body = {"command": (check if i == 1 else "") + call["command"], "timeout_s": call["timeout_s"]}
        if call["piece"]:
            body["carry"] = [f"{stage_dir}/{stage.MANIFEST}", f"{stage_dir}/{call['piece']}"]
        if len(body["command"]) > 2000:
            raise stage.StageError(f"call {i}: {len(body['command'])} characters, over the device's 2,000")
        title = f"Call {i}: {call['title']}" if i < len(calls) else f"If needed: {call['title']}"
        lines += [f"## {title}", "", "```json", json.dumps(body, indent=1), "```", ""]
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
            print(install.put(piece, Path(args.manifest) if args.manifest else piece.parent / stage.MANIFEST))
        elif args.verb == "install":
            install.install([m for m in args.models.split(",") if m])
        else:
            print(install.status())
    except stage.StageError as e:
        print(f"device_stage: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
