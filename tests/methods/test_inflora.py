"""InfLoRA: down-projections orthogonal to the memory, old-input outputs untouched by training, DualGPM
memory bounded by d and following its energy rules, exact trainable set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from method_probes import ordered_ctx, plain_covariances, randomise_norms, span_projector, styled_task
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.methods.base import TaskContext
from clbench.methods.inflora import (
    ROW_SCALE,
    DualMemory,
    InfLoRA,
    InfLoRAHparams,
    design_down,
    dual_gpm_update,
    project_with_memory,
    threshold_schedule,
)
from clbench.models.clip import ClipModel

D64 = torch.float64


def _psd(d: int, seed: int, decay: float = 0.7, rank: int | None = None) -> torch.Tensor:
    """A random covariance with a decaying spectrum (rank ``rank``)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=D64))
    lam = decay ** torch.arange(d, dtype=D64)
    if rank is not None:
        lam[rank:] = 0
    return (Q * lam) @ Q.T


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=D64)).Q.float()


def _captured(basis: torch.Tensor, C: torch.Tensor) -> float:
    """Brute force: the share of ``‖C‖_F²`` (the code's energy ΣS²) that ``span(basis)`` captures."""
    B = basis.to(D64)
    rest = C - B @ (B.T @ C)
    return 1 - float((rest**2).sum() / (C**2).sum())


def _projector(basis: torch.Tensor) -> torch.Tensor:
    B = basis.to(D64)
    return B @ B.T


# ---- pure functions ----------------------------------------------------------------------------------
def test_threshold_schedule_rises_linearly() -> None:
    assert threshold_schedule(0.95, 1.0, 0, 10) == pytest.approx(0.95)
    assert threshold_schedule(0.95, 1.0, 5, 10) == pytest.approx(0.975)
    assert threshold_schedule(0.95, 1.0, 9, 10) == pytest.approx(0.995)


def test_first_task_keeps_the_directions_below_the_squared_eigenvalue_threshold() -> None:
    C = _psd(16, seed=0)
    memory = dual_gpm_update(None, C, 0.9)
    lam, vecs = torch.linalg.eigh(C)
    lam, vecs = lam.flip(0), vecs.flip(1)
    ratios = torch.cumsum(lam**2, 0) / (lam**2).sum()  # squared covariance eigenvalues (the code's quirk)
    k = max(int((ratios < 0.9).sum()), 1)
    assert memory.kind == "remove" and memory.basis.shape == (16, k)
    assert torch.allclose(_projector(memory.basis), vecs[:, :k] @ vecs[:, :k].T, atol=1e-5)


def test_remove_update_adds_the_fewest_directions_reaching_the_threshold() -> None:
    d, eps = 24, 0.97
    M = _orthonormal(d, 3, seed=1)
    C = _psd(d, seed=2, decay=0.8)
    new = dual_gpm_update(DualMemory(M, "remove"), C, eps)
    assert new.kind == "remove" and new.basis.shape[1] > 3
    assert torch.allclose(new.basis[:, :3], M)  # old columns kept, new ones appended
    gram = new.basis.T.double() @ new.basis.double()
    assert torch.allclose(gram, torch.eye(new.basis.shape[1], dtype=D64), atol=1e-5)
    assert _captured(new.basis, C) >= eps - 1e-9
    assert _captured(new.basis[:, :-1], C) < eps  # one direction fewer would not do


def test_remove_update_adds_nothing_when_the_memory_already_captures_enough() -> None:
    C = _psd(16, seed=3)
    M = torch.linalg.eigh(C).eigenvectors.flip(1)[:, :6].float()
    eps = _captured(M, C) - 1e-3
    assert torch.equal(dual_gpm_update(DualMemory(M, "remove"), C, eps).basis, M)
    assert dual_gpm_update(DualMemory(M, "remove"), C, eps + 2e-3).basis.shape[1] == 7  # just above: one more


