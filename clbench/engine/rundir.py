"""Run-folder bookkeeping, written once for every setting's runner (CLIP :mod:`clbench.engine.runner`, LLaVA
:mod:`clbench.settings.mcit.runner`): how a run starts (fresh, resumed after its last completed task, or done),
the locks, the checkpoint's framing, and the manifest's ``running`` / ``complete`` / ``failed`` records.

What stays in a setting: its model, its tasks, its loop, what its checkpoint's method part and result files hold.
The file formats are the results contract of :mod:`clbench.storage.results` and :mod:`clbench.storage.checkpoint`
(``manifest.json``, ``config.json``, ``resume.safetensors``, ``run.lock``), the same for both settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clbench.costs.profiler import Profiler, SectionRecord
from clbench.engine.interrupt import critical
from clbench.errors import UserError
from clbench.storage.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    capture_rng,
    check_info,
    check_rng_tensors,
    load_checkpoint,
    read_info,
    restore_rng,
)
from clbench.storage.lock import LOCK_NAME, RunLock
from clbench.storage.results import atomic_write_json, remove_temporaries

READ_FIX = "delete that run folder, or drop --resume"


@dataclass
class RunPlan:
    """One (method, run folder) after validation: how it starts (``fresh``, ``resume`` after ``completed``
    tasks, ``restart`` a run that completed no task, or ``done`` already). ``resolved`` is the configuration the
    run id is made of (``config.json``); ``tasks`` the task names in order."""

    name: str
    path: Path
    resolved: dict
    run_id: str
    tasks: list[str] = field(default_factory=list)
    mode: str = "fresh"
    completed: int = 0


def read_run_json(path: Path) -> dict:
    """A run file's JSON object; unreadable or not an object is one line naming the file."""
    from clbench.storage.safeio import json_object, read_json

    return json_object(read_json(path, "run file", READ_FIX), path, "run file", READ_FIX)


def read_manifest(folder: Path) -> dict:
    """``folder/manifest.json``, or ``{}`` when there is none."""
    return read_run_json(folder / "manifest.json") if (folder / "manifest.json").exists() else {}


def has_run(path: Path) -> bool:
    """A run was started here: it wrote a manifest or a checkpoint, or it holds (or a kill left) the lock."""
    return any((path / name).exists() for name in ("manifest.json", CHECKPOINT_NAME, LOCK_NAME))


def leftovers(path: Path) -> bool:
    """Whether a complete run's folder holds files a kill left behind."""
    return (path / CHECKPOINT_NAME).exists() or (path / LOCK_NAME).exists() or any(path.glob(".*.tmp"))


def check_something_to_resume(paths: dict[str, Path], options: str) -> None:
    """``--resume`` needs a run of at least one of the methods (the others, never started, start now); ``options``
    names the options that place a run folder (``--out/--seed``)."""
    if not any(has_run(p) for p in paths.values()):
        first = next(iter(paths.values()))
        raise UserError(f"--resume: no run to resume in {first.parent.parent} (no run of {', '.join(paths)} "
                        f"there); check {options}, or drop --resume to start the run")


