"""The tree reads as the pipeline and imports one way (issue 16), checked by reading the source with ast (no module is
imported): no import cycle, no import upward in the stage order, no private name taken from another module, every
module's docstring names its job and no module grows past the size a reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("quant", "planner")
# Lowest first: a module may import only from a lower group, or from its own group (cycles are checked apart).
ORDER = ("quant", "planner", "planner.errors", "planner.fsio", "planner.outputs", "planner.devices", "planner.dist",
         "planner.corpus", "planner.model", "planner.profile", "planner.plan", "planner.report", "planner.train",
         "planner.api", "planner.testing", "planner.study", "planner.hf",
         "planner.cli", "planner.__main__")
MAX_LINES = 350


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = modules()


def target(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom reads from (None outside the project)."""
    if node.level:
        base = module.split(".")
        if MODULES[module].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    return name if name.split(".")[0] in PACKAGES else None


def edges() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> project modules it imports (anywhere in the file, function bodies included), and every private
    name imported from another module."""
    graph, private = {m: set() for m in MODULES}, []
    for m, f in MODULES.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                t = target(m, node)
                if t is None:
                    continue
                for alias in node.names:
                    sub = f"{t}.{alias.name}"
                    dst = sub if sub in MODULES else t
                    if dst != m and not (MODULES[m].name == "__init__.py" and dst.startswith(m + ".")):
                        graph[m].add(dst)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and dst != m:
                        private.append(f"{m} imports {t}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES and alias.name != m:
                        graph[m].add(alias.name)
    return graph, private


def group(module: str) -> int:
    return max(i for i, g in enumerate(ORDER) if module == g or module.startswith(g + "."))


def test_every_module_belongs_to_a_stage_group():
    assert all(group(m) >= 0 for m in MODULES)
    assert {"planner.model", "planner.profile", "planner.plan", "planner.report", "planner.train",
            "planner.cli"} <= set(MODULES), "the pipeline's stages are subpackages of planner/"


def test_no_import_cycle():
    graph, _ = edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(v, path):
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(" -> ".join(path[path.index(w):] + [w]))
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles


def test_imports_only_go_down_the_stage_order():
    graph, _ = edges()
    upward = [f"{m} imports {t}" for m, ts in graph.items() for t in ts if group(t) > group(m)]
    assert not upward


def test_no_private_name_crosses_a_module():
    _, private = edges()
    assert not private


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_names_its_job_and_stays_readable(module):
    text = MODULES[module].read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.split()) >= 5, f"{module} has no docstring naming its job"
    assert len(text.splitlines()) <= MAX_LINES, f"{module} has {len(text.splitlines())} lines"
