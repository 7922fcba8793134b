"""Principal basis of a weight (KeepLoRA S0) by every route: clbench's ``linalg.svd`` (float64), eigh of the
Gram matrix, randomized low-rank SVD, the mixed float32/float64 eigh, ``auto`` (what KeepLoRA uses), and the
official float32 ``torch.linalg.svd``. Each must give the float64 SVD's basis at the energy threshold: same
number of columns and principal-angle cosines ≥ 0.999."""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.workloads import basis_route, current_shapes, principal_cosines, spectral_matrix

SHAPES = current_shapes()
THRESHOLDS = (0.85, 0.2)  # ε_w of the vision and text encoders
ROUTES = ("svd", "gram_eigh", "lowrank", "mixed", "auto", "official")


@functools.cache
def weight(n: int) -> torch.Tensor:
    return spectral_matrix(n)


@functools.cache
def reference(n: int, threshold: float) -> torch.Tensor:
    return basis_route(weight(n), threshold, "svd")


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n", SHAPES.basis_sizes)
def test_principal_basis_route(benchmark, n: int, route: str, threshold: float) -> None:
    benchmark.group = f"principal_basis {n}x{n} eps={threshold}"
    W = weight(n)
    basis = benchmark.pedantic(basis_route, args=(W, threshold, route), rounds=SHAPES.rounds, iterations=1)
    ref = reference(n, threshold)
    assert basis.shape == ref.shape and 0 < ref.shape[1] < n
    assert float(principal_cosines(basis, ref).min()) >= 0.999


@pytest.mark.parametrize("n", [300, 520])
def test_same_basis_where_the_mixed_route_runs(n: int) -> None:
    """Above d = 256 ``auto`` is the mixed route; ε = 0.85 keeps about a third of the directions (the case the
    old lowrank route got wrong), ε = 0.2 two of them."""
    W = weight(n)
    for threshold in THRESHOLDS:
        ref = basis_route(W, threshold, "svd")
        for route in ("mixed", "auto", "lowrank", "official"):
            basis = basis_route(W, threshold, route)
            assert basis.shape == ref.shape, (route, threshold)
            assert float(principal_cosines(basis, ref).min()) >= 0.999, (route, threshold)


def test_svd_route_cut_matches_the_known_spectrum() -> None:
    """The test matrices have σ_i = i^(-1/2), so the paper's cut is known in closed form."""
    n, threshold = SHAPES.basis_sizes[0], 0.85
    energy = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    expected = int((torch.cumsum(energy, 0) / energy.sum() < threshold).sum()) + 1
    assert reference(n, threshold).shape[1] == expected
