"""Subspace linear algebra against brute force (float64 NumPy-style loops written from the formulas)."""

from __future__ import annotations

import pytest
import torch

import clbench.linalg as linalg
from clbench.linalg import (
    CovarianceAccumulator,
    SlotSumAccumulator,
    empty_basis,
    energy_rank,
    gpm_extend,
    is_orthonormal,
    principal_basis,
    project_out,
    randomized_svd,
    top_r_factors,
)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=D)).Q


def with_spectrum(d_out: int, d_in: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """A ``d_out × d_in`` matrix with exactly the given singular values."""
    k = len(sigmas)
    U, V = orthonormal(d_out, k, seed), orthonormal(d_in, k, seed + 1)
    return U @ torch.diag(torch.tensor(sigmas, dtype=D)) @ V.T


def proj(U: torch.Tensor) -> torch.Tensor:
    U = U.to(D)
    return U @ U.T


def brute_energy_count(sq: list[float], eps: float, rule: str) -> int:
    """The two rules as plain loops over a Python list."""
    total, acc = sum(sq), 0.0
    if rule == "official":
        count = 0
        for s in sq:
            acc += s
            if acc / total < eps:
                count += 1
        return max(count, 1)
    for p, s in enumerate(sq, start=1):
        acc += s
        if acc / total >= eps:
            return p
    return len(sq)


def brute_gpm(U: torch.Tensor, X: torch.Tensor, eps: float) -> torch.Tensor:
    """The GPM update written out: explicit (I − UUᵀ)X, full SVD, the accumulate-while-below loop."""
    U, X = U.to(D), X.to(D)
    total = float((X**2).sum())
    Xh = X - U @ U.T @ X
    acc = (total - float((Xh**2).sum())) / total if U.shape[1] else 0.0
    Uh, S, _ = torch.linalg.svd(Xh, full_matrices=False)
    m = 0
    for s in S.tolist():
        if acc >= eps:
            break
        acc += s * s / total
        m += 1
    return torch.cat([U, Uh[:, :m]], dim=1)[:, : X.shape[0]]


# ---- energy rules ---------------------------------------------------------------------------------------
def test_energy_rules_give_p_and_p_minus_1():
    sq = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative fractions .4 .7 .9 1.0
    assert energy_rank(sq, 0.8, "paper") == 3
    assert energy_rank(sq, 0.8, "official") == 2
    assert energy_rank(sq, 0.7, "paper") == 2  # >= is inclusive at the exact boundary
    assert energy_rank(sq, 0.7, "official") == 1  # < is strict
    assert energy_rank(sq, 0.1, "official") == 1  # at least one
    assert energy_rank(sq, 1.0, "paper") == 4


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.5, 0.85, 0.95, 0.999])
@pytest.mark.parametrize("rule", ["paper", "official"])
def test_energy_rank_matches_loop_on_random_spectra(eps, rule):
    sq = torch.rand(40, generator=gen(3), dtype=D).pow(3).sort(descending=True).values
    assert energy_rank(sq, eps, rule) == brute_energy_count(sq.tolist(), eps, rule)


def test_energy_rank_with_partial_spectrum_uses_total():
    sq = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=D)
    assert energy_rank(sq[:2], 0.75, "paper", total=10.0) == 2
    assert energy_rank(sq[:2], 0.75, "official", total=10.0) == 1


# ---- principal basis --------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("rule", ["paper", "official"])
def test_every_basis_route_equals_brute_force(side, rule):
    sigmas = [10.0, 7.0, 5.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05]
    W = with_spectrum(12, 10, sigmas, seed=4).float()  # non-square: sides differ in dimension
    eps = 0.9
    p = brute_energy_count([s * s for s in sigmas], eps, rule)
    # brute force: eigenvectors of WᵀW (input side) or WWᵀ (output side), by explicit power-free eigh in float64
    M = W.to(D).T if side == "input" else W.to(D)
    evals, evecs = torch.linalg.eigh(M @ M.T)
    expected = evecs[:, torch.argsort(evals, descending=True)[:p]]
    for method in ("svd", "gram_eigh", "lowrank", "mixed", "auto"):
        basis = principal_basis(W, eps, side=side, rule=rule, method=method, generator=gen(5))
        assert basis.shape == (W.shape[1] if side == "input" else W.shape[0], p), method
        assert basis.dtype == torch.float32
        assert is_orthonormal(basis)
        assert torch.allclose(proj(basis), proj(expected), atol=1e-5), method


