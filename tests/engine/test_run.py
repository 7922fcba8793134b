"""`clbench run` end to end on the embedded benchmark: the results contract and the CLI's behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clbench.cli.app import main
from clbench.datasets.synthetic import ORDERS

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    assert main(["run", "--methods", "zeroshot,finetune,lora", "--order", "1", "--out", str(out), *SMOKE]) == 0
    return out


@pytest.mark.parametrize("method", ["zeroshot", "finetune", "lora"])
def test_results_contract(smoke_run: Path, method: str) -> None:
    run = smoke_run / "synthetic-order1" / method / "seed0"
    names = ORDERS[1]
    acc = pd.read_csv(run / "accuracy.csv")
    assert list(acc.columns) == ["trained_on", *names]
    assert list(acc["trained_on"]) == names
    assert acc[names].to_numpy().min() >= 0 and acc[names].to_numpy().max() <= 100
    zs = pd.read_csv(run / "zeroshot.csv")
    assert list(zs.columns) == ["trained_on", *names] and len(zs) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"transfer", "average", "last", "bwt", "per_dataset"} <= set(metrics)
    assert set(metrics["per_dataset"]["last"]) == set(names)
    profile = pd.read_csv(run / "profile.csv")
    assert {"task", "section", "seconds", "peak_bytes"} <= set(profile.columns)
    assert {"eval"} <= set(profile["section"])
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["preset"] == "smoke" and config["seed"] == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["environment"]["torch"]
    assert "git_revision" in manifest["environment"]


def test_zeroshot_rows_equal_zeroshot_csv(smoke_run: Path) -> None:
    run = smoke_run / "synthetic-order1" / "zeroshot" / "seed0"
    acc = pd.read_csv(run / "accuracy.csv").drop(columns="trained_on")
    zs = pd.read_csv(run / "zeroshot.csv").drop(columns="trained_on")
    for _, row in acc.iterrows():
        assert row.to_numpy() == pytest.approx(zs.iloc[0].to_numpy())


def test_training_methods_change_the_model(smoke_run: Path) -> None:
    zs = pd.read_csv(smoke_run / "synthetic-order1" / "zeroshot" / "seed0" / "accuracy.csv")
    ft = pd.read_csv(smoke_run / "synthetic-order1" / "finetune" / "seed0" / "accuracy.csv")
    assert not zs.equals(ft)


def test_same_seed_same_accuracy(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["run", "--methods", "lora", "--out", str(out), *SMOKE, "--set", "data.num_tasks=3"]) == 0
        outs.append((out / "synthetic-order1" / "lora" / "seed0" / "accuracy.csv").read_bytes())
    assert outs[0] == outs[1]


def test_order_two_uses_its_sequence(tmp_path: Path) -> None:
    assert main(["run", "--methods", "zeroshot", "--order", "2", "--out", str(tmp_path), *SMOKE]) == 0
    acc = pd.read_csv(tmp_path / "synthetic-order2" / "zeroshot" / "seed0" / "accuracy.csv")
    assert list(acc["trained_on"]) == ORDERS[2]


def test_methods_lists_registry(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("zeroshot", "finetune", "lora"):
        assert name in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--methods", "nosuch"], "unknown method"),
        (["run", "--methods", "lora", "--preset", "nosuch"], "'nosuch' is not one of 'default'"),
        (["run", "--methods", "lora", "--order", "3"], "order"),
        (["run", "--methods", "lora", "--set", "lora.nosuch=1"], "nosuch"),
        (["run", "--methods", "lora", "--set", "lora.rank=abc"], "rank"),
        (["run", "--methods", "lora", "--set", "lora.rank=0"], "rank"),
        (["run", "--methods", "lora", "--set", "train.lr=-1"], "lr"),
        (["run", "--methods", "lora", "--set", "nosuch=1"], "nosuch"),
        (["run", "--methods", "lora", "--data-root", "/nonexistent"], "data-root"),
        (["run", "--methods", "lora", "--nosuchflag"], "nosuchflag"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    code = main([*args, "--out", str(out), "--quiet"] if args[0] == "run" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_smoke_preset_trains_every_method_visibly(tmp_path: Path) -> None:
    """Under ``--preset smoke`` every training method's matrix differs from zero-shot's and from every other's (LwF
    from fine-tuning only through its distillation terms, which the smoke preset weights 10)."""
    from clbench.methods import list_methods

    methods = list_methods()
    assert main(["run", "--methods", ",".join(methods), "--out", str(tmp_path), *SMOKE,
                 "--set", "data.num_tasks=2"]) == 0
    matrices = {m: pd.read_csv(tmp_path / "synthetic-order1" / m / "seed0" / "accuracy.csv").drop(columns="trained_on")
                for m in methods}
    trained = [m for m in methods if m != "zeroshot"]
    for i, a in enumerate(trained):
        assert not matrices[a].equals(matrices["zeroshot"]), f"{a} trains nothing visible"
        for b in trained[i + 1:]:
            assert not matrices[a].equals(matrices[b]), f"{a} and {b} give the same matrix"
