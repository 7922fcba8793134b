"""LoDA: both down-projections solve their energy objectives (against brute-force scipy eigen-solves), the
recalibrated merge follows the closed form, GAO computes the two-order objective and leaves no trace."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config
from clbench.datasets.base import Task
from clbench.harness import Hooks, make_loader_factory, train_task
from clbench.methods.base import TaskContext
from clbench.methods.inflora import qkv_input_covariances
from clbench.methods.loda import (
    GENERAL,
    ISOLATED,
    LoDA,
    LoDAHparams,
    gao_loss,
    general_down,
    isolated_down,
    jittered_cholesky,
    recalibrated_delta,
    recalibration_factors,
)
from clbench.models.clip import ClipModel
from clbench.profiling import Profiler

D64 = torch.float64


def _cov(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(d, rank or 3 * d, generator=gen, dtype=D64) * torch.linspace(2, 0.2, d, dtype=D64)[:, None]
    return X @ X.T / X.shape[1]


def _span_projector(rows: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(rows.T.to(D64))
    return Q @ Q.T


# ---- the two objectives --------------------------------------------------------------------------------
def test_general_branch_maximises_the_joint_energy() -> None:
    d, r = 20, 5
    S, H = _cov(d, 0), _cov(d, 1)
    D = general_down(S, H, r)
    Q = math.sqrt(3) * D.double()
    assert torch.allclose(Q @ Q.T, torch.eye(r, dtype=D64), atol=1e-6)
    w, V = scipy.linalg.eigh((S + H).numpy())
    top = torch.from_numpy(V[:, -r:])
    assert torch.allclose(_span_projector(Q), top @ top.T, atol=1e-5)
    energy = float(torch.trace(Q @ (S + H) @ Q.T))
    assert energy == pytest.approx(float(np.sort(w)[-r:].sum()), rel=1e-6)
    for seed in range(5):  # any other orthonormal basis captures less
        R = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=D64)).Q
        assert float(torch.trace(R.T @ (S + H) @ R)) < energy


def test_first_task_general_branch_uses_the_current_statistics_only() -> None:
    S = _cov(12, 2)
    top = torch.linalg.eigh(S).eigenvectors.flip(1)[:, :4]
    assert torch.allclose(_span_projector(general_down(S, None, 4)), top @ top.T, atol=1e-5)


def test_isolated_branch_solves_the_generalized_eigenproblem() -> None:
    d, r = 16, 4
    S, H = _cov(d, 3), _cov(d, 4)
    D = isolated_down(S, H, r)
    Q = math.sqrt(3) * D.double()
    assert torch.allclose(Q @ Q.T, torch.eye(r, dtype=D64), atol=1e-6)
    w, V = scipy.linalg.eigh(S.numpy(), H.numpy())  # brute force: S v = λ H v, ascending λ
    top = torch.from_numpy(V[:, -r:])
    assert torch.allclose(_span_projector(Q), _span_projector(top.T), atol=1e-5)
    # the span maximises the trace ratio tr((QᵀHQ)⁻¹ QᵀSQ) = sum of the r largest generalized eigenvalues
    B = Q.T
    ratio = float(torch.trace(torch.linalg.solve(B.T @ H @ B, B.T @ S @ B)))
    assert ratio == pytest.approx(float(np.sort(w)[-r:].sum()), rel=1e-5)
    other = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(9), dtype=D64)).Q
    assert float(torch.trace(torch.linalg.solve(other.T @ H @ other, other.T @ S @ other))) < ratio


def test_isolated_branch_with_a_singular_history_picks_its_null_space() -> None:
    d, nullity = 14, 3
    S, H = _cov(d, 5), _cov(d, 6, rank=d - nullity)  # old tasks never used 3 directions
    D = isolated_down(S, H, nullity)
    _, vecs = torch.linalg.eigh(H)
    null = vecs[:, :nullity]
    assert torch.allclose(_span_projector(D.double()), null @ null.T, atol=1e-4)


def test_jittered_cholesky_adds_just_enough() -> None:
    H = _cov(8, 7, rank=5)
    L = jittered_cholesky(H)
    assert float((L @ L.T - H).abs().max()) < 1e-6
    lam, vecs = torch.linalg.eigh(_cov(8, 8))
    indefinite = (vecs * torch.cat([torch.tensor([-1e-4], dtype=D64), lam[1:]])) @ vecs.T
    L = jittered_cholesky(indefinite)
    jitter = float(torch.diagonal(L @ L.T - indefinite).mean())
    assert 1e-4 < jitter <= 1e-2  # grown by factors of 10 until positive definite, not beyond


# ---- recalibration -------------------------------------------------------------------------------------
def test_recalibration_matches_the_closed_form() -> None:
    d, r, d_out, gamma_m, scale = 10, 4, 6, 3.0, 0.25
    gen = torch.Generator().manual_seed(10)
    S, H = _cov(d, 11), _cov(d, 12)
    down, up = torch.randn(r, d, generator=gen), torch.randn(d_out, r, generator=gen)
    kappa = recalibration_factors(down, H, S, gamma_m)
    expected_delta = torch.zeros(d_out, d, dtype=D64)
    for i in range(r):
        a, b = down[i].double(), scale * up[:, i].double()
        p, c = float(a @ H @ a), float(a @ S @ a)
        eta = p / (p + gamma_m * c + 1e-12)
        assert float(kappa[i]) == pytest.approx(1 - eta, rel=1e-9)
        grid = np.linspace(0, 1, 100_001)  # κ* minimises p κ² + γ_m c (1 − κ)²
        assert float(kappa[i]) == pytest.approx(grid[np.argmin(p * grid**2 + gamma_m * c * (1 - grid) ** 2)], abs=2e-5)
        expected_delta += (1 - eta) * torch.outer(b, a)
    got = recalibrated_delta(up, down, scale, kappa)
    assert torch.allclose(got.double(), expected_delta, atol=1e-5)


# ---- GAO -----------------------------------------------------------------------------------------------
def test_gao_objective_combines_both_orders_and_leaves_the_second_perturbation() -> None:
    gen = torch.Generator().manual_seed(13)
    a = torch.randn(3, generator=gen, dtype=D64).requires_grad_()
    b = torch.randn(2, 2, generator=gen, dtype=D64).requires_grad_()
    start = [a.detach().clone(), b.detach().clone()]
    g1, g2 = torch.tensor([True, False]), torch.tensor([False, True])

    def loss_of(group: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bool(group[0]):
            return ((x - 1) ** 4).sum() + (y.sin() * x[:2]).sum()
        return (x.exp()).sum() + ((y @ y) ** 2).sum()

    rho, u = 0.3, 0.7

    def step_along(group: torch.Tensor, at: list[torch.Tensor]) -> list[torch.Tensor]:
        x, y = (t.clone().requires_grad_() for t in at)
        gx, gy = torch.autograd.grad(loss_of(group, x, y), (x, y))
        return [t - rho * u * g / g.norm() for t, g in ((at[0], gx), (at[1], gy))]

    def grad_at(group: torch.Tensor, at: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        x, y = (t.clone().requires_grad_() for t in at)
        value = loss_of(group, x, y)
        return float(value.detach()), list(torch.autograd.grad(value, (x, y)))

    first_point, second_point = step_along(g1, start), step_along(g2, start)
    v1, G1 = grad_at(g2, first_point)
    v2, G2 = grad_at(g1, second_point)

    loss, delta = gao_loss(lambda m: loss_of(m, a, b), [a, b], (g1, g2), rho, u)
    assert float(loss.detach()) == pytest.approx(0.5 * (v1 + v2), rel=1e-10)
    assert torch.allclose(a.detach(), second_point[0]) and torch.allclose(b.detach(), second_point[1])
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert torch.allclose(ga, 0.5 * (G1[0] + G2[0])) and torch.allclose(gb, 0.5 * (G1[1] + G2[1]))
    with torch.no_grad():
        a.sub_(delta[0])
        b.sub_(delta[1])
    assert torch.allclose(a.detach(), start[0]) and torch.allclose(b.detach(), start[1])


# ---- the method on the tiny model ----------------------------------------------------------------------
def _task(name: str, seed: int, classes: int = 4, per_class: int = 6) -> Task:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, 32, 32, generator=gen) + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"{name} thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, steps: int) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=8), torch.device("cpu"), seed=0)
    return TaskContext(index, task, 2, torch.device("cpu"), make, steps, prompts=task.prompts())


def _train(method: LoDA, ctx: TaskContext, lr: float = 1e-2) -> None:
    method.before_task(ctx)
    train_task(method, ctx, TrainConfig(lr=lr, schedule="constant", batch_size=8, weight_decay=0.0), Hooks(), "fp32")


def test_trainable_sets_and_shared_first_task_down_projection(tiny_model: ClipModel) -> None:
    method = LoDA(tiny_model, LoDAHparams(rank=4, encoders="vision"), Profiler())
    first = _ctx(_task("A", 0), 0, steps=1)
    _train(method, first)
    sites = method.sites()
    for site in sites:
        downs = [site.module.adapters[p][GENERAL].down for p in "qkv"]
        assert isinstance(downs[0], torch.nn.Parameter) and downs[0] is downs[1] is downs[2]
        assert ISOLATED not in site.module.adapters["q"] and not site.module.adapters["o"]
    assert len(method.trainable_parameters()) == 4 * len(sites)  # 3 ups + the shared D_G per site
    method.after_task(first)
    second = _ctx(_task("B", 1), 1, steps=1)
    _train(method, second)
    trainable = method.trainable_parameters()
    expected = [site.module.adapters[p][n].up for site in sites for p in "qkv" for n in (GENERAL, ISOLATED)]
    assert {id(p) for p in trainable} == {id(p) for p in expected} and len(trainable) == 6 * len(sites)
    method.after_task(second)
    assert all(not site.module.adapters[p] for site in sites for p in "qkvo")


def test_gao_steps_leave_no_perturbation_behind(tiny_model: ClipModel) -> None:
    method = LoDA(tiny_model, LoDAHparams(rank=4, encoders="vision", rho=0.5), Profiler())
    ctx = _ctx(_task("A", 0), 0, steps=2)
    method.before_task(ctx)
    with torch.no_grad():  # non-zero up-projections, so that the source gradients move every tensor
        for p in method.trainable_parameters():
            p.normal_(0, 0.1)
    before = [p.detach().clone() for p in method.trainable_parameters()]
    train_task(method, ctx, TrainConfig(lr=1e-12, schedule="constant", batch_size=8, weight_decay=0.0),
               Hooks(), "fp32")
    after = method.trainable_parameters()
    assert max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)) < 1e-6  # float32 rounding


def test_merge_applies_the_recalibrated_general_and_the_plain_isolated_update(tiny_model: ClipModel) -> None:
    hp = LoDAHparams(rank=4, encoders="vision,text")
    method = LoDA(tiny_model, hp, Profiler())
    first = _ctx(_task("A", 0), 0, steps=2)
    _train(method, first)
    method.after_task(first)
    second = _ctx(_task("B", 1), 1, steps=3)
    _train(method, second)
    sites = method.sites()
    history = {s.name: method.history[s.name].clone() for s in sites}
    sigma = qkv_input_covariances(tiny_model, sites, second)  # Σ_t with the trained model
    expected = {}
    for site in sites:
        adapters = site.module.adapters
        kappa = recalibration_factors(adapters["q"][GENERAL].down, history[site.name], sigma[site.name],
                                      hp.merge_gamma)
        assert float(kappa.min()) < 0.999  # the recalibration does something here
        rows = []
        for proj in "qkv":
            g, i = adapters[proj][GENERAL], adapters[proj][ISOLATED]
            general = sum(float(kappa[j]) * hp.gamma_general * torch.outer(g.up[:, j], g.down[j]).double()
                          for j in range(g.rank))
            rows.append(site.module.projection_weight(proj).detach().double() + general
                        + hp.gamma_isolated * (i.up @ i.down).detach().double())
        expected[site.name] = torch.cat(rows)
    method.after_task(second)
    for site in sites:
        assert torch.allclose(site.module.in_proj_weight.detach().double(), expected[site.name], atol=1e-5)
    # history: H + Σ_pre + Σ_post, the latter from the merged model
    post = qkv_input_covariances(tiny_model, sites, second)
    for site in sites:
        assert torch.allclose(method.history[site.name], history[site.name] + sigma[site.name] + post[site.name],
                              atol=1e-8)


def test_smoke_run(tmp_path: Path) -> None:
    from clbench.runner import run_methods

    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"}, ["data.num_tasks=3", "loda.rank=8"],
                       ["loda"])
    (outcome,) = run_methods(cfg, ["loda"], tmp_path)
    assert outcome.status == "complete"
    profile = pd.read_csv(outcome.path / "profile.csv")
    assert {"feature_stats", "feature_svd", "recalibration", "merge", "train"} <= set(profile["section"])
    metrics = json.loads((outcome.path / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last"))
