"""Test fixtures (cache isolation lives in the root conftest.py, shared with benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Test modules share helpers across folders (``from test_resume import KILLER``): every folder of tests/ is on the
# path, so a selection of folders (``pytest tests/storage``) imports them as the whole suite does.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name.isidentifier()):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


@pytest.fixture
def tiny_model():
    """The tiny open_clip backbone with random weights (no pretraining: fast, for mechanics tests)."""
    from clbench.models.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny", "none")


@pytest.fixture
def count_runs(monkeypatch) -> list[str]:
    """Ids of the runs the launchers execute in this process from now on (sweep tests of both settings)."""
    import clbench.sweeps.launchers as launchers

    calls: list[str] = []
    real = launchers.execute_run

    def counting(spec, capture=False):
        calls.append(spec.id)
        return real(spec, capture)

    monkeypatch.setattr(launchers, "execute_run", counting)
    return calls


@pytest.fixture
def without_launcher_extras(monkeypatch) -> None:
    """The launchers see neither Ray nor submitit installed (their one-line install hint is under test)."""
    import importlib

    import clbench.sweeps.launchers as launchers

    real = importlib.import_module

    def without(name, *a, **k):
        if name in ("ray", "submitit"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(launchers.importlib, "import_module", without)
