"""Faults during `clbench run`, second round: kills while a rerun replaces a complete run, edited resume
checkpoints, stray files after kills, a kill in the first task, SIGTERM and SIGINT.

Kills are real (a subprocess that sends itself SIGKILL/SIGTERM/SIGINT at a chosen point); checkpoint edits
rewrite a real checkpoint with one field changed. The invariant checked throughout: a ``complete`` status is
backed by every result file, and every failure is one line with exit status 2 that changes nothing."""

from __future__ import annotations

import json
import os
import signal
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
from clbench.config import build_config
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from clbench.storage.lock import LOCK_NAME
from clbench.storage.results import missing_results

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_resume import Interrupt, dead_pid, record_checkpoints, run_folder, write_lock  # noqa: E402

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]
TWO = ["--set", "data.num_tasks=2"]
REPO = Path(__file__).resolve().parents[2]

# A `clbench run` in a fresh process that hurts itself at a chosen point (argv: mode, signal, n, then the CLI's).
HURT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    mode, sig, n = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    import clbench.engine.runner as runner
    import clbench.engine.session as session
    if mode == "after_checkpoint":  # inside the section that writes a task's files: the signal must wait
        save = session.save_checkpoint
        def spy(path, ckpt):
            save(path, ckpt)
            if ckpt.completed == n:
                os.kill(os.getpid(), sig)
        session.save_checkpoint = spy
    elif mode == "phase":  # at the n-th progress phase (evaluation or training of some task)
        import clbench.engine.progress as progress
        calls, make = [0], progress.RunProgress.hooks_for
        def hooks_for(self, name):
            hooks = make(self, name)
            inner = hooks.on_phase
            def on_phase(phase, total):
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), sig)
                inner(phase, total)
            hooks.on_phase = on_phase
            return hooks
        progress.RunProgress.hooks_for = hooks_for
    elif mode.startswith(("before:", "after:")):  # around the n-th atomic JSON write of a file
        when, name = mode.split(":")
        write, calls = session.atomic_write_json, [0]
        def spy(path, data):
            hit = path.name == name and calls[0] + 1 == n
            calls[0] += path.name == name
            if hit and when == "before":
                os.kill(os.getpid(), sig)
            write(path, data)
            if hit and when == "after":
                os.kill(os.getpid(), sig)
        import clbench.engine.rundir as rundir  # the run folder's first and last records (both runners)
        session.atomic_write_json = rundir.atomic_write_json = spy
    from clbench.cli.app import main
    sys.exit(main(sys.argv[4:]))
