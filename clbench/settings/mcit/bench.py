"""Task lists of the MCIT benchmarks: the embedded ``synthetic-mcit`` and the real ``ucit`` / ``mllm-dcl``."""

from __future__ import annotations

from pathlib import Path

from clbench.settings.mcit import BENCHMARKS, data, synthetic
from clbench.settings.mcit.loop import McitTask
from clbench.settings.mcit.synthetic import Split

MCIT_BENCHMARKS = BENCHMARKS


def synthetic_tasks(n_train: int = 256, n_test: int = 64) -> list[McitTask]:
    """The five synthetic tasks in order, ``n_train`` / ``n_test`` items each."""
    tasks = []
    for name in synthetic.TASKS:
        train, test = synthetic.task_splits(name, n_train, n_test)
        tasks.append(McitTask(name, synthetic.SCORERS[name], train, test))
    return tasks


def _split(items: list[data.Item], refs: dict[str, list[str]] | None = None) -> Split:
    return Split([it.question for it in items], [it.answer for it in items],
                 [refs[it.id] if refs is not None else [it.answer] for it in items],
                 [it.image or "" for it in items], ids=[it.id for it in items],
                 image_names=[it.image or "" for it in items])


def real_tasks(root: Path, benchmark: str) -> list[McitTask]:
    """The tasks of ``ucit`` or ``mllm-dcl`` under ``root``; image paths in the JSON are relative to ``root``."""
    tasks = []
    for spec in data.BENCHMARKS[benchmark]:
        paths = spec.paths(root)
        refs = data.read_references(paths["references"]) if "references" in paths else None
        test = data.read_items(paths["test"])
        if refs is not None:
            lacking = [it.id for it in test if it.id not in refs]
            if lacking:
                from clbench.errors import UserError

                raise UserError(f"{paths['references']} has no caption for test id(s) {', '.join(lacking[:3])}; "
                                "use the fixed references file")
        tasks.append(McitTask(spec.name, spec.scorer, _split(data.read_items(paths["train"])), _split(test, refs),
                              image_root=root))
    return tasks