def test_retain_update_shrinks_the_free_space_by_the_fewest_directions() -> None:
    d, eps = 20, 0.6
    R = _orthonormal(d, 9, seed=4)
    C = _psd(d, seed=5, decay=0.9)
    total = float((C**2).sum())
    remaining_before = float(((_projector(R) @ C) ** 2).sum()) / total
    assert remaining_before >= 1 - eps  # so the update must remove directions
    new = dual_gpm_update(DualMemory(R, "retain"), C, eps)
    k_new = new.basis.shape[1]
    assert new.kind == "retain" and 0 < k_new < 9
    inside = R.double() @ (R.double().T @ new.basis.double())
    assert torch.allclose(inside, new.basis.double(), atol=1e-5)  # R_new ⊂ span(R)
    remaining = float(((_projector(new.basis) @ C) ** 2).sum()) / total
    assert remaining < 1 - eps
    # with one direction fewer removed, the remaining energy would still be ≥ 1 − ε: brute force over R
    top = torch.linalg.svd(_projector(R) @ C).U[:, : 9 - k_new - 1]
    one_less = R.double() - top @ (top.T @ R.double())
    assert float(((one_less @ torch.linalg.pinv(one_less) @ C) ** 2).sum()) / total >= 1 - eps - 1e-9


def test_remove_basis_over_half_the_width_switches_to_its_retain_complement() -> None:
    d = 10
    C = _psd(d, seed=6, decay=0.95)
    memory = dual_gpm_update(None, C, 0.999)
    assert memory.kind == "retain" and memory.basis.shape[1] <= d / 2
    protected = memory.protected_basis()
    assert protected.shape[1] + memory.basis.shape[1] == d
    assert float((protected.double().T @ memory.basis.double()).abs().max()) < 1e-5
    lam, vecs = torch.linalg.eigh(C)
    ratios = torch.cumsum(lam.flip(0) ** 2, 0) / (lam**2).sum()
    k = int((ratios < 0.999).sum())
    assert torch.allclose(_projector(protected), vecs.flip(1)[:, :k] @ vecs.flip(1)[:, :k].T, atol=1e-5)


def test_memory_dimension_is_bounded_by_the_width() -> None:
    d, steps = 12, 30
    memory = None
    protected = 0
    for t in range(steps):
        C = _psd(d, seed=100 + t, decay=0.85)
        memory = dual_gpm_update(memory, C, threshold_schedule(0.95, 1.0, t, steps - 5))  # reaches and passes 1.0
        assert memory.basis.shape[1] <= d / 2  # the stored basis (dual switch)
        assert protected <= memory.protected_dim <= d  # grows, never beyond d
        protected = memory.protected_dim
        if memory.basis.shape[1]:
            gram = memory.basis.double().T @ memory.basis.double()
            assert torch.allclose(gram, torch.eye(memory.basis.shape[1], dtype=D64), atol=1e-5)
    assert protected > d / 2  # the switch happened on the way


@pytest.mark.parametrize("kind", ["remove", "retain"])
@pytest.mark.parametrize("free", [14, 4])  # free space larger, and smaller, than the rank
def test_down_projection_is_orthogonal_to_the_memory(kind: str, free: int) -> None:
    d, rank = 16, 6
    basis = _orthonormal(d, d - free if kind == "remove" else free, seed=7)
    memory = DualMemory(basis, kind)
    C = _psd(d, seed=8, decay=0.9)
    D = design_down(C, memory, rank)
    assert D.shape == (rank, d)
    assert float((D.double() @ memory.protected_basis().double()).abs().max()) < 1e-6
    if free >= rank:  # the top-r left singular vectors of Ĉ, rows of norm 1/√3 (brute force via eigh of ĈĈᵀ)
        assert torch.allclose(D.double() @ D.double().T, torch.eye(rank, dtype=D64) / 3, atol=1e-6)
        C_hat = project_with_memory(C, memory)
        vecs = torch.linalg.eigh(C_hat @ C_hat.T).eigenvectors.flip(1)[:, :rank]
        assert torch.allclose(3 * D.double().T @ D.double(), vecs @ vecs.T, atol=1e-5)
    assert float(D.norm(dim=1).max()) <= ROW_SCALE + 1e-6


