"""InfLoRA (Liang & Li, CVPR 2024) on CLIP: interference-free LoRA on k and v, with a DualGPM memory of the
old tasks' input subspace (Liang & Li, CVPR 2024; official code liangyanshuo/InfLoRA).

Per task t and attention block (one site = one block of one encoder):

1. ``feature_stats``: the uncentered covariance ``C_t`` of the block's q/k/v input (post-LN1 tokens; every
   token of every training image; for the text tower, the tokens of the current class prompts, padding
   included, as KeepLoRA does) with the current model [code; text tower: adapted].
2. ``feature_svd``: project with the memory — ``Ĉ = C − M Mᵀ C`` (remove basis M = old inputs) or
   ``Ĉ = R Rᵀ C`` (retain basis R = free directions) — and take ``D_t = U[:, :r]ᵀ/√3`` from ``SVD(Ĉ)``
   [code; the 1/√3 row scale is the code's constant]. Singular vectors of ``Ĉ`` with non-zero singular value
   already lie in the free space; the remaining (degenerate) ones are projected onto it, so ``D_t`` is
   exactly orthogonal to the memory even when the free space has fewer than r directions [adapted].
3. ``D_t`` is a frozen buffer shared by k and v; the trainable up-projections ``U_t^k, U_t^v`` start at
   zero (``ΔW = U D``, scale 1) [code]. The trainable set is exactly the current task's two up-projections
   per site, looked up by exact adapter name (no substring matching, InfLoRA issue #13) [adapted].
4. After training: ``feature_stats`` again with the trained model, ``memory_update`` (DualGPM with the
   threshold ``ε_t = lamb + (lame − lamb)·t/T``, energy = squared eigenvalues of ``C``, DualGPM as in the code), then
   ``merge`` (``W ← W + U D``), so old tasks cost nothing at training or inference time [code]. The design,
   the memory update and the merge run in float32/float64 whatever the caller's autocast
   (:func:`clbench.linalg.full_precision`; the harness wraps the hooks in fp16 autocast under
   ``--precision amp``, which the feature passes follow).

Defaults as the official code: k and v (not q, not o) of every block of the vision tower
(the code's ViT has no text tower), rank r = 10, ε from ``lamb = 0.98`` (the code's ImageNet-R configs; 0.95
in its CIFAR-100/DomainNet ones) rising towards ``lame = 1.0`` [code]. ``encoders=vision,text`` adds the
text tower with the same rule, a variant [adapted]. The per-task linear heads of the class-incremental
paper are replaced by CLIP's text head (MTIL), trained through CLIP's cross-entropy [adapted]. Guard rails
for degenerate spectra (never taking more directions than carry energy) do not change the result in
non-degenerate cases [adapted].

Training recipe (``--preset paper``): the code's Adam (β = 0.9, 0.999), lr 5e-4, weight decay 0, and its
``CosineSchedule`` (CODA-Prompt's quarter cosine, ``train.schedule=coda_cosine``) [code]. Adapted to MTIL: the
protocol's per-dataset epochs and batch 64 (the code: 50 epochs, batch 128 on ImageNet-R), so every adapter
method gets the same data budget; the schedule advances per step rather than per epoch [adapted].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from clbench.datasets.base import Task
from clbench.linalg import COMPUTE_DTYPE, RELATIVE_ENERGY_FLOOR, CovarianceAccumulator, full_precision
from clbench.methods.base import Method, TaskContext
from clbench.methods.lora import encoder_list, merge_adapters
from clbench.methods.recipes import SAME_ADAPTER_BUDGET, RecipeCard, adapted, code
from clbench.methods.registry import register_method
from clbench.methods.state_checks import StateMismatch, expect_basis, expect_keys, extra_entry
from clbench.models.attention import LowRankDelta
from clbench.models.clip import AttentionSite, ClipModel

Kind = Literal["remove", "retain"]
ROW_SCALE = 1 / math.sqrt(3)  # the official code's D = Uᵀ/√3


# ---- pure linear algebra -------------------------------------------------------------------------------
@dataclass
class DualMemory:
    """A DualGPM memory of one site: ``basis`` spans the old inputs (``remove``) or the free space (``retain``)."""

    basis: Tensor  # d × k, orthonormal columns
    kind: Kind = "remove"

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def protected_dim(self) -> int:
        """Dimension of the protected (old-input) subspace."""
        k = int(self.basis.shape[1])
        return k if self.kind == "remove" else self.dim - k

    def protected_basis(self) -> Tensor:
        """An orthonormal basis of the protected subspace (the complement of R for a retain memory)."""
        if self.kind == "remove":
            return self.basis
        return complement(self.basis)


def complement(basis: Tensor) -> Tensor:
    """Orthonormal basis of ``span(basis)^⊥`` (``d × (d − k)``), from the full SVD as the official code does."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    U, _, _ = torch.linalg.svd(basis.to(COMPUTE_DTYPE), full_matrices=True)
    return U[:, k:].to(basis.dtype)


