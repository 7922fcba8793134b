"""KeepLoRA, KeepLoRA+ and KeepLoRA++ mechanics on the random tiny CLIP (width 128, 4 layers per encoder):
bases against brute force, function-preserving init, no interference, exact merge, gradient restriction,
heads, layer scales, state round trip, hyperparameter checks and an end-to-end smoke run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_linalg import brute_gpm
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.errors import UserError
from clbench.linalg import is_orthonormal
from clbench.methods import get_method
from clbench.methods.base import TaskContext
from clbench.methods.keeplora import ADAPTER, KeepLoRA, layer_scales
from clbench.models.attention import PROJECTIONS
from clbench.models.clip import ClipModel

D = torch.float64
BATCH = 8


def _task(name: str, classes: int = 3, per_class: int = 8, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, 32, 32, generator=gen) + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int = 0, steps: int = 4, device: str = "cpu") -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=BATCH), torch.device(device), seed=0)
    return TaskContext(index, task, 3, torch.device(device), make, steps, prompts=task.prompts())


def _method(model: ClipModel, name: str = "keeplora", **hp) -> KeepLoRA:
    cls = get_method(name)
    return cls(model, cls.Hparams(**{"rank": 8, **hp}), Profiler())


def _embeddings(model: ClipModel, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([task.train[i][0] for i in range(6)])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(model.tokenize(task.prompts()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _proj_out(site, proj: str, x: torch.Tensor) -> torch.Tensor:
    """One projection's output without bias: base weight plus every adapter on it."""
    y = F.linear(x, site.module.projection_weight(proj))
    for adapter in site.module.adapters[proj].values():
        y = y + adapter(x)
    return y


def _proj(U: torch.Tensor) -> torch.Tensor:
    U = U.to(D)
    return U @ U.T


# ---- S0 ------------------------------------------------------------------------------------------------------
# What each reading means, written out here (not read from the method): basis side and energy cut.
READINGS = {"paper": ("input", "paper"), "official": ("output", "official")}


@pytest.mark.parametrize(("settings", "side", "cut"), [
    ({"compat": "paper"}, "input", "paper"),
    ({"compat": "official"}, "output", "official"),
    ({"compat": "paper", "wp_side": "output"}, "output", "paper"),
    ({"compat": "official", "energy_cut": "paper"}, "output", "paper"),
    ({"compat": "official", "wp_side": "input", "energy_cut": "compat"}, "input", "official"),
    ({"compat": "paper", "eps_w_vision": 0.5, "eps_w_text": 0.95}, "input", "paper"),
])
def test_pretrained_bases_follow_the_chosen_reading(tiny_model: ClipModel, settings: dict, side: str,
                                                    cut: str) -> None:
    """ε_w per tower from the literal values (0.85 vision, 0.2 text by default; swapped-looking values in the last
    case), never from the method's accessor, so a swap between towers fails here."""
    method = _method(tiny_model, **settings)
    method.setup()
    eps_w = {"vision": settings.get("eps_w_vision", 0.85), "text": settings.get("eps_w_text", 0.2)}
    assert len(method.bases) == 2 * 4 * 4
    for m in method.matrices():
        W = m.weight().detach().to(D)
        U, S, Vh = torch.linalg.svd(W)
        ratio = torch.cumsum(S**2, 0) / (S**2).sum()
        below = int((ratio < eps_w[m.name.split(".")[0]]).sum())
        # paper cut: smallest p with ratio >= eps; official: p = #(ratio < eps), at least 1
        p = below + 1 if cut == "paper" else max(below, 1)
        # input side: right singular vectors of W_pt; output side: its left singular vectors
        expected = Vh[:p].T if side == "input" else U[:, :p]
        basis = method.bases[m.name]
        assert basis.shape == expected.shape, m.name
        assert torch.allclose(_proj(basis), _proj(expected), atol=1e-5), m.name
    assert method.state_bytes()["basis"] == sum(b.numel() * 4 for b in method.bases.values())
    assert set(method.basis_columns()) == set(method.bases)


def test_default_thresholds_are_the_official_values() -> None:
    hp = get_method("keeplora").Hparams()
    assert (hp.rank, hp.alpha, hp.eps_w_vision, hp.eps_w_text, hp.eps_f) == (16, 1.0, 0.85, 0.2, 0.99)
    assert (hp.compat, hp.init) == ("paper", "residual_grad")


def test_zero_eps_w_skips_the_pretrained_basis(tiny_model: ClipModel) -> None:
    method = _method(tiny_model, eps_w_vision=0.0, eps_w_text=0.0)
    method.setup()
    assert all(c == 0 for c in method.basis_columns().values())