# ---- the method on the tiny model --------------------------------------------------------------------
def _task(name: str, seed: int, classes: int = 3, per_class: int = 8) -> Task:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, 32, 32, generator=gen) + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"{name} thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, num_tasks: int, steps: int) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=8), torch.device("cpu"), seed=0)
    return TaskContext(index, task, num_tasks, torch.device("cpu"), make, steps, prompts=task.prompts())


def _train(method: InfLoRA, ctx: TaskContext, lr: float = 1e-2) -> None:
    method.before_task(ctx)
    train_task(method, ctx, TrainConfig(lr=lr, schedule="constant", batch_size=8, weight_decay=0.0), Hooks(), "fp32")


def test_outputs_on_old_inputs_are_unchanged_by_training(tiny_model: ClipModel) -> None:
    method = InfLoRA(tiny_model, InfLoRAHparams(rank=4), Profiler())
    first = _ctx(_task("A", 0), 0, 2, steps=2)
    _train(method, first)
    method.after_task(first)
    sites = method.sites()
    protected = {s.name: method.memory[s.name].protected_basis().clone() for s in sites}
    assert all(0 < p.shape[1] < s.width for p, s in zip(protected.values(), sites, strict=True))
    weights = {s.name: s.module.in_proj_weight.detach().clone() for s in sites}
    second = _ctx(_task("B", 1), 1, 2, steps=3)
    _train(method, second)
    for site in sites:  # the designed D is orthogonal to the stored memory
        down = site.module.adapters["k"][method.adapter].down
        assert float((down.double() @ protected[site.name].double()).abs().max()) < 1e-5
    method.after_task(second)
    gen = torch.Generator().manual_seed(3)
    changed = 0.0
    for site in sites:
        d = site.width
        before, after = weights[site.name], site.module.in_proj_weight.detach()
        P = protected[site.name]
        x_old = P @ torch.randn(P.shape[1], 5, generator=gen)  # inputs in the memory span
        x_any = torch.randn(d, 5, generator=gen)
        delta = after - before
        scale = float((before @ x_old).abs().max())
        assert float((delta[:d]).abs().max()) == 0.0  # q untouched
        assert float((delta[d:] @ x_old).abs().max()) < 1e-5 * scale  # k, v outputs on old inputs unchanged
        changed = max(changed, float((delta[d:] @ x_any).abs().max()))
    assert changed > 1e-4  # training did change k/v on other inputs (the check above can fail)


def test_trainable_set_is_exactly_the_current_up_projections(tiny_model: ClipModel) -> None:
    method = InfLoRA(tiny_model, InfLoRAHparams(rank=3, encoders="vision"), Profiler())
    for index in range(3):
        ctx = _ctx(_task(f"T{index}", index), index, 3, steps=1)
        _train(method, ctx)
        expected = []
        for site in method.sites():
            for proj in ("q", "k", "v", "o"):
                adapters = site.module.adapters[proj]
                assert list(adapters) == ([method.adapter] if proj in "kv" else [])  # old tasks merged
            expected += [site.module.adapters[p][method.adapter].up for p in ("k", "v")]
            assert not isinstance(site.module.adapters["k"][method.adapter].down, torch.nn.Parameter)
        trainable = method.trainable_parameters()
        assert len(trainable) == len(expected) == 2 * len(method.sites())
        assert {id(p) for p in trainable} == {id(p) for p in expected}
        assert all(isinstance(p, torch.nn.Parameter) for p in trainable)
        assert not any(s.module.in_proj_weight.requires_grad for s in tiny_model.attention_sites())
        method.after_task(ctx)
    assert all(not s.module.adapters["k"] for s in tiny_model.attention_sites())