def threshold_schedule(lamb: float, lame: float, task: int, num_tasks: int) -> float:
    """``ε_t = lamb + (lame − lamb)·t/T`` (t 0-based, T = number of tasks) [code]."""
    return lamb + (lame - lamb) * task / max(num_tasks, 1)


def project_with_memory(C: Tensor, memory: DualMemory | None) -> Tensor:
    """``Ĉ = C − M Mᵀ C`` (remove) or ``Ĉ = R Rᵀ C`` (retain); ``C`` itself without memory."""
    if memory is None:
        return C
    B = memory.basis.to(device=C.device, dtype=C.dtype)
    if memory.kind == "remove":
        return C - B @ (B.T @ C)
    return B @ (B.T @ C)


def free_projector(memory: DualMemory | None, d: int, dtype: torch.dtype = COMPUTE_DTYPE,
                   device: torch.device | str | None = None) -> Tensor:
    """The orthogonal projector onto the free (unprotected) space."""
    eye = torch.eye(d, dtype=dtype, device=device)
    if memory is None:
        return eye
    B = memory.basis.to(device=device, dtype=dtype)
    return eye - B @ B.T if memory.kind == "remove" else B @ B.T


@full_precision()
def design_down(C: Tensor, memory: DualMemory | None, rank: int, row_scale: float = ROW_SCALE) -> Tensor:
    """InfLoRA's down-projection ``D = U[:, :r]ᵀ·row_scale`` from ``SVD(Ĉ)`` (``r × d``, float32).

    Columns of ``U`` are projected onto the free space (a no-op for those with non-zero singular value), so
    ``D`` is orthogonal to the protected subspace also when ``Ĉ`` has rank below ``r``.
    """
    d = C.shape[0]
    C_hat = project_with_memory(C.detach().to(COMPUTE_DTYPE), memory)
    U, _, _ = torch.linalg.svd(C_hat)
    U = free_projector(memory, d, device=C.device) @ U[:, : min(rank, d)]
    return (U.T * row_scale).float().contiguous()