# ---- S1: gradient restricted to the adapted weights -----------------------------------------------------------
def test_restricted_gradient_equals_gradient_with_every_parameter(tiny_model: ClipModel) -> None:
    task = _task("A")
    method = _method(tiny_model)
    method.setup()
    restricted = method.estimate_gradients(_ctx(task))
    assert all(not p.requires_grad or p.grad is None for p in tiny_model.parameters())
    # brute force: every parameter requires grad, mean of per-batch gradients over the same full batches
    params = dict(tiny_model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    loader = torch.utils.data.DataLoader(task.train, batch_size=BATCH, shuffle=False, drop_last=True)
    for images, labels in loader:
        method.clip_loss(images, labels, tiny_model.tokenize(task.prompts())).backward()
    n = len(loader)
    for m in method.matrices():
        full = m.grad() / n
        assert _rel(restricted[m.name], full) <= 1e-5, m.name  # float summation order differs
    assert any(float(g.abs().max()) > 0 for g in restricted.values())


def test_grad_estimation_uses_a_share_of_the_batches_and_only_the_adapted_weights(tiny_model: ClipModel) -> None:
    task = _task("A", per_class=16)  # 48 samples = 6 batches
    method = _method(tiny_model, grad_fraction=0.5, encoders="vision")
    seen, grad_on = [], set()

    def spy(images, labels, text, denominator=None):
        seen.append((len(labels), denominator))
        grad_on.update(n for n, p in tiny_model.named_parameters() if p.requires_grad)
        return KeepLoRA.image_text_loss(method, images, labels, text, denominator)

    method.image_text_loss = spy
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    method.estimate_gradients(_ctx(task))
    assert seen == [(BATCH, BATCH)] * 3
    adapted = {n for n in flags if n.startswith("clip.visual.") and n.endswith(("attn.in_proj_weight",
                                                                           "attn.out_proj.weight"))}
    assert len(adapted) == 8 and grad_on == adapted
    assert flags == {n: p.requires_grad for n, p in tiny_model.named_parameters()}  # restored afterwards


@pytest.mark.parametrize("encoders", ["vision,text", "text", "vision"])
def test_micro_batches_and_text_chunks_give_the_same_estimate(tiny_model: ClipModel, encoders: str) -> None:
    """Micro-batches (3 images, not a divisor of the batch) and text chunks (2 prompts) change only the
    float summation order: the estimate is the batch-mean gradient either way, for each encoder choice."""
    task = _task("A", classes=5)
    method = _method(tiny_model, encoders=encoders)
    whole = method.estimate_gradients(_ctx(task))
    method.grad_chunk, method.text_chunk = 3, 2
    seen = []

    def spy(images, labels, text, denominator=None):
        seen.append((len(labels), denominator))
        return KeepLoRA.image_text_loss(method, images, labels, text, denominator)

    method.image_text_loss = spy
    chunked = method.estimate_gradients(_ctx(task))
    assert seen[:3] == [(3, BATCH), (3, BATCH), (2, BATCH)]
    assert set(chunked) == set(whole) == {m.name for m in method.matrices()}
    assert {name.split(".")[0] for name in whole} == set(encoders.split(","))
    for name, G in whole.items():
        assert float(G.norm()) > 0, name
        assert _rel(chunked[name], G) <= 1e-5, name
    assert all(p.grad is None for p in tiny_model.parameters())


def test_passes_follow_autocast_and_the_subspace_algebra_ignores_it(tiny_model: ClipModel) -> None:
    """Under a caller's autocast (``--precision amp``; bfloat16 on the CPU here) the gradient pass runs in low
    precision like the official fp16 pass, while S2–S3 and S7 keep their own precision: A stays orthogonal to
    the basis and the extended bases stay orthonormal to float32 accuracy."""
    task = _task("A")
    method = _method(tiny_model)
    method.setup()
    exact = method.estimate_gradients(_ctx(task))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method.estimate_gradients(_ctx(task))
    flat = torch.cat([g.flatten() for g in exact.values()])
    low_flat = torch.cat([low[name].flatten() for name in exact])
    assert 1e-4 < _rel(low_flat, flat) < 0.1  # autocast was in effect, and it is the same gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method.before_task(_ctx(task))
        method.after_task(_ctx(task))
    assert max(stats["a_leak"] for stats in method.init_stats.values()) < 1e-5
    assert all(is_orthonormal(basis, atol=1e-5) for basis in method.bases.values())


# ---- S2–S4: design of the adapters and the output-preserving shift ---------------------------------------------
@pytest.mark.parametrize("name", ["keeplora", "keeplora+", "keeplora++"])
def test_outputs_unchanged_after_the_initial_shift(tiny_model: ClipModel, name: str) -> None:
    task = _task("A")
    method = _method(tiny_model, name)
    method.setup()
    image0, text0 = _embeddings(tiny_model, task)
    weights0 = {m.name: m.weight().detach().clone() for m in method.matrices()}
    method.before_task(_ctx(task))
    image1, text1 = _embeddings(tiny_model, task)
    assert _rel(image1, image0) <= 1e-5 and _rel(text1, text0) <= 1e-5
    moved = max(float((m.weight().detach() - weights0[m.name]).abs().max()) for m in method.matrices())
    if name == "keeplora++":  # B = 0: no shift needed, the weights are untouched
        assert moved == 0.0
        assert all(float(a.up.detach().abs().max()) == 0 for a in _adapters(method))
    else:  # the weights did move by -sAB, and the adapter adds it back
        assert moved > 1e-6


def _adapters(method: KeepLoRA):
    return [m.site.module.adapters[m.proj][ADAPTER] for m in method.matrices()
            if ADAPTER in m.site.module.adapters[m.proj]]


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_adapters_are_the_top_r_residual_gradient(tiny_model: ClipModel, compat: str) -> None:
    task = _task("A")
    method = _method(tiny_model, compat=compat)
    method.setup()
    grads = method.estimate_gradients(_ctx(task))
    method.init_adapters(grads)
    r, s = method.hparams.rank, method.hparams.alpha / method.hparams.rank
    for m in method.matrices():
        adapter = m.site.module.adapters[m.proj][ADAPTER]
        U = method.bases[m.name]
        A, B = adapter.down.T, adapter.up.T  # paper layout: A d_in × r, B r × d_out
        assert isinstance(adapter.up, torch.nn.Parameter) and not isinstance(adapter.down, torch.nn.Parameter)
        assert is_orthonormal(torch.cat([U, A], dim=1), atol=1e-5)
        # brute force: s·A·B = s·[Ĝ]_r, the rank-r truncation of (I − UUᵀ) Gᵀ
        G_hat = (torch.eye(U.shape[0], dtype=D) - _proj(U)) @ grads[m.name].T.to(D)
        Ug, Sg, Vgh = torch.linalg.svd(G_hat)
        best = Ug[:, :r] @ torch.diag(Sg[:r]) @ Vgh[:r]
        tol = 1e-4 if compat == "paper" else 2e-2  # randomized SVD (q = 4r, 4 iterations) is approximate
        assert _rel((A @ B).to(D), best) <= tol, m.name
        assert adapter.scale == pytest.approx(s)
        assert method.init_stats[m.name]["a_leak"] < 1e-5


def test_official_gradient_sketch_is_torch_svd_lowrank_with_4r_columns_and_4_iterations(tiny_model: ClipModel) -> None:
    """``grad_svd=randomized`` is the official MTIL call ``torch.svd_lowrank(Ĝ, q=4r, niter=4)`` (trainer.py),
    drawn from one generator seeded from the global one: with the global generator seeded the same way, torch's
    own function gives the same A and B to float rounding. The gradients have slowly decaying spectra, so a
    sketch with fewer columns or power iterations is far off (an exact-SVD comparison cannot tell)."""
    r = 4
    method = _method(tiny_model, compat="official", encoders="vision", rank=r)
    method.setup()
    gen = torch.Generator().manual_seed(7)
    grads = {}
    for m in method.matrices():
        d_out, d_in = m.weight().shape
        left, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))
        right, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
        grads[m.name] = left @ torch.diag(torch.linspace(1.0, 0.5, min(d_out, d_in))) @ right.T
    torch.manual_seed(11)
    method.init_adapters(grads)
    torch.manual_seed(11)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,))))  # the method's generator, as the global one here
    for m in method.matrices():
        U = method.bases[m.name]
        G = grads[m.name].T  # paper layout d_in × d_out
        G_hat = G - U @ (U.T @ G)
        Us, Ss, Vs = torch.svd_lowrank(G_hat, q=4 * r, niter=4)  # the official call
        adapter = m.site.module.adapters[m.proj][ADAPTER]
        A, B = adapter.down.T, adapter.up.T
        assert _rel(A, Us[:, :r]) <= 1e-4, m.name
        assert _rel(B, Ss[:r, None] * Vs[:, :r].T) <= 1e-4, m.name


