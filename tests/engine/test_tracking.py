"""``--track``: TensorBoard event files and offline W&B runs hold the per-task accuracy rows, the metrics, the
matrix and the costs of the run, the same numbers as the run's own files; unknown backends are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clbench.cli.app import main

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet", "--set", "data.num_tasks=2"]


def _run(tmp_path: Path, track: str) -> Path:
    out = tmp_path / "results"
    assert main(["run", "--methods", "lora", "--out", str(out), "--track", track, *SMOKE]) == 0
    return out


def test_tensorboard_holds_rows_and_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(tmp_path, "tensorboard")
    run = out / "synthetic-order1" / "lora" / "seed0"
    (logdir,) = {p.parent for p in (out / "tracking" / "tensorboard").rglob("events.out.tfevents.*")}
    assert logdir == out / "tracking" / "tensorboard" / "synthetic-order1" / "lora" / "seed0"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    accuracy = pd.read_csv(run / "accuracy.csv").set_index("trained_on")
    for dataset in accuracy.columns:  # one point per task, equal to the run's own accuracy.csv
        points = [(e.step, e.value) for e in events.Scalars(f"accuracy/{dataset}")]
        assert [s for s, _ in points] == [1, 2]
        assert [v for _, v in points] == pytest.approx(accuracy[dataset].tolist(), abs=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("transfer", "average", "last", "bwt"):
        assert events.Scalars(f"metrics/{key}")[-1].value == pytest.approx(metrics[key], abs=1e-4)
    assert {"config", "accuracy_matrix", "costs"} <= {t.split("/")[0] for t in events.Tags()["tensors"]}


def test_each_method_of_a_run_gets_its_own_rows_and_metrics(tmp_path: Path) -> None:
    """Two methods in one ``clbench run``: each method's log holds its own per-task rows and its own final
    metrics (a tracked run is opened when its method starts and closed when the next one starts)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "results"
    assert main(["run", "--methods", "zeroshot,lora", "--out", str(out), "--track", "tensorboard", *SMOKE]) == 0
    for method in ("zeroshot", "lora"):
        run = out / "synthetic-order1" / method / "seed0"
        logdir = out / "tracking" / "tensorboard" / "synthetic-order1" / method / "seed0"
        events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
        accuracy = pd.read_csv(run / "accuracy.csv").set_index("trained_on")
        first = accuracy.columns[0]
        assert [e.value for e in events.Scalars(f"accuracy/{first}")] == pytest.approx(
            accuracy[first].tolist(), abs=1e-4), method
        metrics = json.loads((run / "metrics.json").read_text())
        assert events.Scalars("metrics/last")[-1].value == pytest.approx(metrics["last"], abs=1e-4), method


def test_wandb_offline_run_holds_the_summary(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is clbench's default, not the environment's
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = _run(tmp_path, "wandb")
    import wandb

    wandb.teardown()  # the record stream is written by W&B's service process: wait for it to flush and exit
    run = out / "synthetic-order1" / "lora" / "seed0"
    (offline,) = (out / "tracking" / "wandb").glob("offline-run-*")
    (matrix_file,) = offline.glob("files/media/table/accuracy_matrix_2_*.table.json")  # logged at step 2
    table = json.loads(matrix_file.read_text())
    accuracy = pd.read_csv(run / "accuracy.csv")
    assert table["columns"] == list(accuracy.columns)
    got = [value for row in table["data"] for value in row[1:]]
    assert got == pytest.approx(accuracy.iloc[:, 1:].to_numpy().ravel().tolist(), abs=1e-4)
    (costs_file,) = offline.glob("files/media/table/costs_2_*.table.json")
    sections = [row[0] for row in json.loads(costs_file.read_text())["data"]]
    assert sections == list(dict.fromkeys(pd.read_csv(run / "profile.csv")["section"]))
    (history,) = offline.glob("run-*.wandb")
    data = history.read_bytes()  # the offline record stream: the scalars' keys are stored verbatim
    missing = [key for key in ("metrics/transfer", "metrics/last", "accuracy/mean_over_trained")
               if key.encode() not in data]
    assert not missing, missing


def test_off_by_default(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["run", "--methods", "lora", "--out", str(out), *SMOKE]) == 0
    assert not (out / "tracking").exists()


def test_unknown_backend_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "lora", "--out", str(tmp_path / "o"), "--track", "mlflow", *SMOKE])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'mlflow' is not one of tensorboard, wandb" in err
    assert not (tmp_path / "o").exists()
