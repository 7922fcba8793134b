"""ZSCL: distillation vanishes at the reference, the weight ensemble is the uniform snapshot mean, the
reference captions are encoded once, reference data are required off the embedded benchmark."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config, train_config_for
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.errors import UserError
from clbench.methods.base import TaskContext
from clbench.methods.zscl import (
    ZSCL,
    FeatureMemo,
    ZSCLHparams,
    distillation,
    parse_lr_overrides,
    read_captions,
    weight_distance,
)
from clbench.models.clip import ClipModel

SMALL_REF = {"ref_image_count": 48, "ref_caption_count": 256, "ref_batch_size": 16}


def _task(name: str, classes: int = 3, per_class: int = 8, seed: int = 0, size: int = 32) -> Task:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, size, size, generator=gen) + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, steps: int, batch_size: int = 8) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=batch_size), torch.device("cpu"), seed=0)
    return TaskContext(index, task, 3, torch.device("cpu"), make, steps, prompts=task.prompts())


def _method(model: ClipModel, **hp) -> ZSCL:
    return ZSCL(model, ZSCLHparams(**{**SMALL_REF, **hp}), Profiler())


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_distillation_is_zero_when_model_equals_reference(tiny_model: ClipModel, mode: str) -> None:
    method = _method(tiny_model, text_distill=mode)
    method.setup()
    img, txt = method.distillation_losses(16)
    assert float(img.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(txt.detach()) == pytest.approx(0.0, abs=1e-6)
    grads = torch.autograd.grad(img + txt, method.params(), allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5
    # and not zero once the model moves away from the reference (the check can fail)
    with torch.no_grad():
        for p in tiny_model.clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    img, txt = method.distillation_losses(16)
    assert float(img.detach()) > 1e-4 and float(txt.detach()) > 1e-4


def test_distillation_equals_the_codes_cross_entropy_minus_target_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher, student, T = torch.randn(5, 7, generator=gen) * 3, torch.randn(5, 7, generator=gen) * 3, 2.0
    target = F.softmax(teacher / T, dim=-1)
    ce = -(target * F.log_softmax(student / T, dim=-1)).sum(-1).mean() * T**2  # the official loss
    entropy = -(target * target.log()).sum(-1).mean() * T**2
    assert float(distillation(teacher, student, T)) == pytest.approx(float(ce - entropy), rel=1e-5)


def test_weight_distance_is_the_sum_of_squared_differences() -> None:
    a, b = [torch.ones(2, 3), torch.zeros(4)], [torch.zeros(2, 3), torch.full((4,), 2.0)]
    assert float(weight_distance(a, b)) == pytest.approx(6 * 1 + 4 * 4)


def test_weight_distance_gradient_is_twice_the_difference_scaled_by_the_outer_gradient() -> None:
    theta = [torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True), torch.tensor([4.0, 0.0], requires_grad=True)]
    start = [torch.tensor([[0.0, 1.0], [0.5, 1.0]]), torch.tensor([1.0, 2.0])]
    (3.0 * weight_distance(theta, start)).backward()  # d/dθ of 3·Σ(θ−s)² = 6(θ−s)
    assert theta[0].grad.tolist() == [[6.0, -18.0], [0.0, 12.0]]
    assert theta[1].grad.tolist() == [18.0, -12.0]
    with pytest.raises(ValueError, match="starting points"):
        weight_distance(theta, start[:1])


def test_weight_ensemble_is_the_uniform_average_of_the_snapshots(tiny_model: ClipModel) -> None:
    method = _method(tiny_model, avg_freq=2)
    method.setup()
    ctx = _ctx(_task("A"), 0, steps=5)
    method.before_task(ctx)
    snapshots = [[p.detach().clone() for p in method.params()]]  # θ_start
    original = method.after_step

    def record(task: TaskContext, step: int) -> None:
        if step % 2 == 0 or step == task.train_steps - 1:  # steps 0, 2, 4 (the last)
            snapshots.append([p.detach().clone() for p in method.params()])
        original(task, step)

    method.after_step = record
    train_task(method, ctx, TrainConfig(lr=1e-3, schedule="constant", batch_size=8), Hooks(), "fp32")
    final = [p.detach().clone() for p in method.params()]
    method.after_task(ctx)
    assert len(snapshots) == 4 and method.snapshots == 4
    moved = max(float((f - s).abs().max()) for f, s in zip(final, snapshots[0], strict=True))
    assert moved > 1e-4  # training changed the weights, so the average is not trivial
    for i, p in enumerate(method.params()):
        expected = torch.stack([snap[i] for snap in snapshots]).mean(0)
        assert torch.allclose(p, expected, atol=1e-6)


def test_reference_text_embeddings_are_encoded_once(tiny_model: ClipModel, monkeypatch) -> None:
    encoded_by_reference: list[int] = []
    real = ClipModel.encode_text

    def counting(self: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
        if self is not tiny_model:
            encoded_by_reference.append(len(tokens))
        return real(self, tokens)

    monkeypatch.setattr(ClipModel, "encode_text", counting)
    method = _method(tiny_model)
    method.setup()
    for index, name in enumerate(["A", "B"]):
        ctx = _ctx(_task(name, seed=index), index, steps=2)
        method.before_task(ctx)
        train_task(method, ctx, TrainConfig(lr=1e-4, schedule="constant", batch_size=8), Hooks(), "fp32")
        method.after_task(ctx)
    assert sum(encoded_by_reference) == len(method.captions)  # every caption once, in setup, never again
    assert method.text_encodings == 1


def test_reference_image_features_are_encoded_once_per_image_and_task(tiny_model: ClipModel, monkeypatch) -> None:
    """48 reference images drawn in batches of 16 for 6 steps a task (two passes): the frozen model encodes each
    image once in a task and again in the next (the memo is cleared per task), and the distillation terms equal
    those of a twin that re-encodes every draw (its memo holds nothing)."""
    rows_by_reference: list[int] = []
    real = ClipModel.encode_image

    def counting(self: ClipModel, images: torch.Tensor) -> torch.Tensor:
        if self is method.reference:
            rows_by_reference.append(len(images))
        return real(self, images)

    student = copy.deepcopy(tiny_model)
    method = _method(student)
    method.setup()  # the reference: the weights now
    with torch.no_grad():  # then the student moves away from it, so the terms are not zero
        gen = torch.Generator().manual_seed(7)
        for p in student.clip.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    twin = _method(copy.deepcopy(student))
    twin.setup()
    twin.reference.load_state_dict(method.reference.state_dict())
    monkeypatch.setattr(ClipModel, "encode_image", counting)
    for index in range(2):
        ctx = _ctx(_task("AB"[index], seed=index), index, steps=6)
        method.before_task(ctx)
        twin.before_task(ctx)
        twin.ref_features = FeatureMemo(len(twin.ref_images), max_bytes=0)
        for _ in range(6):
            got, expected = method.distillation_losses(16), twin.distillation_losses(16)
            for g, e in zip(got, expected, strict=True):
                assert float(e.detach()) > 1e-4 and float(g.detach()) == pytest.approx(float(e.detach()), rel=1e-4)
        assert sum(rows_by_reference) == 48 * (index + 1)


def test_feature_memo_encodes_each_row_once_and_returns_its_features() -> None:
    table = torch.arange(20.0).reshape(10, 2)
    calls: list[int] = []

    def encode(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images * 2

    memo = FeatureMemo(10)
    for rows in ([3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5, 8]):
        index = torch.tensor(rows)
        assert torch.equal(memo(index, table[index], encode), table[index] * 2)
    assert calls == [3, 2, 2, 1]  # only rows not seen before: 3,1,4 / 5,9 / 2,6 / 8
    memo.clear()
    index = torch.tensor([3, 1])
    assert torch.equal(memo(index, table[index], encode), table[index] * 2) and calls[-1] == 2
    small = FeatureMemo(10, max_bytes=10 * 2 * 4 - 1)  # one byte short of the table: every draw is encoded
    for _ in range(2):
        assert torch.equal(small(index, table[index], encode), table[index] * 2)
    assert calls[-2:] == [2, 2] and small.table is None


def test_reference_model_is_the_frozen_original(tiny_model: ClipModel) -> None:
    method = _method(tiny_model)
    method.setup()
    before = {k: v.clone() for k, v in method.reference.state_dict().items()}
    ctx = _ctx(_task("A"), 0, steps=2)
    method.before_task(ctx)
    train_task(method, ctx, TrainConfig(lr=1e-3, schedule="constant", batch_size=8), Hooks(), "fp32")
    method.after_task(ctx)
    after = method.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(method.params(), method.reference.encoder_parameters(),
                                                     strict=True))


def test_embedded_reference_images_are_normalised_like_the_benchmark(tiny_model: ClipModel) -> None:
    method = _method(tiny_model, ref_image_count=256)
    method.setup()
    images = method.ref_images.data
    spec = tiny_model.image_spec
    pixels = images * torch.tensor(spec.std)[:, None, None] + torch.tensor(spec.mean)[:, None, None]
    assert images.shape[1:] == (3, spec.size, spec.size)
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5  # [0, 1] pixels before normalising
    assert len(set(method.captions)) == len(method.captions) > 10


def test_mtil_without_reference_data_names_the_options(tiny_model: ClipModel) -> None:
    method = _method(tiny_model)
    method.benchmark = "mtil"
    with pytest.raises(UserError, match=r"zscl\.ref_images=.*zscl\.ref_captions="):
        method.validate()
    method = _method(tiny_model, ref_images="/nonexistent/folder", ref_captions="/nonexistent.csv")
    method.benchmark = "mtil"
    with pytest.raises(UserError, match="ref_images"):
        method.validate()


def test_reference_folder_and_caption_file(tiny_model: ClipModel, tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 50), (40 * i, 100, 200)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "cc.csv").write_text("title\tfilepath\na dog on a sofa, smiling\tx.jpg\nred car\ty.jpg\n")
    method = _method(tiny_model, ref_images=str(tmp_path / "imgs"), ref_captions=str(tmp_path / "cc.csv"),
                     ref_batch_size=4, ref_workers=0)
    method.benchmark = "mtil"
    method.validate()
    method.setup()
    assert method.captions == ["a dog on a sofa, smiling", "red car"]
    batch = method.ref_images.next()
    assert batch.shape == (4, 3, 32, 32)
    img, txt = method.distillation_losses(4)
    assert math.isfinite(float(img.detach())) and math.isfinite(float(txt.detach()))
    (tmp_path / "raw.tsv").write_text("first caption\thttp://a\nsecond caption\thttp://b\n")
    assert read_captions(tmp_path / "raw.tsv", "0") == ["first caption", "second caption"]
    with pytest.raises(UserError, match="ref_caption_column"):
        read_captions(tmp_path / "raw.tsv")


def test_lr_overrides_become_group_learning_rates(tiny_model: ClipModel) -> None:
    assert parse_lr_overrides("Aircraft:5e-5, MNIST=5e-5") == {"Aircraft": 5e-5, "MNIST": 5e-5}
    with pytest.raises(UserError, match="lr_overrides"):
        parse_lr_overrides("Aircraft")
    method = _method(tiny_model, lr_overrides="A:5e-5")
    method.setup()
    method.before_task(_ctx(_task("A"), 0, steps=1))
    groups = method.trainable_parameters()
    assert groups[0]["lr"] == 5e-5 and len(groups[0]["params"]) == len(tiny_model.encoder_parameters())
    method.before_task(_ctx(_task("B"), 1, steps=1))
    assert all(isinstance(p, torch.nn.Parameter) for p in method.trainable_parameters())



def test_paper_preset_trains_aircraft_at_its_own_rate_under_zscls_schedule(tiny_model: ClipModel,
                                                                             monkeypatch) -> None:
    """The rates the harness's optimiser uses, step by step, with the paper preset's ZSCL settings."""
    import clbench.engine.harness
    import clbench.engine.schedules

    cfg = build_config("paper", {}, [], ["zscl"])
    train = train_config_for(cfg, "zscl")
    method = ZSCL(tiny_model, ZSCLHparams(**{**cfg.methods["zscl"], **SMALL_REF}), Profiler())
    optimizers: list[torch.optim.Optimizer] = []
    build = clbench.engine.schedules.build_scheduler

    def spy(opt, train_config, total):
        optimizers.append(opt)
        return build(opt, train_config, total)

    monkeypatch.setattr(clbench.engine.harness, "build_scheduler", spy)
    rates: list[list[float]] = []
    loss = method.loss

    def recording_loss(*args):  # the rate the coming optimiser step will use
        rates.append([g["lr"] for g in optimizers[-1].param_groups])
        return loss(*args)

    monkeypatch.setattr(method, "loss", recording_loss)
    method.setup()
    for index, name, peak in [(0, "Aircraft", 5e-5), (1, "Caltech101", 1e-5), (2, "MNIST", 5e-5)]:
        ctx = _ctx(_task(name, seed=index), index, steps=3)
        method.before_task(ctx)
        rates.clear()
        assert train_task(method, ctx, train, Hooks(), "fp32") == 3
        # ZSCL's warm-up over 100 steps: peak·(s+1)/100 for the first steps; one group, all encoder weights
        assert rates == [[pytest.approx(peak * (s + 1) / 100, rel=1e-12)] for s in range(3)]
        assert sum(len(g["params"]) for g in optimizers[-1].param_groups) == len(tiny_model.encoder_parameters())
        method.after_task(ctx)

def test_smoke_run(tmp_path: Path) -> None:
    from clbench.engine.runner import run_methods

    sets = ["data.num_tasks=3", *(f"zscl.{k}={v}" for k, v in SMALL_REF.items())]
    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"}, sets, ["zscl"])
    (outcome,) = run_methods(cfg, ["zscl"], tmp_path)
    assert outcome.status == "complete"
    profile = pd.read_csv(outcome.path / "profile.csv")
    assert {"reference_forward", "train", "eval"} <= set(profile["section"])
    metrics = json.loads((outcome.path / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last"))


# ---- the official algorithm by default, and the losses re-derived through loss() -----------------------
def test_zscl_means_the_official_algorithm_in_every_preset(tiny_model: ClipModel) -> None:
    assert ZSCLHparams().text_distill == "official"
    for preset in ("default", "paper", "smoke"):
        assert build_config(preset, {}, [], ["zscl"]).methods["zscl"]["text_distill"] == "official"
    variant = build_config("paper", {}, ["zscl.text_distill=paper"], ["zscl"])
    assert variant.methods["zscl"]["text_distill"] == "paper"
    # official: the distillation gives the text encoder no gradient; the paper variant does (the check can fail)
    text_params = {id(p) for p in tiny_model.clip.transformer.parameters()}
    for mode, has_text_grad in (("official", False), ("paper", True)):
        method = _method(tiny_model, text_distill=mode)
        method.setup()
        with torch.no_grad():
            for p in tiny_model.clip.visual.parameters():
                p.add_(0.05 * torch.randn_like(p))
        img, txt = method.distillation_losses(16)
        grads = torch.autograd.grad(img + txt, method.params(), allow_unused=True)
        text_grad = max((float(g.abs().max()) for p, g in zip(method.params(), grads, strict=True)
                         if id(p) in text_params and g is not None), default=0.0)
        assert (text_grad > 0) == has_text_grad


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p ‖ q), p = softmax(teacher), q = softmax(student), written out."""
    p = torch.exp(teacher - teacher.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    q = torch.exp(student - student.max(1, keepdim=True).values)
    q = q / q.sum(1, keepdim=True)
    return (p * (p.log() - q.log())).sum(1).mean()


def test_loss_is_ce_plus_the_distillations_and_the_weight_constraint_re_derived(tiny_model: ClipModel) -> None:
    """``loss()`` on the second task against a plain re-derivation: label-smoothed CE, T²·KL(teacher ‖ student)
    image→caption and caption→image (the transpose), and ``l2·Σ‖θ − θ_start‖²`` anchored at the task's start."""
    T, w_img, w_txt, l2, ls = 3.0, 0.7, 1.3, 0.4, 0.2
    method = _method(tiny_model, temperature=T, image_loss=w_img, text_loss=w_txt, l2=l2, label_smoothing=ls)
    method.setup()
    original = [p.detach().clone() for p in tiny_model.encoder_parameters()]
    first = _ctx(_task("A"), 0, steps=3)
    method.before_task(first)
    train_task(method, first, TrainConfig(lr=1e-3, schedule="constant", batch_size=8), Hooks(), "fp32")
    method.after_task(first)
    second_task = _task("B", seed=1)
    second = _ctx(second_task, 1, steps=2)
    method.before_task(second)
    start = [p.detach().clone() for p in tiny_model.encoder_parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(start, original, strict=True)) > 1e-4
    with torch.no_grad():  # the current weights move away from the task's start
        for p in tiny_model.encoder_parameters():
            p.add_(1e-3 * torch.randn_like(p))
    for p in tiny_model.encoder_parameters():
        p.requires_grad_(True)
    ref_batch = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    method.ref_images.next_indexed = lambda: (torch.arange(6), ref_batch)
    images, labels = second_task.train.tensors[0][:8], second_task.train.tensors[1][:8]
    got = method.loss(images, labels, second)

    ref = method.reference
    with torch.no_grad():
        e = ref.encode_text(tiny_model.tokenize(method.captions))
        f_ref = ref.encode_image(ref_batch)
        scale = ref.logit_scale()
    f_cur = tiny_model.encode_image(ref_batch)
    s_ref, s_cur = scale * f_ref @ e.T, scale * f_cur @ e.T
    l_img = T**2 * _kl_rows(s_ref / T, s_cur / T)
    l_txt = T**2 * _kl_rows(s_ref.T / T, s_cur.T / T)
    text = tiny_model.encode_text(tiny_model.tokenize(second.prompts))
    logits = tiny_model.logit_scale() * tiny_model.encode_image(images) @ text.T
    n = logits.shape[1]
    target = torch.full_like(logits, ls / n).scatter_(1, labels[:, None], 1 - ls + ls / n)
    ce = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    wc = sum(((p - s) ** 2).sum() for p, s in zip(tiny_model.encoder_parameters(), start, strict=True))
    expected = ce + w_img * l_img + w_txt * l_txt + l2 * wc
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(w_txt * l_txt.detach()) > 1e-3 and float(l2 * wc.detach()) > 1e-3  # every term is in play
    img, txt = method.distillation_losses(8)  # the two terms alone, through the same hook
    img, txt, l_img, l_txt = (float(x.detach()) for x in (img, txt, l_img, l_txt))
    assert img == pytest.approx(l_img, rel=1e-4) and txt == pytest.approx(l_txt, rel=1e-4)
    # the alternatives differ by more than the tolerance (the checks can fail)
    for wrong, right in ((T**2 * _kl_rows(s_cur / T, s_ref / T), l_img),  # teacher and student swapped
                         (_kl_rows(s_ref, s_cur), l_img),  # temperature ignored
                         (T**2 * _kl_rows(s_ref / T, s_cur / T), l_txt)):  # text direction not transposed
        assert abs(float(wrong.detach()) - right) > 1e-3 * right
    grads = torch.autograd.grad(got, tiny_model.encoder_parameters(), allow_unused=True)
    want = torch.autograd.grad(expected, tiny_model.encoder_parameters(), allow_unused=True)
    for g, w in zip(grads, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)


def test_weight_ensemble_keeps_the_last_steps_snapshot(tiny_model: ClipModel) -> None:
    """6 steps, avg_freq 4: the ensemble is the mean of θ_start and the weights after steps 0, 4 and 5 (the
    last step, not a multiple of 4), recorded after every step independently of the method's rule."""
    method = _method(tiny_model, avg_freq=4)
    method.setup()
    ctx = _ctx(_task("A"), 0, steps=6)
    method.before_task(ctx)
    start = [p.detach().clone() for p in method.params()]
    after: list[list[torch.Tensor]] = []
    original = method.after_step

    def record(task: TaskContext, step: int) -> None:
        after.append([p.detach().clone() for p in method.params()])
        original(task, step)

    method.after_step = record
    train_task(method, ctx, TrainConfig(lr=1e-3, schedule="constant", batch_size=8), Hooks(), "fp32")
    method.after_task(ctx)
    assert len(after) == 6
    for i, p in enumerate(method.params()):
        expected = (start[i] + after[0][i] + after[4][i] + after[5][i]) / 4
        assert torch.allclose(p, expected, atol=1e-6)
    without_last = [(start[i] + after[0][i] + after[4][i]) / 3 for i in range(len(start))]
    assert max(float((p - w).abs().max()) for p, w in zip(method.params(), without_last, strict=True)) > 1e-5


def test_caption_sample_size_is_refused_where_it_has_no_effect(tiny_model: ClipModel) -> None:
    with pytest.raises(UserError, match="ref_text_batch=32 has no effect with text_distill=official"):
        _method(tiny_model, ref_text_batch=32).validate()
    _method(tiny_model, ref_text_batch=32, text_distill="paper").validate()  # the variant samples captions
