"""One training step of KeepLoRA vs plain LoRA (same rank, scale and placement). Both start from the
pretrained function; KeepLoRA trains B only."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads import Shapes, StepWorkload, step_workload
from clbench.models.clip import ClipModel

METHODS = ("lora", "keeplora")


@pytest.fixture(scope="module")
def workloads(bench_model: ClipModel, shapes: Shapes) -> dict[str, StepWorkload]:
    return {name: step_workload(bench_model, name, shapes.step_batch, shapes.classes, principal=shapes.principal)
            for name in METHODS}


@pytest.mark.parametrize("name", METHODS)
def test_train_step_time(benchmark, workloads: dict[str, StepWorkload], shapes: Shapes, name: str) -> None:
    benchmark.group = f"train_step {shapes.label}"
    loss = benchmark.pedantic(workloads[name].step, rounds=shapes.rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)


def _logits(model: ClipModel, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(images) @ model.encode_text(model.tokenize(prompts)).T


def test_both_start_from_the_pretrained_function(bench_model: ClipModel, shapes: Shapes) -> None:
    for name in METHODS:
        w = step_workload(bench_model, name, shapes.step_batch, shapes.classes, principal=shapes.principal)
        before = _logits(bench_model, w.images, w.ctx.prompts)
        after = _logits(w.method.model, w.images, w.ctx.prompts)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_keeplora_trains_b_only(bench_model: ClipModel, shapes: Shapes) -> None:
    w = step_workload(bench_model, "keeplora", shapes.step_batch, shapes.classes, principal=shapes.principal)
    adapters = [a for site in w.method.sites() for proj in site.module.adapters.values() for a in proj.values()]
    assert adapters
    downs = [a.down.clone() for a in adapters]
    ups = [a.up.detach().clone() for a in adapters]
    w.step()
    assert all(torch.equal(a.down, d) for a, d in zip(adapters, downs, strict=True))
    assert any(not torch.equal(a.up.detach(), u) for a, u in zip(adapters, ups, strict=True))
