"""Command-line commands of this package, registered on the main app by clbench.cli.app: ``clbench data check``."""

from __future__ import annotations

from typing import Annotated

import typer

from clbench.cli.consoles import make_console
from clbench.errors import UserError


def _check(
    data_root: Annotated[str, typer.Option(help="folder holding the datasets (default: $CLBENCH_DATA_ROOT)")] = "",
    benchmark: Annotated[str, typer.Option(help="which benchmark's datasets to check: mtil, xtail, "
                                                    "ucit or mllm-dcl")] = "mtil",
    allow_incomplete: Annotated[bool, typer.Option(
        "--allow-incomplete", help="mtil: accept datasets with fewer (or more) classes than the protocol's, as "
        "'clbench run --allow-incomplete' does")] = False,
) -> None:
    """Table of the benchmark's datasets: found or missing (exact path), train/test images, classes.

    Exits 0 only if every dataset is usable; otherwise exits 2 with one line naming what is missing. An MTIL
    dataset whose class count differs from the protocol's is not usable unless --allow-incomplete.
    Images are checked for existence, not decoded (a run with --skip-bad-images decodes them).
    """
    from rich.table import Table

    from clbench.datasets.mtil import resolve_data_root

    if benchmark in ("ucit", "mllm-dcl"):
        from clbench.mcit.cli import data_check

        data_check(resolve_data_root(data_root, benchmark), benchmark)
        return
    if benchmark == "mtil":
        from clbench.datasets.mtil import inspect_mtil, unusable_line

        def inspect(root):
            return inspect_mtil(root, allow_incomplete=allow_incomplete)
    elif benchmark == "xtail":
        from clbench.datasets.xtail import inspect_xtail as inspect
        from clbench.datasets.xtail import unusable_line
    else:
        raise UserError(f"--benchmark {benchmark!r}: 'clbench data check' knows mtil, xtail, ucit and "
                        "mllm-dcl (synthetic and synthetic-mcit are embedded)")
    root = resolve_data_root(data_root, benchmark)
    statuses = inspect(root)
    table = Table(title=f"{'MTIL' if benchmark == 'mtil' else 'X-TAIL'} datasets under {root}")
    for col in ("dataset", "status", "train", "test", "classes", "folder / missing path"):
        table.add_column(col, justify="right" if col in ("train", "test", "classes") else "left", overflow="fold")
    for s in statuses:
        if s.usable:
            status, where = "[green]ok[/green]", s.path.name
        else:
            short = s.n_classes is not None and s.n_classes != s.expected_classes
            status = "[red]missing[/red]" if s.missing == s.path else "[red]incomplete[/red]" \
                if s.missing or short else "[red]unreadable[/red]"
            where = str(s.missing or s.path)
        classes = "-" if s.n_classes is None else str(s.n_classes)
        if s.n_classes is not None and s.n_classes != s.expected_classes:
            classes += f" (full: {s.expected_classes})"
        counts = ["-" if v is None else f"{v:,}" for v in (s.n_train, s.n_test)]
        table.add_row(s.name, status, *counts, classes, where)
    console = make_console()
    console.print(table)
    bad = [(s.name, s.missing, s.problem) for s in statuses if not s.usable]
    if bad:
        raise UserError(unusable_line(root, bad, len(statuses)))


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to ``app``."""
    data_app = typer.Typer(no_args_is_help=True, help="Check the datasets on disk.")
    data_app.command("check")(_check)
    app.add_typer(data_app, name="data")
