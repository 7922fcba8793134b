"""Gradient estimation (KeepLoRA S1): clbench's estimate (adapted weights only, on the device, text features
once, micro-batches) vs the official style (all encoder parameters require grad, text re-encoded every batch,
per-batch copy to the host). Same estimate, same initial subspace."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads import (
    GradientWorkload,
    Shapes,
    gradient_workload,
    max_relative_difference,
    measure,
    min_factor_cosine,
)
from clbench.models.clip import ClipModel


@pytest.fixture(scope="module")
def workload(bench_model: ClipModel, shapes: Shapes) -> GradientWorkload:
    return gradient_workload(bench_model, shapes.grad_batch, shapes.grad_batches, shapes.classes,
                             principal=shapes.principal)


@pytest.fixture(scope="module")
def reference(workload: GradientWorkload) -> dict[str, torch.Tensor]:
    return workload.official()


@pytest.mark.parametrize("impl", ["clbench", "official"])
def test_gradient_estimation_time(benchmark, workload: GradientWorkload, reference, shapes: Shapes, impl: str) -> None:
    benchmark.group = f"grad_estimation {shapes.label}"
    grads = benchmark.pedantic(getattr(workload, impl), rounds=shapes.rounds, iterations=1)
    assert set(grads) == set(reference)
    assert max_relative_difference(grads, reference) < 1e-5


def test_identical_estimate_and_initial_subspace(workload: GradientWorkload, reference) -> None:
    ours = workload.clbench()
    assert set(ours) == {m.name for m in workload.method.matrices()}
    for name, G in ours.items():
        assert G.shape == reference[name].shape and torch.isfinite(G).all()
        assert float(reference[name].norm()) > 0, f"{name}: zero reference gradient, the check would be empty"
    assert max_relative_difference(ours, reference) < 1e-5
    assert min_factor_cosine(workload.initial_factors(ours), workload.initial_factors(reference)) >= 0.999


def test_both_estimates_are_the_float64_estimate_up_to_float32_rounding(workload: GradientWorkload,
                                                                         reference) -> None:
    exact = workload.float64()
    assert max_relative_difference(workload.clbench(), exact) < 1e-5
    assert max_relative_difference(reference, exact) < 1e-5


def test_estimation_leaves_the_model_as_it_was(workload: GradientWorkload) -> None:
    model = workload.model
    flags = [p.requires_grad for p in model.parameters()]
    workload.clbench()
    workload.official()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_gradient_memory(workload: GradientWorkload) -> None:
    """The tracked peaks hold at least the gradients each approach must keep: the official style a host
    dictionary of every encoder gradient plus the live gradients (2×), clbench the adapted weights' ones."""
    ours = measure(workload.clbench, repeats=0)
    official = measure(workload.official, repeats=0)
    assert official.peak_bytes >= 2 * workload.gradient_bytes("all")
    assert ours.peak_bytes >= workload.gradient_bytes("restricted")
    assert ours.peak_bytes < official.peak_bytes
