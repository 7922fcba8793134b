"""``clbench profile``: the methods' cost centres on random data shaped like a backbone, nothing else.

For each method: a fresh copy of a random-initialised backbone (``load_backbone(name, "none")``, no
weights), ``setup()``, then for each of T random tasks (:mod:`clbench.costs.fake`) the method's own
``before_task`` → a few shared training steps (``train``) → ``after_task`` → one evaluation of every task's
test batch (``eval``), with the profiler recording every section the method opens. The stored state
(``state_bytes()``) is logged after setup (task −1) and after every task: the growth curve reviewers asked
for. Accuracy on random data means nothing and is not reported.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from rich.table import Table

from clbench.config import TrainConfig, method_hparams
from clbench.costs.fake import random_benchmark, task_context
from clbench.costs.profiler import FRAME_COLUMNS, Profiler, format_bytes
from clbench.engine.harness import evaluate, resolve_device, train_task
from clbench.engine.loop import Hooks
from clbench.errors import UserError
from clbench.methods import get_method
from clbench.methods.base import Method
from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel

SECTION_COLUMNS = ["method", *FRAME_COLUMNS]
STATE_COLUMNS = ["method", "task", "state_bytes", "basis_columns"]
CSV_COLUMNS = ["kind", "method", "task", "section", "seconds", "calls", "peak_bytes", "start_bytes",
               "tensor_peak_bytes", "memory_kind", "state_bytes", "basis_columns"]


@dataclass
class ProfileSettings:
    """What ``clbench profile`` runs: backbone, task count and size, training steps, device."""

    backbone: str = "tiny"
    tasks: int = 3
    batches: int = 2
    batch_size: int = 16
    classes: int = 10
    steps: int = 2
    device: str = "auto"
    seed: int = 0
    track_tensors: bool = True
    evaluate: bool = True
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)

    def check(self) -> None:
        for name in ("tasks", "batches", "batch_size", "classes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.steps < 0:
            raise UserError(f"--steps must be 0 or more (got {self.steps})")


@dataclass
class ProfileResult:
    sections: pd.DataFrame  # SECTION_COLUMNS
    state: pd.DataFrame  # STATE_COLUMNS
    settings: ProfileSettings
    device: str

    def csv_frame(self) -> pd.DataFrame:
        """Both tables in one long frame: ``kind`` is ``section`` or ``state``."""
        sections = self.sections.assign(kind="section")
        state = self.state.assign(kind="state", section="stored_state")
        frame = pd.concat([sections, state], ignore_index=True).reindex(columns=CSV_COLUMNS)
        for column in ("task", "calls", "peak_bytes", "start_bytes", "tensor_peak_bytes", "state_bytes",
                       "basis_columns"):
            frame[column] = frame[column].astype("Int64")
        return frame


def method_overrides(assignments: list[tuple[str, str]], methods: list[str]) -> dict[str, dict[str, str]]:
    """``--set method.key=value`` pairs grouped by method; anything else is a :class:`UserError`."""
    out: dict[str, dict[str, str]] = {m: {} for m in methods}
    for key, raw in assignments:
        head, _, rest = key.partition(".")
        if head not in methods or not rest:
            raise UserError(f"--set {key}: clbench profile takes method hyperparameters only, "
                            f"as <method>.<name>=<value> with a method from --methods ({', '.join(methods)})")
        out[head][rest] = raw
    return out


def stored_columns(method: Method) -> int | None:
    """Total columns of the stored bases, for methods that report them (KeepLoRA family)."""
    columns = getattr(method, "basis_columns", None)
    return int(sum(columns().values())) if callable(columns) else None


def profile_method(name: str, base_model: ClipModel, settings: ProfileSettings, device: torch.device,
                   on_phase: Callable[[str], None] = lambda text: None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run method ``name``'s hooks on random tasks; returns its section rows and its stored-state rows."""
    method_cls = get_method(name)
    hparams = method_hparams(method_cls, settings.overrides.get(name, {}), name)
    torch.manual_seed(settings.seed)
    profiler = Profiler(device=device, track_tensors=settings.track_tensors)
    method = method_cls(copy.deepcopy(base_model), hparams, profiler)
    method.benchmark = "synthetic"  # embedded-benchmark defaults (e.g. ZSCL's embedded reference data)
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    benchmark = random_benchmark(base_model.image_spec, settings.tasks, settings.classes, settings.batches,
                                 settings.batch_size, seed=settings.seed)
    train = TrainConfig(batch_size=settings.batch_size, eval_batch_size=settings.batch_size, schedule="constant")
    state = []

    def log_state(task: int) -> None:
        state.append({"method": name, "task": task, "state_bytes": sum(method.state_bytes().values()),
                      "basis_columns": stored_columns(method)})

    on_phase(f"{name}: setup")
    profiler.task = -1
    method.setup()
    log_state(-1)
    for index, task in enumerate(benchmark.tasks):
        profiler.task = index
        ctx = task_context(task, index, settings.tasks, device, settings.batch_size, settings.steps,
                           settings.seed + index)
        on_phase(f"{name}: task {index + 1}/{settings.tasks}")
        method.before_task(ctx)
        if settings.steps:
            with profiler.section("train"):
                train_task(method, ctx, train, Hooks(), "fp32")
        method.after_task(ctx)
        log_state(index)
        if settings.evaluate:
            with profiler.section("eval"):
                evaluate(method, benchmark, index + 1, train, "first", device, Hooks())
    frame = profiler.frame().assign(method=name).reindex(columns=SECTION_COLUMNS)
    return frame, pd.DataFrame(state, columns=STATE_COLUMNS)