# ---- S5–S6: no interference, exact merge -----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "compat"), [("keeplora", "paper"), ("keeplora", "official"),
                                              ("keeplora++", "paper"), ("keeplora+", "paper")])
def test_no_interference_in_the_protected_span_and_exact_merge(tiny_model: ClipModel, name: str, compat: str):
    task = _task("A")
    method = _method(tiny_model, name, compat=compat)
    method.setup()
    ctx = _ctx(task, steps=5)
    method.before_task(ctx)
    gen = torch.Generator().manual_seed(1)
    probes = {}
    for m in method.matrices():
        U = method.bases[m.name]
        inside = torch.randn(6, U.shape[1], generator=gen) @ U.T  # inputs in span(U)
        outside = torch.randn(6, U.shape[0], generator=gen)
        with torch.no_grad():
            probes[m.name] = (inside, outside, _proj_out(m.site, m.proj, inside), _proj_out(m.site, m.proj, outside))
    # W_{t-1} = W' + s·A·B_0 (the weight before the shift)
    previous = {m.name: (m.weight() + m.site.module.adapters[m.proj][ADAPTER].delta()).detach().clone()
                for m in method.matrices()}
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=1e-2, weight_decay=0.01), Hooks(), "fp32")
    changed = 0.0
    for m in method.matrices():
        inside, outside, y_in, y_out = probes[m.name]
        with torch.no_grad():
            assert _rel(_proj_out(m.site, m.proj, inside), y_in) <= 1e-5, m.name
            changed = max(changed, _rel(_proj_out(m.site, m.proj, outside), y_out))
    assert changed > 1e-3  # training did move the outputs of unprotected inputs (the check can fail)
    image_adapted, text_adapted = _embeddings(tiny_model, task)
    method.after_task(ctx)
    assert all(not any(m.site.module.adapters[p] for p in PROJECTIONS) for m in method.matrices())
    image_merged, text_merged = _embeddings(tiny_model, task)
    assert _rel(image_merged, image_adapted) <= 1e-5 and _rel(text_merged, text_adapted) <= 1e-5
    for m in method.matrices():  # merged W_t = W_{t-1} + s·A·(B_T − B_0) acts on span(U_{t-1}) as W_{t-1}
        inside = probes[m.name][0]
        with torch.no_grad():
            assert _rel(F.linear(inside, m.weight()), F.linear(inside, previous[m.name])) <= 1e-5, m.name