def test_smoke_run(tmp_path: Path) -> None:
    from clbench.engine.runner import run_methods

    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"}, ["data.num_tasks=3"], ["inflora"])
    (outcome,) = run_methods(cfg, ["inflora"], tmp_path)
    assert outcome.status == "complete"
    profile = pd.read_csv(outcome.path / "profile.csv")
    assert {"feature_stats", "feature_svd", "memory_update", "merge", "train"} <= set(profile["section"])
    metrics = json.loads((outcome.path / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last"))
    assert (outcome.path / "state_bytes.csv").is_file()


# ---- defaults and the ε schedule, end to end through the hooks ------------------------------------------
def test_defaults_are_the_official_placement_and_schedule(tiny_model: ClipModel) -> None:
    hp = InfLoRAHparams()
    assert (hp.rank, hp.lamb, hp.lame, hp.encoders) == (10, 0.98, 1.0, "vision")  # the official ImageNet-R configs
    method = InfLoRA(tiny_model, hp, Profiler())
    method.before_task(_ctx(_task("A", 0), 0, 3, steps=1))
    for site in tiny_model.attention_sites():
        expected = {"k", "v"} if site.encoder == "vision" else set()
        assert {p for p in "qkvo" if site.module.adapters[p]} == expected


def _plain_gpm(C: torch.Tensor, M: torch.Tensor | None, eps: float) -> torch.Tensor:
    """GPM on the covariance's squared singular values (InfLoRA's code), written out plainly."""
    U, S, _ = torch.linalg.svd(C)
    total = float((S**2).sum())
    if M is None:
        ratios = torch.cumsum(S**2, 0) / total
        return U[:, : max(int((ratios < eps).sum()), 1)]
    R = C - M @ M.T @ C
    Ur, Sr, _ = torch.linalg.svd(R)
    accumulated, take = 1 - float((Sr**2).sum()) / total, 0
    while accumulated < eps:
        accumulated += float(Sr[take] ** 2) / total
        take += 1
    return torch.cat([M, Ur[:, :take]], dim=1)


def test_threshold_schedule_reaches_the_memory_task_by_task(tiny_model: ClipModel) -> None:
    """Three tasks through before_task/train/after_task: each task's memory is GPM with ε_t = lamb + (lame −
    lamb)·t/T on the trained model's input covariance, and each D_t spans the top singular vectors of the
    covariance projected off the memory (statistics re-derived with plain torch)."""
    randomise_norms(tiny_model)
    lamb, lame, T, r = 0.3, 0.99, 3, 3
    method = InfLoRA(tiny_model, InfLoRAHparams(rank=r, lamb=lamb, lame=lame, encoders="vision"), Profiler())
    sites = method.sites()
    memory: dict[str, torch.Tensor | None] = {s.name: None for s in sites}
    sensitive = 0
    for t in range(T):
        task = styled_task(f"T{t}", t)
        ctx = ordered_ctx(task, t, T, steps=2, batch_size=8)
        current = plain_covariances(tiny_model, sites, task)
        method.before_task(ctx)
        for site in sites:
            C = current[site.name]
            M = memory[site.name]
            C_hat = C if M is None else C - M @ M.T @ C
            top = torch.linalg.svd(C_hat).U[:, :r]
            down = site.module.adapters["k"][method.adapter].down.double()
            assert torch.equal(site.module.adapters["v"][method.adapter].down.double(), down)  # shared by k and v
            assert torch.allclose(down.norm(dim=1), torch.full((r,), ROW_SCALE, dtype=D64), atol=1e-6)
            assert torch.allclose(span_projector(down), top @ top.T, atol=1e-4)
        train_task(method, ctx, TrainConfig(lr=1e-2, schedule="constant", batch_size=8, weight_decay=0.0), Hooks(),
                   "fp32")
        trained = plain_covariances(tiny_model, sites, task)
        method.after_task(ctx)
        eps = lamb + (lame - lamb) * t / T
        for site in sites:
            C, M = trained[site.name], memory[site.name]
            expected = _plain_gpm(C, M, eps)
            got = method.memory[site.name]
            assert got.kind == "remove" and got.basis.shape[1] == expected.shape[1]
            assert torch.allclose(_projector(got.basis), _projector(expected), atol=1e-4)
            # the check can fail: the previous or the next task's ε, or a constant ε, keep other dimensions
            others = {lamb + (lame - lamb) * s / T for s in (t - 1, t + 1)} | {lamb}
            sensitive += sum(_plain_gpm(C, M, e).shape[1] != expected.shape[1] for e in others - {eps})
            memory[site.name] = expected
    assert sensitive >= 2 * len(sites)