""")


def hurt(mode: str, sig: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", HURT, mode, sig, str(n), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``root`` with its mtime and bytes (a lock taken and released leaves no file)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def status(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["status"]


def assert_status_is_true(folder: Path) -> None:
    """``complete`` on disk only with every result file there."""
    if (folder / "manifest.json").exists() and status(folder) == "complete":
        assert missing_results(folder) is None, missing_results(folder)


# ---- 1. a rerun killed while it replaces a complete run ------------------------------------------------
@pytest.fixture(scope="module")
def complete_zeroshot(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("complete")
    assert main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, *TWO]) == 0
    return out


@pytest.mark.parametrize("point", ["before:manifest.json", "after:manifest.json", "after:config.json"])
def test_rerun_killed_while_replacing_a_complete_run_never_claims_complete(
        complete_zeroshot: Path, tmp_path: Path, capsys, point: str) -> None:
    import shutil

    out = Path(shutil.copytree(complete_zeroshot, tmp_path / "out"))
    folder = run_folder(out, "zeroshot")
    reference = (folder / "accuracy.csv").read_bytes()
    args = ["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, *TWO]
    proc = hurt(point, "SIGKILL", 1, args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert_status_is_true(folder)
    if point != "before:manifest.json":  # the rerun has started: the old run is no longer claimed
        assert status(folder) == "running"
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert status(folder) == "complete" and missing_results(folder) is None
    assert (folder / "accuracy.csv").read_bytes() == reference


def test_complete_status_without_its_files_is_not_trusted(complete_zeroshot: Path, tmp_path: Path, capsys) -> None:
    import shutil

    out = Path(shutil.copytree(complete_zeroshot, tmp_path / "out"))
    folder = run_folder(out, "zeroshot")
    reference = (folder / "accuracy.csv").read_bytes()
    (folder / "accuracy.csv").unlink()
    (folder / "metrics.json").unlink()
    assert main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, *TWO, "--resume"]) == 0
    assert "says complete but accuracy.csv is missing" in capsys.readouterr().err
    assert (folder / "accuracy.csv").read_bytes() == reference and (folder / "metrics.json").exists()


# ---- 2. an edited resume checkpoint -------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted_keeplora(tmp_path_factory) -> Path:
    """A lora run stopped right after its checkpoint of task 1 of 2."""
    out = tmp_path_factory.mktemp("interrupted")
    cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2"], ["keeplora"])
    with pytest.MonkeyPatch.context() as mp:
        record_checkpoints(mp, stop_after=1)
        with pytest.raises(Interrupt):
            runner.run_methods(cfg, ["keeplora"], out, notify=lambda msg: None)
    return out


def _edit(ckpt: Checkpoint, case: str) -> None:
    first_model = next(iter(ckpt.model))
    if case == "completed beyond its rows":
        ckpt.completed = 2
    elif case == "completed as text":
        ckpt.completed = "1"  # type: ignore[assignment]
    elif case == "completed zero":
        ckpt.completed = 0
    elif case == "a row too short":
        ckpt.rows = [ckpt.rows[0][:-1]]
    elif case == "an accuracy above 100":
        ckpt.rows = [[150.0] + ckpt.rows[0][1:]]
    elif case == "an accuracy as text":
        ckpt.rows = [["x"] + ckpt.rows[0][1:]]
    elif case == "zero-shot row missing":
        ckpt.zeroshot = []
    elif case == "another task list":
        ckpt.datasets = list(reversed(ckpt.datasets))
    elif case == "python generator state":
        ckpt.rng_extra = {**ckpt.rng_extra, "python": [3, [1, 2, 3], None]}
    elif case == "numpy generator state":
        ckpt.rng_extra = {**ckpt.rng_extra, "numpy": ["MT19937", [1, 2], 0, 0, 0.0]}
    elif case == "torch generator state":
        ckpt.rng = {"torch": torch.zeros(7, dtype=torch.uint8)}
    elif case == "a model tensor reshaped":
        ckpt.model[first_model] = torch.zeros(3, 1)
    elif case == "a model tensor missing":
        del ckpt.model[first_model]
    elif case == "profile records garbled":
        ckpt.profile = [{"task": 0}]
    else:
        raise AssertionError(case)


EDITS = ["completed beyond its rows", "completed as text", "completed zero", "a row too short",
         "an accuracy above 100", "an accuracy as text", "zero-shot row missing", "another task list",
         "python generator state", "numpy generator state", "torch generator state", "a model tensor reshaped",
         "a model tensor missing", "profile records garbled"]


@pytest.mark.parametrize("case", EDITS)
def test_edited_checkpoint_is_one_line_and_changes_nothing(interrupted_keeplora: Path, tmp_path: Path, capsys,
                                                           case: str) -> None:
    import shutil

    out = Path(shutil.copytree(interrupted_keeplora, tmp_path / "out"))
    path = run_folder(out, "keeplora") / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    assert ckpt.method, "keeplora's checkpoint should hold method tensors"
    _edit(ckpt, case)
    save_checkpoint(path, ckpt)
    before = snapshot(out)
    code = main(["run", "--methods", "keeplora", "--out", str(out), *SMOKE, *TWO, "--resume"])
    line = assert_one_line_error_ignoring_notes(capsys, code)
    assert "cannot resume from" in line and CHECKPOINT_NAME in line, line
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["a method tensor reshaped", "completed count", "one byte of a tensor"])
def test_hand_edited_checkpoint_fails_its_digest(interrupted_keeplora: Path, tmp_path: Path, capsys,
                                                 case: str) -> None:
    """Edits that keep the file's original digest (as a hand edit or disk damage would)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = Path(shutil.copytree(interrupted_keeplora, tmp_path / "out"))
    path = run_folder(out, "keeplora") / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    method_key = next(k for k in tensors if k.startswith("method/"))
    if case == "a method tensor reshaped":
        tensors[method_key] = torch.zeros(2, 2, 2)
    elif case == "completed count":
        info = json.loads(meta["clbench"])
        info["completed"] = 2
        info["rows"] = info["rows"] * 2
        meta["clbench"] = json.dumps(info)
    else:
        flat = tensors[method_key].reshape(-1)
        flat[0] = flat[0] + 1
    save_file(tensors, str(path), metadata=meta)
    before = snapshot(out)
    code = main(["run", "--methods", "keeplora", "--out", str(out), *SMOKE, *TWO, "--resume"])
    line = assert_one_line_error_ignoring_notes(capsys, code)
    assert "cannot resume from" in line and "digest" in line, line
    assert snapshot(out) == before