# ---- S7: feature subspace -----------------------------------------------------------------------------------------
def test_feature_update_equals_gpm_on_the_stacked_inputs_of_the_merged_model(tiny_model: ClipModel) -> None:
    task = _task("A")
    method = _method(tiny_model, eps_f=0.95)
    method.setup()
    ctx = _ctx(task, steps=2)
    method.before_task(ctx)
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=1e-2), Hooks(), "fp32")
    old = dict(method.bases)
    method.after_task(ctx)
    # brute force: stack every token of every input of the merged model, then the GPM loop on the SVD
    inputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    removers = [s.module.add_observer(lambda kind, x, n=s.name: inputs.setdefault((n, kind), []).append(x.clone()))
                for s in method.sites()]
    with torch.no_grad():
        tiny_model.encode_image(torch.stack([task.train[i][0] for i in range(len(task.train))]))
        tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
    for remove in removers:
        remove()
    grew = 0
    for m in method.matrices():
        X = torch.cat([x.reshape(-1, m.site.width) for x in inputs[(m.site.name, "o" if m.proj == "o" else "qkv")]]).T
        expected = brute_gpm(old[m.name], X, 0.95)
        new = method.bases[m.name]
        assert new.shape == expected.shape, m.name
        assert torch.equal(new[:, : old[m.name].shape[1]], old[m.name])
        assert is_orthonormal(new) and new.shape[1] <= m.site.width
        assert torch.allclose(_proj(new), _proj(expected), atol=1e-4), m.name
        grew += new.shape[1] - old[m.name].shape[1]
    assert grew > 0
    # the next task's A is orthogonal to the grown bases
    method.before_task(_ctx(_task("B", seed=5), index=1))
    for m in method.matrices():
        A = m.site.module.adapters[m.proj][ADAPTER].down.T
        assert float((A.T @ method.bases[m.name]).abs().max()) < 1e-5


