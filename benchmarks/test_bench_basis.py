"""Principal basis of a weight (KeepLoRA S0) by three routes: ``linalg.svd``, eigh of the Gram matrix,
randomized low-rank SVD. Each must give the svd route's basis at the energy threshold: same number of
columns and principal-angle cosines ≥ 0.999."""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.workloads import basis_route, current_shapes, principal_cosines, spectral_matrix

SHAPES = current_shapes()
THRESHOLDS = (0.85, 0.2)  # ε_w of the vision and text encoders
# Known defect, measured here: clbench.linalg's lowrank route stops doubling its sketch as soon as it captures
# ε of the energy, with no oversampling beyond p; when p is a sizeable share of d (ε_w = 0.85 on a slowly
# decaying spectrum: p ≈ d/3) its trailing directions are inaccurate (measured: min cosine 0.13 at 64², 0.47 at
# 128²; at 512² to 1024² one column too many or cosines down to 0.90). Strict: this turns into a failure once
# the route is fixed, so the mark gets removed.
LOWRANK_AT_HIGH_ENERGY = pytest.mark.xfail(strict=True, reason="lowrank route without oversampling gives a "
                                           "different basis when p is a large share of d")
ROUTES = ("svd", "gram_eigh", "lowrank")


def cases() -> list:
    return [pytest.param(n, route, threshold,
                         marks=LOWRANK_AT_HIGH_ENERGY if route == "lowrank" and threshold > 0.5 else ())
            for n in SHAPES.basis_sizes for route in ROUTES for threshold in THRESHOLDS]


@functools.cache
def weight(n: int) -> torch.Tensor:
    return spectral_matrix(n)


@functools.cache
def reference(n: int, threshold: float) -> torch.Tensor:
    return basis_route(weight(n), threshold, "svd")


@pytest.mark.parametrize(("n", "route", "threshold"), cases())
def test_principal_basis_route(benchmark, n: int, route: str, threshold: float) -> None:
    benchmark.group = f"principal_basis {n}x{n} eps={threshold}"
    W = weight(n)
    basis = benchmark.pedantic(basis_route, args=(W, threshold, route), rounds=SHAPES.rounds, iterations=1)
    ref = reference(n, threshold)
    assert basis.shape == ref.shape and 0 < ref.shape[1] < n
    assert float(principal_cosines(basis, ref).min()) >= 0.999


def test_svd_route_cut_matches_the_known_spectrum() -> None:
    """The test matrices have σ_i = i^(-1/2), so the paper's cut is known in closed form."""
    n, threshold = SHAPES.basis_sizes[0], 0.85
    energy = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    expected = int((torch.cumsum(energy, 0) / energy.sum() < threshold).sum()) + 1
    assert reference(n, threshold).shape[1] == expected
