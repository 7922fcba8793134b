"""Subspace linear algebra shared by the gradient/feature-subspace methods (KeepLoRA, InfLoRA, LoDA).

Pure functions on tensors; nothing here knows about models. Conventions:

- A *basis* ``U`` is a ``d × k`` matrix with orthonormal columns (``k`` may be 0), stored in float32.
  ``P = U Uᵀ`` is the projector onto its span.
- Weights are in PyTorch layout, ``W ∈ R^{d_out × d_in}`` (``y = W x``). The *input side* of ``W`` is
  ``R^{d_in}``: its directions are the right singular vectors of ``W`` (the left singular vectors of the
  paper-layout ``Wᵀ``). Subspaces that protect a layer's inputs live on that side.
- Energies are squared singular values (σ²), or equivalently eigenvalues of an uncentered covariance.
- Eigen/SVD work that decides a basis is done in float64 by default and returned in float32: the cut at an
  energy threshold then does not depend on float32 rounding.
- Nothing here follows the caller's autocast: every function that multiplies runs under
  :func:`full_precision` (autocast off), so a projection, a sketch or a merge computed inside
  ``--precision amp``'s fp16 (or a CPU bf16) autocast is the float32/float64 one. Methods wrap their own
  merges, shifts and closed-form updates in the same context.

Energy rules (KeepLoRA, Luo et al. ICLR 2026, and its MTIL code, MaolinLuo/KeepLoRA):

- ``"paper"``: the smallest ``p`` with ``Σ_{i≤p} σ_i² / Σ_i σ_i² ≥ ε``.
- ``"official"``: ``p = #{i : cumsum(σ²)_i / Σσ² < ε}``, at least 1 (the MTIL code; one fewer than the paper).

GPM extension (Saha et al. 2021; spec S7) keeps adding the top residual directions while the captured
energy fraction is below ``ε``: the ``≥`` rule, counted from the energy the old basis already captures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import Tensor

Rule = Literal["paper", "official"]
Side = Literal["input", "output"]
BasisMethod = Literal["svd", "gram_eigh", "lowrank", "mixed", "auto"]
FactorMethod = Literal["exact", "randomized"]

BASIS_DTYPE = torch.float32
COMPUTE_DTYPE = torch.float64
# Residual directions whose energy is below this fraction of the total are numerical noise (or lie in the
# span of the old basis): GPM never adds them, so a basis cannot gain columns outside the data's span.
RELATIVE_ENERGY_FLOOR = 1e-12
# principal_basis: sketch columns beyond the kept dimension p (randomized route: q >= 2p + LOWRANK_EXTRA), the
# share of d above which a sketch is no cheaper than an eigendecomposition, the size up to which "auto" simply
# runs the float64 eigh (milliseconds), and the "mixed" route's refinement window and energy margin.
LOWRANK_EXTRA = 10
LOWRANK_MAX_SHARE = 4  # "lowrank": sketches up to d/4 columns
LOWRANK_TOLERANCE = 1e-4  # accepted power-iteration error factor of the last kept direction
AUTO_EXACT_MAX_DIM = 256
MIXED_WINDOW = 16
MIXED_ENERGY_MARGIN = 1e-6  # relative to the total energy
# CovarianceAccumulator: tokens per float64 chunk (8 MiB at d = 768), so the float64 copy of a batch is never
# made whole.
COVARIANCE_CHUNK_BYTES = 8 * 2**20


# ---- precision ------------------------------------------------------------------------------------------
@contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on the CPU and on CUDA: matrix products run in their operands' dtype (float32 or float64),
    whatever autocast the caller entered (``--precision amp`` wraps the methods' hooks in fp16 autocast).

    Used as a context (``with full_precision():``) or a decorator (``@full_precision()``) for merges, weight
    shifts, projections and closed-form updates, where a half-precision product would put rounding of the
    size of 1e-3 into the weights (and outside the factors' spans)."""
    with ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


