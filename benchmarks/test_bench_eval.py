"""Evaluation of one dataset: clbench's harness (class text features once, context cut after the last
end-of-text token) vs the prompts re-encoded over the full context every test batch (official). Same accuracy,
same text features."""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference_official import official_encode_text
from benchmarks.workloads import (
    EvalWorkload,
    Shapes,
    eval_unit_costs,
    eval_workload,
    mtil_eval_floor,
    mtil_eval_projection,
)
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
        per_batch = official_encode_text(model, model.tokenize(task.prompts(0)))
    torch.testing.assert_close(once, per_batch, rtol=1e-5, atol=1e-5)


def test_mtil_projection_counts_one_text_head_per_batch_officially(workload: EvalWorkload) -> None:
    costs = eval_unit_costs(workload)
    assert costs.image > 0 and costs.prompt_full > 0 and costs.prompt_clbench > 0
    ours, official = mtil_eval_projection(costs)
    images = 3333 + 1736 + 10000 + 1880 + 5400 + 6149 + 25250 + 10000 + 3669 + 8041 + 21751
    classes = 100 + 101 + 100 + 47 + 10 + 102 + 101 + 10 + 37 + 196 + 397  # 1,201
    assert ours == pytest.approx(images * costs.image + classes * costs.prompt_clbench)
    # ⌈n/64⌉ · C summed by hand: 53·100 + 28·101 + 157·100 + 30·47 + 85·10 + 97·102 + 395·101 + 157·10 + 58·37
    # + 126·196 + 340·397
    assert official == pytest.approx(images * costs.image + 239_269 * costs.prompt_full)


def test_mtil_floor_is_the_image_work_both_sides_share(workload: EvalWorkload) -> None:
    costs = eval_unit_costs(workload)
    ours, official = mtil_eval_projection(costs)
    floor = mtil_eval_floor(costs)
    assert floor == pytest.approx(97_209 * costs.image)
    assert floor < ours < official
    assert ours - floor == pytest.approx(1_201 * costs.prompt_clbench)
