"""The quantized folder's manifest (lqplan_manifest.json): its schema, and the checks that a folder's parts belong
together (each file the one the manifest was written with, the plan the one its layers were made from)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..fsio import DOC_CAP, check_regular, read_json
from ..model.digests import file_digests
from ..plan.document import Plan
from ..schema import ANY, BOOL, INT, NUM, STR, list_of, map_of, optional, problem, show

MANIFEST = "lqplan_manifest.json"
SCHEMA = "lqplan.quantized/1"
WEIGHTS = "model.safetensors"

_LAYER_SPEC = {"config": map_of(ANY), "shape": list_of(INT), "method?": optional(STR), "rank": INT, "alpha": NUM,
               "dropout": NUM, "bias?": BOOL, "adapter_dtype?": optional(STR)}
MANIFEST_SPEC = {"schema": STR, "architecture": STR, "weights": STR, "aliases": map_of(STR),
                 "layers": map_of(_LAYER_SPEC), "files?": map_of(STR)}
RESAVE = "re-save the model with `lqplan train` (or save_quantized)"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{folder} is not an lqplan quantized folder (no {MANIFEST}); write one with save_quantized")
    manifest = read_json(path, f"cannot read it; {RESAVE}")
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != SCHEMA:
        raise UserError(f"{path} has schema {show(schema)}, this lqplan reads {SCHEMA!r}; re-save it")
    found = problem(manifest, MANIFEST_SPEC, MANIFEST)
    if found:
        raise UserError(f"{path} is malformed: {found}; {RESAVE}")
    for name in (manifest["weights"], *manifest.get("files", {})):
        # a name from a document never leads outside the folder
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{path} names the file {name[:80]!r}, which is not a file name inside {folder}; "
                            f"{RESAVE}")
    return manifest


def check_parts(folder: Path, manifest: dict, plan: Plan) -> None:
    """The folder's parts belong together: each file is the one the manifest was written with (digest), and the plan
    is the one its quantized layers were made from (folders saved before the digests: the layers alone)."""
    files = manifest.get("files") or {}
    for name in (manifest["weights"], *files):
        if not (folder / name).exists():
            raise UserError(f"{folder} lacks {name} (an incomplete folder); {RESAVE}")
        check_regular(folder / name, RESAVE, cap=None if name == manifest["weights"] else DOC_CAP)
    if files:
        names = list(files)
        for name, digest in zip(names, file_digests([folder / n for n in names])):
            if digest != files[name]:
                raise UserError(f"{folder / name} is not the file {MANIFEST} was written with (files of two saves "
                                f"mixed, or edited); {RESAVE}")
    layers = manifest["layers"]
    for e in plan.matrices:  # ranks may differ: a packed base (export_peft) keeps the plan but not the adapters
        info = layers.get(e.name)
        if info is None or list(info["shape"]) != list(e.shape) or info["config"] != e.point.config.to_dict():
            raise UserError(f"the plan.json in {folder} is not the plan its quantized layers were made from (matrix "
                            f"{e.name} differs); {RESAVE}")