def test_official_feature_statistic_is_the_slot_sum(tiny_model: ClipModel) -> None:
    task = _task("A")  # 24 samples, batch 8: three full batches
    method = _method(tiny_model, compat="official", encoders="vision")
    method.setup()
    ctx = _ctx(task)
    stats = method.feature_statistics(ctx)
    site = method.sites()[0]
    F_ = stats[(site.name, "qkv")].features()
    assert F_.shape == (site.width, 17 * BATCH)  # d × (L·B)
    # the sum over batches of slot-aligned token matrices / N_tokens; any batch order gives the same sum
    xs = []
    remove = site.module.add_observer(lambda kind, x: xs.append(x.clone()) if kind == "qkv" else None)
    with torch.no_grad():
        for i in range(0, 24, BATCH):
            tiny_model.encode_image(torch.stack([task.train[j][0] for j in range(i, i + BATCH)]))
    remove()
    # per slot, the sum over batches is order-dependent (shuffled loader), but its total over slots is not
    expected_total = sum(x.sum(dim=(0, 1)) for x in xs) / (24 * 17)
    assert torch.allclose(F_.sum(dim=1), expected_total, atol=1e-5)


# ---- KeepLoRA+ ---------------------------------------------------------------------------------------------------
def test_keeplora_plus_heads(tiny_model: ClipModel) -> None:
    task = _task("A")
    method = _method(tiny_model, "keeplora+")
    method.setup()
    ctx = _ctx(task, steps=3)
    method.before_task(ctx)
    head = method.heads["A"]
    # brute force: normalised class means of normalised features of the (shifted, function-equal) model
    images = torch.stack([task.train[i][0] for i in range(len(task.train))])
    labels = torch.tensor([task.train[i][1] for i in range(len(task.train))])
    with torch.no_grad():
        z = tiny_model.encode_image(images)
    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    assert torch.allclose(head, F.normalize(means, dim=-1), atol=1e-5)
    assert any(p is head for p in method.trainable_parameters())
    text = torch.randn(3, z.shape[1])
    clip = tiny_model.logit_scale() * z @ text.T
    with torch.no_grad():
        assert torch.allclose(method.logits(z, text, "A", trained=False), clip)
        expected = clip + 30 * F.normalize(z, dim=-1) @ F.normalize(head, dim=-1).T
        assert torch.allclose(method.logits(z, text, "A", trained=True), expected, atol=1e-5)
        assert torch.allclose(method.train_logits(z, text, ctx), expected, atol=1e-5)
        assert torch.allclose(method.logits(z, text, "unseen", trained=True), clip)
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=1e-2), Hooks(), "fp32")
    method.after_task(ctx)
    trained_head = method.heads["A"].detach().clone()
    assert not torch.allclose(trained_head, F.normalize(means, dim=-1))  # trained with B
    ctx_b = _ctx(_task("B", seed=3), index=1, steps=2)
    method.before_task(ctx_b)
    assert not any(p is method.heads["A"] for p in method.trainable_parameters())
    train_task(method, ctx_b, TrainConfig(batch_size=BATCH, lr=1e-2), Hooks(), "fp32")
    assert torch.equal(method.heads["A"], trained_head)  # earlier heads stay frozen
    # state round trip: bases and heads
    state = method.state_dict()
    fresh = _method(tiny_model, "keeplora+")
    fresh.load_state_dict(state)
    assert set(fresh.heads) == {"A", "B"} and set(fresh.bases) == set(method.bases)
    assert all(torch.equal(fresh.bases[k], method.bases[k]) for k in method.bases)
    assert torch.equal(fresh.heads["A"], method.heads["A"])
    assert method.state_bytes()["heads"] == 2 * 3 * z.shape[1] * 4


# ---- KeepLoRA++ ----------------------------------------------------------------------------------------------------
def test_keeplora_pp_layer_scales(tiny_model: ClipModel) -> None:
    expected = [0.2000, 0.2727, 0.3455, 0.4182, 0.4909, 0.5636, 0.6364, 0.7091, 0.7818, 0.8545, 0.9273, 1.0000]
    assert layer_scales(12, 0.2) == pytest.approx(expected, abs=5e-5)
    assert layer_scales(1, 0.2) == [1.0]
    method = _method(tiny_model, "keeplora++", gamma=0.4, scale_text=False)
    method.setup()
    method.before_task(_ctx(_task("A")))
    s = method.hparams.alpha / method.hparams.rank
    for m in method.matrices():
        adapter = m.site.module.adapters[m.proj][ADAPTER]
        factor = 0.4 + 0.6 * m.site.layer / 3 if m.site.encoder == "vision" else 1.0
        assert adapter.scale == pytest.approx(s * factor), m.name


