"""LoDA: both down-projections solve their energy objectives (against brute-force scipy eigen-solves), the
recalibrated merge follows the closed form, GAO computes the two-order objective and leaves no trace."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from method_probes import (
    ordered_ctx,
    plain_covariances,
    randomise_norms,
    span_projector,
    styled_task,
    top_eigvecs,
)
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.methods.base import TaskContext
from clbench.methods.loda import (
    GENERAL,
    ISOLATED,
    LoDA,
    LoDAHparams,
    fused_perturbation,
    gao_objectives,
    general_down,
    isolated_down,
    jittered_cholesky,
    recalibrated_delta,
    recalibration_factors,
)
from clbench.models.clip import ClipModel

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
def _sgd_gao_by_hand(loss_of, start: list[torch.Tensor], groups: list[list[int]], order: tuple, rho: float,
                     u: float, lr: float) -> list[torch.Tensor]:
    """Two plain-SGD steps of the official ``perturb_and_train``, re-derived: for (src, tgt) in order, move by
    −ρu·g_src/‖g_src‖ (norm over each group), step on ∇L_tgt there, take the move back."""
    theta = [t.clone() for t in start]
    for src, tgt in order:
        x = [t.clone().requires_grad_() for t in theta]
        g = torch.autograd.grad(loss_of(src, x), x)
        moved = [t.clone() for t in theta]
        for group in groups:
            norm = math.sqrt(sum(float((g[i] ** 2).sum()) for i in group))
            for i in group:
                moved[i] = moved[i] - rho * u * g[i] / norm
        y = [t.clone().requires_grad_() for t in moved]
        G = torch.autograd.grad(loss_of(tgt, y), y)
        theta = [t - lr * gi for t, gi in zip(theta, G, strict=True)]
    return theta


def test_gao_takes_two_steps_with_the_perturbation_normalised_over_each_fused_group() -> None:
    gen = torch.Generator().manual_seed(13)
    params = [torch.randn(3, generator=gen, dtype=D64).requires_grad_(),
              torch.randn(2, 2, generator=gen, dtype=D64).requires_grad_(),
              torch.randn(2, generator=gen, dtype=D64).requires_grad_()]
    start = [p.detach().clone() for p in params]
    groups = [[0, 1], [2]]  # a and b are one official tensor, c another
    g1, g2 = torch.tensor([True, False]), torch.tensor([False, True])

    def loss_of(group: torch.Tensor, x: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = x
        if bool(group[0]):
            return ((a - 1) ** 4).sum() + (b.sin() * a[:2]).sum() + (c * a[1:]).sum() ** 2
        return a.exp().sum() + ((b @ b) ** 2).sum() + (c.cos() * b[0]).sum()

    rho, u, lr = 0.3, 0.7, 0.05
    opt = torch.optim.SGD(params, lr=lr)
    objectives = gao_objectives(lambda m: loss_of(m, params), params, groups, (g1, g2), rho, u)
    steps = 0
    for loss in objectives:
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    assert steps == 2  # two optimiser steps per batch, as the official code
    expected = _sgd_gao_by_hand(loss_of, start, groups, ((g1, g2), (g2, g1)), rho, u, lr)
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.detach(), e, atol=1e-12)
    # per-tensor normalisation (the old rule) lands elsewhere: the check can fail
    per_tensor = _sgd_gao_by_hand(loss_of, start, [[0], [1], [2]], ((g1, g2), (g2, g1)), rho, u, lr)
    assert max(float((p.detach() - e).abs().max()) for p, e in zip(params, per_tensor, strict=True)) > 1e-4


def test_fused_perturbation_has_norm_rho_u_per_group() -> None:
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]]), torch.tensor([0.0, 0.0, 2.0]), None]
    params = [torch.zeros(2), torch.zeros(1, 2), torch.zeros(3), torch.zeros(1)]
    out = fused_perturbation(grads, params, [[0, 1], [2], [3]], step=0.5)
    # group (0, 1): ‖(3, 4)‖ = 5, so the moves are −0.5·(3, 0)/5 and −0.5·(0, 4)/5; group 2 alone; 3 missing
    assert torch.allclose(out[0], torch.tensor([-0.3, 0.0]))
    assert torch.allclose(out[1], torch.tensor([[0.0, -0.4]]))
    assert torch.allclose(out[2], torch.tensor([0.0, 0.0, -0.5]))
    assert torch.equal(out[3], torch.zeros(1))


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
    sigma = plain_covariances(tiny_model, sites, second.task)  # Σ_t with the trained model, re-derived
    expected = {}
    for site in sites:
        adapters = site.module.adapters
        A = adapters["q"][GENERAL].down.detach().double()
        p = torch.einsum("id,de,ie->i", A, history[site.name], A)  # a_iᵀ H_t a_i, H_t before this task
        c = torch.einsum("id,de,ie->i", A, sigma[site.name], A)  # a_iᵀ Σ_t a_i
        kappa = 1 - p / (p + hp.merge_gamma * c + 1e-12)
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
    post = plain_covariances(tiny_model, sites, second.task)
    for site in sites:
        assert torch.allclose(method.history[site.name], history[site.name] + sigma[site.name] + post[site.name],
                              rtol=1e-5, atol=1e-7)


def test_smoke_run(tmp_path: Path) -> None:
    from clbench.engine.runner import run_methods

    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"}, ["data.num_tasks=3", "loda.rank=8"],
                       ["loda"])
    (outcome,) = run_methods(cfg, ["loda"], tmp_path)
    assert outcome.status == "complete"
    profile = pd.read_csv(outcome.path / "profile.csv")
    assert {"feature_stats", "feature_svd", "recalibration", "merge", "train"} <= set(profile["section"])
    metrics = json.loads((outcome.path / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last"))


# ---- end to end through the hooks, against plain re-derivations ------------------------------------------
def _plain_ce(model: ClipModel, images: torch.Tensor, labels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    text = model.encode_text(model.tokenize(prompts))
    return torch.nn.functional.cross_entropy(model.logit_scale() * model.encode_image(images) @ text.T, labels)


def test_gao_through_the_harness_is_the_official_two_step_update(tiny_model: ClipModel, monkeypatch) -> None:
    """One batch of the first task with SGD: two steps, each on the target group's gradient at weights moved
    by −ρu·g_src/‖g_src‖ with ‖·‖ over the fused q/k/v up-projection of a branch (and D_G alone)."""
    import clbench.methods.loda as loda

    rho, lr = 0.4, 0.05
    method = LoDA(tiny_model, LoDAHparams(rank=3, encoders="vision", rho=rho), Profiler())
    task = styled_task("A", 0)
    ctx = ordered_ctx(task, 0, 2, steps=1)
    method.before_task(ctx)
    with torch.no_grad():  # non-zero up-projections, so that D_G has a gradient too
        for p in method.trainable_parameters():
            if p.shape[1] == 3:
                p.normal_(0, 0.2)
    start = {id(p): p.detach().clone() for p in method.trainable_parameters()}
    # the plain re-derivation works on a copy, with the groups named independently of the method
    twin = copy.deepcopy(tiny_model)
    ups, downs = [], []
    for site in twin.attention_sites(["vision"]):
        ups.append([site.module.adapters[p][GENERAL].up for p in "qkv"])
        downs.append(site.module.adapters["q"][GENERAL].down)
    seen = []
    real = loda.gao_objectives

    def recording(group_loss, params, groups, classes, rho_, u):
        seen.append((classes, u))
        return real(group_loss, params, groups, classes, rho_, u)

    monkeypatch.setattr(loda, "gao_objectives", recording)
    train_task(method, ctx, TrainConfig(lr=lr, schedule="constant", optimizer="sgd", momentum=0.0, weight_decay=0.0),
               Hooks(), "fp32")
    ((g1, g2), u) = seen[0]
    images, labels = task.train.tensors
    params = [p for group in ups for p in group] + downs
    groups = [group for group in ups] + [[d] for d in downs]
    for first, second in ((g1, g2), (g2, g1)):
        src = torch.autograd.grad(_plain_ce(twin, images[first], labels[first], ctx.prompts), params)
        by_id = {id(p): g for p, g in zip(params, src, strict=True)}
        moves = {}
        for group in groups:
            norm = math.sqrt(sum(float((by_id[id(p)] ** 2).sum()) for p in group))
            for p in group:
                moves[id(p)] = -rho * u * by_id[id(p)] / norm
        with torch.no_grad():
            for p in params:
                p.add_(moves[id(p)])
        tgt = torch.autograd.grad(_plain_ce(twin, images[second], labels[second], ctx.prompts), params)
        with torch.no_grad():
            for p, g in zip(params, tgt, strict=True):
                p.sub_(moves[id(p)] + lr * g)
    moved = 0.0
    for site, twin_site in zip(method.sites(), twin.attention_sites(["vision"]), strict=True):
        for proj in "qkv":
            a, b = site.module.adapters[proj][GENERAL], twin_site.module.adapters[proj][GENERAL]
            assert torch.allclose(a.up, b.up, atol=1e-6) and torch.allclose(a.down, b.down, atol=1e-6)
            moved = max(moved, float((a.down - start[id(a.down)]).detach().abs().max()))
    assert moved > 1e-4  # D_G did move (its perturbation group matters)
    assert len(seen) == 1 and 0 < u < 1 and bool(g1.any()) and bool(g2.any()) and not bool((g1 & g2).any())


def test_down_projections_solve_their_objectives_with_the_history_through_the_method(tiny_model: ClipModel) -> None:
    """After a first task, ``before_task`` designs D_G from Σ_t + H_t and D_I from (Σ_t, H_t), with
    H_1 = Σ_0^pre + Σ_0^post; all statistics re-derived with plain torch on the model's own inputs."""
    r = 3
    randomise_norms(tiny_model)
    method = LoDA(tiny_model, LoDAHparams(rank=r, encoders="vision"), Profiler())
    sites = method.sites()
    first_task, second_task = styled_task("A", 0), styled_task("B", 2)
    first = ordered_ctx(first_task, 0, 2, steps=2, batch_size=8)
    method.before_task(first)
    train_task(method, first, TrainConfig(lr=1e-2, schedule="constant", batch_size=8, weight_decay=0.0), Hooks(),
               "fp32")
    trained = plain_covariances(tiny_model, sites, first_task)  # Σ_0^pre: trained, not merged
    method.after_task(first)
    merged = plain_covariances(tiny_model, sites, first_task)  # Σ_0^post
    sigma = plain_covariances(tiny_model, sites, second_task)  # Σ_1 with the current backbone
    method.before_task(ordered_ctx(second_task, 1, 2, steps=1))
    for site in sites:
        H = trained[site.name] + merged[site.name]
        assert torch.allclose(method.history[site.name], H, rtol=1e-5, atol=1e-7)
        S = sigma[site.name]
        D_G = site.module.adapters["q"][GENERAL].down
        D_I = site.module.adapters["q"][ISOLATED].down
        top = top_eigvecs(S + H, r)
        assert torch.allclose(span_projector(D_G), top @ top.T, atol=1e-4)
        _, V = scipy.linalg.eigh(S.numpy(), H.numpy())  # S v = λ H v, ascending λ
        gen_top = torch.from_numpy(V[:, -r:]).T
        assert torch.allclose(span_projector(D_I), span_projector(gen_top), atol=1e-4)
        # the checks can fail: the current statistics alone, or Σ and H swapped, give other subspaces
        alone = top_eigvecs(S, r)
        assert float((alone @ alone.T - top @ top.T).abs().max()) > 1e-2
        _, W = scipy.linalg.eigh(H.numpy(), S.numpy())
        assert float((span_projector(torch.from_numpy(W[:, -r:]).T) - span_projector(gen_top)).abs().max()) > 1e-2


def test_a_diverging_gao_step_leaves_no_perturbation_behind(tiny_model: ClipModel) -> None:
    """The run stops at a non-finite second target loss; the weights keep no GAO move (the generator is closed)."""
    from clbench.engine.harness import DivergenceError

    method = LoDA(tiny_model, LoDAHparams(rank=3, encoders="vision", rho=0.5), Profiler())
    ctx = ordered_ctx(styled_task("A", 0), 0, 1, steps=1)
    method.before_task(ctx)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.normal_(0, 0.1)
    start = [p.detach().clone() for p in method.trainable_parameters()]
    calls = []
    ce = method._ce

    def nan_on_the_second_target(*args):
        calls.append(1)
        loss = ce(*args)
        return loss * float("nan") if len(calls) == 4 else loss  # source, target, source, target

    method._ce = nan_on_the_second_target
    with pytest.raises(DivergenceError):
        train_task(method, ctx, TrainConfig(lr=1e-12, schedule="constant", optimizer="sgd", momentum=0.0,
                                            weight_decay=0.0), Hooks(), "fp32")
    assert len(calls) == 4
    after = method.trainable_parameters()
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(after, start, strict=True)) < 1e-6