def test_unedited_checkpoint_resumes(interrupted_keeplora: Path, tmp_path: Path, capsys) -> None:
    """The control for the edits above: the same checkpoint, rewritten unchanged, resumes to a complete run."""
    import shutil

    out = Path(shutil.copytree(interrupted_keeplora, tmp_path / "out"))
    path = run_folder(out, "keeplora") / CHECKPOINT_NAME
    save_checkpoint(path, load_checkpoint(path))
    assert main(["run", "--methods", "keeplora", "--out", str(out), *SMOKE, *TWO, "--resume"]) == 0
    folder = run_folder(out, "keeplora")
    assert status(folder) == "complete" and missing_results(folder) is None


def assert_one_line_error_ignoring_notes(capsys, code: int) -> str:
    captured = capsys.readouterr()
    lines = [x for x in captured.err.strip().splitlines() if x.strip() and not x.startswith("note: ")]
    assert code == 2 and len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and lines[0].startswith("error: ")
    return lines[0]


# ---- 9. stray files after kills -----------------------------------------------------------------------
def test_resume_removes_temporaries_of_interrupted_writes(interrupted_keeplora: Path, tmp_path: Path, capsys) -> None:
    import shutil

    out = Path(shutil.copytree(interrupted_keeplora, tmp_path / "out"))
    folder = run_folder(out, "keeplora")
    for name in (".accuracy.csv.k2j3.tmp", ".resume.safetensors.x8s1.tmp", ".manifest.json.a1b2.tmp"):
        (folder / name).write_bytes(b"half a file")
    write_lock(folder, dead_pid())
    assert main(["run", "--methods", "keeplora", "--out", str(out), *SMOKE, *TWO, "--resume"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["accuracy.csv", "config.json", "manifest.json", "metrics.json", "profile.csv", "zeroshot.csv",
         *(["state_bytes.csv"] if (folder / "state_bytes.csv").exists() else [])])


def test_complete_run_left_with_a_checkpoint_lock_and_temporaries_is_tidied(complete_zeroshot: Path, tmp_path: Path,
                                                                             capsys) -> None:
    """A kill after the manifest said complete but before the checkpoint was deleted (and the lock released)."""
    import shutil

    out = Path(shutil.copytree(complete_zeroshot, tmp_path / "out"))
    folder = run_folder(out, "zeroshot")
    results = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / CHECKPOINT_NAME).write_bytes(b"x" * 1000)
    (folder / ".profile.csv.zz.tmp").write_bytes(b"half")
    write_lock(folder, dead_pid())
    assert main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, *TWO, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == results


def test_a_finished_method_releases_its_lock_before_the_next_starts(tmp_path: Path, monkeypatch) -> None:
    cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2"], ["zeroshot", "lora"])
    seen_locks: list[bool] = []
    save = session.save_checkpoint

    def spy(path: Path, ckpt: Checkpoint) -> None:
        save(path, ckpt)
        if path.parent.parent.name == "lora":
            seen_locks.append((run_folder(tmp_path, "zeroshot") / LOCK_NAME).exists())
            raise Interrupt  # stands for a kill during the second method

    monkeypatch.setattr(session, "save_checkpoint", spy)
    with pytest.raises(Interrupt):
        runner.run_methods(cfg, ["zeroshot", "lora"], tmp_path, notify=lambda msg: None)
    assert seen_locks == [False]
    zeroshot = run_folder(tmp_path, "zeroshot")
    assert status(zeroshot) == "complete" and not (zeroshot / CHECKPOINT_NAME).exists()


