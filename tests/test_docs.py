"""The README and docs/ point only at what the repository has, and the README's Python runs as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a repository path as prose names it: a top-level folder of this project, then a path
PATH = re.compile(r"(?<![\w./-])((?:planner|quant|tests|bench|docs|reports|examples)/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _named_paths(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    named = [m.group(1) for m in PATH.finditer(text)]
    links = [m.group(1) for m in LINK.finditer(text) if "://" not in m.group(1)]
    return sorted({*named, *(str((page.parent / link).resolve().relative_to(REPO)) for link in links
                             if (page.parent / link).resolve().is_relative_to(REPO))})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_a_page_names_exists(page):
    missing = [p for p in _named_paths(page) if not (REPO / p).exists()]
    assert not missing, f"{page.name} names paths the repository lacks: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_page_points_outside_the_repository_or_at_the_tracker(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert not re.search(r"\bissue \d+", text, re.IGNORECASE), "issue numbers mean nothing to a reader"


def test_the_path_finder_sees_a_missing_path(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see planner/no_such_module.py and [x](docs/cli.md)\n")
    assert "planner/no_such_module.py" in [m.group(1) for m in PATH.finditer(page.read_text())]


def test_the_readme_python_names_what_exists():
    """The README's snippet parses, and every name it imports exists with the keywords it passes."""
    import importlib
    import inspect

    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README shows one Python snippet"
    for block in blocks:
        tree = ast.parse(block)
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                params = inspect.signature(imported[node.func.id]).parameters
                for kw in node.keywords:
                    assert kw.arg in params, f"{node.func.id}() has no keyword {kw.arg!r}"
