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


def _short_state() -> dict:
    from clbench.models.backbones import run_tiny_recipe

    return run_tiny_recipe(PretrainConfig(steps=1, batch_size=4, warmup=1))


def test_shipped_weights_are_used_without_pretraining(tmp_path, monkeypatch) -> None:
    """With weights for the current recipe in the package, the embedded backbone loads them (float16 rounded
    once, computed in float32) and never pretrains."""
    from clbench.models import backbones, shipped
    from clbench.models.backbones import load_backbone, tiny_key, tiny_recipe

    state = _short_state()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "weights")
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    shipped.export_shipped(state, tiny_recipe(PretrainConfig()), tiny_key(), tmp_path / "weights")

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained although shipped weights exist")

    monkeypatch.setattr(backbones, "pretrain", refuse)
    model = load_backbone("tiny")
    loaded = model.clip.state_dict()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.half().float()), name
    assert not (tmp_path / "cache").exists()  # nothing was written to the user cache


def test_shipped_recipe_record_and_comparison(tmp_path) -> None:
    from clbench.models import shipped

    state = _short_state()
    weights = shipped.export_shipped(state, {"pretrain": {"steps": 1}}, "abc", tmp_path)
    record = json.loads((tmp_path / "tiny-abc.json").read_text())
    assert record["stored_dtype"] == "torch.float16" and record["key"] == "abc"
    assert record["float32_sha256"] == shipped.state_digest(state)
    stored = load_file(str(weights))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    same = shipped.compare_to_shipped(state, shipped.load_shipped(weights))
    assert same["max_abs_diff_after_rounding"] == 0.0 and same["max_abs_diff"] > 0.0
    moved = {k: v.clone() for k, v in state.items()}
    name = next(k for k, v in moved.items() if v.is_floating_point() and v.numel() > 1)
    moved[name].view(-1)[0] += 0.5
    assert shipped.compare_to_shipped(moved, shipped.load_shipped(weights))["max_abs_diff_after_rounding"] >= 0.25
    digest_changed = shipped.state_digest(moved) != shipped.state_digest(state)
    assert digest_changed


def test_package_ships_the_current_recipes_weights() -> None:
    """The weights in the package were made by the recipe this code describes: changing the model config, the
    corpus version or the pretraining settings without re-exporting (`clbench pretrain --export`) fails here."""
    from clbench.models.backbones import tiny_key, tiny_recipe
    from clbench.models.shipped import SHIPPED_DIR, read_recipe, shipped_weights

    files = sorted(SHIPPED_DIR.glob("tiny-*.safetensors"))
    assert files, "no shipped tiny weights in the package"
    assert shipped_weights(tiny_key()) is not None, f"shipped {[f.name for f in files]} do not match key {tiny_key()}"
    record = read_recipe(tiny_key())
    expected = json.loads(json.dumps(tiny_recipe(PretrainConfig())))
    assert {k: record[k] for k in expected} == expected
    assert len(files) == 1, "stale shipped weights left beside the current ones"
    assert files[0].stat().st_size <= 25 * 2**20
