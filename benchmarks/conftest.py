"""Fixtures of the benchmark suite: the shapes (:func:`benchmarks.workloads.current_shapes`). Cache isolation and
the thread count come from the root conftest.py, shared with tests/."""

from __future__ import annotations

import pytest

from benchmarks.workloads import Shapes, build_model, current_shapes
from clbench.models.clip import ClipModel


@pytest.fixture(scope="session")
def shapes() -> Shapes:
    return current_shapes()


@pytest.fixture(scope="session")
def bench_model(shapes: Shapes) -> ClipModel:
    """The random-initialised backbone of the current shapes (shared; workloads copy it when they change it)."""
    return build_model(shapes.backbone)