def decide_start(plan: RunPlan, resume: bool | str, notify: Callable[[str], None],
                 incomplete: Callable[[Path], str | None], union: bool = False, upper: float = 100.0) -> RunPlan:
    """Set ``plan.mode`` / ``plan.completed``: how its run starts, checking a checkpoint's header against it.

    ``incomplete(path)`` says why a ``complete`` folder's files do not back it (``None``: they do). With
    ``resume="auto"`` (sweeps) a run of another configuration in the folder is replaced; ``True`` refuses it in one
    line naming what differs. ``union`` / ``upper``: the checkpoint's score checks (:func:`check_info`)."""
    path, ckpt = plan.path, plan.path / CHECKPOINT_NAME
    if not resume:
        if ckpt.exists():
            notify(f"{plan.name}: starting over in {path}; its unfinished run is discarded (pass --resume to "
                   "continue it)")
        return plan
    if not has_run(path):
        notify(f"{plan.name}: no run to resume in {path}; starting it")
        return plan
    manifest = read_manifest(path)
    if manifest.get("status") == "complete" and manifest.get("run_id") == plan.run_id \
            and incomplete(path) is None:  # a checkpoint left beside it is a kill's leftover
        notify(f"{plan.name}: already complete in {path}; nothing to resume")
        plan.mode, plan.completed = "done", len(plan.tasks)
        return plan
    info = read_info(ckpt) if ckpt.exists() else None
    found = info.get("run_id") if info else manifest.get("run_id")
    if found is None and not manifest and info is None:  # only a lock: killed before its first task ended
        notify(f"{plan.name}: {path} was stopped before its first task ended; starting it from the first task")
        plan.mode = "restart"
        return plan
    if found != plan.run_id:
        if resume == "auto":
            notify(f"{plan.name}: {path} holds a run of other settings; replacing it")
            return plan
        raise UserError(f"--resume: the run in {path} was made with another configuration ({config_diff(plan)}); "
                        "rerun with the same options, or drop --resume to start over")
    if manifest.get("status") == "complete":
        notify(f"{plan.name}: {path} says complete but {incomplete(path)}; running what is missing")
    if info is not None:
        plan.completed = check_info(ckpt, info, plan.run_id, plan.tasks, union, upper=upper)
        plan.mode = "resume"
        notify(f"{plan.name}: resuming {path} after task {plan.completed} of {len(plan.tasks)}")
        return plan
    notify(f"{plan.name}: {path} has no completed task to resume from; starting it from the first task")
    plan.mode = "restart"
    return plan


