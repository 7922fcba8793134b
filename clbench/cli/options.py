"""Command-line options shared by ``clbench run`` and ``clbench sweep``: one definition each, so the two
commands cannot drift apart in names or help texts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from clbench.config import list_presets

Methods = Annotated[str, typer.Option(metavar="<name,...>",
                                      help="comma-separated method names (see 'clbench methods')")]
BenchmarkName = Annotated[Literal["synthetic", "mtil", "xtail"], typer.Option(
    "--benchmark", help="synthetic is the embedded default; mtil and xtail read real data")]
RunBenchmarkName = Annotated[Literal["synthetic", "mtil", "xtail", "synthetic-mcit", "ucit", "mllm-dcl"], typer.Option(
    "--benchmark", help="CLIP: synthetic (embedded default), mtil, xtail; LLaVA: synthetic-mcit (embedded), ucit, "
    "mllm-dcl")]
EvalRule = Annotated[Literal["task", "union"] | None, typer.Option(
    "--eval", help="task: classes of the image's own dataset (default for synthetic and mtil); union: all "
    "datasets' classes (default for xtail)")]
Order = Annotated[int, typer.Option(metavar="<1|2>", help="task order")]
OutFolder = Annotated[Path, typer.Option("--out", help="results folder")]
PresetName = Annotated[Literal[tuple(list_presets())], typer.Option(  # type: ignore[valid-type]
    "--preset", help="settings bundle (clbench/presets/*.json)")]
Backbone = Annotated[str, typer.Option("--backbone", help="'tiny' (embedded) or an open_clip model name")]
Pretrained = Annotated[str, typer.Option("--pretrained", help="open_clip tag, weight file, or 'none'")]
DataRoot = Annotated[str, typer.Option("--data-root", help="folder holding the real datasets (default: "
                                       "$CLBENCH_DATA_ROOT, then ~/.config/clbench/config.toml)")]
Device = Annotated[str, typer.Option("--device", metavar="<auto|cpu|cuda[:i]>", help="where to run")]
Precision = Annotated[Literal["fp32", "amp"] | None, typer.Option("--precision", help="amp needs CUDA")]
Sets = Annotated[list[str] | None, typer.Option("--set", metavar="<key=value>",
                                                help="override any config value (repeatable)")]
Shots = Annotated[int | None, typer.Option(help="few-shot: K training images per class (mtil: 5 in the literature; "
                                           "xtail: 16); default full training sets")]
Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, metavar="<N>",
    help="CPU threads for torch (default: torch's choice); results are bit-identical only for the same thread count")]
SkipBadImages = Annotated[bool, typer.Option("--skip-bad-images", help="count and report unreadable images instead "
                                             "of stopping at the first")]

Datasets = Annotated[str, typer.Option(
    "--datasets", metavar="<name,...>",
    help="mtil/xtail: learn only these datasets, in this order (names as the protocol spells them, any case, e.g. "
    "mnist,eurosat); metrics are those of the chosen sequence")]
AllowIncomplete = Annotated[bool, typer.Option(
    "--allow-incomplete", help="mtil: accept a dataset whose class count differs from the protocol's (both counts "
    "go into the manifest)")]


def data_assignments(shots: int | None, skip_bad_images: bool, datasets: str = "",
                     allow_incomplete: bool = False) -> list[str]:
    """``--shots``, ``--skip-bad-images``, ``--datasets`` and ``--allow-incomplete`` as the ``data.*`` settings
    they stand for (``--set`` form)."""
    return ([f"data.shots={shots}"] if shots is not None else []) + (
        ["data.skip_bad_images=true"] if skip_bad_images else []) + (
        [f"data.datasets={datasets}"] if datasets.strip() else []) + (
        ["data.allow_incomplete=true"] if allow_incomplete else [])
