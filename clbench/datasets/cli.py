"""Command-line commands of this package, registered on the main app by clbench.cli.app: ``clbench data check``."""

from __future__ import annotations

from typing import Annotated

import typer

from clbench.cli.consoles import make_console
from clbench.errors import UserError
from clbench.settings import SETTINGS


def real_benchmarks() -> list[str]:
    """The benchmarks read from disk (the embedded ones have nothing to check)."""
    return [b for s in SETTINGS for b in s.benchmarks if b not in s.embedded]


def _check(
    data_root: Annotated[str, typer.Option(help="folder holding the datasets (default: $CLBENCH_DATA_ROOT)")] = "",
    benchmark: Annotated[str, typer.Option(help="which benchmark's datasets to check: "
                                                + ", ".join(real_benchmarks()))] = "mtil",
    allow_incomplete: Annotated[bool, typer.Option(
        "--allow-incomplete", help="mtil: accept datasets with fewer (or more) classes than the protocol's, as "
        "'clbench run --allow-incomplete' does")] = False,
) -> None:
    """Table of the benchmark's datasets: found or missing (exact path), train/test images, classes.

    Exits 0 only if every dataset is usable; otherwise exits 2 with one line naming what is missing. An MTIL
    dataset whose class count differs from the protocol's is not usable unless --allow-incomplete.
    Images are checked for existence, not decoded (a run with --skip-bad-images decodes them).
    """
    from clbench.settings import setting_for_benchmark

    if benchmark not in real_benchmarks():
        real = real_benchmarks()
        embedded = [b for s in SETTINGS for b in s.embedded]
        raise UserError(f"--benchmark {benchmark!r}: 'clbench data check' knows {', '.join(real[:-1])} and "
                        f"{real[-1]} ({' and '.join(embedded)} are embedded)")
    setting_for_benchmark(benchmark).data_check(data_root, benchmark, allow_incomplete, make_console())


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to ``app``."""
    data_app = typer.Typer(no_args_is_help=True, help="Check the datasets on disk.")
    data_app.command("check")(_check)
    app.add_typer(data_app, name="data")