# ---- hyperparameters -----------------------------------------------------------------------------------------------
def test_hyperparameter_checks(tiny_model: ClipModel) -> None:
    with pytest.raises(UserError, match="rank=200 exceeds the width 128"):
        _method(tiny_model, rank=200).validate()
    with pytest.raises(UserError, match="eps_f"):
        _method(tiny_model, eps_f=1.5).validate()
    with pytest.raises(UserError, match="compat"):
        _method(tiny_model, compat="both").validate()
    _method(tiny_model, "keeplora++").validate()
    cfg = build_config("smoke", {}, ["keeplora++.gamma=0.3", "keeplora+.compat=official",
                                     "keeplora.grad_fraction=0.25", "keeplora++.scale_text=false"],
                       ["keeplora", "keeplora+", "keeplora++"])
    assert cfg.methods["keeplora++"]["gamma"] == 0.3 and cfg.methods["keeplora++"]["scale_text"] is False
    assert cfg.methods["keeplora+"]["compat"] == "official"
    assert cfg.methods["keeplora"]["grad_fraction"] == 0.25
    cfg = build_config("smoke", {}, ["keeplora.wp_side=output", "keeplora.features=slotsum", "keeplora.init=random",
                                     "keeplora.energy_cut=official", "keeplora.grad_svd=randomized"], ["keeplora"])
    expected = {"wp_side": "output", "features": "slotsum", "energy_cut": "official", "grad_svd": "randomized",
                "init": "random"}
    assert {k: cfg.methods["keeplora"][k] for k in expected} == expected
    for bad in ("keeplora.eps_w_text=-0.1", "keeplora.compat=code", "keeplora.grad_fraction=0", "keeplora.rank=0",
                "keeplora.wp_side=left", "keeplora.features=stacked", "keeplora.energy_cut=<", "keeplora.init=zeros"):
        with pytest.raises(UserError):
            build_config("smoke", {}, [bad], ["keeplora"])


# ---- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_of_all_three_methods(tmp_path) -> None:
    from clbench.engine.runner import run_methods

    names = ["keeplora", "keeplora+", "keeplora++"]
    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"},
                       ["data.num_tasks=2", "keeplora.rank=4", "keeplora+.rank=4", "keeplora++.rank=4",
                        "keeplora+.compat=official"], names)
    outcomes = run_methods(cfg, names, tmp_path)
    assert [o.status for o in outcomes] == ["complete"] * 3
    for outcome in outcomes:
        accuracy = pd.read_csv(outcome.path / "accuracy.csv")
        assert len(accuracy) == 2
        sections = set(pd.read_csv(outcome.path / "profile.csv")["section"])
        assert {"pretrained_svd", "grad_estimation", "grad_svd", "merge", "feature_stats", "feature_svd"} <= sections
        state = pd.read_csv(outcome.path / "state_bytes.csv")
        columns = state[state["name"].str.startswith("basis:")]
        assert len(columns) == 3 * 32  # setup + 2 tasks, 32 matrices
        assert (columns["columns"] <= 128).all()


# ---- precision: merge and head initialisation in float32 under a caller's autocast ---------------------------------
AUTOCAST = [("cpu", torch.bfloat16),
            pytest.param("cuda", torch.float16, marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("name", ["keeplora+", "keeplora++"])
def test_merge_and_head_init_are_float32_under_autocast(tiny_model: ClipModel, name: str, device: str,
                                                        dtype: torch.dtype) -> None:
    """``--precision amp`` wraps the hooks in autocast (bfloat16 on the CPU, float16 on CUDA): the merged weight
    must still act on the protected subspace exactly as before the task (the official code merges in fp32), and
    KeepLoRA+'s head must be the float32 class means. In bfloat16 the merge drifts by ~5e-5 relative there."""
    tiny_model.to(device)
    task = _task("A")
    method = _method(tiny_model, name)
    method.setup()
    ctx = _ctx(task, steps=5, device=device)
    with torch.autocast(device, dtype=dtype):
        method.before_task(ctx)
    if name == "keeplora+":
        images = torch.stack([task.train[i][0] for i in range(len(task.train))]).to(device)
        labels = torch.tensor([task.train[i][1] for i in range(len(task.train))]).to(device)
        with torch.no_grad():
            z = F.normalize(tiny_model.clip.encode_image(images).float(), dim=-1)
        means = torch.stack([z[labels == c].mean(0) for c in range(3)])
        assert _rel(method.heads["A"], F.normalize(means, dim=-1)) <= 1e-6
    previous = {m.name: (m.weight() + m.site.module.adapters[m.proj][ADAPTER].delta()).detach().clone()
                for m in method.matrices()}
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=0.2, weight_decay=0.01), Hooks(), "fp32")
    gen = torch.Generator().manual_seed(2)
    inside = {}
    for m in method.matrices():
        U = method.bases[m.name]
        inside[m.name] = torch.randn(6, U.shape[1], generator=gen).to(device) @ U.T
    moved = 0.0
    with torch.autocast(device, dtype=dtype):
        method.after_task(ctx)
    for m in method.matrices():
        x = inside[m.name]
        with torch.no_grad():
            expected = F.linear(x, previous[m.name])
            assert _rel(F.linear(x, m.weight()), expected) <= 1e-5, m.name
            moved = max(moved, _rel(m.weight(), previous[m.name]))
    assert moved > 1e-3  # the merge did change the weights (elsewhere than on the protected subspace)


