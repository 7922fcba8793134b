"""``clbench profile``: cost centres of methods on random data shaped like a backbone (no weights, no data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clbench.cli.consoles import make_console
from clbench.errors import UserError

console = make_console(stderr=True)
out_console = make_console()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def profile(
    methods: Annotated[str, typer.Option(help="comma-separated method names, e.g. keeplora,inflora,lora")],
    backbone: Annotated[str, typer.Option(help="'tiny', an open_clip model name, e.g. ViT-B-16, or a "
                                                 "LLaVA shape: llava-1.5-7b, llava-1.5-13b, llava-tiny")] = "tiny",
    tasks: Annotated[int, typer.Option(help="number of random tasks (growth curve length)")] = 3,
    batches: Annotated[int, typer.Option(help="training batches per task")] = 2,
    batch_size: Annotated[int, typer.Option(help="images per batch (MTIL uses 64)")] = 16,
    classes: Annotated[int, typer.Option(help="classes per task")] = 10,
    steps: Annotated[int, typer.Option(help="shared training steps per task (0: none)")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i]")] = "auto",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    out: Annotated[Path | None, typer.Option(help="write every row to this CSV file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method hyperparameter: method.key=value")] = None,
    tensor_memory: Annotated[bool, typer.Option(help="track the peak of tensors created in each section "
                                                     "(exact; a few microseconds per operator)")] = True,
    evaluate: Annotated[bool, typer.Option(help="time one evaluation of all tasks after each task")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress messages")] = False,
    layers: Annotated[int | None, typer.Option(help="LLaVA shapes: decoder (and vision) layers to build and time; "
                                                    "the whole model is extrapolated from them (default 1)")] = None,
    svd_max_dim: Annotated[int | None, typer.Option(help="LLaVA shapes: widest input of a matrix whose SVD sections "
                                                         "are measured; wider ones are extrapolated (default 4096)")]
    = None,
) -> None:
    """Time the cost centres (gradient pass, SVDs, feature statistics, merge, train step, eval) of methods
    on random data shaped like a backbone, and the stored state after each task."""
    from clbench.config import parse_assignments
    from clbench.costs.profile import ProfileSettings, growth_table, method_overrides, profile_methods, section_table
    from clbench.storage.results import atomic_write_csv

    names = _split(methods)
    if not names:
        raise UserError("--methods is empty; name at least one method, e.g. --methods keeplora,inflora")
    from clbench.settings import setting_for_profile

    other = setting_for_profile(backbone)  # e.g. a LLaVA shape: KeepLoRA's LLaVA-form linear algebra
    if other is not None:
        other.profile(backbone, names, set_ or [], seed, device, out, layers, svd_max_dim)
        return
    if layers is not None or svd_max_dim is not None:
        raise UserError("--layers and --svd-max-dim apply to LLaVA shapes (--backbone llava-1.5-7b); drop them")
    if out is not None and (out.is_dir() or out.suffix.lower() != ".csv"):
        raise UserError(f"--out {out}: give a file name ending in .csv")
    settings = ProfileSettings(backbone=backbone, tasks=tasks, batches=batches, batch_size=batch_size,
                               classes=classes, steps=steps, device=device, seed=seed,
                               track_tensors=tensor_memory, evaluate=evaluate,
                               overrides=method_overrides(parse_assignments(set_ or []), names))

    def on_phase(text: str) -> None:
        if not quiet:
            console.print(f"[dim]{text}[/dim]", highlight=False)

    result = profile_methods(names, settings, on_phase)
    out_console.print(section_table(result))
    out_console.print(growth_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(out, result.csv_frame())
        out_console.print(f"wrote {out}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
