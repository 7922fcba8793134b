"""Command-line pieces of the MCIT setting, called from the shared commands (``clbench data check``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from clbench.errors import UserError
from clbench.mcit.data import BENCHMARKS, inspect


def data_check(root: Path, benchmark: str) -> None:
    """Print a table of the benchmark's tasks under ``root``; one-line error (exit 2) if any task is unusable."""
    rows = inspect(root, benchmark)
    table = Table(title=f"{benchmark} tasks under {root}")
    for col in ("task", "status", "train", "test", "files / problem"):
        table.add_column(col, justify="right" if col in ("train", "test") else "left", overflow="fold")
    for task, row in zip(BENCHMARKS[benchmark], rows, strict=True):
        counts = ["-" if v is None else f"{v:,}" for v in (row.n_train, row.n_test)]
        where = ", ".join(str(p.relative_to(root)) for p in task.paths(root).values())
        table.add_row(row.name, "[green]ok[/green]" if row.usable else "[red]unusable[/red]", *counts,
                      where if row.usable else row.problem)
    Console().print(table)
    bad = [r for r in rows if not r.usable]
    if bad:
        raise UserError(f"{len(bad)} of {len(rows)} {benchmark} tasks unusable under {root}; first: {bad[0].problem}")