def profile_methods(methods: list[str], settings: ProfileSettings,
                    on_phase: Callable[[str], None] = lambda text: None) -> ProfileResult:
    """:func:`profile_method` for every method, on one random-initialised backbone."""
    settings.check()
    if not methods:
        raise UserError("--methods is empty; name at least one method, e.g. --methods keeplora,inflora")
    for name in methods:
        get_method(name)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    on_phase(f"building {settings.backbone} (random weights)")
    base_model = load_backbone(settings.backbone, "none", device)
    sections, states = [], []
    for name in methods:
        frame, state = profile_method(name, base_model, settings, device, on_phase)
        sections.append(frame)
        states.append(state)
    return ProfileResult(pd.concat(sections, ignore_index=True), pd.concat(states, ignore_index=True),
                         dataclasses.replace(settings), str(device))


# ---- tables ------------------------------------------------------------------------------------------------
def _memory_of(group: pd.DataFrame) -> float | None:
    """The memory figure a table shows: the tensor peak when tracked, else the profiler's peak."""
    tensors = group["tensor_peak_bytes"].dropna()
    if len(tensors):
        return float(tensors.max())
    return float(group["peak_bytes"].max()) if len(group) else None


def section_table(result: ProfileResult) -> Table:
    """Section × method: seconds summed over the tasks (train: also per step) and peak memory."""
    frame = result.sections
    methods = list(dict.fromkeys(frame["method"]))
    tracked = frame["tensor_peak_bytes"].notna().any()
    kind = "tensors created in the section" if tracked else ", ".join(sorted(set(frame["memory_kind"])))
    s = result.settings
    table = Table(title=f"Cost centres on random data, {s.backbone} ({result.device}): seconds over "
                        f"{s.tasks} tasks · peak memory",
                  caption=f"{s.batches} batches of {s.batch_size} per task, {s.classes} classes, {s.steps} "
                          f"training steps; memory = {kind}")
    table.add_column("section", no_wrap=True)
    for m in methods:
        table.add_column(m, justify="right")
    for section in dict.fromkeys(frame["section"]):
        cells = []
        for m in methods:
            group = frame[(frame["method"] == m) & (frame["section"] == section)]
            if not len(group):
                cells.append("-")
                continue
            seconds = float(group["seconds"].sum())
            text = f"{seconds:.3f} s · {format_bytes(_memory_of(group))}"
            if section == "train" and s.steps:
                text += f" ({seconds / (s.steps * group['task'].nunique()):.3f} s/step)"
            cells.append(text)
        table.add_row(section, *cells)
    return table


def growth_table(result: ProfileResult) -> Table:
    """Stored state after setup (task −1) and after each task, per method (the growth curve)."""
    state = result.state
    methods = list(dict.fromkeys(state["method"]))
    table = Table(title="Stored state between tasks (growth curve)",
                  caption="bytes of state_bytes(); in brackets the stored basis columns where a method has them")
    table.add_column("after")
    for m in methods:
        table.add_column(m, justify="right")
    for task in sorted(set(state["task"])):
        cells = []
        for m in methods:
            row = state[(state["method"] == m) & (state["task"] == task)]
            if not len(row):
                cells.append("-")
                continue
            text = format_bytes(row["state_bytes"].iloc[0])
            columns = row["basis_columns"].iloc[0]
            cells.append(text if columns is None or pd.isna(columns) else f"{text} ({int(columns)})")
        table.add_row("setup" if task < 0 else f"task {task + 1}", *cells)
    return table
