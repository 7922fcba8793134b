"""The task loop, read top to bottom: for each task, the method prepares, the shared loop trains, the
method finishes, and every dataset of the sequence is evaluated, giving one row of the accuracy matrix.

Evaluation follows one of two rules, chosen per run (``--eval``), never by the method:

- ``task`` (MTIL): each dataset's test images are classified among that dataset's own classes (the task
  identity is known); text features are encoded once per dataset per evaluation, not per batch.
- ``union`` (X-TAIL): every test image is classified among the classes of *all* datasets of the sequence,
  trained or not, in sequence order (ground truth = the dataset's class offset + its label). The text features
  of all classes are encoded once per evaluation. Accuracy is per dataset, weighted by sample; beside it the
  *task-selection recall* is the share of a dataset's predictions that fall in its own class range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Benchmark, Task, union_spans
from clbench.engine.loop import Hooks, TaskSteps, run_tasks
from clbench.engine.schedules import build_scheduler
from clbench.errors import RecordedFailure
from clbench.methods.base import Method, TaskContext


class DivergenceError(RecordedFailure, RuntimeError):
    """The training loss became non-finite: the run is recorded ``failed`` at that task and step."""

    def __init__(self, task: str, step: int, loss: float) -> None:
        super().__init__(f"training diverged on task {task!r} at step {step}: loss is {loss}; "
                         "lower train.lr or check the data")
        self.task, self.step = task, step

    def record(self) -> dict:
        return {"failed_task": self.task, "failed_step": self.step}


@dataclass
class SequenceResult:
    """Accuracy rows (percent): the zero-shot row and one row per completed task; under the union rule also
    the task-selection recall of each (``None``/empty under the task rule)."""

    datasets: list[str]
    zeroshot: list[float]
    rows: list[list[float]] = field(default_factory=list)
    zeroshot_recall: list[float] | None = None
    recall_rows: list[list[float]] = field(default_factory=list)




def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        from clbench.errors import UserError

        raise UserError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """``--precision amp`` is CUDA autocast with a GradScaler; elsewhere the run would silently be float32
    while its config said amp, so it is refused."""
    if precision == "amp" and device.type != "cuda":
        from clbench.errors import UserError

        raise UserError(f"--precision amp needs a CUDA device, but this run is on {device.type}; drop --precision "
                        "amp (float32) or use --device cuda")


def loader_seed(seed: int, task: int, call: int) -> int:
    """Shuffling seed of the ``call``-th loader (1-based) made during task ``task`` (-1: before the first).

    A function of these three numbers only, never of the run's history, so a resumed run draws the same
    batches as an uninterrupted one.
    """
    return int(np.random.SeedSequence([int(seed), task + 1, call]).generate_state(1, np.uint64)[0])


class LoaderFactory:
    """Loaders with seeded shuffling: the same seed gives the same batches on every run, and on resume."""

    def __init__(self, train: TrainConfig, device: torch.device, seed: int) -> None:
        self.train, self.device, self.seed = train, device, seed
        self.task, self.calls = -1, 0

    def start_task(self, index: int) -> None:
        """Loaders made from now on belong to task ``index``; their seeds restart from that task's first."""
        self.task, self.calls = index, 0

    def __call__(self, dataset: Dataset, batch_size: int | None = None, shuffle: bool = True,
                 drop_last: bool = False) -> DataLoader:
        self.calls += 1
        gen = torch.Generator().manual_seed(loader_seed(self.seed, self.task, self.calls))
        return DataLoader(dataset, batch_size=batch_size or self.train.batch_size, shuffle=shuffle,
                          drop_last=drop_last, generator=gen, num_workers=self.train.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)


def make_loader_factory(train: TrainConfig, device: torch.device, seed: int) -> LoaderFactory:
    """Loaders with seeded shuffling (see :class:`LoaderFactory`)."""
    return LoaderFactory(train, device, seed)


def dataset_prompts(task: Task, policy: str) -> list[list[str]]:
    """Per-class prompt lists: the first template (KeepLoRA) or every template (ZSCL's ensemble)."""
    if policy == "ensemble":
        return [[t.format(c) for t in task.templates] for c in task.classnames]
    return [[task.templates[0].format(c)] for c in task.classnames]


