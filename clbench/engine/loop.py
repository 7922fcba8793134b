"""The one task loop of every setting, read top to bottom: set the method up and score the base model (a fresh
run), then for each task: prepare, train, finish, record the method's state sizes, score every task (one row of
the matrix), hand the state to the run engine (checkpoint), report the row.

A setting supplies what each step means as a :class:`TaskSteps` (CLIP on MTIL / X-TAIL:
:class:`clbench.engine.harness.ClipSteps`; LLaVA on UCIT / MLLM-DCL: :class:`clbench.settings.mcit.loop.McitSteps`); the
order of the steps, the profiler's task index and its ``setup`` / ``train`` / ``eval`` sections, the progress
phases and the per-task callbacks are written here once. The checkpoint comes before the row is reported, so a
run stopped while its row is shown keeps that task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clbench.costs.profiler import Profiler


@dataclass
class Hooks:
    """Callbacks for progress display and tracking: a phase starts (its name and step count), steps advance, a
    task's row of scores is done."""

    on_phase: Callable[[str, int], None] = lambda name, total: None
    on_advance: Callable[[int], None] = lambda n: None
    on_row: Callable[[int, list[float]], None] = lambda task, row: None


class TaskSteps(ABC):
    """One setting's meaning of each step of :func:`run_tasks`, for one method over one task sequence."""

    def __init__(self, method: Any, profiler: Profiler, hooks: Hooks | None, names: list[str]) -> None:
        self.method, self.profiler, self.hooks, self.names = method, profiler, hooks or Hooks(), list(names)

    def setup(self) -> None:
        """Before the first task of a fresh run."""
        self.method.setup()

    @abstractmethod
    def evaluate_base(self) -> None:
        """Score the model before any training (the zero-shot / base row) and keep it."""

    @abstractmethod
    def context(self, index: int) -> Any:
        """What the method is told about task ``index`` (seeding what the task draws happens here)."""

    def before_task(self, ctx: Any) -> None:
        self.method.before_task(ctx)

    @abstractmethod
    def train(self, index: int, ctx: Any) -> None:
        """Train on task ``index``."""

    def after_task(self, ctx: Any) -> None:
        self.method.after_task(ctx)

    @abstractmethod
    def evaluate(self, index: int) -> list[float]:
        """Score every task after training on task ``index``; keep and return that row."""


def run_tasks(steps: TaskSteps, start_task: int = 0, fresh: bool = True,
              on_task_end: Callable[[int], None] | None = None) -> None:
    """Run tasks ``start_task`` onward through ``steps``; ``fresh`` (no task done yet) sets up and scores the base
    model first. ``on_task_end(index)`` runs after each task's row is kept (the engine's checkpoint), before the
    row is reported to ``steps.hooks.on_row``."""
    profiler, hooks, names = steps.profiler, steps.hooks, steps.names
    num = len(names)
    if fresh:
        profiler.task = -1
        with profiler.section("setup"):
            steps.setup()
        hooks.on_phase("zero-shot eval", num)
        with profiler.section("eval"):
            steps.evaluate_base()
    for index in range(start_task, num):
        name = names[index]
        profiler.task = index
        ctx = steps.context(index)
        hooks.on_phase(f"prepare {name}", 0)
        steps.before_task(ctx)
        with profiler.section("train"):
            steps.train(index, ctx)
        hooks.on_phase(f"finish {name}", 0)
        steps.after_task(ctx)
        for key, nbytes in steps.method.state_bytes().items():
            profiler.record_state(index, key, nbytes)
        hooks.on_phase(f"eval after {name}", num)
        with profiler.section("eval"):
            row = steps.evaluate(index)
        if on_task_end is not None:
            on_task_end(index)
        hooks.on_row(index, row)
