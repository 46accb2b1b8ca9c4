"""The robustness suite of issue 21, beside the bad-input catalogue (tests/test_bad_inputs.py, whose runner and tiny
model this reuses): every verb (plan, profile, report, grid, memory, aliases, train, evaluate) against malformed
model folders, plan / profile / cache documents and misleading inputs. Each case must answer with exit code 2,
exactly one line "lqplan: error: ..." naming the problem and the fix, and leave every output folder as it was.
The cases that must succeed (a document a reader can repair, such as totals recomputed from the entries) are
tests of their own below."""

from __future__ import annotations

import argparse
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from test_bad_inputs import GRID, PREVIOUS, Ctx, _fail_disk_write, _snapshot, check_bad_input, env  # noqa: F401 (env: fixture)

from planner import cli
from planner.cli import commands
from planner.report.render import RUN_LABELS

Q0 = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def quantized(env, tmp_path_factory):
    """A quantized tiny model saved as `lqplan train` saves it (OUT/quantized), without training."""
    from torch import nn
    from transformers import BertModel

    from planner.profile.grid import GridPoint
    from planner.train import apply_plan, explicit_plan, save_quantized
    from quant import QuantConfig

    model = BertModel.from_pretrained(env["tiny"])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 4), model_path=env["tiny"], names=names,
                         iters=1)
    apply_plan(model, plan, model_path=env["tiny"], progress=False)
    return save_quantized(model, plan, tmp_path_factory.mktemp("quantized") / "quantized")


# ---- builders ---------------------------------------------------------------------------------------------------

def _write(name: str, data: bytes | str):
    def mutate(folder: Path):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def _config_folder(folder: Path):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _append(data: bytes):
    def mutate(folder: Path):
        with open(folder / "model.safetensors", "ab") as f:
            f.write(data)
    return mutate


def _index(weight_map):
    def mutate(folder: Path):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return mutate


def _plan_edit(fn):
    """A plan edit: fn(plan dict) changes it in place."""
    return fn


def _entry(**changes):
    return lambda d: d["matrices"][0].update(changes)


def _report(c: Ctx, edit=None, profile: str | None = None) -> list[str]:
    copied = c.tmp / "planfolder" / "plan.json"  # already copied by _profile_csv
    argv = ["report", "--plan", str(copied) if copied.exists() else c.plan_copy(edit), "--out", str(c.out)]
    return argv + (["--profile", profile] if profile else [])


def _profile_csv(c: Ctx, change) -> str:
    """The valid plan's profile.csv, changed by change(rows: list[dict]) -> rows, written beside a copy."""
    import pandas as pd

    c.plan_copy()
    folder = c.tmp / "planfolder"
    table = pd.read_csv(folder / "profile.csv")
    table = change(table)
    (folder / "profile.csv").write_text(table.to_csv(index=False))
    return str(folder / "profile.csv")


def _train(c: Ctx, *args: str, plan: str | None = None) -> list[str]:
    return ["train", "--plan", plan or c.plan_copy(), "--steps", "1", "--quiet", "--out", str(c.out), *args]


def _quantized_copy(c: Ctx, mutate=None) -> str:
    folder = c.tmp / "quantized"
    shutil.copytree(c.env["quantized"], folder)
    if mutate is not None:
        mutate(folder)
    return str(folder)


def _truncate_weights(folder: Path):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(name: str, fn):
    def mutate(folder: Path):
        d = json.loads((folder / name).read_text())
        fn(d)
        (folder / name).write_text(json.dumps(d))
    return mutate


REMAKE = "re-create it with `lqplan plan`"
PROFILE_FIX = "re-create it with `lqplan profile`"

