"""LoDA (He et al., ICML 2026; ``dLoRA`` in the official code) on CLIP: a general and a task-specific
low-rank branch with fixed down-projections from two energy objectives, gradient-aligned optimisation
(GAO) and a closed-form recalibration of the general update before merging
(official code HHHLF/LoDA_ICML2026; the paper's full text was not available, so this follows the
official code).

Per task t and attention block (site), with ``Σ_t`` the uncentered covariance of the block's q/k/v input
(``feature_stats``; vision: all tokens of the task's training images; text: the tokens of the current class
prompts) and the history ``H_t = Σ_{j<t} (Σ_j^pre + Σ_j^post)`` [code]:

- ``feature_svd`` — general branch: ``D_G`` = top-r eigenvectors of ``Σ_t + H_t`` (max ``tr(Q(Σ_t+H_t)Qᵀ)``),
  rows scaled 1/√3; isolated branch (t ≥ 1): the top-r generalized eigenvectors of ``(Σ_t, H_t)`` (max
  ``uᵀΣ_t u / uᵀH_t u``) via Cholesky ``H_t + εI = LLᵀ`` (ε from 1e-12, ×10 until it succeeds),
  ``K = L⁻¹Σ_t L⁻ᵀ``, ``Q = L⁻ᵀ V_r``, QR-orthonormalised, rows scaled 1/√3 [code].
- Forward: ``qkv = W x + γ_G U_G D_G x + γ_I U_I D_I x`` with ``γ_G = 0.25``, ``γ_I = 0.5`` (the code's
  0.5 and 1.0, halved by ``avg``); ``U`` zero-initialised and trained; ``D`` frozen except ``D_G`` on the
  first task, which is trained too (one ``D_G`` per site shared by q, k and v, as the code's fused
  ``3d × d`` qkv linear) [code].
- GAO: the batch's classes are split at random into two groups, ``u ~ U(0,1)`` is drawn once; for each
  order (src, tgt) = (g1, g2), (g2, g1): ``g = ∇L_src(θ)``, the LoRA weights move to ``θ' = θ − ρu·g/‖g‖``,
  the target group's loss at ``θ'`` is back-propagated, **one optimiser step** is taken, and the move is
  subtracted again — two optimiser steps per batch, the second one's source gradient taken after the first
  step [code: ``perturb_and_train``]. ``‖g‖`` is the norm of one *official tensor*: the code has one fused
  ``3d × r`` up-projection per branch and block, so the q, k and v up-projections of a branch are
  normalised together, and the shared ``D_G`` of the first task on its own. The harness's
  :meth:`LoDA.losses` yields the two target losses and restores the weights after each step. Batches with
  fewer than two classes take one plain step. ``gao=false`` trains with the plain loss.
- After the task: ``feature_stats`` with the trained model gives ``Σ_t``; ``recalibration``: for each
  rank-1 component ``i`` of the general branch (``a_i`` = row i of ``D_G``), ``p_i = a_iᵀH_t a_i``,
  ``c_i = a_iᵀΣ_t a_i``, ``η_i = p_i/(p_i + γ_m c_i + 1e-12)`` (γ_m = 3) and the general update is merged
  as ``Σ_i (1 − η_i) b_i a_iᵀ``; the isolated update is merged unscaled; no recalibration on the first
  task [code]. Then ``H ← H + Σ_t^pre`` and, after merging, ``H ← H + Σ_t^post`` (a second pass; on the
  first task the merge is exact, so ``Σ^post = Σ^pre`` and that pass is skipped) [code; ``history_twice``
  = false counts each task once]. The designs, the recalibration and the merge run in float32/float64
  whatever the caller's autocast (:func:`clbench.linalg.full_precision`; the feature passes follow it).

Training recipe (``--preset paper``): the code's SGD with momentum 0.9, weight decay 5e-4, cosine decay and
lr 0.005 (its CIFAR-100 and CUB configs) [code]. Adapted to MTIL: the protocol's per-dataset epochs and batch
64 (the code: 20 epochs, batch 48), so every adapter method gets the same data budget; the cosine decays per
step rather than per epoch [adapted].

Placement: q, k and v of every block of the vision tower (the code's ViT has no text tower)
[code]; ``encoders=vision,text`` adds the text tower with the same rule, a variant [adapted].

Adapted to CLIP: the loss is CLIP's cross-entropy with its learned logit scale over the current task's
class prompts instead of the code's CosFace on a per-task cosine head (s = 20, margin m): MTIL classifies
with CLIP's text head, which has no per-task linear layer to train [adapted].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.datasets.base import Task
from clbench.linalg import COMPUTE_DTYPE, full_precision
from clbench.methods.base import Method, TaskContext
from clbench.methods.inflora import qkv_input_covariances
from clbench.methods.lora import encoder_list
from clbench.methods.recipes import SAME_ADAPTER_BUDGET, RecipeCard, adapted, code
from clbench.methods.registry import register_method
from clbench.methods.state_checks import (
    StateMismatch,
    describe,
    expect_keys,
    expect_tensor,
    extra_entry,
    tensor_entry,
)
from clbench.models.attention import LowRankDelta
from clbench.models.clip import AttentionSite, ClipModel

ROW_SCALE = 1 / math.sqrt(3)
GENERAL, ISOLATED = "loda_general", "loda_isolated"
PROJECTIONS = ("q", "k", "v")


# ---- pure linear algebra -------------------------------------------------------------------------------
@full_precision()
def general_down(sigma: Tensor, history: Tensor | None, rank: int, row_scale: float = ROW_SCALE) -> Tensor:
    """``D_G`` (``r × d``): the top-r eigenvectors of ``Σ_t + H_t`` as rows, scaled (max ``tr(Q(Σ+H)Qᵀ)``)."""
    total = sigma.to(COMPUTE_DTYPE) + (0 if history is None else history.to(sigma.device, COMPUTE_DTYPE))
    _, vecs = torch.linalg.eigh(total)
    return (vecs.flip(1)[:, :rank].T * row_scale).float().contiguous()


def jittered_cholesky(H: Tensor, start: float = 1e-12, factor: float = 10.0, tries: int = 40) -> Tensor:
    """Lower ``L`` with ``LLᵀ = H + εI``; ε starts at ``start`` and grows by ``factor`` until H + εI is SPD."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    eps = start
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + eps * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L
        eps *= factor
    raise ValueError("the history covariance could not be made positive definite")