def config_diff(plan: RunPlan) -> str:
    """The settings that differ between the stored run's config.json and now, for the error message."""
    stored_path = plan.path / "config.json"
    stored = _flatten(read_run_json(stored_path)) if stored_path.exists() else {}
    now = _flatten(plan.resolved)
    keys = sorted(k for k in set(stored) | set(now)
                  if k != "device" and not k.startswith("recipe.") and stored.get(k) != now.get(k))
    if not keys:
        return "its run id differs"
    shown = ", ".join(f"{k}: {stored.get(k, '-')!s} then, {now.get(k, '-')!s} now" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


# ---- locks -----------------------------------------------------------------------------------------------------
def lock_all(plans: list[RunPlan], notify: Callable[[str], None]) -> tuple[list[RunLock], list[Path]]:
    """Lock every run folder or none: on a failure, release what was taken and remove folders made here.
    Returns the locks and the folders made for them (outermost first)."""
    locks: list[RunLock] = []
    made: list[Path] = []
    try:
        for plan in plans:
            made += _missing_dirs(plan.path)
            lock = RunLock(plan.path)
            lock.acquire(notify)
            locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.release()
        remove_empty(made)
        raise
    return locks, made


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (outermost first) that are empty, innermost first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


def tidy_done(path: Path) -> None:
    """A complete run's folder locked by this process: a kill's checkpoint and temporaries are not results."""
    if (path / LOCK_NAME).exists():
        (path / CHECKPOINT_NAME).unlink(missing_ok=True)
        remove_temporaries(path)


# ---- the manifest's records ------------------------------------------------------------------------------------
def write_start(path: Path, manifest: dict, config: dict, resuming: bool, stale: tuple[str, ...]) -> None:
    """A run's first write: the manifest says ``running`` before anything of an earlier run is removed (so a kill in
    between never leaves an old ``complete`` beside missing results), then ``config.json``."""
    with critical():
        atomic_write_json(path / "manifest.json", manifest)
        if not resuming:
            for name in stale:
                (path / name).unlink(missing_ok=True)
        atomic_write_json(path / "config.json", config)


def resumed_entry(after_task: int, at: float, **more) -> dict:
    """The record a resumed run adds to its manifest's ``resumed`` list."""
    return {"after_task": after_task, "at": at, **more}


def write_complete(path: Path, manifest: dict) -> float:
    """Mark the run ``complete`` (every result is on disk) and delete its checkpoint; returns its seconds."""
    seconds = time.time() - manifest["started"]
    manifest.update(status="complete", finished=time.time(), seconds=seconds)
    atomic_write_json(path / "manifest.json", manifest)
    (path / CHECKPOINT_NAME).unlink(missing_ok=True)  # every result is on disk: the checkpoint is not needed
    return seconds


def write_failed(path: Path, manifest: dict, error: str, **more) -> None:
    """Mark the run ``failed`` with ``error`` (one line) and any further fields (traceback, failed task)."""
    manifest.update(status="failed", error=error, finished=time.time(), **more)
    atomic_write_json(path / "manifest.json", manifest)


# ---- the checkpoint's framing ----------------------------------------------------------------------------------
def make_checkpoint(run_id: str, tasks: list[str], zeroshot: list[float], rows: list[list[float]], model,
                    method_state: dict, method_extra: dict, profiler: Profiler,
                    recall: dict | None = None) -> Checkpoint:
    """The run's state after ``len(rows)`` tasks: the setting's rows and method state, and the shared parts
    (model weights, profiler records, every generator's state)."""
    rng, rng_extra = capture_rng()
    return Checkpoint(run_id=run_id, completed=len(rows), datasets=list(tasks), zeroshot=list(zeroshot),
                      rows=[list(r) for r in rows], recall=recall or {}, model=model.state_dict(),
                      method=method_state, method_extra=method_extra,
                      profile=[dataclasses.asdict(r) for r in profiler.records],
                      state_bytes=[dict(r) for r in profiler.state_bytes], rng=rng, rng_extra=rng_extra)


def load_planned_checkpoint(plan: RunPlan, union: bool = False, upper: float = 100.0) -> Checkpoint:
    """``plan``'s checkpoint, checked again against the plan (it may have changed since :func:`decide_start`)."""
    path = plan.path / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    if ckpt.run_id != plan.run_id or ckpt.completed != plan.completed:
        raise UserError(f"{path} changed while this run was starting; rerun with --resume")
    check_info(path, ckpt.info(), plan.run_id, plan.tasks, union, upper=upper)
    check_rng_tensors(path, ckpt.rng)
    return ckpt


def bad_checkpoint(path: Path, why: str) -> UserError:
    return UserError(f"cannot resume from {path}: {why}; delete it and rerun without --resume to start over")


def restore_model(model, stored: dict, where: Path) -> None:
    """Load the checkpoint's model weights (strict: every key, shape and kind of dtype checked first)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise bad_checkpoint(where, f"its model does not fit the model built now (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]})")
    for key, tensor in expected.items():
        value = stored[key]
        if value.shape != tensor.shape or value.dtype.is_floating_point != tensor.dtype.is_floating_point:
            raise bad_checkpoint(where, f"its model/{key} is {value.dtype} {tuple(value.shape)}, the model needs "
                                        f"{tensor.dtype} {tuple(tensor.shape)}")
    model.load_state_dict(stored, strict=True)


def restore_profiler_and_rng(ckpt: Checkpoint, profiler: Profiler, where: Path) -> None:
    """Put back the profiler's records and every generator's state (the last step of a restore)."""
    known = {f.name for f in dataclasses.fields(SectionRecord)}
    try:
        profiler.records = [SectionRecord(**{k: v for k, v in r.items() if k in known}) for r in ckpt.profile]
    except TypeError as exc:
        raise bad_checkpoint(where, f"its profile records are garbled ({exc})") from None
    profiler.state_bytes = [dict(r) for r in ckpt.state_bytes]
    restore_rng(ckpt.rng, ckpt.rng_extra)
