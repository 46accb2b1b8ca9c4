"""Behaviour is unchanged by restructuring: on the embedded model, plan.json, profile.csv and the cache keys equal
copies written by the code before planner/ was split into subpackages (tests/golden/, made by commit 6e97524's
code with `python tests/test_golden.py --write`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
SMALL = ["--bits", "2,3,4", "--blocks", "64", "--ranks", "4,8", "--iters", "1"]
RUNS = {
    "data-free": ["--budget", "2.75bits", *SMALL],
    "fisher": ["--budget", "2.75bits", *SMALL, "--calib", "pydoc", "--calib-tokens", "512"],
    "both-methods": ["--budget", "3bits", "--method", "both", "--bits", "2,4", "--blocks", "64", "--groups", "64",
                     "--ranks", "4,8", "--iters", "1"],
}


def run(name: str, root: Path) -> dict[str, str]:
    """The files a run leaves that must not change: plan.json (minus the install path), profile.csv, the cache's
    relative file names (fingerprint / settings key / matrix)."""
    from planner.cli import main
    out, cache = root / name / "out", root / "cache"
    rc = main(["plan", *RUNS[name], "--out", str(out), "--cache", str(cache), "--quiet", "--no-report"])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    plan["model"].pop("source")  # where the package is installed differs between machines
    keys = sorted(str(p.relative_to(cache)) for p in cache.rglob("*.json"))
    return {"plan.json": json.dumps(plan, indent=1, sort_keys=True) + "\n",
            "profile.csv": (out / "profile.csv").read_text(), "cache_keys.txt": "\n".join(keys) + "\n"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return {name: run(name, root) for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("file", ["plan.json", "profile.csv", "cache_keys.txt"])
def test_output_equals_golden_copy(outputs, name, file):
    expected = (GOLDEN / name / file).read_text()
    assert outputs[name][file] == expected


if __name__ == "__main__" and "--write" in sys.argv:
    import os
    import tempfile

    import torch

    os.environ.setdefault("LQPLAN_DEVICE", "cpu")
    torch.set_num_threads(1)  # as conftest: the suite's thread count decides the CPU floats
    with tempfile.TemporaryDirectory() as tmp:
        for run_name in RUNS:
            for fname, text in run(run_name, Path(tmp)).items():
                (GOLDEN / run_name).mkdir(parents=True, exist_ok=True)
                (GOLDEN / run_name / fname).write_text(text)
