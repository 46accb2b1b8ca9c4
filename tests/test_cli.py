"""The command line's start-up: help and usage errors are answered before the verbs' heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

PROBE = """
import sys
from planner.cli import main
try:
    main({argv!r})
except SystemExit as e:
    print("exit", e.code)
heavy = sorted(m for m in ("torch", "transformers", "scipy", "matplotlib", "pandas", "highspy") if m in sys.modules)
print("heavy", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["plan", "--help"], 0), (["memory", "--help"], 0),
                                       (["plan"], 2), (["nosuchverb"], 2)])
def test_help_and_usage_errors_import_no_heavy_module(argv, code):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          timeout=120, env=subprocess_env())
    lines = proc.stdout.splitlines()
    assert f"exit {code}" in lines and lines[-1] == "heavy -", (proc.stdout[-500:], proc.stderr[-500:])


def test_plan_keeps_another_runs_plan_unless_forced(tmp_path, capsys):
    """Following commands in order never trains whichever plan ran last: `plan` into a folder holding a plan made
    for another budget (or model, grid, objective) is refused without --force; the same request reruns freely."""
    from conftest import seeded_tiny_llama

    from planner.cli import main

    seeded_tiny_llama().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    base = ["plan", "--model", str(tmp_path / "model"), "--bits", "2,4", "--blocks", "64", "--ranks", "8",
            "--iters", "1", "--quiet", "--no-report", "--device", "cpu", "--cache", str(tmp_path / "c"),
            "--out", str(out)]
    assert main([*base, "--budget", "7bits"]) == 0
    first = (out / "plan.json").read_bytes()
    assert main([*base, "--budget", "7bits"]) == 0 and (out / "plan.json").read_bytes() == first
    capsys.readouterr()
    assert main([*base, "--budget", "6.5bits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another plan (budget 7bits" in err and "its budget" in err, err
    assert "--force" in err and (out / "plan.json").read_bytes() == first
    assert main([*base[:4], "4", *base[5:], "--budget", "7bits"]) == 2  # another grid (--bits 4)
    assert "grid or solver" in capsys.readouterr().err
    assert main([*base, "--budget", "6.5bits", "--force"]) == 0
    assert json.loads((out / "plan.json").read_text())["budget"]["spec"] == "6.5bits"


def test_another_model_is_another_plan(tmp_path):
    """The model is compared by its weights' fingerprint, only when budget, grid and objective match."""
    from planner.errors import UserError
    from planner.cli.overwrite import refuse_another_plan

    doc = {"budget": {"spec": "3bits"}, "model": {"fingerprint": "sha256:aa"},
           "method": {"iters": 1, "grid": ["g"], "fisher": None}}
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    ask = dict(budget="3bits", method={"iters": 1, "grid": ["g"]}, objective="data-free")
    refuse_another_plan(tmp_path, fingerprint=lambda: "sha256:aa", **ask)
    with pytest.raises(UserError, match="differs in its model"):
        refuse_another_plan(tmp_path, fingerprint=lambda: "sha256:bb", **ask)
    with pytest.raises(UserError, match="differs in its objective"):
        refuse_another_plan(tmp_path, fingerprint=lambda: 1 / 0, **{**ask, "objective": "fisher"})
    (tmp_path / "plan.json").write_text('{"previous": "plan"}')  # not a plan: nothing to protect
    refuse_another_plan(tmp_path, fingerprint=lambda: 1 / 0, **ask)


def test_the_output_objective_is_its_own_request(tmp_path):
    """An output-aware plan records fisher = None beside objective = "output": rerunning that request is allowed, and
    asking for the Fisher objective (or data-free) instead is another plan."""
    from planner.cli.overwrite import refuse_another_plan
    from planner.errors import UserError

    output = {"iters": 1, "grid": ["g"], "fisher": None, "objective": "output", "output": {"source": "pydoc"}}
    doc = {"budget": {"spec": "3bits"}, "model": {"fingerprint": "sha256:aa"}, "method": output}
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    ask = dict(budget="3bits", method={"iters": 1, "grid": ["g"]}, fingerprint=lambda: "sha256:aa")
    refuse_another_plan(tmp_path, objective="output", **ask)
    for other in ("fisher", "data-free"):
        with pytest.raises(UserError, match="differs in its objective"):
            refuse_another_plan(tmp_path, objective=other, **ask)
    doc["method"] = {"iters": 1, "grid": ["g"], "fisher": {"source": "pydoc"}}
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="differs in its objective"):
        refuse_another_plan(tmp_path, objective="output", **ask)
