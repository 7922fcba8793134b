"""Every module of the package opens with a docstring whose first line says what the module is for (issue: a new
contributor finds one place for each concern from the tree and the first lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "clbench"
MODULES = sorted(ROOT.rglob("*.py"))


def first_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return doc.splitlines()[0].strip() if doc else ""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_module_opens_with_a_sentence_on_its_job(path: Path) -> None:
    line = first_line(path)
    assert len(line.split()) >= 3, f"{path.relative_to(ROOT.parent)}: no docstring saying what the module is for"


def test_the_check_sees_a_missing_docstring(tmp_path: Path) -> None:
    bare = tmp_path / "bare.py"
    bare.write_text("import os\n")
    assert first_line(bare) == ""
