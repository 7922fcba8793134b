"""Command-line options shared by ``clbench run`` and ``clbench sweep``: one definition each, so the two
commands cannot drift apart in names or help texts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Methods = Annotated[str, typer.Option(help="comma-separated method names (see 'clbench methods')")]
BenchmarkName = Annotated[str, typer.Option("--benchmark", help="synthetic (embedded), mtil or xtail; LLaVA: "
                                             "synthetic-mcit (embedded), ucit or mllm-dcl")]
EvalRule = Annotated[str, typer.Option("--eval", help="task (classes of the image's own dataset; default for "
                                       "synthetic and mtil) or union (all datasets' classes; default for xtail)")]
OutFolder = Annotated[Path, typer.Option("--out", help="results folder")]
PresetName = Annotated[str, typer.Option("--preset", help="smoke, default or paper")]
Backbone = Annotated[str, typer.Option("--backbone", help="'tiny' (embedded) or an open_clip model name")]
Pretrained = Annotated[str, typer.Option("--pretrained", help="open_clip tag, weight file, or 'none'")]
DataRoot = Annotated[str, typer.Option("--data-root", help="folder holding the real datasets (default: "
                                       "$CLBENCH_DATA_ROOT, then ~/.config/clbench/config.toml)")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:i]")]
Precision = Annotated[str, typer.Option("--precision", help="fp32 or amp")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="override any config value: key=value")]
Shots = Annotated[int | None, typer.Option(help="few-shot: K training images per class (mtil: 5 in the literature; "
                                           "xtail: 16); default full training sets")]
SkipBadImages = Annotated[bool, typer.Option("--skip-bad-images", help="count and report unreadable images instead "
                                             "of stopping at the first")]


def data_assignments(shots: int | None, skip_bad_images: bool) -> list[str]:
    """``--shots`` and ``--skip-bad-images`` as the ``data.*`` settings they stand for (``--set`` form)."""
    return ([f"data.shots={shots}"] if shots is not None else []) + (
        ["data.skip_bad_images=true"] if skip_bad_images else [])
