"""One method's run in its locked folder, and a list of such runs: the control flow every setting shares.

A setting supplies a :class:`RunJob` per method (build its model and method, restore them from a checkpoint, run
its task loop, write its result files); this module does the rest once for both settings (CLIP
:mod:`clbench.engine.runner`, LLaVA :mod:`clbench.settings.mcit.runner`):

- a run already complete is only tidied (a kill's checkpoint and temporaries removed);
- a resumed run's checkpoint is loaded and checked against the plan, its manifest keeps what the stored one says
  (the first start, the environment) and records the resume;
- the first write is made when the first task ends (or the run fails for a reason other than a user error): a user
  error before it leaves the folder as it was;
- after every task, inside one :func:`~clbench.engine.interrupt.critical` section: the results so far, the resume
  checkpoint and the manifest's count of completed tasks;
- the manifest ends ``complete`` (checkpoint deleted), ``interrupted`` (SIGTERM / SIGINT, resumable), or
  ``failed`` (a :class:`RecordedFailure` such as a diverging loss is recorded and the next method runs; any other
  error is recorded and raised).

Bookkeeping helpers (start decision, locks, manifest records, checkpoint framing) are :mod:`clbench.engine.rundir`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clbench.engine.interrupt import RunInterrupted, critical, handling_signals, mark_interrupted
from clbench.engine.rundir import (
    RunPlan,
    leftovers,
    load_planned_checkpoint,
    lock_all,
    read_manifest,
    remove_empty,
    resumed_entry,
    tidy_done,
    write_complete,
    write_failed,
    write_start,
)
from clbench.errors import RecordedFailure, UserError
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from clbench.storage.results import atomic_write_json, remove_temporaries

__all__ = ["RecordedFailure", "RunJob", "RunOutcome", "execute", "run_jobs"]

# Fields of a failed attempt's manifest that a resumed run drops.
FAILURE_FIELDS = ("error", "traceback", "finished", "seconds", "failed_task", "failed_step")


@dataclass
class RunOutcome:
    """How one method's run ended: ``complete`` (with its metrics) or ``failed`` (with its one-line error)."""

    method: str
    path: Path
    status: str
    metrics: dict | None
    error: str | None = None
    seconds: float = 0.0


class RunJob:
    """One method's run as its setting carries it out; the engine calls, in order: :meth:`start`, then for a
    resumed run :meth:`resume`, then :meth:`run` (which calls back after every task, when :meth:`capture` and
    :meth:`write_partial` are called), then :meth:`write_results`. Subclasses keep the model, method and results
    so far as attributes."""

    stale: tuple[str, ...] = ()  # result files of an earlier run that a fresh start removes

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan

    def checkpoint_checks(self) -> dict:
        """Keyword arguments of :func:`~clbench.engine.rundir.load_planned_checkpoint` (the score bounds)."""
        return {}

    def start(self, started: float) -> dict:
        """Build the model and the method (fresh); return the run's manifest (status ``running``)."""
        raise NotImplementedError

    def resume(self, ckpt: Checkpoint) -> None:
        """Put the checkpoint's state into the model, the method, the profiler and the results so far."""
        raise NotImplementedError

    def run(self, on_task_end: Callable[[int], None]) -> None:
        """Run the remaining tasks; call ``on_task_end(completed)`` after each, with the results so far held."""
        raise NotImplementedError

    def capture(self) -> Checkpoint:
        """The resume checkpoint of the state after the last completed task."""
        raise NotImplementedError

    def write_partial(self) -> None:
        """Result files of the tasks done so far (inside the task-end critical section); default: none."""

    def write_results(self) -> dict:
        """The complete run's result files; returns its metrics."""
        raise NotImplementedError

    def on_failure(self) -> None:
        """Before a :class:`RecordedFailure` is recorded: files worth keeping of the failed run (its profile)."""

    def done_metrics(self) -> dict | None:
        """The metrics of the run found complete in the folder."""
        raise NotImplementedError


def execute(job: RunJob) -> RunOutcome:
    """Carry out ``job`` in its (already locked) folder, as the module docstring says."""
    plan = job.plan
    path, name = plan.path, plan.name
    if plan.mode == "done":
        tidy_done(path)  # locked by us only to tidy: a kill's leftovers are not results
        return RunOutcome(name, path, "complete", job.done_metrics(),
                          seconds=float(read_manifest(path).get("seconds", 0.0)))
    remove_temporaries(path)  # under the lock: temporaries of writes a kill interrupted
    started = time.time()
    manifest = job.start(started)
    if plan.mode == "resume":
        ckpt = load_planned_checkpoint(plan, **job.checkpoint_checks())
        stored = read_manifest(path)
        for key in FAILURE_FIELDS:
            stored.pop(key, None)
        environment = manifest.get("environment")
        manifest = {**manifest, **stored, "status": "running", "run_id": plan.run_id}
        manifest["resumed"] = [*stored.get("resumed", []),
                               resumed_entry(ckpt.completed, started, environment=environment)]
        job.resume(ckpt)
        del ckpt
    written = False

    def commit() -> None:
        """The run's first write: clear what an earlier run left, then config.json and the manifest."""
        nonlocal written
        if not written:
            write_start(path, manifest, plan.resolved, plan.mode == "resume", job.stale)
            written = True

    if plan.mode == "resume":
        commit()

    def on_task_end(completed: int) -> None:
        commit()
        with critical():
            job.write_partial()
            save_checkpoint(path / CHECKPOINT_NAME, job.capture())
            manifest["completed_tasks"] = completed
            atomic_write_json(path / "manifest.json", manifest)

    try:
        job.run(on_task_end)
        commit()
        with critical():
            metrics = job.write_results()
            seconds = write_complete(path, manifest)
        return RunOutcome(name, path, "complete", metrics, seconds=seconds)
    except RunInterrupted as exc:
        commit()
        mark_interrupted(exc, manifest, path, name, len(plan.tasks), plan.completed)
        raise
    except RecordedFailure as exc:
        commit()
        job.on_failure()
        write_failed(path, manifest, str(exc), **exc.record())
        return RunOutcome(name, path, "failed", None, str(exc))
    except UserError as exc:
        if not written:  # e.g. an unreadable image in the first task: the folder stays as it was
            raise
        write_failed(path, manifest, str(exc))
        raise
    except BaseException as exc:
        commit()
        write_failed(path, manifest, f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                     traceback=traceback.format_exc())
        raise


def run_jobs(jobs: list[RunJob], notify: Callable[[str], None], notes: list[str] | None = None) -> list[RunOutcome]:
    """Lock every job's folder (all or none), say ``notes`` and the locks' notes, then run the jobs one after the
    other under SIGTERM / SIGINT handling; each folder's lock is released as soon as its run ends."""
    notes = list(notes or [])
    # a complete run is locked only to tidy what a kill left (a checkpoint, temporaries, a stale lock)
    locks, made = lock_all([job.plan for job in jobs if job.plan.mode != "done" or leftovers(job.plan.path)],
                           notes.append)
    for note in notes:  # said once everything is checked and locked, so an error stays the only line
        notify(note)
    by_path = {lock.folder: lock for lock in locks}
    outcomes = []
    try:
        with handling_signals():
            for job in jobs:
                try:
                    outcomes.append(execute(job))
                finally:  # a finished run keeps no lock while the next method runs
                    lock = by_path.pop(job.plan.path, None)
                    if lock is not None:
                        lock.release()
        return outcomes
    finally:
        for lock in by_path.values():
            lock.release()
        remove_empty(made)  # folders made for a lock whose run wrote nothing (a user error in its first task)
