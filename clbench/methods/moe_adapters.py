"""MoE-Adapters (Yu et al., CVPR 2024, "Boosting Continual Learning of Vision-Language Models via
Mixture-of-Experts Adapters"; official code JiazuoYu/MoE-Adapters4CL, ``mtil/``, script
``scripts/train/train_full_shot_router11_experts22_1000iters.sh``).

CLIP stays frozen. Every residual block of both encoders (``--ffn_adapt_where AdapterDoubleEncoder``) gets a
pool of ``experts`` (22) bottleneck adapters in parallel to its MLP, and one router per task [code
``clip/model.py``]:

- An expert is ``E_i(x) = s · up(dropout(ReLU(down(x))))``, bottleneck 64, scale s = 0.1, dropout 0.1, no
  layer norm, applied to the block's residual stream after attention (the MLP's input *before* ``ln_2``):
  the block computes ``x + MLP(ln_2(x)) + Σ_i W_i E_i(x)``. ``down`` is Kaiming-uniform, ``up`` and both biases
  are zero, so the adapted model equals CLIP exactly at the start [code ``clip/adapter.py``, ``init_option='lora'``].
- Router of task t: noisy top-k gating (Shazeer et al., 2017) on the block's first token, one gate vector per
  sample for all its tokens: ``h = c W_gate^t``; in training ``h += ε · (softplus(c W_noise^t) + 10⁻²)``,
  ε ~ N(0, 1); the ``top_k`` (2) largest logits are renormalised by a softmax over those k only and the other
  gates are 0: ``W^t = Softmax(TopK(h))`` (paper Eq. for W^t). ``W_gate`` and ``W_noise`` start at zero [code].
- Load balancing: the code computes Shazeer's ``10⁻²·(CV²(importance) + CV²(load))`` in every block
  (importance = the gates summed over the batch; load = the expected number of samples per expert under the
  noise, or the count of nonzero gates without noise) but never adds it to the loss: the official objective is
  the label-smoothed cross-entropy alone. ``balance_weight`` defaults to 0 for that reason; a positive value adds
  ``balance_weight · Σ_blocks (CV²(importance) + CV²(load))`` to the loss (the term Shazeer et al. train with).
- Activate-freeze: during a task every block counts how often each expert is among a sample's top-k (image and
  text forwards alike). After the task the ``freeze_top`` (2) most activated experts of each block are frozen
  for all later tasks (the frozen set is the union over tasks); the current task's router may still select
  them [code ``src/models/finetune.py``, ``frozen_list``].
- Training objective: CE with label smoothing 0.2 on the current task's classes, image and text features both
  through the current task's router [code]. An expert that no sample of a step chose gets no gradient in that
  step, so AdamW neither decays nor moves it (the code drops the empty experts' outputs, and torch 2's
  ``zero_grad`` leaves their gradients ``None``) [code]; clbench up to 0.1.0 gave it a zero gradient, on which
  AdamW still stepped by its moments.

DDAS (Distribution Discriminative Auto-Selector). After each task t an autoencoder
``AE_t(x) = σ(W₂ ReLU(W₁ x + b₁) + b₂)`` (code width 100) is trained with the MSE to reconstruct
``x = σ(√D · f)`` of the task's training images, f being the *frozen* CLIP's L2-normalised image embedding (the
√D makes the coordinates of unit scale before the sigmoid). It trains ``ddas_iterations`` (300) Adam steps at
batch = the training batch, weight decay 10⁻⁴, learning rate 0.01 decayed by 10× every 10 epochs [code
``src/models/AutoEncoder.py``: Adam(lr=3e-3) whose rate ``exp_lr_scheduler(…, 0.01)`` overrides every step].

Routing at test time, per image (both evaluation rules): ``e_t = mean((AE_t(x) − x)²)`` for every trained task,
``t* = argmin_t e_t``; if ``e_{t*} > τ_{t*}`` the image is out of distribution and goes through the plain frozen
CLIP (zero-shot), else through the MoE-adapted encoder with router t*. Its logits are scored against the class
text features encoded with the *same* route (zero-shot text for the zero-shot route, router-t* text otherwise),
as the code does (``zeroshot_classifier`` encodes every class once per router). ``τ_t`` is ``threshold`` when it is
positive (the code's absolute rule, 0.0655 on its features) or, by default, the ``threshold_quantile`` (0.99)
quantile of task t's own training reconstruction errors.

Reference autoencoder (``reference_autoencoder``, off by default; ``--preset paper`` turns it on). The official
scripts train one more autoencoder before the tasks, on TinyImageNet (``chooser_dataset[0]``, ``--iterations
1000``, the task autoencoders' optimiser, learning-rate rule and σ(features) input) [code
``scripts/train/*.sh``, ``src/models/AutoEncoder.py``]; at test time the argmin starts at it (index 0) and a task
replaces it only with a *strictly* smaller error, and the winner's route is zero-shot; the threshold still
applies to a winning task [code ``src/models/evaluation.py``, ``zeroshot_eval``]. Here: an image is routed to
``t*`` only if ``e_{t*} < e_ref`` and ``e_{t*} ≤ τ_{t*}``, else to zero-shot. The paper describes the threshold
only, hence off by default. The reference autoencoder is trained once, after the first task (its own section
``ddas_reference``; it does not depend on the task), for ``reference_iterations`` (1000) steps at the task
autoencoders' batch and learning-rate rule, on ``σ(√D · f)`` of the reference images: ``ref_images`` (an
ImageFolder root; the code's set is TinyImageNet train, e.g. ``tiny-imagenet-200/train``, read with the
backbone's test transform where the code uses CLIP's training crop) or, on the embedded benchmark, ``ref_image_count``
held-out pretraining-corpus images drawn with ``ref_seed`` (ZSCL's embedded reference images; ZSCL's own
reference set on MTIL is ImageNet). Only the images its steps visit are encoded, once each (1000 steps of 64
visit 64,000 of TinyImageNet's 100,000 images, as the code's loader does). With the option on, a real benchmark
without ``ref_images`` is a one-line error.

- ``--eval task`` (MTIL): the label space is the test set's own classes; routing is by DDAS as above (the code
  evaluates MTIL this way: ``--autorouter``, no task identity is used to pick the router).
- ``--eval union`` (X-TAIL): the label space is every dataset's classes; the text of all classes is encoded once
  per route and each image's logits over all classes come from its route's variant, so an image DDAS sends to
  zero-shot is classified by the zero-shot CLIP over the whole union.

Where we depart from the code (and why):

- DDAS features: the code feeds σ of ImageNet-pretrained AlexNet conv5 features (256·13·13) to the
  autoencoders. clbench has no AlexNet (nor any second pretrained network, and must run offline); we use the
  frozen CLIP's own image embedding, which the zero-shot route computes anyway. The code's absolute threshold
  0.0655 belongs to those AlexNet features, hence the quantile rule by default.
- The code's TinyImageNet autoencoder is ``reference_autoencoder`` (above), off by default: the paper describes
  only the threshold; ``--preset paper`` follows the official scripts and turns it on.
- The code decides once per *batch* (the MSE averages over the batch) and compares the autoencoders of tasks not
  trained yet (left at random initialisation) as well. We follow the paper's per-sample selection over the
  learned tasks only: an image's prediction then never depends on the other images of its batch.
- The code hard-codes "top 2" for freezing and 12 layers; here ``freeze_top`` and the backbone's layer count.
- The autoencoders train on features cached in one pass over the task's training split (the code re-encodes
  every batch; without augmentation the inputs are the same).

Cost centres: ``ddas_train`` (feature pass and autoencoder training after each task), ``ddas_reference`` (the
reference autoencoder's feature pass and training, after the first task), inside evaluation ``ddas``
(frozen features and reconstruction errors) and ``router`` (the routed MoE forwards, images and class texts).
State: experts, routers, the frozen-expert masks, per-task activation counts, autoencoders and thresholds, and
the reference autoencoder, all in ``state_dict`` (their sizes in ``state_bytes``; the last as
``reference_autoencoder``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.datasets.base import ClassSpan, Task
from clbench.errors import UserError
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, adapted, assumption, code
from clbench.methods.registry import register_method
from clbench.methods.state_checks import StateMismatch, expect_keys, expect_tensor, extra_entry, tensor_entry
from clbench.methods.zscl import (
    EMBEDDED_REF_SEED,
    embedded_reference,
    image_folder,
    parse_lr_overrides,
    reference_workers,
)
from clbench.models.clip import ClipModel

ZERO_SHOT = -1  # route of an image sent to the frozen CLIP


@dataclass
class MoEAdaptersHparams:
    experts: int = field(default=22, metadata={"min": 1})
    top_k: int = field(default=2, metadata={"min": 1})
    bottleneck: int = field(default=64, metadata={"min": 1, "max_width": True})
    adapter_scale: float = field(default=0.1, metadata={"min": 0.0, "exclusive_min": True})
    dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    noisy_gating: bool = True
    noise_epsilon: float = field(default=1e-2, metadata={"min": 0.0})
    balance_weight: float = field(default=0.0, metadata={"min": 0.0})
    freeze_top: int = field(default=2, metadata={"min": 0})
    encoders: str = field(default="vision,text", metadata={"subset_of": ("vision", "text")})
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    lr_overrides: str = ""
    ddas_iterations: int = field(default=300, metadata={"min": 1})
    ddas_code: int = field(default=100, metadata={"min": 1})
    ddas_lr: float = field(default=0.01, metadata={"min": 0.0, "exclusive_min": True})
    ddas_lr_decay_epochs: int = field(default=10, metadata={"min": 1})
    ddas_weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    threshold: float = field(default=0.0, metadata={"min": 0.0})
    threshold_quantile: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0})
    reference_autoencoder: bool = False
    reference_iterations: int = field(default=1000, metadata={"min": 1})
    ref_images: str = ""
    ref_image_count: int = field(default=1024, metadata={"min": 1})
    ref_seed: int = field(default=EMBEDDED_REF_SEED, metadata={"min": 0})
    ref_workers: int = field(default=4, metadata={"min": 0})


# ---- pure pieces ---------------------------------------------------------------------------------------
def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)² + 10⁻¹⁰)`` (unbiased variance; 0 for one value)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def prob_in_top_k(clean: Tensor, noisy: Tensor, std: Tensor, top_values: Tensor, k: int) -> Tensor:
    """P(expert in the top k) per sample and expert, under the gating noise (Shazeer et al.): each logit is
    compared with the k-th (if it is out) or (k+1)-th (if it is in) largest noisy logit of its row."""
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    threshold_in = top_values[:, k : k + 1]
    threshold_out = top_values[:, k - 1 : k]
    is_in = noisy > threshold_in
    return torch.where(is_in, normal.cdf((clean - threshold_in) / std), normal.cdf((clean - threshold_out) / std))


@dataclass
class Gating:
    """A router's decision for a batch: the top-k experts of each sample and their renormalised weights."""

    gates: Tensor    # (B, E), zero outside the top k
    indices: Tensor  # (B, k)
    weights: Tensor  # (B, k), a softmax over the k selected logits
    load: Tensor     # (E,)