# ---- the separate settings behind compat ---------------------------------------------------------------------------
def _stacked_inputs(model: ClipModel, method: KeepLoRA, task: Task) -> dict[tuple[str, str], torch.Tensor]:
    """Every token of every projection input (d × N) over the task's images and prompts, by brute force."""
    inputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    removers = [s.module.add_observer(lambda kind, x, n=s.name: inputs.setdefault((n, kind), []).append(x.clone()))
                for s in method.sites()]
    with torch.no_grad():
        model.encode_image(torch.stack([task.train[i][0] for i in range(len(task.train))]))
        model.encode_text(model.tokenize(task.prompts()))
    for remove in removers:
        remove()
    return {key: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).T for key, xs in inputs.items()}


@pytest.mark.parametrize(("settings", "cut"), [
    ({"compat": "official"}, "official"),
    ({"compat": "official", "energy_cut": "paper"}, "paper"),
    ({"compat": "paper", "features": "slotsum", "energy_cut": "official"}, "official"),
])
def test_first_feature_update_with_an_empty_basis(tiny_model: ClipModel, settings: dict, cut: str) -> None:
    """With ε_w = 0 the first feature update starts from an empty basis: the official reading takes the top
    ``#(cumsum σ²/Σσ² < ε_f)`` (at least 1) directions of the slot-sum features, the paper cut one more. One
    batch (8 samples = the batch size), so the slot sum is the token matrix itself up to the column order and a
    scale: its left singular vectors and energy fractions are those of the stacked inputs."""
    task = _task("A", classes=2, per_class=4)
    method = _method(tiny_model, eps_w_vision=0.0, eps_w_text=0.0, eps_f=0.9, **settings)
    method.setup()
    assert all(c == 0 for c in method.basis_columns().values())
    ctx = _ctx(task, steps=1)
    method.before_task(ctx)
    method.after_task(ctx)
    stacked = _stacked_inputs(tiny_model, method, task)
    for m in method.matrices():
        X = stacked[(m.site.name, INPUT_OF_TEST[m.proj])].to(D)
        U, S, _ = torch.linalg.svd(X, full_matrices=False)
        ratio = torch.cumsum(S**2, 0) / (S**2).sum()
        below = int((ratio < 0.9).sum())
        k = max(below, 1) if cut == "official" else below + 1
        basis = method.bases[m.name]
        assert basis.shape[1] == k, m.name
        assert torch.allclose(_proj(basis), _proj(U[:, :k]), atol=1e-4), m.name


INPUT_OF_TEST = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o"}


@pytest.mark.parametrize(("settings", "statistic", "svd"), [
    ({"compat": "paper"}, "CovarianceAccumulator", "exact"),
    ({"compat": "official"}, "SlotSumAccumulator", "randomized"),
    ({"compat": "paper", "features": "slotsum", "grad_svd": "randomized"}, "SlotSumAccumulator", "randomized"),
    ({"compat": "official", "features": "cov", "grad_svd": "exact"}, "CovarianceAccumulator", "exact"),
])
def test_feature_statistic_and_gradient_svd_settings(tiny_model: ClipModel, monkeypatch, settings: dict,
                                                     statistic: str, svd: str) -> None:
    import clbench.methods.keeplora as keeplora

    routes = []
    real = keeplora.top_r_factors

    def spy(*args, method="exact", **kwargs):
        routes.append(method)
        return real(*args, method=method, **kwargs)

    monkeypatch.setattr(keeplora, "top_r_factors", spy)
    method = _method(tiny_model, encoders="vision", **settings)
    method.setup()
    ctx = _ctx(_task("A"))
    method.before_task(ctx)
    assert set(routes) == {svd}
    stats = method.feature_statistics(ctx)
    assert {type(acc).__name__ for acc in stats.values()} == {statistic}