# ---- energy rules ---------------------------------------------------------------------------------------
def energy_rank(sq_values: Tensor, threshold: float, rule: Rule = "paper", total: float | None = None) -> int:
    """Number of leading directions kept by an energy threshold.

    ``sq_values`` are energies (σ² or covariance eigenvalues) in descending order; ``total`` is the full
    energy when ``sq_values`` is only a leading part of the spectrum (default: their sum).
    ``"paper"``: smallest ``p`` with ``cumsum_p / total ≥ threshold`` (0 when ``threshold ≤ 0``; all of them if
    the threshold is never reached). ``"official"``: ``#{i : cumsum_i / total < threshold}``, at least 1.
    """
    if rule not in ("paper", "official"):
        raise ValueError(f"unknown energy rule {rule!r}; expected 'paper' or 'official'")
    values = sq_values.detach().to(COMPUTE_DTYPE).flatten()
    n = values.numel()
    if n == 0:
        return 0
    energy = float(values.sum()) if total is None else float(total)
    if energy <= 0:
        return 0 if rule == "paper" else 1
    ratios = torch.cumsum(values, 0) / energy
    below = int((ratios < threshold).sum())
    if rule == "official":
        return max(below, 1)
    if threshold <= 0:
        return 0
    return min(below + 1, n)


# ---- small helpers --------------------------------------------------------------------------------------
def empty_basis(dim: int, device: torch.device | str | None = None) -> Tensor:
    """A ``dim × 0`` basis (nothing protected)."""
    return torch.zeros(dim, 0, dtype=BASIS_DTYPE, device=device)


def projector(basis: Tensor) -> Tensor:
    """``P = U Uᵀ`` (``d × d``)."""
    return basis @ basis.T


@full_precision()
def project_out(G: Tensor, basis: Tensor) -> Tensor:
    """``(I − U Uᵀ) G``: remove the components of ``G``'s columns that lie in ``span(U)``.

    ``G``'s rows index the basis space (``d × n``). For a paper-layout gradient ``G = G_ptᵀ`` (``d_in × d_out``)
    this is KeepLoRA's residual ``Ĝ`` (paper, step 2); for features ``X`` (``d × N``) it is ``X̂``. Computed as
    ``G − U (Uᵀ G)`` without forming the ``d × d`` projector.
    """
    if basis.shape[1] == 0:
        return G.clone()
    U = basis.to(G.dtype)
    return G - U @ (U.T @ G)


