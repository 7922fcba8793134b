"""iCaRL (ZSCL's MTIL baseline): herding order and budget worked out by hand on 2-D features, the memory after two
tasks through the hooks, the loss re-derived in plain torch, the state round trip and forged states refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Task
from clbench.engine.harness import make_loader_factory
from clbench.errors import UserError
from clbench.methods.base import TaskContext
from clbench.methods.icarl import ICaRL, ICaRLHparams, exemplar_counts, herding_order, next_chunk
from clbench.methods.state_checks import StateMismatch
from clbench.models.clip import ClipModel

# Four 2-D features, mean μ = (0.5, 0.75). Herding by hand (pick k minimises ‖μ − (S + f_i)/k‖², S the sum so far):
#   k=1: ‖μ − f_i‖² = 2.8125, 1.8125, 0.3125, 2.8125          → f2, S = (1, 1)
#   k=2: ‖μ − (S + f_i)/2‖² = 1.0625, 0.5625, –, 0.3125         → f3, S = (0, 1)
#   k=3: ‖μ − (S + f_i)/3‖² = 0.2014, 0.3125, –, –              → f0, then f1
# Distance to the mean alone would pick f2, f1, ...: the running sum matters from the second pick.
FEATURES_A = [(2.0, 0.0), (0.0, 2.0), (1.0, 1.0), (-1.0, 0.0)]
ORDER_A = [2, 3, 0, 1]
# Three more, μ = (5/3, 0): k=1: 25/9, 49/9, 4/9 → f2 (S = (1, 0)); k=2: ‖μ − (S + f_i)/2‖² = 49/36, –, … 25/36 → f1.
FEATURES_B = [(0.0, 0.0), (4.0, 0.0), (1.0, 0.0)]
ORDER_B = [2, 1]


def test_herding_order_by_hand() -> None:
    assert herding_order(torch.tensor(FEATURES_A), 4).tolist() == ORDER_A
    assert herding_order(torch.tensor(FEATURES_A), 2).tolist() == ORDER_A[:2]  # a prefix of the full order
    assert herding_order(torch.tensor(FEATURES_A), 9).tolist() == ORDER_A  # never more than the candidates
    assert herding_order(torch.tensor(FEATURES_B), 2).tolist() == ORDER_B
    # a tie goes to the lowest index: two copies of the same point
    assert herding_order(torch.tensor([(1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]), 2).tolist() == [1, 0]


def test_budget_is_floor_of_k_over_tasks_per_task() -> None:
    assert exemplar_counts(10, [100]) == [10]
    assert exemplar_counts(10, [100, 100]) == [5, 5]
    assert exemplar_counts(10, [100, 100, 100]) == [3, 3, 3]  # 10 // 3, never 4, never over the budget
    assert exemplar_counts(10, [100, 100, 100, 100]) == [2, 2, 2, 2]
    assert exemplar_counts(11, [2, 100]) == [2, 5]  # a task with fewer candidates keeps all of them
    assert exemplar_counts(7, [1, 1, 1, 1, 1, 1, 1, 1]) == [0] * 8


def test_exemplar_batches_walk_the_memory_and_wrap() -> None:
    cursor, rows = 0, []
    for _ in range(4):
        chunk, cursor = next_chunk(5, cursor, 3)
        rows.append(list(range(5))[chunk])
    assert rows == [[0, 1, 2], [3, 4], [0, 1, 2], [3, 4]]  # the last chunk of a pass is shorter


# ---- through the hooks ----------------------------------------------------------------------------------------
def _images(features: list[tuple[float, float]], size: int, offset: float = 0.0) -> torch.Tensor:
    """Images whose first two channels' top-left pixel are the feature; the rest marks the image (``offset``)."""
    images = torch.arange(len(features), dtype=torch.float32)[:, None, None, None] + offset
    images = images.expand(len(features), 3, size, size).clone()
    images[:, :2, 0, 0] = torch.tensor(features)
    return images


