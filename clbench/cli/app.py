"""The ``clbench`` command line: thin wrappers that parse, validate and call the library.

Every error a user can cause ends in one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import click
import typer

from clbench.cli.consoles import make_console
from clbench.cli.options import (
    AllowIncomplete,
    Backbone,
    DataRoot,
    Datasets,
    Device,
    EvalRule,
    Methods,
    Order,
    OutFolder,
    Precision,
    PresetName,
    Pretrained,
    RunBenchmarkName,
    Sets,
    Shots,
    SkipBadImages,
    Threads,
)
from clbench.engine.interrupt import RunInterrupted
from clbench.errors import UserError
from clbench.settings import setting_help, setting_names

# Plain help (no rich boxes): stable across terminals and typer releases, choices listed as <a|b>, flags bare.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Continual-learning benchmark suite: CLIP on MTIL / X-TAIL (Transfer / Average / Last) and "
                       "LLaVA on UCIT / MLLM-DCL (MFT / MFN / MAA).")
console = make_console(stderr=True)
out_console = make_console()


def _version(value: bool) -> None:
    if value:
        from clbench import __version__

        typer.echo(f"clbench {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Continual-learning benchmark suite: CLIP on MTIL / X-TAIL and LLaVA on UCIT / MLLM-DCL."""


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def run(
    methods: Methods,
    order: Order = 1,
    benchmark: RunBenchmarkName = "synthetic",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    out: OutFolder = Path("results"),
    preset: PresetName = "default",
    backbone: Backbone = "tiny",
    pretrained: Pretrained = "",
    data_root: DataRoot = "",
    device: Device = "auto",
    precision: Precision = None,
    eval_: EvalRule = None,
    shots: Shots = None,
    skip_bad_images: SkipBadImages = False,
    datasets: Datasets = "",
    allow_incomplete: AllowIncomplete = False,
    set_: Sets = None,
    threads: Threads = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue each run after its last completed task "
                                         "(same options as the interrupted run)")] = False,
    trust_torchscript: Annotated[bool, typer.Option(
        "--trust-torchscript", help="allow --pretrained to be a TorchScript archive (OpenAI .pt); loading one runs "
        "code from the file, so only for files you trust")] = False,
    track: Annotated[str, typer.Option(
        metavar="<tensorboard,wandb>", help="log per-task accuracy, metrics, matrix and costs to TensorBoard and/or "
        "Weights & Biases (offline) under OUT/tracking; needs the tracking extra")] = "",
    allow_download: Annotated[bool, typer.Option(
        "--allow-download", help="let open_clip download missing --pretrained weights (default: local files only; "
        "or set CLBENCH_ALLOW_DOWNLOAD=1)")] = False,
) -> None:
    """Run methods over a task sequence and write one results folder per method."""
    from clbench.settings import RunOptions, setting_for_benchmark

    names = _split(methods)
    if not names:
        raise UserError("--methods is empty; name at least one method, e.g. --methods lora")
    setting = setting_for_benchmark(benchmark)
    # options a setting does not take are refused in one line there (tests/cli/test_setting_options.py)
    setting.check_options("run", {
        "--pretrained": pretrained, "--precision": precision, "--eval": eval_, "--shots": shots,
        "--skip-bad-images": skip_bad_images, "--order": order != 1, "--track": track.strip(),
        "--allow-download": allow_download, "--trust-torchscript": trust_torchscript, "--datasets": datasets,
        "--allow-incomplete": allow_incomplete, "--data-root": data_root, "--resume": resume,
        "--threads": threads is not None}, benchmark)
    setting.require(benchmark)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # recorded in the manifest's environment
    setting.run(RunOptions(
        methods=names, benchmark=benchmark, out=out, preset=preset, backbone=backbone, pretrained=pretrained,
        data_root=data_root, device=device, precision=precision, eval=eval_, shots=shots,
        skip_bad_images=skip_bad_images, datasets=datasets, allow_incomplete=allow_incomplete,
        sets=list(set_ or []), quiet=quiet, order=order, seed=seed, resume=resume,
        trust_torchscript=trust_torchscript, track=track, allow_download=allow_download), console, out_console)


@app.command()
def methods(
    name: Annotated[str, typer.Argument(help="a method: print its hyperparameters and recipe card")] = "",
    preset: Annotated[str, typer.Option("--preset", help="the preset whose recipe to show (CLIP default: paper; "
                                        "MCIT default: default)")] = "",
    order: Annotated[int, typer.Option(help="task order, 1 or 2 (per-task epochs differ)")] = 1,
    setting: Annotated[Literal[tuple(setting_names())], typer.Option(  # type: ignore[valid-type]
        help=setting_help())] = setting_names()[0],
) -> None:
    """List the registered methods of every setting, or show one method's hyperparameters, defaults and recipe."""
    from clbench.settings import SETTINGS, get_setting

    if not name:
        for each in SETTINGS:
            each.print_methods(out_console)
        out_console.print("details of one method: clbench methods NAME [--preset P] [--order N]; its form in another "
                          f"setting: clbench methods NAME --setting <{'|'.join(setting_names())}>", highlight=False)
        return
    get_setting(setting).print_card(out_console, name, preset, order)


