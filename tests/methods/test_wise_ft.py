"""WiSE-FT (ZSCL's MTIL baseline): after each task the weights are α·θ_trained + (1 − α)·θ_start, with θ_start the
model the task started from (the previous task's interpolated model), or the pretrained one with
``anchor=zeroshot``; the loss is fine-tuning's label-smoothed CE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.methods.base import TaskContext
from clbench.methods.wise_ft import WiSEFT, WiSEFTHparams
from clbench.models.clip import ClipModel


def _task(name: str, seed: int = 0, classes: int = 3, per_class: int = 6) -> Task:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 3, 32, 32, generator=gen) + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"{name} thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, steps: int = 3) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=6), torch.device("cpu"), seed=0)
    return TaskContext(index, task, 3, torch.device("cpu"), make, steps, prompts=task.prompts())


def _weights(model: ClipModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.encoder_parameters()]


def _train(method: WiSEFT, ctx: TaskContext) -> list[torch.Tensor]:
    """Train the task through the harness; the trained weights before the interpolation."""
    train_task(method, ctx, TrainConfig(lr=1e-3, schedule="constant", batch_size=6), Hooks(), "fp32")
    return _weights(method.model)


def _close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(torch.allclose(g, e, atol=1e-6, rtol=1e-6) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("alpha", [0.8, 0.3])
def test_after_task_is_alpha_trained_plus_one_minus_alpha_start(tiny_model: ClipModel, alpha: float) -> None:
    method = WiSEFT(tiny_model, WiSEFTHparams(alpha=alpha), Profiler())
    method.setup()
    ctx = _ctx(_task("A"), 0)
    start = _weights(tiny_model)
    method.before_task(ctx)
    trained = _train(method, ctx)
    assert max(float((t - s).abs().max()) for t, s in zip(trained, start, strict=True)) > 1e-4
    method.after_task(ctx)
    expected = [alpha * t + (1 - alpha) * s for t, s in zip(trained, start, strict=True)]
    assert _close(_weights(tiny_model), expected)
    reversed_ = [(1 - alpha) * t + alpha * s for t, s in zip(trained, start, strict=True)]
    assert not _close(_weights(tiny_model), reversed_)  # the check can tell the two sides apart


def test_the_anchor_is_the_previous_tasks_interpolated_model(tiny_model: ClipModel) -> None:
    method = WiSEFT(tiny_model, WiSEFTHparams(), Profiler())
    original = _weights(tiny_model)
    method.setup()
    ctx_a = _ctx(_task("A"), 0)
    method.before_task(ctx_a)
    trained_a = _train(method, ctx_a)
    method.after_task(ctx_a)
    after_a = [0.8 * t + 0.2 * o for t, o in zip(trained_a, original, strict=True)]
    assert _close(_weights(tiny_model), after_a)
    ctx_b = _ctx(_task("B", seed=1), 1)
    method.before_task(ctx_b)
    trained_b = _train(method, ctx_b)
    method.after_task(ctx_b)
    assert _close(_weights(tiny_model), [0.8 * t + 0.2 * a for t, a in zip(trained_b, after_a, strict=True)])
    to_original = [0.8 * t + 0.2 * o for t, o in zip(trained_b, original, strict=True)]
    assert not _close(_weights(tiny_model), to_original)


def test_zeroshot_anchor_interpolates_with_the_pretrained_weights(tiny_model: ClipModel) -> None:
    method = WiSEFT(tiny_model, WiSEFTHparams(alpha=0.6, anchor="zeroshot"), Profiler())
    original = _weights(tiny_model)
    method.setup()
    for index, name in enumerate("AB"):
        ctx = _ctx(_task(name, seed=index), index)
        method.before_task(ctx)
        trained = _train(method, ctx)
        method.after_task(ctx)
        assert _close(_weights(tiny_model), [0.6 * t + 0.4 * o for t, o in zip(trained, original, strict=True)])


def test_logit_scale_and_loss_are_fine_tunings(tiny_model: ClipModel) -> None:
    method = WiSEFT(tiny_model, WiSEFTHparams(label_smoothing=0.3), Profiler())
    method.setup()
    task = _task("A")
    ctx = _ctx(task, 0)
    method.before_task(ctx)
    images, labels = task.train.tensors[0][:6], task.train.tensors[1][:6]
    with torch.no_grad():
        text = tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
        logits = tiny_model.logit_scale() * tiny_model.encode_image(images) @ text.T
        expected = F.cross_entropy(logits, labels, label_smoothing=0.3)
    assert float(method.loss(images, labels, ctx).detach()) == pytest.approx(float(expected), rel=1e-6)
    scale = tiny_model.clip.logit_scale.detach().clone()
    _train(method, ctx)
    method.after_task(ctx)
    assert torch.equal(tiny_model.clip.logit_scale.detach(), scale)


def test_state_bytes_count_the_anchor_and_lr_overrides_apply(tiny_model: ClipModel) -> None:
    method = WiSEFT(tiny_model, WiSEFTHparams(lr_overrides="MNIST:5e-5"), Profiler())
    method.setup()
    method.before_task(_ctx(_task("MNIST"), 0))
    weights = sum(p.numel() * p.element_size() for p in tiny_model.encoder_parameters())
    assert method.state_bytes() == {"anchor": weights}
    assert method.trainable_parameters()[0]["lr"] == 5e-5
    assert method.state_dict() == {}
