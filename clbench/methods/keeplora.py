"""KeepLoRA (residual gradient adaptation), KeepLoRA+ (with per-task cosine heads) and KeepLoRA++ (layer-scaled).

KeepLoRA, per adapted matrix W (q, k, v, o of every block of the adapted encoders), in the paper's layout
``y = x W`` with ``W ∈ R^{d_in×d_out}`` (PyTorch stores ``W_pt = Wᵀ``):

- (S0, ``setup``) a principal basis ``U = W_p`` of the pretrained weight by an energy threshold ε_w on σ²
  (vision 0.85, text 0.2; ε_w ≤ 1e-8 skips it, the "no W_p" ablation); ``principal_basis(method="auto")``:
  float64 eigh of the Gram matrix for small widths, float32 eigh refined and checked in float64 otherwise
  (the same basis as a float64 SVD, at about a third of its cost).
- (S1) the mean gradient ``G`` of the task's CE loss over its training batches, at the current weights.
- (S2) ``Ĝ = (I − U Uᵀ) G`` on the input side.
- (S3) the top-r SVD ``Ĝ ≈ U_r S_r V_rᵀ``: ``A = U_r`` frozen (adapter ``down = Aᵀ``, a buffer) and
  ``B = S_r V_rᵀ`` trainable (``up = Bᵀ``), scale ``s = α/r``.
- (S4) ``W ← W − s·A·B`` so the model function is unchanged at step 0.
- (S5) train B only (plus the current head for KeepLoRA+); (S6) merge ``W ← W + s·A·B``.
- (S7) extend ``U`` with the merged model's input features of the task by the GPM rule at ε_f (0.99;
  ε_f ≤ 1e-8 is the "no M_t" ablation). Since every update is ``s·A·ΔB`` with ``A ⟂ span(U)``, inputs in
  ``span(U)`` keep their exact outputs.

Two readings behind ``compat`` (the paper against its official MTIL code, MaolinLuo/KeepLoRA):

- ``paper`` (default): input-side principal basis (``wp_side=input``: right singular vectors of ``W_pt``), the
  ``≥`` energy cut (``energy_cut=paper``), features as the uncentered token covariance ``Σ x xᵀ`` in float64
  (``features=cov``), exact SVD of ``Ĝ`` (``grad_svd=exact``).
- ``official`` (the MTIL code, for number matching): output-side basis (``wp_side=output``: left singular
  vectors of ``W_pt``, D1), the ``<`` cut (``energy_cut=official``, D4; also the cut of the first feature update
  when the basis is still empty, e.g. with ε_w = 0), the slot-aligned running mean of per-batch token matrices
  as features (``features=slotsum``, D2), randomized SVD of ``Ĝ`` with 4r sketch columns and 4 power
  iterations (``grad_svd=randomized``, D6).

Each part is also a setting of its own; ``compat`` sets those left at ``"compat"``.

``init=random`` is the paper's initialisation ablation (a random initialisation instead of the residual gradient):
``A`` random orthonormal inside ``span(U)^⊥``, ``B = 0``, no gradient pass and no shift, so only the plasticity part
changes.

Adapted for speed without changing the math: only the q/k/v/o weights require grad in the gradient pass
(identical ``G``; D3), gradients are accumulated on the device (``.grad``), the class text features are
encoded once per pass and their summed gradient pushed through the text tower once (instead of a text
forward and backward per batch), batches are split into micro-batches (same batch-mean loss), and the
statistics of the input shared by q/k/v are collected once per layer (D9). The gradient and feature passes
run at the caller's precision: float32, or the caller's autocast if it wraps the hooks (the official code uses
fp16 autocast without loss scaling for the gradient); the subspace algebra, the shift, the merge and
KeepLoRA+'s head initialisation always run in float32 whatever the caller's autocast (the official code merges
in fp32; a half-precision ``A·B`` would leak into the protected subspace).
``grad_fraction`` < 1 estimates ``G`` on the first share of the shuffled batches (the LLaVA code uses 20%).
Where ``Ĝ`` has rank < r or the basis leaves fewer than r free directions, ``A`` is completed (or shortened)
inside ``span(U)^⊥`` (an edge case the official code does not guard). Text features use the current
task's class prompts, all positions including padding (D8; the text context is cut after the last
end-of-text token only where no observer watches, see ``ClipModel.encode_text``).

KeepLoRA+ (official code, MaolinLuo/KeepLoRA ``MTIL/``): a cosine head per task, ``30·cos(z, w_c)`` on the
normalised image embedding, initialised from the normalised class means of the image features after the shift
(S4) and before training, trained with B, frozen afterwards, and added to CLIP's logits only for datasets already
trained.
Under ``--eval union`` (X-TAIL, no task identity) each trained dataset's head is added on that dataset's
columns of the union logits; untrained datasets keep the plain CLIP logits (``KeepLoRAPlus.logits_union``).

KeepLoRA++ (arXiv 2606.16256; the same repository's newer code): KeepLoRA with ``B = 0`` at init (no shift) and a
fixed per-layer scale ``s_l = γ + (1 − γ)·l/(L − 1)`` (γ = 0.2) on every adapter output and merged update;
the text encoder is scaled too unless ``scale_text`` is false (the text-side rule is an assumption).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.datasets.base import ClassSpan, Task
from clbench.errors import UserError
from clbench.linalg import (
    COMPUTE_DTYPE,
    CovarianceAccumulator,
    SlotSumAccumulator,
    empty_basis,
    full_precision,
    gpm_extend,
    principal_basis,
    project_out,
    top_r_factors,
)
from clbench.methods.base import Method, TaskContext
from clbench.methods.lora import adapter_parameters, encoder_list, merge_adapters
from clbench.methods.recipes import RecipeCard, adapted, assumption, code, harness, paper
from clbench.methods.registry import register_method
from clbench.methods.state_checks import (
    StateMismatch,
    expect_basis,
    expect_keys,
    expect_tensor,
    extra_entry,
    tensor_entry,
)
from clbench.models.attention import PROJECTIONS, LowRankDelta
from clbench.models.clip import AttentionSite
from clbench.ranges import check_range

ADAPTER = "keeplora"
HEAD_SCALE = 30.0
DISABLED = 1e-8  # a threshold at or below this switches its step off (the paper's ablations)
INPUT_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o"}  # which observed input feeds each projection
# What each reading of ``compat`` sets: the paper's, and the official MTIL code's (for number matching).
COMPAT_READINGS = {
    "paper": {"wp_side": "input", "features": "cov", "energy_cut": "paper", "grad_svd": "exact"},
    "official": {"wp_side": "output", "features": "slotsum", "energy_cut": "official", "grad_svd": "randomized"},
}
Statistic = CovarianceAccumulator | SlotSumAccumulator


@dataclass
class KeepLoRAHparams:
    rank: int = field(default=16, metadata={"min": 1, "max_width": True})
    alpha: float = field(default=1.0, metadata={"min": 0.0, "exclusive_min": True})
    eps_w_vision: float = field(default=0.85, metadata={"min": 0.0, "max": 1.0})
    eps_w_text: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    eps_f: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0})
    compat: str = field(default="paper", metadata={"choices": ("paper", "official")})
    wp_side: str = field(default="compat", metadata={"choices": ("compat", "input", "output")})
    features: str = field(default="compat", metadata={"choices": ("compat", "cov", "slotsum")})
    energy_cut: str = field(default="compat", metadata={"choices": ("compat", "paper", "official")})
    grad_svd: str = field(default="compat", metadata={"choices": ("compat", "exact", "randomized")})
    init: str = field(default="residual_grad", metadata={"choices": ("residual_grad", "random")})
    grad_fraction: float = field(default=1.0, metadata={"min": 0.0, "exclusive_min": True, "max": 1.0})
    encoders: str = field(default="vision,text", metadata={"subset_of": ("vision", "text")})


@dataclass
class KeepLoRAPlusPlusHparams(KeepLoRAHparams):
    gamma: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    scale_text: bool = True


@dataclass
class AdaptedMatrix:
    """One adapted weight: projection ``proj`` of ``site``; ``name`` like ``vision.3.q``."""

    site: AttentionSite
    proj: str

    @property
    def name(self) -> str:
        return f"{self.site.name}.{self.proj}"

    def weight(self) -> Tensor:
        """The base weight, PyTorch layout ``d_out × d_in`` (a view)."""
        return self.site.module.projection_weight(self.proj)

    def grad(self) -> Tensor | None:
        """The accumulated ``.grad`` of this projection's rows (slice of ``in_proj_weight`` for q/k/v)."""
        module = self.site.module
        if self.proj == "o":
            return module.out_proj.weight.grad
        if module.in_proj_weight.grad is None:
            return None
        d, index = module.embed_dim, "qkv".index(self.proj)
        return module.in_proj_weight.grad[index * d : (index + 1) * d]


