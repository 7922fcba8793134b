"""One writer per run folder: a lock file holding the writer's pid and host.

``<run folder>/run.lock`` is created atomically (written under a temporary name, then hard-linked to its
final name, which fails if the name exists), so two processes can never both believe they hold it. A lock
whose pid is gone on this host (a run killed with SIGKILL) is stale: the next run takes it over and says
so. A lock held by a live process, or by a process on another host (whose liveness cannot be checked from
here), is a :class:`~clbench.errors.UserError` naming the holder and the file to delete if it is dead.

Not covered: a pid reused by an unrelated process after the holder died looks alive (the error tells the
user which file to delete), and two processes taking over the same stale lock at the same instant.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from clbench.errors import UserError

LOCK_NAME = "run.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict:
    """The holder recorded in a lock file; ``{}`` when it cannot be read or parsed."""
    from clbench.storage.safeio import read_json

    try:
        data = read_json(path, "lock file", "", limit=1 << 16)  # a regular file of a few bytes, never a FIFO
    except UserError:
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one run folder; :meth:`acquire` it before writing there, :meth:`release` it after."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self, notify: Callable[[str], None] = lambda message: None) -> None:
        """Take the lock (creating the folder), taking over a stale one; a live holder is a UserError."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        if self.path.exists():
            self._take_over_if_stale(me["host"], notify)  # a live holder: refuse before touching the folder
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".run.lock.", suffix=".tmp", dir=self.folder)
        except OSError as exc:
            raise UserError(f"cannot write in {self.folder} ({exc.strerror}); pass --out to a folder you can "
                            "write") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._take_over_if_stale(me["host"], notify)
            raise UserError(f"could not take the lock {self.path}; another run keeps taking it, try again")
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _take_over_if_stale(self, host: str, notify: Callable[[str], None]) -> None:
        holder = read_lock(self.path)
        pid, their_host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and their_host == host and not pid_alive(pid):
            notify(f"taking over the stale lock {self.path} of process {pid} on {host}, which no longer exists")
            self.path.unlink(missing_ok=True)
            return
        if not holder and not self.path.exists():
            return  # released between our link and our read: try again
        since = holder.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" \
            if isinstance(since, int | float) else ""
        who = f"process {pid} on {their_host}{when}" if pid is not None else "an unknown process"
        raise UserError(f"{self.folder} is in use by another clbench run ({who}); wait for it to finish or pass "
                        f"another --out (if that run is dead, delete {self.path})")

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if self.held:
            if read_lock(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
