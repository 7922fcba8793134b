"""The evaluation feature hooks: both rules score what ``eval_image_features``/``eval_text_features`` return
(methods with input-dependent routing, such as MoE-Adapters and DIKI, override them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Benchmark, Task
from clbench.engine.harness import Hooks, evaluate, evaluate_union
from clbench.methods.base import Method


def coded_task(name: str, classes: int, offset: int) -> Task:
    """Pixel [0, 0, 0] of each test image holds its class in the union space (``offset`` + label)."""
    labels = torch.arange(classes).repeat(2)
    images = torch.zeros(len(labels), 3, 4, 4)
    images[:, 0, 0, 0] = (labels + offset).float()
    data = TensorDataset(images, labels)
    return Task(name, [f"{name}{i}" for i in range(classes)], ["a {}."], data, data)


class Coded(Method):
    """Image features: a one-hot of a union-space class read from the image by ``rule``; text features: the
    union space's identity rows of the dataset's classes."""

    def __init__(self, model, rule, offsets: dict[str, int], classes: int) -> None:
        super().__init__(model, None, Profiler())
        self.rule, self.offsets, self.classes = rule, offsets, classes
        self.seen: list[str | None] = []

    def eval_image_features(self, images, dataset):
        self.seen.append(dataset)
        return F.one_hot(self.rule(images[:, 0, 0, 0].long(), dataset), self.classes).float()

    def eval_text_features(self, prompts, dataset):
        start = self.offsets[dataset]
        return torch.eye(self.classes)[start : start + len(prompts)]

    def logits(self, image_features, text_features, dataset, trained):
        return image_features @ text_features.T

    def logits_union(self, image_features, text_features, spans, trained):
        return image_features @ text_features.T


def test_both_rules_score_the_methods_feature_hooks(tiny_model) -> None:
    tasks = [coded_task("a", 3, 0), coded_task("b", 2, 3)]
    bench = Benchmark("coded", 1, tasks)
    train = TrainConfig(epochs=[1], batch_size=4, eval_batch_size=64)
    offsets = {"a": 0, "b": 3}
    # task rule: the true class -> 100 % on both
    method = Coded(tiny_model, lambda code, dataset: code, offsets, 5)
    assert evaluate(method, bench, 0, train, "first", torch.device("cpu"), Hooks()) == [100.0, 100.0]
    assert set(method.seen) == {"a", "b"}
    # union rule: right on dataset a, one class off (still inside b's span) on dataset b
    method = Coded(tiny_model, lambda code, dataset: torch.where(code >= 3, 3 + (code - 2) % 2, code), offsets, 5)
    accuracy, recall = evaluate_union(method, bench, 0, train, "first", torch.device("cpu"), Hooks())
    assert (accuracy, recall) == ([100.0, 0.0], [100.0, 100.0])
    assert set(method.seen) == {None}


def test_selection_recall_counts_exactly_the_own_datasets_span(tiny_model) -> None:
    """X-TAIL's task-selection recall: a prediction counts when it lands in ``[start, stop)`` of the image's own
    dataset. Predictions on the last class of the own span count; those on the first class of the next dataset
    (``stop``) or on the last class of the previous one (``start − 1``) do not. Union classes: a = 0..2, b = 3..4."""
    tasks = [coded_task("a", 3, 0), coded_task("b", 2, 3)]
    bench = Benchmark("coded", 1, tasks)
    train = TrainConfig(epochs=[1], batch_size=4, eval_batch_size=64)
    # a's images (codes 0, 1, 2, twice): 0 -> 3 (b's first class), 1 -> 1, 2 -> 2 (a's last class): 4 of 6 inside
    # b's images (codes 3, 4, twice): 3 -> 2 (a's last class), 4 -> 3 (b's first class): 2 of 4 inside
    moves = torch.tensor([3, 1, 2, 2, 3])
    method = Coded(tiny_model, lambda code, dataset: moves[code], {"a": 0, "b": 3}, 5)
    accuracy, recall = evaluate_union(method, bench, 0, train, "first", torch.device("cpu"), Hooks())
    assert recall == [pytest.approx(100 * 4 / 6), pytest.approx(50.0)]
    assert accuracy == [pytest.approx(100 * 4 / 6), 0.0]
