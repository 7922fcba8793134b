"""Test fixtures (cache isolation lives in the root conftest.py, shared with benchmarks/)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_model():
    """The tiny open_clip backbone with random weights (no pretraining: fast, for mechanics tests)."""
    from clbench.models.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny", "none")