# id -> (argv builder, setup(monkeypatch, ctx) or None, words the line must contain)
CASES = {
    # class 2: model-folder structure, through plan, profile, memory and train
    "config-is-a-folder-plan": (lambda c: c.plan(model=c.variant(_config_folder)), None,
                                ["config.json is a folder", "restore the model's config.json"]),
    "config-is-a-folder-profile": (lambda c: ["profile", "--model", c.variant(_config_folder), *GRID, "--quiet",
                                              "--out", str(c.out), "--cache", str(c.tmp / "cache")], None,
                                   ["config.json is a folder", "restore"]),
    "config-is-a-folder-memory": (lambda c: ["memory", "--model", c.variant(_config_folder)], None,
                                  ["config.json is a folder", "restore the model's config.json"]),
    "config-empty-plan": (lambda c: c.plan(model=c.variant(_write("config.json", b""))), None,
                          ["config.json is not valid JSON", "restore"]),
    "config-empty-memory": (lambda c: ["memory", "--model", c.variant(_write("config.json", b""))], None,
                            ["config.json is not valid JSON", "model's config.json"]),
    "config-a-list-memory": (lambda c: ["memory", "--model", c.variant(_write("config.json", "[1, 2]"))], None,
                             ["config.json is not valid JSON"]),
    "config-not-utf8-plan": (lambda c: c.plan(model=c.variant(_write("config.json", b"\xff\xfe{}"))), None,
                             ["config.json is not valid JSON", "restore"]),
    "config-deeply-nested-plan": (lambda c: c.plan(model=c.variant(_write("config.json", "[" * 100000))), None,
                                  ["config.json is not valid JSON"]),
    "safetensors-trailing-bytes-plan": (lambda c: c.plan(model=c.variant(_append(b"\0" * 100))), None,
                                        ["100 bytes after its tensor data", "re-download"]),
    "safetensors-trailing-bytes-profile": (lambda c: ["profile", "--model", c.variant(_append(b"extra")), *GRID,
                                                      "--quiet", "--out", str(c.out), "--cache",
                                                      str(c.tmp / "cache")], None,
                                           ["5 bytes after its tensor data", "re-download"]),
    "safetensors-header-offsets-not-ints": (lambda c: c.plan(model=c.variant(_write(
        "model.safetensors", (lambda h: len(h).to_bytes(8, "little") + h)(
            json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "x"]}}).encode())))), None,
        ["malformed safetensors header", "re-download"]),
    "index-weight-map-list": (lambda c: c.plan(model=c.variant(_index(["model.safetensors"]))), None,
                              ["weight_map must map each tensor name to a shard file name", "re-download"]),
    "index-weight-map-numbers": (lambda c: c.plan(model=c.variant(_index({f"{Q0}.weight": 1}))), None,
                                 ["weight_map must map each tensor name", "re-download"]),
    "index-weight-map-path-outside": (lambda c: c.plan(model=c.variant(_index({f"{Q0}.weight":
                                                                               "../other.safetensors"}))), None,
                                      ["in the same folder"]),
    "index-weight-map-null": (lambda c: c.plan(model=c.variant(_index(None))), None,
                              ["weight_map must map", "re-download"]),
    "index-not-json": (lambda c: c.plan(model=c.variant(_write("model.safetensors.index.json", b"{"))), None,
                       ["index.json is not valid JSON", "re-download"]),
    "index-not-utf8": (lambda c: c.plan(model=c.variant(_write("model.safetensors.index.json", b"\xff\xff"))), None,
                       ["index.json is not valid JSON: not UTF-8"]),
    "train-model-config-empty": (lambda c: _train(c, "--model", c.variant(_write("config.json", b""))), None,
                                 ["config.json is not valid JSON", "restore"]),
    "train-model-config-folder": (lambda c: _train(c, "--model", c.variant(_config_folder)), None,
                                  ["not found", "--model"]),
    "train-model-other-weights": (lambda c: _train(c, "--model", str(c.env["other"])), None,
                                  ["the plan was made for model", "re-plan for this model"]),
    "evaluate-truncated-weights": (lambda c: ["evaluate", "--quantized", _quantized_copy(c, _truncate_weights)],
                                   None, ["is not the file lqplan_manifest.json was written with",
                                          "re-save the model"]),
    "evaluate-weights-missing": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, lambda f: (f / "model.safetensors").unlink())], None, ["lacks model.safetensors", "re-save"]),
    "evaluate-weights-garbage": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _write("model.safetensors", b"\x08" + b"\0" * 7 + b"garbage!"))], None,
        ["is not the file lqplan_manifest.json was written with", "re-save"]),
    "evaluate-manifest-not-json": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _write("lqplan_manifest.json", b"{"))], None, ["cannot read", "re-save the model"]),
    "evaluate-manifest-a-list": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _write("lqplan_manifest.json", b"[]"))], None, ["has schema None", "re-save it"]),
    "evaluate-manifest-not-utf8": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _write("lqplan_manifest.json", b"\xff{}"))], None, ["cannot read", "re-save"]),
    "evaluate-not-a-quantized-folder": (lambda c: ["evaluate", "--quantized", str(c.env["tiny"])], None,
                                        ["is not an lqplan quantized folder", "save_quantized"]),
    "evaluate-plan-float-bits": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _edit_json("plan.json", _entry(bits=4.0)))], None, ["bits=4.0 is not an integer", REMAKE]),
    "evaluate-plan-nan-error": (lambda c: ["evaluate", "--quantized", _quantized_copy(
        c, _edit_json("plan.json", _entry(error=float("nan"))))], None, ["is not a finite number", REMAKE]),
    "evaluate-model-other-weights": (lambda c: ["evaluate", "--quantized", _quantized_copy(c), "--model",
                                                str(c.env["other"])], None, ["the plan was made for model"]),
    "evaluate-model-config-empty": (lambda c: ["evaluate", "--quantized", _quantized_copy(c), "--model",
                                               c.variant(_write("config.json", b""))], None,
                                    ["config.json is not valid JSON"]),
    # class 3: plan documents, through report and train
    "plan-rank-negative": (lambda c: _report(c, _entry(rank=-4)), None, ["rank=-4 is not an integer >= 0", REMAKE]),
    "plan-rank-too-large": (lambda c: _report(c, _entry(rank=65, bytes=0)), None,
                            ["rank 65 (lora) does not fit its shape [64, 64]", REMAKE]),
    "plan-rank-float": (lambda c: _report(c, _entry(rank=4.0)), None, ["rank=4.0 is not an integer", REMAKE]),
    "plan-rank-bool": (lambda c: _report(c, _entry(rank=True)), None, ["rank=True is not an integer"]),
    "plan-error-nan": (lambda c: _report(c, _entry(error=float("nan"))), None,
                       ["error=nan is not a finite number >= 0", REMAKE]),
    "plan-error-inf": (lambda c: _report(c, _entry(error=float("inf"))), None, ["error=inf is not a finite number"]),
    "plan-error-negative": (lambda c: _report(c, _entry(error=-1.0)), None, ["error=-1.0 is not a finite number"]),
    "plan-error-string": (lambda c: _report(c, _entry(error="0.1")), None, ["error='0.1' is not a finite number"]),
    "plan-bits-float": (lambda c: _report(c, _entry(bits=4.0)), None, ["bits=4.0 is not an integer", REMAKE]),
    "plan-blocksize-float": (lambda c: _report(c, _entry(blocksize=64.0)), None, ["blocksize=64.0 is not an integer"]),
    "plan-dq-bits-float": (lambda c: _report(c, _entry(dq_bits=8.0)), None, ["dq_bits=8.0 is not an integer"]),
    "plan-bits-string": (lambda c: _report(c, _entry(bits="4")), None, ["bits='4' is not an integer"]),
    "plan-bytes-float": (lambda c: _report(c, _entry(bytes=2112.0)), None, ["is not an integer"]),
    "plan-shape-swapped": (lambda c: _report(c, lambda d: d["matrices"][4].update(shape=[64, 128])), None,
                           ["has shape [64, 128] but the profile measured it as [128, 64]", "re-create it"]),
    "plan-shape-3d": (lambda c: _report(c, _entry(shape=[64, 64, 1])), None, ["a planned matrix is [out, in]"]),
    "plan-shape-zero": (lambda c: _report(c, _entry(shape=[0, 64])), None, ["a planned matrix is [out, in]"]),
    "plan-shape-floats": (lambda c: _report(c, _entry(shape=[64.0, 64.0])), None, ["a planned matrix is [out, in]"]),
    "plan-shape-string": (lambda c: _report(c, _entry(shape="64x64")), None, ["a planned matrix is [out, in]"]),
    "plan-name-empty": (lambda c: _report(c, _entry(name="")), None, ["matrix name '' is not a non-empty string"]),
    "plan-name-number": (lambda c: _report(c, _entry(name=7)), None, ["matrices[0].name is 7, not a string"]),
    "plan-method-unknown": (lambda c: _report(c, _entry(method="dora")), None, ["'dora' is not supported"]),
    "plan-method-number": (lambda c: _report(c, _entry(method=1)), None, ["matrices[0].method is 1, not a string"]),
    "plan-matrices-empty": (lambda c: _report(c, lambda d: d.update(matrices=[])), None,
                            ["it lists no matrices", REMAKE]),
    "plan-matrices-object": (lambda c: _report(c, lambda d: d.update(matrices={})), None,
                             ["matrices is {}, not a list", REMAKE]),
    "plan-entry-a-list": (lambda c: _report(c, lambda d: d["matrices"].__setitem__(0, [1, 2])), None,
                          ["the plan is malformed", REMAKE]),
    "plan-totals-bits-edited": (lambda c: _report(c, lambda d: d["totals"].update(bits=1)), None,
                                ["totals.bits=1 but the matrices add up to", "re-create the plan"]),
    "plan-totals-params-edited": (lambda c: _report(c, lambda d: d["totals"].update(params=5)), None,
                                  ["totals.params=5 but the matrices add up to"]),
    "plan-totals-a-number": (lambda c: _report(c, lambda d: d.update(totals=5)), None, ["the plan is malformed"]),
    "plan-budget-bits-negative": (lambda c: _report(c, lambda d: d["budget"].update(bits=-5)), None,
                                  ["bits=-5 is not an integer >= 0", "re-create the plan"]),
    "plan-budget-bits-float": (lambda c: _report(c, lambda d: d["totals"].update(budget_bits=1.5)), None,
                               ["totals.budget_bits is 1.5, not an integer"]),
    "plan-unplanned-negative": (lambda c: _report(c, lambda d: d["totals"].update(unplanned_bytes=-1)), None,
                                ["unplanned_bytes=-1 is not an integer >= 0"]),
    "plan-fingerprint-number": (lambda c: _report(c, lambda d: d["model"].update(fingerprint=5)), None,
                                ["model.fingerprint is 5, not a string"]),
    "plan-model-a-string": (lambda c: _report(c, lambda d: d.update(model="m")), None, ["the plan is malformed"]),
    "plan-duplicate-entry": (lambda c: _report(c, lambda d: d["matrices"].append(d["matrices"][0])), None,
                             ["lists a matrix twice"]),
    "plan-not-utf8": (lambda c: ["report", "--plan", c.file("plan.json", b"\xff\xfe{}"), "--out", str(c.out)], None,
                      ["is not valid JSON: not UTF-8", "plan.json written by `lqplan plan`"]),
    "plan-is-a-folder": (lambda c: ["report", "--plan", str(c.tmp), "--out", str(c.out)], None,
                         ["is a folder, not a file"]),
    "train-plan-float-bits": (lambda c: _train(c, plan=c.plan_copy(_entry(bits=4.0))), None,
                              ["bits=4.0 is not an integer", REMAKE]),
    "train-plan-rank-negative": (lambda c: _train(c, plan=c.plan_copy(_entry(rank=-1))), None,
                                 ["rank=-1 is not an integer >= 0"]),
    "train-plan-empty-matrices": (lambda c: _train(c, plan=c.plan_copy(lambda d: d.update(matrices=[]))), None,
                                  ["it lists no matrices"]),
    "train-plan-missing": (lambda c: _train(c, plan=str(c.tmp / "none.json")), None, ["does not exist"]),
    # class 3: profile tables, through report
    "profile-no-error-column": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.drop(columns="error"))),
                                None, ["lacks the column(s) error", PROFILE_FIX]),
    "profile-no-matrix-column": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.drop(columns="matrix"))),
                                 None, ["lacks the column(s) matrix", PROFILE_FIX]),
    "profile-no-shape-columns": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.drop(columns=["m", "n"]))),
                                 None, ["lacks the column(s) m, n", PROFILE_FIX]),
    "profile-no-storage-column": (lambda c: _report(c, profile=_profile_csv(
        c, lambda t: t.drop(columns="storage_bits"))), None, ["lacks the column(s) storage_bits"]),
    "profile-error-nan": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.assign(error=float("nan")))),
                          None, ["error of encoder.layer.0", "is not a finite number >= 0", PROFILE_FIX]),
    "profile-error-negative": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.assign(error=-1.0))), None,
                               ["is not a finite number >= 0"]),
    "profile-error-text": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.assign(error="big"))), None,
                           ["is not a finite number >= 0"]),
    "profile-unweighted-nan": (lambda c: _report(c, profile=_profile_csv(
        c, lambda t: t.assign(error_unweighted=float("nan")))), None, ["error_unweighted of"]),
    "profile-storage-float": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.assign(storage_bits=1.5))),
                              None, ["column storage_bits must hold integers"]),
    "profile-shape-zero": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.assign(m=0))), None,
                           ["column m must hold integers >= 1"]),
    "profile-duplicate-row": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.iloc[[0, 0]])), None,
                              ["twice", PROFILE_FIX]),
    "profile-two-shapes": (lambda c: _report(c, profile=_profile_csv(
        c, lambda t: t.assign(m=[64 + (i % 2) for i in range(len(t))]))), None, ["two shapes"]),
    "profile-header-only": (lambda c: _report(c, profile=_profile_csv(c, lambda t: t.iloc[:0])), None,
                            ["has no rows", PROFILE_FIX]),
    "profile-empty-file": (lambda c: _report(c, profile=c.file("profile.csv", b"")), None,
                           ["not a readable profile table"]),
    "profile-manifest-not-json": (lambda c: _report(c, profile=(lambda p: (Path(p).with_name("profile.json")
                                  .write_text("{"), p)[1])(_profile_csv(c, lambda t: t))), None,
                                  ["profile.json is not valid JSON", "re-create the profile with `lqplan profile`"]),
    # class 5: messages that mislead
    "budget-gigabit": (lambda c: c.plan("--budget", "60Gb"), None,
                       ["lower-case 'b' in 'Gb' reads as bits", "write 60GB for bytes"]),
    "budget-megabit-lower": (lambda c: c.plan("--budget", "5mb"), None, ["write 5MB for bytes"]),
    "budget-kibibit": (lambda c: c.plan("--budget", "2kib"), None, ["write 2KiB for bytes"]),
    "budget-terabit": (lambda c: c.plan("--budget", "1Tb"), None, ["write 1TB for bytes"]),
    "budget-gigabit-spaced": (lambda c: c.plan("--budget", "6 gb"), None, ["reads as bits"]),
    "calib-tokens-beyond-the-text": (lambda c: ["plan", "--budget", "5bits", "--calib", "pydoc", "--calib-tokens",
                                                str(10**9), "--bits", "4", "--blocks", "64", "--ranks", "0",
                                                "--iters", "0", "--quiet", "--out", str(c.out), "--cache",
                                                str(c.tmp / "cache")], None,
                                     ["--calib-tokens 1000000000 is more than the calibration text holds",
                                      "or fewer"]),
    # every verb's command line
    "grid-shape-zero": (lambda c: ["grid", "--shape", "0x64"], None, ["is not MxN with positive integers"]),
    "grid-shape-three-sides": (lambda c: ["grid", "--shape", "4x4x4"], None, ["is not MxN"]),
    "grid-shape-empty-side": (lambda c: ["grid", "--shape", "64x"], None, ["is not MxN"]),
    "grid-bits-unsupported": (lambda c: ["grid", "--bits", "7"], None, ["bits=7 is not supported"]),
    "grid-groups-bad": (lambda c: ["grid", "--method", "qalora", "--groups", "x"], None,
                        ["--groups 'x' is not a comma-separated list"]),
    "grid-method-unknown": (lambda c: ["grid", "--method", "dora"], None, ["invalid choice: 'dora'"]),
    "memory-missing-folder": (lambda c: ["memory", "--model", str(c.tmp / "nope")], None,
                              ["neither an existing folder"]),
    "memory-folder-without-config": (lambda c: ["memory", "--model", str(c.tmp)], None, ["has no config.json"]),
    "memory-alias-unknown": (lambda c: ["memory", "--model", "llama9-1b"], None, ["is neither"]),
    "memory-alias-not-cached": (lambda c: ["memory", "--model", "llama2-7b"],
                                lambda mp, c: mp.setenv("HF_HUB_CACHE", str(c.tmp / "empty-hub")),
                                ["not in the local Hugging Face cache", "`hf download meta-llama/Llama-2-7b-hf "
                                 "config.json`"]),
    "aliases-extra-argument": (lambda c: ["aliases", "--model", "x"], None, ["unrecognized arguments"]),
    "profile-iters-negative": (lambda c: ["profile", "--iters", "-1", "--out", str(c.out)], None,
                               ["--iters -1 is negative"]),
    "profile-out-under-a-file": (lambda c: ["profile", "--out", str(Path(c.file("f", b"x")) / "o")], None,
                                 ["is a file, not a folder", "choose another --out"]),
    "report-out-under-a-file": (lambda c: _report(c) + ["--out", str(Path(c.file("f", b"x")) / "o")], None,
                                ["is a file, not a folder", "choose another --out"]),
    "report-disk-full": (lambda c: _report(c), lambda mp, c: _fail_disk_write(mp),
                         ["No space left on device", "free disk space"]),
    "train-steps-zero": (lambda c: _train(c, "--steps", "0"), None, ["--steps 0 must be >= 1"]),
    "train-text-missing": (lambda c: _train(c, "--text", str(c.tmp / "none.txt")), None, ["does not exist"]),
    "train-out-under-a-file": (lambda c: _train(c, "--out", str(Path(c.file("f", b"x")) / "o")), None,
                               ["is a file, not a folder"]),
    "evaluate-missing-folder": (lambda c: ["evaluate", "--quantized", str(c.tmp / "none")], None,
                                ["is not an lqplan quantized folder"]),
    "evaluate-eval-texts-zero": (lambda c: ["evaluate", "--quantized", _quantized_copy(c), "--eval-texts", "0"],
                                 None, ["eval_texts=0", "must be >= 1"]),
}


