"""Random tasks shaped like a backbone's inputs, and task contexts with reproducible batches.

The images are standard-normal tensors of the backbone's input size (already "normalised"), the labels
are balanced over made-up class names ("class 3 of random1"); nothing is read or downloaded. They exist to
measure costs: the methods' own hooks run on them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from clbench.datasets.base import Benchmark, ImageSpec, Task
from clbench.methods.base import TaskContext

TEMPLATE = "a photo of a {}."


def random_task(index: int, spec: ImageSpec, num_classes: int, train_size: int, test_size: int,
                seed: int = 0) -> Task:
    """Task ``random{index}``: ``train_size``/``test_size`` random images, labels ``i mod num_classes``."""
    if num_classes < 1 or train_size < 1 or test_size < 1:
        raise ValueError("a random task needs at least one class, one training and one test image")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def split(n: int) -> TensorDataset:
        images = torch.randn(n, 3, spec.size, spec.size, generator=gen)
        labels = torch.arange(n) % num_classes
        return TensorDataset(images, labels[torch.randperm(n, generator=gen)])

    name = f"random{index}"
    return Task(name, [f"class {c} of {name}" for c in range(num_classes)], [TEMPLATE], split(train_size),
                split(test_size), info={"random": True})


def random_benchmark(spec: ImageSpec, num_tasks: int, num_classes: int, train_batches: int, batch_size: int,
                     test_size: int | None = None, seed: int = 0) -> Benchmark:
    """``num_tasks`` random tasks of ``train_batches`` full batches each (test split: one batch by default)."""
    tasks = [random_task(i, spec, num_classes, train_batches * batch_size, test_size or batch_size, seed)
             for i in range(num_tasks)]
    return Benchmark("random", 1, tasks, info={"random": True})


def fixed_order_loaders(batch_size: int, seed: int = 0) -> Callable[..., DataLoader]:
    """A ``make_loader`` whose shuffled order is the same on every call (so two passes see the same
    batches, and a fraction of the batches is a prefix of the full pass)."""

    def make(dataset: Dataset, batch_size: int | None = None, shuffle: bool = True,
             drop_last: bool = False) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size or default, shuffle=shuffle, drop_last=drop_last,
                          generator=gen, num_workers=0)

    default = batch_size
    return make


def task_context(task: Task, index: int, num_tasks: int, device: torch.device | str, batch_size: int,
                 train_steps: int = 1, seed: int = 0) -> TaskContext:
    """The :class:`TaskContext` the harness would build, with :func:`fixed_order_loaders`."""
    return TaskContext(index, task, num_tasks, torch.device(device), fixed_order_loaders(batch_size, seed),
                       train_steps, prompts=task.prompts(0))