def power_spectrum(d_out: int, d_in: int, decay: float, seed: int) -> torch.Tensor:
    """A float32 weight with σ_i = i^(−decay): slowly decaying for decay ≤ 0.5 (ε = 0.85 keeps a large share)."""
    k = min(d_out, d_in)
    return with_spectrum(d_out, d_in, [i ** -decay for i in range(1, k + 1)], seed).float()


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(torch.linalg.qr(A.to(D)).Q.T @ torch.linalg.qr(B.to(D)).Q)


@pytest.mark.parametrize(("decay", "eps"), [(0.5, 0.85), (0.5, 0.2), (0.25, 0.3), (1.0, 0.85)])
@pytest.mark.parametrize("rule", ["paper", "official"])
def test_basis_routes_give_the_svd_basis_where_p_is_a_large_share_or_the_spectrum_is_flat(decay, eps, rule):
    """Above d = 256, where ``auto`` takes the mixed route; including the cases that broke the old lowrank
    route (p ≈ d/3 at ε = 0.85, and flat spectra): same cut, principal-angle cosines ≥ 0.999."""
    W = power_spectrum(300, 280, decay, seed=7)
    for side in ("input", "output"):
        ref = principal_basis(W, eps, side=side, rule=rule, method="svd")
        assert 0 < ref.shape[1] < min(W.shape)
        for method in ("gram_eigh", "lowrank", "mixed", "auto"):
            basis = principal_basis(W, eps, side=side, rule=rule, method=method, generator=gen(3))
            assert basis.shape == ref.shape, (method, side)
            assert float(principal_cosines(basis, ref).min()) >= 0.999, (method, side)


def test_lowrank_sketches_only_where_it_converges_and_falls_back_otherwise():
    fast = power_spectrum(300, 300, 1.5, seed=1).T.to(D)  # energy in a few directions: a 16-column sketch
    flat = power_spectrum(300, 300, 0.5, seed=2).T.to(D)  # p ≈ d/3 at ε = 0.85: no cheaper than eigh
    found = linalg._principal_lowrank(fast, 0.85, "paper", 4, gen(0), 75)
    assert found is not None and found[0].shape[1] <= 32
    assert linalg._principal_lowrank(flat, 0.85, "paper", 4, gen(0), 75) is None
    assert linalg._principal_lowrank(flat, 0.2, "paper", 4, gen(0), 75) is not None  # p = 2: it converges


def test_mixed_route_defers_to_float64_when_the_cut_is_too_close_to_call():
    """Equal energies 1..d: at ε = k/d the cumulative ratio hits the threshold exactly at k; the float32
    estimate cannot certify which side of it the cut lies, so the exact route answers."""
    d = 300
    W = with_spectrum(d, d, [1.0] * 150 + [0.5] * 150, seed=3)
    M = W.T.to(D)
    total = 150 * 1.0 + 150 * 0.25
    eps = 100 / total  # exactly the energy of the first 100 directions
    assert linalg._principal_mixed(M, eps, "paper") is None
    mixed = principal_basis(W.float(), eps, method="mixed")
    exact = principal_basis(W.float(), eps, method="gram_eigh")
    assert torch.equal(mixed, exact)
    # away from any boundary the mixed route answers itself: here the cut at the 1 → 0.25 gap (a unique subspace)
    found = linalg._principal_mixed(M, 149.5 / total, "paper")
    assert found is not None and found[1] == 150
    ref = principal_basis(W.float(), 149.5 / total, method="svd")
    assert float(principal_cosines(found[0][:, :150], ref).min()) >= 0.999


def test_auto_route_is_float64_eigh_for_small_matrices():
    W = power_spectrum(200, 200, 0.5, seed=4)
    assert torch.equal(principal_basis(W, 0.85, method="auto"), principal_basis(W, 0.85, method="gram_eigh"))