@pytest.fixture
def ctx(env, quantized, tmp_path):
    return Ctx(tmp_path, {**env, "quantized": quantized})


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, ctx, env, tmp_path, capsys, monkeypatch):
    build, setup, words = CASES[case]
    watched = [ctx.out, env["plan"].parent, env["tiny"], tmp_path / "planfolder", tmp_path / "quantized"]
    check_bad_input(ctx, build, setup, words, watched, monkeypatch, capsys)


# ---- documents a reader repairs, messages that must not mislead, what a newcomer meets ---------------------------

def _run_report(c: Ctx, edit, capsys) -> str:
    capsys.readouterr()
    assert cli.main(_report(c, edit)) == 0, capsys.readouterr().err
    return (c.out / "report.md").read_text()


@pytest.mark.parametrize("key", ["bits", "bytes", "params", "error", "bits_per_param", "model_bytes"])
def test_report_recomputes_totals_a_plan_lacks_or_misstates(ctx, capsys, key):
    """Totals are recomputed from the entries: a plan without one of them renders, and an edited total error or
    bits/param is never what the report shows."""
    truth = json.loads(ctx.env["plan"].read_text())["totals"]
    if key in ("error", "bits_per_param"):
        md = _run_report(ctx, lambda d: d["totals"].update({key: 12345.0}), capsys)
        assert "12345" not in md and "12,345" not in md
    else:
        md = _run_report(ctx, lambda d: d["totals"].pop(key), capsys)
    assert f"{truth['error']:.4f}"[:6] in md


