"""Command-line commands of this package, registered on the main app by clbench.cli.app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from clbench.cli.consoles import make_console
from clbench.errors import UserError


def register(app: typer.Typer) -> None:
    """Add ``clbench report`` to ``app``."""
    app.command("report")(report)


def report(
    inputs: Annotated[list[Path] | None, typer.Argument(
        metavar="RESULTS_DIR_OR_CSV",
        help="results folders (searched recursively for runs) and/or accuracy CSVs made elsewhere")] = None,
    format_: Annotated[Literal["latex", "markdown", "csv"], typer.Option("--format", help="table format")] = "latex",
    out: Annotated[Path, typer.Option(help="folder the report is written to; '-' prints the table to stdout")]
    = Path("reports"),
    with_literature: Annotated[bool, typer.Option(
        "--with-literature", help="add published numbers for the same benchmark/order, as 'reported (not re-run)'")]
    = False,
    label: Annotated[list[str] | None, typer.Option(
        "--label", metavar="<name>",
        help="row label of each accuracy CSV, in the order given (default: the file name)")] = None,
    figures: Annotated[bool, typer.Option("--figures", help="also write figures (PNG and PDF) under OUT/figures")]
    = False,
    costs: Annotated[bool, typer.Option("--costs", help="also write the time / memory table per profiled section")]
    = False,
    state_log: Annotated[bool, typer.Option("--state-log", help="figures: stored state on a log axis")] = False,
    layout: Annotated[Literal["compact", "full"], typer.Option(
        help="LaTeX: compact (small type, tight columns; fits one column) or full (normal size)")] = "compact",
    table_star: Annotated[bool, typer.Option("--table-star", help="LaTeX: table* spanning both columns of a "
                                             "two-column paper")] = False,
    width: Annotated[str | None, typer.Option(
        metavar="<length|natural>", help="LaTeX: shrink wider tables to this width (default \\linewidth, "
        "\\textwidth with --table-star); 'natural' never shrinks")] = None,
    sensitivity: Annotated[str, typer.Option(
        "--sensitivity", help="instead: Transfer / Average / Last against one swept setting, e.g. keeplora.eps_f "
        "(clbench sweep --grid)")] = "",
) -> None:
    """MTIL comparison table (Transfer / Average / Last per dataset, best bold) from runs and matrices."""
    import clbench.mcit.report  # noqa: F401  (registers the MCIT (LLaVA) table: the command line knows the settings)
    from clbench.reports.latex import LatexLayout
    from clbench.reports.loading import input_setting
    from clbench.reports.report import build_report, write_report

    if sensitivity:
        from clbench.reports.sensitivity import build_sensitivity_report

        if with_literature or costs or label:
            raise UserError("--sensitivity makes its own table; drop --with-literature, --costs and --label")
        if input_setting(list(inputs or [])) is not None:
            raise UserError("--sensitivity reads CLIP sweeps; MCIT (LLaVA) runs are reported without it")
        result = build_sensitivity_report(list(inputs or []), sensitivity, format_, figures)
    else:
        result = build_report(list(inputs or []), format_, label, with_literature, figures, costs,
                              LatexLayout(layout, table_star, width), state_log)
    err = make_console(stderr=True)
    if str(out) == "-":
        _print_tables(result)
    for line in result.warnings:
        err.print(f"warning: {line}", highlight=False, soft_wrap=True)
    if str(out) == "-":
        return
    for path in write_report(result, out):
        typer.echo(f"wrote {path}")


def _print_tables(result) -> None:
    """``--out -``: the text tables on stdout, in file order; figures need a folder."""
    if any(isinstance(content, bytes) for content in result.files.values()):
        raise UserError("--out - prints tables only; give --out a folder for --figures")
    for i, content in enumerate(result.files.values()):
        typer.echo(("\n" if i else "") + content, nl=False)
