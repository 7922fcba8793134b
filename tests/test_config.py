"""Every preset loads for every method and order; per-order and per-method schedules resolve as documented."""

from __future__ import annotations

import pytest

from clbench.config import build_config, list_presets, method_run_config, run_id, train_config_for
from clbench.errors import UserError
from clbench.methods import list_methods


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("order", [1, 2])
def test_every_preset_builds_for_every_method(preset: str, order: int) -> None:
    cfg = build_config(preset, {"order": order}, [], list_methods())
    for name in list_methods():
        train = train_config_for(cfg, name)
        assert train.batch_size >= 1 and train.lr > 0
        assert run_id(method_run_config(cfg, name))


def test_paper_preset_uses_the_official_epoch_lists() -> None:
    one = build_config("paper", {"order": 1}, [], ["keeplora", "keeplora+", "zscl"])
    two = build_config("paper", {"order": 2}, [], ["keeplora", "keeplora+", "zscl"])
    assert train_config_for(one, "keeplora").epochs == [10] * 10 + [5]
    assert train_config_for(two, "keeplora").epochs == [5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10]
    assert train_config_for(one, "keeplora+").epochs == [5]
    assert train_config_for(two, "keeplora+").epochs == [5, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5]
    assert train_config_for(one, "zscl").lr == pytest.approx(1e-5)
    assert train_config_for(one, "zscl").max_steps == 1000


def test_set_overrides_a_methods_own_training_settings() -> None:
    cfg = build_config("default", {}, ["lora.train.lr=5e-4", "lora.rank=8"], ["lora", "finetune"])
    assert train_config_for(cfg, "lora").lr == pytest.approx(5e-4)
    assert train_config_for(cfg, "finetune").lr == pytest.approx(1e-4)
    assert cfg.methods["lora"]["rank"] == 8


def test_set_of_a_method_not_in_the_run_is_an_error() -> None:
    with pytest.raises(UserError, match="not in --methods"):
        build_config("default", {}, ["keeplora.rank=8"], ["lora"])