def test_batches(task: Task, train: TrainConfig, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """``task``'s test split in order, in evaluation batches moved to ``device`` (both evaluation rules)."""
    loader = DataLoader(task.test, batch_size=train.eval_batch_size, shuffle=False,
                        num_workers=train.num_workers, pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(method: Method, benchmark: Benchmark, trained: int, train: TrainConfig, prompt_policy: str,
             device: torch.device, hooks: Hooks, autocast=nullcontext) -> list[float]:
    """Accuracy (percent) on every dataset's test split; ``trained`` tasks have been learned so far."""
    model = method.model
    model.eval()
    row = []
    for index, task in enumerate(benchmark.tasks):
        with autocast():
            text = method.eval_text_features(dataset_prompts(task, prompt_policy), task.name)
        correct = total = 0
        for images, labels in test_batches(task, train, device):
            with autocast():
                logits = method.logits(method.eval_image_features(images, task.name), text, task.name,
                                       trained=index < trained)
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        row.append(100.0 * correct / max(total, 1))
        hooks.on_advance(1)
    return row


@torch.no_grad()
def evaluate_union(method: Method, benchmark: Benchmark, trained: int, train: TrainConfig, prompt_policy: str,
                   device: torch.device, hooks: Hooks, autocast=nullcontext) -> tuple[list[float], list[float]]:
    """Accuracy and task-selection recall (percent) on every dataset's test split, each image classified among
    the union of all datasets' classes through ``method.logits_union``; ``trained`` tasks learned so far."""
    model = method.model
    model.eval()
    spans = union_spans(benchmark)
    with autocast():
        # classes along the second-to-last axis: a method may keep several text variants (one per expert)
        text = torch.cat([method.eval_text_features(dataset_prompts(task, prompt_policy), task.name)
                          for task in benchmark.tasks], dim=-2)
    accuracy, recall = [], []
    for task, span in zip(benchmark.tasks, spans, strict=True):
        correct = inside = total = 0
        for images, labels in test_batches(task, train, device):
            with autocast():
                logits = method.logits_union(method.eval_image_features(images, None), text, spans, trained)
            predicted = logits.argmax(-1)
            correct += int((predicted == labels + span.start).sum())
            inside += int(((predicted >= span.start) & (predicted < span.stop)).sum())
            total += len(labels)
        accuracy.append(100.0 * correct / max(total, 1))
        recall.append(100.0 * inside / max(total, 1))
        hooks.on_advance(1)
    return accuracy, recall


def evaluate_row(method: Method, benchmark: Benchmark, trained: int, train: TrainConfig, prompt_policy: str,
                 device: torch.device, hooks: Hooks, autocast, rule: str) -> tuple[list[float], list[float] | None]:
    """One row of the accuracy matrix under ``rule`` (``task`` or ``union``), with the union's recall row."""
    if rule == "union":
        return evaluate_union(method, benchmark, trained, train, prompt_policy, device, hooks, autocast)
    if rule != "task":
        raise ValueError(f"unknown evaluation rule {rule!r}; use task or union")
    return evaluate(method, benchmark, trained, train, prompt_policy, device, hooks, autocast), None


def flat_parameters(params: list) -> list[Tensor]:
    """The tensors of an optimiser's ``params`` argument (plain tensors or param-group dicts)."""
    return [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]


def fused_supported(params: list) -> bool:
    """Whether torch's fused Adam/AdamW kernel takes ``params``: floating point, all on CPU or all on CUDA."""
    flat = flat_parameters(params)
    devices = {p.device.type for p in flat}
    return bool(flat) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in flat)


def build_optimizer(params: list, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer``: AdamW (decoupled decay), Adam (L2 decay, InfLoRA's code) or SGD
    with ``train.momentum`` (LoDA's code), at ``train.lr`` with ``train.weight_decay``.

    Adam and AdamW use torch's fused kernel where it applies (the same update rule, one pass over each tensor
    instead of a dozen): on CPU torch's default is a per-tensor loop, which made the optimiser step 70 % of a
    full fine-tuning step of the tiny backbone, whose 49408-word embedding table is 85 % of its weights. The
    two agree to float rounding."""
    fused = fused_supported(params) or None
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    raise ValueError(f"unknown optimizer {train.optimizer!r}")


def train_task(method: Method, ctx: TaskContext, train: TrainConfig, hooks: Hooks, precision: str) -> int:
    """The shared training loop: ``train.optimizer`` with the configured schedule (``train.schedule``: OneCycle,
    ZSCL's warm-up + cosine, InfLoRA's quarter cosine, or constant) over the method's trainable parameters.

    Each batch takes one optimiser step per objective of ``method.losses`` (one for most methods, two for
    LoDA's GAO); the schedule and ``after_step`` advance once per batch."""
    params = method.trainable_parameters()
    flat = flat_parameters(params)
    model = method.model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in flat:
        p.requires_grad_(True)
    if not flat:
        return 0
    opt = build_optimizer(params, train)
    steps = ctx.train_steps
    # a group's own "lr" (e.g. ZSCL's per-dataset rates) is that group's peak; others peak at train.lr
    sched = build_scheduler(opt, train, steps)
    use_amp = precision == "amp" and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    method.train_modules()
    hooks.on_phase(f"train {ctx.name}", steps)
    step = 0
    while step < steps:
        for images, labels in ctx.loader(shuffle=True):
            if step >= steps:
                break
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            objectives = method.losses(images, labels, ctx)
            try:
                while True:
                    with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=use_amp):
                        loss = next(objectives, None)  # the method's code after a yield runs after that step
                    if loss is None:
                        break
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise DivergenceError(ctx.name, step, value)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
            finally:
                objectives.close()
            if sched is not None:
                sched.step()
            method.after_step(ctx, step)
            step += 1
            hooks.on_advance(1)
    for p in flat:
        p.requires_grad_(False)
    return steps


def steps_for(task: Task, train: TrainConfig, index: int) -> int:
    per_epoch = math.ceil(len(task.train) / train.batch_size)
    steps = per_epoch * train.epochs_for(index)
    return min(steps, train.max_steps) if train.max_steps else steps


class ClipSteps(TaskSteps):
    """The CLIP setting's steps of the task loop (:func:`clbench.engine.loop.run_tasks`): the zero-shot row, the
    per-task seeding and loaders, the shared training loop, and one accuracy row per task under ``eval_rule``;
    ``--precision amp`` on CUDA reaches the methods' own passes in ``before_task`` / ``after_task``."""

    def __init__(self, method: Method, benchmark: Benchmark, train: TrainConfig, profiler: Profiler,
                 device: torch.device, seed: int, prompt_policy: str, precision: str, hooks: Hooks | None,
                 result: SequenceResult | None, eval_rule: str) -> None:
        super().__init__(method, profiler, hooks, benchmark.task_names)
        self.benchmark, self.train_cfg, self.device, self.seed = benchmark, train, device, seed
        self.prompt_policy, self.precision, self.eval_rule = prompt_policy, precision, eval_rule
        self.result = result
        self.make_loader = make_loader_factory(train, device, seed)
        use_amp = precision == "amp" and device.type == "cuda"
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.float16, enabled=use_amp)

    def _row(self, trained: int) -> tuple[list[float], list[float] | None]:
        return evaluate_row(self.method, self.benchmark, trained, self.train_cfg, self.prompt_policy, self.device,
                            self.hooks, self.autocast, self.eval_rule)

    def evaluate_base(self) -> None:
        zeroshot, recall = self._row(0)
        self.result = SequenceResult(self.benchmark.task_names, zeroshot, zeroshot_recall=recall)

    def context(self, index: int) -> TaskContext:
        """Reseeds torch's global generator with ``seed * 1000 + index`` and the loaders with :func:`loader_seed`,
        so what a task draws does not depend on the tasks before it."""
        task = self.benchmark.tasks[index]
        torch.manual_seed(self.seed * 1_000 + index)
        self.make_loader.start_task(index)
        return TaskContext(index, task, len(self.benchmark.tasks), self.device, self.make_loader,
                           steps_for(task, self.train_cfg, index),
                           prompts=[p[0] for p in dataset_prompts(task, "first")])

    def before_task(self, ctx: TaskContext) -> None:
        with self.autocast():
            self.method.before_task(ctx)

    def train(self, index: int, ctx: TaskContext) -> None:
        train_task(self.method, ctx, self.train_cfg, self.hooks, self.precision)

    def after_task(self, ctx: TaskContext) -> None:
        with self.autocast():
            self.method.after_task(ctx)

    def evaluate(self, index: int) -> list[float]:
        row, recall = self._row(index + 1)
        self.result.rows.append(row)
        if recall is not None:
            self.result.recall_rows.append(recall)
        return row


def run_sequence(
    method: Method,
    benchmark: Benchmark,
    train: TrainConfig,
    profiler: Profiler,
    device: torch.device,
    seed: int,
    prompt_policy: str = "first",
    precision: str = "fp32",
    hooks: Hooks | None = None,
    start_task: int = 0,
    result: SequenceResult | None = None,
    on_task_end: Callable[[int, SequenceResult], None] | None = None,
    eval_rule: str = "task",
) -> SequenceResult:
    """Run ``method`` over the task sequence; returns the zero-shot row and one accuracy row per task.

    To resume, pass the ``result`` so far and ``start_task`` = tasks already done (setup and the zero-shot
    evaluation are then skipped: the caller restored the method). ``on_task_end(index, result)`` runs after
    each task's row is added (the runner saves its checkpoint there). ``eval_rule`` is ``task`` or ``union``
    (see the module docstring). The loop itself is :func:`clbench.engine.loop.run_tasks`, the steps
    :class:`ClipSteps`.
    """
    method.benchmark = benchmark.name
    steps = ClipSteps(method, benchmark, train, profiler, device, seed, prompt_policy, precision, hooks, result,
                      eval_rule)
    run_tasks(steps, start_task, fresh=result is None,
              on_task_end=None if on_task_end is None else (lambda index: on_task_end(index, steps.result)))
    return steps.result