@full_precision()
def isolated_down(sigma: Tensor, history: Tensor, rank: int, row_scale: float = ROW_SCALE) -> Tensor:
    """``D_I`` (``r × d``): an orthonormal basis of the top-r generalized eigenvectors of ``(Σ_t, H_t)``.

    Maximises ``uᵀΣu / uᵀHu``: Cholesky ``H + εI = LLᵀ``, ``K = L⁻¹ΣL⁻ᵀ``, ``Q = L⁻ᵀV_r`` with ``V_r`` the
    top-r eigenvectors of ``K``, then QR (same span, orthonormal rows), rows scaled.
    """
    S = sigma.to(COMPUTE_DTYPE)
    H = history.to(S.device, COMPUTE_DTYPE)
    L = jittered_cholesky(H)
    left = torch.linalg.solve_triangular(L, S, upper=False)  # L⁻¹Σ
    K = torch.linalg.solve_triangular(L, left.T, upper=False)  # L⁻¹ΣL⁻ᵀ (Σ symmetric)
    K = 0.5 * (K + K.T)
    _, V = torch.linalg.eigh(K)
    Q = torch.linalg.solve_triangular(L.T, V.flip(1)[:, :rank], upper=True)  # L⁻ᵀV_r
    Q, _ = torch.linalg.qr(Q)
    return (Q.T * row_scale).float().contiguous()


@full_precision()
def recalibration_factors(down: Tensor, history: Tensor, sigma: Tensor, merge_gamma: float = 3.0,
                          eps: float = 1e-12) -> Tensor:
    """``κ_i = 1 − η_i``, ``η_i = p_i/(p_i + γ_m c_i + ε)``, ``p_i = a_iᵀHa_i``, ``c_i = a_iᵀΣa_i`` (a_i = row i).

    ``κ_i`` minimises ``p_i κ² + γ_m c_i (1 − κ)²``: old tasks (energy p along a_i) prefer no change, the
    new task (energy c) the full update.
    """
    A = down.to(COMPUTE_DTYPE)
    p = ((A @ history.to(A.device, COMPUTE_DTYPE)) * A).sum(1)
    c = ((A @ sigma.to(A.device, COMPUTE_DTYPE)) * A).sum(1)
    return 1 - p / (p + merge_gamma * c + eps)