def _svd_energy(C: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors of ``C`` and the code's energies ``S²`` (squared singular values), float64."""
    U, S, _ = torch.linalg.svd(C.to(COMPUTE_DTYPE))
    return U, S**2


@full_precision()
def dual_gpm_update(memory: DualMemory | None, C: Tensor, threshold: float) -> DualMemory:
    """One DualGPM step (Liang & Li 2024, ``methods/inflora.py``) with the post-training covariance ``C`` of a site.

    Energies are squared singular values of the covariance (the code's quirk, kept). First task: keep the
    ``#{i : cumsum(S²)/ΣS² < ε}`` (at least 1) top directions as a remove basis. Remove basis: append top
    residual directions of ``C − M Mᵀ C`` while the captured fraction is ``< ε`` (cap d). Retain basis:
    take top directions of ``R Rᵀ C`` while the remaining fraction is ``≥ 1 − ε`` and shrink ``R`` by them.
    Finally a remove basis of more than d/2 columns becomes the retain basis of its complement, so the
    stored basis never exceeds d/2 columns. Directions with (relative) zero energy are never counted.
    """
    C = C.detach().to(COMPUTE_DTYPE)
    d = C.shape[0]
    U, energy = _svd_energy(C)
    total = float(energy.sum())
    if total <= 0:
        return memory if memory is not None else DualMemory(torch.zeros(d, 0, device=C.device))
    if memory is None or (memory.kind == "remove" and memory.basis.shape[1] == 0):
        ratios = torch.cumsum(energy, 0) / total
        k = max(int((ratios < threshold).sum()), 1)
        new = DualMemory(U[:, :k].float(), "remove")
    elif memory.kind == "remove":
        M = memory.basis.to(device=C.device, dtype=COMPUTE_DTYPE)
        U_hat, e_hat = _svd_energy(C - M @ (M.T @ C))
        accumulated = (total - float(e_hat.sum())) / total
        r = 0
        for value in _usable(e_hat, total).tolist():
            if accumulated >= threshold:
                break
            accumulated += value / total
            r += 1
        basis = torch.cat([M, U_hat[:, :r]], dim=1)[:, :d] if r else M
        new = DualMemory(basis.float(), "remove")
    else:
        R = memory.basis.to(device=C.device, dtype=COMPUTE_DTYPE)
        U_hat, e_hat = _svd_energy(R @ (R.T @ C))
        remaining = float(e_hat.sum()) / total
        r = 0
        if remaining >= 1 - threshold:
            for value in _usable(e_hat, total)[: R.shape[1]].tolist():
                if remaining < 1 - threshold:
                    break
                remaining -= value / total
                r += 1
        if r:
            shrunk = R - U_hat[:, :r] @ (U_hat[:, :r].T @ R)
            Ui, _, _ = torch.linalg.svd(shrunk, full_matrices=False)
            new = DualMemory(Ui[:, : R.shape[1] - r].float(), "retain")
        else:
            new = DualMemory(memory.basis.float(), "retain")
    if new.kind == "remove" and new.basis.shape[1] > d / 2:
        new = DualMemory(complement(new.basis), "retain")
    return new


def _usable(energies: Tensor, total: float) -> Tensor:
    """The leading energies that are not numerical zeros."""
    return energies[energies > RELATIVE_ENERGY_FLOOR * total]


# ---- feature statistics (shared with LoDA) -------------------------------------------------------------
@torch.no_grad()
def qkv_input_covariances(model: ClipModel, sites: Sequence[AttentionSite], task: TaskContext) -> dict[str, Tensor]:
    """Mean uncentered covariance ``(1/N) Σ x xᵀ`` (float64, ``d × d``) of every site's q/k/v input.

    Vision sites see every token of every training image of the task (one pass, no augmentation beyond
    the loader's); text sites see every token of the task's class prompts.
    """
    accumulators = {s.name: CovarianceAccumulator(s.width, device=model.device) for s in sites}
    removers = []
    for site in sites:
        acc = accumulators[site.name]
        removers.append(site.module.add_observer(lambda kind, x, acc=acc: acc.update(x) if kind == "qkv" else None))
    was_training = model.training
    model.eval()
    try:
        if any(s.encoder == "vision" for s in sites):
            for images, _ in task.batches(drop_last=False):
                model.encode_image(images)
        if any(s.encoder == "text" for s in sites):
            model.encode_text(model.tokenize(task.prompts))
    finally:
        for remove in removers:
            remove()
        model.train(was_training)
    return {name: acc.mean() for name, acc in accumulators.items()}


# ---- the method ----------------------------------------------------------------------------------------
@dataclass
class InfLoRAHparams:
    rank: int = field(default=10, metadata={"min": 1, "max_width": True})
    lamb: float = field(default=0.98, metadata={"min": 0.0, "max": 1.0})
    lame: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    encoders: str = field(default="vision", metadata={"subset_of": ("vision", "text")})


@register_method("inflora")
class InfLoRA(Method):
    """InfLoRA: frozen down-projections orthogonal to old inputs, trained up-projections, DualGPM memory."""

    summary = "InfLoRA on k,v: down-projection off the old-input memory (DualGPM), merged after each task"
    Hparams = InfLoRAHparams
    projections = ("k", "v")

    def __init__(self, model: ClipModel, hparams: InfLoRAHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.memory: dict[str, DualMemory] = {}
        self.adapter = ""
        self._kinds: dict[str, Kind] = {}

    def sites(self) -> list[AttentionSite]:
        return self.model.attention_sites(encoder_list(self.hparams.encoders))

    def before_task(self, task: TaskContext) -> None:
        """Design ``D_t`` per site from the projected input covariance; add zero up-projections for k and v."""
        sites = self.sites()
        with self.profiler.section("feature_stats"):
            covariances = qkv_input_covariances(self.model, sites, task)
        self.adapter = f"inflora_task{task.index}"
        with self.profiler.section("feature_svd"):
            downs = {s.name: design_down(covariances[s.name], self.memory.get(s.name), self.hparams.rank)
                     for s in sites}
        for site in sites:
            down = downs[site.name].to(self.model.device)
            for proj in self.projections:
                zero_up = torch.zeros(site.width, down.shape[0], device=down.device)
                site.module.add_adapter(proj, self.adapter, LowRankDelta(down, zero_up, 1.0, train_down=False))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the current task's up-projections (``U_t^k, U_t^v`` of every site), by exact name."""
        params = []
        for site in self.sites():
            for proj in self.projections:
                params.append(site.module.adapters[proj][self.adapter].up)
        return params

    def after_task(self, task: TaskContext) -> None:
        """DualGPM update with the trained model's input covariance, then merge the task's adapters."""
        sites = self.sites()
        with self.profiler.section("feature_stats"):
            covariances = qkv_input_covariances(self.model, sites, task)
        threshold = threshold_schedule(self.hparams.lamb, self.hparams.lame, task.index, task.num_tasks)
        with self.profiler.section("memory_update"):
            for site in sites:
                self.memory[site.name] = dual_gpm_update(self.memory.get(site.name), covariances[site.name],
                                                         threshold)
        with self.profiler.section("merge"):
            merge_adapters(sites, self.adapter)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {f"memory.{name}": m.basis.contiguous() for name, m in self.memory.items()}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """After the first task, one memory per site: a ``d × k`` basis (``d`` the site's width, ``k ≤ d``,
        growing over tasks), finite; ``kinds`` names each memory's kind (``remove`` or ``retain``)."""
        widths = {f"memory.{s.name}": s.width for s in self.sites()} if tasks else {}
        expect_keys(state, widths)
        for key, width in widths.items():
            expect_basis(key, state[key], width)
        expect_keys(extra, ("kinds",), entry=extra_entry)
        kinds = extra["kinds"]
        if not isinstance(kinds, dict):
            raise StateMismatch(extra_entry("kinds"), f"is a {type(kinds).__name__}, expected an object of "
                                                      "memory kinds")
        expect_keys(kinds, widths, entry=lambda key: extra_entry(f"kinds.{key}"))
        for key, kind in kinds.items():
            if kind not in ("remove", "retain"):
                raise StateMismatch(extra_entry(f"kinds.{key}"), f"is {kind!r}, expected 'remove' or 'retain'")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.memory = {key.removeprefix("memory."): DualMemory(value.float(), self._kinds.get(key, "remove"))
                       for key, value in state.items()}

    def extra_state(self) -> dict:
        return {"kinds": {f"memory.{name}": m.kind for name, m in self.memory.items()}}

    def load_extra_state(self, extra: dict) -> None:
        self._kinds = dict(extra.get("kinds", {}))
        for key, kind in self._kinds.items():
            name = key.removeprefix("memory.")
            if name in self.memory:
                self.memory[name].kind = kind

    def state_bytes(self) -> dict[str, int]:
        return {"memory": sum(m.basis.numel() * m.basis.element_size() for m in self.memory.values())}


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
RECIPES = {
    "inflora": RecipeCard(
        "InfLoRA (Liang & Li, CVPR 2024), official code liangyanshuo/InfLoRA@e08b00e",
        {"train.optimizer": code("Adam with its default betas"),
         "train.lr": code("configs/*.json (ImageNet-R, CIFAR-100)"),
         "train.weight_decay": code("configs/*.json"),
         "train.schedule": code("cosine decay (per step here, per epoch in the code)"),
         "train.warmup_steps": code("no warm-up"),
         "train.epochs": adapted(f"{SAME_ADAPTER_BUDGET} (the code: 50 epochs on ImageNet-R)"),
         "train.max_steps": adapted("no step cap, as the epochs decide"),
         "train.batch_size": adapted(f"{SAME_ADAPTER_BUDGET} (the code: 128)"),
         "rank": code("configs/*.json (CIFAR-100, ImageNet-R)"),
         "lamb": code("the ImageNet-R configs (CIFAR-100/DomainNet start lower)"),
         "lame": code("configs/*.json; ε rises from lamb to lame over the tasks"),
         "encoders": code("vision tower, k and v (the code's ViT has no text tower); 'vision,text' is a variant")}),
}