def noisy_top_k_gating(c: Tensor, w_gate: Tensor, w_noise: Tensor, k: int, train: bool, noisy: bool = True,
                       epsilon: float = 1e-2) -> Gating:
    """``W = Softmax(TopK(c W_gate + ε·(softplus(c W_noise) + epsilon)))``, noise only in training."""
    clean = c @ w_gate
    experts = clean.shape[-1]
    k = min(k, experts)
    use_noise = noisy and train
    if use_noise:
        std = F.softplus(c @ w_noise) + epsilon
        logits = clean + torch.randn_like(clean) * std
    else:
        logits = clean
    top_values, top_indices = logits.topk(min(k + 1, experts), dim=1)
    indices = top_indices[:, :k]
    weights = torch.softmax(top_values[:, :k], dim=1)
    gates = torch.zeros_like(logits).scatter(1, indices, weights)
    if use_noise and k < experts:
        load = prob_in_top_k(clean, logits, std, top_values, k).sum(0)
    else:
        load = (gates > 0).sum(0).to(gates.dtype)
    return Gating(gates, indices, weights, load)


def balance_loss(gating: Gating) -> Tensor:
    """``CV²(importance) + CV²(load)``, importance = the gates summed over the batch."""
    return cv_squared(gating.gates.sum(0)) + cv_squared(gating.load)


