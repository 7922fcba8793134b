"""LwF and LwF-VR (ZSCL's MTIL baselines): the loss through the hooks equals a plain re-derivation (teacher as the
KL target, temperature, both transposed terms, label smoothing); the teacher is the previous task's model; the
reference images and texts are the current task's; LwF-VR's virtual vocabulary is random, framed like the
code's and fixed by the seed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import Hooks, make_loader_factory, train_task
from clbench.errors import UserError
from clbench.methods.base import TaskContext
from clbench.methods.lwf import LwF, LwFHparams, LwFVR, LwFVRHparams, reference_view
from clbench.methods.state_checks import StateMismatch
from clbench.methods.zscl import FeatureMemo
from clbench.models.clip import ClipModel

PER_CLASS = 6


def _task(name: str, classes: int = 3, seed: int = 0, size: int = 32) -> Task:
    gen = torch.Generator().manual_seed(100 + seed)
    labels = torch.arange(classes).repeat_interleave(PER_CLASS)
    images = torch.randn(len(labels), 3, size, size, generator=gen) + (labels[:, None, None, None].float() + seed)
    data = TensorDataset(images, labels)
    return Task(name, [f"{name} thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, steps: int = 2, batch_size: int = 6) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=batch_size), torch.device("cpu"), seed=0)
    return TaskContext(index, task, 2, torch.device("cpu"), make, steps, prompts=task.prompts())


def kl_distill(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """``T²·mean_rows Σ p (log p − log q)``, p = softmax(teacher/T), q = softmax(student/T), written out."""
    p = torch.exp(teacher / T) / torch.exp(teacher / T).sum(-1, keepdim=True)
    log_q = student / T - torch.logsumexp(student / T, dim=-1, keepdim=True)
    return (p * (p.log() - log_q)).sum(-1).mean() * T * T


@torch.no_grad()
def _perturb(model: ClipModel, scale: float = 0.05, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.clip.visual.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def _expected_loss(student: ClipModel, teacher: ClipModel, task: Task, images, labels, ref_tokens, hp) -> float:
    """CE_ls on the batch + image_loss·KL(teacher‖student) over the reference texts per image + text_loss·the same
    per reference text over the images, all on the task's whole training split."""
    with torch.no_grad():
        scale = student.logit_scale()
        text = student.encode_text(student.tokenize(task.prompts()))
        ce = F.cross_entropy(scale * student.encode_image(images) @ text.T, labels,
                             label_smoothing=hp.label_smoothing)
        ref_images = task.train.tensors[0]
        e_t = teacher.encode_text(ref_tokens)
        s_t = scale * teacher.encode_image(ref_images) @ e_t.T
        s_s = scale * student.encode_image(ref_images) @ e_t.T
        T = hp.temperature
        return float(ce + hp.image_loss * kl_distill(s_t, s_s, T) + hp.text_loss * kl_distill(s_t.T, s_s.T, T))


HP = {"temperature": 3.0, "image_loss": 0.7, "text_loss": 1.3, "ref_batch_size": 3 * PER_CLASS}


@pytest.mark.parametrize("cls", [LwF, LwFVR])
def test_loss_is_ce_plus_both_distillation_terms_with_the_teacher_as_target(tiny_model: ClipModel, cls) -> None:
    """The reference batch is the task's whole split (``ref_batch_size`` = its size), in some order: both terms
    are invariant to that order, so the plain re-derivation runs on the split as stored."""
    hp = (LwFVRHparams(**HP, vr_texts=40) if cls is LwFVR else LwFHparams(**HP))
    method = cls(tiny_model, hp, Profiler())
    torch.manual_seed(3)
    method.setup()
    task = _task("A")
    ctx = _ctx(task, 0)
    method.before_task(ctx)
    teacher = copy.deepcopy(tiny_model)  # the weights at the start of the task, independently of the method
    _perturb(tiny_model)
    images, labels = task.train.tensors[0][:6], task.train.tensors[1][:6]
    ref_tokens = method.vr_tokens if cls is LwFVR else tiny_model.tokenize(task.prompts())
    got = float(method.loss(images, labels, ctx).detach())
    expected = _expected_loss(tiny_model, teacher, task, images, labels, ref_tokens, hp)
    assert got == pytest.approx(expected, rel=1e-5)
    # the distillation terms are not negligible: swapping teacher and student, or T = 1, moves the loss
    with torch.no_grad():
        e_t = teacher.encode_text(ref_tokens)
        s_t = 100 * teacher.encode_image(task.train.tensors[0]) @ e_t.T
        s_s = 100 * tiny_model.encode_image(task.train.tensors[0]) @ e_t.T
    assert abs(float(kl_distill(s_s, s_t, 3.0) - kl_distill(s_t, s_s, 3.0))) > 1e-3 * expected
    assert abs(float(kl_distill(s_t, s_s, 1.0) - kl_distill(s_t, s_s, 3.0))) > 1e-3 * expected


