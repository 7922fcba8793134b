"""Long sequences: 50 synthetic tasks (the domains cycled) for KeepLoRA and InfLoRA through the real runner.

After every task the stored subspaces are checked on what the runner hands to its checkpoint (the method's
``state_dict()``): KeepLoRA's bases ``basis/<site>.<proj>`` (one per adapted matrix: q, k, v, o of every
block) and InfLoRA's memories ``memory.<site>`` (one per block, shared by its k and v) must have orthonormal
columns (max |UᵀU − I| <= 1e-4), at most d columns, and at most d² stored numbers per adapted matrix. The
per-task evaluation is replaced by a stub (accuracy is not what is tested), so the run takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import clbench.engine.harness as harness
import clbench.engine.runner as runner
import clbench.engine.session as session
from clbench.config import build_config
from clbench.storage.checkpoint import Checkpoint

TASKS = 50
WIDTH = 128  # clbench-tiny: every attention layer of both encoders
SITES = 8  # 4 blocks x 2 encoders
SETTINGS = [f"data.num_tasks={TASKS}", "data.train_per_class=2", "data.test_per_class=2", "train.max_steps=1"]
STORED = {"keeplora": ("basis/", 4 * SITES), "inflora": ("memory.", 2 * SITES)}  # key prefix, adapted matrices


def orthonormality_error(basis: torch.Tensor) -> float:
    if basis.shape[1] == 0:
        return 0.0
    U = basis.double()
    return float((U.T @ U - torch.eye(U.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.slow  # ~15 s per method idle, up to a minute on a loaded 2-core machine
@pytest.mark.parametrize("method", ["keeplora", "inflora"])
def test_fifty_tasks_keep_bases_orthonormal_and_bounded(tmp_path: Path, monkeypatch, method: str) -> None:
    prefix, matrices = STORED[method]
    per_task: list[dict] = []

    def check(path: Path, ckpt: Checkpoint) -> None:  # instead of writing the checkpoint
        stored = {k: v for k, v in ckpt.method.items() if k.startswith(prefix)}
        assert len(stored) == (matrices if method == "keeplora" else SITES), sorted(stored)[:4]
        for key, basis in stored.items():
            assert basis.ndim == 2 and basis.shape[0] == WIDTH, (key, basis.shape)
            assert basis.shape[1] <= WIDTH, key
            assert basis.numel() <= WIDTH**2, key
            assert orthonormality_error(basis) <= 1e-4, (key, ckpt.completed, orthonormality_error(basis))
        total = sum(b.numel() for b in stored.values())
        assert total <= matrices * WIDTH**2
        per_task.append({"task": ckpt.completed, "columns": sum(b.shape[1] for b in stored.values()),
                         "numbers": total})

    def no_eval(method_, benchmark, trained, *args, **kwargs) -> list[float]:
        return [0.0] * len(benchmark.tasks)

    monkeypatch.setattr(session, "save_checkpoint", check)
    monkeypatch.setattr(harness, "evaluate", no_eval)
    both = ["inflora.encoders=vision,text"] if method == "inflora" else []  # InfLoRA's default is vision only
    cfg = build_config("smoke", {"pretrained": "none"}, [*SETTINGS, f"{method}.rank=2", *both], [method])
    (outcome,) = runner.run_methods(cfg, [method], tmp_path, notify=lambda msg: None)
    assert outcome.status == "complete"
    assert [r["task"] for r in per_task] == list(range(1, TASKS + 1))  # checked after every one of the 50 tasks
    columns = [r["columns"] for r in per_task]
    assert columns[-1] > 0 and all(c <= (matrices if method == "keeplora" else SITES) * WIDTH for c in columns)
    state = pd.read_csv(outcome.path / "state_bytes.csv")
    name = "basis" if method == "keeplora" else "memory"
    totals = state[state["name"] == name].groupby("task")["bytes"].sum()
    assert len(totals) >= TASKS and totals.max() <= matrices * WIDTH**2 * 4  # float32: 4 bytes a number
