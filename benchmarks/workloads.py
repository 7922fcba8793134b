"""The workloads compared in ``benchmarks/``: clbench's implementation and the official-style reference of
each cost centre on the same inputs, plus correctness measures (principal-angle cosines).

Shapes: :data:`SMALL` (tiny backbone; what CI runs, with ``--benchmark-disable``) or :data:`FULL` (ViT-B-16
shapes), chosen by ``CLBENCH_BENCH_FULL=1``. Backbones are random-initialised (``load_backbone(name,
"none")``) and data is random (:mod:`clbench.costs.fake`): costs and the identities checked here do not
depend on the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from benchmarks.reference_official import (
    OFFICIAL_FEATURE_SLOTS,
    RunningMeanFeatures,
    matrix_gradients,
    official_accuracy,
    official_encode_text,
    official_mean_gradients,
    official_principal_basis,
)
from clbench.config import TrainConfig
from clbench.costs.fake import random_task, task_context
from clbench.costs.profiler import Profiler, TensorPeakTracker
from clbench.datasets.base import Benchmark, Task
from clbench.engine.harness import Hooks, evaluate
from clbench.linalg import CovarianceAccumulator, principal_basis, project_out, top_r_factors
from clbench.methods import get_method
from clbench.methods.base import Method, NoHparams, TaskContext
from clbench.methods.keeplora import AdaptedMatrix, KeepLoRA, task_batches
from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel

FULL_ENV = "CLBENCH_BENCH_FULL"
SPECTRUM_DECAY = 0.5  # σ_i ∝ i^(-0.5): slowly decaying, so ε_w = 0.85 keeps about a third of the directions


@dataclass(frozen=True)
class Shapes:
    """Sizes of every workload."""

    label: str
    backbone: str
    grad_batch: int  # images per batch of the gradient pass
    grad_batches: int
    classes: int  # classes of the gradient/step task
    eval_batch: int
    eval_batches: int
    eval_classes: int
    feat_width: int  # d of the feature statistics
    feat_tokens: int  # L
    feat_batch: int  # B
    feat_layers: int
    feat_batches: int
    basis_sizes: tuple[int, ...]
    step_batch: int
    step_repeats: int
    fraction_batches: int  # batches of the full pass in the grad-fraction curve
    rounds: int  # timed rounds per pytest benchmark
    principal: bool  # run KeepLoRA's S0 SVDs in the gradient workload (off at full shapes: minutes on a CPU)


SMALL = Shapes("small (tiny backbone)", "tiny", grad_batch=16, grad_batches=2, classes=10, eval_batch=32,
               eval_batches=2, eval_classes=10, feat_width=128, feat_tokens=17, feat_batch=64, feat_layers=4,
               feat_batches=2, basis_sizes=(64, 128), step_batch=16, step_repeats=3, fraction_batches=10,
               rounds=3, principal=True)
# MTIL's training and evaluation batch (64, KeepLoRA's MTIL configs) and CIFAR100's 100 classes; the feature
# statistics of one ViT-B-16 batch (197 tokens × 64 images, 12 blocks); the widths of S0's weights.
FULL = Shapes("ViT-B-16", "ViT-B-16", grad_batch=64, grad_batches=2, classes=100, eval_batch=64, eval_batches=2,
              eval_classes=100, feat_width=768, feat_tokens=197, feat_batch=64, feat_layers=12, feat_batches=2,
              basis_sizes=(512, 768, 1024, 4096), step_batch=8, step_repeats=3, fraction_batches=10,
              rounds=1, principal=False)

# MTIL's eleven datasets: (name, test images, classes), from torchvision's datasets as ZSCL's code loads them.
MTIL_TEST_SETS = (("Aircraft", 3333, 100), ("Caltech101", 1736, 101), ("CIFAR100", 10000, 100), ("DTD", 1880, 47),
                  ("EuroSAT", 5400, 10), ("Flowers", 6149, 102), ("Food", 25250, 101), ("MNIST", 10000, 10),
                  ("OxfordPet", 3669, 37), ("StanfordCars", 8041, 196), ("SUN397", 21751, 397))
MTIL_EVAL_BATCH = 64  # KeepLoRA's MTIL evaluation batch (MaolinLuo/KeepLoRA ``MTIL/`` configs)


def current_shapes() -> Shapes:
    """:data:`FULL` when ``CLBENCH_BENCH_FULL=1``, else :data:`SMALL`."""
    return FULL if os.environ.get(FULL_ENV, "") == "1" else SMALL


# ---- measuring -------------------------------------------------------------------------------------------
@dataclass
class Measured:
    seconds: float  # fastest of the timed runs, wall clock (device-synchronised)
    cpu_seconds: float  # fastest of the timed runs, CPU time of this process (all its threads)
    peak_bytes: int | None  # tensor peak of one extra, tracked run (None: not measured)
    value: Any  # the last run's result
    runs: list[float] = field(default_factory=list)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, float, Any]:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, value


def _tracked_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    with TensorPeakTracker() as tracker:
        value = fn()
    return tracker.peak, value


def measure(fn: Callable[[], Any], repeats: int = 1, memory: bool = True, device: torch.device | str = "cpu",
            warmup: int = 0) -> Measured:
    """Fastest of ``repeats`` untracked runs (wall and CPU time; on a shared machine the least-disturbed run
    is the best estimate of the cost), then the tensor peak (:class:`~clbench.costs.profiler.TensorPeakTracker`)
    of one tracked run, so tracking never inflates the times."""
    return measure_pair(fn, None, repeats, memory, device, warmup)[0]


def measure_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any] | None, repeats: int = 1, memory: bool = True,
                 device: torch.device | str = "cpu", warmup: int = 0) -> list[Measured]:
    """:func:`measure` for one or two functions, their timed runs interleaved (a, b, a, b, ...) so that load
    from other processes falls on both alike."""
    return measure_many([fn_a] if fn_b is None else [fn_a, fn_b], repeats, memory, device, warmup)


def measure_many(fns: list[Callable[[], Any]], repeats: int = 1, memory: bool = True,
                 device: torch.device | str = "cpu", warmup: int = 0) -> list[Measured]:
    """:func:`measure` for several functions, their timed runs interleaved (a, b, c, a, b, c, ...)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    values: list[Any] = [None for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            wall, cpu, values[i] = _timed(fn, device)
            walls[i].append(wall)
            cpus[i].append(cpu)
    out = []
    for i, fn in enumerate(fns):
        peak = None
        if memory:
            peak, values[i] = _tracked_peak(fn)
        out.append(Measured(min(walls[i], default=float("nan")), min(cpus[i], default=float("nan")), peak,
                            values[i], walls[i]))
    return out


def principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between ``span(A)`` and ``span(B)`` (descending; min(k_A, k_B) values)."""
    if A.shape[1] == 0 or B.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    Qa = torch.linalg.qr(A.detach().double().cpu()).Q
    Qb = torch.linalg.qr(B.detach().double().cpu()).Q
    return torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)


def build_model(backbone: str, device: torch.device | str = "cpu", seed: int = 0) -> ClipModel:
    torch.manual_seed(seed)
    return load_backbone(backbone, "none", device)


# ---- gradient estimation ---------------------------------------------------------------------------------
@dataclass
class GradientWorkload:
    """KeepLoRA's S1 on one random task: clbench's restricted, on-device estimate vs the official style."""

    method: KeepLoRA
    ctx: TaskContext

    @property
    def model(self) -> ClipModel:
        return self.method.model

    def clbench(self) -> dict[str, Tensor]:
        return self.method.estimate_gradients(self.ctx)

    def official(self) -> dict[str, Tensor]:
        tokens = self.model.tokenize(self.ctx.prompts)
        batches = task_batches(self.ctx, self.method.hparams.grad_fraction)
        grads = official_mean_gradients(self.model, batches, tokens)
        return matrix_gradients(self.model, grads, self.method.matrices())

    def float64(self) -> dict[str, Tensor]:
        """The official-style estimate in float64 on a copy of the model: the yardstick of float32 rounding."""
        model = copy.deepcopy(self.model).double()
        sites = {site.name: site for site in model.attention_sites()}
        matrices = [AdaptedMatrix(sites[m.site.name], m.proj) for m in self.method.matrices()]
        batches = [(x.double(), y) for x, y in task_batches(self.ctx, self.method.hparams.grad_fraction)]
        grads = official_mean_gradients(model, batches, model.tokenize(self.ctx.prompts))
        return matrix_gradients(model, grads, matrices)

    def initial_factors(self, grads: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """``(A, S)`` of every matrix: top-r left singular vectors of ``Ĝ = (I − UUᵀ)G`` (exact SVD) and their
        singular values. Where ``Ĝ`` has rank below r, the method fills ``A`` with random directions of
        ``S = 0`` (e.g. the last text layer's q/k, whose gradient only comes through the end-of-text tokens)."""
        rank = self.method.hparams.rank
        out = {}
        for name, G in grads.items():
            basis = self.method.bases[name].double().cpu()
            A, S, _ = top_r_factors(project_out(G.T.double().cpu(), basis), rank, basis=basis)
            out[name] = (A, S)
        return out

    def gradient_bytes(self, scope: str) -> int:
        """Bytes of the gradients each approach must hold: the adapted weights' (``"restricted"``) or
        every encoder parameter's (``"all"``)."""
        if scope == "all":
            return sum(p.numel() * p.element_size() for n, p in self.model.clip.named_parameters()
                       if n != "logit_scale")
        params = {}
        for site in self.method.sites():
            params[id(site.module.in_proj_weight)] = site.module.in_proj_weight
            params[id(site.module.out_proj.weight)] = site.module.out_proj.weight
        return sum(p.numel() * p.element_size() for p in params.values())


def gradient_workload(model: ClipModel, batch_size: int, batches: int, classes: int, fraction: float = 1.0,
                      principal: bool = True, device: torch.device | str = "cpu", seed: int = 0,
                      task: Task | None = None) -> GradientWorkload:
    """KeepLoRA (defaults; ``principal=False`` skips S0 by ε_w = 0, to save its SVDs on slow machines) set
    up on ``model`` with ``task`` (default: a random task of ``batches`` full batches of ``classes``)."""
    overrides = {} if principal else {"eps_w_vision": 0.0, "eps_w_text": 0.0}
    hparams = dataclasses.replace(KeepLoRA.Hparams(), grad_fraction=fraction, **overrides)
    method = KeepLoRA(model, hparams, Profiler(device=torch.device(device)))
    method.setup()
    if task is None:
        task = random_task(0, model.image_spec, classes, batches * batch_size, batch_size, seed)
    return GradientWorkload(method, task_context(task, 0, 1, device, batch_size, seed=seed))


def max_relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """``max_W ‖a_W − b_W‖_F / ‖b_W‖_F`` over the matrices of two gradient estimates."""
    worst = 0.0
    for name, ref in b.items():
        norm = float(ref.double().norm())
        diff = float((a[name].double().cpu() - ref.double().cpu()).norm())
        worst = max(worst, diff / norm if norm else diff)
    return worst


def factor_agreement(factors: dict[str, tuple[Tensor, Tensor]], reference: dict[str, tuple[Tensor, Tensor]],
                     relative_floor: float = 1e-3) -> dict[str, Tensor]:
    """Principal-angle cosines between ``A`` and the reference ``A`` of every matrix, over the leading columns
    whose reference singular value is at least ``relative_floor`` of the largest (directions of zero or noise
    singular value are arbitrary in any estimate, so they are not compared)."""
    out = {}
    for name, (A_ref, S_ref) in reference.items():
        if not S_ref.numel() or float(S_ref[0]) <= 0:
            out[name] = torch.ones(0, dtype=torch.float64)
            continue
        k = int((S_ref >= relative_floor * S_ref[0]).sum())
        out[name] = principal_cosines(factors[name][0][:, :k], A_ref[:, :k])
    return out


def min_factor_cosine(factors: dict[str, tuple[Tensor, Tensor]],
                      reference: dict[str, tuple[Tensor, Tensor]]) -> float:
    """Smallest principal-angle cosine of :func:`factor_agreement` over all matrices."""
    return min((float(c.min()) for c in factor_agreement(factors, reference).values() if c.numel()), default=1.0)


# ---- feature statistics ----------------------------------------------------------------------------------
@dataclass
class FeatureWorkload:
    """Statistics of the projection inputs of one encoder over a stream of token batches ``[B, L, d]``:
    clbench keeps one ``d × d`` covariance per distinct input (q/k/v share theirs, D9: two per block), the
    official code one ``d × (L·B)`` running mean per adapted matrix (four per block)."""

    width: int
    tokens: int
    batch: int
    layers: int
    batches: int
    seed: int = 0
    device: str = "cpu"

    def inputs(self) -> list[Tensor]:
        """The token batches (made before measuring; every layer is fed the same batch: costs only)."""
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.randn(self.batch, self.tokens, self.width, generator=gen).to(self.device)
                for _ in range(self.batches)]

    def clbench(self, inputs: list[Tensor]) -> dict[tuple[int, str], CovarianceAccumulator]:
        stats = {(layer, kind): CovarianceAccumulator(self.width, self.device) for layer in range(self.layers)
                 for kind in ("qkv", "o")}
        for x in inputs:
            for acc in stats.values():
                acc.update(x)
        return stats

    def official(self, inputs: list[Tensor]) -> dict[tuple[int, str], RunningMeanFeatures]:
        stats = {(layer, slot): RunningMeanFeatures(self.width) for layer in range(self.layers)
                 for slot in OFFICIAL_FEATURE_SLOTS}
        for x in inputs:
            for acc in stats.values():
                acc.update(x)
        return stats


def state_bytes(stats: dict) -> int:
    """Bytes held by a dictionary of accumulators."""
    total = 0
    for acc in stats.values():
        total += acc.sum.numel() * acc.sum.element_size() if isinstance(acc, CovarianceAccumulator) else acc.nbytes()
    return total


# ---- evaluation ------------------------------------------------------------------------------------------
@dataclass
class EvalWorkload:
    """One dataset's accuracy: clbench's harness (text features once) vs prompts re-encoded every batch."""

    model: ClipModel
    benchmark: Benchmark
    batch_size: int
    device: torch.device | str = "cpu"

    def clbench(self) -> float:
        method = Method(self.model, NoHparams(), Profiler(device=torch.device(self.device)))
        train = TrainConfig(eval_batch_size=self.batch_size)
        return evaluate(method, self.benchmark, 0, train, "first", torch.device(self.device), Hooks())[0]

    def official(self) -> float:
        return official_accuracy(self.model, self.benchmark.tasks[0], self.batch_size, self.device)


def eval_workload(model: ClipModel, batch_size: int, batches: int, classes: int,
                  device: torch.device | str = "cpu", seed: int = 0) -> EvalWorkload:
    task = random_task(0, model.image_spec, classes, 1, batches * batch_size, seed)
    return EvalWorkload(model, Benchmark("random", 1, [task]), batch_size, device)


@dataclass
class EvalUnitCosts:
    """Seconds per image (image tower, one eval batch), per prompt over the full 77-token context (the official
    text head) and per prompt as clbench encodes it (context cut after the last end-of-text token)."""

    image: float
    prompt_full: float
    prompt_clbench: float


@torch.no_grad()
def eval_unit_costs(work: EvalWorkload, repeats: int = 1) -> EvalUnitCosts:
    """Fastest of interleaved runs of each part of one evaluation batch, on the workload's own data."""
    model, task = work.model, work.benchmark.tasks[0]
    model.eval()
    images = torch.stack([task.test[i][0] for i in range(min(work.batch_size, len(task.test)))]).to(work.device)
    tokens = model.tokenize(task.prompts(0))
    image, full, cut = measure_many([lambda: model.encode_image(images), lambda: official_encode_text(model, tokens),
                                     lambda: model.encode_text(tokens)], repeats, memory=False, device=work.device)
    return EvalUnitCosts(image.seconds / len(images), full.seconds / len(tokens), cut.seconds / len(tokens))


def mtil_eval_projection(costs: EvalUnitCosts, batch_size: int = MTIL_EVAL_BATCH) -> tuple[float, float]:
    """Seconds of one evaluation of all eleven MTIL test sets (clbench, official style) from unit costs: the
    official style re-encodes a dataset's C prompts for each of its ⌈n/B⌉ batches, clbench once per dataset."""
    ours = official = 0.0
    for _, n, classes in MTIL_TEST_SETS:
        batches = -(-n // batch_size)
        ours += n * costs.image + classes * costs.prompt_clbench
        official += n * costs.image + batches * classes * costs.prompt_full
    return ours, official


def mtil_eval_floor(costs: EvalUnitCosts) -> float:
    """Seconds of the image tower alone over the eleven MTIL test sets: a lower bound on any evaluation that
    encodes every test image once at the same precision, whatever it does with the text."""
    return sum(n for _, n, _ in MTIL_TEST_SETS) * costs.image


# ---- training step ---------------------------------------------------------------------------------------
@dataclass
class StepWorkload:
    """One shared training batch (loss, backward, AdamW step per objective) of a method after its ``before_task``."""

    method: Method
    ctx: TaskContext
    step: Callable[[], Tensor]
    images: Tensor
    labels: Tensor


def step_workload(base_model: ClipModel, name: str, batch_size: int, classes: int, principal: bool = True,
                  device: torch.device | str = "cpu", seed: int = 0) -> StepWorkload:
    """Method ``name`` with default hyperparameters on a copy of ``base_model``, prepared for task 0 (for the
    KeepLoRA family: S0 skipped when ``principal`` is false, gradient from one batch; the step's cost does
    not depend on either), and a step function on one fixed batch."""
    cls = get_method(name)
    hparams = cls.Hparams()
    if isinstance(hparams, KeepLoRA.Hparams) and not principal:
        hparams = dataclasses.replace(hparams, eps_w_vision=0.0, eps_w_text=0.0)
    torch.manual_seed(seed)
    method = cls(copy.deepcopy(base_model), hparams, Profiler(device=torch.device(device)))
    task = random_task(0, base_model.image_spec, classes, batch_size, batch_size, seed)
    ctx = task_context(task, 0, 1, device, batch_size, train_steps=1, seed=seed)
    method.setup()
    method.before_task(ctx)
    params = method.trainable_parameters()
    for p in method.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    images, labels = next(iter(ctx.loader(shuffle=False)))
    images, labels = images.to(device), labels.to(device)
    method.train_modules()

    def step() -> Tensor:
        for loss in method.losses(images, labels, ctx):  # one objective per optimiser step (LoDA's GAO: two)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    return StepWorkload(method, ctx, step, images, labels)


# ---- principal basis -------------------------------------------------------------------------------------
def spectral_matrix(n: int, decay: float = SPECTRUM_DECAY, seed: int = 0) -> Tensor:
    """A float32 ``n × n`` weight ``Q₁ diag(σ) Q₂ᵀ`` with random orthogonal ``Q`` and ``σ_i = i^(−decay)``."""
    gen = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    return ((Q1 * sigma) @ Q2.T).float()


def basis_route(W: Tensor, threshold: float, route: str, seed: int = 0) -> Tensor:
    """KeepLoRA S0's principal basis of ``W`` (paper reading) by ``route``: one of clbench's
    (:func:`clbench.linalg.principal_basis` methods: svd in float64, gram_eigh, lowrank, mixed, auto) or
    ``"official"`` (a full float32 ``torch.linalg.svd``, :func:`official_principal_basis`)."""
    if route == "official":
        return official_principal_basis(W, threshold, side="input", rule="paper")
    return principal_basis(W, threshold, side="input", rule="paper", method=route,
                           generator=torch.Generator().manual_seed(seed))


# ---- gradient on a fraction of the batches ---------------------------------------------------------------
@dataclass
class FractionPoint:
    fraction: float
    batches: int
    seconds: float
    mean_cosine: float  # mean over matrices of the mean principal-angle cosine of A_f vs A_1
    min_cosine: float  # smallest mean cosine over the matrices


def fraction_curve(workload: GradientWorkload, fractions: tuple[float, ...] = (1.0, 0.5, 0.2, 0.1),
                   device: torch.device | str = "cpu") -> list[FractionPoint]:
    """Time of S1 on the first share of the batches and agreement of its ``A`` with the full pass's."""
    method = workload.method
    full = None
    points = []
    total = len(workload.ctx.loader(drop_last=True))
    for fraction in sorted(fractions, reverse=True):
        method.hparams = dataclasses.replace(method.hparams, grad_fraction=fraction)
        timed = measure(workload.clbench, memory=False, device=device)
        factors = workload.initial_factors(timed.value)
        if full is None:
            if fraction != 1.0:
                raise ValueError("the fractions must include 1.0 (the reference pass)")
            full = factors
        means = [float(c.mean()) for c in factor_agreement(factors, full).values() if c.numel()]
        points.append(FractionPoint(fraction, max(1, round(total * fraction)), timed.seconds,
                                    sum(means) / len(means), min(means)))
    method.hparams = dataclasses.replace(method.hparams, grad_fraction=1.0)
    return points
