"""SIGTERM and SIGINT during a run: stop at a safe point, never in the middle of writing results.

SLURM sends SIGTERM on a time-out or pre-emption, a user presses Ctrl-C (SIGINT). While :func:`handling_signals`
is active (in the main thread), either signal raises :class:`RunInterrupted` where the run is, unless the run is
inside :func:`critical` (writing a task's results, checkpoint and manifest): then the signal is held and raised
when that section ends, so the files on disk always form one consistent state. The runner catches it, marks
the run ``interrupted`` and the command line prints one line saying how to resume.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(BaseException):  # noqa: N818 - it is an interruption, not an error of the program
    """A run stopped by a signal. ``where`` is filled in by the runner (method, folder, tasks done)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.where = ""
        super().__init__(f"interrupted by {self.name}")


class _State:
    depth = 0  # nesting of critical sections
    pending: int | None = None  # a signal held until the critical section ends
    active = False


_state = _State()


def _handle(signum: int, frame) -> None:  # noqa: ARG001 - the signal-handler signature
    if _state.depth > 0:
        _state.pending = signum
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`RunInterrupted` for the duration (main thread only; elsewhere,
    such as in a Ray worker thread, the signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread() or _state.active:
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _handle)
    _state.active, _state.pending, _state.depth = True, None, 0
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.active, _state.pending, _state.depth = False, None, 0


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not cut (results being written): a signal that arrives is raised at its end."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _state.depth == 0 and _state.pending is not None:
        signum, _state.pending = _state.pending, None
        raise RunInterrupted(signum)


def mark_interrupted(exc: RunInterrupted, manifest: dict, folder, name: str, total: int, default_done: int) -> None:
    """Record an interruption in ``folder``'s manifest (status ``interrupted``, by which signal, when) and say on
    ``exc`` where the run stopped, for the one-line resume message; shared by the CLIP and LLaVA runners."""
    import time

    from clbench.storage.results import atomic_write_json

    done = manifest.get("completed_tasks", default_done)
    with critical():
        manifest.update(status="interrupted", interrupted_by=exc.name, finished=time.time())
        atomic_write_json(folder / "manifest.json", manifest)
    exc.where = f"{name} stopped after task {done} of {total} in {folder}"
