"""Recipe cards: every method declares the provenance of every setting; values come from the presets (read here
straight from the JSON files, not through the code under test); ``clbench methods NAME``; ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clbench.cli.app import main
from clbench.config import PRESET_DIR, TrainConfig, build_config, method_run_config, recipe_rows, run_id
from clbench.methods import get_method, list_methods
from clbench.methods.recipes import (
    SOURCES,
    TRAIN_FALLBACK,
    TRAIN_KEYS,
    RecipeCard,
    Source,
    card_for,
)

BUILT_IN = ("finetune", "inflora", "keeplora", "keeplora+", "keeplora++", "loda", "lora", "zeroshot", "zscl", "lwf",
            "lwf-vr", "wise-ft", "icarl", "moe-adapters", "diki")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} | set(TRAIN_FALLBACK)


def _preset_train(preset: str, method: str, order: int = 1) -> dict:
    """A method's training settings in a preset file, resolved by hand: train, by_order.train, method_train,
    by_order.method_train."""
    data = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    by_order = data.get("by_order", {}).get(str(order), {})
    values = {**data.get("train", {}), **by_order.get("train", {})}
    values.update(data.get("method_train", {}).get(method, {}))
    values.update(by_order.get("method_train", {}).get(method, {}))
    return values


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_declares_every_setting(name: str) -> None:
    assert set(BUILT_IN) <= set(list_methods())
    card = card_for(name)
    assert isinstance(card, RecipeCard) and card.reference
    hparams = {f.name for f in dataclasses.fields(get_method(name).Hparams)}
    declared = set(card.settings)
    train = {k.removeprefix("train.") for k in declared if k.startswith("train.")}
    assert declared - {f"train.{k}" for k in train} == hparams, "every hyperparameter, and nothing else"
    assert train <= TRAIN_FIELDS
    if card.trains:
        assert set(TRAIN_KEYS) <= train
    else:
        assert not train and not get_method(name).Hparams.__dataclass_fields__
    for source in card.settings.values():
        assert source.kind in SOURCES


def test_sources_are_checked() -> None:
    with pytest.raises(ValueError, match="must say why"):
        Source("adapted")
    with pytest.raises(ValueError, match="unknown provenance"):
        Source("folklore", "x")


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", ["keeplora", "keeplora+", "lora", "zscl", "finetune", "lwf", "lwf-vr", "wise-ft",
                                  "moe-adapters", "icarl", "diki"])
def test_values_come_from_the_preset(name: str, order: int) -> None:
    """Under the authors' preset every row keeps the card's provenance and shows the preset file's value."""
    cfg = build_config("paper", {"order": order}, [], [name])
    expected = {**dataclasses.asdict(TrainConfig()), **_preset_train("paper", name, order)}
    rows = {row.key: row for row in recipe_rows(cfg, name)}
    card = card_for(name)
    for key, row in rows.items():
        if key.startswith("train."):
            field = key.removeprefix("train.")
            value = expected.get(field, TRAIN_FALLBACK.get(field))
            assert row.value == value, key
        else:
            methods = json.loads((PRESET_DIR / "paper.json").read_text()).get("methods", {}).get(name, {})
            assert row.value == methods.get(key, getattr(get_method(name).Hparams(), key)), key
        assert (row.source, row.note) == (card.settings[key].kind, card.settings[key].note), key
    if name == "keeplora+" and order == 2:
        assert rows["train.epochs"].value == [5, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5]


# The authors' MTIL recipes, written out by hand from the official code (not read from paper.json): ZSCL's
# mtil/scripts (lwf.sh's flags for iCaRL, with icarl.py's own learning rates and args.py's memory and T) and DIKI's
# training config (SGD without momentum at lr 5.0, cosine without warm-up, 10 epochs, batch 128, 8 prompt tokens
# in the first 8 blocks of both towers).
OFFICIAL = {
    "icarl": {"train.optimizer": "adamw", "train.lr": 1e-5, "train.weight_decay": 0.0, "train.schedule": "cosine",
              "train.warmup_steps": 100, "train.max_steps": 1000, "train.batch_size": 64, "memory_size": 10000,
              "temperature": 2.0, "label_smoothing": 0.2, "image_loss": 1.0, "text_loss": 1.0,
              "lr_overrides": "Aircraft:5e-5,MNIST:5e-5"},
    "diki": {"train.optimizer": "sgd", "train.lr": 5.0, "train.weight_decay": 0.0, "train.schedule": "cosine",
             "train.warmup_steps": 0, "train.epochs": [10], "train.batch_size": 128, "prompt_length": 8,
             "depth_vision": 8, "depth_text": 8},
}


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_preset_is_the_official_recipe(name: str, order: int) -> None:
    rows = {row.key: row.value for row in recipe_rows(build_config("paper", {"order": order}, [], [name]), name)}
    assert {key: rows[key] for key in OFFICIAL[name]} == OFFICIAL[name]