def select_experts(params: nn.ParameterList, chosen: list[int], shape: torch.Size) -> Tensor:
    """``stack(params)[index]`` for the flat expert ids ``chosen`` of an index of ``shape``, stacked from the chosen
    experts alone (one copy of each selected slot, not of the whole pool and then the slots).

    Its backward hands each slot's gradient to its expert and autograd sums an expert's slots in a fixed order, so
    two runs (and a resumed run) get the same bits with any thread count (torch's backward of ``W[idx]`` adds with
    atomics across threads in an order that changes from run to run). An expert no sample chose gets no gradient
    at all (``None``), so AdamW leaves it as it is for that step, as in the official code, whose dispatcher drops
    the outputs of the experts that got no sample (``clip/model.py``) before torch 2's ``zero_grad`` (gradients
    set to ``None``) and AdamW (which skips a parameter without a gradient)."""
    table = list(params)
    return torch.stack([table[i] for i in chosen]).view(*shape, *table[0].shape)


class ExpertPool(nn.Module):
    """The experts and task routers of one residual block."""

    def __init__(self, width: int, hp: MoEAdaptersHparams, generator: torch.Generator) -> None:
        super().__init__()
        self.width, self.hp = width, hp
        r, e = hp.bottleneck, hp.experts
        bound = 1 / math.sqrt(width)  # kaiming_uniform_(a=√5) of nn.Linear(width, r)
        self.down_w = nn.ParameterList(
            [nn.Parameter(torch.empty(r, width).uniform_(-bound, bound, generator=generator)) for _ in range(e)])
        self.down_b = nn.ParameterList([nn.Parameter(torch.zeros(r)) for _ in range(e)])
        self.up_w = nn.ParameterList([nn.Parameter(torch.zeros(width, r)) for _ in range(e)])
        self.up_b = nn.ParameterList([nn.Parameter(torch.zeros(width)) for _ in range(e)])
        self.gate = nn.ParameterList()
        self.noise = nn.ParameterList()
        self.register_buffer("frozen", torch.zeros(e))   # 1 = frozen by activate-freeze
        self.register_buffer("counts", torch.zeros(0, e))  # activations per task (rows: tasks)

    def add_router(self) -> None:
        e = self.hp.experts
        device = self.frozen.device
        self.gate.append(nn.Parameter(torch.zeros(self.width, e, device=device)))
        self.noise.append(nn.Parameter(torch.zeros(self.width, e, device=device)))
        self.counts = torch.cat([self.counts, torch.zeros(1, e, device=device)])

    def expert_parameters(self, index: int) -> list[nn.Parameter]:
        return [self.down_w[index], self.down_b[index], self.up_w[index], self.up_b[index]]

    def route(self, c: Tensor, task: int, train: bool) -> Gating:
        hp = self.hp
        return noisy_top_k_gating(c, self.gate[task], self.noise[task], hp.top_k, train, hp.noisy_gating,
                                  hp.noise_epsilon)

    def experts_output(self, x: Tensor, gating: Gating, train: bool) -> Tensor:
        """``s · Σ_j w_j E_{i_j}(x)`` per sample (x: batch × tokens × width), only the selected experts run."""
        idx = gating.indices
        chosen = idx.reshape(-1).tolist()
        down_w = select_experts(self.down_w, chosen, idx.shape)  # (B, k, r, D)
        down_b = select_experts(self.down_b, chosen, idx.shape)  # (B, k, r)
        up_w = select_experts(self.up_w, chosen, idx.shape)      # (B, k, D, r)
        up_b = select_experts(self.up_b, chosen, idx.shape)      # (B, k, D)
        h = torch.relu(torch.einsum("bld,bkrd->bklr", x, down_w) + down_b[:, :, None, :])
        h = F.dropout(h, p=self.hp.dropout, training=train)
        out = torch.einsum("bklr,bkdr->bkld", h, up_w) + up_b[:, :, None, :]
        return self.hp.adapter_scale * torch.einsum("bk,bkld->bld", gating.weights.to(out.dtype), out)


