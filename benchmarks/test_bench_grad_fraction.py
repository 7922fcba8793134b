"""KeepLoRA's gradient on a fraction of the batches: the cost/quality curve (time and agreement of the
initial subspace A with the full pass). Measured, not asserted beyond its definition."""

from __future__ import annotations

from benchmarks.workloads import SMALL, build_model, fraction_curve, gradient_workload


def test_fraction_curve_definition() -> None:
    shapes = SMALL
    workload = gradient_workload(build_model("tiny"), 4, shapes.fraction_batches, shapes.classes)
    points = fraction_curve(workload, (1.0, 0.5, 0.2, 0.1))
    assert [p.fraction for p in points] == [1.0, 0.5, 0.2, 0.1]
    assert [p.batches for p in points] == [10, 5, 2, 1]
    assert points[0].mean_cosine > 0.999999 and points[0].min_cosine > 0.999999  # the full pass against itself
    assert all(0.0 <= p.min_cosine <= p.mean_cosine <= 1.0 + 1e-12 for p in points)
    assert all(p.seconds > 0 for p in points)
    assert workload.method.hparams.grad_fraction == 1.0
