"""What a complete run folder holds, per setting: its files, where its task list is, a metric it must have.

Kept apart from :mod:`clbench.storage.results` (which imports torch and pandas) so that sweep plans can carry a
layout without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResultLayout:
    """A setting's complete run folder: ``files`` all present, ``config.json``'s ``tasks_key`` naming the task
    list, ``metrics.json`` holding ``metric``. Each setting declares its own (:mod:`clbench.settings`)."""

    files: tuple[str, ...]
    tasks_key: str
    metric: str


COMPLETE_FILES = ("config.json", "accuracy.csv", "zeroshot.csv", "metrics.json", "profile.csv")
CLIP_LAYOUT = ResultLayout(COMPLETE_FILES, "datasets", "last")
