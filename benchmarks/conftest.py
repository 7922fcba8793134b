"""Fixtures of the benchmark suite: isolated caches (nothing is downloaded or read from a cache here), a
fixed thread count, and the shapes (:func:`benchmarks.workloads.current_shapes`)."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.workloads import Shapes, build_model, current_shapes
from clbench.models.clip import ClipModel


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("bench-cache")
    keys = ("CLBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({"CLBENCH_CACHE": str(cache / "clbench"), "HF_HOME": str(cache / "hf"),
                       "XDG_CACHE_HOME": str(cache / "xdg"), "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shapes() -> Shapes:
    return current_shapes()


@pytest.fixture(scope="session")
def bench_model(shapes: Shapes) -> ClipModel:
    """The random-initialised backbone of the current shapes (shared; workloads copy it when they change it)."""
    return build_model(shapes.backbone)

