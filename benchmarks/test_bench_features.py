"""Feature statistics (KeepLoRA S7): d × d uncentered covariances (two per block) vs the official running
means of d × (L·B) token matrices (four per block). Each is checked against its definition."""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference_official import RunningMeanFeatures
from benchmarks.workloads import FeatureWorkload, Shapes, measure, principal_cosines, state_bytes
from clbench.linalg import SlotSumAccumulator


@pytest.fixture(scope="module")
def workload(shapes: Shapes) -> FeatureWorkload:
    return FeatureWorkload(shapes.feat_width, shapes.feat_tokens, shapes.feat_batch, shapes.feat_layers,
                           shapes.feat_batches)


@pytest.fixture(scope="module")
def inputs(workload: FeatureWorkload) -> list[torch.Tensor]:
    return workload.inputs()


@pytest.mark.parametrize("impl", ["clbench", "official"])
def test_feature_statistics_time(benchmark, workload: FeatureWorkload, inputs, shapes: Shapes, impl: str) -> None:
    benchmark.group = f"feature_stats {shapes.label}"
    stats = benchmark.pedantic(getattr(workload, impl), args=(inputs,), rounds=shapes.rounds, iterations=1)
    per_block = 2 if impl == "clbench" else 4
    assert len(stats) == per_block * workload.layers


def test_covariance_is_the_gram_matrix_of_all_tokens() -> None:
    small = FeatureWorkload(width=24, tokens=5, batch=8, layers=1, batches=3)
    inputs = small.inputs()
    stacked = torch.cat([x.reshape(-1, 24) for x in inputs]).double()  # every token as a row
    cov = small.clbench(inputs)[(0, "qkv")].covariance()
    torch.testing.assert_close(cov, stacked.T @ stacked, rtol=1e-12, atol=1e-10)
    # its eigenvectors span the stacked matrix's leading left singular subspace (the paper's X_t)
    evecs = torch.linalg.eigh(cov).eigenvectors.flip(1)[:, :6]
    left = torch.linalg.svd(stacked.T, full_matrices=False).U[:, :6]
    assert float(principal_cosines(evecs, left).min()) >= 0.999


def test_running_mean_matches_definition_and_clbench_compat_mode() -> None:
    small = FeatureWorkload(width=12, tokens=3, batch=4, layers=1, batches=3)
    inputs = small.inputs()
    ref = RunningMeanFeatures(12)
    compat = SlotSumAccumulator(12)
    for x in inputs:
        ref.update(x)
        compat.update(x)
    expected = sum(x.transpose(0, 1).reshape(-1, 12).T for x in inputs) / (len(inputs) * 3 * 4)
    torch.testing.assert_close(ref.matrix, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.matrix, compat.features(), rtol=1e-5, atol=1e-6)


def test_feature_memory(workload: FeatureWorkload, inputs) -> None:
    ours = measure(lambda: workload.clbench(inputs), repeats=0)
    official = measure(lambda: workload.official(inputs), repeats=0)
    d, n = workload.width, workload.tokens * workload.batch
    assert state_bytes(ours.value) == 2 * workload.layers * d * d * 8  # float64 d × d, q/k/v share theirs
    assert state_bytes(official.value) == 4 * workload.layers * d * n * 4  # float32 d × L·B per matrix
    assert ours.peak_bytes >= state_bytes(ours.value)
    assert official.peak_bytes >= state_bytes(official.value)
