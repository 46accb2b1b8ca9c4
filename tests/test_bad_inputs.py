"""The bad-input catalogue (issue 8): every case goes through the real CLI and must answer with exit code 2, exactly
one line on stderr ("lqplan: error: ..." naming the problem and the fix) and nothing written or overwritten in the
output folder. Most cases use a tiny 2-layer BERT saved in a temp folder, so each costs well under a second."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file, save_file

from planner import cli, fsio
from planner.profile.grid import make_grid

GRID = ["--bits", "4", "--blocks", "64", "--ranks", "0,4", "--iters", "1"]
PREVIOUS = b'{"previous": "plan"}\n'  # a plan.json from an earlier run: no failing command may touch it


def _save_tiny_bert(folder: Path, seed: int) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a second one of the same architecture with other weights, a valid plan of the first and a
    profile of the second; the shared cache already holds the first model's profile for GRID."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny, other = root / "tiny", root / "other"
    _save_tiny_bert(tiny, 0)
    _save_tiny_bert(other, 1)
    cache = root / "cache"
    base = ["--iters", "1", "--quiet", "--cache", str(cache)]
    assert cli.main(["plan", "--budget", "8bits", "--model", str(tiny), "--out", str(root / "plan"), "--no-report",
                     *GRID, *base]) == 0
    assert cli.main(["profile", "--model", str(other), "--out", str(root / "other-profile"), *GRID, *base]) == 0
    return {"root": root, "tiny": tiny, "other": other, "cache": cache, "plan": root / "plan" / "plan.json",
            "other_profile": root / "other-profile" / "profile.csv"}


@dataclass
class Ctx:
    """What one case builds its command line from: fresh folders in tmp_path, the module's models and plan."""
    tmp: Path
    env: dict

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def plan(self, *args: str, model: str | None = None, cache: str | None = None) -> list[str]:
        """`lqplan plan` on the tiny model with GRID and a feasible budget; args come last and so override."""
        budget = [] if any(a.startswith("--budget") for a in args) else ["--budget", "8bits"]
        return ["plan", *budget, "--model", model or str(self.env["tiny"]), *GRID, "--quiet", "--out", str(self.out),
                "--cache", cache or str(self.tmp / "cache"), *args]

    def variant(self, mutate) -> str:
        """A copy of the tiny model, changed by mutate(folder)."""
        folder = self.tmp / "model"
        shutil.copytree(self.env["tiny"], folder)
        mutate(folder)
        return str(folder)

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def plan_copy(self, edit=None) -> str:
        """The valid plan, copied (with its profile) into a folder of its own, optionally edited as a dict."""
        folder = self.tmp / "planfolder"
        shutil.copytree(self.env["plan"].parent, folder)
        if edit is not None:
            d = json.loads((folder / "plan.json").read_text())
            edit(d)
            (folder / "plan.json").write_text(json.dumps(d))
        return str(folder / "plan.json")


# ---- model mutations -------------------------------------------------------------------------------------------

def _edit_config(**changes):
    def mutate(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return mutate


def _edit_tensor(key: str, change):
    def mutate(folder: Path):
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(path), metadata={"format": "pt"})
    return mutate


def _set(index, value):
    def change(t):
        t = t.clone()
        t[index] = value
        return t
    return change


