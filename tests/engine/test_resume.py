"""Reliability of `clbench run`: resume after a kill, run-folder locks, atomic writes, the divergence guard.

The acceptance test kills a real `clbench run` process with SIGKILL right after its checkpoint of task 2,
resumes it with `--resume` and compares accuracy.csv byte for byte with an uninterrupted run. The
per-method test interrupts in-process (cheaper) and compares the complete final state (model weights,
method tensors and JSON, accuracy rows) bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import clbench.engine.runner as runner
import clbench.engine.session as session
from clbench.cli.app import main
from clbench.config import TrainConfig, build_config
from clbench.engine.harness import make_loader_factory
from clbench.errors import UserError
from clbench.methods.lora import LoRA
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from clbench.storage.lock import LOCK_NAME, RunLock, pid_alive
from clbench.storage.results import atomic_write_safetensors, atomic_write_text

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]
REPO = Path(__file__).resolve().parents[2]


def run_folder(out: Path, method: str, seed: int = 0) -> Path:
    return out / "synthetic-order1" / method / f"seed{seed}"


def one_line(text: str, notes: bool = False) -> str:
    """The only line of ``text`` (with ``notes``: the only line that is not an informational ``note:``)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if notes:
        lines = [line for line in lines if not line.startswith("note: ")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


# ---- acceptance: SIGKILL after task 2, resume, byte-identical accuracy.csv ------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    import clbench.engine.runner as runner
    import clbench.engine.session as session
    kill_after, save = int(sys.argv[2]), session.save_checkpoint
    def save_then_die(path, ckpt):
        save(path, ckpt)
        if ckpt.completed == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    session.save_checkpoint = save_then_die
    from clbench.cli.app import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow  # three runs of 3 tasks, one in a fresh process: ~25 s idle, ~60 s on a loaded 2-core machine
def test_sigkill_after_task_2_then_resume_gives_identical_accuracy(tmp_path: Path, capsys) -> None:
    args = ["run", "--methods", "keeplora+", *SMOKE, "--set", "data.num_tasks=3"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(torch.get_num_threads()), "2", *args, "--out",
                           str(killed)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = run_folder(killed, "keeplora+")
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"
    assert load_checkpoint(folder / CHECKPOINT_NAME).completed == 2
    assert len(pd.read_csv(folder / "accuracy.csv")) == 2  # completed tasks are on disk already
    assert (folder / LOCK_NAME).exists()  # SIGKILL left the lock behind

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and "resuming" in err
    assert main([*args, "--out", str(clean)]) == 0
    reference = run_folder(clean, "keeplora+")
    for name in ("accuracy.csv", "zeroshot.csv", "metrics.json"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [r["after_task"] for r in manifest["resumed"]] == [2]
    assert not (folder / CHECKPOINT_NAME).exists() and not (folder / LOCK_NAME).exists()


# ---- every method: interrupt in-process, resume, same final state bit for bit -----------------------------
class Interrupt(BaseException):
    """Stands in for a kill: raised right after a checkpoint is written."""


def record_checkpoints(monkeypatch, stop_after: int | None = None) -> list[Checkpoint]:
    """Keep every checkpoint the runner writes; optionally interrupt after the one of ``stop_after`` tasks."""
    seen: list[Checkpoint] = []
    save = session.save_checkpoint

    def spy(path: Path, ckpt: Checkpoint) -> None:
        save(path, ckpt)
        seen.append(ckpt)
        if ckpt.completed == stop_after:
            raise Interrupt

    monkeypatch.setattr(session, "save_checkpoint", spy)
    return seen


def final_state(out: Path, method: str, monkeypatch, *, resume: bool = False, stop_after: int | None = None,
                extra: list[str] = ()) -> Checkpoint:
    cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2", *extra], [method])
    seen = record_checkpoints(monkeypatch, stop_after)
    runner.run_methods(cfg, [method], out, resume=resume, notify=lambda msg: None)
    return seen[-1]


def assert_same_state(a: Checkpoint, b: Checkpoint) -> None:
    assert a.rows == b.rows and a.zeroshot == b.zeroshot and a.completed == b.completed
    assert a.method_extra == b.method_extra
    for name in ("model", "method"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
            assert torch.equal(x[key].cpu(), y[key].cpu()), f"{name}/{key} differs after resume"


def test_resume_starts_the_methods_that_never_started(tmp_path: Path, monkeypatch) -> None:
    cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2"], ["zeroshot", "lora"])
    record_checkpoints(monkeypatch, stop_after=1)
    with pytest.raises(Interrupt):
        runner.run_methods(cfg, ["zeroshot", "lora"], tmp_path, notify=lambda msg: None)
    assert not run_folder(tmp_path, "lora").exists()  # lock released, the folder made for it removed
    monkeypatch.undo()
    notes: list[str] = []
    outcomes = runner.run_methods(cfg, ["zeroshot", "lora"], tmp_path, resume=True, notify=notes.append)
    assert [o.status for o in outcomes] == ["complete", "complete"]
    assert any("zeroshot: resuming" in n and "after task 1 of 2" in n for n in notes)
    assert any("lora: no run to resume" in n for n in notes)


RESUMABLE = ["finetune", "lora", "keeplora", "keeplora+", "keeplora++", "inflora", "loda", "zscl", "lwf", "lwf-vr",
             "wise-ft", "icarl", "moe-adapters", "diki"]
SMALLER = {"zscl": ["zscl.ref_image_count=48", "zscl.ref_caption_count=48", "zscl.ref_batch_size=8",
                    "zscl.text_distill=paper", "zscl.ref_text_batch=8",  # caption samples that differ per task
                    "zscl.avg_freq=2"],
           "lwf-vr": ["lwf-vr.vr_texts=64"]}


@pytest.mark.slow  # 4-12 s per method on a loaded 2-core machine
@pytest.mark.parametrize("method", RESUMABLE)
def test_resumed_run_ends_in_the_same_state(tmp_path: Path, monkeypatch, method: str) -> None:
    extra = SMALLER.get(method, [])
    reference = final_state(tmp_path / "a", method, monkeypatch, extra=extra)
    with pytest.raises(Interrupt):
        final_state(tmp_path / "b", method, monkeypatch, stop_after=1, extra=extra)
    folder = run_folder(tmp_path / "b", method)
    assert json.loads((folder / "manifest.json").read_text())["status"] == "failed"
    resumed = final_state(tmp_path / "b", method, monkeypatch, resume=True, extra=extra)
    assert_same_state(reference, resumed)
    a, b = run_folder(tmp_path / "a", method), run_folder(tmp_path / "b", method)
    assert (a / "accuracy.csv").read_bytes() == (b / "accuracy.csv").read_bytes()
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    profile = pd.read_csv(b / "profile.csv")
    assert sorted(set(profile["task"])) == [-1, 0, 1]  # records of the interrupted part were kept


def test_resume_of_a_complete_run_changes_nothing(tmp_path: Path, capsys) -> None:
    args = ["run", "--methods", "zeroshot", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=2"]
    assert main(args) == 0
    folder = run_folder(tmp_path, "zeroshot")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert not (folder / CHECKPOINT_NAME).exists()  # deleted once the run is complete
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_loader_seeds_do_not_depend_on_earlier_tasks() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(40))

    def order(make) -> list[int]:
        return torch.cat([b[0] for b in make(data, batch_size=8)]).tolist()

    history = make_loader_factory(TrainConfig(), torch.device("cpu"), seed=3)
    history.start_task(0)
    task0 = [order(history) for _ in range(3)]
    history.start_task(1)
    after_history = order(history)
    fresh = make_loader_factory(TrainConfig(), torch.device("cpu"), seed=3)
    fresh.start_task(1)
    assert order(fresh) == after_history
    assert len({tuple(o) for o in [*task0, after_history]}) == 4  # every loader shuffles differently
    other_seed = make_loader_factory(TrainConfig(), torch.device("cpu"), seed=4)
    other_seed.start_task(1)
    assert order(other_seed) != after_history


# ---- locks -----------------------------------------------------------------------------------------------
def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 0.0}))
    return path


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("holder", ["this process", "another host"])
def test_a_live_lock_refuses_the_run_and_changes_nothing(tmp_path: Path, capsys, holder: str) -> None:
    folder = run_folder(tmp_path, "lora")
    if holder == "this process":
        write_lock(folder, os.getpid())
    else:
        write_lock(folder, 1, host="some-other-machine")
    before = snapshot(tmp_path)
    code = main(["run", "--methods", "lora", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=1"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "in use by another clbench run" in line and LOCK_NAME in line
    assert snapshot(tmp_path) == before


def test_a_stale_lock_is_taken_over_and_said_so(tmp_path: Path, capsys) -> None:
    folder = run_folder(tmp_path, "zeroshot")
    pid = dead_pid()
    write_lock(folder, pid)
    assert main(["run", "--methods", "zeroshot", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=1"]) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and str(pid) in err
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
    assert not (folder / LOCK_NAME).exists()


def test_lock_is_exclusive_within_and_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    held = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(UserError, match="in use"):
        second.acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    second.acquire()
    second.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temporary files left


def test_a_lock_failure_takes_back_every_lock_and_folder(tmp_path: Path, capsys) -> None:
    write_lock(run_folder(tmp_path, "lora"), os.getpid())
    code = main(["run", "--methods", "finetune,lora", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=1"])
    assert code == 2 and "in use" in one_line(capsys.readouterr().err)
    assert not run_folder(tmp_path, "finetune").parent.exists()  # made for its lock, removed again


# ---- atomic writes ---------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    atomic_write_safetensors(target, {"a": torch.ones(2)})
    old = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises for a non-tensor
        atomic_write_safetensors(target, {"a": torch.ones(2), "b": "not a tensor"})  # type: ignore[dict-item]
    assert target.read_bytes() == old
    with pytest.raises(ZeroDivisionError):
        from clbench.storage import results

        results._atomic(tmp_path / "y.txt", lambda fh: (fh.write(b"partial"), 1 / 0))
    assert not (tmp_path / "y.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    atomic_write_text(tmp_path / "z.txt", "whole")
    assert (tmp_path / "z.txt").read_text() == "whole"


# ---- divergence guard ------------------------------------------------------------------------------------
def test_huge_learning_rate_stops_with_task_and_step(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "lora", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=2",
                 "--set", "train.lr=1e30"])
    line = one_line(capsys.readouterr().err, notes=True)
    assert code == 1
    assert "lora failed" in line and "diverged on task" in line and "at step" in line
    manifest = json.loads((run_folder(tmp_path, "lora") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and isinstance(manifest["failed_step"], int)
    assert not (run_folder(tmp_path, "lora") / LOCK_NAME).exists()


def test_divergence_keeps_completed_tasks(tmp_path: Path, capsys, monkeypatch) -> None:
    real_loss = LoRA.loss

    def loss(self, images, labels, task):
        value = real_loss(self, images, labels, task)
        return value * float("nan") if task.index == 1 and self._steps == 2 else value

    def after_step(self, task, step):
        self._steps = step + 1

    def before_task(self, task):
        self._steps = 0
        real_before(self, task)

    real_before = LoRA.before_task
    monkeypatch.setattr(LoRA, "loss", loss)
    monkeypatch.setattr(LoRA, "after_step", after_step)
    monkeypatch.setattr(LoRA, "before_task", before_task)
    code = main(["run", "--methods", "lora", "--out", str(tmp_path), *SMOKE, "--set", "data.num_tasks=3"])
    line = one_line(capsys.readouterr().err, notes=True)
    folder = run_folder(tmp_path, "lora")
    acc = pd.read_csv(folder / "accuracy.csv")
    second = list(pd.read_csv(folder / "zeroshot.csv").columns)[2]
    assert code == 1 and f"task {second!r} at step 2" in line
    assert len(acc) == 1  # the completed first task
    profile = pd.read_csv(folder / "profile.csv")
    assert {0, 1} <= set(profile["task"])  # the failed task's time is kept too
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed_task"] == second and manifest["failed_step"] == 2
    assert not (folder / "metrics.json").exists()
    assert load_checkpoint(folder / CHECKPOINT_NAME).completed == 1
    code = main(["report", str(tmp_path), "--out", str(tmp_path / "report")])
    assert code == 2 and "no complete runs" in one_line(capsys.readouterr().err)  # never read as complete
