"""`clbench run --benchmark xtail` end to end on a fake CoOp tree: the union rule by default, the results
contract with the 10 domain names in order, the 16-shot picks stored in the manifest, --eval task on xtail."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_xtail import build_fake_xtail

from clbench.cli.app import main
from clbench.datasets.xtail_names import ORDERS

SMOKE = ["--preset", "smoke", "--backbone", "tiny", "--pretrained", "none", "--quiet"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_xtail(tmp_path_factory.mktemp("xtail") / "data").root


@pytest.mark.parametrize("order", [1, 2])
def test_lora_runs_end_to_end_under_the_union_rule(tree: Path, tmp_path: Path, order: int) -> None:
    out = tmp_path / "out"
    args = ["run", "--benchmark", "xtail", "--data-root", str(tree), "--methods", "lora", "--order", str(order),
            "--out", str(out), "--shots", "16", *SMOKE]
    assert main(args) == 0
    run = out / f"xtail-order{order}" / "lora" / "seed0"
    names = list(ORDERS[order])
    assert len(names) == 10 and "cifar100" not in names
    accuracy = pd.read_csv(run / "accuracy.csv")
    assert list(accuracy["trained_on"]) == names and list(accuracy.columns)[1:] == names
    recall = pd.read_csv(run / "selection_recall.csv")
    assert list(recall["trained_on"]) == ["zeroshot", *names]
    assert (accuracy[names].to_numpy() <= recall[names].to_numpy()[1:] + 1e-9).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["evaluation"]["rule"] == "union"
    duplicates = {d["name"] for d in manifest["evaluation"]["duplicate_classnames"]}
    assert {"lotus", "pizza"} <= duplicates  # planted in the fake tree, reported rather than merged
    picks = manifest["benchmark_info"]["train_indices"]
    assert set(picks) == set(names)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"] == "union" and set(metrics["per_dataset"]["last"]) == set(names)


def test_xtail_under_the_task_rule_is_its_own_run(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--benchmark", "xtail", "--data-root", str(tree), "--methods", "zeroshot", "--out", str(out),
            "--set", "data.num_tasks=3", *SMOKE]
    assert main([*args, "--eval", "task"]) == 0
    assert main(args) == 0
    task_run, union_run = out / "xtail-task-order1" / "zeroshot" / "seed0", out / "xtail-order1" / "zeroshot" / "seed0"
    assert not (task_run / "selection_recall.csv").exists() and (union_run / "selection_recall.csv").exists()
    task_acc = pd.read_csv(task_run / "zeroshot.csv").drop(columns="trained_on").to_numpy()
    union_acc = pd.read_csv(union_run / "zeroshot.csv").drop(columns="trained_on").to_numpy()
    assert (union_acc <= task_acc + 1e-9).all()


def test_sweep_passes_shots_to_every_run(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["sweep", "--benchmark", "xtail", "--data-root", str(tree), "--methods", "zeroshot", "--seeds", "0,1",
            "--shots", "4", "--set", "data.num_tasks=2", "--out", str(out), "--launcher", "inline", *SMOKE]
    assert main(args) == 0
    picks = {}
    for seed in (0, 1):
        run = out / "xtail-order1" / "zeroshot" / f"seed{seed}"
        assert json.loads((run / "config.json").read_text())["data"]["shots"] == 4
        picks[seed] = json.loads((run / "manifest.json").read_text())["benchmark_info"]["train_indices"]
        assert list(picks[seed]) == list(ORDERS[1][:2])
    for name, indices in picks[0].items():
        assert len(indices) == len(picks[1][name]) and len(indices) % 4 == 0 and indices
    assert picks[0] != picks[1]  # each run draws its shots with its own seed