def test_random_orthonormal_init_ablation(tiny_model: ClipModel) -> None:
    """init=random (the paper's initialisation ablation): no gradient pass, A random orthonormal in span(U)^⊥,
    B = 0, weights untouched; training still leaves the protected span alone."""
    task = _task("A")
    method = _method(tiny_model, init="random")

    def no_gradient_pass(task):
        raise AssertionError("the random initialisation must not estimate a gradient")

    method.estimate_gradients = no_gradient_pass
    method.setup()
    weights0 = {m.name: m.weight().detach().clone() for m in method.matrices()}
    ctx = _ctx(task, steps=4)
    method.before_task(ctx)
    grads = KeepLoRA.estimate_gradients(method, ctx)
    for m in method.matrices():
        adapter = m.site.module.adapters[m.proj][ADAPTER]
        A, U = adapter.down.T, method.bases[m.name]
        assert A.shape[1] == 8 and is_orthonormal(torch.cat([U, A], dim=1), atol=1e-5), m.name
        assert float(adapter.up.detach().abs().max()) == 0.0 and torch.equal(m.weight(), weights0[m.name])
        # not the gradient's directions: the residual gradient's top-8 subspace captures far more of it
        G_hat = (torch.eye(U.shape[0], dtype=D) - _proj(U)) @ grads[m.name].T.to(D)
        top = torch.linalg.svdvals(G_hat)[:8].square().sum()
        assert float((A.T.to(D) @ G_hat).square().sum()) < 0.5 * float(top), m.name
    probes = {m.name: torch.randn(4, method.bases[m.name].shape[1]) @ method.bases[m.name].T
              for m in method.matrices()}
    before = {m.name: F.linear(probes[m.name], m.weight()).detach() for m in method.matrices()}
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=1e-2), Hooks(), "fp32")
    method.after_task(ctx)
    moved = 0.0
    for m in method.matrices():
        assert _rel(F.linear(probes[m.name], m.weight()), before[m.name]) <= 1e-5, m.name
        moved = max(moved, _rel(m.weight(), weights0[m.name]))
    assert moved > 1e-4


# ---- KeepLoRA+ heads after training, KeepLoRA++ default scales ---------------------------------------------------
def test_keeplora_plus_trained_heads_enter_the_logits_normalised(tiny_model: ClipModel) -> None:
    """After training the head rows are no longer unit vectors; the logits must still use 30·cos(z, w_c),
    written out here as z·w / (|z| |w|), in training, per-dataset evaluation and the union rule."""
    from clbench.datasets.base import ClassSpan

    task = _task("A")
    method = _method(tiny_model, "keeplora+")
    method.setup()
    ctx = _ctx(task, steps=6)
    method.before_task(ctx)
    train_task(method, ctx, TrainConfig(batch_size=BATCH, lr=5e-2, weight_decay=0.0), Hooks(), "fp32")
    method.after_task(ctx)
    head = method.heads["A"].detach()
    assert float((head.norm(dim=-1) - 1).abs().max()) > 1e-3  # the rows did move off the unit sphere
    z = torch.randn(5, head.shape[1]) * 3  # not normalised either
    text = torch.randn(3, head.shape[1])
    cos = (z @ head.T) / (z.norm(dim=-1)[:, None] * head.norm(dim=-1)[None, :])
    clip = tiny_model.logit_scale() * z @ text.T
    expected = clip + 30.0 * cos
    with torch.no_grad():
        assert torch.allclose(method.logits(z, text, "A", trained=True), expected, atol=1e-4)
        assert torch.allclose(method.train_logits(z, text, ctx), expected, atol=1e-4)
        spans = [ClassSpan("A", 0, 3), ClassSpan("B", 3, 5)]
        text5 = torch.randn(5, head.shape[1])
        union = method.logits_union(z, text5, spans, trained=1)
        clip5 = tiny_model.logit_scale() * z @ text5.T
        assert torch.allclose(union[:, :3], clip5[:, :3] + 30.0 * cos, atol=1e-4)
        assert torch.allclose(union[:, 3:], clip5[:, 3:], atol=1e-5)


def test_keeplora_pp_default_scales_both_towers(tiny_model: ClipModel) -> None:
    """Defaults (γ = 0.2, text scaled too): with 4 layers s_l = 0.2, 0.4667, 0.7333, 1.0 in both towers, times
    α/r = 1/8; the merged update carries the same factor (merge equals the adapted forward)."""
    method = _method(tiny_model, "keeplora++")
    method.setup()
    method.before_task(_ctx(_task("A")))
    factors = [0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0]
    seen = set()
    for m in method.matrices():
        adapter = m.site.module.adapters[m.proj][ADAPTER]
        assert adapter.scale == pytest.approx(factors[m.site.layer] / 8), m.name
        seen.add(m.site.encoder)
    assert seen == {"vision", "text"}
