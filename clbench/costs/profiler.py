"""Named cost sections: wall time (device-synchronised on CUDA) and peak memory, per task.

Shared section names: ``pretrained_svd``, ``grad_estimation``, ``grad_svd``, ``feature_stats``,
``feature_svd``, ``merge``, ``train``, ``eval``; methods may add their own (``reference_forward``,
``covariance``, ``memory_update``...). A section entered several times in one task is one row (seconds
summed, peaks maxed, ``calls`` counted). Sections may nest (``setup`` holds ``pretrained_svd``); an outer
section's peak includes its inner sections'.

Memory columns of :meth:`Profiler.frame` (``memory_kind`` says what ``peak_bytes`` holds):

- ``cuda_peak_allocated`` (CUDA): ``torch.cuda.max_memory_allocated`` over the section — bytes of all live
  CUDA tensors at their peak, model weights included. ``start_bytes`` is ``memory_allocated`` at entry.
- ``cpu_section_peak_rss`` (CPU, Linux): the process's peak resident set size *during the section*: the
  kernel's high-water mark ``VmHWM`` is reset to the current RSS at entry (``/proc/self/clear_refs``, value 5)
  and read at exit. It covers everything the process holds (weights, data, allocator caches, Python), so
  ``peak_bytes − start_bytes`` (``start_bytes`` = RSS at entry) is what the section added at its peak, give
  or take memory the allocator keeps cached. DataLoader worker processes are not included. The reset also
  lowers ``getrusage``'s ``ru_maxrss``; :attr:`Profiler.process_peak_bytes` keeps the lifetime peak.
- ``cpu_process_peak_rss`` (CPU, elsewhere: no writable ``clear_refs``): ``ru_maxrss`` at exit, the whole
  process's peak since it started (it only grows).

``tensor_peak_bytes`` (only with ``track_tensors=True``): the peak total size of tensor storages *created in
the section* and alive at the same time (:class:`TensorPeakTracker`, exact for tensors made by PyTorch
operators, on any device; excludes pre-existing tensors such as the weights, and memory a kernel uses
internally without returning a tensor). It costs a Python call per operator (a few microseconds each), so
the harness leaves it off; ``clbench profile`` turns it on.
"""

from __future__ import annotations

import resource
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 2**20
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MEMORY_KINDS = {
    "cuda_peak_allocated": "CUDA peak allocated",
    "cpu_section_peak_rss": "CPU process peak RSS in section",
    "cpu_process_peak_rss": "CPU process peak RSS since start",
}
FRAME_COLUMNS = ["task", "section", "seconds", "peak_bytes", "memory_kind", "calls", "start_bytes",
                 "tensor_peak_bytes", "parent"]


# ---- exact peak of the tensors an operation sequence creates ----------------------------------------------
class TensorPeakTracker(TorchDispatchMode):
    """Peak total bytes of tensor storages created while active and alive at the same time.

    Every PyTorch operator call (forward and autograd backward on this thread, factory functions, data
    collation) passes through :meth:`__torch_dispatch__`; each output storage that is not one of the
    operator's input storages (views and in-place results are not new memory) is counted until it is freed
    (a ``weakref.finalize`` on the storage, whose Python object lives exactly as long as the storage).
    ``device_type`` restricts counting to one device type (e.g. ``"cpu"`` for host memory in a CUDA run).
    Storages created before entry are never counted, even when freed inside (``live`` can go below the
    value at entry only through frees of storages created inside, so it never goes negative).
    """

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.ops = 0
        self._refs: dict[int, tuple[int, weakref.ref]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        outputs = [t for t in _tensors(out) if t.layout == torch.strided]
        if not outputs:
            return out
        inputs = {id(t.untyped_storage()) for t in _tensors(args) if t.layout == torch.strided}
        if kwargs:
            inputs |= {id(t.untyped_storage()) for t in _tensors(tuple(kwargs.values())) if t.layout == torch.strided}
        for t in outputs:
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._refs or t.is_meta:
                continue
            if self.device_type is not None and storage.device.type != self.device_type:
                continue
            size = storage.nbytes()
            self._refs[key] = (size, weakref.ref(storage, lambda _, key=key: self._freed(key)))
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
        return out

    def _freed(self, key: int) -> None:
        size, _ = self._refs.pop(key, (0, None))
        self.live -= size


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in an operator's arguments or results (flat, or in lists/tuples one level deep)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        found = []
        for item in value:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, list | tuple):
                found += [x for x in item if isinstance(x, torch.Tensor)]
        return found
    return []


