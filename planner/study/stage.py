"""Bringing a study's inputs onto the GPU machine, whose calls each carry at most 64 MiB and which keeps /var/tmp only
while it stays warm between quick calls: the CPU side and the payload's format (planner.study.install is the device
side, which checks and installs what this module lays out).

prepare (here, in the checkout that the device calls send): the wheels the device lacks (pinned to the versions
installed here) and each model's small files as assembled here (config, tokenizer, provenance marker: everything
but the weights, whose sha256 is recorded instead) are laid end to end in one payload and cut into pieces that fit
one call beside the working tree. manifest.json names every file's place and sha256 and every assembled file's
sha256; run_calls gives the exact device commands, in order.

This module imports nothing beyond the standard library at its top, so the device's piece calls (which read the
manifest through it) cost seconds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
SCHEMA = "lqplan.device-stage/1"
MiB = 1 << 20
CALL_LIMIT = 64 * MiB  # what one device call may carry, the working tree included
PIECE_CAP = 55 * 10**6  # under the 60 MB the device's notes ask for
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Packages lqplan imports that the device image lacks (its list: /work/.library/device/KINDS.md), as distributions.
DEVICE_DEPS = ("PuLP", "highspy", "gguf")
DEVICE_ROOT = Path("/var/tmp/lqstage")
DEVICE_SITE = Path("/var/tmp/lqsite")
DEVICE_MODELS = Path("/var/tmp/lqmodels")
DEVICE_WORK = Path("/var/tmp/lqstudy")


class StageError(Exception):
    """A stage step that cannot go on: one line naming the problem and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- prepare (the CPU machine) -----------------------------------------------------------------------------------