def test_rows_say_where_a_departure_comes_from() -> None:
    cfg = build_config("default", {}, ["keeplora.train.weight_decay=0.05", "keeplora.rank=8"], ["keeplora"])
    rows = {row.key: row for row in recipe_rows(cfg, "keeplora")}
    paper, default = _preset_train("paper", "keeplora"), _preset_train("default", "keeplora")
    assert default["lr"] != paper["lr"]
    assert rows["train.lr"].value == default["lr"] and rows["train.lr"].source == "preset default"
    assert str(paper["lr"]) in rows["train.lr"].note
    assert rows["train.weight_decay"].value == 0.05 and rows["train.weight_decay"].source == "--set"
    assert rows["rank"].value == 8 and rows["rank"].source == "--set" and "16" in rows["rank"].note
    assert rows["eps_f"].source == "official code"  # unchanged settings keep their provenance


def test_config_records_the_recipe_and_the_run_id_ignores_it() -> None:
    cfg = build_config("smoke", {}, ["keeplora.compat=official"], ["keeplora"])
    resolved = method_run_config(cfg, "keeplora")
    recipe = resolved["recipe"]
    assert recipe["preset"] == "smoke" and recipe["authors_preset"] == "paper"
    assert recipe["card"].startswith("KeepLoRA")
    assert recipe["settings"]["compat"] == {"value": "official", "source": "--set",
                                            "note": "the paper preset has paper"}
    assert recipe["settings"]["train.batch_size"]["source"] == "preset smoke"  # smoke: 16, the paper: 64
    json.dumps(resolved)  # config.json must be able to hold it
    assert run_id(resolved) == run_id({k: v for k, v in resolved.items() if k != "recipe"})


def test_run_writes_the_recipe_into_config_json(tmp_path: Path, capsys) -> None:
    args = ["run", "--methods", "finetune", "--out", str(tmp_path), "--preset", "smoke", "--pretrained", "none",
            "--quiet", "--set", "data.num_tasks=1", "--set", "finetune.label_smoothing=0.1"]
    assert main(args) == 0
    capsys.readouterr()
    # resuming with another setting names that setting, not its restatement in the recipe record
    assert main([*args, "--resume", "--set", "finetune.train.lr=0.5"]) == 2  # the smoke preset's finetune rate: 2e-4
    err = capsys.readouterr().err
    assert "(train.lr: 0.0002 then, 0.5 now)" in err and "recipe.settings" not in err
    (config,) = tmp_path.glob("**/finetune/**/config.json")
    recipe = json.loads(config.read_text())["recipe"]
    assert recipe["preset"] == "smoke" and "finetune.sh" in recipe["card"]
    assert recipe["settings"]["label_smoothing"]["source"] == "--set"
    assert recipe["settings"]["train.batch_size"] == {
        "value": _preset_train("smoke", "finetune")["batch_size"], "source": "preset smoke",
        "note": f"the paper preset has {_preset_train('paper', 'finetune')['batch_size']}"}


# ---- clbench methods NAME ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILT_IN)
def test_methods_name_prints_hyperparameters_and_recipe(name: str, capsys) -> None:
    assert main(["methods", name]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(get_method(name).Hparams):
        assert f.name in out
    card = card_for(name)
    for key in card.settings:
        assert key in out
    if name == "keeplora":
        assert "one of compat, input, output" in out and "one of residual_grad, random" in out
        assert "official code" in out and "0.85" in out


def test_methods_without_name_lists_all(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILT_IN)


@pytest.mark.parametrize(("args", "needle"), [
    (["methods", "nosuch"], "unknown method 'nosuch'"),
    (["methods", "keeplora", "--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["methods", "keeplora", "--order", "3"], "order"),
])
def test_methods_name_errors_are_one_line(args: list[str], needle: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


# ---- fine-tuning's label smoothing, through its loss hook -----------------------------------------------------------
def test_finetune_loss_uses_label_smoothing(tiny_model) -> None:
    """ZSCL's fine-tuning baseline trains with label smoothing 0.2 (finetune.sh --ls 0.2); the loss is written
    out here: −Σ_j q_j log p_j with q_y = 0.8 + 0.2/C and q_j = 0.2/C otherwise."""
    from clbench.costs.profiler import Profiler
    from clbench.methods.base import TaskContext

    cls = get_method("finetune")
    method = cls(tiny_model, cls.Hparams(), Profiler())
    prompts = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]
    task = TaskContext(0, None, 1, torch.device("cpu"), None, 1, prompts=prompts)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        loss = method.loss(images, labels, task)
        logits = tiny_model.logit_scale() * tiny_model.encode_image(images) @ tiny_model.encode_text(
            tiny_model.tokenize(prompts)).T
    logp = F.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        q = [0.2 / 3 + (0.8 if j == y else 0.0) for j in range(3)]
        total -= sum(q[j] * float(logp[i, j]) for j in range(3))
    assert math.isclose(float(loss), total / 4, rel_tol=1e-5)
    assert not math.isclose(float(loss), float(F.nll_loss(logp, labels)), rel_tol=1e-3)