def test_input_side_is_right_singular_vectors_of_pytorch_weight():
    W = torch.randn(8, 8, generator=gen(6), dtype=D)
    _, _, Vh = torch.linalg.svd(W)
    U, _, _ = torch.linalg.svd(W)
    basis_in = principal_basis(W.float(), 0.5, side="input", rule="paper")
    basis_out = principal_basis(W.float(), 0.5, side="output", rule="paper")
    p = basis_in.shape[1]
    assert torch.allclose(proj(basis_in), proj(Vh[:p].T), atol=1e-5)
    assert torch.allclose(proj(basis_out), proj(U[:, :p]), atol=1e-5)
    assert not torch.allclose(proj(basis_in), proj(basis_out), atol=1e-2)


# ---- statistics ---------------------------------------------------------------------------------------------
def test_covariance_accumulator_equals_stacked_gram():
    batches = [torch.randn(3, 5, 6, generator=gen(i)) for i in range(4)]
    acc = CovarianceAccumulator(6)
    for x in batches:
        acc.update(x)
    X = torch.cat([x.reshape(-1, 6) for x in batches]).to(D)
    assert acc.count == 4 * 15
    assert torch.allclose(acc.covariance(), X.T @ X, atol=1e-10, rtol=1e-12)
    assert torch.allclose(acc.mean(), X.T @ X / 60, atol=1e-10)


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
def test_covariance_accumulator_in_chunks_equals_stacked_gram(monkeypatch, product_dtype):
    """The float64 copy is made a chunk at a time (here 7 rows of 8 values, not a divisor of a batch)."""
    monkeypatch.setattr(linalg, "COVARIANCE_CHUNK_BYTES", 7 * 8 * 8)
    batches = [torch.randn(4, 9, 8, generator=gen(i)) for i in range(3)]
    acc = CovarianceAccumulator(8, product_dtype=product_dtype)
    for x in batches:
        acc.update(x)
    X = torch.cat([x.reshape(-1, 8) for x in batches]).to(D)
    tol = 1e-12 if product_dtype == torch.float64 else 1e-5
    assert acc.count == 3 * 36
    assert torch.allclose(acc.covariance(), X.T @ X, atol=tol, rtol=tol)


def test_slotsum_accumulator_matches_official_running_mean():
    batches = [torch.randn(3, 5, 6, generator=gen(10 + i)) for i in range(4)]  # [B, L, d]
    acc = SlotSumAccumulator(6, dtype=D)
    for x in batches:
        acc.update(x)
    # hand-computed: F <- n/(n+m) F + 1/(n+m) X_b^T with X_b in LND order, n counted in tokens
    F, n = torch.zeros(6, 15, dtype=D), 0
    for x in batches:
        Xb = torch.stack([x[b, l] for l in range(5) for b in range(3)]).to(D)  # row l*B + b
        m = Xb.shape[0]
        F = n / (n + m) * F + Xb.T / (n + m)
        n += m
    assert torch.allclose(acc.features(), F, atol=1e-12)
    # = sum of the slot-aligned batches over the token count, not the stacked matrix
    summed = sum(x.transpose(0, 1).reshape(-1, 6).to(D) for x in batches).T / 60
    assert torch.allclose(acc.features(), summed, atol=1e-12)
    with pytest.raises(ValueError, match="equal batch shapes"):
        acc.update(torch.randn(2, 5, 6))


# ---- projection and GPM extension -------------------------------------------------------------------------
def test_project_out_removes_the_span():
    U = orthonormal(9, 3, 11).float()
    G = torch.randn(9, 4, generator=gen(12))
    Gh = project_out(G, U)
    assert torch.allclose(U.T @ Gh, torch.zeros(3, 4), atol=1e-6)
    assert torch.allclose(Gh.to(D), (torch.eye(9, dtype=D) - proj(U)) @ G.to(D), atol=1e-6)
    assert torch.equal(project_out(G, empty_basis(9)), G)


