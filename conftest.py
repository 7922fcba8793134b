"""Fixtures shared by tests/ and benchmarks/: every cache points at a temporary folder so a cache left on the
machine cannot hide a broken step; everything runs offline on the CPU with a fixed thread count."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("CLBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "XDG_CACHE_HOME",
                                          "XDG_CONFIG_HOME", "CLBENCH_CONFIG", "CLBENCH_DATA_ROOT")}
    # a developer's own data root or ~/.config/clbench/config.toml must not change what the tests see
    os.environ.pop("CLBENCH_CONFIG", None)
    os.environ.pop("CLBENCH_DATA_ROOT", None)
    os.environ["XDG_CONFIG_HOME"] = str(cache / "config")
    os.environ["CLBENCH_CACHE"] = str(cache / "clbench")
    os.environ["HF_HOME"] = str(cache / "hf")
    os.environ["XDG_CACHE_HOME"] = str(cache / "xdg")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
