"""ZSCL: distillation vanishes at the reference, the weight ensemble is the uniform snapshot mean, the
reference captions are encoded once, reference data are required off the embedded benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig, build_config, train_config_for
from clbench.datasets.base import Task
from clbench.errors import UserError
from clbench.harness import Hooks, make_loader_factory, train_task
from clbench.methods.base import TaskContext
from clbench.methods.zscl import (
    ZSCL,
    ZSCLHparams,
    distillation,
    parse_lr_overrides,
    read_captions,
    weight_distance,
)
from clbench.models.clip import ClipModel
from clbench.profiling import Profiler

SMALL_REF = {"ref_image_count": 48, "ref_caption_count": 256, "ref_batch_size": 16, "ref_text_batch": 32}


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
    import clbench.harness
    import clbench.schedules

    cfg = build_config("paper", {}, [], ["zscl"])
    train = train_config_for(cfg, "zscl")
    method = ZSCL(tiny_model, ZSCLHparams(**{**cfg.methods["zscl"], **SMALL_REF}), Profiler())
    optimizers: list[torch.optim.Optimizer] = []
    build = clbench.schedules.build_scheduler

    def spy(opt, train_config, total):
        optimizers.append(opt)
        return build(opt, train_config, total)

    monkeypatch.setattr(clbench.harness, "build_scheduler", spy)
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
    from clbench.runner import run_methods

    sets = ["data.num_tasks=3", *(f"zscl.{k}={v}" for k, v in SMALL_REF.items())]
    cfg = build_config("smoke", {"pretrained": "none", "device": "cpu"}, sets, ["zscl"])
    (outcome,) = run_methods(cfg, ["zscl"], tmp_path)
    assert outcome.status == "complete"
    profile = pd.read_csv(outcome.path / "profile.csv")
    assert {"reference_forward", "train", "eval"} <= set(profile["section"])
    metrics = json.loads((outcome.path / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last"))
