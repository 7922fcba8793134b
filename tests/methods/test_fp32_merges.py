"""Every method's merge, shift and closed-form update is float32 whatever the caller's autocast.

``--precision amp`` wraps the methods' hooks (``before_task``, ``after_task``) in fp16 autocast on CUDA; here the
same is done with CPU bfloat16 autocast. Each test runs a method's merge (or shift, or a linalg step) under that
autocast and compares with a float64 computation written here from the factors: a bfloat16 product is off by
~3e-3 relative, so the 1e-5 tolerance fails it.
"""

from __future__ import annotations

import torch
from method_probes import ordered_ctx, plain_covariances, styled_task

from clbench import linalg
from clbench.costs.profiler import Profiler
from clbench.methods import get_method
from clbench.methods.inflora import InfLoRA, InfLoRAHparams
from clbench.methods.keeplora import ADAPTER as KEEPLORA_ADAPTER
from clbench.methods.keeplora import KeepLoRA
from clbench.methods.loda import GENERAL, ISOLATED, LoDA, LoDAHparams
from clbench.methods.lora import ADAPTER as LORA_ADAPTER
from clbench.models.clip import ClipModel

D64 = torch.float64
TOL = 1e-5  # float32 rounding of the change (beside the weight's own rounding); bfloat16 products give ~3e-3


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(D64) - b.detach().to(D64)).norm() / b.detach().to(D64).norm())