def layer_scales(num_layers: int, gamma: float) -> list[float]:
    """KeepLoRA++'s per-layer scales ``s_l = γ + (1 − γ)·l/(L − 1)`` (1 for a single layer)."""
    if num_layers == 1:
        return [1.0]
    return [gamma + (1.0 - gamma) * layer / (num_layers - 1) for layer in range(num_layers)]


def _weight_parameters(matrices: list[AdaptedMatrix]) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}
    for m in matrices:
        module = m.site.module
        p = module.out_proj.weight if m.proj == "o" else module.in_proj_weight
        params[id(p)] = p
    return list(params.values())


def task_batches(task: TaskContext, fraction: float = 1.0) -> Iterator[tuple[Tensor, Tensor]]:
    """The task's shuffled batches without the last incomplete one (official loader); if that leaves none
    (fewer samples than one batch), the single short batch."""
    got = False
    for batch in task.batches(fraction, drop_last=True):
        got = True
        yield batch
    if not got:
        yield from task.batches(fraction, drop_last=False)


@register_method("keeplora")
class KeepLoRA(Method):
    """KeepLoRA: gradient-initialised LoRA in the residual of a protected subspace, merged after each task."""

    summary = "residual-gradient LoRA orthogonal to pretrained + past-feature subspaces (ICLR 2026)"
    Hparams = KeepLoRAHparams
    shift_at_init = True  # B = S_r V_rᵀ and W ← W − sAB (v1); KeepLoRA++ starts from B = 0 instead
    grad_chunk = 16  # images per backward in S1 (micro-batches of a batch; bounds the activations held)
    text_chunk = 128  # prompts per text-tower backward in S1

    def __init__(self, model, hparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.bases: dict[str, Tensor] = {}
        self.init_stats: dict[str, dict[str, float]] = {}

    # ---- configuration ------------------------------------------------------------------------------
    def reading(self, setting: str) -> str:
        """The value of one part of ``compat`` (``wp_side``, ``features``, ``energy_cut``, ``grad_svd``): its own
        setting, or what ``compat`` implies where it is left at ``"compat"``."""
        value = getattr(self.hparams, setting)
        return COMPAT_READINGS[self.hparams.compat][setting] if value == "compat" else value

    def sites(self) -> list[AttentionSite]:
        return self.model.attention_sites(encoder_list(self.hparams.encoders))

    def matrices(self) -> list[AdaptedMatrix]:
        return [AdaptedMatrix(site, proj) for site in self.sites() for proj in PROJECTIONS]

    def eps_w(self, encoder: str) -> float:
        return self.hparams.eps_w_vision if encoder == "vision" else self.hparams.eps_w_text

    def layer_scale(self, site: AttentionSite) -> float:
        """Extra factor on the adapter scale of ``site`` (1 for KeepLoRA; KeepLoRA++'s s_l)."""
        return 1.0

    def validate(self) -> None:
        """Range-check the hyperparameters (also when built without ``--set``) against the model."""
        for f in dataclasses.fields(self.hparams):
            check_range(getattr(self.hparams, f.name), f.metadata, f"{self.name}.{f.name}")
        width = min((site.width for site in self.sites()), default=0)
        if self.hparams.rank > width:
            raise UserError(f"{self.name}.rank={self.hparams.rank} exceeds the width {width} of the adapted "
                            f"layers; use --set {self.name}.rank=<value <= {width}>")

    def _no_autocast(self) -> AbstractContextManager[None]:
        """The subspace algebra (S0, S2–S3, S7), the shift and the merge run at their own precision even when
        the caller enabled autocast (the gradient and feature passes follow the caller's autocast, like the
        official fp16 pass): :func:`clbench.linalg.full_precision`, shared with the other methods."""
        return full_precision()

    # ---- S0: pretrained principal subspace ---------------------------------------------------------------
    def setup(self) -> None:
        side, rule = self.reading("wp_side"), self.reading("energy_cut")
        with self.profiler.section("pretrained_svd"), self._no_autocast():
            for m in self.matrices():
                eps = self.eps_w(m.site.encoder)
                if eps <= DISABLED:
                    basis = empty_basis(m.site.width, self.model.device)
                else:
                    basis = principal_basis(m.weight(), eps, side=side, rule=rule,
                                            method="auto")
                self.bases[m.name] = basis.to(self.model.device)
        self._record_bases(-1)

    # ---- S1–S4: residual-gradient initialisation ---------------------------------------------------------
    def before_task(self, task: TaskContext) -> None:
        if self.hparams.init == "random":
            with self.profiler.section("grad_svd"), self._no_autocast():
                self.init_random_adapters()
            return
        with self.profiler.section("grad_estimation"):
            grads = self.estimate_gradients(task)
        with self.profiler.section("grad_svd"), self._no_autocast():
            self.init_adapters(grads)

    def clip_loss(self, images: Tensor, labels: Tensor, tokens: Tensor) -> Tensor:
        """CE over the task's classes (tokenised prompts ``tokens``) on plain CLIP logits, text features
        recomputed with grad (no head: the loss of S1)."""
        return self.image_text_loss(images, labels, self.model.encode_text(tokens))

    def image_text_loss(self, images: Tensor, labels: Tensor, text: Tensor, denominator: int | None = None) -> Tensor:
        """S1's CE on ``logit_scale · cos(image, text)`` summed over the samples and divided by ``denominator``
        (default: their number, the batch mean; a micro-batch passes its whole batch's size)."""
        image = self.model.encode_image(images)
        loss = F.cross_entropy(self.model.logit_scale() * image @ text.T, labels, reduction="sum")
        return loss / (len(labels) if denominator is None else denominator)

    def estimate_gradients(self, task: TaskContext) -> dict[str, Tensor]:
        """S1: mean over the task's batches of the batch-mean loss gradient of every adapted weight (PyTorch
        layout). The same estimate as the official pass (text re-encoded with grad every batch, every encoder
        parameter requiring grad, as the official code does), computed more cheaply and exactly:

        - only the adapted q/k/v/o weights require grad (no other weight gradient is formed), accumulated in
          ``.grad`` on the device (no host copies);
        - the class text features are encoded once without grad; each batch's loss backpropagates into them
          as a leaf, and at the end the summed text-feature gradient is pushed through the text tower once
          (``Σ_b J_textᵀ g_b = J_textᵀ Σ_b g_b``: the text features do not depend on the batch), in chunks of
          ``text_chunk`` prompts recomputed with grad;
        - each batch is processed in micro-batches of ``grad_chunk`` images, each loss summed and divided by
          the batch size (same batch mean, activations of one micro-batch at a time).
        """
        model, matrices = self.model, self.matrices()
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        params = _weight_parameters(matrices)
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            model.train()
            tokens = model.tokenize(task.prompts)
            with torch.no_grad():
                text = model.encode_text(tokens)
            text.requires_grad_(any(m.site.encoder == "text" for m in matrices))
            count = 0
            for images, labels in task_batches(task, self.hparams.grad_fraction):
                size = len(labels)
                for start in range(0, size, self.grad_chunk):
                    end = start + self.grad_chunk
                    self.image_text_loss(images[start:end], labels[start:end], text, size).backward()
                count += 1
            if count == 0:
                raise UserError("the task has no training batches to estimate KeepLoRA's gradient; add training data")
            if text.grad is not None:
                for start in range(0, len(tokens), self.text_chunk):
                    end = start + self.text_chunk
                    model.encode_text(tokens[start:end]).backward(text.grad[start:end])
            grads = {}
            for m in matrices:
                g = m.grad()
                grads[m.name] = torch.zeros_like(m.weight()) if g is None else g.detach() / count
            return grads
        finally:
            for p in params:
                p.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)

    def init_adapters(self, grads: dict[str, Tensor]) -> None:
        """S2–S4 for every matrix: project, factorise, add the adapter, shift the base weight."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        for m in self.matrices():
            basis = self.bases[m.name]
            G = grads[m.name].T.float()  # paper layout d_in × d_out
            G_hat = project_out(G, basis)
            A, S, V = top_r_factors(G_hat, hp.rank, method=self.reading("grad_svd"),
                                    oversample=4 * hp.rank, niter=4, generator=generator, basis=basis)
            self.init_stats[m.name] = _init_stats(G, G_hat, A, basis)
            if A.shape[1] == 0:  # the basis fills the whole input space: nothing left to adapt
                continue
            B = S[:, None] * V.T  # r × d_out
            up = B.T if self.shift_at_init else torch.zeros_like(B.T)
            delta = LowRankDelta(A.T, up, scale=hp.alpha / hp.rank * self.layer_scale(m.site))
            m.site.module.add_adapter(m.proj, ADAPTER, delta)
            if self.shift_at_init:
                m.site.module.add_to_weight(m.proj, -delta.delta().detach())

    def init_random_adapters(self) -> None:
        """The paper's initialisation ablation: ``A`` random orthonormal in ``span(U)^⊥`` (at most ``r``
        columns, fewer where the basis leaves fewer free directions), ``B = 0``, weights unchanged."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        for m in self.matrices():
            basis = self.bases[m.name].to(COMPUTE_DTYPE)
            d_in, d_out = basis.shape[0], m.weight().shape[0]
            r = min(hp.rank, d_in - basis.shape[1])
            if r <= 0:
                continue
            A = torch.randn(d_in, r, generator=generator, dtype=COMPUTE_DTYPE).to(basis.device)
            for _ in range(2):  # projecting off U and orthonormalising twice is exact to float rounding
                A, _ = torch.linalg.qr(project_out(A, basis))
            A = A.to(torch.float32)
            delta = LowRankDelta(A.T, torch.zeros(d_out, r, device=A.device),
                                 scale=hp.alpha / hp.rank * self.layer_scale(m.site))
            m.site.module.add_adapter(m.proj, ADAPTER, delta)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.sites(), ADAPTER)

    # ---- S6–S7: merge, then grow the protected subspace ---------------------------------------------------
    def after_task(self, task: TaskContext) -> None:
        with self.profiler.section("merge"), self._no_autocast():
            merge_adapters(self.sites(), ADAPTER)
        if self.hparams.eps_f > DISABLED:
            with self.profiler.section("feature_stats"):
                stats = self.feature_statistics(task)
            with self.profiler.section("feature_svd"), self._no_autocast():
                self.extend_bases(stats)
        self._record_bases(task.index)

    def feature_statistics(self, task: TaskContext) -> dict[tuple[str, str], Statistic]:
        """Statistics of every projection input of the merged model over the task's training images and
        class prompts, keyed ``(site name, "qkv" | "o")``: one per layer input (q, k, v share theirs)."""
        model, encoders = self.model, encoder_list(self.hparams.encoders)
        stats: dict[tuple[str, str], Statistic] = {}
        slotsum = self.reading("features") == "slotsum"
        removers = []
        for site in self.sites():
            for kind in ("qkv", "o"):
                stats[(site.name, kind)] = (SlotSumAccumulator(site.width, model.device) if slotsum
                                            else CovarianceAccumulator(site.width, model.device))
            removers.append(site.module.add_observer(
                lambda kind, x, name=site.name: stats[(name, kind)].update(x)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if "vision" in encoders:
                    for images, _ in task_batches(task):
                        model.encode_image(images)
                if "text" in encoders:
                    model.encode_text(model.tokenize(task.prompts))
        finally:
            for remove in removers:
                remove()
            model.train(was_training)
        return stats

    def extend_bases(self, stats: dict[tuple[str, str], Statistic]) -> None:
        """S7: GPM extension of every basis with its input's statistics at ε_f."""
        eps, rule = self.hparams.eps_f, self.reading("energy_cut")
        for m in self.matrices():
            acc = stats[(m.site.name, INPUT_OF[m.proj])]
            basis = self.bases[m.name]
            if isinstance(acc, SlotSumAccumulator):
                new = gpm_extend(basis, eps, features=acc.features(), method="gram_eigh", empty_rule=rule)
            else:
                new = gpm_extend(basis, eps, covariance=acc.covariance(), empty_rule=rule)
            self.bases[m.name] = new.to(basis.device)

    # ---- state and cost ----------------------------------------------------------------------------------
    def basis_columns(self) -> dict[str, int]:
        """Columns ``k_t`` of every stored basis (≤ d_in)."""
        return {name: int(basis.shape[1]) for name, basis in self.bases.items()}

    def _record_bases(self, task_index: int) -> None:
        for name, basis in self.bases.items():
            self.profiler.record_state(task_index, f"basis:{name}", basis.numel() * basis.element_size(),
                                       columns=int(basis.shape[1]))

    def state_bytes(self) -> dict[str, int]:
        return {"basis": sum(b.numel() * b.element_size() for b in self.bases.values())}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"basis/{name}": basis.detach().contiguous() for name, basis in self.bases.items()}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """One basis per adapted matrix, ``d × k_t`` with ``d`` the layer's width and ``k_t ≤ d`` (the columns
        grow over tasks), finite; the rest is checked by :meth:`check_other_state`; no JSON state."""
        bases = {k.removeprefix("basis/"): v for k, v in state.items() if k.startswith("basis/")}
        widths = {m.name: m.site.width for m in self.matrices()}
        expect_keys(bases, widths, entry=lambda name: tensor_entry(f"basis/{name}"))
        for name, width in widths.items():
            expect_basis(f"basis/{name}", bases[name], width)
        self.check_other_state({k: v for k, v in state.items() if not k.startswith("basis/")}, tasks)
        expect_keys(extra, (), entry=extra_entry)

    def check_other_state(self, rest: dict[str, Tensor], tasks: list[Task]) -> None:
        """Tensors besides the bases: KeepLoRA keeps none."""
        expect_keys(rest, ())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        rest = self._load_bases(state)
        if rest:
            raise ValueError(f"{self.name}: unexpected state entries {sorted(rest)[:3]}")

    def _load_bases(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        rest = {}
        for key, value in state.items():
            if key.startswith("basis/"):
                self.bases[key.removeprefix("basis/")] = value.to(self.model.device, torch.float32)
            else:
                rest[key] = value
        return rest


def _init_stats(G: Tensor, G_hat: Tensor, A: Tensor, basis: Tensor) -> dict[str, float]:
    """Per-matrix diagnostics of steps S2–S3: ‖G‖, ‖Ĝ‖/‖G‖, rank of A, max |AᵀU|."""
    norm = float(G.norm())
    leak = float((A.T @ basis.to(A.dtype)).abs().max()) if A.numel() and basis.numel() else 0.0
    return {"grad_norm": norm, "residual_ratio": float(G_hat.norm()) / norm if norm else 0.0,
            "rank": int(A.shape[1]), "a_leak": leak}


@register_method("keeplora+")
class KeepLoRAPlus(KeepLoRA):
    """KeepLoRA with a per-task cosine head (scale 30) added to CLIP's logits for trained datasets."""

    summary = "KeepLoRA + per-task cosine heads initialised from class-mean image features"

    def __init__(self, model, hparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.heads: dict[str, nn.Parameter] = {}
        self.current: str | None = None

    def before_task(self, task: TaskContext) -> None:
        for head in self.heads.values():
            head.requires_grad_(False)
        super().before_task(task)
        with self.profiler.section("head_init"):
            self.heads[task.name] = nn.Parameter(self.class_mean_features(task), requires_grad=False)
        self.current = task.name

    @torch.no_grad()
    def class_mean_features(self, task: TaskContext) -> Tensor:
        """``normalize(mean_c normalize(z))`` per class over the task's (drop-last) training batches, in float32
        whatever the caller's autocast."""
        model = self.model
        was_training = model.training
        model.eval()
        sums = counts = None
        try:
            with self._no_autocast():
                for images, labels in task_batches(task):
                    z = model.encode_image(images).float()
                    if sums is None:
                        sums = z.new_zeros(len(task.task.classnames), z.shape[1])
                        counts = z.new_zeros(len(task.task.classnames))
                    sums.index_add_(0, labels, z)
                    counts.index_add_(0, labels, torch.ones_like(labels, dtype=z.dtype))
        finally:
            model.train(was_training)
        return F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        head = [self.heads[self.current]] if self.current in self.heads else []
        return super().trainable_parameters() + head

    def after_task(self, task: TaskContext) -> None:
        super().after_task(task)
        self.current = None
        for head in self.heads.values():
            head.requires_grad_(False)

    def head_logits(self, image_features: Tensor, dataset: str) -> Tensor:
        weight = self.heads[dataset]
        return HEAD_SCALE * F.normalize(image_features.float(), dim=-1) @ F.normalize(weight, dim=-1).T

    def train_logits(self, image_features: Tensor, text_features: Tensor, task: TaskContext) -> Tensor:
        logits = super().train_logits(image_features, text_features, task)
        return logits + self.head_logits(image_features, task.name) if task.name in self.heads else logits

    def logits(self, image_features: Tensor, text_features: Tensor, dataset: str, trained: bool) -> Tensor:
        logits = super().logits(image_features, text_features, dataset, trained)
        return logits + self.head_logits(image_features, dataset) if trained and dataset in self.heads else logits

    def logits_union(self, image_features: Tensor, text_features: Tensor, spans: list[ClassSpan],
                     trained: int) -> Tensor:
        """Routing rule for the union label space (X-TAIL): CLIP's logits over every class, plus each trained
        dataset's head on that dataset's columns. Datasets not trained yet have no head, so their columns are
        the model's own text-feature logits alone (the "base text features" of RAIL's and LADA's X-TAIL code). No router
        picks a dataset first: the heads (scale 30) lift the columns of trained datasets, which is how
        KeepLoRA+'s heads favour seen domains; the run's task-selection recall shows the effect."""
        logits = super().logits_union(image_features, text_features, spans, trained)
        for span in spans[:trained]:
            if span.dataset in self.heads:
                logits[:, span.start:span.stop] += self.head_logits(image_features, span.dataset).to(logits.dtype)
        return logits

    def state_bytes(self) -> dict[str, int]:
        heads = sum(h.numel() * h.element_size() for h in self.heads.values())
        return {**super().state_bytes(), "heads": heads}

    def state_dict(self) -> dict[str, Tensor]:
        heads = {f"head/{name}": h.detach().contiguous() for name, h in self.heads.items()}
        return {**super().state_dict(), **heads}

    def check_other_state(self, rest: dict[str, Tensor], tasks: list[Task]) -> None:
        """One head per task done, ``classes × embedding width``, finite."""
        expect_keys(rest, [f"head/{t.name}" for t in tasks])
        width = getattr(self.model.clip.visual, "output_dim", None)  # open_clip towers say their embedding width
        for t in tasks:
            key, value = f"head/{t.name}", rest[f"head/{t.name}"]
            expect_tensor(key, value, floating=True)
            if value.dim() != 2 or value.shape[0] != len(t.classnames) or (width and value.shape[1] != width):
                raise StateMismatch(tensor_entry(key), f"is {tuple(value.shape)}, expected {len(t.classnames)} "
                                                       f"classes × {width or 'the'} embedding width")
            expect_tensor(key, value, finite=True)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        rest = self._load_bases(state)
        for key, value in rest.items():
            if not key.startswith("head/"):
                raise ValueError(f"{self.name}: unexpected state entry {key!r}")
            weight = value.to(self.model.device, torch.float32)
            self.heads[key.removeprefix("head/")] = nn.Parameter(weight, requires_grad=False)


@register_method("keeplora++")
class KeepLoRAPlusPlus(KeepLoRA):
    """KeepLoRA with B = 0 at init and per-layer scales s_l = γ + (1−γ)·l/(L−1) on the adapter (v2 code)."""

    summary = "KeepLoRA with B=0 init and layer-wise update scales (gamma 0.2)"
    Hparams = KeepLoRAPlusPlusHparams
    shift_at_init = False

    def layer_scale(self, site: AttentionSite) -> float:
        if site.encoder == "text" and not self.hparams.scale_text:
            return 1.0
        return layer_scales(site.num_layers, self.hparams.gamma)[site.layer]


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
_KEEPLORA_COMMON = {
    "train.optimizer": code("AdamW (MTIL trainer)"),
    "train.lr": code("keeplora_order{1,2}.yaml"),
    "train.weight_decay": code("keeplora_order{1,2}.yaml; applied to B (and the heads) too"),
    "train.schedule": code("OneCycleLR with max_lr = lr and PyTorch's defaults, stepped per batch"),
    "train.warmup_steps": harness("unused: OneCycle warms up over its first 30% by itself"),
    "train.max_steps": code("no step cap: the epoch lists decide"),
    "train.batch_size": code("keeplora_order{1,2}.yaml"),
    "rank": code("q, k, v and o of every block"),
    "alpha": code("lora_alpha; the step scale is s = α/r"),
    "eps_w_vision": code("the vision threshold of the pretrained-weight subspace"),
    "eps_w_text": code("the text threshold of the pretrained-weight subspace"),
    "eps_f": code("the feature-subspace threshold, both towers"),
    "compat": paper("the paper's reading of the four points where the MTIL code differs; 'official' "
                    "sets them all as the code has them, for number matching"),
    "wp_side": paper("input side (right singular vectors of W_pt); the MTIL code takes the output side"),
    "features": paper("uncentered token covariance; the MTIL code's slot-aligned running mean is 'slotsum'"),
    "energy_cut": paper("smallest p with energy >= ε; the MTIL code counts cumsum < ε, at least 1"),
    "grad_svd": adapted("exact SVD of the projected gradient: the code's randomized SVD (4r columns, 4 power "
                        "iterations) approximates the same factors; 'randomized' reproduces it"),
    "init": paper("the residual-gradient initialisation; 'random' is the paper's initialisation ablation"),
    "grad_fraction": code("one full pass over the task's training split (the LLaVA code uses 20%)"),
    "encoders": code("both towers, every block"),
}
RECIPES = {
    "keeplora": RecipeCard(
        "KeepLoRA (Luo et al., ICLR 2026; arXiv 2601.19659), official code MaolinLuo/KeepLoRA@a17f9c2 MTIL/",
        {"train.epochs": code("per-dataset lists of keeplora_order{1,2}.yaml"), **_KEEPLORA_COMMON}),
    "keeplora+": RecipeCard(
        "KeepLoRA+ (KeepLoRA with per-task cosine heads), official code MaolinLuo/KeepLoRA@a17f9c2 MTIL/",
        {"train.epochs": code("keeplora+_order{1,2}.yaml"), **_KEEPLORA_COMMON}),
    "keeplora++": RecipeCard(
        "KeepLoRA++ (layer-scaled; arXiv 2606.16256), the newer official code in MaolinLuo/KeepLoRA MTIL/",
        {"train.epochs": assumption("the v2 keeplora_order1.yaml was not retrievable: KeepLoRA's lists"),
         **_KEEPLORA_COMMON,
         "gamma": code("the vision tower's build_layer_scales call (not the function's default)"),
         "scale_text": assumption("the v2 text-tower code was not retrievable: the same rule on the text tower")}),
}
