"""The run engine's control flow (clbench.engine.session) on a toy RunJob: no model, no setting, only the folder
records it must leave after each way a run can end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clbench.engine.rundir import RunPlan
from clbench.engine.session import RecordedFailure, RunJob, run_jobs
from clbench.errors import UserError
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from clbench.storage.lock import LOCK_NAME


class Diverged(RecordedFailure):
    def record(self) -> dict:
        return {"failed_task": "b", "failed_step": 7}


class ToyJob(RunJob):
    """Three tasks; task t's row is [t + 1] * 3; ``fail_at`` raises ``error`` when that task would end."""

    stale = ("rows.json",)

    def __init__(self, plan: RunPlan, fail_at: int | None = None, error: BaseException | None = None) -> None:
        super().__init__(plan)
        self.fail_at, self.error, self.rows, self.failures = fail_at, error, [], 0

    def start(self, started: float) -> dict:
        return {"status": "running", "run_id": self.plan.run_id, "method": self.plan.name, "started": started}

    def resume(self, ckpt: Checkpoint) -> None:
        self.rows = [list(r) for r in ckpt.rows]

    def run(self, on_task_end) -> None:
        for t in range(len(self.rows), 3):
            if t == self.fail_at:
                raise self.error
            self.rows.append([float(t + 1)] * 3)
            on_task_end(t + 1)

    def capture(self) -> Checkpoint:
        return Checkpoint(run_id=self.plan.run_id, completed=len(self.rows), datasets=list(self.plan.tasks),
                          zeroshot=[0.0] * 3, rows=self.rows, model={}, method={}, method_extra={}, profile=[],
                          state_bytes=[], rng={}, rng_extra={})

    def write_partial(self) -> None:
        (self.plan.path / "rows.json").write_text(json.dumps(self.rows))

    def write_results(self) -> dict:
        self.write_partial()
        return {"last": sum(self.rows[-1]) / 3}

    def on_failure(self) -> None:
        self.failures += 1

    def done_metrics(self) -> dict | None:
        return {"last": 3.0}


def plan(tmp_path: Path, name: str) -> RunPlan:
    return RunPlan(name, tmp_path / name / "seed0", {"method": name}, f"id-{name}", ["a", "b", "c"])


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_a_complete_run_records_complete_and_deletes_its_checkpoint(tmp_path: Path) -> None:
    (outcome,) = run_jobs([ToyJob(plan(tmp_path, "m"))], notify=lambda m: None)
    folder = tmp_path / "m" / "seed0"
    assert outcome.status == "complete" and outcome.metrics == {"last": 3.0}
    assert manifest(folder)["status"] == "complete" and manifest(folder)["completed_tasks"] == 3
    assert json.loads((folder / "config.json").read_text()) == {"method": "m"}
    assert not (folder / CHECKPOINT_NAME).exists() and not (folder / LOCK_NAME).exists()


def test_a_recorded_failure_is_written_with_its_fields_and_the_next_method_runs(tmp_path: Path) -> None:
    failing = ToyJob(plan(tmp_path, "bad"), fail_at=1, error=Diverged("loss is nan"))
    outcomes = run_jobs([failing, ToyJob(plan(tmp_path, "good"))], notify=lambda m: None)
    assert [o.status for o in outcomes] == ["failed", "complete"]
    record = manifest(tmp_path / "bad" / "seed0")
    assert record["status"] == "failed" and record["error"] == "loss is nan"
    assert (record["failed_task"], record["failed_step"], record["completed_tasks"]) == ("b", 7, 1)
    assert failing.failures == 1  # on_failure ran before the record
    assert load_checkpoint(tmp_path / "bad" / "seed0" / CHECKPOINT_NAME).completed == 1  # resumable after task 1


def test_a_user_error_before_the_first_task_ends_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    job = ToyJob(plan(tmp_path, "m"), fail_at=0, error=UserError("unreadable image"))
    with pytest.raises(UserError):
        run_jobs([job], notify=lambda m: None)
    assert not (tmp_path / "m").exists()  # the folders made for the lock are removed again


def test_a_user_error_after_a_task_is_recorded_failed_and_raised(tmp_path: Path) -> None:
    job = ToyJob(plan(tmp_path, "m"), fail_at=2, error=UserError("unreadable image"))
    with pytest.raises(UserError):
        run_jobs([job], notify=lambda m: None)
    record = manifest(tmp_path / "m" / "seed0")
    assert record["status"] == "failed" and record["error"] == "unreadable image"
    assert json.loads((tmp_path / "m" / "seed0" / "rows.json").read_text()) == [[1.0] * 3, [2.0] * 3]


def test_a_resumed_run_keeps_its_stored_manifest_drops_the_failure_and_records_the_resume(tmp_path: Path) -> None:
    first = ToyJob(plan(tmp_path, "m"), fail_at=2, error=RuntimeError("node lost"))
    with pytest.raises(RuntimeError):
        run_jobs([first], notify=lambda m: None)
    folder = tmp_path / "m" / "seed0"
    stored = manifest(folder)
    assert stored["status"] == "failed" and "traceback" in stored
    again = plan(tmp_path, "m")
    again.mode, again.completed = "resume", 2
    (outcome,) = run_jobs([ToyJob(again)], notify=lambda m: None)
    record = manifest(folder)
    assert outcome.status == "complete" and record["status"] == "complete"
    assert record["started"] == stored["started"]  # the first start, not the resume's
    assert "error" not in record and "traceback" not in record
    assert [r["after_task"] for r in record["resumed"]] == [2]
    assert json.loads((folder / "rows.json").read_text()) == [[1.0] * 3, [2.0] * 3, [3.0] * 3]
