"""MoE-Adapters: hand-derived router, load-balancing, activate-freeze, DDAS and evaluation checks, through the hooks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import ClassSpan, Task
from clbench.engine.harness import Hooks as HarnessHooks
from clbench.engine.harness import make_loader_factory, train_task
from clbench.errors import UserError
from clbench.methods import get_method
from clbench.methods.base import TaskContext
from clbench.methods.moe_adapters import (
    ZERO_SHOT,
    AutoEncoder,
    cv_squared,
    ddas_select,
    epoch_batches,
    noisy_top_k_gating,
    prob_in_top_k,
)

E = math.e


def build(model, **overrides):
    cls = get_method("moe-adapters")
    method = cls(model, cls.Hparams(**overrides), Profiler())
    method.setup()
    return method


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_image(model, x):
    """The frozen CLIP, with no hook involved: open_clip's own encoder, normalised."""
    return F.normalize(model.clip.encode_image(x), dim=-1)


def plain_text(model, prompts):
    """The frozen text tower (ClipModel's context-cut encoder; no route is set, so no hook adds anything)."""
    return model.encode_text(model.tokenize(prompts))


def give_experts_outputs(method, seed: int = 1) -> None:
    """Non-zero experts (random up-projections), so the MoE path differs from zero-shot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pool in method.pools.values():
            for p in pool.up_w:
                p.copy_(torch.randn(p.shape, generator=gen))
            for p in pool.up_b:
                p.copy_(torch.randn(p.shape, generator=gen))


# ---- router ---------------------------------------------------------------------------------------------
C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
W_GATE = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 1.0, 2.0]])  # logits rows: [3,1,2,0], [0,0,1,2]


def test_top1_gating_puts_all_weight_on_the_largest_logit() -> None:
    g = noisy_top_k_gating(C, W_GATE, torch.zeros(2, 4), k=1, train=False)
    assert torch.equal(g.gates, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert g.indices.tolist() == [[0], [3]]


def test_top2_gating_renormalises_over_the_two_selected_logits() -> None:
    g = noisy_top_k_gating(C, W_GATE, torch.zeros(2, 4), k=2, train=False)
    big, small = E / (E + 1), 1 / (E + 1)  # softmax([a, a-1])
    expected = torch.tensor([[big, 0, small, 0], [0, 0, small, big]])
    assert torch.allclose(g.gates, expected, atol=1e-6)
    assert torch.allclose(g.gates.sum(1), torch.ones(2))
    assert g.load.tolist() == [1, 0, 2, 1]  # without noise: how many samples picked each expert


def test_noise_only_in_training() -> None:
    torch.manual_seed(0)
    w_noise = torch.zeros(2, 4)
    for _ in range(5):  # evaluation: the clean logits, whatever the generator draws
        assert noisy_top_k_gating(C, W_GATE, w_noise, k=1, train=False).indices.tolist() == [[0], [3]]
    picks = {int(noisy_top_k_gating(C, torch.zeros(2, 4), w_noise, k=1, train=True).indices[0, 0])
             for _ in range(40)}
    assert len(picks) > 1  # std softplus(0) + 0.01 = 0.70 spreads the picks


def test_prob_in_top_k_by_hand() -> None:
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.5, 0.2, -2.0]])
    top, _ = noisy.topk(2, dim=1)  # k + 1 = 2 values: 1.5, 0.2
    prob = prob_in_top_k(clean, noisy, torch.ones(1, 3), top, k=1)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    # expert 0 is in: compared with the (k+1)-th value 0.2; the others are out: with the k-th value 1.5
    assert torch.allclose(prob, torch.tensor([[phi(0.8), phi(-1.5), phi(-2.5)]]), atol=1e-6)


def test_cv_squared_and_balance_term_by_hand() -> None:
    g = noisy_top_k_gating(C, W_GATE, torch.zeros(2, 4), k=2, train=False)
    big, small = E / (E + 1), 1 / (E + 1)
    importance = [big, 0.0, 2 * small, big]
    mean = sum(importance) / 4
    cv_imp = sum((v - mean) ** 2 for v in importance) / 3 / mean**2
    cv_load = (0 + 1 + 1 + 0) / 3 / 1.0  # load [1, 0, 2, 1]: mean 1
    assert float(cv_squared(g.gates.sum(0))) == pytest.approx(cv_imp, rel=1e-5)
    assert float(cv_squared(g.load)) == pytest.approx(cv_load, rel=1e-6)
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0


def test_loss_adds_the_weighted_balance_term_of_every_block(tiny_model) -> None:
    """Through ``loss``: spy on each block's gating, re-derive CV²(importance)+CV²(load) by hand."""
    method = build(tiny_model, balance_weight=0.5, noisy_gating=False, dropout=0.0)
    ctx = _context(_task("A", 3), 0)
    method.before_task(ctx)
    give_experts_outputs(method)
    seen = []
    for pool in method.pools.values():
        original = pool.route

        def spy(c, task, train, original=original):
            out = original(c, task, train)
            seen.append(out)
            return out
        pool.route = spy
    with torch.no_grad():
        for pool in method.pools.values():
            for t in list(pool.gate):
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    tiny_model.train()
    weighted = float(method.loss(x, y, ctx).detach())

    def term(g):
        imp, load = g.gates.sum(0), g.load
        return float(imp.var() / imp.mean() ** 2 + load.var() / load.mean() ** 2)
    assert len(seen) == 8  # one gating per block: 4 vision + 4 text
    extra = 0.5 * sum(term(g) for g in seen)
    assert extra > 0
    method.hparams.balance_weight = 0.0
    plain = float(method.loss(x, y, ctx))  # no noise, no dropout: the same forward without the term
    assert weighted - plain == pytest.approx(extra, rel=1e-4)