def tree_bytes(repo: Path) -> int:
    """Bytes of what a device call sends besides `carry`: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                         capture_output=True).stdout
    total = 0
    for name in filter(None, out.split(b"\0")):
        path = repo / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def piece_size(tree: int, manifest_bytes: int) -> int:
    """The largest piece that fits one call beside the tree and the manifest, 1 MiB to spare, at most PIECE_CAP."""
    room = CALL_LIMIT - tree - manifest_bytes - MiB
    if room < 8 * MiB:
        raise StageError(f"the working tree is {tree / MiB:.1f} MiB, leaving {room / MiB:.1f} MiB a call for pieces; "
                         "remove large untracked files from the checkout (or ignore them) and prepare again")
    return min(PIECE_CAP, room)


def installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        raise StageError(f"{dist} is not installed here; install it (the device gets the version installed "
                         "here), then prepare again") from None


def download_wheels(dists: list[str], folder: Path) -> list[Path]:
    """Each distribution's wheel at the version installed here, for the device's Python and platform."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for dist in dists:
        pin = f"{dist}=={installed_version(dist)}"
        norm = dist.lower().replace("-", "_")
        found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(norm + "-")
                 and p.name.split("-")[1] == installed_version(dist)]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", DEVICE_PYTHON, "--implementation", "cp", "-d", str(folder), pin]
            for tag in PLATFORMS:
                cmd[-1:-1] = ["--platform", tag]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(norm + "-")
                     and p.name.split("-")[1] == installed_version(dist)]
            if done.returncode != 0 or not found:
                raise StageError(f"pip download {pin} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        wheels.append(found[0])
    return wheels


def model_parts(alias: str) -> tuple[list[str], list[str], str]:
    """A packaged model's wheels (distribution names), its GGUF as paths relative to the install folder in the
    order they are joined, and the GGUF's sha256, from planner.model.packaged."""
    from importlib.metadata import packages_distributions

    from ..model.packaged import PACKAGED

    if alias not in PACKAGED:
        raise StageError(f"{alias!r} is not a packaged model; use one of {', '.join(PACKAGED)}")
    spec = PACKAGED[alias]
    owners = packages_distributions()
    dists = []
    for package, _ in spec.parts:
        if package not in owners:
            raise StageError(f"{package} is not installed here; run `{spec.install}`, then prepare again")
        dists.append(owners[package][0])
    return dists, [f"{package}/{file}" for package, file in spec.parts], spec.sha256


def model_files(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file of an assembled model folder."""
    return {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file()}


def meta_archive(folder: Path) -> bytes:
    """The folder's files except the weights, as a deterministic tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix != ".safetensors":
                info = tarfile.TarInfo(p.name)
                info.size, info.mode, info.mtime = p.stat().st_size, 0o644, 0
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    return buf.getvalue()


def prepare(models: dict[str, Path], stage: Path, repo: Path) -> dict:
    """models: alias -> the folder assembled here. Writes stage/piece-NN, stage/manifest.json, stage/RUN.md."""
    stage.mkdir(parents=True, exist_ok=True)
    wheels_dir = stage / "wheels"
    entries = []  # (name, path, kind, model)
    for w in download_wheels(list(DEVICE_DEPS), wheels_dir):
        entries.append((w.name, w, "wheel", None))
    record = {}
    for alias, folder in models.items():
        dists, gguf, gguf_sha256 = model_parts(alias)
        folder = Path(folder)
        if not any(folder.glob("*.safetensors")):
            raise StageError(f"{folder} holds no *.safetensors; assemble {alias} here first (lqplan plan --model "
                             f"{alias} does), then prepare again")
        meta = stage / f"{alias}-meta.tar.xz"
        write_atomic(meta, meta_archive(folder))
        entries.append((meta.name, meta, "meta", alias))
        record[alias] = {"files": model_files(folder), "gguf": gguf, "gguf_sha256": gguf_sha256,
                         "architecture": json.loads((folder / "config.json").read_text())["architectures"][0]}
        for w in download_wheels(dists, wheels_dir):
            entries.append((w.name, w, "wheel", alias))

    manifest = {"schema": SCHEMA, "models": record,
                "versions": {d: installed_version(d) for d in ("transformers", "torch")}}
    files = [{"name": name, "size": path.stat().st_size, "kind": kind, "model": model}
             for name, path, kind, model in entries]
    room = len(json.dumps(manifest)) + 400 * len(files) + 200 * (sum(f["size"] for f in files) // (8 * MiB) + 2)
    manifest.update(lay_out([path for _, path, _, _ in entries], files, stage, piece_size(tree_bytes(repo), room)))
    write_atomic(stage / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def lay_out(paths: list[Path], files: list[dict], stage: Path, size: int) -> dict:
    """The files laid end to end and cut into stage/piece-NN of `size` bytes: {"files" (each with its offset and
    sha256), "pieces", "total", "piece_size"}."""
    offset = 0
    for f, path in zip(files, paths):
        f.update(offset=offset, sha256=sha256_file(path))
        offset += f["size"]
    total = offset
    for old in stage.glob("piece-*"):
        old.unlink()
    pieces, start, reader = [], 0, _Concat(paths)
    while start < total:
        data = reader.read(start, min(size, total - start))
        name = f"piece-{len(pieces) + 1:02d}"
        write_atomic(stage / name, data)
        pieces.append({"name": name, "offset": start, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        start += len(data)
    return {"files": files, "pieces": pieces, "total": total, "piece_size": size}


class _Concat:
    """Byte ranges of files laid end to end."""

    def __init__(self, paths: list[Path]):
        self.spans, at = [], 0
        for p in paths:
            n = Path(p).stat().st_size
            self.spans.append((at, n, Path(p)))
            at += n

    def read(self, start: int, length: int) -> bytes:
        out = bytearray()
        for at, n, path in self.spans:
            lo, hi = max(start, at), min(start + length, at + n)
            if lo < hi:
                with open(path, "rb") as f:
                    f.seek(lo - at)
                    out += f.read(hi - lo)
        return bytes(out)


def read_manifest(path: Path) -> dict:
    """The stage manifest; every piece and file name it gives must be a plain name (it is joined to a folder here)."""
    manifest = json.loads(Path(path).read_text())
    for entry in (*manifest["pieces"], *manifest["files"]):
        if Path(entry["name"]).name != entry["name"] or entry["name"] in ("", ".", ".."):
            raise StageError(f"{path} names {entry['name'][:80]!r}, not a file name inside the stage; prepare again")
    return manifest


def pieces_for(manifest: dict, models: list[str]) -> list[dict]:
    """The pieces that hold the deps and these models' files."""
    want = [f for f in manifest["files"] if f["model"] is None or f["model"] in models]
    return [p for p in manifest["pieces"]
            if any(f["offset"] < p["offset"] + p["size"] and p["offset"] < f["offset"] + f["size"] for f in want)]


# ---- the device commands -----------------------------------------------------------------------------------------
def study_command(models: list[str], study_args: str) -> str:
    """The study on the device: the staged folders, the work folder under /var/tmp (a rerun resumes there), the
    deadline $T set by the call (its start + 575 s of the 600 s limit)."""
    folders = " ".join(f"--model {m}={DEVICE_MODELS}/{m}" for m in models)
    extra = f" {study_args.strip()}" if study_args.strip() else ""
    return (f"python3 bench/gpu_study.py --device cuda {folders} --work {DEVICE_WORK}{extra} --out $OUT "
            "--deadline-at $T")


def run_calls(manifest: dict, models: list[str], study_args: str, stage: str = ".stage") -> list[dict]:
    """The device `run` calls in order, as {"title", "command", "piece" (carried, or None), "timeout_s"}: for each
    model in turn the pieces it still needs, the last of them also installing it and running the study on the
    models so far (the work folder is kept, so the study resumes what an earlier call finished or left); then the
    resume call."""
    put = "python3 bench/device_stage.py put"
    start = f"T=$(( $(date +%s) + 575 )); export PYTHONPATH={DEVICE_SITE} PYTHONUNBUFFERED=1; "
    calls, sent = [], set()
    for k, model in enumerate(models):
        need = [p for p in pieces_for(manifest, [model]) if p["name"] not in sent]
        sent |= {p["name"] for p in need}
        for p in need[:-1]:
            calls.append({"title": f"piece {p['name']} ({model})", "command": f"{put} {stage}/{p['name']}",
                          "piece": p["name"], "timeout_s": 180})
        last = f"{put} {stage}/{need[-1]['name']} && " if need else ""
        calls.append({"title": f"{need[-1]['name'] + ', ' if need else ''}install {model}, the study on "
                               f"{', '.join(models[:k + 1])}",
                      "command": f"{start}{last}python3 bench/device_stage.py install --models {model} && "
                                 f"{study_command(models[:k + 1], study_args)}",
                      "piece": need[-1]["name"] if need else None, "timeout_s": 600})
    calls.append({"title": f"resume the study on {', '.join(models)} if its deadline cut it",
                  "command": start + study_command(models, study_args), "piece": None, "timeout_s": 600})
    return calls
