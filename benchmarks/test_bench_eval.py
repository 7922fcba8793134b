"""Evaluation of one dataset: clbench's harness (class text features once) vs the prompts re-encoded every
test batch. Same accuracy, same text features."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads import EvalWorkload, Shapes, eval_workload
from clbench.models.clip import ClipModel


@pytest.fixture(scope="module")
def workload(bench_model: ClipModel, shapes: Shapes) -> EvalWorkload:
    return eval_workload(bench_model, shapes.eval_batch, shapes.eval_batches, shapes.eval_classes)


@pytest.mark.parametrize("impl", ["clbench", "official"])
def test_eval_time(benchmark, workload: EvalWorkload, shapes: Shapes, impl: str) -> None:
    benchmark.group = f"eval {shapes.label}"
    accuracy = benchmark.pedantic(getattr(workload, impl), rounds=shapes.rounds, iterations=1)
    assert 0.0 <= accuracy <= 100.0


def test_same_accuracy_and_text_features(workload: EvalWorkload) -> None:
    assert workload.clbench() == workload.official()
    model, task = workload.model, workload.benchmark.tasks[0]
    with torch.no_grad():
        once = model.class_text_features([[p] for p in task.prompts(0)])
        per_batch = model.encode_text(model.tokenize(task.prompts(0)))
    torch.testing.assert_close(once, per_batch, rtol=1e-5, atol=1e-6)
