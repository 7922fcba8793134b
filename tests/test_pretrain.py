"""The embedded backbone's pretraining is a pure function of its seed, and the cache is keyed by its config."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from clbench.models.backbones import ensure_tiny_weights, tiny_weights_path
from clbench.models.pretrain import PretrainConfig


def test_pretraining_is_deterministic_from_its_seed(tmp_path, monkeypatch) -> None:
    cfg = PretrainConfig(steps=2, batch_size=8, warmup=1)
    paths = []
    for name in ("a", "b"):
        monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / name))
        torch.manual_seed(len(name) * 1234 + ord(name))  # a different global RNG state before each call
        paths.append(ensure_tiny_weights(cfg))
    first, second = (load_file(str(p)) for p in paths)
    recipe = json.loads((paths[0].parent / "recipe.json").read_text())  # the recipe beside the weights
    assert recipe["pretrain"] == {**PretrainConfig().__dict__, "steps": 2, "batch_size": 8, "warmup": 1}
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_cache_key_follows_the_config(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path))
    assert tiny_weights_path(PretrainConfig(steps=2)) != tiny_weights_path(PretrainConfig(steps=3))
    assert tiny_weights_path(PretrainConfig(seed=1)) != tiny_weights_path(PretrainConfig(seed=2))
