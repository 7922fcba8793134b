"""Command-line pieces of the MCIT setting, called from the shared commands (data check, run)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
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


def run_command(benchmark: str, methods: list[str], out: Path, seed: int, preset: str, backbone: str,
                data_root: str, device: str, sets: list[str], quiet: bool, other: dict) -> None:
    """``clbench run`` on an MCIT benchmark: refuse options of the CLIP setting, run, print the metric table."""
    from clbench.mcit.metrics import LABELS, ORDER
    from clbench.mcit.runner import run_mcit
    from clbench.profiling import summarise_profile

    used = [flag for flag, value in other.items() if value]
    if used:
        raise UserError(f"{', '.join(used)} belong to the CLIP setting; the MCIT setting ({benchmark}) does not "
                        "take them")
    console = Console(stderr=True)

    def on_task(method: str, t: int, name: str, row: list[float]) -> None:
        if not quiet:
            cells = " ".join(f"{v:5.1f}" for v in row)
            console.print(f"{method}: after task {t + 1} ({name}): {cells}", highlight=False)

    outcomes = run_mcit(benchmark, methods, out, seed, preset, backbone, data_root, device, sets,
                        notify=lambda msg: console.print(f"note: {msg}", highlight=False), on_task=on_task)
    table = Table(title=f"{benchmark}: MCITlib metrics (percent; caption tasks: caption average)")
    for col in ("method", *(LABELS[k] for k in ORDER), "minutes", "results"):
        table.add_column(col, justify="left" if col in ("method", "results") else "right")
    for o in outcomes:
        table.add_row(o.method, *(f"{o.metrics[k]:.1f}" for k in ORDER), f"{o.seconds / 60:.1f}", str(o.path))
    Console().print(table)
    if not quiet:
        for o in outcomes:
            Console().print(summarise_profile(pd.read_csv(o.path / "profile.csv"), title=f"{o.method}: cost per "
                                              "section"))