def randomise_ups(method, std: float = 0.05, seed: int = 3) -> None:
    """Non-zero trained factors (as after training), so that the merge moves the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def weights(sites, projs: str) -> dict[tuple[str, str], torch.Tensor]:
    return {(s.name, p): s.module.projection_weight(p).detach().to(D64).clone() for s in sites for p in projs}


def assert_changes(sites, projs: str, before: dict, expected_change: dict) -> None:
    """``‖ΔW − expected‖ ≤ TOL·‖expected‖ + float32 rounding of the weight itself (2⁻²³·‖W‖)``."""
    for s in sites:
        for p in projs:
            W = s.module.projection_weight(p).detach().to(D64)
            error = float((W - before[(s.name, p)] - expected_change[(s.name, p)]).norm())
            bound = TOL * float(expected_change[(s.name, p)].norm()) + 2.0**-23 * float(W.norm())
            assert error <= bound, (s.name, p, error, bound)


def plain_delta(adapter) -> torch.Tensor:
    """``scale · up · down`` in float64, from the factors."""
    return adapter.scale * adapter.up.detach().to(D64) @ adapter.down.detach().to(D64)


# ---- the shared mechanism ----------------------------------------------------------------------------------------
def test_linalg_projection_and_sketch_ignore_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(48, 40, generator=gen)
    U, _ = torch.linalg.qr(torch.randn(48, 6, generator=gen))
    plain = (torch.eye(48, dtype=D64) - U.to(D64) @ U.to(D64).T) @ G.to(D64)
    with bf16():
        projected = linalg.project_out(G, U)
        A, S, V = linalg.top_r_factors(projected, 4, method="randomized", oversample=16, niter=4,
                                       generator=torch.Generator().manual_seed(1))
    assert projected.dtype == torch.float32 and rel(projected, plain) <= 1e-6
    A32, S32, V32 = linalg.top_r_factors(plain.float(), 4, method="randomized", oversample=16, niter=4,
                                         generator=torch.Generator().manual_seed(1))
    assert rel(A * S @ V.T, A32 * S32 @ V32.T) <= TOL


def test_low_rank_delta_is_float32_under_autocast(tiny_model: ClipModel) -> None:
    site = tiny_model.attention_sites(["vision"])[0]
    gen = torch.Generator().manual_seed(0)
    from clbench.models.attention import LowRankDelta

    delta = LowRankDelta(torch.randn(4, site.width, generator=gen), torch.randn(site.width, 4, generator=gen), 0.5)
    with bf16():
        dense = delta.delta()
    assert dense.dtype == torch.float32 and rel(dense, plain_delta(delta)) <= 1e-6


# ---- per method --------------------------------------------------------------------------------------------------
def test_lora_merge_is_float32_under_autocast(tiny_model: ClipModel) -> None:
    cls = get_method("lora")
    method = cls(tiny_model, cls.Hparams(rank=4), Profiler())
    ctx = ordered_ctx(styled_task("A", 0), 0, 2, steps=1)
    method.before_task(ctx)
    randomise_ups(method)
    sites = method.sites()
    before = weights(sites, "qkvo")
    expected = {(s.name, p): plain_delta(s.module.adapters[p][LORA_ADAPTER]) for s in sites for p in "qkvo"}
    with bf16():
        method.after_task(ctx)
    assert_changes(sites, "qkvo", before, expected)


def test_inflora_merge_is_float32_under_autocast(tiny_model: ClipModel) -> None:
    method = InfLoRA(tiny_model, InfLoRAHparams(rank=4, encoders="vision,text"), Profiler())
    ctx = ordered_ctx(styled_task("A", 0), 0, 2, steps=1)
    method.before_task(ctx)
    randomise_ups(method)
    sites = method.sites()
    before = weights(sites, "kv")
    expected = {(s.name, p): plain_delta(s.module.adapters[p][method.adapter]) for s in sites for p in "kv"}
    with bf16():
        method.after_task(ctx)
    assert_changes(sites, "kv", before, expected)


def test_loda_first_task_merge_is_float32_under_autocast(tiny_model: ClipModel) -> None:
    method = LoDA(tiny_model, LoDAHparams(rank=4, encoders="vision"), Profiler())
    ctx = ordered_ctx(styled_task("A", 0), 0, 2, steps=1)
    method.before_task(ctx)
    randomise_ups(method, std=0.3)  # includes the shared first-task D_G
    sites = method.sites()
    before = weights(sites, "qkv")
    expected = {(s.name, p): plain_delta(s.module.adapters[p][GENERAL]) for s in sites for p in "qkv"}
    with bf16():
        method.after_task(ctx)
    assert_changes(sites, "qkv", before, expected)


def test_loda_recalibrated_merge_is_float32_under_autocast(tiny_model: ClipModel) -> None:
    """From the second task the general branch is merged as ``Σ_i κ_i b_i a_iᵀ`` (``recalibrated_delta``): that
    product must not run in the caller's half precision (it did: 3e-3 relative error under bf16)."""
    hp = LoDAHparams(rank=4, encoders="vision")
    method = LoDA(tiny_model, hp, Profiler())
    first = ordered_ctx(styled_task("A", 0), 0, 2, steps=1)
    method.before_task(first)
    randomise_ups(method, std=0.01)
    method.after_task(first)
    second = ordered_ctx(styled_task("B", 1), 1, 2, steps=1)
    method.before_task(second)
    randomise_ups(method, seed=4)
    sites = method.sites()
    with bf16():  # Σ_t as the method's pass sees it under the same autocast (the pass follows it, by design)
        sigma = plain_covariances(tiny_model, sites, second.task)
    before = weights(sites, "qkv")
    expected = {}
    for s in sites:
        adapters = s.module.adapters
        A = adapters["q"][GENERAL].down.detach().to(D64)
        H = method.history[s.name].to(D64)
        p = torch.einsum("id,de,ie->i", A, H, A)
        c = torch.einsum("id,de,ie->i", A, sigma[s.name], A)
        kappa = 1 - p / (p + hp.merge_gamma * c + 1e-12)
        assert float(kappa.min()) < 0.999  # the recalibration does something here
        for proj in "qkv":
            g, i = adapters[proj][GENERAL], adapters[proj][ISOLATED]
            general = g.scale * (g.up.detach().to(D64) * kappa) @ g.down.detach().to(D64)
            expected[(s.name, proj)] = general + plain_delta(i)
    with bf16():
        method.after_task(second)
    assert_changes(sites, "qkv", before, expected)


def test_keeplora_shift_and_merge_are_float32_under_autocast(tiny_model: ClipModel) -> None:
    """S4 ``W ← W − s·A·B`` in ``before_task`` and S6 ``W ← W + s·A·B`` in ``after_task``, both under autocast."""
    method = KeepLoRA(tiny_model, KeepLoRA.Hparams(rank=4), Profiler())
    method.setup()
    ctx = ordered_ctx(styled_task("A", 0), 0, 2, steps=2, batch_size=8)
    sites = method.sites()
    start = weights(sites, "qkvo")
    with bf16():
        method.before_task(ctx)
    adapters = {(s.name, p): s.module.adapters[p][KEEPLORA_ADAPTER] for s in sites for p in "qkvo"}
    assert_changes(sites, "qkvo", start, {key: -plain_delta(a) for key, a in adapters.items()})
    randomise_ups(method, std=0.5)  # B as after training
    shifted = weights(sites, "qkvo")
    expected = {key: plain_delta(a) for key, a in adapters.items()}
    with bf16():
        method.after_task(ctx)
    assert_changes(sites, "qkvo", shifted, expected)