# ---- the adapted model ------------------------------------------------------------------------------------
def test_zero_initialised_experts_leave_clip_unchanged(tiny_model) -> None:
    method = build(tiny_model)
    method.before_task(_context(_task("A", 3), 0))
    x = images(3)
    prompts = ["a photo of a red circle.", "a photo of a blue square."]
    for mode in (True, False):  # dropout active in training mode still multiplies a zero up-projection
        tiny_model.train(mode)
        with torch.no_grad():
            assert torch.equal(method.encode_image(x, 0), plain_image(tiny_model, x))
            assert torch.equal(method.encode_text(tiny_model.tokenize(prompts), 0), plain_text(tiny_model, prompts))
    give_experts_outputs(method)
    tiny_model.eval()
    with torch.no_grad():
        assert not torch.allclose(method.encode_image(x, 0), plain_image(tiny_model, x), atol=1e-4)
        assert torch.equal(method.encode_image(x, ZERO_SHOT), plain_image(tiny_model, x))  # zero-shot route


def test_block_adds_scaled_gated_experts_to_its_output(tiny_model) -> None:
    """One block by hand: output = CLIP block output + 0.1·Σ_j w_j E_j(x), with x the residual stream after
    attention, the top-2 weights a softmax over the two largest router logits of the first token."""
    method = build(tiny_model, encoders="vision")
    method.before_task(_context(_task("A", 3), 0))
    give_experts_outputs(method)
    pool = method.pools["vision_0"]
    with torch.no_grad():
        pool.gate[0].copy_(torch.randn(pool.gate[0].shape, generator=torch.Generator().manual_seed(5)))
    block = tiny_model.clip.visual.transformer.resblocks[0]
    tokens = torch.randn(2, 17, 128, generator=torch.Generator().manual_seed(6))
    tiny_model.eval()
    with torch.no_grad():
        plain = block(tokens)
        x_mid = tokens + block.attention(block.ln_1(tokens))
        method.route = 0
        adapted = block(tokens)
        method.route = ZERO_SHOT
        expected = plain.clone()
        for b in range(2):
            logits = x_mid[b, 0] @ pool.gate[0]
            top = torch.topk(logits, 2)
            w = torch.exp(top.values) / torch.exp(top.values).sum()
            for weight, i in zip(w, top.indices.tolist(), strict=True):
                hidden = torch.relu(x_mid[b] @ pool.down_w[i].T + pool.down_b[i])
                expected[b] += 0.1 * weight * (hidden @ pool.up_w[i].T + pool.up_b[i])
    assert torch.allclose(adapted, expected, atol=1e-4)