def decaying_features(d: int, n: int, seed: int) -> torch.Tensor:
    scales = torch.logspace(0, -2, d, dtype=D)
    return (orthonormal(d, d, seed) * scales) @ torch.randn(d, n, generator=gen(seed + 1), dtype=D)


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
def test_gpm_extension_covariance_and_stacked_svd_agree_with_brute_force(k, eps):
    d = 16
    X = decaying_features(d, 200, seed=20)
    U = orthonormal(d, k, 21).float() if k else empty_basis(d)
    expected = brute_gpm(U, X, eps)
    by_cov = gpm_extend(U, eps, covariance=X @ X.T)
    by_svd = gpm_extend(U, eps, features=X.float(), method="svd")
    by_gram = gpm_extend(U, eps, features=X.float(), method="gram_eigh")
    for basis in (by_cov, by_svd, by_gram):
        assert basis.shape == expected.shape
        assert torch.equal(basis[:, :k], U)  # old columns kept as they were
        assert is_orthonormal(basis)
        assert torch.allclose(proj(basis), proj(expected), atol=1e-5)
    assert expected.shape[1] > k  # the test exercises an actual extension


def test_gpm_extension_of_streamed_covariance_equals_stacked_features():
    d = 10
    batches = [torch.randn(4, 7, d, generator=gen(30 + i)) * torch.logspace(0, -1.5, d) for i in range(3)]
    acc = CovarianceAccumulator(d)
    for x in batches:
        acc.update(x)
    X = torch.cat([x.reshape(-1, d) for x in batches]).T
    U = orthonormal(d, 2, 33).float()
    a = gpm_extend(U, 0.95, covariance=acc.covariance())
    b = gpm_extend(U, 0.95, features=X)
    assert a.shape == b.shape and torch.allclose(proj(a), proj(b), atol=1e-5)


def test_gpm_extension_saturates_at_d_columns_and_stays_orthonormal():
    d = 8
    basis = empty_basis(d)
    for t in range(6):
        X = torch.randn(d, 50, generator=gen(40 + t))
        basis = gpm_extend(basis, 1.0, features=X)
        assert basis.shape[1] <= d
        assert is_orthonormal(basis)
    assert basis.shape[1] == d
    assert torch.equal(gpm_extend(basis, 0.99, features=torch.randn(d, 5)), basis)


def test_gpm_extension_adds_nothing_when_the_old_basis_already_captures_enough():
    d = 12
    X = decaying_features(d, 100, seed=50)
    U = gpm_extend(empty_basis(d), 0.9, covariance=X @ X.T)
    assert torch.equal(gpm_extend(U, 0.9, covariance=X @ X.T), U)


def test_gpm_extension_never_adds_directions_outside_the_data_span():
    d = 10
    X = orthonormal(d, 3, 60) @ torch.randn(3, 40, generator=gen(61), dtype=D)  # rank 3
    basis = gpm_extend(empty_basis(d), 1.0, features=X)
    assert basis.shape[1] == 3


# ---- top-r factors --------------------------------------------------------------------------------------------
def test_top_r_factors_exact_and_randomized_match_truncated_svd():
    G = with_spectrum(20, 14, [9.0, 6.0, 4.0, 2.5, 0.05, 0.04, 0.03], seed=70).float()
    U, S, Vh = torch.linalg.svd(G.to(D))
    r = 4
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    for method in ("exact", "randomized"):
        A, s, V = top_r_factors(G, r, method=method, oversample=4 * r, niter=4, generator=gen(71))
        assert A.shape == (20, r) and s.shape == (r,) and V.shape == (14, r)
        assert is_orthonormal(A)
        assert torch.allclose((A @ torch.diag(s) @ V.T).to(D), best, atol=1e-4), method


def test_top_r_factors_stay_orthogonal_to_the_basis_when_the_residual_is_rank_deficient():
    d, r = 12, 5
    U = orthonormal(d, 6, 80).float()
    G = orthonormal(d, 2, 81).float() @ torch.randn(2, 9, generator=gen(82))
    G_hat = project_out(G, U)  # rank 2 < r
    A, S, V = top_r_factors(G_hat, r, basis=U, generator=gen(83))
    assert A.shape == (d, r)
    assert is_orthonormal(torch.cat([U, A], dim=1))
    assert torch.allclose(S[2:], torch.zeros(3)) and torch.allclose(V[:, 2:], torch.zeros(9, 3))
    assert torch.allclose(A @ torch.diag(S) @ V.T, G_hat, atol=1e-5)
    # at most d − k columns exist in the complement
    A2, _, _ = top_r_factors(project_out(G, orthonormal(d, 9, 84).float()), r, basis=orthonormal(d, 9, 84).float())
    assert A2.shape == (d, 3)


