"""Hostile inputs get one line too: malformed safetensors headers, special files, wrong-typed configs and documents,
broken models, devices that are not there, odd paths, folders left mixed by failed or killed runs, code planted in a
model folder. Each class is fixed in one place; the tests here generate many variants of each (hypothesis where the
input space is large) and call the real code in-process (planner.cli.main or the one function that owns the check),
so the whole file stays fast. The house contract for the CLI: exit 2, exactly one line "lqplan: error: ...", no
traceback, nothing changed in any output folder.

Test names start with the class they belong to (docs/reliability.md counts them): security_, units_, misread_,
c1_ (headers), c2_ (special files), c3_ (config.json), c4_ (documents), c5_ (broken models), c6_ (devices),
c7_ (paths, windows, vocabularies, start-up), c8_ (messages)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_bad_inputs import GRID, Ctx, _snapshot, env  # noqa: F401 (env: fixture)
from test_fuzz import JSON, _valid_plan, mutated_plans

from planner import cli, fsio, outputs
from planner.errors import UserError

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MANY = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SOME = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LN = "embeddings.LayerNorm.weight"
Q0 = "encoder.layer.0.attention.self.query"


def main(argv) -> int:
    """planner.cli.main in this process, paths as strings."""
    return cli.main([str(a) for a in argv])


def one_line(e: UserError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    return msg


@contextmanager
def deadline(seconds: int):
    """A read that blocks (a FIFO) fails the test instead of hanging the suite."""
    def fire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv, capsys, watched=()) -> str:
    """main(argv) must answer exit 2 and one line, leave `watched` folders unchanged; returns the line."""
    before = [_snapshot(Path(f)) for f in watched]
    capsys.readouterr()
    with deadline(120):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("lqplan: error: "), err
    assert [_snapshot(Path(f)) for f in watched] == before, "a failing command changed an output folder"
    return lines[0]


def model_copy(env, tmp: Path, mutate=None, name: str = "model") -> Path:
    folder = tmp / name
    shutil.copytree(env["tiny"], folder)
    if mutate is not None:
        mutate(folder)
    return folder


def plan_argv(model, tmp: Path, *extra) -> list:
    return ["plan", "--budget", "8bits", "--model", model, *GRID, "--quiet", "--no-report", "--out", tmp / "out",
            "--cache", tmp / "cache", *extra]


# ==== security: nothing in a model folder is ever executed or unpickled ==========================================

PLANTED = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def _remote_code_folder(env, tmp: Path, model_type: str = "evilnet") -> tuple[Path, Path]:
    folder = model_copy(env, tmp, name="remote")
    marker = tmp / "planted-code-ran"
    (folder / "evil.py").write_text(PLANTED.format(marker=str(marker)) + "from transformers import BertConfig, "
                                    "BertModel\nclass EvilConfig(BertConfig):\n    model_type = 'evilnet'\n"
                                    "class EvilModel(BertModel):\n    config_class = EvilConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                         "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


@pytest.fixture
def no_prompt(monkeypatch):
    """transformers asks on stdin before it runs remote code; lqplan must never get that far."""
    def refuse(*a, **k):
        raise AssertionError("lqplan (or transformers under it) prompted for input")
    monkeypatch.setattr("builtins.input", refuse)


@pytest.mark.parametrize("verb", ["plan-calib", "plan-output", "profile", "memory", "train", "evaluate-model",
                                  "evaluate-plan"])
def test_security_remote_code_never_runs(verb, env, quantized, tmp_path, capsys, no_prompt, monkeypatch):
    folder, marker = _remote_code_folder(env, tmp_path)
    monkeypatch.syspath_prepend(str(folder))  # even importable, the planted module must never be imported
    argv = {"plan-calib": plan_argv(folder, tmp_path, "--calib", "pydoc", "--calib-tokens", "64"),
            "profile": ["profile", "--model", folder, *GRID, "--quiet", "--out", tmp_path / "o", "--cache",
                        tmp_path / "c"],
            "memory": ["memory", "--model", folder],
            "train": ["train", "--plan", env["plan"], "--model", folder, "--steps", "1", "--quiet", "--out",
                      tmp_path / "t"],
            "plan-output": plan_argv(folder, tmp_path, "--calib", "pydoc", "--calib-tokens", "64", "--objective",
                                     "output"),
            "evaluate-model": ["evaluate", "--quantized", quantized[4], "--model", folder],
            "evaluate-plan": ["evaluate", "--plan", env["plan"], "--model", folder, "--quiet"]}[verb]
    line = run_cli(argv, capsys)
    assert "never runs code from a model folder" in line, line
    assert not marker.exists(), "code planted in the model folder ran"
    assert "evil" not in sys.modules


def test_security_remote_code_with_a_known_model_type_uses_transformers_own_class(env, tmp_path, capsys, no_prompt):
    """auto_map beside a model_type transformers knows: its own class is used, the planted code never imported."""
    folder, marker = _remote_code_folder(env, tmp_path, model_type="bert")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(plan_argv(folder, tmp_path, "--calib", "pydoc", "--calib-tokens", "64")) == 0
    assert not marker.exists()


class _Payload:
    """Unpickling this runs code: what a hostile pytorch_model.bin holds."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled",))


def test_security_pickles_are_never_loaded(env, tmp_path, capsys, no_prompt):
    """A pytorch_model.bin beside the safetensors (a full hub snapshot has both) is never unpickled, by Fisher
    calibration (transformers' from_pretrained) or by training; one without safetensors is refused."""
    import pickle

    marker = tmp_path / "pickle-ran"
    folder = model_copy(env, tmp_path, name="both")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    assert main(plan_argv(folder, tmp_path, "--calib", "pydoc", "--calib-tokens", "64")) == 0
    assert not marker.exists()
    only = model_copy(env, tmp_path, name="only-bin", mutate=lambda f: (f / "model.safetensors").unlink())
    shutil.copy(folder / "pytorch_model.bin", only / "pytorch_model.bin")
    line = run_cli(plan_argv(only, tmp_path, "--force"), capsys)  # the same --out holds the calibrated plan
    assert "has no *.safetensors weights" in line and "never loads pickled weights" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
@pytest.mark.parametrize("field", ["weights", "files"])
def test_security_a_manifest_names_no_file_outside_its_folder(field, name, quantized_copy, capsys):
    edit = (lambda d: d.update(weights=name)) if field == "weights" else (lambda d: d["files"].update({name: "0"}))
    folder = quantized_copy(lambda f: _edit(f / "lqplan_manifest.json", edit))
    line = run_cli(["evaluate", "--quantized", folder], capsys)
    assert "not a file name inside" in line, line