def orthonormal_complement(basis: Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> Tensor:
    """An orthonormal basis ``d × (d − k)`` of ``span(U)^⊥``, from a complete QR of ``U`` (in ``dtype``)."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=dtype, device=basis.device)
    Q, _ = torch.linalg.qr(basis.to(dtype), mode="complete")
    return Q[:, k:]


def _sign_fixed_qr(M: Tensor) -> Tensor:
    """Orthonormalise the columns of ``M`` (QR), flipping signs so that ``diag(R) ≥ 0`` (keeps directions)."""
    Q, R = torch.linalg.qr(M)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return Q * signs


def is_orthonormal(basis: Tensor, atol: float = 1e-5) -> bool:
    """Whether ``UᵀU = I`` within ``atol`` (and ``k ≤ d``)."""
    d, k = basis.shape
    if k > d:
        return False
    gram = basis.T.to(COMPUTE_DTYPE) @ basis.to(COMPUTE_DTYPE)
    return bool(torch.allclose(gram, torch.eye(k, dtype=COMPUTE_DTYPE, device=basis.device), atol=atol))


# ---- randomized SVD -------------------------------------------------------------------------------------
@full_precision()
def randomized_svd(
    M: Tensor, q: int, niter: int = 4, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4): ``M ≈ U diag(S) Vᵀ`` with ``q`` columns.

    The algorithm of ``torch.svd_lowrank(M, q, niter)`` step for step (a wide ``M`` is sketched through
    ``Mᵀ``, as torch does; a Gaussian sketch of ``q`` columns, ``niter`` power iterations with
    re-orthonormalisation, then an exact SVD of the small projection), with an explicit ``generator`` (drawn on
    the CPU) so results are reproducible: with a generator seeded ``s`` on the CPU it returns what
    ``torch.manual_seed(s); torch.svd_lowrank(M, q, niter)`` does (the official KeepLoRA codes' call), to
    float rounding. Works in ``M``'s dtype.
    """
    m, n = M.shape
    q = max(1, min(q, m, n))
    if m < n:  # torch.svd_lowrank assumes a tall matrix and transposes a wide one
        V, S, U = randomized_svd(M.T, q, niter, generator)
        return U, S, V
    omega = torch.randn(n, q, generator=generator, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U_small, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U_small, S, Vh.T


# ---- principal basis of a weight (KeepLoRA S0) ----------------------------------------------------------
@full_precision()
def principal_basis(
    W: Tensor,
    threshold: float,
    side: Side = "input",
    rule: Rule = "paper",
    method: BasisMethod = "svd",
    niter: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Orthonormal basis of the principal subspace of a PyTorch-layout weight ``W`` (``d_out × d_in``).

    ``side="input"`` (paper): the top right singular vectors of ``W`` (``d_in × p``), i.e. the top left
    singular vectors of the paper-layout ``Wᵀ``. ``side="output"`` (official MTIL code, spec D1): the top left
    singular vectors of ``W`` (``d_out × p``). ``p`` is set by the energy ``rule`` at ``threshold`` on σ².

    Routes, all giving the same subspace and cut: ``"svd"`` (``torch.linalg.svd``), ``"gram_eigh"`` (``eigh``
    of ``WᵀW`` or ``WWᵀ``: σ² are its eigenvalues; faster), ``"lowrank"`` (randomized SVD, cheap when
    ``p ≪ d`` and the spectrum decays: the sketch grows until it captures ``threshold`` of ``‖W‖_F²`` with at
    least ``2p + 10`` columns and ``niter`` power iterations have converged on its last kept direction
    (:func:`_converged`); where that would take more than ``d/4`` columns it is no cheaper than an
    eigendecomposition and ``"gram_eigh"`` runs instead), ``"mixed"`` (:func:`_principal_mixed`: float32 eigh
    of the Gram matrix, refined and checked in float64 around the cut; the float64 eigh where the check
    fails) and ``"auto"`` (float64 ``"gram_eigh"`` up to ``d = 256``, where it takes milliseconds, else
    ``"mixed"``). SVD/eigh run in float64 unless stated; the basis is returned in float32. ``generator`` draws
    the sketches (default: the global generator).
    """
    if side not in ("input", "output"):
        raise ValueError(f"unknown side {side!r}; expected 'input' or 'output'")
    if method not in ("svd", "gram_eigh", "lowrank", "mixed", "auto"):
        raise ValueError(f"unknown basis method {method!r}; expected 'svd', 'gram_eigh', 'lowrank', 'mixed' or "
                         "'auto'")
    M = (W.T if side == "input" else W).detach().to(COMPUTE_DTYPE)  # basis = top left singular vectors of M
    if method == "auto":
        method = "gram_eigh" if min(M.shape) <= AUTO_EXACT_MAX_DIM else "mixed"
    found = None
    if method == "lowrank":
        found = _principal_lowrank(M, threshold, rule, niter, generator, max(1, min(M.shape) // LOWRANK_MAX_SHARE))
    if method == "mixed":
        found = _principal_mixed(M, threshold, rule)
    if found is None and method == "svd":
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        found = U, energy_rank(S**2, threshold, rule)
    if found is None:  # gram_eigh, and the fallback of the others
        evals, evecs = torch.linalg.eigh(M @ M.T)
        evals, U = evals.flip(0).clamp_min(0), evecs.flip(1)
        found = U, energy_rank(evals, threshold, rule)
    U, p = found
    return U[:, :p].to(BASIS_DTYPE).contiguous()


def _principal_lowrank(
    M: Tensor, threshold: float, rule: Rule, niter: int, generator: torch.Generator | None, max_columns: int
) -> tuple[Tensor, int] | None:
    """Top left singular vectors of ``M`` and the cut ``p`` from a randomized SVD whose sketch has at least
    ``2p + LOWRANK_EXTRA`` columns (oversampling: the trailing kept directions converge too), captures
    ``threshold`` of the energy and has converged on direction ``p`` (:func:`_converged`); None when that needs
    more than ``max_columns`` columns (slowly decaying spectra, or ``p`` a large share of ``d``)."""
    total = float((M**2).sum())
    full = min(M.shape)
    if total <= 0 or threshold <= 0:  # degenerate: the exact route answers it
        return None
    q = min(full, 16, max_columns)
    while True:
        U, S, _ = randomized_svd(M, q, niter, generator)
        energies = S**2
        captured = float(energies.sum()) / total
        if captured >= threshold:
            p = energy_rank(energies, threshold, rule, total=total)
            need = 2 * p + LOWRANK_EXTRA
            if q >= full or (q >= need and _converged(S, p, niter)):
                return U, p
            need = max(need, 2 * q)
        else:  # the rest of the energy lies in directions of energy <= S_q²: at least this many more are needed
            tail = float(energies[-1]) if energies.numel() else 0.0
            more = (threshold - captured) * total / tail if tail > 0 else float(full)
            need = 2 * (q + int(more)) + LOWRANK_EXTRA
        if need > max_columns or q >= full:
            return None
        q = min(full, max(2 * q, need))


def _converged(S: Tensor, p: int, niter: int) -> bool:
    """Whether ``niter`` power iterations on a sketch with singular values ``S`` have resolved its top ``p``
    directions: the error of direction ``p`` shrinks like ``(σ_{q+1}/σ_p)^(2·niter+1)`` (Halko et al. 2011,
    §4.5), estimated with the sketch's last value, to at most ``LOWRANK_TOLERANCE``."""
    if p == 0:
        return True
    if p >= S.numel() or float(S[p - 1]) <= 0:
        return False
    ratio = float(S[-1]) / float(S[p - 1])
    return ratio ** (2 * niter + 1) <= LOWRANK_TOLERANCE


def _principal_mixed(M: Tensor, threshold: float, rule: Rule) -> tuple[Tensor, int] | None:
    """Principal basis from a float32 eigendecomposition of ``MMᵀ`` made exact where it matters, in float64.

    Float32 eigenvectors are accurate except for mixing between directions of nearly equal energy, which
    only changes the kept subspace across the cut. So: the float32 cut ``p₀``; a window of
    ``MIXED_WINDOW`` directions on either side re-solved in float64 (Rayleigh–Ritz with ``M``); the
    energy of the directions above the window measured in float64 (``‖VᵀM‖_F²``), the window's added one by
    one, against the exact total ``‖M‖_F²``. Returns None (the caller runs the float64 eigh) when the cut
    falls on the window's edge or within ``MIXED_ENERGY_MARGIN`` of the threshold.
    """
    d = M.shape[0]
    total = float((M**2).sum())
    if total <= 0 or threshold <= 0:
        return None
    M32 = M.to(torch.float32)
    evals, V = torch.linalg.eigh(M32 @ M32.T)
    evals, V = evals.flip(0).to(COMPUTE_DTYPE).clamp_min(0), V.flip(1)
    p0 = energy_rank(evals, threshold, rule, total=total)
    lo, hi = max(0, p0 - MIXED_WINDOW), min(d, p0 + MIXED_WINDOW)
    head = V[:, :lo].to(COMPUTE_DTYPE)
    head_energy = float(((head.T @ M) ** 2).sum())
    Q = torch.linalg.qr(project_out(V[:, lo:hi].to(COMPUTE_DTYPE), head)).Q
    B = Q.T @ M
    theta, Z = torch.linalg.eigh(B @ B.T)
    theta, Z = theta.flip(0).clamp_min(0), Z.flip(1)
    ratios = (head_energy + torch.cumsum(theta, 0)) / total
    margin = MIXED_ENERGY_MARGIN
    if lo > 0 and head_energy / total >= threshold - margin:  # the cut may lie above the window
        return None
    if bool(((ratios - threshold).abs() < margin).any()):  # too close to call in float64 from here
        return None
    below = int((ratios < threshold).sum())
    if below == ratios.numel() and hi < d:  # the cut lies below the window
        return None
    p = min(lo + (below if rule == "official" else below + 1), d)
    if rule == "official":
        p = max(p, 1)
    return torch.cat([head, Q @ Z], dim=1), p


# ---- streaming statistics of projection inputs ----------------------------------------------------------
class CovarianceAccumulator:
    """Streaming uncentered covariance ``Σ_n x_n x_nᵀ`` of token vectors (paper reading of X_t, spec D2).

    State: the ``d × d`` sum in float64 and the token count. ``update(x)`` takes ``[..., d]`` (all leading
    dimensions are tokens). Each batch's product ``XᵀX`` is formed in float64 (``product_dtype``), so the
    result equals the float64 Gram matrix of the stacked tokens up to float64 rounding. The float64 copy is
    made ``COVARIANCE_CHUNK_BYTES`` at a time, never for the whole batch. With
    ``product_dtype=torch.float32`` (faster on GPUs with weak float64) the per-batch error is bounded by the
    dot-product bound ``|ΔC_ij| ≤ γ_m Σ_n |x_ni||x_nj|``, ``γ_m ≈ m·2⁻²⁴`` for ``m`` tokens per chunk
    (keep TF32 off), before the float64 sum.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None,
                 product_dtype: torch.dtype = COMPUTE_DTYPE) -> None:
        self.dim = dim
        self.product_dtype = product_dtype
        self.sum = torch.zeros(dim, dim, dtype=COMPUTE_DTYPE, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected [..., {self.dim}] inputs, got {tuple(x.shape)}")
        X = x.detach().reshape(-1, self.dim)
        rows = max(1, COVARIANCE_CHUNK_BYTES // (self.dim * torch.finfo(self.product_dtype).bits // 8))
        with torch.autocast(X.device.type, enabled=False):
            for start in range(0, X.shape[0], rows):
                chunk = X[start : start + rows].to(self.product_dtype)
                if self.product_dtype == COMPUTE_DTYPE:
                    self.sum.addmm_(chunk.T, chunk)
                else:
                    self.sum += (chunk.T @ chunk).to(COMPUTE_DTYPE)
        self.count += X.shape[0]

    def covariance(self) -> Tensor:
        """The sum ``Σ x xᵀ`` (float64). Scale does not change bases or energy fractions."""
        return self.sum

    def mean(self) -> Tensor:
        """``Σ x xᵀ / N`` (the running-mean form InfLoRA and LoDA keep)."""
        return self.sum / max(self.count, 1)


class SlotSumAccumulator:
    """The official MTIL code's feature statistic for KeepLoRA (MaolinLuo/KeepLoRA ``MTIL/``).

    Each batch's tokens form ``X_b ∈ R^{(L·B) × d}`` in LND order (row ``l·B + n`` is token ``l`` of sample
    ``n``); the running sample-weighted mean ``F ← n/(n+m)·F + 1/(n+m)·X_bᵀ`` (``n`` tokens so far, ``m`` in
    the batch) ends at ``F = Σ_b X_bᵀ / N_tokens`` (``d × L·B``): a position-and-batch-slot-aligned sum of
    batches, not the stacked matrix. All batches must have the same ``[B, L]`` shape (the official loader
    drops the last batch). ``update(x)`` takes batch-first ``[B, L, d]``; kept in ``dtype`` (float32 like the
    official code).
    """

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.matrix: Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected batch-first [B, L, {self.dim}] inputs, got {tuple(x.shape)}")
        Xt = x.detach().transpose(0, 1).reshape(-1, self.dim).T.to(self.dtype)  # d × (L·B), LND order
        m = Xt.shape[1]
        if self.matrix is None:
            self.matrix = torch.zeros_like(Xt)
        elif self.matrix.shape != Xt.shape:
            raise ValueError(f"slot-aligned features need equal batch shapes: got {tuple(x.shape[:2])} after "
                             f"{self.matrix.shape[1]} tokens per batch (drop the last incomplete batch)")
        n = self.count
        self.matrix.mul_(n / (n + m)).add_(Xt, alpha=1.0 / (n + m))
        self.count = n + m

    def features(self) -> Tensor:
        """``F`` (``d × L·B``); its left singular vectors and σ² drive the GPM extension."""
        if self.matrix is None:
            raise ValueError("no features were accumulated")
        return self.matrix


# ---- GPM basis extension (KeepLoRA S7, InfLoRA/GPM) -------------------------------------------------------
@full_precision()
def gpm_extend(
    basis: Tensor,
    threshold: float,
    covariance: Tensor | None = None,
    features: Tensor | None = None,
    method: Literal["svd", "gram_eigh"] = "svd",
    empty_rule: Rule = "paper",
) -> Tensor:
    """Extend an orthonormal basis with the top residual directions of new data, GPM energy rule.

    Give either ``covariance`` ``C = Σ x xᵀ`` (``d × d``; paper reading) or ``features`` ``X`` (``d × N``, columns
    are vectors; e.g. the official slot-sum matrix). With ``E = tr C = ‖X‖_F²`` and the residual
    ``Ĉ = (I−P) C (I−P)`` (``X̂ = (I−P) X``), the captured fraction starts at ``acc = (E − tr Ĉ)/E``; the top
    eigenvectors of ``Ĉ`` (left singular vectors of ``X̂``) are appended one by one, each adding ``λ̂_i/E``,
    while ``acc < threshold``. Nothing is added when ``acc ≥ threshold`` already.

    ``Ĉ`` is formed in an orthonormal complement ``Q⊥`` of ``span(U)`` (``Q⊥ᵀ C Q⊥``, same nonzero spectrum),
    so new vectors are exactly orthogonal to the old ones; directions with energy below
    ``RELATIVE_ENERGY_FLOOR·E`` are never added, and the basis never exceeds ``d`` columns. For ``features``,
    ``method="svd"`` takes the SVD of ``Q⊥ᵀX``; ``"gram_eigh"`` the eigh of ``(Q⊥ᵀX)(Q⊥ᵀX)ᵀ`` (faster for
    wide ``X``). ``empty_rule`` is the cut used when the basis is still empty: ``"paper"`` (``≥``, the GPM loop
    from acc = 0) or ``"official"`` (``<`` count, at least 1, the first-task branch of the official code).
    Returns the extended basis in float32 (the old columns unchanged, new ones appended).
    """
    if (covariance is None) == (features is None):
        raise ValueError("give exactly one of covariance= or features=")
    d, k = basis.shape
    data = covariance if covariance is not None else features
    if data.shape[0] != d:
        raise ValueError(f"statistics of dimension {data.shape[0]} do not fit a basis in R^{d}")
    if k >= d or threshold <= 0:
        return basis
    complement = orthonormal_complement(basis.to(data.device))
    if covariance is not None:
        C = covariance.to(COMPUTE_DTYPE)
        total = float(torch.trace(C))
        evals, evecs = torch.linalg.eigh(complement.T @ C @ complement)
        energies, directions = evals.flip(0).clamp_min(0), evecs.flip(1)
    else:
        X = features.to(COMPUTE_DTYPE)
        total = float((X**2).sum())
        residual = complement.T @ X
        if method == "svd":
            directions, S, _ = torch.linalg.svd(residual, full_matrices=False)
            energies = S**2
        elif method == "gram_eigh":
            evals, evecs = torch.linalg.eigh(residual @ residual.T)
            energies, directions = evals.flip(0).clamp_min(0), evecs.flip(1)
        else:
            raise ValueError(f"unknown feature method {method!r}; expected 'svd' or 'gram_eigh'")
    if total <= 0:
        return basis
    residual_energy = float(energies.sum())
    usable = int((energies > RELATIVE_ENERGY_FLOOR * total).sum())
    energies, directions = energies[:usable], directions[:, :usable]
    if usable == 0:
        return basis
    if k == 0 and empty_rule == "official":
        m = min(energy_rank(energies, threshold, "official", total=total), usable)
    else:
        captured = (total - residual_energy) / total if k else 0.0
        captured = max(captured, 0.0)
        if captured >= threshold:
            return basis
        m = energy_rank(energies, threshold - captured, "paper", total=total)
    m = min(m, d - k)
    new = (complement @ directions[:, :m]).to(BASIS_DTYPE)
    return torch.cat([basis.to(BASIS_DTYPE), new.to(basis.device)], dim=1)


# ---- top-r factors of a projected gradient (KeepLoRA S3) ------------------------------------------------
@full_precision()
def top_r_factors(
    G_hat: Tensor,
    r: int,
    method: FactorMethod = "exact",
    oversample: int | None = None,
    niter: int = 4,
    generator: torch.Generator | None = None,
    basis: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``r`` SVD factors of a projected gradient ``Ĝ`` (``m × n``): ``Ĝ ≈ U_r diag(S_r) V_rᵀ``.

    KeepLoRA sets ``A = U_r`` (``m × r``, orthonormal) and ``B = diag(S_r) V_rᵀ``. ``method="exact"`` uses
    ``torch.linalg.svd``; ``"randomized"`` the randomized SVD with ``oversample`` sketch columns in total
    (``torch.svd_lowrank``'s ``q``; default ``4r`` as in the official MTIL code, whose LLaVA code uses ``r``)
    and ``niter`` power iterations.

    With ``basis`` (the stored ``U`` that ``Ĝ`` was projected off), ``A`` is kept in ``span(U)^⊥``: its columns
    are projected off ``U`` once more and re-orthonormalised (removing float error), and when
    ``rank(Ĝ) < r`` (an edge case the official code does not guard) the missing columns are drawn at random
    (``generator``) inside the
    complement of ``[U, A]``, with ``S = 0`` and zero ``V`` columns, so ``B``'s rows for them are zero. At most
    ``m − k`` columns exist in that complement, so fewer than ``r`` columns are returned when ``k > m − r``.
    """
    m, n = G_hat.shape
    k = 0 if basis is None else basis.shape[1]
    r_eff = max(0, min(r, m - k))
    G = G_hat.detach().float()
    if r_eff == 0:
        return G.new_zeros(m, 0), G.new_zeros(0), G.new_zeros(n, 0)
    q = min(r_eff, n)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        U, S, V = U[:, :q], S[:q], Vh[:q].T
    elif method == "randomized":
        U, S, V = randomized_svd(G, oversample or 4 * r, niter, generator)
        U, S, V = U[:, :q], S[:q], V[:, :q]
    else:
        raise ValueError(f"unknown factor method {method!r}; expected 'exact' or 'randomized'")
    scale = float(S.max()) if S.numel() else 0.0
    tol = scale * max(m, n) * torch.finfo(G.dtype).eps
    valid = int(S.gt(tol).sum()) if scale > 0 else 0
    U, S, V = U[:, :valid], S[:valid], V[:, :valid]
    if basis is not None and k and valid:
        U = _sign_fixed_qr(project_out(U, basis.to(U.dtype)))
    if valid < r_eff:
        U, S, V = _fill_complement(U, S, V, r_eff - valid, basis, generator)
    return U.contiguous(), S.contiguous(), V.contiguous()


def _fill_complement(
    U: Tensor, S: Tensor, V: Tensor, extra: int, basis: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Append ``extra`` random orthonormal columns to ``U`` inside ``span([basis, U])^⊥`` (zero S, zero V)."""
    m = U.shape[0]
    taken = U if basis is None else torch.cat([basis.to(U.dtype), U], dim=1)
    fill = torch.randn(m, extra, generator=generator, dtype=U.dtype).to(U.device)
    for _ in range(2):  # Gram-Schmidt twice is enough in floating point
        fill = project_out(fill, taken)
        fill = _sign_fixed_qr(fill)
    U = torch.cat([U, fill], dim=1)
    S = torch.cat([S, S.new_zeros(extra)])
    V = torch.cat([V, V.new_zeros(V.shape[0], extra)], dim=1)
    return U, S, V