def _truncate(folder: Path):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(folder: Path):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def _only_bin(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickled weights")


def _missing_shard(folder: Path):
    keys = list(load_file(str(folder / "model.safetensors")))
    weight_map = {k: "model.safetensors" for k in keys}
    weight_map[keys[-1]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


Q0 = "encoder.layer.0.attention.self.query.weight"
OUT1 = "encoder.layer.1.output.dense.weight"


TINY_SHAPES = [(64, 64)] * 8 + [(128, 64), (64, 128)] * 2  # 2 layers: q, k, v, o, intermediate, output


def _min_plan_bits() -> int:
    # Every matrix of the tiny model at its cheapest GRID point: the smallest feasible plan.
    return sum(min(p.bits(s) for p in make_grid("4", "64", "0,4")) for s in TINY_SHAPES)


def _min_bits_per_param() -> str:
    return f"{_min_plan_bits() / sum(m * n for m, n in TINY_SHAPES):.6f}"  # as the message prints it


def _break_tie(doc: dict) -> None:
    """Record a qkv tie in the plan and give layer 0's key the grid's other rank (bytes and totals kept exact)."""
    from planner.plan.document import PlanEntry

    doc["method"]["tie"] = ["qkv"]
    key = next(m for m in doc["matrices"] if m["name"].endswith("layer.0.attention.self.key"))
    old = key["bytes"]
    key["rank"] = 4 - key["rank"]
    key["bytes"] = PlanEntry.from_dict(key).point.bits(tuple(key["shape"])) // 8
    doc["totals"]["bytes"] += key["bytes"] - old
    doc["totals"]["bits"] = 8 * doc["totals"]["bytes"]


def _fail_disk_write(monkeypatch):
    # A full disk as the atomic writer meets it: part of the temp file is written, then ENOSPC.
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(fsio.TEMP_SUFFIX):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fsio.os, "fsync", fsync)


# ---- the catalogue: id -> (argv builder, setup(monkeypatch) or None, words the line must contain) ---------------

CASES = {
    # budgets
    "budget-malformed": (lambda c: c.plan("--budget", "abc"), None,
                         ["'abc' is not a number", "e.g. --budget 2.75bits"]),
    "budget-zero": (lambda c: c.plan("--budget", "0bits"), None, ["must be greater than zero", "e.g. --budget"]),
    "budget-negative": (lambda c: c.plan("--budget=-2bits"), None, ["must be greater than zero", "e.g. --budget"]),
    "budget-negative-unattached": (lambda c: c.plan("--budget", "-2bits"), None,
                                   ["--budget: expected one argument", "--budget=VALUE"]),
    "budget-no-unit": (lambda c: c.plan("--budget", "2.75"), None, ["has no unit", "write 2.75bits or 2.75GB"]),
    "budget-unknown-unit": (lambda c: c.plan("--budget", "3furlongs"), None, ["unknown unit 'furlongs'", "use one of"]),
    "budget-nan": (lambda c: c.plan("--budget", "nanbits"), None, ["not a finite number", "e.g. --budget"]),
    "time-limit-negative": (lambda c: c.plan("--budget", "2.75bits", "--time-limit=-3"), None,
                            ["--time-limit", "a number >= 0"]),
    "budget-ambiguous-b": (lambda c: c.plan("--budget", "3b"), None, ["ambiguous", "write 3B for bytes"]),
    "budget-infeasible-ranks": (lambda c: c.plan("--budget", "8bits", "--ranks", "100"), None,
                                ["below the smallest possible plan", "at least", "lower --ranks"]),
    "budget-infeasible-bits": (lambda c: c.plan("--budget", "4bits", cache=str(c.env["cache"])), None,
                               ["below the smallest possible plan", "at least", _min_bits_per_param()]),
    "budget-infeasible-bytes": (lambda c: c.plan("--budget", "90kB", cache=str(c.env["cache"])), None,
                                ["below the smallest possible plan", "at least", f"{_min_plan_bits() // 8:,}"]),
    "budget-used-by-unplanned": (lambda c: c.plan("--budget", "1kB"), None,
                                 ["used up by the unplanned tensors", "raise the budget"]),
    # models
    "model-unknown-alias": (lambda c: c.plan(model="llama9-1b"), None, ["'llama9-1b' is neither", "known alias"]),
    "model-alias-not-cached": (lambda c: c.plan(model="llama2-7b"),
                               lambda mp, c: mp.setenv("HF_HUB_CACHE", str(c.tmp / "empty-hub")),
                               ["not in the local Hugging Face cache", "`hf download"]),
    "model-missing-folder": (lambda c: c.plan(model=str(c.tmp / "no" / "such" / "model")), None,
                             ["neither an existing folder", "--model /path/to/hf-folder"]),
    "model-is-a-file": (lambda c: c.plan(model=c.file("weights.txt", b"x")), None, ["is a file", "pass the folder"]),
    "model-no-safetensors": (lambda c: c.plan(model=c.variant(lambda f: (f / "model.safetensors").unlink())), None,
                             ["has no *.safetensors weights", "save_pretrained"]),
    "model-only-pytorch-bin": (lambda c: c.plan(model=c.variant(_only_bin)), None,
                               ["it has pytorch_model.bin", "safe_serialization=True"]),
    "model-missing-shard": (lambda c: c.plan(model=c.variant(_missing_shard)), None,
                            ["lacks shard(s) model-00002-of-00002.safetensors", "re-download"]),
    "safetensors-truncated": (lambda c: c.plan(model=c.variant(_truncate)), None, ["is truncated", "re-download"]),
    "safetensors-corrupt-header": (lambda c: c.plan(model=c.variant(_corrupt_header)), None,
                                   ["unreadable safetensors header", "re-download"]),
    "safetensors-too-short": (lambda c: c.plan(model=c.variant(
        lambda f: (f / "model.safetensors").write_bytes(b"abc"))), None, ["not a safetensors file", "re-download"]),
    "config-hidden-size": (lambda c: c.plan(model=c.variant(_edit_config(hidden_size=96))), None,
                           ["disagrees with the weights", "[96, 96]", "use the config.json that was saved"]),
    "config-extra-layer": (lambda c: c.plan(model=c.variant(_edit_config(num_hidden_layers=3))), None,
                           ["num_hidden_layers=3 but the weights hold 2 layer blocks",
                            "use the config.json that was saved"]),
    "config-missing": (lambda c: c.plan(model=c.variant(lambda f: (f / "config.json").unlink())), None,
                       ["has no config.json", "copy the model's config.json"]),
    "config-malformed": (lambda c: c.plan(model=c.variant(lambda f: (f / "config.json").write_text("{oops"))), None,
                         ["config.json is not valid JSON", "restore the model's config.json"]),
    "config-already-quantized": (lambda c: c.plan(model=c.variant(_edit_config(
        quantization_config={"quant_method": "bitsandbytes"}))), None,
        ["already quantized (bitsandbytes)", "original 16/32-bit checkpoint"]),
    "weights-nan": (lambda c: c.plan(model=c.variant(_edit_tensor(Q0, _set((3, 5), float("nan"))))), None,
                    ["encoder.layer.0.attention.self.query", "contains NaN or Inf (NaN found)", "re-download"]),
    "weights-inf": (lambda c: c.plan(model=c.variant(_edit_tensor(OUT1, _set((0, 0), float("-inf"))))), None,
                    ["encoder.layer.1.output.dense", "contains NaN or Inf (Inf found)", "re-download"]),
    "weights-integer": (lambda c: c.plan(model=c.variant(_edit_tensor(Q0, lambda t: t.to(torch.int8)))), None,
                        ["stored as I8, not floating point", "original 16/32-bit checkpoint"]),
    # calibration text
    "calib-empty": (lambda c: c.plan("--calib", c.file("calib.txt", b"")), None, ["has no text", "a few sentences"]),
    "calib-binary": (lambda c: c.plan("--calib", c.file("calib.txt", bytes(range(256)) * 8)), None,
                     ["looks binary", "plain UTF-8 text"]),
    "calib-not-utf8": (lambda c: c.plan("--calib", c.file("calib.txt", "café au lait. ".encode("latin-1") * 40)),
                       None, ["is not UTF-8 (byte 3)", "iconv"]),
    "calib-missing": (lambda c: c.plan("--calib", str(c.tmp / "nope.txt")), None,
                      ["does not exist", "UTF-8 text file"]),
    "calib-folder": (lambda c: c.plan("--calib", str(c.tmp)), None, ["is a folder", "one UTF-8 text file"]),
    "calib-tokens-zero": (lambda c: c.plan("--calib-tokens", "0"), None, ["must be positive", "e.g. 16384"]),
    # grid and decomposition
    "grid-bits-unsupported": (lambda c: c.plan("--bits", "5"), None, ["bits=5 is not supported", "use one of"]),
    "grid-bits-not-integers": (lambda c: c.plan("--bits", "four"), None,
                               ["'four' is not a comma-separated list", "e.g. --bits 2,3,4"]),
    "grid-block-unsupported": (lambda c: c.plan("--blocks", "48"), None,
                               ["blocksize=48 is not supported", "use one of"]),
    "grid-block-zero": (lambda c: c.plan("--blocks", "0"), None, ["blocksize=0 is not supported", "use one of"]),
    "grid-rank-negative": (lambda c: c.plan("--ranks", "-4"), None, ["contains -4", "must be >= 0"]),
    "grid-ranks-empty": (lambda c: c.plan("--ranks", ","), None, ["--ranks is empty", "e.g. --ranks 4"]),
    "grid-rank-larger-than-matrix": (lambda c: c.plan("--ranks", "100", "--budget", "64bits"), None,
                                     ["rank 100 is larger than matrix", "(64)", "lower --ranks"]),
    "tie-unknown": (lambda c: c.plan("--tie", "qkv,qvk"), None, ["--tie 'qkv,qvk': 'qvk' is not a fused group",
                                                                 "use qkv, gate_up"]),
    "tie-empty": (lambda c: c.plan("--tie="), None, ["--tie names no group", "use qkv, gate_up"]),
    "iters-negative": (lambda c: c.plan("--iters", "-1"), None, ["--iters -1 is negative", "use 0"]),
    "iters-not-integer": (lambda c: c.plan("--iters", "x"), None, ["invalid int value: 'x'", "--help"]),
    "grid-shape": (lambda c: ["grid", "--shape", "12by4"], None, ["'12by4' is not MxN", "e.g. 5120x13824"]),
    # plan documents (lqplan report)
    "plan-malformed-json": (lambda c: ["report", "--plan", c.file("plan.json", b'{"schema": "lqplan.plan/1",'),
                                       "--out", str(c.out)], None, ["is not valid JSON", "re-create it"]),
    "plan-other-schema": (lambda c: ["report", "--plan", c.plan_copy(lambda d: d.update(schema="lqplan.plan/2")),
                                     "--out", str(c.out)], None, ["'lqplan.plan/2' is not supported", "re-plan"]),
    "plan-not-an-object": (lambda c: ["report", "--plan", c.file("plan.json", b"[1, 2]"), "--out", str(c.out)],
                           None, ["not a JSON object", "plan.json written by `lqplan plan`"]),
    "plan-missing": (lambda c: ["report", "--plan", str(c.tmp / "none.json"), "--out", str(c.out)], None,
                     ["does not exist", "lqplan plan"]),
    "plan-bad-entry": (lambda c: ["report", "--plan", c.plan_copy(lambda d: d["matrices"][0].update(bits=5)),
                                  "--out", str(c.out)], None, ["malformed", "bits=5", "re-create it"]),
    "plan-edited-bytes": (lambda c: ["report", "--plan", c.plan_copy(lambda d: d["matrices"][0].update(bytes=1)),
                                     "--out", str(c.out)], None, ["bytes=1 but its configuration costs", "re-create"]),
    "plan-tie-broken": (lambda c: ["report", "--plan", c.plan_copy(_break_tie), "--out", str(c.out)], None,
                        ["ties qkv but the members of", "encoder.layer.0.attention.self.{query,key,value}",
                         "re-create it"]),
    "plan-other-model": (lambda c: ["report", "--plan", c.plan_copy(), "--profile", str(c.env["other_profile"]),
                                    "--out", str(c.out)], None, ["is for another model", "pass --profile"]),
    "profile-corrupt": (lambda c: ["report", "--plan", c.plan_copy(), "--profile",
                                   c.file("profile.csv", b'"unclosed\n\x00\x01'), "--out", str(c.out)], None,
                        ["not a readable profile table", "re-create it"]),
    "profile-folder-corrupt": (lambda c: ["report", "--plan", c.plan_copy(), "--profile",
                                          str(Path(c.file("profile.csv", b'"unclosed\n\x00\x01')).parent),
                                          "--out", str(c.out)], None,
                               ["not a readable profile table", "re-create it"]),
    # output, devices, command line
    "train-out-under-a-file": (lambda c: ["train", "--plan", c.plan_copy(), "--out",
                                          str(Path(c.file("afile", b"x")) / "out")], None,
                               ["is a file, not a folder", "choose another --out"]),
    "out-under-a-file": (lambda c: c.plan("--out", str(Path(c.file("afile", b"x")) / "out")), None,
                         ["is a file, not a folder", "choose another --out"]),
    "cache-under-a-file": (lambda c: c.plan("--cache", str(Path(c.file("afile", b"x")) / "cache")), None,
                           ["is a file, not a folder", "choose another --cache"]),
    "disk-full-write": (lambda c: c.plan(cache=str(c.env["cache"])), lambda mp, c: _fail_disk_write(mp),
                        ["No space left on device", "free disk space"]),
    "disk-full-fsync": (lambda c: c.plan(cache=str(c.env["cache"])), lambda mp, c: _fail_fsync(mp),
                        ["No space left on device", "free disk space"]),
    "disk-full-profile-cache": (lambda c: c.plan(), lambda mp, c: _fail_disk_write(mp),
                                ["No space left on device", "free disk space"]),
    "device-cuda-absent": (lambda c: c.plan("--device", "cuda"), None, ["no CUDA device is available", "--device cpu"]),
    "device-unknown": (lambda c: c.plan("--device", "tpu9"), None, ["'tpu9' is not a device", "auto, cpu, cuda or cuda:N"]),
    "unknown-option": (lambda c: c.plan("--frobnicate"), None, ["unrecognized arguments: --frobnicate", "--help"]),
    "no-command": (lambda c: [], None, ["required: COMMAND", "--help"]),
}


def _snapshot(folder: Path) -> dict | None:
    """Every file under folder (temp files included) -> (size, mtime, sha256)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, env, tmp_path, capsys, monkeypatch):
    build, setup, words = CASES[case]
    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    ctx = Ctx(tmp_path, env)
    watched = [ctx.out, env["plan"].parent, env["root"] / "other-profile", tmp_path / "planfolder"]
    check_bad_input(ctx, build, setup, words, watched, monkeypatch, capsys)


def check_bad_input(ctx, build, setup, words, watched, monkeypatch, capsys) -> None:
    """Run the case's command line in-process (after its setup) and assert the house contract: exit 2, one line
    `lqplan: error: ...` holding every word in `words`, and nothing in `watched` or --out changed."""
    ctx.out.mkdir()
    (ctx.out / "plan.json").write_bytes(PREVIOUS)
    argv = build(ctx)
    before = [_snapshot(f) for f in watched]
    if setup is not None:
        setup(monkeypatch, ctx)
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    monkeypatch.undo()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1 and lines[0].startswith("lqplan: error: "), captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert [_snapshot(f) for f in watched] == before, "a failing command wrote into an output folder"
    assert (ctx.out / "plan.json").read_bytes() == PREVIOUS


def test_disk_full_leaves_no_temp_files_in_the_cache(env, tmp_path, monkeypatch, capsys):
    _fail_disk_write(monkeypatch)
    assert cli.main(Ctx(tmp_path, env).plan()) == 2
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("argv", [
    ["plan", "--budget", "abc"],
    ["plan", "--budget", "-2bits"],
    ["plan", "--budget", "3bits", "--model", "{truncated}", "--bits", "4", "--blocks", "64", "--ranks", "0"],
    ["report", "--plan", "{bad_plan}"],
], ids=["budget", "argparse", "truncated-model", "plan-json"])
def test_no_traceback_in_a_real_process(argv, env, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(env["tiny"], truncated)
    _truncate(truncated)
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text("{not json")
    argv = [a.format(truncated=truncated, bad_plan=bad_plan) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "planner", *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=subprocess_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lqplan: error: "), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()