@pytest.mark.parametrize("name", ["../g.safetensors", "/etc/passwd", "sub/g.safetensors", "..", "g.bin"])
def test_security_a_cache_index_names_no_file_outside_its_folder(name, tmp_path, caplog):
    """The output objective's cache index names its statistics files: one that is not a plain .safetensors name in
    the folder is never opened; the statistics are recomputed."""
    from planner.profile.output_stats import _read_index

    (tmp_path / "g.safetensors").write_bytes(b"outside")
    assert _read_index(_stats_index(tmp_path / "stats", {"q": {"file": name, "members": ["q"], "inputs": 4}})) is None
    assert "is not inside the folder" in caplog.text


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", ".."])
@pytest.mark.parametrize("field", ["pieces", "files"])
def test_security_a_stage_manifest_names_no_file_outside_the_stage(field, name, tmp_path):
    """The GPU study's stage manifest names the pieces and files it writes and reads under its folder."""
    from planner.study import stage

    manifest = {"pieces": [{"name": "piece-00"}], "files": [{"name": "a.whl"}]}
    manifest[field].append({"name": name})
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(stage.StageError, match="not a file name inside the stage"):
        stage.read_manifest(tmp_path / "m.json")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_security_pickled_weights_alone_are_refused(name, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, lambda f: (f / "model.safetensors").rename(f / name))
    line = run_cli(plan_argv(folder, tmp_path), capsys)
    assert f"(it has {name}); lqplan never loads pickled weights" in line, line


def test_security_a_pickled_adapter_is_refused(quantized, tmp_path):
    from planner.hf.peft import load_lqplan_adapter
    from planner.train import load_quantized

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    model, _ = load_quantized(quantized[4])
    with pytest.raises(UserError) as e:
        load_lqplan_adapter(model, adapter)
    assert "safetensors only" in one_line(e.value)