# ---- 10. killed during the first task -----------------------------------------------------------------
def test_resume_after_a_kill_in_the_first_task_starts_the_run(tmp_path: Path, capsys) -> None:
    folder = run_folder(tmp_path, "zeroshot")
    write_lock(folder, dead_pid())  # all a kill in the first task leaves: the folder and the stale lock
    assert main(["run", "--methods", "zeroshot", "--out", str(tmp_path), *SMOKE, *TWO, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "stopped before its first task ended" in err and "stale lock" in err
    assert status(folder) == "complete" and missing_results(folder) is None
    assert not (folder / LOCK_NAME).exists()


# ---- 12. SIGTERM and SIGINT -------------------------------------------------------------------------------
@pytest.mark.parametrize(("sig", "mode", "n"), [("SIGTERM", "after_checkpoint", 1), ("SIGINT", "after_checkpoint", 1),
                                                ("SIGTERM", "phase", 4)])
def test_signal_marks_the_run_interrupted_and_says_how_to_resume(tmp_path: Path, capsys, sig: str, mode: str,
                                                                  n: int) -> None:
    args = ["run", "--methods", "lora", "--out", str(tmp_path), *SMOKE, *TWO]
    proc = hurt(mode, sig, n, args)
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip() and not x.startswith("note: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"interrupted by {sig}" in lines[0] and "--resume" in lines[0] and "resume with: clbench run" in lines[0]
    folder = run_folder(tmp_path, "lora")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["interrupted_by"] == sig
    assert not (folder / LOCK_NAME).exists()
    if mode == "after_checkpoint":  # held until the task's files were all written
        assert manifest["completed_tasks"] == 1 and load_checkpoint(folder / CHECKPOINT_NAME).completed == 1
        assert len(pd.read_csv(folder / "accuracy.csv")) == 1
        assert "after task 1 of 2" in lines[0]
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert status(folder) == "complete" and missing_results(folder) is None


# ---- 8. a full disk during a run ------------------------------------------------------------------------
def test_full_disk_during_a_run_is_one_line_and_resumable(tmp_path: Path, capsys, monkeypatch) -> None:
    from clbench.storage import results

    args = ["run", "--methods", "zeroshot", "--out", str(tmp_path), *SMOKE, *TWO]
    real, calls = results.atomic_write_text, []

    def full_on_second_task(path, text):
        calls.append(path.name)
        if path.name == "accuracy.csv" and calls.count("accuracy.csv") == 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(results, "atomic_write_text", full_on_second_task)
    code = main(args)
    captured = capsys.readouterr()
    lines = [x for x in captured.err.strip().splitlines() if x.strip() and not x.startswith("note: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    assert "No space left on device" in lines[0] and "accuracy.csv" in lines[0]
    folder = run_folder(tmp_path, "zeroshot")
    assert status(folder) == "failed" and not (folder / LOCK_NAME).exists()
    assert load_checkpoint(folder / CHECKPOINT_NAME).completed == 1  # task 1 stays on disk, whole
    assert len(pd.read_csv(folder / "accuracy.csv")) == 1
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert status(folder) == "complete" and missing_results(folder) is None


# ---- 3. special files inside a run folder -----------------------------------------------------------------
@pytest.mark.parametrize(("victim", "kind"), [("manifest.json", "/dev/zero"), (CHECKPOINT_NAME, "/dev/zero"),
                                              (CHECKPOINT_NAME, "fifo"), ("config.json", "fifo")])
def test_resume_with_a_special_file_in_the_run_folder(interrupted_keeplora: Path, tmp_path: Path, capsys,
                                                      victim: str, kind: str) -> None:
    import shutil

    out = Path(shutil.copytree(interrupted_keeplora, tmp_path / "out"))
    folder = run_folder(out, "keeplora")
    (folder / victim).unlink()
    if kind == "fifo":
        os.mkfifo(folder / victim)
    else:
        (folder / victim).symlink_to(kind)
    if victim == "config.json":  # read only to explain a different configuration
        (folder / "manifest.json").write_text(json.dumps({"status": "failed", "run_id": "another"}))
        (folder / CHECKPOINT_NAME).unlink()
    code = main(["run", "--methods", "keeplora", "--out", str(out), *SMOKE, *TWO, "--resume"])
    line = assert_one_line_error_ignoring_notes(capsys, code)
    assert victim in line and "not a regular file" in line, line