def test_distillation_vanishes_at_the_start_of_each_task_and_the_teacher_is_the_previous_model(
        tiny_model: ClipModel) -> None:
    method = LwF(tiny_model, LwFHparams(ref_batch_size=6), Profiler())
    original = [p.detach().clone() for p in tiny_model.encoder_parameters()]
    method.setup()
    tasks = [_task("A"), _task("B", seed=1)]
    for index, task in enumerate(tasks):
        ctx = _ctx(task, index, steps=3)
        method.before_task(ctx)
        img, txt = method.distillation_losses(6)
        assert float(img.detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(txt.detach()) == pytest.approx(0.0, abs=1e-6)
        train_task(method, ctx, TrainConfig(lr=1e-3, schedule="constant", batch_size=6), Hooks(), "fp32")
        img, txt = method.distillation_losses(6)
        assert float(img.detach()) > 1e-5 and float(txt.detach()) > 1e-5  # the student moved away from its teacher
        method.after_task(ctx)
    # during task B the teacher held the weights trained on A, not the original ones
    teacher_b = method.teacher.encoder_parameters()
    assert max(float((t - o).abs().max()) for t, o in zip(teacher_b, original, strict=True)) > 1e-4
    assert all(not t.requires_grad for t in teacher_b)


def test_reference_data_are_the_current_tasks_images_and_class_prompts(tiny_model: ClipModel) -> None:
    method = LwF(tiny_model, LwFHparams(ref_batch_size=4), Profiler())
    method.setup()
    a, b = _task("A"), _task("B", classes=4, seed=5)
    method.before_task(_ctx(a, 0))
    method.before_task(_ctx(b, 1))
    with torch.no_grad():
        expected_text = tiny_model.encode_text(tiny_model.tokenize(b.prompts()))
    assert method.ref_text.shape[0] == 4 and torch.allclose(method.ref_text, expected_text, atol=1e-6)
    pool_b, pool_a = b.train.tensors[0].flatten(1), a.train.tensors[0].flatten(1)
    seen = []
    for _ in range(8):  # two passes over B's 24 images, batches of 4
        batch = method.ref_images.next().flatten(1)
        assert batch.shape[0] == 4
        for row in batch:
            assert (pool_b == row).all(1).any() and not (pool_a == row).all(1).any()
            seen.append(int((pool_b == row).all(1).nonzero()[0]))
    assert sorted(seen[:24]) == list(range(24)) and seen[:24] != list(range(24))  # a shuffled pass


def test_reference_view_reads_the_training_split_with_the_test_transform() -> None:
    class View(Dataset):
        def __init__(self, transform: str) -> None:
            self.transform, self.items = transform, [1, 2]

        def __len__(self) -> int:
            return 2

    train, test = View("train crop"), View("test resize")
    task = Task("X", ["a"], ["{}"], train, test)
    view, fixed = reference_view(task)
    assert view.transform == "test resize" and view.items is train.items and train.transform == "train crop"
    assert fixed  # read with the test transform: the teacher's features of an image may be memoised


def test_teacher_features_are_encoded_once_per_image_and_task_and_equal_fresh_ones(tiny_model: ClipModel) -> None:
    """Two passes over each task's 18 images in batches of 6: the teacher encodes each image once a task, the new
    task's teacher (new weights) encodes them again, and the terms equal a twin's that re-encodes every draw."""
    method = LwF(tiny_model, LwFHparams(ref_batch_size=6), Profiler())
    twin = LwF(copy.deepcopy(tiny_model), LwFHparams(ref_batch_size=6), Profiler())
    method.setup()
    twin.setup()
    for index, task in enumerate([_task("A"), _task("B", seed=1)]):
        ctx = _ctx(task, index)
        for m in (method, twin):
            torch.manual_seed(11 + index)  # the reference stream's seed: both draw the same batches
            m.before_task(ctx)
        twin.ref_features = FeatureMemo(len(twin.ref_images), max_bytes=0)
        encoded: list[int] = []
        real = method.teacher.encode_image
        def counted(images, encoded=encoded, real=real):
            encoded.append(len(images))
            return real(images)

        method.teacher.encode_image = counted
        for m in (method.model, twin.model):
            _perturb(m, seed=index)  # the same step for both students: the terms are not zero
        for _ in range(6):
            got, expected = method.distillation_losses(6), twin.distillation_losses(6)
            for g, e in zip(got, expected, strict=True):
                assert float(e.detach()) > 1e-5 and float(g.detach()) == pytest.approx(float(e.detach()), rel=1e-4)
        assert sum(encoded) == 3 * PER_CLASS


def test_lr_overrides_become_the_group_rate(tiny_model: ClipModel) -> None:
    method = LwF(tiny_model, LwFHparams(lr_overrides="Aircraft:5e-5"), Profiler())
    method.setup()
    method.before_task(_ctx(_task("Aircraft"), 0))
    groups = method.trainable_parameters()
    assert groups[0]["lr"] == 5e-5 and len(groups[0]["params"]) == len(tiny_model.encoder_parameters())
    method.before_task(_ctx(_task("Food"), 1))
    assert isinstance(method.trainable_parameters()[0], torch.nn.Parameter)
    with pytest.raises(UserError, match=r"lwf\.lr_overrides"):
        LwF(tiny_model, LwFHparams(lr_overrides="Aircraft"), Profiler()).validate()


def test_state_bytes_count_the_teacher(tiny_model: ClipModel) -> None:
    method = LwF(tiny_model, LwFHparams(), Profiler())
    method.setup()
    assert method.state_dict() == {} and method.state_bytes() == {}
    method.before_task(_ctx(_task("A"), 0))
    model_bytes = sum(t.numel() * t.element_size() for t in [*tiny_model.parameters(), *tiny_model.buffers()])
    sizes = method.state_bytes()
    assert sizes["teacher_model"] == model_bytes
    assert sizes["reference_text"] == 3 * tiny_model.encode_text(tiny_model.tokenize(["x"])).shape[1] * 4


# ---- LwF-VR ---------------------------------------------------------------------------------------------
def _vr(model: ClipModel, seed: int, **hp) -> LwFVR:
    method = LwFVR(model, LwFVRHparams(**hp), Profiler())
    torch.manual_seed(seed)
    method.setup()
    return method


def test_virtual_vocabulary_is_framed_like_the_codes(tiny_model: ClipModel) -> None:
    tokens = _vr(tiny_model, 0).vr_tokens
    sot, eot = tiny_model.tokenizer.sot_token_id, tiny_model.tokenizer.eot_token_id
    context = tiny_model.tokenize([""]).shape[1]
    assert tokens.shape == (1000, context) and tokens.dtype == torch.long
    assert (tokens[:, 0] == sot).all() and (tokens[:, 11] == eot).all() and (tokens[:, 12:] == 0).all()
    ids = tokens[:, 1:11]
    vocab = len(tiny_model.tokenizer.encoder)
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab
    # uniform over the whole vocabulary: 10,000 draws of 49,408 ids give about 9,050 distinct ones, mean ~24,700
    assert ids.unique().numel() > 8500
    assert abs(float(ids.float().mean()) - (vocab - 1) / 2) < 1000
    assert int(ids.max()) > 0.95 * vocab and int(ids.min()) < 0.05 * vocab


def test_virtual_vocabulary_is_fixed_by_the_seed_and_kept_for_every_task(tiny_model: ClipModel) -> None:
    a, b, c = _vr(tiny_model, 4), _vr(copy.deepcopy(tiny_model), 4), _vr(tiny_model, 5)
    assert torch.equal(a.vr_tokens, b.vr_tokens)
    assert (a.vr_tokens[:, 1:11] != c.vr_tokens[:, 1:11]).float().mean() > 0.99
    drawn = a.vr_tokens.clone()
    for index, task in enumerate([_task("A"), _task("B", classes=5, seed=2)]):
        torch.manual_seed(1000 + index)  # the harness reseeds before every task: the vocabulary stays
        a.before_task(_ctx(task, index))
        assert torch.equal(a.vr_tokens, drawn)
        with torch.no_grad():
            assert torch.allclose(a.ref_text, a.teacher.encode_text(drawn), atol=1e-6)
        assert a.ref_text.shape[0] == 1000  # the virtual texts, not the task's class prompts


def test_vr_state_round_trips_and_bad_ids_are_refused(tiny_model: ClipModel) -> None:
    method = _vr(tiny_model, 1, vr_texts=20)
    state = method.state_dict()
    other = _vr(copy.deepcopy(tiny_model), 2, vr_texts=20)
    other.check_state(state, {}, [])
    other.load_state_dict(state)
    assert torch.equal(other.vr_tokens, method.vr_tokens)
    assert other.state_bytes()["vr_tokens"] == 20 * state["vr_tokens"].shape[1] * 8
    bad = state["vr_tokens"].clone()
    bad[0, 1] = len(tiny_model.tokenizer.encoder)
    with pytest.raises(StateMismatch, match="vocabulary"):
        other.check_state({"vr_tokens": bad}, {}, [])
    with pytest.raises(StateMismatch):
        other.check_state({"vr_tokens": bad[:5]}, {}, [])


def test_vr_length_that_does_not_fit_the_context_names_the_option(tiny_model: ClipModel) -> None:
    context = tiny_model.tokenize([""]).shape[1]
    with pytest.raises(UserError, match=rf"lwf-vr\.vr_length={context - 2}"):
        _vr(tiny_model, 0, vr_length=context - 1)