def test_an_incomplete_cache_point_is_recomputed(env, tmp_path, capsys, caplog):
    """A cache file whose points lack error_unweighted (or any field the table needs) is unreadable: warned about,
    recomputed, and the plan equals the one from a clean cache."""
    cache = tmp_path / "cache"
    base = ["plan", "--budget", "8bits", "--model", str(env["tiny"]), *GRID, "--quiet", "--no-report",
            "--cache", str(cache)]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    victim = sorted(cache.rglob("*.json"))[0]
    doc = json.loads(victim.read_text())
    for point in doc["points"].values():
        del point["error_unweighted"]
    victim.write_text(json.dumps(doc))
    assert cli.main([*base, "--out", str(tmp_path / "b")]) == 0
    assert "ignoring unreadable cache file" in caplog.text
    assert all("error_unweighted" in p for p in json.loads(victim.read_text())["points"].values())
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()


def test_report_rerenders_what_plan_rendered(env, tmp_path, capsys):
    """`lqplan report` gives back the first rendering: the error-budget curve, the run statistics and an
    allocation.csv with the numbers as computed (not ten-digit roundings from profile.csv)."""
    out = tmp_path / "out"
    assert cli.main(["plan", "--budget", "8bits", "--model", str(env["tiny"]), *GRID, "--quiet", "--out", str(out),
                     "--cache", str(env["cache"])]) == 0
    assert cli.main(["report", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "again")]) == 0
    for name in ("allocation.csv", "report.md", "report.html", "error_budget.png", "heatmap.png"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert f"| {RUN_LABELS['profile_seconds']} |" in (out / "report.md").read_text()  # the run statistics


def test_the_solver_field_names_what_proved_the_plan(env):
    plan = json.loads(env["plan"].read_text())
    assert plan["solver"]["proof"] in ("dp", "lp-bound", "fixing")
    assert plan["solver"]["solver"] == plan["solver"]["proof"]


@pytest.mark.parametrize("ranks,shape", [("1000", "64x64"), ("65", "64x4096"), ("8", "4x4")])
def test_grid_says_na_for_a_rank_the_shape_cannot_hold(capsys, ranks, shape):
    assert cli.main(["grid", "--bits", "4", "--blocks", "64", "--ranks", ranks, "--shape", shape]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert "n/a (rank > min(out, in))" in row and "bits/param" not in row


@pytest.mark.parametrize("verb,says", [("train", "--resume"), ("plan", "cached"), ("report", "nothing was written")])
def test_ctrl_c_says_what_survives(verb, says, monkeypatch, capsys, ctx):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(commands.COMMANDS, verb, interrupted)
    monkeypatch.setattr(cli, "prepare", lambda args: None)
    monkeypatch.setattr(cli, "cli_entry", lambda *a: None)
    argv = {"train": _train(ctx), "plan": ctx.plan(), "report": _report(ctx)}[verb]
    assert cli.main(argv) == 130
    line = capsys.readouterr().err.strip()
    assert says in line and "\n" not in line
    if verb == "train":
        assert "finished work is cached" not in line


def _examples() -> list[str]:
    """Every `lqplan plan` example on the embedded model in the README and in --help."""
    from planner.cli.parser import EXAMPLES

    text = (REPO / "README.md").read_text() + EXAMPLES
    commands_ = [ln.split("#")[0].split("&&")[-1].strip() for ln in text.splitlines()]
    return sorted({c for c in commands_ if c.startswith("lqplan plan --budget") and "--model" not in c})


@pytest.mark.parametrize("example", _examples())
def test_readme_and_help_examples_are_feasible_on_the_default_model(example):
    """What a newcomer pastes first must not be refused: the budget fits the grid it names on the default model
    (checked before profiling, as `lqplan plan` checks it)."""

    from planner.cli.parser import build_parser
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model
    from planner.plan.budget import resolve_budget

    args = build_parser().parse_args(example.split()[1:])
    assert isinstance(args, argparse.Namespace) and args.model is None
    source = resolve_model(None)
    # the grid `lqplan plan` builds: --ranks left out means the ranks that suit the model (commands.prepare)
    grid = commands.grid_from_args(args, commands.model_default_ranks(args))
    resolve_budget(source, discover_matrices(source), grid, args.budget)


def test_default_output_folders_are_ignored_by_git():
    """Every verb's default --out and --cache, run in a checkout, leaves nothing git would offer to commit."""
    from planner.cli.parser import build_parser

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    defaults = {str(action.default) for sub in verbs.values() for action in sub._actions
                if action.dest in ("out", "cache") and isinstance(action.default, (str, Path))}
    assert {"lqplan-out", "lqplan-train", ".lqplan-cache"} <= defaults, defaults
    probes = [f"{d}/plan.json" for d in sorted(defaults)]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == probes, (proc.stdout, proc.stderr)


def test_saved_weights_get_the_mode_of_every_other_file(quantized):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(quantized).iterdir()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("argv", [
    ["memory", "--model", "{cfgdir}"],
    ["plan", "--budget", "8bits", "--model", "{cfgdir}"],
    ["plan", "--budget", "60Gb"],
    ["report", "--plan", "{floatbits}"],
    ["train", "--plan", "{floatbits}"],
], ids=["memory-config-dir", "plan-config-dir", "budget-Gb", "report-float-bits", "train-float-bits"])
def test_no_traceback_in_a_real_process(argv, env, tmp_path):
    cfgdir = tmp_path / "cfgdir"
    shutil.copytree(env["tiny"], cfgdir)
    _config_folder(cfgdir)
    d = json.loads(env["plan"].read_text())
    d["matrices"][0]["bits"] = 4.0
    (tmp_path / "plan.json").write_text(json.dumps(d))
    argv = [a.format(cfgdir=cfgdir, floatbits=tmp_path / "plan.json") for a in argv]
    out = [] if argv[0] == "memory" else ["--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "planner", *argv, *out],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lqplan: error: "), proc.stderr
    assert not (tmp_path / "out").exists()