@full_precision()
def recalibrated_delta(up: Tensor, down: Tensor, scale: float, kappa: Tensor) -> Tensor:
    """``Σ_i κ_i b_i a_iᵀ`` with ``b_i`` = column i of ``scale·up`` and ``a_i`` = row i of ``down``, in the
    factors' dtype whatever the caller's autocast (the harness wraps ``after_task`` in it)."""
    return (scale * up.detach() * kappa.to(up.dtype)) @ down.detach()


def split_classes(labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor] | None:
    """Boolean masks of two random halves of the classes present (``None`` with fewer than two classes)."""
    classes = labels.unique()
    if len(classes) < 2:
        return None
    order = torch.randperm(len(classes), generator=generator)
    first = classes[order[: len(classes) // 2].to(classes.device)]
    mask = torch.isin(labels, first)
    return mask, ~mask


def fused_perturbation(grads: list[Tensor | None], params: list[Tensor], groups: list[list[int]],
                       step: float) -> list[Tensor]:
    """``−step·g/(‖g‖ + 1e-12)`` with ``‖g‖`` the norm over each group of tensors (one official fused tensor).

    ``groups`` lists the indices into ``params`` that form one tensor of the official code; a missing
    gradient counts as zero.
    """
    out = [torch.zeros_like(p) for p in params]
    for group in groups:
        present = [i for i in group if grads[i] is not None]
        if not present:
            continue
        norm = torch.sqrt(sum(grads[i].pow(2).sum() for i in present)) + 1e-12
        for i in present:
            out[i] = -step * grads[i] / norm
    return out


def _apply(params: list[Tensor], deltas: list[Tensor], sign: float = 1.0) -> None:
    with torch.no_grad():
        for p, d in zip(params, deltas, strict=True):
            p.add_(d, alpha=sign)


def gao_objectives(group_loss: Callable[[Tensor], Tensor], params: list[Tensor], groups: list[list[int]],
                   classes: tuple[Tensor, Tensor], rho: float, u: float) -> Iterator[Tensor]:
    """GAO's two target losses, each to be followed by one optimiser step (the official ``perturb_and_train``).

    For (src, tgt) in ((g1, g2), (g2, g1)): ``δ = −ρu·∇L_src/‖·‖`` (per fused group) is added to ``params``,
    ``L_tgt`` at the moved weights is yielded (the caller steps), then ``δ`` is subtracted — also when the
    caller stops early.
    """
    step = rho * u
    for src, tgt in ((classes[0], classes[1]), (classes[1], classes[0])):
        grads = torch.autograd.grad(group_loss(src), params, allow_unused=True)
        delta = fused_perturbation(list(grads), params, groups, step)
        _apply(params, delta)
        try:
            yield group_loss(tgt)
        finally:
            _apply(params, delta, -1.0)


# ---- the method ----------------------------------------------------------------------------------------
@dataclass
class LoDAHparams:
    rank: int = field(default=32, metadata={"min": 1, "max_width": True})
    gamma_general: float = field(default=0.25, metadata={"min": 0.0})
    gamma_isolated: float = field(default=0.5, metadata={"min": 0.0})
    merge_gamma: float = field(default=3.0, metadata={"min": 0.0})
    rho: float = field(default=0.3, metadata={"min": 0.0})
    gao: bool = True
    history_twice: bool = True
    encoders: str = field(default="vision", metadata={"subset_of": ("vision", "text")})


@register_method("loda")
class LoDA(Method):
    """LoDA: general + task-specific LoRA branches with designed down-projections, GAO, recalibrated merge."""

    summary = "LoDA on q,k,v: general/isolated branches from energy objectives, GAO, recalibrated merge"
    Hparams = LoDAHparams

    def __init__(self, model: ClipModel, hparams: LoDAHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.history: dict[str, Tensor] = {}
        self.task_index = 0

    def sites(self) -> list[AttentionSite]:
        return self.model.attention_sites(encoder_list(self.hparams.encoders))

    # ---- lifecycle ----------------------------------------------------------------------------------
    def before_task(self, task: TaskContext) -> None:
        """Design ``D_G`` (and ``D_I`` from the second task) per site; add zero-initialised up-projections."""
        hp, sites = self.hparams, self.sites()
        self.task_index = task.index
        with self.profiler.section("feature_stats"):
            sigma = qkv_input_covariances(self.model, sites, task)
        first = not self.history
        with self.profiler.section("feature_svd"):
            downs = {}
            for s in sites:
                hist = self.history.get(s.name)
                rank = min(hp.rank, s.width)
                g = general_down(sigma[s.name], hist, rank)
                i = None if first else isolated_down(sigma[s.name], hist, rank)
                downs[s.name] = (g, i)
        for site in sites:
            general, isolated = downs[site.name]
            self._add_branch(site, GENERAL, general, hp.gamma_general, train_down=first)
            if isolated is not None:
                self._add_branch(site, ISOLATED, isolated, hp.gamma_isolated, train_down=False)

    def _add_branch(self, site: AttentionSite, name: str, down: Tensor, scale: float, train_down: bool) -> None:
        """One adapter per q/k/v sharing a single ``down`` (the fused-qkv layout of the code)."""
        shared = None
        for proj in PROJECTIONS:
            zero_up = torch.zeros(site.width, down.shape[0], device=down.device)
            site.module.add_adapter(proj, name, LowRankDelta(down, zero_up, scale, train_down=train_down))
            delta = site.module.adapters[proj][name]
            if shared is None:
                shared = delta.down
            elif train_down:
                delta.down = shared  # the same Parameter object in all three

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every branch's up-projections, plus the shared ``D_G`` on the first task."""
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for site in self.sites():
            for proj in PROJECTIONS:
                for name, delta in site.module.adapters[proj].items():
                    if name not in (GENERAL, ISOLATED):
                        continue
                    for p in (delta.up, delta.down):
                        if isinstance(p, nn.Parameter) and id(p) not in seen:
                            seen.add(id(p))
                            params.append(p)
        return params

    def _ce(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        text = self.model.encode_text(self.model.tokenize(task.prompts))
        return F.cross_entropy(self.model.logit_scale() * self.model.encode_image(images) @ text.T, labels)

    def perturbation_groups(self) -> tuple[list[nn.Parameter], list[list[int]]]:
        """The trainable parameters and GAO's normalisation groups over them: per site and branch the q, k and
        v up-projections together (the code's one fused ``3d × r`` tensor), and the shared ``D_G`` alone."""
        params = self.trainable_parameters()
        index = {id(p): i for i, p in enumerate(params)}
        groups: list[list[int]] = []
        for site in self.sites():
            adapters = site.module.adapters
            for name in (GENERAL, ISOLATED):
                if name not in adapters["q"]:
                    continue
                groups.append([index[id(adapters[proj][name].up)] for proj in PROJECTIONS])
                down = adapters["q"][name].down
                if isinstance(down, nn.Parameter):
                    groups.append([index[id(down)]])
        return params, groups

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        """The plain objective: CE over CLIP logits of the current task's classes."""
        return self._ce(images, labels, task)

    def losses(self, images: Tensor, labels: Tensor, task: TaskContext) -> Iterator[Tensor]:
        """GAO: two target-group losses at source-perturbed weights, one optimiser step after each (plain CE
        and one step if GAO is off or the batch holds one class)."""
        classes = split_classes(labels) if self.hparams.gao else None
        if classes is None:
            yield self._ce(images, labels, task)
            return
        params, groups = self.perturbation_groups()
        u = float(torch.rand(()))

        def group_loss(mask: Tensor) -> Tensor:
            return self._ce(images[mask], labels[mask], task)

        yield from gao_objectives(group_loss, params, groups, classes, self.hparams.rho, u)

    def after_task(self, task: TaskContext) -> None:
        """Σ_t with the trained model, recalibrated merge, history update (pre- and post-merge)."""
        hp, sites = self.hparams, self.sites()
        with self.profiler.section("feature_stats"):
            sigma = qkv_input_covariances(self.model, sites, task)
        recalibrate = bool(self.history)
        with self.profiler.section("merge"):
            for site in sites:
                self._merge_site(site, sigma[site.name] if recalibrate else None)
        for site in sites:
            old = self.history.get(site.name)
            self.history[site.name] = sigma[site.name] if old is None else old + sigma[site.name]
        if hp.history_twice:
            if recalibrate:
                with self.profiler.section("feature_stats"):
                    post = qkv_input_covariances(self.model, sites, task)
            else:
                post = sigma  # first task: the merge is exact, the post-merge statistics are the same
            for site in sites:
                self.history[site.name] = self.history[site.name] + post[site.name]

    def _merge_site(self, site: AttentionSite, sigma: Tensor | None) -> None:
        """``W ← W + Σ_i κ_i b_i a_iᵀ + γ_I U_I D_I`` (κ = 1 without recalibration) for q, k and v, in float32
        whatever the caller's autocast."""
        with full_precision():
            self._merge_site_fp32(site, sigma)

    def _merge_site_fp32(self, site: AttentionSite, sigma: Tensor | None) -> None:
        module = site.module
        kappa = None
        if sigma is not None:
            down = module.adapters["q"][GENERAL].down
            with self.profiler.section("recalibration"):
                kappa = recalibration_factors(down, self.history[site.name], sigma, self.hparams.merge_gamma)
        for proj in PROJECTIONS:
            general = module.remove_adapter(proj, GENERAL)
            if kappa is None:
                module.add_to_weight(proj, general.delta().detach())
            else:
                module.add_to_weight(proj, recalibrated_delta(general.up, general.down, general.scale, kappa))
            if ISOLATED in module.adapters[proj]:
                module.merge_adapter(proj, ISOLATED)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {f"history.{name}": h.contiguous() for name, h in self.history.items()}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """After the first task, one history per site: a finite symmetric ``d × d`` covariance sum (``d`` the
        site's width); no JSON state."""
        widths = {f"history.{s.name}": s.width for s in self.sites()} if tasks else {}
        expect_keys(state, widths)
        for key, width in widths.items():
            H = state[key]
            expect_tensor(key, H, shape=(width, width), floating=True, finite=True)
            # eigh reads one triangle only: an asymmetric history would be used silently (rounding passes)
            if H.numel() and float((H - H.T).abs().max()) > 1e-3 * float(H.abs().max()):
                raise StateMismatch(tensor_entry(key), f"is {describe(H)} and not symmetric, expected a "
                                                       "covariance sum")
        expect_keys(extra, (), entry=extra_entry)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history = {key.removeprefix("history."): value for key, value in state.items()}

    def state_bytes(self) -> dict[str, int]:
        return {"history": sum(h.numel() * h.element_size() for h in self.history.values())}


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
RECIPES = {
    "loda": RecipeCard(
        "LoDA (He et al., ICML 2026; 'dLoRA' in the code), official code HHHLF/LoDA_ICML2026@92f8ba8",
        {"train.optimizer": code("SGD"),
         "train.momentum": code("methods/dlora.py"),
         "train.lr": code("exps/dlora/cifar10.json and cub10.json"),
         "train.weight_decay": code("exps/dlora/*.json"),
         "train.schedule": code("cosine decay (per step here, per epoch in the code)"),
         "train.warmup_steps": code("no warm-up"),
         "train.epochs": adapted(f"{SAME_ADAPTER_BUDGET} (the code: 20 epochs)"),
         "train.max_steps": adapted("no step cap, as the epochs decide"),
         "train.batch_size": adapted(f"{SAME_ADAPTER_BUDGET} (the code: 48)"),
         "rank": code("exps/dlora/*.json (64 on ImageNet-R)"),
         "gamma_general": code("slora_gamma halved by avg"),
         "gamma_isolated": code("plora_gamma halved by avg"),
         "merge_gamma": code("merge_gamma of the closed-form recalibration"),
         "rho": code("exps/dlora/*.json (0.7 on ImageNet-R)"),
         "gao": code("gradient-aligned optimisation, two optimiser steps per batch"),
         "history_twice": code("each old task's covariance counted twice (before and after merging)"),
         "encoders": code("vision tower, fused q/k/v (the code's ViT has no text tower); 'vision,text' is a "
                          "variant")}),
}
