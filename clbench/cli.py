"""The ``clbench`` command line: thin wrappers that parse, validate and call the library.

Every error a user can cause ends in one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from clbench.cli_options import (
    Backbone,
    BenchmarkName,
    DataRoot,
    Device,
    EvalRule,
    Methods,
    OutFolder,
    Precision,
    PresetName,
    Pretrained,
    Sets,
    Shots,
    SkipBadImages,
)
from clbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual-learning benchmark suite for CLIP (MTIL Transfer / Average / Last).")
console = Console(stderr=True)
out_console = Console()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def run(
    methods: Methods,
    order: Annotated[int, typer.Option(help="task order, 1 or 2")] = 1,
    benchmark: BenchmarkName = "synthetic",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    out: OutFolder = Path("results"),
    preset: PresetName = "default",
    backbone: Backbone = "tiny",
    pretrained: Pretrained = "",
    data_root: DataRoot = "",
    device: Device = "auto",
    precision: Precision = "",
    eval_: EvalRule = "",
    shots: Shots = None,
    skip_bad_images: SkipBadImages = False,
    set_: Sets = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue each run after its last completed task "
                                         "(same options as the interrupted run)")] = False,
    trust_torchscript: Annotated[bool, typer.Option(
        "--trust-torchscript", help="allow --pretrained to be a TorchScript archive (OpenAI .pt); loading one runs "
        "code from the file, so only for files you trust")] = False,
) -> None:
    """Run methods over a task sequence and write one results folder per method."""
    from clbench.config import build_config
    from clbench.progress import RunProgress
    from clbench.runner import run_methods

    names = _split(methods)
    if not names:
        raise UserError("--methods is empty; name at least one method, e.g. --methods lora")
    if benchmark in ("synthetic-mcit", "ucit", "mllm-dcl"):  # LLaVA continual instruction tuning: clbench.mcit
        from clbench.mcit.cli import run_command

        run_command(benchmark, names, out, seed, preset, backbone, data_root, device, set_ or [], quiet,
                    other={"--pretrained": pretrained, "--precision": precision, "--eval": eval_, "--shots": shots,
                           "--resume": resume, "--skip-bad-images": skip_bad_images, "--order": order != 1})
        return
    options = {"order": order, "benchmark": benchmark, "seed": seed, "backbone": backbone,
               "pretrained": pretrained or None, "data_root": data_root or None, "device": device,
               "precision": precision or None, "eval": eval_ or None}
    data_options = {"shots": shots, "skip_bad_images": True if skip_bad_images else None}
    cfg = build_config(preset, options, set_ or [], names, data_options)
    with RunProgress(quiet=quiet, console=console) as progress:
        outcomes = run_methods(cfg, names, out, hooks_for=progress.hooks_for,
                               on_pretrain_step=progress.pretrain_step, resume=resume,
                               allow_torchscript=trust_torchscript,
                               notify=lambda msg: console.print(f"note: {msg}", highlight=False, soft_wrap=True))
    _print_summary(outcomes)
    if not quiet:
        _print_costs(outcomes)
    if any(o.status != "complete" for o in outcomes):
        for o in outcomes:
            if o.error:
                console.print(f"[red]{o.method} failed:[/red] {o.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _print_costs(outcomes) -> None:
    import pandas as pd

    from clbench.profiling import summarise_profile

    for o in outcomes:
        profile = o.path / "profile.csv"
        if profile.is_file():
            out_console.print(summarise_profile(pd.read_csv(profile), title=f"{o.method}: cost per section"))


def _print_summary(outcomes) -> None:
    union = any((o.metrics or {}).get("eval") == "union" for o in outcomes)
    rule = "union label space" if union else "per-task label space"
    table = Table(title=f"Transfer / Average / Last (percent, {rule})")
    columns = ("method", "Transfer", "Average", "Last", "BWT", *(("recall (last)",) if union else ()), "results")
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "results") else "right")
    for o in outcomes:
        m = o.metrics or {}
        cells = [f"{m[k]:.1f}" if k in m else "-" for k in ("transfer", "average", "last", "bwt")]
        if union:
            recall = m.get("selection_recall", {}).get("last")
            cells.append("-" if recall is None else f"{recall:.1f}")
        table.add_row(o.method, *cells, str(o.path))
    out_console.print(table)


@app.command()
def methods() -> None:
    """List the registered methods, one line each."""
    from clbench.methods import get_method, list_methods

    for name in list_methods():
        out_console.print(f"{name:12s} {get_method(name).summary}", highlight=False)


@app.command()
def pretrain(quiet: Annotated[bool, typer.Option("--quiet")] = False) -> None:
    """Pretrain (or find cached) the embedded tiny backbone."""
    from clbench.models.backbones import ensure_tiny_weights, tiny_weights_path
    from clbench.progress import RunProgress

    path = tiny_weights_path()
    if path.exists():
        out_console.print(f"tiny backbone already cached: {path}")
        return
    with RunProgress(quiet=quiet, console=console) as progress:
        path = ensure_tiny_weights(on_step=progress.pretrain_step)
    out_console.print(f"tiny backbone pretrained and cached: {path}")


@app.command()
def metrics(
    file: Annotated[Path, typer.Argument(help="a matrix in the accuracy.csv format")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    setting: Annotated[str, typer.Option(help="mtil (Transfer / Average / Last / BWT) or mcit (MCITlib's "
                                         "MFT / MFN / MAA / BWT and Transfer)")] = "mtil",
) -> None:
    """Transfer / Average / Last / BWT of any accuracy matrix (columns matched to rows by name)."""
    from clbench.metrics import matrix_from_frame, mtil_metrics
    from clbench.results import read_accuracy_csv

    if setting not in ("mtil", "mcit"):
        raise UserError(f"--setting {setting!r} is unknown; use mtil or mcit")
    frame = read_accuracy_csv(file)
    matrix, names = matrix_from_frame(frame, str(file))
    if setting == "mcit":
        from clbench.mcit.metrics import LABELS, ORDER, mcit_metrics

        try:
            result = mcit_metrics(matrix, names)
        except ValueError as exc:
            raise UserError(f"{file}: {exc}") from None
        if as_json:
            out_console.print_json(json.dumps(result))
            return
        for key in ORDER:
            out_console.print(f"{LABELS[key]:9s} {result[key]:6.2f}")
        return
    result = mtil_metrics(matrix, names)
    if as_json:
        out_console.print_json(json.dumps(result))
        return
    for key in ("transfer", "average", "last", "bwt"):
        out_console.print(f"{key:9s} {result[key]:6.2f}")


# Command groups that live beside the code they drive; each module has ``register(app)``.
COMMAND_MODULES = ("clbench.datasets.cli", "clbench.reports.cli", "clbench.sweep_cli", "clbench.costs.cli")
for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors with exit status 2 for anything the user can fix."""
    try:
        code = app(args=argv, standalone_mode=False)  # without standalone mode, click returns typer.Exit's code
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, even when the cause's text had line breaks
        console.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.ClickException, typer.TyperException) as exc:  # typer >= 0.2x raises its own copy of click's
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        console.print(f"error: {' '.join(text.split())} (see clbench --help)", highlight=False, soft_wrap=True,
                      markup=False)
        return 2
    except (click.exceptions.Abort, typer.Abort):
        console.print("aborted")
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
