"""Progress for long work: on a terminal, rich bars (the current phase, plus an overall bar with method i/n, task
t/T and an ETA); in a file or a SLURM log, one plain line per finished task instead. ``quiet`` turns both off."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clbench.engine.loop import Hooks


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Overall:
    """Where a run of several methods stands: method i/n, task t/T, and an ETA from the tasks finished so far
    in this process (resumed tasks count as done but not towards the rate)."""

    def __init__(self, methods: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.methods = methods
        self.clock = clock
        self.started = clock()
        self.method_index = 0  # 1-based once the first method starts
        self.tasks: int | None = None  # T, learned from the first phase or row that names it
        self.done_in_method = 0
        self.finished_here = 0

    def start_method(self, name: str) -> None:
        self.method_index = self.methods.index(name) + 1 if name in self.methods else self.method_index + 1
        self.done_in_method = 0

    def task_done(self, index: int, num_tasks: int) -> None:
        self.tasks = num_tasks
        self.done_in_method = index + 1
        self.finished_here += 1

    @property
    def total(self) -> int | None:
        return None if self.tasks is None else len(self.methods) * self.tasks

    @property
    def completed(self) -> int:
        return (self.method_index - 1) * (self.tasks or 0) + self.done_in_method if self.method_index else 0

    def eta(self) -> float | None:
        """Seconds left at the rate of this process's finished tasks; ``None`` before the first one."""
        if not self.finished_here or self.total is None:
            return None
        rate = (self.clock() - self.started) / self.finished_here
        return rate * (self.total - self.completed)

    def describe(self) -> str:
        name = self.methods[self.method_index - 1] if 0 < self.method_index <= len(self.methods) else "?"
        tasks = "?" if self.tasks is None else str(self.tasks)
        current = min(self.done_in_method + 1, self.tasks) if self.tasks else self.done_in_method + 1
        return f"method {self.method_index}/{len(self.methods)} {name}, task {current}/{tasks}"

    def eta_text(self) -> str:
        eta = self.eta()
        return "ETA ?" if eta is None else f"ETA {format_duration(eta)}"


class RunProgress:
    """One bar for the current phase of the current method, an overall bar across methods and tasks, and one for
    pretraining when it happens. Without a terminal, a line per finished task (never cut to a width)."""

    def __init__(self, quiet: bool, console: Console, methods: list[str] | None = None) -> None:
        self.quiet = quiet
        self.console = console
        self.live = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=console,
                                 disable=not self.live, transient=False)
        self.overall = Overall(list(methods or []))
        self._overall_bar = None
        self._phase = None
        self._pretrain = None

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def pretrain_step(self, step: int, loss: float) -> None:
        from clbench.models.pretrain import PretrainConfig

        total = PretrainConfig().steps
        if self._pretrain is None:
            self._pretrain = self.progress.add_task("pretraining the tiny backbone (once)", total=total, eta="")
        self.progress.update(self._pretrain, completed=step + 1,
                             description=f"pretraining the tiny backbone (once), loss {loss:.3f}")
        if not self.live and not self.quiet and (step + 1) % max(1, total // 10) == 0:
            self._line(f"pretraining the tiny backbone: step {step + 1}/{total}, loss {loss:.3f}")

    def hooks_for(self, method: str) -> Hooks:
        if method not in self.overall.methods:
            self.overall.methods.append(method)
        self.overall.start_method(method)
        self._refresh_overall()

        def on_phase(name: str, total: int) -> None:
            if name == "zero-shot eval" and total:
                self.overall.tasks = total  # T: the zero-shot row covers every task
                self._refresh_overall()
            if self._phase is not None:
                self.progress.remove_task(self._phase)
            self._phase = self.progress.add_task(f"{method}: {name}", total=total or None, eta="")

        def on_advance(n: int) -> None:
            if self._phase is not None:
                self.progress.advance(self._phase, n)

        def on_row(index: int, row: list[float]) -> None:
            self.overall.task_done(index, len(row))
            self._refresh_overall()
            if not self.live and not self.quiet:
                elapsed = format_duration(self.overall.clock() - self.overall.started)
                self._line(f"{method}: task {index + 1}/{len(row)} done; overall {self.overall.completed}/"
                           f"{self.overall.total}, elapsed {elapsed}, {self.overall.eta_text()}")

        return Hooks(on_phase=on_phase, on_advance=on_advance, on_row=on_row)

    def _refresh_overall(self) -> None:
        if not self.live:
            return
        text = f"overall: {self.overall.describe()}"
        if self._overall_bar is None:
            self._overall_bar = self.progress.add_task(text, total=self.overall.total, eta="")
        self.progress.update(self._overall_bar, description=text, total=self.overall.total,
                             completed=self.overall.completed, eta=self.overall.eta_text())

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)