def test_top_r_factors_of_zero_gradient_fill_the_complement():
    U = orthonormal(10, 4, 90).float()
    A, S, _ = top_r_factors(torch.zeros(10, 6), 3, basis=U, generator=gen(91))
    assert A.shape == (10, 3) and torch.all(S == 0)
    assert is_orthonormal(torch.cat([U, A], dim=1))


# ---- compat=official: the official formulas on a tiny random problem -------------------------------------------
def test_official_formulas_on_a_tiny_problem():
    """Hand-written official pipeline for one matrix: W_p from the left singular vectors of W_pt with the `<`
    count, the slot-sum features, the GPM loop on them, and svd_lowrank(q=4r, niter=4) of (I − P)Gᵀ."""
    torch.manual_seed(0)
    d, r, eps_w, eps_f = 16, 2, 0.6, 0.9
    W_pt = torch.randn(d, d, dtype=D) @ torch.diag(torch.logspace(0, -1, d, dtype=D))
    # S0 (official): U from svd(W_pt), p = #(cumsum/sum < eps_w), min 1
    U_full, S, _ = torch.linalg.svd(W_pt)
    ratio = torch.cumsum(S**2, 0) / (S**2).sum()
    p = max(int((ratio < eps_w).sum()), 1)
    W_p = U_full[:, :p]
    ours = principal_basis(W_pt.float(), eps_w, side="output", rule="official", method="gram_eigh")
    assert ours.shape[1] == p and torch.allclose(proj(ours), proj(W_p), atol=1e-5)
    # slot-sum features over batches of [B=3, L=4, d] and the GPM update on them
    batches = [torch.randn(3, 4, d, dtype=D) * torch.logspace(0, -1, d, dtype=D) for _ in range(5)]
    acc = SlotSumAccumulator(d)
    for x in batches:
        acc.update(x.float())
    F = sum(x.transpose(0, 1).reshape(-1, d) for x in batches).T / (5 * 12)
    expected = brute_gpm(W_p, F, eps_f)
    ours_ext = gpm_extend(ours, eps_f, features=acc.features(), method="gram_eigh", empty_rule="official")
    assert ours_ext.shape == expected.shape and expected.shape[1] > p
    assert torch.allclose(proj(ours_ext), proj(expected), atol=1e-4)
    # S2/S3 (official): residual of the paper-layout gradient, torch.svd_lowrank(q=4r, niter=4)
    G_pt = torch.randn(d, d, dtype=D)
    G_res = (G_pt.T - proj(ours_ext) @ G_pt.T).float()
    torch.manual_seed(1)
    U_l, S_l, V_l = torch.svd_lowrank(G_res, q=4 * r, niter=4)
    A_off, B_off = U_l[:, :r], V_l.T[:r] * S_l[:r, None]
    A, s, V = top_r_factors(project_out(G_pt.T.float(), ours_ext), r, method="randomized", oversample=4 * r,
                            niter=4, generator=gen(2), basis=ours_ext)
    assert torch.allclose(A @ (s[:, None] * V.T), A_off @ B_off, atol=1e-3)
    assert torch.allclose(proj(A), proj(A_off), atol=1e-3)


def test_randomized_svd_is_reproducible_with_a_generator():
    M = torch.randn(30, 20, generator=gen(100))
    a = randomized_svd(M, 8, 2, gen(7))
    b = randomized_svd(M, 8, 2, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("shape", [(40, 12), (20, 20), (12, 40)])
def test_randomized_svd_is_torch_svd_lowrank_with_the_same_seed(shape: tuple[int, int]) -> None:
    """The official KeepLoRA codes call ``torch.svd_lowrank`` on the global generator; with a CPU generator seeded
    the same, ours returns the same factors (a wide matrix is sketched through its transpose, as torch does)."""
    M = torch.randn(*shape, generator=gen(3)) @ torch.diag(torch.linspace(1.0, 0.5, shape[1]))
    torch.manual_seed(5)
    expected = torch.svd_lowrank(M, q=6, niter=2)
    got = randomized_svd(M, 6, 2, gen(5))
    for x, y in zip(got, expected, strict=True):
        assert torch.allclose(x, y, atol=1e-6)
