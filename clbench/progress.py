"""Rich progress bars for long work; ``quiet`` turns them off."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clbench.harness import Hooks


class RunProgress:
    """One bar for the current phase of the current method, plus one for pretraining when it happens."""

    def __init__(self, quiet: bool, console: Console) -> None:
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=quiet, transient=False)
        self._phase = None
        self._pretrain = None

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def pretrain_step(self, step: int, loss: float) -> None:
        if self._pretrain is None:
            from clbench.models.pretrain import PretrainConfig

            self._pretrain = self.progress.add_task("pretraining the tiny backbone (once)",
                                                    total=PretrainConfig().steps)
        self.progress.update(self._pretrain, completed=step + 1,
                             description=f"pretraining the tiny backbone (once), loss {loss:.3f}")

    def hooks_for(self, method: str) -> Hooks:
        def on_phase(name: str, total: int) -> None:
            if self._phase is not None:
                self.progress.remove_task(self._phase)
            self._phase = self.progress.add_task(f"{method}: {name}", total=total or None)

        def on_advance(n: int) -> None:
            if self._phase is not None:
                self.progress.advance(self._phase, n)

        return Hooks(on_phase=on_phase, on_advance=on_advance)
