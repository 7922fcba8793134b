"""DIKI: the fully residual key/value attention against plain torch, zero-initialised prompts leaving CLIP unchanged,
the Gaussian statistics and log-likelihood by hand, the calibrated weight on the injected branch only, the batch
vote, and evaluation under both rules, through the method's hooks."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from method_probes import ordered_ctx, styled_task
from torch.distributions import MultivariateNormal

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Benchmark, union_spans
from clbench.engine.harness import Hooks, evaluate, evaluate_union, train_task
from clbench.methods.base import Method
from clbench.methods.diki import DIKI, DIKIHparams, Gaussian, gaussian_stats, majority
from clbench.methods.state_checks import StateMismatch
from clbench.models.attention import LoRAAttention

D64 = torch.float64


# ---- the fully residual attention, by hand -------------------------------------------------------------------
def _manual_attention(att: LoRAAttention, x, mask, keys, values, weight):
    """Plain torch: per head, softmax(q kᵀ/√d_h + mask) v + w · softmax(q K_pᵀ/√d_h) V_p, then out_proj."""
    n, length, d = x.shape
    h = att.num_heads
    dh = d // h
    W, b = att.in_proj_weight.detach(), att.in_proj_bias.detach()
    q, k, v = (x @ W[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    out = torch.zeros(n, length, d)
    for s in range(n):
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            qs, ks, vs = q[s][:, cols], k[s][:, cols], v[s][:, cols]
            scores = qs @ ks.T / math.sqrt(dh) + (mask if mask is not None else 0)
            pre = torch.softmax(scores, dim=-1) @ vs
            res = torch.softmax(qs @ keys[:, cols].T / math.sqrt(dh), dim=-1) @ values[:, cols]
            out[s][:, cols] = pre + weight[s] * res
    return out @ att.out_proj.weight.detach().T + att.out_proj.bias.detach()


def _attention(seed: int = 0) -> tuple[LoRAAttention, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    att = LoRAAttention(8, 2)
    with torch.no_grad():
        att.in_proj_bias.normal_()
        att.out_proj.bias.normal_()
    x = torch.randn(3, 4, 8)
    mask = torch.full((4, 4), float("-inf")).triu(1)  # causal, as the text tower
    keys, values = torch.randn(2, 8), torch.randn(2, 8)
    return att, x, mask, keys, values


def test_residual_attention_is_the_papers_formula_in_plain_torch() -> None:
    att, x, mask, keys, values = _attention()
    weight = torch.tensor([1.0, 0.3, 0.0])
    att.set_residual_kv(lambda n: (keys[None], values[None], weight))
    got, _ = att(x, attn_mask=mask)
    assert torch.allclose(got, _manual_attention(att, x, mask, keys, values, weight), atol=1e-5)
    # the prompts sit in their own softmax: a prefix concatenated to the pretrained keys/values gives another result
    concat = torch.zeros_like(got)
    d, dh = 8, 4
    W, b = att.in_proj_weight.detach(), att.in_proj_bias.detach()
    q, k, v = (x @ W[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    for s in range(3):
        for head in range(2):
            cols = slice(head * dh, (head + 1) * dh)
            kk = torch.cat([keys[:, cols], k[s][:, cols]])
            vv = torch.cat([values[:, cols], v[s][:, cols]])
            m = torch.cat([torch.zeros(4, 2), mask], dim=1)
            concat[s][:, cols] = torch.softmax(q[s][:, cols] @ kk.T / math.sqrt(dh) + m, -1) @ vv
    concat = concat @ att.out_proj.weight.detach().T + att.out_proj.bias.detach()
    assert not torch.allclose(got[0], concat[0], atol=1e-3)
    # weight 0 (the third sequence) and a provider returning None are the pretrained attention exactly
    att.set_residual_kv(lambda n: None)
    plain, _ = att(x, attn_mask=mask)
    assert torch.allclose(got[2], plain[2], atol=1e-6)
    att.set_residual_kv(None)
    assert torch.equal(att(x, attn_mask=mask)[0], plain)


# ---- the method on the tiny backbone -------------------------------------------------------------------------
def _method(model, **hp) -> DIKI:
    hparams = DIKIHparams(prompt_length=3, depth_vision=2, depth_text=2, **hp)
    method = DIKI(model, hparams, Profiler())
    method.setup()
    return method


def _learn(method: DIKI, task, index: int, num_tasks: int = 2, values_seed: int | None = None) -> None:
    """before_task (Gaussian + fresh prompts), optionally non-zero values (as if trained), after_task."""
    ctx = ordered_ctx(task, index, num_tasks, steps=0)
    method.before_task(ctx)
    if values_seed is not None:
        gen = torch.Generator().manual_seed(values_seed)
        with torch.no_grad():
            for p in method.trainable_parameters()[1::2]:
                p.copy_(torch.randn(p.shape, generator=gen))
    method.after_task(ctx)


def test_zero_initialised_values_leave_every_output_unchanged(tiny_model) -> None:
    plain = copy.deepcopy(tiny_model)
    method = _method(tiny_model)
    task = styled_task("a", 0)
    ctx = ordered_ctx(task, 0, 2, steps=1)
    method.before_task(ctx)
    images = torch.stack([task.test[i][0] for i in range(5)])
    tokens = tiny_model.tokenize(task.prompts())
    with torch.no_grad():
        # training route (the task's prompt, weight 1): both towers exactly as CLIP before any step
        assert torch.allclose(tiny_model.encode_image(images), plain.encode_image(images), atol=1e-6)
        assert torch.allclose(tiny_model.encode_text(tokens), plain.encode_text(tokens), atol=1e-6)
        labels = torch.tensor([0, 1, 2, 3, 0])
        expected = F.cross_entropy(plain.logit_scale() * plain.encode_image(images)
                                   @ plain.encode_text(tokens).T, labels)
        assert torch.allclose(method.loss(images, labels, ctx), expected, atol=1e-5)
    # the keys are not zero (uniform in [-1, 1]); the values are
    keys, values = method.trainable_parameters()[0::2], method.trainable_parameters()[1::2]
    assert all(0.1 < float(k.detach().abs().max()) <= 1.0 for k in keys)
    assert all(float(v.detach().abs().max()) == 0.0 for v in values)
    assert len(method.trainable_parameters()) == 2 * (2 + 2)
    method.after_task(ctx)
    with torch.no_grad():
        assert torch.allclose(method.eval_image_features(images, "a"), plain.encode_image(images), atol=1e-6)
        text = method.eval_text_features([[p] for p in task.prompts()], "a")
        assert torch.allclose(method.logits(method.eval_image_features(images, "a"), text, "a", True),
                              plain.logit_scale() * plain.encode_image(images) @ plain.encode_text(tokens).T,
                              atol=1e-4)


def test_training_moves_only_the_current_prompts_and_changes_the_output(tiny_model) -> None:
    method = _method(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    a, b = styled_task("a", 0), styled_task("b", 1)
    train = TrainConfig(epochs=[1], batch_size=8, lr=0.5, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                        schedule="constant")
    for index, task in enumerate((a, b)):
        ctx = ordered_ctx(task, index, 2, steps=3, batch_size=8)
        method.before_task(ctx)
        if index == 1:
            first = [p.clone() for site in method.sites() for p in (method.keys[site.name][0],
                                                                     method.values[site.name][0])]
        train_task(method, ctx, train, Hooks(), "fp32")
        method.after_task(ctx)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items()), "CLIP must stay frozen"
    old = [p for site in method.sites() for p in (method.keys[site.name][0], method.values[site.name][0])]
    assert all(torch.equal(x, y) for x, y in zip(first, old, strict=True)), "task 1's prompts moved in task 2"
    assert all(float(method.values[s.name][1].abs().max()) > 0 for s in method.sites())


def test_gaussian_statistics_by_hand_and_through_before_task(tiny_model) -> None:
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mean, cov = gaussian_stats(pts, eps=1e-3)
    assert torch.allclose(mean, torch.tensor([1.0, 1.0]))
    assert torch.allclose(cov, torch.tensor([[4 / 3 + 1e-3, 0.0], [0.0, 4 / 3 + 1e-3]]))
    # before_task: the frozen, prompt-free, normalised image embeddings of the task's training images
    plain = copy.deepcopy(tiny_model)
    method = _method(tiny_model)
    _learn(method, styled_task("a", 0), 0, values_seed=1)
    task = styled_task("b", 1)
    _learn(method, task, 1)  # task a's non-zero prompts must not leak into task b's statistics
    images = torch.stack([task.train[i][0] for i in range(len(task.train))])
    with torch.no_grad():
        feats = plain.encode_image(images).double()
    g = method.gaussians[1]
    assert torch.allclose(g.mean.double(), feats.mean(0), atol=1e-6)
    eye = torch.eye(feats.shape[1], dtype=D64)
    assert torch.allclose(g.covariance.double(), torch.cov(feats.T) + 1e-7 * eye, atol=1e-6)


def _hand_gaussians() -> list[Gaussian]:
    return [Gaussian(torch.tensor([0.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 4.0]])),
            Gaussian(torch.tensor([3.0, 0.0]), torch.eye(2))]


def test_log_likelihood_task_estimate_and_weight_on_a_hand_built_2d_case(tiny_model) -> None:
    method = _method(tiny_model, calib_dim=2)
    method.gaussians = _hand_gaussians()
    f = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    log2pi = math.log(2 * math.pi)
    # x=(1,2): task 0: Mahalanobis 1 + 4/4 = 2, log|Σ| = log 4; task 1: Mahalanobis 4 + 4 = 8, log|Σ| = 0
    # x=(3,.5): task 0: 9 + .25/4; task 1: 0.25
    expected = torch.tensor([[-0.5 * (2 * log2pi + math.log(4) + 2), -0.5 * (2 * log2pi + 8)],
                             [-0.5 * (2 * log2pi + math.log(4) + 9.0625), -0.5 * (2 * log2pi + 0.25)]], dtype=D64)
    assert torch.allclose(method.log_likelihoods(f), expected, atol=1e-9)
    index, best, weight = method.estimate(f)
    assert index.tolist() == [0, 1]
    assert torch.allclose(best, expected.max(1).values)
    # the code's sigmoid(ℓ / dim − 1), here dim = 2
    assert torch.allclose(weight.double(), torch.sigmoid(expected.max(1).values / 2 - 1), atol=1e-6)
    method.hparams = dataclasses.replace(method.hparams, calib_dim=0)  # 0 = the features' width (2)
    assert torch.allclose(method.estimate(f)[2], weight)
    method.hparams = dataclasses.replace(method.hparams, calibrate=False)
    assert torch.equal(method.estimate(f)[2], torch.ones(2))


def test_batch_vote_takes_the_majority_and_the_lowest_on_ties() -> None:
    assert majority(torch.tensor([1, 0, 1, 2])) == 1
    assert majority(torch.tensor([2, 1, 2, 1])) == 1
    assert majority(torch.tensor([3])) == 3


def _two_tasks(model, **hp) -> tuple[DIKI, list]:
    method = _method(model, **hp)
    tasks = [styled_task("a", 0), styled_task("b", 1)]
    for i, task in enumerate(tasks):
        _learn(method, task, i, values_seed=10 + i)
    return method, tasks


def _features_with(method: DIKI, images, task: int, weight) -> torch.Tensor:
    method.routes["vision"] = (task, weight)
    try:
        with torch.no_grad():
            return method.model.encode_image(images)
    finally:
        method.routes["vision"] = None


def test_calibration_weight_scales_the_injected_branch_not_the_pretrained_one(tiny_model) -> None:
    plain = copy.deepcopy(tiny_model)
    method, tasks = _two_tasks(tiny_model)
    images = torch.stack([tasks[1].train[i][0] for i in range(4)])
    with torch.no_grad():
        zero_shot = plain.encode_image(images)
        full = _features_with(method, images, 1, None)  # task b's prompt at weight 1
    assert not torch.allclose(full, zero_shot, atol=1e-3), "the trained prompts must change the features"
    # weight -> 0 (shift far above any ℓ/D): exactly zero-shot CLIP, images and texts alike
    method.hparams = dataclasses.replace(method.hparams, calib_shift=1e9)
    with torch.no_grad():
        got = method.eval_image_features(images, "b")
        assert torch.allclose(got, zero_shot, atol=1e-6)
        text = method.eval_text_features([[p] for p in tasks[1].prompts()], "b")
        assert torch.allclose(method.logits(got, text, "b", True),
                              plain.logit_scale() * zero_shot @ plain.class_text_features(
                                  [[p] for p in tasks[1].prompts()]).T, atol=1e-4)
    # weight -> 1: the prompt at full strength (what training used)
    method.hparams = dataclasses.replace(method.hparams, calib_shift=-1e9)
    with torch.no_grad():
        assert torch.allclose(method.eval_image_features(images, "b"), full, atol=1e-6)
    # in between: each image's residual scaled by its own w = sigmoid(log N(f; μ_ĵ, Σ_ĵ)/D − shift), with the
    # likelihood from torch.distributions
    # images drawn away from task b's training set by growing noise, so that their likelihoods (weights) differ
    gen = torch.Generator().manual_seed(5)
    images = images + torch.randn(images.shape, generator=gen) * torch.tensor([0.0, 0.02, 0.04, 0.08])[:, None, None,
                                                                                                        None]
    with torch.no_grad():
        zero_shot = plain.encode_image(images)
        full = _features_with(method, images, 1, None)
    dists = [MultivariateNormal(g.mean.double(), g.covariance.double()) for g in method.gaussians]
    ll = torch.stack([d.log_prob(zero_shot.double()) for d in dists], dim=1)
    best, chosen = ll.max(1)
    shift = float(best.median()) / zero_shot.shape[1]
    method.hparams = dataclasses.replace(method.hparams, calib_shift=shift)
    w = torch.sigmoid(best / zero_shot.shape[1] - shift).float()
    assert chosen.tolist() == [1, 1, 1, 1] and float(w.max() - w.min()) > 0.2, (chosen, w)
    with torch.no_grad():
        got = method.eval_image_features(images, "b")
        for i in range(4):
            one = _features_with(method, images[i:i + 1], 1, w[i:i + 1])
            assert torch.allclose(got[i], one[0], atol=1e-5)
        assert not torch.allclose(got, full, atol=1e-4) and not torch.allclose(got, zero_shot, atol=1e-4)
        # the texts: the batch's prompt at the batch's mean weight
        text = method.eval_text_features([[p] for p in tasks[1].prompts()], "b")
        method.routes["text"] = (1, w.mean())
        expected_text = tiny_model.class_text_features([[p] for p in tasks[1].prompts()])
        method.routes["text"] = None
        assert torch.allclose(method.logits(got, text, "b", True),
                              tiny_model.logit_scale() * got @ expected_text.T, atol=1e-4)


def test_task_rule_uses_the_estimate_not_the_dataset_and_union_concatenates_the_routed_classes(tiny_model) -> None:
    method, tasks = _two_tasks(tiny_model, calib_shift=0.0)
    images = torch.stack([tasks[0].train[i][0] for i in range(3)])
    with torch.no_grad():
        as_a = method.eval_image_features(images, "a")
        as_b = method.eval_image_features(images, "b")
        as_none = method.eval_image_features(images, None)
    assert torch.equal(as_a, as_b) and torch.equal(as_a, as_none)
    bench = Benchmark("two", 1, tasks)
    spans = union_spans(bench)
    with torch.no_grad():
        texts = [method.eval_text_features([[p] for p in t.prompts()], t.name) for t in tasks]
        feats = method.eval_image_features(images, None)
        union = method.logits_union(feats, torch.cat(texts), spans, trained=2)
        per = [method.logits(feats, text, t.name, True) for t, text in zip(tasks, texts, strict=True)]
    assert union.shape == (3, spans[-1].stop)
    assert torch.allclose(union, torch.cat(per, dim=1), atol=1e-5)


def _expected_accuracies(method: DIKI, plain, bench: Benchmark, batch: int, shift: float, rule: str) -> list[float]:
    """Accuracy by hand: per test batch, torch.distributions' log-likelihoods of the frozen features, each image's
    argmax task, the batch's majority prompt (lowest on ties), w = sigmoid(ℓ/D − shift) per image in the image
    tower and the batch mean in the text tower; the dataset's classes (task rule) or every dataset's (union)."""
    dists = [MultivariateNormal(g.mean.double(), g.covariance.double()) for g in method.gaussians]
    spans = union_spans(bench)
    out = []
    for task, span in zip(bench.tasks, spans, strict=True):
        correct = 0
        for start in range(0, len(task.test), batch):
            items = [task.test[i] for i in range(start, min(start + batch, len(task.test)))]
            images, labels = torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
            with torch.no_grad():
                frozen = plain.encode_image(images)
            best, chosen = torch.stack([d.log_prob(frozen.double()) for d in dists], 1).max(1)
            counts = torch.bincount(chosen, minlength=len(dists))
            vote = int(torch.nonzero(counts == counts.max())[0])
            w = torch.sigmoid(best / frozen.shape[1] - shift).float()
            feats = _features_with(method, images, vote, w)
            classes = bench.tasks if rule == "union" else [task]
            method.routes["text"] = (vote, w.mean())
            with torch.no_grad():
                text = method.model.class_text_features([[t.templates[0].format(c)] for t in classes
                                                         for c in t.classnames])
            method.routes["text"] = None
            predicted = (feats @ text.T).argmax(1)
            correct += int((predicted == labels + (span.start if rule == "union" else 0)).sum())
        out.append(100.0 * correct / len(task.test))
    return out


def test_evaluation_under_both_rules_by_hand() -> None:
    from clbench.datasets.synthetic import build_synthetic
    from clbench.models.backbones import load_backbone

    model = load_backbone("tiny", "embedded")  # pretrained: predictions that depend on the features
    plain = copy.deepcopy(model)
    synthetic = build_synthetic(1, model.image_spec, train_per_class=3, test_per_class=1, num_tasks=2)
    tasks = [dataclasses.replace(t, test=t.train) for t in synthetic.tasks]  # test on the training images
    bench = Benchmark("two", 1, tasks)
    method = _method(model)
    for i, task in enumerate(tasks):
        _learn(method, task, i, values_seed=20 + i)
    train = TrainConfig(epochs=[1], batch_size=4, eval_batch_size=5)
    cpu = torch.device("cpu")
    with torch.no_grad():
        frozen = plain.encode_image(torch.stack([tasks[0].test[i][0] for i in range(len(tasks[0].test))]))
    shift = float(method.log_likelihoods(frozen).max(1).values.mean()) / frozen.shape[1]  # weights around 0.5
    method.hparams = dataclasses.replace(method.hparams, calib_shift=shift)
    zero = Method(plain, None, Profiler())
    task_rule = evaluate(method, bench, 2, train, "first", cpu, Hooks())
    expected = _expected_accuracies(method, plain, bench, 5, shift, "task")
    assert task_rule == pytest.approx(expected)
    assert expected != evaluate(zero, bench, 2, train, "first", cpu, Hooks()), "the prompts must change something"
    union, _ = evaluate_union(method, bench, 2, train, "first", cpu, Hooks())
    expected = _expected_accuracies(method, plain, bench, 5, shift, "union")
    assert union == pytest.approx(expected)
    assert expected != evaluate_union(zero, bench, 2, train, "first", cpu, Hooks())[0]
    # the extra inference cost is profiled
    assert {"task_estimation", "routed_text"} <= set(method.profiler.frame()["section"])


# ---- state ---------------------------------------------------------------------------------------------------
def test_state_round_trips_and_bad_covariances_and_counts_are_refused(tiny_model) -> None:
    method, tasks = _two_tasks(tiny_model)
    state = method.state_dict()
    assert state["mean"].shape == (2, 128) and state["covariance"].shape == (2, 128, 128)
    assert state["key/vision.0"].shape == (2, 3, 128) and "key/vision.2" not in state
    method.check_state(state, {}, tasks)
    fresh = _method(copy.deepcopy(tiny_model))
    fresh.load_state_dict(dict(state))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    images = torch.stack([tasks[0].train[i][0] for i in range(3)])
    with torch.no_grad():
        assert torch.allclose(fresh.eval_image_features(images, None), method.eval_image_features(images, None))
    assert method.state_bytes() == {"prompts": 2 * 2 * 4 * 3 * 128 * 4, "gaussians": 2 * (128 + 128 * 128) * 4}
    with pytest.raises(StateMismatch, match="method/key/vision.0"):
        method.check_state(state, {}, tasks[:1])  # two tasks' prompts after one task
    skew = {**state, "covariance": state["covariance"].clone()}
    skew["covariance"][1, 0, 1] += 1.0
    with pytest.raises(StateMismatch, match="not symmetric"):
        method.check_state(skew, {}, tasks)
    indefinite = {**state, "covariance": state["covariance"].clone()}
    indefinite["covariance"][0] -= 2.0 * torch.eye(128)
    with pytest.raises(StateMismatch, match="positive semi-definite"):
        method.check_state(indefinite, {}, tasks)