def _task(name: str, images: torch.Tensor, labels: list[int], classes: int) -> Task:
    data = TensorDataset(images, torch.tensor(labels))
    return Task(name, [f"{name}{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def _ctx(task: Task, index: int, batch_size: int = 2) -> TaskContext:
    make = make_loader_factory(TrainConfig(batch_size=batch_size), torch.device("cpu"), seed=0)
    return TaskContext(index, task, 3, torch.device("cpu"), make, 1, prompts=task.prompts())


@pytest.fixture
def feature_model(tiny_model: ClipModel, monkeypatch) -> ClipModel:
    """The tiny model whose image features are the images' marked 2-D pixel (so herding is worked by hand)."""
    monkeypatch.setattr(tiny_model, "encode_image", lambda images: images[:, :2, 0, 0].clone())
    return tiny_model


def _two_tasks(model: ClipModel, memory_size: int) -> tuple[ICaRL, list[Task], torch.Tensor, torch.Tensor, dict]:
    size = model.image_spec.size
    a, b = _images(FEATURES_A, size), _images(FEATURES_B, size, offset=10.0)
    tasks = [_task("A", a, [0, 1, 0, 1], 2), _task("B", b, [2, 0, 1], 3)]
    method = ICaRL(model, ICaRLHparams(memory_size=memory_size, candidate_limit=30_000), Profiler())
    method.setup()
    for index, task in enumerate(tasks):
        ctx = _ctx(task, index)
        method.before_task(ctx)
        method.after_task(ctx)
        if index == 0:
            after_a = method.state_dict()
    return method, tasks, a, b, after_a


def test_memory_after_two_tasks(feature_model: ClipModel) -> None:
    method, tasks, a, b, after_a = _two_tasks(feature_model, memory_size=4)
    # after A (t = 1): all 4 images, in herding order
    assert torch.equal(after_a["exemplar_images"], a[ORDER_A])
    assert after_a["exemplar_labels"].tolist() == [[0, 1, 0, 1][i] for i in ORDER_A]
    assert after_a["exemplar_tasks"].tolist() == [0, 0, 0, 0]
    # after B (t = 2): 4 // 2 = 2 each; A keeps the prefix of its herding order, B its first two picks
    state = method.state_dict()
    assert torch.equal(state["exemplar_images"], torch.cat([a[ORDER_A[:2]], b[ORDER_B]]))
    assert state["exemplar_labels"].tolist() == [0, 1, 1, 0]  # A's labels 0 (f2), 1 (f3); B's 1 (f2), 0 (f1)
    assert state["exemplar_tasks"].tolist() == [0, 0, 1, 1]
    assert method.extra_state() == {"candidates": [4, 3]}
    nbytes = method.state_bytes()["exemplars"]
    assert nbytes == 4 * a[0].numel() * 4 + 4 * 8 + 4 * 8


def test_budget_off_by_one_through_the_hooks(feature_model: ClipModel) -> None:
    method, *_ = _two_tasks(feature_model, memory_size=5)  # A: min(5, 4) = 4; then 5 // 2 = 2 each
    assert method.state_dict()["exemplar_tasks"].tolist() == [0, 0, 1, 1]
    method, *_ = _two_tasks(feature_model, memory_size=7)  # 7 // 2 = 3 each (B has 3 candidates)
    assert method.state_dict()["exemplar_tasks"].tolist() == [0, 0, 0, 1, 1, 1]
    method, *_ = _two_tasks(feature_model, memory_size=3)  # A: 3; then 3 // 2 = 1 each
    assert method.state_dict()["exemplar_tasks"].tolist() == [0, 1]


def test_candidates_are_the_first_of_the_split(feature_model: ClipModel) -> None:
    size = feature_model.image_spec.size
    task = _task("A", _images(FEATURES_A, size), [0, 1, 0, 1], 2)
    method = ICaRL(feature_model, ICaRLHparams(memory_size=4, candidate_limit=3), Profiler())
    method.setup()
    ctx = _ctx(task, 0)
    method.before_task(ctx)
    method.after_task(ctx)
    # candidates f0, f1, f2: μ = (1, 1) = f2, then ‖μ − (f2 + f_i)/2‖² = 0.5 for both → f0 (lowest index), f1
    assert torch.equal(method.state_dict()["exemplar_images"], _images(FEATURES_A, size)[[2, 0, 1]])
    assert method.extra_state() == {"candidates": [3]}


# ---- the loss, re-derived ---------------------------------------------------------------------------------------
def _kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over rows, written out."""
    p = torch.softmax(teacher / t, dim=1)
    return (p * (torch.log(p) - torch.log_softmax(student / t, dim=1))).sum(1).mean() * t * t


def test_loss_is_ce_plus_weighted_distillation_on_the_next_exemplars(tiny_model: ClipModel) -> None:
    size = tiny_model.image_spec.size
    hp = ICaRLHparams(memory_size=5, temperature=3.0, image_loss=0.7, text_loss=0.3, label_smoothing=0.1,
                      replay_batch_size=3)
    method = ICaRL(tiny_model, hp, Profiler())
    method.setup()
    reference = method.reference
    with torch.no_grad():  # the trained model drifts from the original
        for p in tiny_model.encoder_parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    memory = torch.randn(5, 3, size, size, generator=gen)
    method.load_state_dict({"exemplar_images": memory, "exemplar_labels": torch.zeros(5, dtype=torch.long),
                            "exemplar_tasks": torch.zeros(5, dtype=torch.long)})
    images, labels = torch.randn(4, 3, size, size, generator=gen), torch.tensor([0, 2, 1, 2])
    task = _task("B", images, labels.tolist(), 3)
    ctx = _ctx(task, 1)
    method.before_task(ctx)
    with torch.no_grad():
        text = tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
        logits = tiny_model.logit_scale() * tiny_model.encode_image(images) @ text.T
        ce = F.cross_entropy(logits, labels, label_smoothing=0.1)
        e_ref = reference.encode_text(reference.tokenize(task.prompts()))  # the original model's class texts
        scale = reference.logit_scale()
        for rows in ([0, 1, 2], [3, 4], [0, 1, 2]):  # sequential exemplar batches, wrapping round
            ex = memory[rows]
            s_ref = scale * reference.encode_image(ex) @ e_ref.T
            s_cur = scale * tiny_model.encode_image(ex) @ e_ref.T
            expected = ce + 0.7 * _kl(s_ref, s_cur, 3.0) + 0.3 * _kl(s_ref.T, s_cur.T, 3.0)
            got = method.loss(images, labels, ctx)
            assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6), rows


def _memory_method(model: ClipModel, memory: torch.Tensor, hp: ICaRLHparams) -> ICaRL:
    method = ICaRL(model, hp, Profiler())
    method.setup()
    with torch.no_grad():  # the trained model drifts from the original
        for p in model.encoder_parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = len(memory)
    method.load_state_dict({"exemplar_images": memory, "exemplar_labels": torch.zeros(n, dtype=torch.long),
                            "exemplar_tasks": torch.zeros(n, dtype=torch.long)})
    return method


# as many exemplars as task images (a swap of the halves would go unseen in shape), fewer, and a last short chunk
@pytest.mark.parametrize(("replay", "batches"), [(4, [[0, 1, 2, 3], [4, 5, 6]]), (3, [[0, 1, 2], [3, 4, 5], [6]])])
def test_one_image_call_gives_the_loss_and_gradients_of_two(tiny_model: ClipModel, replay: int,
                                                            batches: list[list[int]]) -> None:
    size = tiny_model.image_spec.size
    gen = torch.Generator().manual_seed(2)
    memory = torch.randn(7, 3, size, size, generator=gen)
    hp = ICaRLHparams(memory_size=7, temperature=2.0, image_loss=0.6, text_loss=0.4, replay_batch_size=replay)
    method = _memory_method(tiny_model, memory, hp)
    reference = method.reference
    images, labels = torch.randn(4, 3, size, size, generator=gen), torch.tensor([1, 0, 2, 2])
    task = _task("B", images, labels.tolist(), 3)
    ctx = _ctx(task, 1)
    method.before_task(ctx)
    calls: list[int] = []
    encode = tiny_model.encode_image
    spy = lambda x: (calls.append(len(x)), encode(x))[1]  # noqa: E731
    params = [p for p in tiny_model.encoder_parameters() if p.requires_grad]
    for rows in batches:
        ex = memory[rows]
        # by hand: the task batch and the exemplar batch through the current model in two separate calls
        text = tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
        logits = tiny_model.logit_scale() * encode(images) @ text.T
        with torch.no_grad():
            e_ref = reference.encode_text(reference.tokenize(task.prompts()))
            s_ref = reference.logit_scale() * reference.encode_image(ex) @ e_ref.T
        s_cur = reference.logit_scale() * encode(ex) @ e_ref.T
        expected = (F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
                    + 0.6 * _kl(s_ref, s_cur, 2.0) + 0.4 * _kl(s_ref.T, s_cur.T, 2.0))
        want = torch.autograd.grad(expected, params)
        tiny_model.encode_image = spy
        got = method.loss(images, labels, ctx)
        del tiny_model.encode_image
        assert calls == [4 + len(rows)]  # one call of the current model on both batches
        calls.clear()
        assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6), rows
        grads = torch.autograd.grad(got, params)
        for g, w in zip(grads, want, strict=True):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_reference_runs_once_per_memory_and_follows_a_new_memory(tiny_model: ClipModel) -> None:
    size = tiny_model.image_spec.size
    gen = torch.Generator().manual_seed(3)
    method = _memory_method(tiny_model, torch.randn(5, 3, size, size, generator=gen),
                            ICaRLHparams(memory_size=5, replay_batch_size=2))
    reference = method.reference
    images, labels = torch.randn(2, 3, size, size, generator=gen), torch.tensor([0, 1])
    task = _task("B", images, labels.tolist(), 2)
    ctx = _ctx(task, 1)
    method.before_task(ctx)
    calls: list[int] = []
    encode = reference.encode_image
    reference.encode_image = lambda x: (calls.append(len(x)), encode(x))[1]
    for _ in range(4):
        method.loss(images, labels, ctx)
    assert calls == [5]  # the frozen teacher's logits of the whole memory, once, not once per batch
    new = torch.randn(5, 3, size, size, generator=gen)  # a loaded state replaces the memory: its logits are new
    method.load_state_dict({"exemplar_images": new, "exemplar_labels": torch.zeros(5, dtype=torch.long),
                            "exemplar_tasks": torch.zeros(5, dtype=torch.long)})
    method.cursor = 0
    with torch.no_grad():
        text = tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
        ce = F.cross_entropy(tiny_model.logit_scale() * tiny_model.encode_image(images) @ text.T, labels,
                             label_smoothing=0.2)
        e_ref = reference.encode_text(reference.tokenize(task.prompts()))
        s_ref = reference.logit_scale() * encode(new[:2]) @ e_ref.T
        s_cur = reference.logit_scale() * tiny_model.encode_image(new[:2]) @ e_ref.T
        expected = ce + _kl(s_ref, s_cur, 2.0) + _kl(s_ref.T, s_cur.T, 2.0)
        assert float(method.loss(images, labels, ctx)) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert calls == [5, 5]


def test_first_task_loss_is_label_smoothed_ce_only(tiny_model: ClipModel) -> None:
    size = tiny_model.image_spec.size
    method = ICaRL(tiny_model, ICaRLHparams(), Profiler())
    method.setup()
    images, labels = torch.randn(4, 3, size, size), torch.tensor([0, 1, 1, 0])
    task = _task("A", images, labels.tolist(), 2)
    ctx = _ctx(task, 0)
    method.before_task(ctx)
    with torch.no_grad():
        text = tiny_model.encode_text(tiny_model.tokenize(task.prompts()))
        logits = tiny_model.logit_scale() * tiny_model.encode_image(images) @ text.T
        expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
        assert float(method.loss(images, labels, ctx)) == pytest.approx(float(expected), rel=1e-6)


def test_lr_overrides_name_icarl(tiny_model: ClipModel) -> None:
    with pytest.raises(UserError, match="icarl.lr_overrides"):
        ICaRL(tiny_model, ICaRLHparams(lr_overrides="Aircraft"), Profiler()).setup()


# ---- state ------------------------------------------------------------------------------------------------------
def test_state_round_trip_and_forgeries(feature_model: ClipModel) -> None:
    method, tasks, *_ = _two_tasks(feature_model, memory_size=4)
    state, extra = method.state_dict(), method.extra_state()
    fresh = ICaRL(feature_model, ICaRLHparams(memory_size=4), Profiler())
    fresh.setup()
    fresh.check_state(state, extra, tasks)
    fresh.load_state_dict(state)
    fresh.load_extra_state(extra)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert fresh.extra_state() == extra
    fresh.check_state({k: v[:0] for k, v in state.items()}, {"candidates": []}, [])  # before any task
    images, labels, ids = state["exemplar_images"], state["exemplar_labels"], state["exemplar_tasks"]
    nan = images.clone()
    nan[1, 2, 3, 4] = float("nan")
    bad_labels = labels.clone()
    bad_labels[3] = 3  # task B has 3 classes: 0, 1, 2
    bad_labels_a = labels.clone()
    bad_labels_a[0] = 2  # task A has 2 classes
    forgeries = [
        ({**state, "exemplar_images": torch.cat([images, images[:1]])}, extra, tasks, "exemplar_images"),
        ({**state, "exemplar_images": nan}, extra, tasks, "exemplar_images"),
        ({**state, "exemplar_images": images.half()}, extra, tasks, "exemplar_images"),
        ({**state, "exemplar_images": images[:, :, :4]}, extra, tasks, "exemplar_images"),
        ({**state, "exemplar_labels": bad_labels}, extra, tasks, "exemplar_labels"),
        ({**state, "exemplar_labels": bad_labels_a}, extra, tasks, "exemplar_labels"),
        ({**state, "exemplar_labels": -labels - 1}, extra, tasks, "exemplar_labels"),
        ({**state, "exemplar_labels": labels.int()}, extra, tasks, "exemplar_labels"),
        ({**state, "exemplar_tasks": ids.flip(0)}, extra, tasks, "exemplar_tasks"),
        ({**state, "exemplar_tasks": torch.tensor([0, 0, 0, 1])}, extra, tasks, "exemplar_tasks"),
        ({k: v for k, v in state.items() if k != "exemplar_tasks"}, extra, tasks, "exemplar_tasks"),
        ({**state, "bogus": ids}, extra, tasks, "bogus"),
        (state, {"candidates": [4, 2]}, tasks, "candidates"),
        (state, {"candidates": [4.0, 3]}, tasks, "candidates"),
        (state, {}, tasks, "candidates"),
        (state, extra, tasks[:1], "candidates"),  # the state of two tasks where one was done
    ]
    for forged, forged_extra, done, entry in forgeries:
        with pytest.raises(StateMismatch) as info:
            fresh.check_state(forged, forged_extra, done)
        assert entry in info.value.entry, (entry, info.value)
    over = ICaRL(feature_model, ICaRLHparams(memory_size=3), Profiler())  # a smaller budget: 1 each, not 2
    over.setup()
    with pytest.raises(StateMismatch, match="exemplar_images"):
        over.check_state(state, extra, tasks)
