"""The command line's start-up: help and usage errors are answered before the verbs' heavy imports."""

from __future__ import annotations

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