# ---- process memory probes ---------------------------------------------------------------------------------
def _status_bytes(field_name: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with CLEAR_REFS.open("w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- the profiler ----------------------------------------------------------------------------------------
@dataclass
class SectionRecord:
    task: int
    section: str
    seconds: float
    peak_bytes: int
    memory_kind: str
    calls: int = 1
    start_bytes: int = 0
    tensor_peak_bytes: int | None = None
    parent: str = ""  # the section this one ran inside ("" at top level): its time is part of the parent's


@dataclass(eq=False)
class _Open:
    """A section in progress: the peak seen so far (folded in before every nested reset)."""

    peak: int = 0


# Sections in progress per memory probe ("cpu" or a CUDA device), shared by all profilers of the process: the
# probes are process-wide, so a reset by any profiler must first fold the peak into every open section.
_OPEN: dict[str, list[_Open]] = {}


@dataclass
class Profiler:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: list[SectionRecord] = field(default_factory=list)
    state_bytes: list[dict] = field(default_factory=list)
    task: int = -1
    track_tensors: bool = False
    process_peak_bytes: int = 0
    _section_rss: bool | None = field(default=None, repr=False)
    _names: list[str] = field(default_factory=list, repr=False)  # this profiler's open sections, innermost last

    # -- memory probes, one per device kind --
    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_kind(self) -> str:
        if self.cuda:
            return "cuda_peak_allocated"
        return "cpu_section_peak_rss" if self._can_reset_rss() else "cpu_process_peak_rss"

    def _can_reset_rss(self) -> bool:
        if self._section_rss is None:
            self._section_rss = sys.platform.startswith("linux") and _status_bytes("VmHWM") is not None \
                and _reset_hwm()
        return self._section_rss

    def _current_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        if self._can_reset_rss():
            return _status_bytes("VmRSS") or 0
        return _process_peak_rss()

    def _peak_since_reset(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._can_reset_rss():
            return _status_bytes("VmHWM") or 0
        return _process_peak_rss()

    @property
    def _open(self) -> list[_Open]:
        return _OPEN.setdefault(str(self.device) if self.cuda else "cpu", [])

    def _fold_peak(self) -> None:
        """Fold the peak since the last reset into every open section (and the process lifetime peak)."""
        peak = self._peak_since_reset()
        self.process_peak_bytes = max(self.process_peak_bytes, peak)
        for entry in self._open:
            entry.peak = max(entry.peak, peak)

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._can_reset_rss():
            _reset_hwm()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time ``name`` and record its peak memory (and, when tracking, its tensor peak) for ``self.task``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._fold_peak()
        self._reset_peak()
        entry = _Open()
        self._open.append(entry)
        parent = self._names[-1] if self._names else ""
        self._names.append(name)
        start_bytes = self._current_bytes()
        tracker = TensorPeakTracker() if self.track_tensors else None
        start = time.perf_counter()
        try:
            if tracker is None:
                yield
            else:
                with tracker:
                    yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            self._fold_peak()
            self._open.remove(entry)
            self._names.pop()
            self._add(SectionRecord(self.task, name, seconds, int(entry.peak), self.memory_kind,
                                    start_bytes=int(start_bytes),
                                    tensor_peak_bytes=None if tracker is None else int(tracker.peak), parent=parent))

    def _add(self, rec: SectionRecord) -> None:
        for old in self.records:
            if old.task == rec.task and old.section == rec.section:
                old.seconds += rec.seconds
                old.peak_bytes = max(old.peak_bytes, rec.peak_bytes)
                if rec.tensor_peak_bytes is not None:
                    old.tensor_peak_bytes = max(old.tensor_peak_bytes or 0, rec.tensor_peak_bytes)
                old.calls += 1
                return
        self.records.append(rec)

    def record_state(self, task: int, name: str, nbytes: int, **extra) -> None:
        """Bytes of state a method holds between tasks (stored bases, heads, reference caches)."""
        self.state_bytes.append({"task": task, "name": name, "bytes": int(nbytes), **extra})

    def frame(self) -> pd.DataFrame:
        """One row per (task, section): the :data:`FRAME_COLUMNS`."""
        return pd.DataFrame([r.__dict__ for r in self.records], columns=FRAME_COLUMNS)

    def state_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.state_bytes)


# ---- summaries ---------------------------------------------------------------------------------------------
def format_bytes(value: float | None) -> str:
    """``12.3 MiB`` or ``456.7 KiB`` below one MiB (``-`` for missing values)."""
    if value is None or pd.isna(value):
        return "-"
    value = float(value)
    return f"{value / MIB:.1f} MiB" if abs(value) >= MIB else f"{value / 1024:.1f} KiB"


def profile_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per section, in first-seen order: tasks, calls, seconds total and per task, peak memory max, the growth
    over the section's start (``peak − start``) max, the tensor peak max, and the memory kind."""
    frame = frame.copy()
    for column, default in (("calls", 1), ("start_bytes", float("nan")), ("tensor_peak_bytes", float("nan")),
                            ("memory_kind", "unknown")):
        if column not in frame:
            frame[column] = default
    frame["growth_bytes"] = frame["peak_bytes"] - frame["start_bytes"]
    out = frame.groupby("section", sort=False).agg(
        tasks=("task", "nunique"), calls=("calls", "sum"), seconds_total=("seconds", "sum"),
        seconds_per_task=("seconds", "mean"), peak_bytes=("peak_bytes", "max"),
        growth_bytes=("growth_bytes", "max"), tensor_peak_bytes=("tensor_peak_bytes", "max"),
        memory_kind=("memory_kind", "first"))
    return out.reset_index()


def summarise_profile(frame: pd.DataFrame, title: str = "Cost per section") -> Table:
    """A rich table of a run's ``profile.csv`` frame: one line per section (see :func:`profile_summary`)."""
    summary = profile_summary(frame)
    kinds = sorted(set(summary["memory_kind"].astype(str)))
    caption = "peak: " + "; ".join(MEMORY_KINDS.get(k, k) for k in kinds) + ". growth: peak − value at entry."
    if summary["tensor_peak_bytes"].notna().any():
        caption += " tensors: peak of tensors created in the section."
    table = Table(title=title, caption=caption)
    for col in ("section", "tasks", "calls", "s total", "s / task", "peak", "growth", "tensors"):
        table.add_column(col, justify="left" if col == "section" else "right")
    for row in summary.itertuples(index=False):
        table.add_row(str(row.section), f"{row.tasks}", f"{int(row.calls)}", f"{row.seconds_total:.2f}",
                      f"{row.seconds_per_task:.3f}", format_bytes(row.peak_bytes), format_bytes(row.growth_bytes),
                      format_bytes(row.tensor_peak_bytes))
    return table

