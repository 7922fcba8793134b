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
    from clbench.config import load_preset

    preset_lr = load_preset("default")["method_train"]["finetune"]["lr"]
    assert train_config_for(cfg, "finetune").lr == pytest.approx(preset_lr)
    assert cfg.methods["lora"]["rank"] == 8


def test_set_of_a_method_not_in_the_run_is_an_error() -> None:
    with pytest.raises(UserError, match="not in --methods"):
        build_config("default", {}, ["keeplora.rank=8"], ["lora"])


@pytest.mark.parametrize("order", [1, 2])
def test_paper_preset_gives_zscl_and_finetune_zscls_schedule(order: int) -> None:
    from clbench.datasets.mtil import LAYOUTS
    from clbench.methods.zscl import parse_lr_overrides

    cfg = build_config("paper", {"order": order}, [], ["zscl", "finetune", "keeplora"])
    for name in ("zscl", "finetune"):
        train = train_config_for(cfg, name)
        assert (train.schedule, train.warmup_steps, train.max_steps) == ("cosine", 100, 1000)
        assert train.lr == pytest.approx(1e-5) and train.weight_decay == 0.0
        assert method_run_config(cfg, name)["train"]["schedule"] == "cosine"
    overrides = parse_lr_overrides(cfg.methods["zscl"]["lr_overrides"])
    assert overrides == pytest.approx({"Aircraft": 5e-5, "MNIST": 5e-5})
    assert set(overrides) <= set(LAYOUTS)  # the keys are MTIL task names, or they would never match
    assert train_config_for(cfg, "keeplora").schedule == "onecycle"
    assert train_config_for(cfg, "keeplora").warmup_steps == 0


def test_data_options_set_the_data_fields() -> None:
    cfg = build_config("default", {"benchmark": "mtil"}, [], ["lora"], {"shots": 5, "skip_bad_images": True})
    assert cfg.data.shots == 5 and cfg.data.skip_bad_images is True
    cfg = build_config("default", {"benchmark": "mtil"}, [], ["lora"], {"shots": None, "skip_bad_images": None})
    assert cfg.data.shots == 0 and cfg.data.skip_bad_images is False  # None leaves the preset's values
    cfg = build_config("default", {"benchmark": "mtil"}, ["data.shots=16"], ["lora"], {"shots": 5})
    assert cfg.data.shots == 16  # --set comes last


@pytest.mark.parametrize("data_options, flag", [({"shots": 5}, "--shots"),
                                                ({"skip_bad_images": True}, "--skip-bad-images")])
def test_real_data_options_on_synthetic_are_one_line_errors(data_options: dict, flag: str) -> None:
    with pytest.raises(UserError) as exc:
        build_config("default", {}, [], ["lora"], data_options)
    message = str(exc.value)
    assert message.startswith(f"{flag} is for real datasets") and "\n" not in message


@pytest.mark.parametrize("args, needles", [
    (["--benchmark", "mtil", "--shots", "-1"], ("--shots=-1", ">= 0")),
    (["--shots", "5"], ("--shots is for real datasets",)),
    (["--skip-bad-images"], ("--skip-bad-images is for real datasets",)),
])
def test_data_flags_on_the_command_line(tmp_path, capsys, args: list[str], needles: tuple[str, ...]) -> None:
    from clbench.cli.app import main

    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--preset", "smoke", "--pretrained", "none", "--quiet",
                 "--out", str(out), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines[0]
    assert not out.exists()


def test_a_warmup_without_the_cosine_schedule_is_refused() -> None:
    with pytest.raises(UserError, match="warmup_steps=5 has no effect"):
        build_config("smoke", {}, ["train.warmup_steps=5"], ["lora"])
    cfg = build_config("smoke", {}, ["train.warmup_steps=5", "train.schedule=cosine"], ["lora"])
    assert cfg.train.warmup_steps == 5
