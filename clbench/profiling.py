"""Named cost sections: wall time (device-synchronised on CUDA) and peak memory, per task.

Shared section names (DESIGN.md): ``pretrained_svd``, ``grad_estimation``, ``grad_svd``, ``feature_stats``,
``feature_svd``, ``merge``, ``train``, ``eval``; methods may add their own (``reference_forward``,
``covariance``, ``memory_update``...).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` reset at the start of the section (bytes of
tensors). On CPU, the process's peak resident set size (``ru_maxrss``) at the end of the section — a
high-water mark of the whole process since it started, so it only grows; the ``memory_kind`` column says
which one a row holds.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch


@dataclass
class SectionRecord:
    task: int
    section: str
    seconds: float
    peak_bytes: int
    memory_kind: str
    calls: int = 1


@dataclass
class Profiler:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: list[SectionRecord] = field(default_factory=list)
    state_bytes: list[dict] = field(default_factory=list)
    task: int = -1

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_peak_allocated"
            else:
                peak, kind = _process_peak_rss(), "cpu_process_peak_rss"
            self._add(SectionRecord(self.task, name, time.perf_counter() - start, int(peak), kind))

    def _add(self, rec: SectionRecord) -> None:
        for old in self.records:
            if old.task == rec.task and old.section == rec.section:
                old.seconds += rec.seconds
                old.peak_bytes = max(old.peak_bytes, rec.peak_bytes)
                old.calls += 1
                return
        self.records.append(rec)

    def record_state(self, task: int, name: str, nbytes: int, **extra) -> None:
        """Bytes of state a method holds between tasks (stored bases, heads, reference caches)."""
        self.state_bytes.append({"task": task, "name": name, "bytes": int(nbytes), **extra})

    def frame(self) -> pd.DataFrame:
        cols = ["task", "section", "seconds", "peak_bytes", "memory_kind", "calls"]
        return pd.DataFrame([r.__dict__ for r in self.records], columns=cols)

    def state_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.state_bytes)


def _process_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