class AutoEncoder(nn.Module):
    """DDAS's per-task autoencoder: ``σ(W₂ ReLU(W₁ x + b₁) + b₂)`` [code ``Autoencoder``]."""

    def __init__(self, features: int, code_width: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, code_width)
        self.decoder = nn.Linear(code_width, features)
        if generator is not None:  # nn.Linear's own initialisation, drawn from ``generator``
            with torch.no_grad():
                for layer in (self.encoder, self.decoder):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))

    def errors(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction MSE."""
        return (self(x) - x).square().mean(-1)


@contextmanager
def global_rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore torch's global random state (CPU, and ``device`` on CUDA) on exit: the reference autoencoder's
    images, features and ``nn.Linear`` construction must not move the stream that training draws from, so
    ``reference_autoencoder`` changes routing only."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def ddas_input(features: Tensor) -> Tensor:
    """``σ(√D · f)`` of L2-normalised image features f (D = feature width)."""
    return torch.sigmoid(features.float() * math.sqrt(features.shape[-1]))


def ddas_select(errors: Tensor, thresholds: Tensor, reference: Tensor | None = None) -> Tensor:
    """Route per sample from reconstruction errors (B × tasks): ``t* = argmin_t e_t`` (ties: the earliest task),
    or :data:`ZERO_SHOT` where ``e_{t*} > τ_{t*}``. With ``reference`` (B: the reference autoencoder's errors) a
    sample is also zero-shot unless ``e_{t*} < e_ref`` strictly: the code starts its argmin at the reference
    autoencoder (index 0) and replaces it only by a strictly smaller error. No task yet: every sample is
    zero-shot."""
    if errors.shape[-1] == 0:
        return torch.full(errors.shape[:1], ZERO_SHOT, dtype=torch.long, device=errors.device)
    best, task = errors.min(dim=-1)
    zero_shot = best > thresholds[task]
    if reference is not None:
        zero_shot = zero_shot | ~(best < reference)
    return torch.where(zero_shot, torch.full_like(task, ZERO_SHOT), task)


def epoch_batches(n: int, batch: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """The sample indices of each of ``steps`` autoencoder steps over ``n`` samples: a fresh shuffle (drawn from
    ``generator``) every ``⌈n / batch⌉`` steps, cut into batches, the last one of an epoch possibly short (the
    code's loader, re-iterated every epoch, without drop_last)."""
    per_epoch = max(1, math.ceil(n / batch))
    out: list[Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    for it in range(steps):
        if it % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        j = it % per_epoch
        out.append(order[j * batch : (j + 1) * batch])
    return out


def fit_autoencoder(ae: AutoEncoder, x: Tensor, batches: list[Tensor], per_epoch: int,
                    hp: MoEAdaptersHparams) -> None:
    """One Adam step per batch of rows of ``x`` on the mean reconstruction MSE, weight decay ``ddas_weight_decay``,
    learning rate ``ddas_lr`` decayed 10× every ``ddas_lr_decay_epochs`` epochs of ``per_epoch`` steps [code
    ``exp_lr_scheduler``]; then frozen, in eval mode."""
    opt = torch.optim.Adam(ae.parameters(), lr=hp.ddas_lr, weight_decay=hp.ddas_weight_decay)
    with torch.enable_grad():
        for it, idx in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = hp.ddas_lr * 0.1 ** ((it // per_epoch) // hp.ddas_lr_decay_epochs)
            loss = ae.errors(x[idx.to(x.device)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)


# ---- the method ----------------------------------------------------------------------------------------
@register_method("moe-adapters")
class MoEAdapters(Method):
    """MoE-Adapters: per-block pools of adapter experts with task routers beside a frozen CLIP; DDAS sends each
    test image to its task's router or to zero-shot CLIP."""

    summary = "mixture-of-experts adapters with task routers and activate-freeze; DDAS picks router or zero-shot"
    Hparams = MoEAdaptersHparams
    keeps_modules = True

    def __init__(self, model: ClipModel, hparams: MoEAdaptersHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.pools = nn.ModuleDict()
        self.autoencoders = nn.ModuleList()
        self.thresholds: list[float] = []
        self.reference_ae: AutoEncoder | None = None  # trained after the first task (reference_autoencoder)
        self._ref_data: Tensor | torch.utils.data.Dataset | None = None
        self.tasks: list[str] = []
        self.route: int = ZERO_SHOT   # router used by the next encoder forward (ZERO_SHOT: plain CLIP)
        self._pending: dict[str, Tensor] = {}
        self._aux: list[Tensor] = []
        self._handles: list = []
        self._last_routes: Tensor | None = None
        self._task_name = ""
        self._build()

    # ---- modules and hooks -----------------------------------------------------------------------------
    def encoders(self) -> list[str]:
        return [e.strip() for e in self.hparams.encoders.split(",") if e.strip()]

    def blocks(self) -> list[tuple[str, nn.Module, bool]]:
        """(pool key, open_clip residual block, batch_first) for every adapted block."""
        clip = self.model.clip
        out = []
        for encoder in self.encoders():
            transformer = clip.visual.transformer if encoder == "vision" else clip.transformer
            first = getattr(transformer, "batch_first", True)
            out += [(f"{encoder}_{i}", block, first) for i, block in enumerate(transformer.resblocks)]
        return out

    def _build(self) -> None:
        hp = self.hparams
        if hp.top_k > hp.experts:
            raise UserError(f"moe-adapters.top_k={hp.top_k} exceeds moe-adapters.experts={hp.experts}; "
                            "use --set moe-adapters.top_k=<at most experts>")
        gen = torch.Generator().manual_seed(20_240_617)
        device = self.model.device
        for key, block, _ in self.blocks():
            self.pools[key] = ExpertPool(block.ln_2.normalized_shape[0], hp, gen)
        self.pools.to(device)
        for key, block, first in self.blocks():
            self._handles.append(block.ln_2.register_forward_pre_hook(self._make_pre_hook(key, first)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(key)))

    def _make_pre_hook(self, key: str, batch_first: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.route == ZERO_SHOT:
                return
            x = args[0] if batch_first else args[0].transpose(0, 1)
            pool = self.pools[key]
            train = module.training
            gating = pool.route(x[:, 0], self.route, train)
            if train:
                with torch.no_grad():
                    pool.counts[self.route] += (gating.gates > 0).sum(0).to(pool.counts.dtype)
                if self.hparams.balance_weight > 0:
                    self._aux.append(balance_loss(gating))
            y = pool.experts_output(x, gating, train)
            self._pending[key] = y if batch_first else y.transpose(0, 1)
        return hook

    def _make_post_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            y = self._pending.pop(key, None)
            return None if y is None else output + y.to(output.dtype)
        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- encoders under a route ------------------------------------------------------------------------
    def encode_image(self, images: Tensor, route: int) -> Tensor:
        self.route = route
        try:
            return self.model.encode_image(images)
        finally:
            self.route = ZERO_SHOT

    def encode_text(self, tokens: Tensor, route: int) -> Tensor:
        self.route = route
        try:
            return self.model.encode_text(tokens)
        finally:
            self.route = ZERO_SHOT

    # ---- lifecycle -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the reference-autoencoder options before anything runs: real benchmarks need a reference
        image folder; a folder without the option would be silently unused."""
        hp = self.hparams
        if hp.ref_images and not hp.reference_autoencoder:
            raise UserError(f"moe-adapters.ref_images={hp.ref_images} has no effect without the reference "
                            "autoencoder; drop it, or add --set moe-adapters.reference_autoencoder=true")
        if hp.reference_autoencoder and not hp.ref_images and self.benchmark != "synthetic":
            raise UserError(f"moe-adapters.reference_autoencoder on {self.benchmark} needs reference images: pass "
                            "--set moe-adapters.ref_images=IMAGEFOLDER (TinyImageNet train, e.g. "
                            "/data/tiny-imagenet-200/train), or --set moe-adapters.reference_autoencoder=false")
        if hp.reference_autoencoder and hp.ref_images and not Path(hp.ref_images).is_dir():
            raise UserError(f"moe-adapters.ref_images={hp.ref_images} is not a folder; pass an ImageFolder root "
                            "(--set moe-adapters.ref_images=/data/tiny-imagenet-200/train)")

    def setup(self) -> None:
        """Check the options; with ``reference_autoencoder``, open the reference images (an image folder, or the
        embedded benchmark's held-out pretraining images) so a bad folder fails before any training."""
        self.validate()
        self.pools.to(self.model.device)
        hp = self.hparams
        if hp.reference_autoencoder and self._ref_data is None:
            if hp.ref_images:
                self._ref_data = image_folder(Path(hp.ref_images), self.model, "moe-adapters.ref_images",
                                              "TinyImageNet train (--set moe-adapters.ref_images="
                                              "/data/tiny-imagenet-200/train)")
            else:
                with global_rng_untouched(self.model.device):
                    self._ref_data, _ = embedded_reference(self.model, hp.ref_image_count, 1, hp.ref_seed)

    def before_task(self, task: TaskContext) -> None:
        if len(self.tasks) != task.index:
            raise RuntimeError(f"moe-adapters holds {len(self.tasks)} tasks but task {task.index} is starting")
        for pool in self.pools.values():
            pool.add_router()
        self._task_name = task.name

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """The current router (gate and noise weights) and every expert not frozen, in every adapted block."""
        t = len(self.tasks)
        params: list[nn.Parameter] = []
        for pool in self.pools.values():
            params += [pool.gate[t], pool.noise[t]]
            for i in range(self.hparams.experts):
                if not pool.frozen[i]:
                    params += pool.expert_parameters(i)
        lr = parse_lr_overrides(self.hparams.lr_overrides, self.name).get(self._task_name)
        return [{"params": params, "lr": lr}] if lr is not None else params

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        """Label-smoothed CE, image and text through the current router; plus the balance term if weighted."""
        self._aux = []
        t = task.index
        text = self.encode_text(self.model.tokenize(task.prompts), t)
        image = self.encode_image(images, t)
        total = F.cross_entropy(self.train_logits(image, text, task), labels,
                                label_smoothing=self.hparams.label_smoothing)
        if self.hparams.balance_weight > 0 and self._aux:
            total = total + self.hparams.balance_weight * torch.stack(self._aux).sum()
        self._aux = []
        return total

    def after_task(self, task: TaskContext) -> None:
        """Activate-freeze the most used experts; train this task's DDAS autoencoder and its threshold."""
        t = task.index
        k = self.hparams.freeze_top
        for pool in self.pools.values():
            if k > 0:
                counts = pool.counts[t]
                order = sorted(range(len(counts)), key=lambda i: (-float(counts[i]), i))
                pool.frozen[order[:k]] = 1.0
        with self.profiler.section("ddas_train"):
            batch = self.train_autoencoder(task)
        if self.hparams.reference_autoencoder and self.reference_ae is None:
            with self.profiler.section("ddas_reference"), global_rng_untouched(task.device):
                self.train_reference_autoencoder(task.device, batch)
        self.tasks.append(task.name)

    @torch.no_grad()
    def frozen_features(self, images: Tensor) -> Tensor:
        return self.encode_image(images, ZERO_SHOT)

    def train_autoencoder(self, task: TaskContext) -> int:
        """Task ``task``'s autoencoder and threshold, on frozen features of its training split; returns the
        batch size it trained with (the reference autoencoder's too)."""
        hp = self.hparams
        was_training = self.model.training
        self.model.eval()
        feats = []
        loader = task.loader(shuffle=False)
        batch = loader.batch_size or 64
        for images, _ in loader:
            feats.append(ddas_input(self.frozen_features(images.to(task.device))))
        self.model.train(was_training)
        x = torch.cat(feats)
        gen = torch.Generator().manual_seed(7_919 * (task.index + 1))
        ae = AutoEncoder(x.shape[1], hp.ddas_code, gen).to(x.device)
        torch.randperm(len(x), generator=gen)  # an unused draw, kept so the autoencoders stay those of earlier runs
        batches = epoch_batches(len(x), batch, hp.ddas_iterations, gen)
        fit_autoencoder(ae, x, batches, max(1, math.ceil(len(x) / batch)), hp)
        self.autoencoders.append(ae)
        with torch.no_grad():
            errors = ae.errors(x)
        self.thresholds.append(hp.threshold if hp.threshold > 0
                               else float(torch.quantile(errors.double(), hp.threshold_quantile)))
        return batch

    def train_reference_autoencoder(self, device: torch.device, batch: int) -> None:
        """The code's extra autoencoder, trained on the reference images (TinyImageNet there) with the task
        autoencoders' rule for ``reference_iterations`` steps; only the images those steps visit are encoded,
        once (TinyImageNet's 100k images outlast the code's 1000 steps of 64)."""
        hp = self.hparams
        if self._ref_data is None:
            self.setup()
        data = self._ref_data
        gen = torch.Generator().manual_seed(hp.ref_seed + 2)
        batches = epoch_batches(len(data), batch, hp.reference_iterations, gen)
        used, inverse = torch.unique(torch.cat(batches), return_inverse=True)
        was_training = self.model.training
        self.model.eval()
        feats = []
        if isinstance(data, Tensor):
            for i in range(0, len(used), batch):
                feats.append(ddas_input(self.frozen_features(data[used[i : i + batch]].to(device))))
        else:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, used.tolist()), batch_size=batch,
                                                 shuffle=False, num_workers=reference_workers(hp.ref_workers),
                                                 generator=torch.Generator().manual_seed(hp.ref_seed + 3))
            for images, _ in loader:
                feats.append(ddas_input(self.frozen_features(images.to(device))))
        self.model.train(was_training)
        x = torch.cat(feats)
        steps = list(inverse.split([len(b) for b in batches]))  # the same batches, as rows of x
        ae = AutoEncoder(x.shape[1], hp.ddas_code, gen).to(x.device)
        fit_autoencoder(ae, x, steps, max(1, math.ceil(len(data) / batch)), hp)
        self.reference_ae = ae

    # ---- evaluation ------------------------------------------------------------------------------------
    def routes_for(self, images: Tensor) -> Tensor:
        """DDAS's route of each image: a task index, or :data:`ZERO_SHOT`."""
        with self.profiler.section("ddas"):
            x = ddas_input(self.frozen_features(images))
            errors = torch.stack([ae.errors(x) for ae in self.autoencoders], dim=-1) if self.autoencoders \
                else x.new_zeros(len(x), 0)
            thresholds = torch.tensor(self.thresholds, dtype=errors.dtype, device=errors.device)
            reference = self.reference_ae.errors(x) if self.reference_ae is not None else None
            return ddas_select(errors, thresholds, reference)

    def eval_image_features(self, images: Tensor, dataset: str | None) -> Tensor:
        """Each image encoded along its DDAS route (same rule under ``--eval task`` and ``--eval union``); the
        routes are kept for :meth:`logits`, which the harness calls next on these features."""
        routes = self.routes_for(images)
        with self.profiler.section("router"):
            out = None
            for r in routes.unique().tolist():
                mask = routes == r
                feats = self.encode_image(images[mask], int(r))
                if out is None:
                    out = feats.new_empty(len(images), feats.shape[-1])
                out[mask] = feats
        self._last_routes = routes
        return out

    @torch.no_grad()
    def eval_text_features(self, prompts: list[list[str]], dataset: str) -> Tensor:
        """Class text features under every route: ``[R, C, D]``, row 0 zero-shot, row 1 + t router t."""
        variants = [self.model.class_text_features(prompts)]
        if self.tasks:
            with self.profiler.section("router"):
                for t in range(len(self.tasks)):
                    self.route = t
                    try:
                        variants.append(self.model.class_text_features(prompts))
                    finally:
                        self.route = ZERO_SHOT
        return torch.stack(variants)

    def routed_logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Scaled cosine similarity of each image to the class texts of its own route."""
        routes = self._last_routes
        if routes is None or len(routes) != len(image_features):
            raise RuntimeError("moe-adapters: logits need the routes of eval_image_features for the same images")
        if text_features.ndim == 2:
            text_features = text_features[None]
        scale = self.model.logit_scale()
        logits = image_features.new_empty(len(image_features), text_features.shape[-2])
        for r in routes.unique().tolist():
            mask = routes == r
            logits[mask] = scale * image_features[mask] @ text_features[int(r) + 1].T
        return logits

    def logits(self, image_features: Tensor, text_features: Tensor, dataset: str, trained: bool) -> Tensor:
        """MTIL: the dataset's classes, each image against the text of its DDAS route."""
        return self.routed_logits(image_features, text_features)

    def logits_union(self, image_features: Tensor, text_features: Tensor, spans: list[ClassSpan],
                     trained: int) -> Tensor:
        """X-TAIL: every dataset's classes (trained or not), each image against the text of its DDAS route (so a
        zero-shot image is scored by the plain CLIP over the whole union)."""
        return self.routed_logits(image_features, text_features)

    # ---- state -----------------------------------------------------------------------------------------
    def _shapes(self, tasks: int) -> dict[str, tuple[int, ...]]:
        hp = self.hparams
        e, r = hp.experts, hp.bottleneck
        shapes: dict[str, tuple[int, ...]] = {}
        for key, pool in self.pools.items():
            d = pool.width
            shapes.update({f"expert/{key}/down_w": (e, r, d), f"expert/{key}/down_b": (e, r),
                           f"expert/{key}/up_w": (e, d, r), f"expert/{key}/up_b": (e, d),
                           f"router/{key}/gate": (tasks, d, e), f"router/{key}/noise": (tasks, d, e),
                           f"frozen/{key}": (e,), f"counts/{key}": (tasks, e)})
        if tasks:
            f, c = self.model.clip.visual.output_dim, hp.ddas_code
            shapes.update({"ddas/enc_w": (tasks, c, f), "ddas/enc_b": (tasks, c), "ddas/dec_w": (tasks, f, c),
                           "ddas/dec_b": (tasks, f), "ddas/threshold": (tasks,)})
            if hp.reference_autoencoder:  # trained after the first task
                shapes.update({"reference/enc_w": (c, f), "reference/enc_b": (c,), "reference/dec_w": (f, c),
                               "reference/dec_b": (f,)})
        return shapes

    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        t = len(self.tasks)
        for key, pool in self.pools.items():
            for name in ("down_w", "down_b", "up_w", "up_b"):
                out[f"expert/{key}/{name}"] = torch.stack([p.detach() for p in getattr(pool, name)]).clone()
            d, e = pool.width, self.hparams.experts
            for name in ("gate", "noise"):
                params = list(getattr(pool, name))[:t]
                out[f"router/{key}/{name}"] = (torch.stack([p.detach() for p in params]).clone() if params
                                               else pool.frozen.new_zeros(0, d, e))
            out[f"frozen/{key}"] = pool.frozen.clone()
            out[f"counts/{key}"] = pool.counts[:t].clone()
        if self.autoencoders:
            aes = list(self.autoencoders)
            out["ddas/enc_w"] = torch.stack([a.encoder.weight.detach() for a in aes]).clone()
            out["ddas/enc_b"] = torch.stack([a.encoder.bias.detach() for a in aes]).clone()
            out["ddas/dec_w"] = torch.stack([a.decoder.weight.detach() for a in aes]).clone()
            out["ddas/dec_b"] = torch.stack([a.decoder.bias.detach() for a in aes]).clone()
            out["ddas/threshold"] = torch.tensor(self.thresholds, dtype=torch.float64)
        if self.reference_ae is not None:
            ref = self.reference_ae
            out.update({"reference/enc_w": ref.encoder.weight.detach().clone(),
                        "reference/enc_b": ref.encoder.bias.detach().clone(),
                        "reference/dec_w": ref.decoder.weight.detach().clone(),
                        "reference/dec_b": ref.decoder.bias.detach().clone()})
        return out

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """Experts of this pool size and width, one router, count row and autoencoder per task done (and the
        reference autoencoder once a task is done, with ``reference_autoencoder``), 0/1 frozen masks,
        non-negative counts and thresholds; JSON: the names of the tasks done."""
        shapes = self._shapes(len(tasks))
        expect_keys(state, shapes)
        for key, shape in shapes.items():
            dtype = torch.float64 if key == "ddas/threshold" else torch.float32
            expect_tensor(key, state[key], shape=shape, dtype=dtype, finite=True)
            value = state[key]
            if key.startswith("frozen/") and not bool(((value == 0) | (value == 1)).all()):
                raise StateMismatch(tensor_entry(key), "holds values other than 0 and 1")
            if (key.startswith("counts/") or key == "ddas/threshold") and bool((value < 0).any()):
                raise StateMismatch(tensor_entry(key), "holds negative values")
        if not isinstance(extra, dict):
            raise StateMismatch("method_extra", "is not a JSON object")
        expect_keys(extra, {"tasks"}, entry=extra_entry)
        if extra["tasks"] != [t.name for t in tasks]:
            raise StateMismatch(extra_entry("tasks"), f"is {extra['tasks']!r:.80}, expected the tasks done "
                                                      f"{[t.name for t in tasks]!r:.80}")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        t = state[next(k for k in state if k.startswith("router/"))].shape[0] if state else 0
        for key, pool in self.pools.items():
            for name in ("down_w", "down_b", "up_w", "up_b"):
                for p, value in zip(getattr(pool, name), state[f"expert/{key}/{name}"], strict=True):
                    p.copy_(value)
            while len(pool.gate) < t:
                pool.add_router()
            for name in ("gate", "noise"):
                for p, value in zip(list(getattr(pool, name))[:t], state[f"router/{key}/{name}"], strict=True):
                    p.copy_(value)
            pool.frozen.copy_(state[f"frozen/{key}"])
            pool.counts = state[f"counts/{key}"].to(pool.frozen.device).clone()
        self.autoencoders = nn.ModuleList()
        self.thresholds = []
        if t:
            enc_w = state["ddas/enc_w"]
            for i in range(t):
                ae = AutoEncoder(enc_w.shape[2], enc_w.shape[1]).to(enc_w.device)
                ae.encoder.weight.copy_(enc_w[i])
                ae.encoder.bias.copy_(state["ddas/enc_b"][i])
                ae.decoder.weight.copy_(state["ddas/dec_w"][i])
                ae.decoder.bias.copy_(state["ddas/dec_b"][i])
                ae.eval().requires_grad_(False)
                self.autoencoders.append(ae)
            self.thresholds = [float(v) for v in state["ddas/threshold"]]
        self.reference_ae = None
        if "reference/enc_w" in state:
            enc_w = state["reference/enc_w"]
            ref = AutoEncoder(enc_w.shape[1], enc_w.shape[0]).to(enc_w.device)
            ref.encoder.weight.copy_(enc_w)
            ref.encoder.bias.copy_(state["reference/enc_b"])
            ref.decoder.weight.copy_(state["reference/dec_w"])
            ref.decoder.bias.copy_(state["reference/dec_b"])
            self.reference_ae = ref.eval().requires_grad_(False)

    def extra_state(self) -> dict:
        return {"tasks": list(self.tasks)}

    def load_extra_state(self, extra: dict) -> None:
        self.tasks = list(extra.get("tasks", []))

    def state_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, value in self.state_dict().items():
            kind = key.split("/")[0]
            kind = {"expert": "experts", "router": "routers", "ddas": "autoencoders",
                    "reference": "reference_autoencoder"}.get(kind, kind)
            out[kind] = out.get(kind, 0) + value.numel() * value.element_size()
        return out


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
RECIPES = {
    "moe-adapters": RecipeCard(
        "MoE-Adapters (Yu et al., CVPR 2024), official code JiazuoYu/MoE-Adapters4CL "
        "mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh",
        {"train.optimizer": code("AdamW (src/models/finetune.py)"),
         "train.lr": code("lr list of the script (1e-3 for most datasets); the exceptions are lr_overrides"),
         "train.weight_decay": code("args.py default --wd 0"),
         "train.schedule": code("linear warm-up then cosine decay (utils.cosine_lr), per iteration"),
         "train.warmup_steps": code("args.py --warmup_length"),
         "train.epochs": adapted("only high enough for max_steps to end the task"),
         "train.max_steps": code("--iterations 1000"),
         "train.batch_size": code("args.py default"),
         "experts": code("--experts_num 22 (num=22)"),
         "top_k": code("args.py --topk"),
         "bottleneck": code("--ffn_num 64 (down_proj hard-codes 64)"),
         "adapter_scale": code("Adapter(adapter_scalar=0.1)"),
         "dropout": code("Adapter(dropout=0.1), after the ReLU"),
         "noisy_gating": code("noisy_gating=True, noise only with --is_train"),
         "noise_epsilon": code("noise_epsilon=1e-2"),
         "balance_weight": code("the code computes 1e-2·(CV²(importance)+CV²(load)) and never adds it to the "
                                "loss: 0 reproduces its objective"),
         "freeze_top": code("topk(choose_map, 2) written to the frozen list after every task"),
         "encoders": code("--ffn_adapt_where AdapterDoubleEncoder: every block of both towers"),
         "label_smoothing": code("--ls 0.2"),
         "lr_overrides": code("the script's lr list: Aircraft and CIFAR100 5e-3, EuroSAT and MNIST 1e-4"),
         "ddas_iterations": code("--iterations 300 for each task's autochooser"),
         "ddas_code": code("Autoencoder(code_dims=100)"),
         "ddas_lr": code("exp_lr_scheduler(..., 0.01) sets the rate of every step"),
         "ddas_lr_decay_epochs": code("exp_lr_scheduler lr_decay_epoch=10"),
         "ddas_weight_decay": code("Adam weight_decay=0.0001"),
         "threshold": adapted("0 = per-task quantile rule: the code's 0.0655 is a reconstruction MSE of "
                              "AlexNet conv5 features, which clbench replaces by frozen CLIP features"),
         "threshold_quantile": assumption("the share of a task's own training images DDAS keeps on its router "
                                          "when threshold=0"),
         "reference_autoencoder": code("the scripts train chooser_dataset[0]=TinyImagenet's autochooser and "
                                       "evaluation sends its wins (ties included) to zero-shot; the paper describes "
                                       "only the threshold, so it is off outside --preset paper"),
         "reference_iterations": code("--iterations 1000 for the TinyImagenet autochooser"),
         "ref_images": adapted("the code reads TinyImageNet train; pass its ImageFolder root (e.g. "
                               "tiny-imagenet-200/train): clbench downloads nothing; empty = the embedded "
                               "benchmark's held-out images"),
         "ref_image_count": adapted("embedded benchmark only: how many held-out pretraining-corpus images stand "
                                    "in for TinyImageNet (ZSCL's embedded reference count)"),
         "ref_seed": assumption("the stream of the embedded reference images (ZSCL's) and of the reference "
                                "autoencoder's initialisation and shuffling"),
         "ref_workers": assumption("loader processes reading ref_images (at most --threads); no effect on "
                                   "results")}),
}
