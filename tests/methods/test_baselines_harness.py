"""The MTIL baselines (lwf, lwf-vr, wise-ft, icarl, moe-adapters, diki) on every path of the harness: the fake
MTIL tree (``--eval task``), the fake X-TAIL tree (``--eval union``), ``clbench sweep``, and ``--resume`` after a
real SIGKILL, which must give the bytes of the uninterrupted run. Smoke preset, two tasks, the smallest settings
that still exercise each method's state (a few seconds per method)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from fake_mtil import build_fake_mtil
from fake_xtail import build_fake_xtail
from test_resume import KILLER

from clbench.cli import main
from clbench.datasets.xtail_names import ORDERS as XTAIL_ORDERS
from clbench.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint
from clbench.storage.lock import LOCK_NAME

BASELINES = ["lwf", "lwf-vr", "wise-ft", "icarl", "moe-adapters", "diki"]
# fewer virtual texts and autoencoder steps; the reference images read in this process (no worker start-ups)
SMALLER = {"lwf": ["lwf.ref_workers=0"], "lwf-vr": ["lwf-vr.vr_texts=64", "lwf-vr.ref_workers=0"],
           "moe-adapters": ["moe-adapters.ddas_iterations=30"]}
REAL = ["--preset", "smoke", "--backbone", "tiny", "--pretrained", "none", "--quiet", "--device", "cpu"]
SYNTHETIC = ["--preset", "smoke", "--pretrained", "none", "--quiet", "--set", "data.num_tasks=2"]


def smaller(methods: list[str]) -> list[str]:
    """The ``--set`` options of :data:`SMALLER` for ``methods`` (a setting of a method not run is refused)."""
    return [arg for m in methods for value in SMALLER.get(m, []) for arg in ("--set", value)]
REPO = Path(__file__).resolve().parents[2]
RESULTS = ("accuracy.csv", "zeroshot.csv", "metrics.json")


def complete_matrix(folder: Path, names: list[str], rule: str) -> pd.DataFrame:
    """The run in ``folder`` is complete under ``rule`` with one row per task over ``names``, all in 0-100."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["evaluation"]["rule"] == rule, manifest.get("error")
    frame = pd.read_csv(folder / "accuracy.csv")
    assert list(frame.columns) == ["trained_on", *names] and list(frame["trained_on"]) == names
    values = frame[names].to_numpy()
    assert values.min() >= 0 and values.max() <= 100
    assert set(json.loads((folder / "metrics.json").read_text())["per_dataset"]["last"]) == set(names)
    return frame


# ---- the fake MTIL and X-TAIL trees --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtil_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = build_fake_mtil(tmp_path_factory.mktemp("mtil") / "data")
    out = tmp_path_factory.mktemp("mtil-out")
    assert main(["run", "--benchmark", "mtil", "--data-root", str(tree.root), "--datasets", "mnist,eurosat",
                 "--methods", ",".join(BASELINES), "--out", str(out), *REAL, *smaller(BASELINES)]) == 0
    return out / "mtil-mnist+eurosat"


@pytest.fixture(scope="module")
def xtail_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = build_fake_xtail(tmp_path_factory.mktemp("xtail") / "data")
    out = tmp_path_factory.mktemp("xtail-out")
    assert main(["run", "--benchmark", "xtail", "--data-root", str(tree.root), "--shots", "4", "--set",
                 "data.num_tasks=2", "--methods", ",".join(BASELINES), "--out", str(out), *REAL,
                 *smaller(BASELINES)]) == 0
    return out / "xtail-order1"


@pytest.mark.slow  # one run of the six methods on 2 fake MTIL datasets: ~15 s
@pytest.mark.parametrize("method", BASELINES)
def test_runs_on_the_fake_mtil_tree(mtil_runs: Path, method: str) -> None:
    complete_matrix(mtil_runs / method / "seed0", ["MNIST", "EuroSAT"], "task")


@pytest.mark.slow  # one run of the six methods on 2 fake X-TAIL domains, 4 shots: ~15 s
@pytest.mark.parametrize("method", BASELINES)
def test_runs_on_the_fake_xtail_tree_under_the_union_rule(xtail_runs: Path, method: str) -> None:
    folder = xtail_runs / method / "seed0"
    names = list(XTAIL_ORDERS[1][:2])
    accuracy = complete_matrix(folder, names, "union")[names].to_numpy()
    recall = pd.read_csv(folder / "selection_recall.csv")
    assert list(recall["trained_on"]) == ["zeroshot", *names]
    assert (accuracy <= recall[names].to_numpy()[1:] + 1e-9).all()  # a right class is inside its own dataset


# ---- sweep, and resume after SIGKILL against the sweep's bytes ------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", "--methods", ",".join(BASELINES), "--seeds", "0", *SYNTHETIC, *smaller(BASELINES),
                 "--out", str(out),
                 "--launcher", "inline"]) == 0
    return out / "synthetic-order1"


@pytest.mark.slow  # one sweep of the six methods, 2 synthetic tasks: ~25 s
@pytest.mark.parametrize("method", BASELINES)
def test_sweep_runs_every_baseline(swept: Path, method: str) -> None:
    folder = swept / method / "seed0"
    complete_matrix(folder, ["Shapes", "Digits"], "task")
    sweep = json.loads((folder / "sweep.json").read_text())
    assert json.loads((folder / "config.json").read_text())["method"] == method and sweep["run_id"]


@pytest.mark.slow  # a process killed after task 1, resumed here: ~8 s per method
@pytest.mark.parametrize("method", BASELINES)
def test_sigkill_after_task_1_then_resume_gives_the_bytes_of_the_sweep(swept: Path, tmp_path: Path, method: str,
                                                                        capsys) -> None:
    args = ["run", "--methods", method, *SYNTHETIC, *smaller([method]), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(torch.get_num_threads()), "1", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "synthetic-order1" / method / "seed0"
    assert load_checkpoint(folder / CHECKPOINT_NAME).completed == 1 and (folder / LOCK_NAME).exists()
    assert main([*args, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [r["after_task"] for r in manifest["resumed"]] == [1]
    reference = swept / method / "seed0"
    for name in RESULTS:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (folder / CHECKPOINT_NAME).exists() and not (folder / LOCK_NAME).exists()


# ---- where they cannot run: the LLaVA (MCIT) setting has no form of them ------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_the_mcit_setting_refuses_each_baseline_in_one_line(tmp_path: Path, capsys, method: str) -> None:
    code = main(["run", "--benchmark", "synthetic-mcit", "--methods", method, "--preset", "smoke", "--quiet",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"method '{method}' has no LLaVA form" in err
    assert not (tmp_path / "out").exists()