@app.command()
def pretrain(
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="re-run the recipe (into the user cache) and report how far its output is from the "
                         "weights shipped in the package")] = False,
    export: Annotated[bool, typer.Option(
        "--export", help="for maintainers: write the recipe's output as the package's shipped weights "
                         "(float16 + recipe JSON under clbench/models/weights/)")] = False,
) -> None:
    """Pretrain the embedded tiny backbone (its recipe), or say which shipped or cached weights are used."""
    from clbench.engine.progress import RunProgress
    from clbench.models.backbones import ensure_tiny_weights, tiny_key, tiny_recipe, tiny_weights_path
    from clbench.models.pretrain import PretrainConfig
    from clbench.models.shipped import compare_to_shipped, export_shipped, load_shipped, shipped_weights

    shipped = shipped_weights(tiny_key())
    if shipped is not None and not (verify or export):
        out_console.print(f"tiny backbone shipped with the package: {shipped} (made by this recipe; "
                          "`clbench pretrain --verify` re-runs it)")
        return
    if verify and shipped is None:
        raise UserError("--verify: no weights for the current recipe are shipped in this package; run "
                        "`clbench pretrain` to make them in the cache")
    path = tiny_weights_path()
    if not path.exists():
        with RunProgress(quiet=quiet, console=console) as progress:
            path = ensure_tiny_weights(on_step=progress.pretrain_step)
        out_console.print(f"tiny backbone pretrained and cached: {path}")
    elif shipped is None:
        out_console.print(f"tiny backbone already cached: {path}")
    from clbench.models.backbones import load_state_file

    state = load_state_file(path)
    if verify:
        diff = compare_to_shipped(state, load_shipped(shipped))
        same = diff["max_abs_diff_after_rounding"] == 0.0
        out_console.print(f"recipe output {path} vs shipped {shipped}: largest difference "
                          f"{diff['max_abs_diff']:.3g} ({diff['max_abs_diff_after_rounding']:.3g} after rounding to "
                          f"float16): {'the same weights' if same else 'NOT the same weights'}")
        if not same:
            raise typer.Exit(1)
    if export:
        import json

        cached = path.parent / "recipe.json"
        ran = json.loads(cached.read_text()) if cached.is_file() else {}
        written = export_shipped(state, {**ran, **tiny_recipe(PretrainConfig())}, tiny_key())
        out_console.print(f"shipped weights written: {written}")


@app.command()
def metrics(
    file: Annotated[Path, typer.Argument(help="a matrix in the accuracy.csv format")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    setting: Annotated[str, typer.Option(help="mtil (Transfer / Average / Last / BWT) or mcit (MCITlib's "
                                         "MFT / MFN / MAA / BWT and Transfer)")] = "mtil",
) -> None:
    """Transfer / Average / Last / BWT of any accuracy matrix (columns matched to rows by name)."""
    from clbench.engine.metrics import json_safe, matrix_from_frame
    from clbench.settings import get_setting
    from clbench.storage.results import read_accuracy_csv

    chosen = get_setting(setting)
    frame = read_accuracy_csv(file)
    matrix, names = matrix_from_frame(frame, str(file))
    if matrix.size and float(abs(matrix).max()) <= 1.0:
        console.print(f"note: every accuracy in {file} is between 0 and 1; clbench reads percent (0-100), so the "
                      "metrics below are in the file's units; multiply the file by 100 if these are fractions",
                      highlight=False, soft_wrap=True, markup=False)
    try:
        result = chosen.metrics(matrix, names)
    except ValueError as exc:
        raise UserError(f"{file}: {exc}") from None
    if as_json:  # strict JSON: a one-task matrix's undefined Transfer is null, not NaN
        out_console.print_json(json.dumps(json_safe(result), allow_nan=False))
        return
    for line in chosen.metric_lines(result):
        out_console.print(line, highlight=False, soft_wrap=True)


# Command groups that live beside the code they drive; each module has ``register(app)``.
COMMAND_MODULES = ("clbench.datasets.cli", "clbench.reports.cli", "clbench.cli.sweep", "clbench.costs.cli")
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
    except RunInterrupted as exc:  # SIGTERM/SIGINT: the run is marked interrupted and its lock released
        return main_interrupted(exc, argv)
    except (click.exceptions.Abort, typer.Abort) as exc:
        if isinstance(exc.__cause__, RunInterrupted):  # click wraps what it takes for a KeyboardInterrupt
            return main_interrupted(exc.__cause__, argv)
        console.print("aborted")
        return 130
    except ImportError as exc:  # last resort for an optional extra's package that no require() caught
        from clbench.extras import extra_of, install_hint

        if extra_of(exc) is None:
            raise
        module = (exc.name or "").partition(".")[0]
        console.print(f"error: this command needs the optional package {module!r}, which is not installed; install "
                      f"it with {install_hint(module)}", highlight=False, soft_wrap=True, markup=False)
        return 2
    except (OSError, RecursionError, MemoryError) as exc:  # last resort: the causes are checked where they arise
        console.print(f"error: {last_resort_message(exc)}", highlight=False, soft_wrap=True, markup=False)
        return 2
    return code if isinstance(code, int) else 0


def main_interrupted(exc: RunInterrupted, argv: list[str] | None) -> int:
    console.print(f"{exc}: {exc.where or 'the run stopped'}; resume with: {resume_command(argv)}",
                  highlight=False, soft_wrap=True, markup=False)
    return 128 + exc.signum


def resume_command(argv: list[str] | None) -> str:
    """The command line that continues an interrupted run: ``run`` with ``--resume``; ``sweep`` as it was (it
    resumes its unfinished runs by itself)."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    needs_flag = bool(args) and args[0] == "run" and "--resume" not in args
    return "clbench " + shlex.join(args + (["--resume"] if needs_flag else []))


def last_resort_message(exc: BaseException) -> str:
    """One line for an OS-level failure no check caught: what failed, on which file, and what to try."""
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to process (RecursionError); simplify the file or value given"
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError); use smaller inputs or a machine with more memory"
    files = " and ".join(str(f) for f in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if f)
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
    where = f" on {files}" if files else ""
    return f"{reason}{where} ({type(exc).__name__}); check the path, free space and permissions, then rerun"


if __name__ == "__main__":
    sys.exit(main())