def test_an_expert_no_sample_chose_gets_no_gradient_and_adamw_leaves_it(tiny_model) -> None:
    """Through ``loss`` and the harness's step (``zero_grad(set_to_none=True)``, AdamW): with every sample routed
    to experts {0, 2}, expert 0's gradient is the sum over the samples that chose it (the hand-written dense
    re-derivation below), experts 1 and 3 get no gradient, and a step moves expert 2 but leaves expert 3, which
    a previous step did move (non-zero Adam moments), bit for bit as it is: the official code drops the outputs
    of experts without a sample, so AdamW skips them."""
    from clbench.methods.moe_adapters import Gating

    method = build(tiny_model, experts=4, encoders="vision", dropout=0.0)
    ctx = _context(_task("A", 3), 0)
    method.before_task(ctx)
    give_experts_outputs(method)
    tiny_model.requires_grad_(False)
    pools = list(method.pools.values())
    chosen = [[0, 2]]

    def fixed_route(pool):
        def route(c, task, train):
            k = len(chosen[0])
            indices = torch.tensor(chosen[0]).expand(len(c), k)
            weights = torch.tensor([0.75, 0.25][:k]).expand(len(c), k)
            gates = torch.zeros(len(c), 4).scatter(1, indices, weights)
            return Gating(gates, indices, weights, (gates > 0).sum(0).float())
        return route

    for pool in pools:
        pool.route = fixed_route(pool)
    params = [p for pool in pools for i in range(4) for p in pool.expert_parameters(i)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    x, y = images(4), torch.arange(4) % 3
    tiny_model.train()

    # the first block's expert-0 gradient, re-derived with the experts written out densely (no selection code)
    captured = {}
    first = next(iter(method.blocks()))[1]
    handle = first.ln_2.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    opt.zero_grad(set_to_none=True)
    method.loss(x, y, ctx).backward()
    handle.remove()
    pool = pools[0]
    assert all(p.grad is None for i in (1, 3) for p in pool.expert_parameters(i))
    assert all(p.grad is not None for i in (0, 2) for p in pool.expert_parameters(i))
    opt.step()

    chosen[0] = [0, 3]  # now expert 3 gets moments; then a step without it
    opt.zero_grad(set_to_none=True)
    method.loss(x, y, ctx).backward()
    opt.step()
    chosen[0] = [0, 2]
    before = {i: [p.detach().clone() for p in pool.expert_parameters(i)] for i in (2, 3)}
    opt.zero_grad(set_to_none=True)
    method.loss(x, y, ctx).backward()
    assert all(p.grad is None for p in pool.expert_parameters(3))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(pool.expert_parameters(3), before[3], strict=True))
    assert any(not torch.equal(p, b) for p, b in zip(pool.expert_parameters(2), before[2], strict=True))

    # dense re-derivation on the captured block input: out = 0.1·Σ_e g_e·(up_e relu(down_e x + b) + b_up)
    xin = captured["x"]
    down_0 = pool.down_w[0].detach().clone().requires_grad_(True)
    down = {0: down_0, 2: pool.down_w[2].detach()}
    gates = {0: 0.75, 2: 0.25}
    out = sum(0.1 * gates[e] * (torch.relu(xin @ down[e].T + pool.down_b[e].detach()) @ pool.up_w[e].detach().T
                                + pool.up_b[e].detach()) for e in (0, 2))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    got = pool.experts_output(xin, fixed_route(pool)(xin[:, 0], 0, False), False)
    pool.down_w[0].grad = None
    (got * g).sum().backward()
    assert torch.allclose(pool.down_w[0].grad, down_0.grad, atol=1e-5)


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_expert_gradients_are_the_same_bits_on_every_run_with_two_threads(tiny_model, two_threads) -> None:
    """Through ``loss``: the same batch and seed give the same expert and router gradients bit for bit with two
    CPU threads (torch's backward of ``W[idx]`` adds with atomics across threads in a varying order, so runs and
    a resumed run drifted apart at float rounding; see :func:`select_experts`)."""
    method = build(tiny_model, experts=4, encoders="vision")
    ctx = _context(_task("A", 3), 0)
    method.before_task(ctx)
    give_experts_outputs(method)
    params = method.trainable_parameters()  # the router and every expert (none frozen yet)
    tiny_model.requires_grad_(False)  # as the harness trains: CLIP frozen
    x, y = images(8), torch.arange(8) % 3  # 8·2·64·128 gathered weights: enough for torch to add on two threads
    tiny_model.train()
    grads = []
    for _ in range(3):
        torch.manual_seed(0)  # the same router noise and dropout masks every time
        for p in params:
            p.grad = None
        method.loss(x, y, ctx).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in params])
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# ---- activate-freeze ----------------------------------------------------------------------------------
def _task(name: str, classes: int, n: int = 24, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.arange(n) % classes
    data = torch.utils.data.TensorDataset(x, y)
    return Task(name, [f"thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


TRAIN = TrainConfig(epochs=[1], batch_size=8, lr=5e-2, weight_decay=0.0, max_steps=3, eval_batch_size=64)


def _context(task: Task, index: int) -> TaskContext:
    factory = make_loader_factory(TRAIN, torch.device("cpu"), seed=0)
    factory.start_task(index)
    return TaskContext(index, task, 2, torch.device("cpu"), factory, 3,
                       prompts=[task.templates[0].format(c) for c in task.classnames])


def test_most_activated_experts_are_frozen_and_stay_frozen(tiny_model) -> None:
    method = build(tiny_model, experts=5, ddas_iterations=2)
    first = _context(_task("A", 3), 0)
    method.before_task(first)
    train_task(method, first, TRAIN, HarnessHooks(), "fp32")
    pool = method.pools["vision_1"]
    with torch.no_grad():  # hand-set activation counts of task 0: experts 3 and 1 are the two most used
        pool.counts[0] = torch.tensor([4.0, 9.0, 0.0, 12.0, 5.0])
    method.after_task(first)
    assert pool.frozen.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    before = {i: [p.detach().clone() for p in pool.expert_parameters(i)] for i in range(5)}
    second = _context(_task("B", 3, seed=1), 1)
    method.before_task(second)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert all(id(p) not in trainable for i in (1, 3) for p in pool.expert_parameters(i))
    assert id(pool.gate[1]) in trainable and id(pool.gate[0]) not in trainable
    train_task(method, second, TRAIN, HarnessHooks(), "fp32")
    for i in (1, 3):
        assert all(torch.equal(a, b) for a, b in zip(before[i], pool.expert_parameters(i), strict=True))
    moved = [i for i in (0, 2, 4) if not all(torch.equal(a, b) for a, b in
                                             zip(before[i], pool.expert_parameters(i), strict=True))]
    assert moved, "no unfrozen expert trained: the check above would pass vacuously"
    assert float(pool.counts[1].sum()) > 0  # task 1's activations are counted in its own row


# ---- DDAS -----------------------------------------------------------------------------------------------
def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _constant_autoencoder(output: torch.Tensor) -> AutoEncoder:
    """An autoencoder whose reconstruction is ``output`` whatever its input (zero weights, decoder bias logit)."""
    ae = AutoEncoder(output.numel(), 100)
    with torch.no_grad():
        for layer in (ae.encoder, ae.decoder):
            layer.weight.zero_()
            layer.bias.zero_()
        ae.decoder.bias.copy_(_logit(output))
    return ae.eval().requires_grad_(False)


def _two_task_method(tiny_model, thresholds):
    method = build(tiny_model)
    for pool in method.pools.values():
        pool.add_router()
        pool.add_router()
    method.tasks = ["A", "B"]
    give_experts_outputs(method)
    x = images(3)
    d = tiny_model.clip.visual.output_dim
    target = torch.sigmoid(plain_image(tiny_model, x).detach() * math.sqrt(d))  # σ(√D f), by hand
    method.autoencoders.append(_constant_autoencoder(torch.full((d,), 0.5)))  # task A: reconstructs 0.5
    method.autoencoders.append(_constant_autoencoder(target[0]))               # task B: image 0 exactly
    method.thresholds = list(thresholds)
    return method, x, target


def test_ddas_routes_to_the_best_autoencoder_or_to_zero_shot(tiny_model) -> None:
    tiny_model.eval()
    probe, _, target = _two_task_method(tiny_model, [1.0, 1.0])
    e_a = (target - 0.5).square().mean(-1)
    e_b = (target - target[0]).square().mean(-1)
    best = torch.where(e_b < e_a, 1, 0)
    assert best[0] == 1  # e_B(image 0) = 0
    with torch.no_grad():
        assert probe.routes_for(images(3)).tolist() == best.tolist()  # loose thresholds: the argmin
    # thresholds between the errors: image 0 (error 0) stays on B; the others exceed their task's threshold
    worst_kept = float(torch.stack([e_a, e_b], -1).min(-1).values[1:].min())
    method, x, _ = _two_task_method(tiny_model, [worst_kept / 2, worst_kept / 2])
    with torch.no_grad():
        routes = method.routes_for(x)
        assert routes.tolist() == [1, ZERO_SHOT, ZERO_SHOT]
        feats = method.eval_image_features(x, "A")
        assert torch.equal(feats[1:], plain_image(tiny_model, x[1:]))           # zero-shot CLIP
        assert torch.allclose(feats[:1], method.encode_image(x[:1], 1), atol=1e-6)  # router of task B
        assert not torch.allclose(feats[:1], plain_image(tiny_model, x[:1]), atol=1e-4)


def test_ddas_training_learns_the_task_and_sets_a_quantile_threshold(tiny_model) -> None:
    method = build(tiny_model, ddas_iterations=60, threshold_quantile=0.5)
    ctx = _context(_task("A", 3), 0)
    method.before_task(ctx)
    method.after_task(ctx)
    ae = method.autoencoders[0]
    data = ctx.task.train.tensors[0]
    with torch.no_grad():
        x = torch.sigmoid(plain_image(tiny_model, data) * math.sqrt(tiny_model.clip.visual.output_dim))
        errors = (ae(x) - x).square().mean(-1)
        untrained = AutoEncoder(x.shape[1], 100, torch.Generator().manual_seed(7_919))
        assert float(errors.mean()) < float((untrained(x) - x).square().mean())
    ranked = sorted(errors.double().tolist())  # 24 errors: the 0.5 quantile lies halfway between ranks 11 and 12
    assert method.thresholds[0] == pytest.approx((ranked[11] + ranked[12]) / 2, rel=1e-4)
    fixed = build(tiny_model, ddas_iterations=2, threshold=0.25)
    fixed.before_task(ctx)
    fixed.after_task(ctx)
    assert fixed.thresholds == [0.25]


# ---- evaluation under both rules -------------------------------------------------------------------------
def test_logits_use_the_text_of_each_images_route_under_both_rules(tiny_model) -> None:
    tiny_model.eval()
    method, x, _ = _two_task_method(tiny_model, [0.0, 1e-12])  # image 0 → task B, images 1, 2 → zero-shot
    prompts_a = [["a photo of a red circle."], ["a photo of a blue square."]]
    prompts_b = [["a photo of a green star."], ["a photo of a big dot."], ["a photo of a line."]]
    with torch.no_grad():
        text_a = method.eval_text_features(prompts_a, "A")
        text_b = method.eval_text_features(prompts_b, "B")
        assert text_a.shape == (3, 2, tiny_model.clip.visual.output_dim)  # zero-shot, router A, router B
        flat_a = [p[0] for p in prompts_a]
        assert torch.allclose(text_a[0], plain_text(tiny_model, flat_a), atol=1e-6)
        assert torch.allclose(text_a[2], method.encode_text(tiny_model.tokenize(flat_a), 1), atol=1e-6)
        feats = method.eval_image_features(x, "A")
        scale = tiny_model.logit_scale()
        task_logits = method.logits(feats, text_a, "A", trained=True)
        zs = scale * plain_image(tiny_model, x) @ plain_text(tiny_model, flat_a).T
        routed = scale * method.encode_image(x[:1], 1) @ method.encode_text(tiny_model.tokenize(flat_a), 1).T
        assert torch.allclose(task_logits[1:], zs[1:], atol=1e-4)
        assert torch.allclose(task_logits[:1], routed, atol=1e-4)
        # union: both datasets' classes, concatenated along the class axis as the harness does
        union_text = torch.cat([text_a, text_b], dim=-2)
        method.eval_image_features(x, None)
        union = method.logits_union(feats, union_text, [ClassSpan("A", 0, 2), ClassSpan("B", 2, 5)], trained=2)
        flat_b = [p[0] for p in prompts_b]
        zs_all = scale * plain_image(tiny_model, x) @ plain_text(tiny_model, flat_a + flat_b).T
        routed_all = scale * method.encode_image(x[:1], 1) @ method.encode_text(
            tiny_model.tokenize(flat_a + flat_b), 1).T
        assert union.shape == (3, 5)
        assert torch.allclose(union[1:], zs_all[1:], atol=1e-4)
        assert torch.allclose(union[:1], routed_all, atol=1e-4)


def test_before_any_task_everything_is_zero_shot(tiny_model) -> None:
    tiny_model.eval()
    method = build(tiny_model)
    x = images(2)
    with torch.no_grad():
        text = method.eval_text_features([["a photo of a red circle."], ["a photo of a dot."]], "A")
        assert text.shape[0] == 1
        logits = method.logits(method.eval_image_features(x, "A"), text, "A", trained=False)
        expected = tiny_model.logit_scale() * plain_image(tiny_model, x) @ text[0].T
    assert torch.allclose(logits, expected, atol=1e-5)


def test_state_round_trip_restores_routing(tiny_model) -> None:
    import copy

    tiny_model.eval()
    method, x, _ = _two_task_method(tiny_model, [0.0, 1e-12])
    state, extra = method.state_dict(), method.extra_state()
    fresh = build(copy.deepcopy(tiny_model))
    fresh.model.eval()
    fresh.check_state(state, extra, [_task("A", 2), _task("B", 2)])
    fresh.load_state_dict(state)
    fresh.load_extra_state(extra)
    with torch.no_grad():
        assert torch.equal(fresh.routes_for(x), method.routes_for(x))
        assert torch.allclose(fresh.eval_image_features(x, "A"), method.eval_image_features(x, "A"), atol=1e-6)
    assert fresh.state_bytes() == method.state_bytes() and fresh.state_bytes()["experts"] > 0


@pytest.mark.parametrize("rule", ["task", "union"])
def test_harness_rows_under_both_rules_start_at_zero_shot(tiny_model, rule: str) -> None:
    """Through the harness: before any task DDAS has nothing to route to, so the zero-shot row is exactly the
    zeroshot method's; after training each row is defined for every dataset (recall too, under union)."""
    import copy

    from clbench.datasets.synthetic import build_synthetic
    from clbench.engine.harness import run_sequence

    bench = build_synthetic(1, tiny_model.image_spec, train_per_class=2, test_per_class=2, num_tasks=2)
    train = TrainConfig(epochs=[1], batch_size=8, lr=1e-2, max_steps=2, eval_batch_size=16)
    zs_cls = get_method("zeroshot")
    reference = run_sequence(zs_cls(copy.deepcopy(tiny_model), zs_cls.Hparams(), Profiler()), bench, train,
                             Profiler(), torch.device("cpu"), seed=0, eval_rule=rule)
    method = build(copy.deepcopy(tiny_model), ddas_iterations=5)
    result = run_sequence(method, bench, train, method.profiler, torch.device("cpu"), seed=0, eval_rule=rule)
    assert result.zeroshot == reference.zeroshot
    assert len(result.rows) == 2 and all(len(r) == 2 for r in result.rows)
    if rule == "union":
        assert result.zeroshot_recall == reference.zeroshot_recall and len(result.recall_rows) == 2
    sections = {r.section for r in method.profiler.records}
    assert {"ddas", "router", "ddas_train"} <= sections


# ---- the reference autoencoder (reference_autoencoder=true: the official code's TinyImageNet autochooser) ---------
def test_ddas_select_with_a_reference_by_hand() -> None:
    """Hand-made errors: a task route needs a task error strictly below the reference's (the code starts its
    argmin at the reference autoencoder and replaces it only by a smaller error) and within its threshold."""
    errors = torch.tensor([[0.2, 0.1], [0.2, 0.1], [0.3, 0.3], [0.05, 0.4], [0.2, 0.18]])
    thresholds = torch.tensor([0.5, 0.15])
    reference = torch.tensor([0.3, 0.1, 0.4, 0.05, 0.9])
    # row 0: task 1 (0.1 < 0.3, 0.1 <= 0.15); row 1: a tie with the reference -> zero-shot; row 2: tasks tie, the
    # earlier wins (0.3 < 0.4, 0.3 <= 0.5); row 3: tie with the reference -> zero-shot; row 4: task 1 beats the
    # reference but exceeds its threshold 0.15 -> zero-shot
    assert ddas_select(errors, thresholds, reference).tolist() == [1, ZERO_SHOT, 0, ZERO_SHOT, ZERO_SHOT]
    assert ddas_select(errors, thresholds).tolist() == [1, 1, 0, 0, ZERO_SHOT]  # no reference: the threshold alone
    assert ddas_select(errors[:, :0], thresholds[:0], reference).tolist() == [ZERO_SHOT] * 5


def test_reference_autoencoder_sends_its_images_to_zero_shot(tiny_model) -> None:
    """Through eval_image_features and logits: the reference autoencoder reconstructs image 1 exactly, so image 1
    goes to zero-shot although both task errors are under their (loose) thresholds; image 0 stays on task B."""
    tiny_model.eval()
    method, x, target = _two_task_method(tiny_model, [1.0, 1.0])
    e_a = (target - 0.5).square().mean(-1)
    e_b = (target - target[0]).square().mean(-1)
    e_ref = (target - target[1]).square().mean(-1)
    assert float(torch.minimum(e_a, e_b)[1]) > 0 and float(torch.minimum(e_a, e_b).max()) < 1.0
    with torch.no_grad():
        without = method.routes_for(x).tolist()
        assert without[1] != ZERO_SHOT  # without the reference, image 1 is routed to a task
        method.reference_ae = _constant_autoencoder(target[1])
        task_min, task_arg = torch.stack([e_a, e_b], -1).min(-1)
        expected = [int(a) if float(m) < float(r) else ZERO_SHOT for m, a, r in zip(task_min, task_arg, e_ref,
                                                                                  strict=True)]
        assert expected[:2] == [1, ZERO_SHOT]
        assert method.routes_for(x).tolist() == expected
        feats = method.eval_image_features(x, "A")
        assert torch.equal(feats[1], plain_image(tiny_model, x[1:2])[0])  # the frozen CLIP
        assert torch.allclose(feats[:1], method.encode_image(x[:1], 1), atol=1e-6)
        text = method.eval_text_features([["a photo of a red circle."], ["a photo of a dot."]], "A")
        logits = method.logits(feats, text, "A", trained=True)
        assert torch.allclose(logits[1], tiny_model.logit_scale() * feats[1] @ text[0].T, atol=1e-5)


def test_a_tie_with_the_reference_goes_to_zero_shot(tiny_model) -> None:
    """The reference autoencoder equal to task B's: every image ties with B, so only a strictly smaller task A
    error keeps a task route (image 0, reconstructed exactly by B and the reference, goes to zero-shot)."""
    tiny_model.eval()
    method, x, target = _two_task_method(tiny_model, [1.0, 1.0])
    method.reference_ae = _constant_autoencoder(target[0])
    e_a = (target - 0.5).square().mean(-1)
    e_b = (target - target[0]).square().mean(-1)
    expected = [0 if float(a) < float(b) else ZERO_SHOT for a, b in zip(e_a, e_b, strict=True)]
    assert expected[0] == ZERO_SHOT
    with torch.no_grad():
        assert method.routes_for(x).tolist() == expected


def test_epoch_batches_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = epoch_batches(5, 2, 7, gen)  # 3 batches an epoch: 2, 2, 1
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1, 2]
    for start in (0, 3):
        assert sorted(torch.cat(batches[start : start + 3]).tolist()) == [0, 1, 2, 3, 4]
    redo = torch.Generator().manual_seed(0)
    first, second = torch.randperm(5, generator=redo), torch.randperm(5, generator=redo)
    assert torch.equal(torch.cat(batches[:3]), first) and torch.equal(torch.cat(batches[3:6]), second)


def test_reference_autoencoder_trains_once_on_the_reference_images(tiny_model) -> None:
    """After the first task only (it is not a task's), on σ(√D f) of the embedded reference images (held-out
    pretraining-corpus images, as ZSCL's), in its own profiled section; off by default."""
    from clbench.methods.zscl import EMBEDDED_REF_SEED, embedded_reference

    method = build(tiny_model, reference_autoencoder=True, reference_iterations=60, ref_image_count=40,
                   ddas_iterations=2)
    first = _context(_task("A", 3), 0)
    method.before_task(first)
    assert method.reference_ae is None
    method.after_task(first)
    ref = method.reference_ae
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    pixels, _ = embedded_reference(tiny_model, 40, 1, EMBEDDED_REF_SEED)
    d = tiny_model.clip.visual.output_dim
    with torch.no_grad():
        x = torch.sigmoid(plain_image(tiny_model, pixels) * math.sqrt(d))
        untrained = AutoEncoder(d, 100, torch.Generator().manual_seed(1))
        assert float(ref.errors(x).mean()) < 0.5 * float(untrained.errors(x).mean())
    weights = [p.clone() for p in ref.parameters()]
    second = _context(_task("B", 3, seed=1), 1)
    method.before_task(second)
    method.after_task(second)
    assert method.reference_ae is ref and all(torch.equal(a, b) for a, b in zip(weights, ref.parameters(),
                                                                                strict=True))
    assert len(method.autoencoders) == 2
    assert [r.calls for r in method.profiler.records if r.section == "ddas_reference"] == [1]
    plain = build(tiny_model, ddas_iterations=2)
    plain.before_task(first)
    plain.after_task(first)
    assert plain.reference_ae is None and not any(k.startswith("reference/") for k in plain.state_dict())
    assert not any(r.section == "ddas_reference" for r in plain.profiler.records)


def test_reference_training_encodes_only_the_images_its_steps_visit(tiny_model) -> None:
    """3 steps of 8 over 100 reference images: 24 images are encoded, once each."""
    method = build(tiny_model, reference_autoencoder=True, reference_iterations=3, ref_image_count=100)
    seen = []
    original = method.frozen_features

    def spy(images):
        seen.append(len(images))
        return original(images)
    method.frozen_features = spy
    method.train_reference_autoencoder(torch.device("cpu"), 8)
    assert sum(seen) == 24


def test_reference_autoencoder_reads_an_image_folder(tiny_model, tmp_path) -> None:
    """``ref_images``: an ImageFolder root (TinyImageNet train on MTIL), read with the backbone's test transform."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("n01", "n02"):
        folder = tmp_path / "train" / cls / "images"
        folder.mkdir(parents=True)
        for i in range(5):
            pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG")
    method = build(tiny_model, reference_autoencoder=True, reference_iterations=4, ref_workers=0,
                   ref_images=str(tmp_path / "train"))
    assert len(method._ref_data) == 10
    method.train_reference_autoencoder(torch.device("cpu"), 4)
    assert method.reference_ae is not None
    from clbench.datasets.mtil import clip_transform
    image = clip_transform(tiny_model.image_spec)(Image.open(tmp_path / "train" / "n01" / "images" / "n01_0.JPEG")
                                                  .convert("RGB"))
    assert torch.equal(method._ref_data[0][0], image)


def test_reference_options_are_checked(tiny_model, tmp_path) -> None:
    cls = get_method("moe-adapters")
    on_mtil = cls(tiny_model, cls.Hparams(reference_autoencoder=True), Profiler())
    on_mtil.benchmark = "mtil"
    with pytest.raises(UserError, match=r"moe-adapters\.ref_images=IMAGEFOLDER \(TinyImageNet train"):
        on_mtil.validate()
    on_mtil.hparams.ref_images = str(tmp_path / "missing")
    with pytest.raises(UserError, match="is not a folder"):
        on_mtil.validate()
    unused = cls(tiny_model, cls.Hparams(ref_images=str(tmp_path)), Profiler())
    with pytest.raises(UserError, match="no effect without the reference autoencoder"):
        unused.validate()
    cls(tiny_model, cls.Hparams(reference_autoencoder=True), Profiler()).validate()  # embedded: its own images
    off = cls(tiny_model, cls.Hparams(), Profiler())
    off.benchmark = "mtil"
    off.validate()


def test_a_missing_reference_folder_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    from clbench.cli.app import main

    out = tmp_path / "out"
    code = main(["run", "--methods", "moe-adapters", "--out", str(out), "--preset", "smoke", "--pretrained", "none",
                 "--quiet", "--set", "moe-adapters.reference_autoencoder=true",
                 "--set", "moe-adapters.ref_images=/nonexistent/tiny-imagenet-200/train"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "moe-adapters.ref_images=/nonexistent/tiny-imagenet-200/train is not a folder" in err[0]
    assert not out.exists() or not any(out.rglob("*.csv"))


def test_state_round_trip_includes_the_reference_autoencoder(tiny_model) -> None:
    import copy

    tiny_model.eval()
    method, x, target = _two_task_method(tiny_model, [1.0, 1.0])
    method.hparams.reference_autoencoder = True
    method.reference_ae = _constant_autoencoder(target[1])
    state, extra = method.state_dict(), method.extra_state()
    d = tiny_model.clip.visual.output_dim
    assert state["reference/enc_w"].shape == (100, d) and state["reference/dec_b"].shape == (d,)
    fresh = build(copy.deepcopy(tiny_model), reference_autoencoder=True)
    fresh.model.eval()
    done = [_task("A", 2), _task("B", 2)]
    fresh.check_state(state, extra, done)
    fresh.load_state_dict(state)
    fresh.load_extra_state(extra)
    with torch.no_grad():
        assert fresh.routes_for(x).tolist() == method.routes_for(x).tolist()
        assert fresh.routes_for(x).tolist()[1] == ZERO_SHOT  # the restored reference autoencoder decides it
        assert torch.equal(fresh.reference_ae.errors(target), method.reference_ae.errors(target))
    assert fresh.state_bytes() == method.state_bytes()
    assert method.state_bytes()["reference_autoencoder"] == 4 * (100 * d + 100 + d * 100 + d)
    from clbench.methods.state_checks import StateMismatch

    missing = {k: v for k, v in state.items() if not k.startswith("reference/")}
    with pytest.raises(StateMismatch):
        fresh.check_state(missing, extra, done)
    off = build(copy.deepcopy(tiny_model))
    with pytest.raises(StateMismatch):
        off.check_state(state, extra, done)  # a reference autoencoder this run does not have
    off.check_state(missing, extra, done)


@pytest.mark.slow  # builds the fake MTIL tree (about 20 s on a loaded 2-core machine)
def test_paper_preset_on_mtil_needs_the_reference_folder(tmp_path, capsys, monkeypatch) -> None:
    """``--preset paper`` turns the reference autoencoder on (the official scripts train it), so an MTIL run
    without ``ref_images`` stops with one line naming the option, before anything is written."""
    from fake_mtil import build_fake_mtil

    from clbench.cli.app import main

    monkeypatch.delenv("CLBENCH_DATA_ROOT", raising=False)
    tree = build_fake_mtil(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["run", "--methods", "moe-adapters", "--out", str(out), "--preset", "paper", "--pretrained", "none",
                 "--quiet", "--benchmark", "mtil", "--data-root", str(tree.root), "--allow-incomplete", "--backbone",
                 "tiny"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert "moe-adapters.reference_autoencoder on mtil needs reference images" in err[0]
    assert "moe-adapters.ref_images=IMAGEFOLDER" in err[0] and not out.exists()



def _train_two_tasks(model, seed: int, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    method = build(copy.deepcopy(model), experts=4, ddas_iterations=3, **overrides)
    for index, task in enumerate((_task("A", 3), _task("B", 3, seed=1))):
        ctx = _context(task, index)
        method.before_task(ctx)
        train_task(method, ctx, TRAIN, HarnessHooks(), "fp32")
        method.after_task(ctx)
    return {k: v for k, v in method.state_dict().items() if not k.startswith("reference/")}


def test_the_reference_autoencoder_changes_routing_only_never_training(tiny_model) -> None:
    """Its images, their features and its own initialisation draw from generators of their own and leave torch's
    global random stream where it was: with the option on, every trained tensor (experts, routers, task
    autoencoders, thresholds) has the bits of the run without it."""
    off = _train_two_tasks(tiny_model, 3)
    on = _train_two_tasks(tiny_model, 3, reference_autoencoder=True, reference_iterations=5, ref_image_count=16)
    assert off.keys() == on.keys()
    assert [k for k in off if not torch.equal(off[k], on[k])] == []
    other = _train_two_tasks(tiny_model, 4)  # the check can fail: another global seed trains other experts
    assert [k for k in off if not torch.equal(off[k], other[k])]