def test_security_documents_lead_no_write_outside_the_output_folder(quantized_copy, env, tmp_path, capsys):
    """Export reads the plan's model.source (for the tokenizer) and writes only under --out; a plan whose source
    points at another folder changes nothing there."""
    victim = tmp_path / "victim"
    shutil.copytree(env["tiny"], victim)
    def crafted(f):  # a consistent folder (digests updated) whose plan points elsewhere
        from planner.model.digests import file_digests

        _edit(f / "plan.json", lambda d: d["model"].update(source=str(victim)))
        digest = file_digests([f / "plan.json"], memo=False)[0]
        _edit(f / "lqplan_manifest.json", lambda d: d["files"].update({"plan.json": digest}))
    folder = quantized_copy(crafted)
    before = _snapshot(victim)
    assert main(["export", "--quantized", folder, "--format", "merged", "--out", tmp_path / "exp"]) == 0
    assert _snapshot(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim", "exp", "quantized"])


# ==== units: failed or killed runs leave no mixed folders; temp files; the digest memo ===========================

def _edit(path: Path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.fixture(scope="module")
def quantized(env, tmp_path_factory):
    """Two quantized saves of the tiny model with different plans (bits 4 and 8)."""
    from torch import nn
    from transformers import BertModel

    from planner.profile.grid import GridPoint
    from planner.train import apply_plan, explicit_plan, save_quantized
    from quant import QuantConfig

    out = {}
    for bits in (4, 8):
        model = BertModel.from_pretrained(env["tiny"])
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
        plan = explicit_plan(model, GridPoint(QuantConfig(bits=bits, blocksize=64), 4), model_path=env["tiny"],
                             names=names, iters=1)
        apply_plan(model, plan, model_path=env["tiny"], progress=False)
        out[bits] = save_quantized(model, plan, tmp_path_factory.mktemp(f"q{bits}") / "quantized")
    return out


@pytest.fixture
def quantized_copy(quantized, tmp_path):
    def make(mutate=None, bits: int = 4) -> Path:
        folder = tmp_path / "quantized"
        shutil.copytree(quantized[bits], folder)
        if mutate is not None:
            mutate(folder)
        return folder
    return make


def _plan_in(out: Path, env, tmp: Path, *extra) -> int:
    return main(["plan", "--budget", "8bits", "--model", env["tiny"], *GRID, "--quiet", "--out", out,
                     "--cache", env["cache"], *extra])


def _fail_writing(monkeypatch, name: str):
    real = fsio.write_bytes

    def write_bytes(path, data):
        if Path(path).name == name:
            raise UserError(f"cannot write {path}: No space left on device; free disk space")
        return real(path, data)
    monkeypatch.setattr(fsio, "write_bytes", write_bytes)
    import planner.report.render as render
    monkeypatch.setattr(render, "write_bytes", write_bytes)


@pytest.mark.parametrize("fails_at", ["heatmap.png"])
def test_units_a_failed_plan_leaves_the_previous_folder_whole(fails_at, env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _plan_in(out, env, tmp_path) == 0
    before = _snapshot(out)
    _fail_writing(monkeypatch, fails_at)
    assert _plan_in(out, env, tmp_path, "--budget", "6bits", "--force") == 2
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_units_a_plan_without_reports_drops_the_previous_reports(env, tmp_path):
    """A new plan drops everything the previous one's folder held of lqplan's: its reports and the evaluation of
    the previous plan (evaluate --plan writes evaluate.json beside it); the user's own files stay."""
    out = tmp_path / "out"
    assert _plan_in(out, env, tmp_path) == 0
    (out / "notes.txt").write_text("the user's own file")
    (out / "evaluate.json").write_text("{}")
    assert _plan_in(out, env, tmp_path, "--no-report") == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plan.json", "profile.csv", "profile.json"]
    assert (out / "notes.txt").read_text() == "the user's own file"


@pytest.mark.parametrize("where", ["new", "existing", "working-directory", "link"])
def test_units_output_folder_publishes_whole(where, tmp_path, monkeypatch):
    """output_folder: the new files appear together, the replaced names of the previous run go, other files stay;
    a folder holding the working directory is updated in place, a link to a folder keeps being a link."""
    target = tmp_path / "out"
    if where != "new":
        target.mkdir()
        (target / "plan.json").write_text("old")
        (target / "report.md").write_text("old report")
        (target / "mine.txt").write_text("the user's")
    given = target
    if where == "working-directory":
        monkeypatch.chdir(target)
    if where == "link":
        given = tmp_path / "link"
        given.symlink_to(target)
    with outputs.output_folder(given, ("plan.json", "report.md")) as stage:
        fsio.write_text(stage / "plan.json", "new")
        assert not (target / "plan.json").exists() or (target / "plan.json").read_text() == "old"
    names = sorted(p.name for p in target.iterdir())
    assert names == (["plan.json"] if where == "new" else ["mine.txt", "plan.json"])
    assert (target / "plan.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(["link"] if where == "link" else [])])
    if where == "link":
        assert given.is_symlink()


def test_units_sigterm_is_handled_like_ctrl_c(env, tmp_path, capsys, monkeypatch):
    """SIGTERM mid-run: exit 143, one line, no temp file or half folder left, the previous output as it was."""
    import planner.api as api

    out = tmp_path / "out"
    assert _plan_in(out, env, tmp_path, "--no-report") == 0
    before = _snapshot(out)
    real = api.save_table

    def killed(*a, **k):
        paths = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return paths
    monkeypatch.setattr(api, "save_table", killed)
    capsys.readouterr()
    assert _plan_in(out, env, tmp_path, "--budget", "6bits", "--no-report", "--force") == 143
    err = capsys.readouterr().err
    assert err.startswith("lqplan: terminated;") and len(err.splitlines()) == 1, err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_units_a_killed_run_leaves_the_previous_folder_and_the_next_run_removes_its_temps(env, tmp_path):
    """SIGKILL (nothing runs on the way out) while the new folder is being built: the previous folder is whole,
    and the next run removes the dead process's staging folder and temp files."""
    out = tmp_path / "out"
    assert _plan_in(out, env, tmp_path, "--no-report") == 0
    before = _snapshot(out)
    script = ("import os, signal, sys\nimport planner.api as api\nfrom planner import cli\nreal = api.save_table\n"
              "def killed(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              "api.save_table = killed\nsys.exit(cli.main(sys.argv[1:]))\n")
    argv = ["plan", "--budget", "6bits", "--model", str(env["tiny"]), *GRID, "--quiet", "--no-report", "--out",
            str(out), "--cache", str(env["cache"]), "--force"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=subprocess_env(), capture_output=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _snapshot(out) == before
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert left, "the killed run's staging folder should be there for the next run to remove"
    assert _plan_in(out, env, tmp_path, "--no-report") == 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_units_stale_temp_files_of_dead_writers_go_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".plan.json.{fsio._HOST}-{dead.pid}.abc123.tmp"
    mine = tmp_path / f".plan.json.{fsio._HOST}-{os.getpid()}.def456.tmp"
    other_host = tmp_path / f".plan.json.00000000-{dead.pid}.ghi789.tmp"
    for p in (stale, mine, other_host):
        p.write_text("{")
    assert fsio.remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name])


def _swap_in(folder: Path, other: Path, name: str):
    shutil.copy(other / name, folder / name)


@pytest.mark.parametrize("part", ["model.safetensors", "plan.json", "config.json"])
def test_units_a_mixed_quantized_folder_is_refused(part, quantized_copy, quantized, capsys):
    """A part from another save (a killed save of an older lqplan, a hand copy) beside the rest: refused, by the
    manifest's digests, before anything is scored. (Both saves have the same config.json: it is edited.)"""
    def mutate(f):
        if part == "config.json":
            _edit(f / part, lambda d: d.update(hidden_dropout_prob=0.0))
        else:
            _swap_in(f, quantized[8], part)
    folder = quantized_copy(mutate)
    line = run_cli(["evaluate", "--quantized", folder], capsys)
    assert f"{part} is not the file lqplan_manifest.json was written with" in line, line


def test_units_evaluate_refuses_a_plan_for_other_layers(quantized_copy, quantized, capsys):
    """A folder saved before manifests held digests: the plan is checked against the quantized layers."""
    def mutate(f):
        _edit(f / "lqplan_manifest.json", lambda d: d.pop("files"))
        _swap_in(f, quantized[8], "plan.json")
    line = run_cli(["evaluate", "--quantized", quantized_copy(mutate)], capsys)
    assert "is not the plan its quantized layers were made from" in line, line


def test_units_a_killed_save_leaves_the_previous_quantized_folder(quantized, tmp_path, monkeypatch):
    from planner.train import export, load_quantized

    target = tmp_path / "quantized"
    shutil.copytree(quantized[8], target)
    before = _snapshot(target)
    model, plan = load_quantized(quantized[4])
    real = export.write_json

    def die(path, obj):
        if Path(path).name == export.MANIFEST:
            raise KeyboardInterrupt  # as a kill between the weights and the manifest
        return real(path, obj)
    monkeypatch.setattr(export, "write_json", die)
    with pytest.raises(KeyboardInterrupt):
        export.save_quantized(model, plan, target)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["quantized"]


def _memo_env(monkeypatch, path: Path):
    monkeypatch.setenv("LQPLAN_DIGEST_MEMO", str(path))


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-null", "folder"])
def test_units_a_digest_memo_that_is_not_a_regular_file_is_never_replaced(kind, env, tmp_path, monkeypatch, caplog):
    from planner.model.weights import fingerprint

    memo = tmp_path / "memo"
    {"fifo": lambda: os.mkfifo(memo), "link-to-dev-null": lambda: memo.symlink_to("/dev/null"),
     "folder": lambda: memo.mkdir()}[kind]()
    mode = memo.lstat().st_mode
    _memo_env(monkeypatch, memo)
    with deadline(60):
        fp = fingerprint(env["tiny"])
    assert fp.startswith("sha256:")
    assert memo.lstat().st_mode == mode
    assert [p.name for p in tmp_path.iterdir()] == ["memo"]


@pytest.mark.parametrize("content", [b"{", b"[" * 100000, b"\xff\xfe", b'{"a": 1}', b"[]", b"x" * 100])
def test_units_a_corrupt_or_deep_memo_is_ignored_with_a_warning(content, env, tmp_path, monkeypatch, caplog):
    from planner.model.weights import fingerprint

    memo = tmp_path / "memo.json"
    memo.write_bytes(content)
    _memo_env(monkeypatch, memo)
    truth = fingerprint(env["tiny"])
    monkeypatch.setenv("LQPLAN_DIGEST_MEMO", "off")
    assert fingerprint(env["tiny"]) == truth


# ==== silent misreads ==============================================================================================

PARAS = st.lists(st.text(alphabet=st.characters(categories=("L", "N"), include_characters=" .,"), min_size=1,
                         max_size=30).map(str.strip).filter(bool), min_size=1, max_size=6)


@MANY
@given(PARAS, st.sampled_from(["\n", "\r\n", "\r"]), st.sampled_from(["", " ", "\t", "  "]))
def test_misread_line_ends_and_blank_lines(tmp_path_factory, paras, eol, blank):
    """Paragraphs split on blank lines whatever the line ends (LF, CRLF, CR-only) and whatever spaces the blank
    line holds; lines inside a paragraph stay one paragraph."""
    text = (eol + blank + eol).join(p + eol + "second line" for p in paras) + eol
    path = tmp_path_factory.mktemp("eol") / "t.txt"
    path.write_bytes(text.encode())
    got = fsio._split_paragraphs(path.read_bytes().decode())
    assert got == [p + "\nsecond line" for p in paras]


@pytest.mark.parametrize("value", ["no", "yes", "false", 0, 1, None, [], {}])
def test_misread_double_quant_must_be_a_boolean(value):
    from planner.plan.document import Plan

    doc = _valid_plan()
    doc["matrices"][0]["double_quant"] = value
    with pytest.raises(UserError) as e:
        Plan.from_dict(doc)
    assert "double_quant" in one_line(e.value)


@pytest.mark.parametrize("value", ["BertModel", [5], [""], {"a": 1}, 7, [["BertModel"]]])
def test_misread_architectures_must_be_a_list_of_names(value, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, lambda f: _edit(f / "config.json", lambda d: d.update(architectures=value)))
    line = run_cli(plan_argv(folder, tmp_path), capsys)
    assert "architectures is" in line and "not a list of class names" in line, line


# ==== class 1: malformed safetensors headers ======================================================================

ST_CODES = ["F32", "F16", "BF16", "I64", "U8", "BOOL"]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


def _file(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@st.composite
def valid_headers(draw):
    """A valid safetensors header and its data: 1-4 tensors laid out back to back."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 4))):
        code = draw(st.sampled_from(ST_CODES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = ITEMSIZE[code]
        for s in shape:
            n *= s
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, b"\0" * offset


BAD_VALUES = st.one_of(JSON, st.floats(), st.integers(-2**64, 2**64), st.just(-1), st.just(float("inf")),
                       st.sampled_from(["Q4_0", "F8", "f32", "", "F32 "]))


@st.composite
def malformed_headers(draw):
    """A valid header with one thing broken: a field replaced by any JSON value, a tensor's offsets moved, the
    metadata replaced, data bytes added or cut, the header length field lied about, or the JSON nested deep."""
    header, data = draw(valid_headers())
    kind = draw(st.sampled_from(["field", "offsets", "metadata", "data", "length", "nest", "entry", "bytes"]))
    length = None
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    if kind == "field":
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(BAD_VALUES)
    elif kind == "offsets":
        begin, end = header[name]["data_offsets"]
        delta = draw(st.integers(-8, 8))
        header[name]["data_offsets"] = draw(st.sampled_from([[begin + delta, end + delta], [begin, end + delta],
                                                             [end, begin], [begin + delta, end]]))
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON | st.dictionaries(st.text(max_size=4), JSON, min_size=1, max_size=3))
    elif kind == "data":
        cut = draw(st.integers(-len(data), 16))
        data = data[:cut] if cut < 0 else data + b"\1" * cut
    elif kind == "length":
        length = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, 10**9, 100_000_001])) \
            if draw(st.booleans()) else len(json.dumps(header)) + draw(st.integers(-5, 5))
    elif kind == "nest":
        depth = draw(st.integers(4, 5000))
        header[name]["shape"] = json.loads("[" * depth + "]" * depth) if depth < 900 else None
        if depth >= 900:  # too deep for json.dumps to write: build the text itself
            return b'{"x": ' + b"[" * depth + b"]" * depth + b"}", data, None
    elif kind == "entry":
        header[name] = draw(JSON)
    else:
        raw = bytearray(json.dumps(header).encode())
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] = draw(st.integers(0, 255))
        return bytes(raw), data, None
    return header, data, length


def _safetensors_reads_it(path: Path, table) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in table:
            t = f.get_tensor(key)
            assert tuple(t.shape) == table[key].shape
    return True


@FAST
@given(malformed_headers())
def test_c1_every_header_is_read_or_refused_in_one_line(tmp_path_factory, case):
    """read_header_table's own bounds: whatever it accepts, safetensors opens and reads tensor by tensor; whatever
    it refuses is one UserError naming the file (never a RecursionError, SafetensorError or MemoryError)."""
    from planner.model.weights import read_header_table

    header, data, length = case
    path = _file(tmp_path_factory.mktemp("h") / "model.safetensors", header, data, length)
    try:
        table = read_header_table(path)
    except UserError as e:
        assert str(path) in one_line(e)
        return
    assert _safetensors_reads_it(path, table)


@MANY
@given(malformed_headers())
def test_c1_cached_output_statistics_with_a_malformed_header(tmp_path_factory, case):
    """A statistics file of the output objective's cache goes through the same header check: one line saying the
    cache is damaged and how to recompute it."""
    from planner.profile.output_stats import OutputStats, _read_index

    header, data, length = case
    folder = _stats_index(tmp_path_factory.mktemp("s") / "stats",
                          {"q": {"file": "g.safetensors", "members": ["q"], "inputs": 2}})
    _file(folder / "g.safetensors", header, data, length)
    with pytest.raises(UserError) as e:
        OutputStats(folder, _read_index(folder), 0.01).get("q")
    line = one_line(e.value)
    assert str(folder) in line and "recompute" in line, line


@FAST
@given(valid_headers())
def test_c1_valid_headers_are_read_exactly(tmp_path_factory, case):
    from planner.model.weights import read_header_table

    header, data = case
    path = _file(tmp_path_factory.mktemp("h") / "model.safetensors", header, data)
    table = read_header_table(path)
    assert {k: (e.dtype, list(e.shape)) for k, e in table.items()} == {
        k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _header_of(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite_header(edit):
    def mutate(folder: Path):
        header, data = _header_of(folder)
        out = edit(header, data)
        header, data = out if isinstance(out, tuple) else (header, data)
        _file(folder / "model.safetensors", header, data)
    return mutate


def _entry_set(key, field, value):
    return _rewrite_header(lambda h, d: h[key].__setitem__(field, value))


HEADER_CASES = {
    "negative-shape": (_entry_set(f"{Q0}.weight", "shape", [-64, -64]), ["malformed safetensors header",
                                                                         "not a list of at most 16 integers >= 0"]),
    "float-shape": (_entry_set(f"{Q0}.weight", "shape", [64.0, 64]), ["malformed safetensors header", "shape"]),
    "string-shape": (_entry_set(f"{Q0}.weight", "shape", "64x64"), ["malformed safetensors header", "shape"]),
    "unknown-dtype": (_entry_set(f"{Q0}.weight", "dtype", "Q4_0"), ["unknown dtype 'Q4_0'"]),
    "metadata-list": (_rewrite_header(lambda h, d: h.__setitem__("__metadata__", ["pt"])),
                      ["__metadata__ must map names to strings"]),
    "metadata-ints": (_rewrite_header(lambda h, d: h.__setitem__("__metadata__", {"format": 1})),
                      ["__metadata__ must map names to strings"]),
    "overlap": (_rewrite_header(lambda h, d: h[f"{Q0}.weight"].__setitem__(
        "data_offsets", [h[f"{Q0}.weight"]["data_offsets"][0] - 4, h[f"{Q0}.weight"]["data_offsets"][1] - 4])),
        ["overlap"]),
    "past-the-end": (_rewrite_header(lambda h, d: (h, d[:-100])), ["is truncated"]),
    "nested-deep": (lambda f: _file(f / "model.safetensors", b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}"),
                    ["nests 50001 levels deep"]),
    "header-over-the-limit": (lambda f: _file(f / "model.safetensors", b"{}", length=200_000_000),
                              ["more than safetensors' limit"]),
    "duplicate-name": (lambda f: _file(f / "model.safetensors", b'{"a": {"dtype": "U8", "shape": [1], '
                                       b'"data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], '
                                       b'"data_offsets": [1, 2]}}', b"\0\0"), ["occurs twice"]),
    "not-an-object": (lambda f: _file(f / "model.safetensors", b"[1, 2]"), ["does not start with '{'"]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_c1_cli_names_the_file_and_the_cause(case, env, tmp_path, capsys):
    mutate, words = HEADER_CASES[case]
    folder = model_copy(env, tmp_path, mutate)
    line = run_cli(plan_argv(folder, tmp_path), capsys, [tmp_path / "out"])
    assert str(folder / "model.safetensors") in line and "re-download" in line, line
    for w in words:
        assert w in line, (w, line)


def test_c1_a_shard_name_that_is_not_utf8_is_named(env, tmp_path, capsys):
    folder = model_copy(env, tmp_path)
    os.rename(folder / "model.safetensors", os.fsencode(folder) + b"/model-\xff.safetensors")
    line = run_cli(plan_argv(folder, tmp_path), capsys)
    assert "name is not UTF-8" in line and "\\udcff" in line, line


# ==== class 2: special files =======================================================================================

def _fifo(path: Path):
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path):
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to("/dev/zero")


def _huge(path: Path):
    """A sparse file past every cap (nothing is written to disk)."""
    with open(path, "wb") as f:
        f.truncate((1 << 30) + 1)


SPECIAL = {"fifo": (_fifo, "FIFO"), "dev-zero": (_dev_zero, "character device"), "huge": (_huge, "more than the")}


def _roles(env, quantized):
    """role -> (argv builder(tmp, special_path_maker) -> argv): each puts a special file where lqplan reads one."""
    def in_model(name):
        def build(tmp, make):
            folder = model_copy(env, tmp)
            if name == "model.safetensors.index.json":
                (folder / name).write_text("{}")
            make(folder / name)
            return plan_argv(folder, tmp)
        return build

    def in_plan_folder(name):
        def build(tmp, make):
            folder = tmp / "planfolder"
            shutil.copytree(env["plan"].parent, folder)
            make(folder / name)
            return ["report", "--plan", folder / "plan.json", "--out", tmp / "rep"]
        return build

    def in_quantized(name):
        def build(tmp, make):
            folder = tmp / "q"
            shutil.copytree(quantized[4], folder)
            make(folder / name)
            return ["evaluate", "--quantized", folder]
        return build

    def text(option, verb):
        def build(tmp, make):
            path = tmp / "text.txt"
            path.write_text("x")
            make(path)
            if verb == "plan":
                return plan_argv(env["tiny"], tmp, option, path)
            if verb == "evaluate":
                return ["evaluate", "--quantized", quantized[4], option, path]
            return ["train", "--plan", env["plan"], "--steps", "1", "--quiet", "--out", tmp / "t", option, path]
        return build

    def data_file(tmp, make):
        path = tmp / "records.jsonl"
        path.write_text("{}")
        make(path)
        return ["train", "--plan", env["plan"], "--steps", "1", "--quiet", "--out", tmp / "t", "--data", path]

    return {"config.json": in_model("config.json"), "index": in_model("model.safetensors.index.json"),
            "weights": in_model("model.safetensors"), "tokenizer.json": in_model("tokenizer.json"),
            "plan.json": in_plan_folder("plan.json"), "profile.csv": in_plan_folder("profile.csv"),
            "profile.json": in_plan_folder("profile.json"), "manifest": in_quantized("lqplan_manifest.json"),
            "quantized-plan": in_quantized("plan.json"), "quantized-config": in_quantized("config.json"),
            "quantized-weights": in_quantized("model.safetensors"), "calib": text("--calib", "plan"),
            "eval-text": text("--eval-text", "evaluate"), "train-text": text("--text", "train"), "data": data_file}


ROLES = ["config.json", "index", "weights", "tokenizer.json", "plan.json", "profile.csv", "profile.json", "manifest",
         "quantized-plan", "quantized-config", "quantized-weights", "calib", "eval-text", "train-text", "data"]


# large weights are what weights are (their header bounds apply, class 1), and a tokenizer is transformers' to read
SPECIAL_CASES = [(role, kind) for role in ROLES for kind in SPECIAL
                 if not (kind == "huge" and role in ("weights", "quantized-weights", "tokenizer.json"))]


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_c2_a_special_file_as_the_packaged_marker_never_hangs_a_tokenizer_load(kind, tmp_path):
    """Every tokenizer load looks for the packaged-model marker in the folder: a FIFO or device there is passed
    over (the folder is not a packaged one), not waited on or read to the end."""
    from planner.model.packaged import MARKER, packaged_spec

    SPECIAL[kind][0](tmp_path / MARKER)
    with deadline(30):
        assert packaged_spec(tmp_path) is None


@pytest.mark.parametrize("role,kind", SPECIAL_CASES)
def test_c2_special_files_never_hang_or_fill_memory(role, kind, env, quantized, tmp_path, capsys):
    make, word = SPECIAL[kind]
    argv = _roles(env, quantized)[role](tmp_path, make)
    line = run_cli(argv, capsys)
    assert word in line, line
    if kind == "huge":
        assert "iB" in line  # the cap is stated


def test_c2_run_json_as_a_fifo_is_skipped_not_waited_for(env, tmp_path, capsys, caplog):
    folder = tmp_path / "planfolder"
    shutil.copytree(env["plan"].parent, folder)
    _fifo(folder / "run.json")
    with deadline(120):
        assert main(["report", "--plan", folder / "plan.json", "--out", tmp_path / "rep"]) == 0
    assert "FIFO" in caplog.text


# ==== class 3: config.json values of the wrong type or out of range ===============================================

CONFIG_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "model_type", "architectures", "tie_word_embeddings", "is_decoder",
                 "layer_norm_eps", "hidden_dropout_prob", "hidden_act", "type_vocab_size", "num_key_value_heads",
                 "head_dim", "quantization_config", "rope_scaling", "torch_dtype"]


@SOME
@given(st.sampled_from(CONFIG_FIELDS), BAD_VALUES)
def test_c3_config_values_of_any_type_plan_or_fail_in_one_line(env, tmp_path_factory, field, value):
    """One wrong field: memory_table and resolve + discover (what plan runs before profiling) return or raise a
    one-line UserError; never a transformers traceback."""
    from planner.model.discover import discover_matrices
    from planner.model.memory import memory_table
    from planner.model.resolve import resolve_model

    folder = model_copy(env, tmp_path_factory.mktemp("cfg"), lambda f: _edit(f / "config.json",
                                                                             lambda d: d.update({field: value})))
    for step in (lambda: memory_table(folder), lambda: discover_matrices(resolve_model(folder))):
        try:
            with deadline(60):
                step()
        except UserError as e:
            one_line(e)


@pytest.fixture(scope="module")
def tiny_config(env):
    return json.loads((env["tiny"] / "config.json").read_text())


@FAST
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS + ["n_embd", "n_layer", "n_positions", "auto_map"]), BAD_VALUES,
                       min_size=1, max_size=3))
def test_c3_what_check_config_passes_transformers_reads(tiny_config, changes):
    """check_config (lqplan's own bounds) and then transformers: a config or a one-line UserError, nothing else."""
    from planner.model.config import check_config
    from planner.model.hfload import config_from_dict

    doc = {**tiny_config, **changes}
    try:
        config_from_dict(check_config(doc, "config.json"))
    except UserError as e:
        one_line(e)


@pytest.mark.parametrize("field,value,words", [
    ("architectures", [5], ["architectures is [5]"]),
    ("hidden_size", "large", ["hidden_size is 'large'", "not an integer"]),
    ("hidden_size", 64.0, ["hidden_size is 64.0"]),
    ("num_hidden_layers", 10**9, ["num_hidden_layers is 1000000000", "not an integer from 1 to 4,096"]),
    ("num_hidden_layers", 3, ["num_hidden_layers=3 but the weights hold 2 layer blocks"]),
    ("num_hidden_layers", 0, ["num_hidden_layers is 0"]),
    ("vocab_size", -5, ["vocab_size is -5"]),
    ("tie_word_embeddings", "yes", ["tie_word_embeddings is 'yes'"]),
    ("layer_norm_eps", "tiny", ["transformers cannot read the config.json", "layer_norm_eps"]),
    ("architectures", ["BertForMaskedLM"], ["names BertForMaskedLM", "saved from another class"]),
    ("architectures", ["LlamaForCausalLM"], ["names LlamaForCausalLM, a 'llama' model", "model_type is 'bert'"]),
    ("model_type", 7, ["model_type is 7"]),
])
def test_c3_config_field_named_in_the_line(field, value, words, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, lambda f: _edit(f / "config.json", lambda d: d.update({field: value})))
    line = run_cli(plan_argv(folder, tmp_path), capsys, [tmp_path / "out"])
    for w in words:
        assert w in line, (w, line)


# ==== class 4: plan / run / manifest documents with wrong-typed fields ============================================

@MANY
@given(mutated_plans())
def test_c4_a_plan_that_loads_renders_its_totals(doc):
    """Whatever Plan.from_dict accepts, every reader of its fields can use (the report's totals, its proof text,
    the Fisher comparison); whatever it refuses is one line."""
    from planner.plan.document import Plan
    from planner.report.frames import fisher_frame
    from planner.report.render import _totals_md

    try:
        plan = Plan.from_dict(doc)
    except UserError as e:
        one_line(e)
        return
    _totals_md(plan)
    fisher_frame((plan.method.get("fisher") or {}).get("comparison"))


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set_path(doc, path, value):
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@pytest.fixture(scope="module")
def real_plan(env):
    return json.loads(env["plan"].read_text())


@FAST
@given(st.data(), st.sampled_from(["1", "x", True, None, [], {}, 1.5, {"a": [1]}, "0.1", -1]))
def test_c4_any_field_of_a_real_plan_wrong_typed(real_plan, data, value):
    """Every field of a real plan.json (the fisher record, the solver's gap, the budget...) replaced by a value of
    another type: a plan or one line."""
    import copy

    from planner.plan.document import Plan
    from planner.report.render import _totals_md

    doc = copy.deepcopy(real_plan)
    doc["method"]["fisher"] = {"source": "pydoc", "key": "k", "tokens": 64, "comparison": {"matrices": 3}}
    _set_path(doc, data.draw(st.sampled_from(sorted(_paths(doc), key=str))), value)
    try:
        plan = Plan.from_dict(doc)
    except UserError as e:
        one_line(e)
        return
    _totals_md(plan)


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["method"].update(fisher=[1]), ["method.fisher is [1], not an object"]),
    (lambda d: d["method"].update(fisher=5), ["method.fisher is 5"]),
    (lambda d: d["method"].update(fisher={"source": "pydoc", "key": "k", "tokens": "64"}),
     ["method.fisher.tokens is '64', not an integer"]),
    (lambda d: d["method"].update(fisher={"source": "pydoc", "key": "k", "tokens": 64, "comparison": "x"}),
     ["method.fisher.comparison is 'x', not an object"]),
    (lambda d: d["solver"].update(gap="0.01"), ["solver.gap is '0.01', not a number"]),
    (lambda d: d["solver"].update(mip_rel_tol="1e-6"), ["solver.mip_rel_tol is '1e-6'"]),
    (lambda d: d["budget"].update(value="3"), ["budget.value is '3'"]),
    (lambda d: d["model"].update(name=["x"]), ["model.name is ['x'], not a string"]),
    (lambda d: d.update(totals=[]), ["totals is [], not an object"]),
    (lambda d: d["matrices"][0].update(asymmetric="no"), ["matrices[0].asymmetric is 'no', not true or false"]),
    (lambda d: d["matrices"][0].update(double_quant="yes"), ["double_quant is 'yes'"]),
    (lambda d: d.update(matrices=json.loads("[" * 200 + "]" * 200)), ["nests 201 levels deep"]),
])
def test_c4_report_names_the_wrong_field(edit, words, env, tmp_path, capsys):
    """Each wrong-typed field the readers use is named; the Fisher record may also be the calibration source's name
    alone (plans written by the benches: test below)."""
    ctx = Ctx(tmp_path, env)
    line = run_cli(["report", "--plan", ctx.plan_copy(edit), "--out", tmp_path / "rep"], capsys,
                   [tmp_path / "rep"])
    for w in words:
        assert w in line, (w, line)


def test_c4_a_fisher_source_name_instead_of_the_record_renders(env, tmp_path):
    ctx = Ctx(tmp_path, env)
    assert main(["report", "--plan", ctx.plan_copy(lambda d: d["method"].update(fisher="pydoc")), "--out",
                 tmp_path / "rep"]) == 0


@MANY
@given(st.dictionaries(st.sampled_from(["profile_seconds", "solver_seconds", "computed_points", "total_seconds",
                                        "cached_points", "plan_sha256", "other"]), JSON, max_size=4) | JSON)
def test_c4_run_json_of_any_shape_is_used_or_skipped(tmp_path_factory, doc):
    from planner.report.run_stats import read_run_stats
    from planner.report.render import _totals_md

    folder = tmp_path_factory.mktemp("run")
    (folder / "run.json").write_text(json.dumps(doc))
    stats = read_run_stats(folder)
    assert isinstance(stats, dict)
    plan = _plan_obj()
    if "solver_seconds" in stats:
        plan.solver["seconds"] = stats.pop("solver_seconds")
    _totals_md(plan)
    for k, v in stats.items():
        str(v)


def _plan_obj():
    from planner.plan.document import Plan

    return Plan.from_dict(_valid_plan())


@MANY
@given(st.data(), JSON)
def test_c4_any_manifest_field_wrong_typed(quantized, data, value):
    import copy

    from planner.train.manifest import read_manifest

    doc = json.loads((quantized[4] / "lqplan_manifest.json").read_text())
    doc = copy.deepcopy(doc)
    _set_path(doc, data.draw(st.sampled_from(sorted(_paths(doc), key=str))), value)
    folder = quantized[4].parent / "m"
    folder.mkdir(exist_ok=True)
    (folder / "lqplan_manifest.json").write_text(json.dumps(doc))
    try:
        read_manifest(folder)
    except UserError as e:
        one_line(e)


@pytest.fixture(scope="module")
def plan_and_table(env):
    from planner.plan.document import Plan
    from planner.profile.table import read_profile_csv

    return Plan.load(env["plan"]), read_profile_csv(env["plan"].parent / "profile.csv")


@MANY
@given(JSON | st.dictionaries(st.sampled_from(["model", "fingerprint", "sha256", "rows", "columns"]), JSON))
def test_c4_profile_json_of_any_shape(plan_and_table, tmp_path_factory, doc):
    from planner.report.sources import check_profile_matches

    folder = tmp_path_factory.mktemp("prof")
    (folder / "profile.json").write_text(json.dumps(doc))
    plan, table = plan_and_table
    try:
        check_profile_matches(plan, table, folder / "profile.json", "0" * 64)
    except UserError as e:
        one_line(e)


def _stats_index(folder: Path, groups) -> Path:
    from planner.profile.output_stats import SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps({"schema": SCHEMA, "groups": groups}))
    return folder


_GROUP = st.fixed_dictionaries({"file": st.sampled_from(["g.safetensors", "../g.safetensors", "g"]) | st.text(max_size=9),
                                "members": JSON | st.lists(st.text(max_size=4), max_size=2), "inputs": JSON},
                               optional={"layer": JSON, "tokens": JSON})


@MANY
@given(JSON | st.dictionaries(st.text(max_size=4), JSON | _GROUP, max_size=3))
def test_c4_output_statistics_index_of_any_shape_is_used_or_recomputed(tmp_path_factory, groups):
    """The output objective's cache index: whatever it holds, it is used with every field its reader needs typed,
    or ignored with a warning (the statistics are recomputed), never a traceback."""
    from planner.profile.output_stats import _read_index

    index = _read_index(_stats_index(tmp_path_factory.mktemp("s") / "stats", groups))
    if index is not None:
        for g in index["groups"].values():
            assert Path(g["file"]).name == g["file"] and g["file"].endswith(".safetensors")
            assert isinstance(g["inputs"], int) and all(isinstance(m, str) for m in g["members"])


# ==== class 5: broken models that would plan with exit 0 ==========================================================

UNPLANNED = [LN, "embeddings.word_embeddings.weight", "encoder.layer.1.output.LayerNorm.bias",
             f"{Q0}.bias", "pooler.dense.weight"]


def _poke(key, value):
    def mutate(folder: Path):
        tensors = load_file(str(folder / "model.safetensors"))
        t = tensors[key].clone()
        t.view(-1)[0] = value
        tensors[key] = t
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return mutate


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", UNPLANNED)
def test_c5_nan_or_inf_in_an_unplanned_tensor_is_refused(key, value, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, _poke(key, value))
    line = run_cli(plan_argv(folder, tmp_path), capsys, [tmp_path / "out"])
    assert f"tensor {key} in" in line and ("NaN" if value != value else "Inf") in line, line


@pytest.fixture(scope="module")
def tiny_tensors(env):
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model

    source = resolve_model(env["tiny"])
    planned = {m.tensor_key for m in discover_matrices(source)}
    tensors = load_file(str(env["tiny"] / "model.safetensors"))
    return tensors, sorted(k for k, t in tensors.items() if k not in planned and t.is_floating_point()), \
        env["tiny"] / "config.json"


@MANY
@given(st.data(), st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_c5_any_unplanned_tensor_any_position(tiny_tensors, tmp_path_factory, data, value):
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model
    from planner.model.stream import check_unplanned_finite

    tensors, unplanned, config = tiny_tensors
    key = data.draw(st.sampled_from(unplanned))
    t = tensors[key].clone()
    t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = value
    folder = tmp_path_factory.mktemp("m")
    save_file({**tensors, key: t}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(config, folder / "config.json")
    source = resolve_model(folder)
    with pytest.raises(UserError) as e:
        check_unplanned_finite(source, discover_matrices(source))
    assert f"tensor {key} in" in one_line(e.value)


@pytest.mark.parametrize("verb", ["plan", "profile"])
def test_c5_a_folder_without_plannable_matrices_is_refused(verb, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "no-layers"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=16)).save_pretrained(folder)
    argv = plan_argv(folder, tmp_path) if verb == "plan" else [
        "profile", "--model", folder, *GRID, "--quiet", "--out", tmp_path / "o", "--cache", tmp_path / "c"]
    line = run_cli(argv, capsys)
    assert "has no plannable matrices" in line, line


# ==== class 6: devices ============================================================================================

@FAST
@given(st.text(max_size=12) | st.sampled_from(["meta", "mps", "xpu", "cuda:-1", "cuda:99", "cpu:1", "cuda:0:1",
                                              "hpu", "vulkan", "cuda0", "CPU", "cuda:", " cpu", "gpu"]))
def test_c6_only_cpu_cuda_and_cuda_n(spec):
    from planner.devices import resolve_device

    try:
        dev = resolve_device(spec)
    except UserError as e:
        one_line(e)
        return
    assert dev.type in ("cpu", "cuda")
    if dev.type == "cuda":
        assert torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:7", "tpu"])
@pytest.mark.parametrize("verb", ["plan", "train"])
def test_c6_cli_refuses_a_device_before_any_work(verb, device, env, tmp_path, capsys):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    argv = plan_argv(env["tiny"], tmp_path, "--device", device) if verb == "plan" else [
        "train", "--plan", env["plan"], "--steps", "1", "--quiet", "--out", tmp_path / "t", "--device", device]
    line = run_cli(argv, capsys)
    assert device in line and ("cuda:N" in line or "CUDA" in line), line


# ==== class 7: paths, windows, vocabularies, start-up =============================================================

PATH_OPTIONS = ["--model", "--out", "--cache", "--calib", "--plan", "--profile", "--text", "--eval-text", "--data",
                "--quantized"]


def _argv_with(option: str, value: str, env, tmp: Path) -> list:
    if option in ("--model", "--out", "--cache", "--calib"):
        argv = plan_argv(env["tiny"], tmp)
        if option in argv:
            argv[argv.index(option) + 1] = value
            return argv
        return argv + [option, value]
    if option in ("--plan", "--profile"):
        argv = ["report", "--plan", env["plan"], "--out", tmp / "r"]
        if option == "--plan":
            argv[2] = value
            return argv
        return argv + [option, value]
    if option in ("--text", "--data"):
        return ["train", "--plan", env["plan"], "--steps", "1", "--out", tmp / "t", option, value]
    if option == "--eval-text":
        return ["evaluate", "--quantized", tmp / "q", option, value]
    return ["evaluate", "--quantized", value]


@pytest.mark.parametrize("kind", ["long-component", "no-such-user", "nul"])
@pytest.mark.parametrize("option", PATH_OPTIONS)
def test_c7_odd_paths_are_one_line(option, kind, env, tmp_path, capsys):
    value = {"long-component": str(tmp_path / ("a" * 300) / "x"), "no-such-user": "~nosuchuser12345/x",
             "nul": str(tmp_path / "a\0b")}[kind]
    line = run_cli(_argv_with(option, value, env, tmp_path), capsys)
    assert {"long-component": "255", "no-such-user": "names no user", "nul": "NUL"}[kind] in line, line


@pytest.mark.parametrize("paragraphs", [1, 2])
def test_c7_calibration_on_one_paragraph(paragraphs, env, tmp_path, capsys):
    """An encoder's Fisher weights contrast the paragraphs of a batch: one paragraph is refused in one line, two
    make a plan."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(["A paragraph of calibration text, long enough for lqplan to count it."]
                                 * paragraphs))
    argv = plan_argv(env["tiny"], tmp_path, "--calib", calib, "--calib-tokens", "8")
    if paragraphs == 1:
        line = run_cli(argv, capsys)
        assert "has 1 paragraph" in line and "at least 2" in line, line
    else:
        assert main(argv) == 0


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory, minilm_path):
    """Tiny Llama folders with the MiniLM tokenizer (30522 tokens): one with 16 positions, one with a 1000-token
    vocabulary (smaller than its tokenizer); and a plan for each."""
    from conftest import seeded_tiny_llama
    from transformers import AutoTokenizer

    from planner.profile.grid import GridPoint
    from planner.train import explicit_plan
    from quant import QuantConfig

    tok = AutoTokenizer.from_pretrained(minilm_path, bos_token="[CLS]")
    out = {}
    for name, vocab, positions in (("short", 30522, 16), ("small-vocab", 1000, 64)):
        folder = tmp_path_factory.mktemp(name) / "model"
        model = seeded_tiny_llama(vocab, max_position_embeddings=positions)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 0), model_path=folder,
                             names=names, iters=0)
        from planner.model.resolve import resolve_model

        plan.model["fingerprint"] = resolve_model(folder).fingerprint
        plan.save(folder.parent / "plan.json")
        out[name] = folder
    return out


def _window_argv(verb: str, folder: Path, tmp: Path) -> list:
    plan = folder.parent / "plan.json"
    if verb == "train":
        return ["train", "--plan", plan, "--max-len", "32", "--steps", "1", "--quiet", "--no-reference", "--out",
                tmp / "t"]
    return ["evaluate", "--plan", plan, "--max-len", "32", "--eval-tokens", "64", "--quiet", "--out", tmp / "e"]


@pytest.mark.parametrize("verb", ["train", "evaluate-plan"])
def test_c7_a_window_longer_than_the_positions(verb, llama_folders, tmp_path, capsys):
    line = run_cli(_window_argv(verb, llama_folders["short"], tmp_path), capsys)
    assert "--max-len 32 is longer than the model's 16 positions" in line, line


@pytest.mark.parametrize("verb", ["train", "evaluate-plan"])
def test_c7_a_tokenizer_larger_than_the_vocabulary(verb, llama_folders, tmp_path, capsys):
    line = run_cli(_window_argv(verb, llama_folders["small-vocab"], tmp_path), capsys)
    assert "has 30,522 tokens but the model's vocabulary" in line and "1,000" in line, line


STARTUP = ("import sys, runpy\n"
           "class Stop:\n"
           "    @staticmethod\n"
           "    def find_spec(name, path=None, target=None):\n"
           "        if name == {module!r}:\n"
           "            raise KeyboardInterrupt\n"
           "sys.meta_path.insert(0, Stop)\n"
           "sys.argv = ['lqplan', 'plan', '--budget', '3bits']\n"
           "runpy.run_module('planner', run_name='__main__')\n")


@pytest.mark.parametrize("module", ["planner.cli.commands", "torch"])
def test_c7_ctrl_c_during_start_up_is_one_line(module, tmp_path):
    proc = subprocess.run([sys.executable, "-c", STARTUP.format(module=module)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("lqplan: interrupted") and len(proc.stderr.splitlines()) == 1, proc.stderr


# ==== class 8: messages that name the real cause ==================================================================

def test_c8_a_long_tensor_name_plans(env, tmp_path, capsys):
    """A 300-character module path is a legal tensor name: the cache file name is bounded, so the plan works (no
    'choose a writable folder')."""
    from planner.profile.cache import safe_name

    name = "encoder." + "x" * 300 + ".dense"
    assert len(safe_name(name)) <= 200 and safe_name(name) != safe_name(name + "y")
    long = "block" + "x" * 295
    folder = model_copy(env, tmp_path, _rename_modules("encoder.", f"{long}."))
    assert main(plan_argv(folder, tmp_path)) == 0, capsys.readouterr().err


def _rename_modules(old: str, new: str):
    def mutate(folder: Path):
        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k.replace(old, new): v for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("architectures")
        cfg["model_type"] = "unknownnet"  # built by lqplan's fallback discovery, from the tensor names
        (folder / "config.json").write_text(json.dumps(cfg))
    return mutate


@pytest.mark.parametrize("key", [f"{Q0}.weight", "encoder.layer.1.output.dense.weight", LN])
def test_c8_a_negative_shape_is_a_malformed_header_not_a_config_mismatch(key, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, _entry_set(key, "shape", [-1, 64]))
    line = run_cli(plan_argv(folder, tmp_path), capsys)
    assert "malformed safetensors header" in line and "use the config.json" not in line, line


@pytest.mark.parametrize("value", [3.0e38, -1.0e20, 1.0e16])
def test_c8_values_that_overflow_the_error_computation(value, env, tmp_path, capsys):
    folder = model_copy(env, tmp_path, _poke(f"{Q0}.weight", value))
    line = run_cli(plan_argv(folder, tmp_path), capsys)
    assert "overflow float32 in the decomposition's error computation" in line and Q0 in line, line
    assert "re-profile" not in line


@pytest.mark.parametrize("errno_name,words", [("ENAMETOOLONG", ["longer than the file system allows"]),
                                              ("ENOSPC", ["No space left on device", "free disk space"]),
                                              ("EACCES", ["Permission denied"])])
def test_c8_write_errors_name_their_cause(errno_name, words, tmp_path):
    import errno

    def fail(*a, **k):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    real = Path.write_bytes
    Path.write_bytes = fail
    try:
        with pytest.raises(UserError) as e:
            fsio.write_bytes(tmp_path / "x.json", b"{}")
    finally:
        Path.write_bytes = real
    for w in words:
        assert w in one_line(e.value), e.value
    if errno_name == "ENAMETOOLONG":
        assert "free disk space" not in str(e.value)


# ==== the count by class (docs/reliability.md) =====================================================================

CLASSES = {"security": "security: no code run, no pickle, no path outside", "units": "folders written as a unit, "
           "temp files, the digest memo", "misread": "silent misreads", "c1": "1 malformed safetensors headers",
           "c2": "2 special files", "c3": "3 config.json values", "c4": "4 plan / run / profile / manifest documents",
           "c5": "5 broken models", "c6": "6 devices", "c7": "7 paths, windows, vocabularies, start-up",
           "c8": "8 messages that name the cause"}


def case_counts(nodeids) -> dict[str, int]:
    """Cases per class from collected test ids: a parametrized case counts once, a hypothesis test as its
    max_examples."""
    counts = dict.fromkeys(CLASSES, 0)
    for nodeid in nodeids:
        name = nodeid.split("::")[-1].split("[")[0]
        if not name.startswith("test_"):
            continue
        cls = name[len("test_"):].split("_")[0]
        if cls not in counts:
            continue
        fn = globals()[name]
        examples = getattr(getattr(fn, "_hypothesis_internal_use_settings", None), "max_examples", None)
        counts[cls] += examples if getattr(fn, "is_hypothesis_test", False) else 1
    return counts


def test_every_class_has_many_cases(request):
    counts = case_counts(item.nodeid for item in request.session.items if item.fspath == request.node.fspath)
    if len(counts) and sum(counts.values()) < 100:
        pytest.skip("only part of the file was collected")
    assert all(n >= 5 for n in counts.values()), counts


if __name__ == "__main__":  # python tests/test_hostile.py < ids (pytest --collect-only -q tests/test_hostile.py)
    got = case_counts(line.strip() for line in sys.stdin if "::" in line)
    for key, n in got.items():
        print(f"| {CLASSES[key]} | {n} |")
    print(f"| total | {sum(got.values())} |")
