"""DIKI (Tang et al., ECCV 2024, "Mind the Interference: Retaining Pre-trained Knowledge in Parameter Efficient
Continual Learning of Vision-Language Models"), as its official code lloongx/DIKI@8ef89e7 runs MTIL
(``configs/MTIL.yaml``, ``DIKI/DIKI.py``, ``clip/attention.py``).

Frozen CLIP; task-specific key/value prompts in a *fully residual* attention branch; per-task Gaussians of the
frozen image features that pick the prompt and calibrate how strongly it is injected at test time.

- **Fully residual attention** [code ``multi_head_attention_forward``]. In each of the first ``depth_vision``
  blocks of the image tower and ``depth_text`` blocks of the text tower (8 and 8 of ViT-B/16's 12; every block
  of an encoder that has fewer), task ``t`` owns keys ``K_t`` and values ``V_t`` (``prompt_length`` = 8 tokens
  of the attention width, in the projected key/value space: they do not pass through ``in_proj``). The
  attended values before the output projection are

  ``O = softmax(q Kᵀ/√d_h) V + w · softmax(q K_tᵀ/√d_h) V_t``

  per head: the prompts sit in their own softmax, never concatenated to the pretrained keys, so the
  pretrained branch is exactly CLIP's; the text tower's causal mask applies to the pretrained branch only.
  Keys start uniform in ``[-key_init, key_init]`` (1), values at zero, so before training the residual is
  zero and every output is CLIP's. Only the current task's prompts train (the code's SGD steps the whole
  pool, but the other entries get no gradient and no weight decay). ``w`` = 1 in training.
- **Distribution-aware integration calibration** [code ``CustomCLIP.forward``/``train_one_task``]. Before task
  ``t`` trains, the frozen (prompt-free) CLIP encodes its training images; on the L2-normalised image
  embeddings (the projected output, ``D`` = 512 on ViT-B/16) it keeps the mean ``μ_t`` and the unbiased
  covariance ``Σ_t = Σ_n (f_n − μ_t)(f_n − μ_t)ᵀ / (N − 1) + cov_eps · I`` (``cov_eps`` = 1e-7). At test, for
  an image with frozen embedding ``f``: ``ℓ_j = log N(f; μ_j, Σ_j)`` over the learned tasks, the estimate
  ``ĵ = argmax_j ℓ_j`` and the weight ``w = sigmoid(ℓ_ĵ / calib_dim − calib_shift)``. The code writes
  ``topk/512 - 1.0``: 512 is ViT-B/16's embedding width, so ``calib_dim`` = 0 means the model's embedding width
  (512 on ViT-B/16, the code's constant exactly; 128 on the embedded tiny CLIP) and ``calib_shift`` = 1.
  ``w`` scales the *residual* (prompt) branch only, never the pretrained one, so an image far from every
  learned distribution is encoded almost as by zero-shot CLIP.
- **Batch-wise prompt** (``batchwise_prompt: True`` in every MTIL config): the whole test batch uses the prompt
  that most of its images selected (ties: the lowest task index); each image keeps its own weight ``w`` in
  the image tower, and the class texts are encoded with that prompt at the batch's mean weight (the code's
  ``text_batch_weight``). The text features therefore depend on the batch and are encoded per test batch.
  The code's per-image mode (``batchwise_prompt: False``) fails for batches of more than one image (its
  text weight has one entry per class, not per image-class pair), so it is not offered.

Evaluation under both rules (the harness's ``--eval``):

- ``task`` (MTIL): the class set is the test dataset's own, as the rule says, but the prompt and its weight
  come from the likelihood estimate above, never from the known task identity: this is how the official
  ``evaluate`` scores every dataset (``self.model(inputs)`` without ``task_ids``).
- ``union`` (X-TAIL): the same estimate; the classes of every dataset, in sequence order, are encoded with
  the batch's prompt and mean weight, and the image is classified among all of them.

The harness's test batches each come from one dataset, so the batch-wise vote sees a batch of one domain
under both rules, as in the official evaluation (which feeds each dataset's test loader separately).

Before the first task (zero-shot row) nothing is learned and DIKI is zero-shot CLIP.

Cost centres: ``feature_stats`` (the frozen pass over a task's training images for its Gaussian),
``task_estimation`` (at evaluation: the extra prompt-free image forward and the log-likelihoods of every
test batch) and ``routed_text`` (the class texts encoded again per test batch with the selected prompt).
State: every task's prompts (``key/<site>``, ``value/<site>``, ``[tasks, P, width]``) and Gaussians
(``mean`` ``[tasks, D]``, ``covariance`` ``[tasks, D, D]``), float32, in ``state_dict``.

Where clbench departs from the official run (see the recipe card): the official split of each dataset into
train/validation/test with the best epoch chosen on validation cannot be followed (MTIL here has no
validation split, as ZSCL's and KeepLoRA's protocols); its cosine decays to ``1e-3·lr``, the harness's to 0;
its prompts are float16 (CLIP in half precision), here float32. The paper's full text was not available
while this was written; the calibration formula is the code's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clbench.datasets.base import ClassSpan, Task
from clbench.errors import UserError
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, adapted, code, harness
from clbench.methods.registry import register_method
from clbench.methods.state_checks import (
    StateMismatch,
    expect_keys,
    expect_tensor,
    extra_entry,
    tensor_entry,
)
from clbench.models.clip import AttentionSite


@dataclass
class DIKIHparams:
    prompt_length: int = field(default=8, metadata={"min": 1})
    depth_vision: int = field(default=8, metadata={"min": 0})
    depth_text: int = field(default=8, metadata={"min": 0})
    key_init: float = field(default=1.0, metadata={"min": 0.0})
    calibrate: bool = True
    calib_dim: int = field(default=0, metadata={"min": 0})
    calib_shift: float = 1.0
    cov_eps: float = field(default=1e-7, metadata={"min": 0.0, "exclusive_min": True})


@dataclass
class Gaussian:
    """One task's distribution of frozen image embeddings, with its Cholesky factor (float64) for the likelihood."""

    mean: Tensor
    covariance: Tensor
    chol: Tensor | None = None


def gaussian_stats(features: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (+ ``eps``·I) of ``features`` ``[N, D]``, computed in float64, as float32."""
    x = features.double()
    if x.shape[0] < 2:
        raise UserError(f"DIKI needs at least 2 training images per task for its covariance, got {x.shape[0]}; "
                        "add training data")
    mean = x.mean(0)
    delta = x - mean
    cov = delta.T @ delta / (x.shape[0] - 1) + eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return mean.float(), cov.float()


def gaussian_log_likelihood(features: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """``log N(f; μ, Σ)`` of each row of ``features`` ``[B, D]``, with ``Σ = L Lᵀ`` (``chol`` = L), float64."""
    d = mean.shape[-1]
    delta = (features.double() - mean.double()).T  # [D, B]
    z = torch.linalg.solve_triangular(chol, delta, upper=False)
    maha = (z * z).sum(0)
    logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * (d * math.log(2 * math.pi) + logdet + maha)


def calibration_weight(log_likelihood: Tensor, dim: int, shift: float) -> Tensor:
    """DIKI's injection weight ``sigmoid(ℓ / dim − shift)`` (the code: ``sigmoid(topk/512 - 1.0)``)."""
    return torch.sigmoid(log_likelihood / dim - shift)


def majority(indices: Tensor) -> int:
    """The most frequent entry of ``indices`` (ties: the smallest), the code's batch-wise prompt vote."""
    values, counts = torch.unique(indices, return_counts=True, sorted=True)
    return int(values[int(torch.argmax(counts))])


@register_method("diki")
class DIKI(Method):
    """DIKI: frozen CLIP, task key/value prompts in a fully residual attention branch (zero-initialised values),
    per-task Gaussians of the frozen image embeddings choosing the prompt and scaling its injection at test."""

    summary = "fully residual KV prompts per task + Gaussian task estimate and calibrated injection weight"
    Hparams = DIKIHparams
    keeps_modules = True

    def __init__(self, model, hparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.keys: dict[str, list[nn.Parameter]] = {}
        self.values: dict[str, list[nn.Parameter]] = {}
        self.gaussians: list[Gaussian] = []
        # the prompt (task index) and weight each tower uses on its next forwards; None = prompts off
        self.routes: dict[str, tuple[int, Tensor | None] | None] = {"vision": None, "text": None}
        self._eval_prompts: dict[str, list[list[str]]] = {}
        self._text_route: tuple[int, Tensor] | None = None
        self._installed = False

    # ---- sites and the residual branch ------------------------------------------------------------
    def sites(self) -> list[AttentionSite]:
        """The prompted blocks: the first ``depth_vision`` of the image tower, ``depth_text`` of the text tower."""
        hp = self.hparams
        vision = self.model.attention_sites(["vision"])[: hp.depth_vision]
        text = self.model.attention_sites(["text"])[: hp.depth_text]
        return vision + text

    def _install(self) -> None:
        if self._installed:
            return
        if not self.sites():
            raise UserError("diki.depth_vision and diki.depth_text are both 0: no block gets prompts; set one >= 1")
        for site in self.sites():
            self.keys.setdefault(site.name, [])
            self.values.setdefault(site.name, [])
            site.module.set_residual_kv(lambda n, site=site: self._residual_kv(site, n))
        self._installed = True

    def _residual_kv(self, site: AttentionSite, n: int):
        route = self.routes[site.encoder]
        if route is None:
            return None
        task, weight = route
        keys, values = self.keys[site.name][task], self.values[site.name][task]
        if weight is not None and weight.ndim == 0:
            weight = weight.expand(n)
        return keys[None], values[None], weight

    def setup(self) -> None:
        self._install()

    def _route_all(self, task: int | None, weight: Tensor | None = None) -> None:
        for encoder in self.routes:
            self.routes[encoder] = None if task is None else (task, weight)

    # ---- training ---------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_gaussian(self, task: TaskContext) -> Gaussian:
        """The task's Gaussian of frozen, prompt-free, L2-normalised image embeddings of its training images."""
        self._route_all(None)
        was_training = self.model.training
        self.model.eval()
        feats = [self.model.encode_image(images.to(task.device)).float()
                 for images, _ in task.loader(shuffle=False)]
        self.model.train(was_training)
        if not feats:
            raise UserError(f"task {task.name!r} has no training images for DIKI's Gaussian; add training data")
        mean, cov = gaussian_stats(torch.cat(feats), self.hparams.cov_eps)
        return Gaussian(mean, cov)

    def before_task(self, task: TaskContext) -> None:
        self._install()
        with self.profiler.section("feature_stats"):
            self.gaussians.append(self.collect_gaussian(task))
        hp = self.hparams
        t = len(self.keys[self.sites()[0].name])
        gen = torch.Generator().manual_seed(t * 7919 + 29)
        for site in self.sites():
            keys = torch.empty(hp.prompt_length, site.width).uniform_(-hp.key_init, hp.key_init, generator=gen)
            device = site.module.in_proj_weight.device
            self.keys[site.name].append(nn.Parameter(keys.to(device)))
            self.values[site.name].append(nn.Parameter(torch.zeros(hp.prompt_length, site.width, device=device)))
        self._route_all(t)  # training: the task's own prompt, weight 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for site in self.sites() for p in (self.keys[site.name][-1], self.values[site.name][-1])]

    def after_task(self, task: TaskContext) -> None:
        self._route_all(None)
        for site in self.sites():
            for p in (self.keys[site.name][-1], self.values[site.name][-1]):
                p.requires_grad_(False)

    # ---- evaluation -------------------------------------------------------------------------------
    @property
    def learned(self) -> int:
        return len(self.gaussians)

    def log_likelihoods(self, features: Tensor) -> Tensor:
        """``[B, learned]`` log-likelihoods of frozen embeddings ``features`` under every task's Gaussian."""
        out = []
        for j, g in enumerate(self.gaussians):
            if g.chol is None:
                chol, info = torch.linalg.cholesky_ex(g.covariance.double())
                if int(info):
                    raise UserError(f"DIKI's covariance of task {j + 1} is not positive definite; raise "
                                    f"diki.cov_eps (now {self.hparams.cov_eps})")
                g.chol = chol
            out.append(gaussian_log_likelihood(features, g.mean.to(features.device), g.chol.to(features.device)))
        return torch.stack(out, dim=1)

    def estimate(self, frozen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image: the estimated task, its log-likelihood and the calibrated weight (1 with ``calibrate`` off)."""
        best, index = self.log_likelihoods(frozen).max(dim=1)
        dim = self.hparams.calib_dim or frozen.shape[-1]
        weight = calibration_weight(best, dim, self.hparams.calib_shift) if self.hparams.calibrate \
            else torch.ones_like(best)
        return index, best, weight.float()

    def eval_image_features(self, images: Tensor, dataset: str | None) -> Tensor:
        """Zero-shot CLIP before any task; then the image tower with the batch's voted prompt, each image's
        residual scaled by its own calibrated weight (``dataset`` is not used: the estimate picks the prompt)."""
        self._text_route = None
        if not self.learned:
            return self.model.encode_image(images)
        with self.profiler.section("task_estimation"):
            self._route_all(None)
            frozen = self.model.encode_image(images)
            index, _, weight = self.estimate(frozen)
            task = majority(index)
        self.routes["vision"] = (task, weight)
        try:
            features = self.model.encode_image(images)
        finally:
            self.routes["vision"] = None
        self._text_route = (task, weight.mean())
        return features

    def eval_text_features(self, prompts: list[list[str]], dataset: str) -> Tensor:
        """Zero-shot class features before any task. Once a task is learned the class texts are encoded per test
        batch with its prompt and weight (:meth:`routed_text`), so the prompts are kept and zeros of the same
        shape stand in (they are never scored)."""
        self._route_all(None)
        self._eval_prompts[dataset] = prompts
        if self.learned:
            return torch.zeros(len(prompts), self._embed_dim(), device=self.model.device)
        return self.model.class_text_features(prompts)

    def routed_text(self, prompts: list[list[str]]) -> Tensor:
        """Class features encoded with the last image batch's prompt and mean weight."""
        task, weight = self._text_route
        with self.profiler.section("routed_text"):
            self.routes["text"] = (task, weight)
            try:
                return self.model.class_text_features(prompts)
            finally:
                self.routes["text"] = None

    def logits(self, image_features: Tensor, text_features: Tensor, dataset: str, trained: bool) -> Tensor:
        if self._text_route is not None:
            text_features = self.routed_text(self._eval_prompts[dataset])
        return self.model.logit_scale() * image_features @ text_features.T

    def logits_union(self, image_features: Tensor, text_features: Tensor, spans: list[ClassSpan],
                     trained: int) -> Tensor:
        """Every dataset's classes (in ``spans`` order) encoded with the batch's prompt and mean weight."""
        if self._text_route is not None:
            text_features = self.routed_text([p for s in spans for p in self._eval_prompts[s.dataset]])
        return self.model.logit_scale() * image_features @ text_features.T

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        hp = self.hparams
        state = {}
        for site in self.sites():
            for kind, table in (("key", self.keys), ("value", self.values)):
                entries = table.get(site.name, [])
                state[f"{kind}/{site.name}"] = (torch.stack([p.detach() for p in entries]) if entries else
                                                torch.zeros(0, hp.prompt_length, site.width))
        dim = self._embed_dim()
        state["mean"] = torch.stack([g.mean for g in self.gaussians]) if self.gaussians else torch.zeros(0, dim)
        state["covariance"] = (torch.stack([g.covariance for g in self.gaussians]) if self.gaussians
                               else torch.zeros(0, dim, dim))
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def _embed_dim(self) -> int:
        projection = self.model.clip.visual.proj
        if isinstance(projection, Tensor):
            return int(projection.shape[-1])
        return int(getattr(self.model.clip.visual, "output_dim", 0) or self.model.attention_sites(["vision"])[0].width)

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """Prompts and Gaussians of exactly the tasks done: ``key/<site>``/``value/<site>`` ``[t, P, width]`` for
        every prompted block, ``mean`` ``[t, D]``, ``covariance`` ``[t, D, D]`` symmetric positive semi-definite;
        float32, finite; no JSON state."""
        hp, t, dim = self.hparams, len(tasks), self._embed_dim()
        shapes = {f"{kind}/{site.name}": (t, hp.prompt_length, site.width)
                  for site in self.sites() for kind in ("key", "value")}
        shapes["mean"], shapes["covariance"] = (t, dim), (t, dim, dim)
        expect_keys(state, shapes)
        for key, shape in shapes.items():
            expect_tensor(key, state[key], shape=shape, dtype=torch.float32, finite=True)
        cov = state["covariance"].double()
        for j in range(t):
            c = cov[j]
            scale = float(c.abs().max()) or 1.0
            if not torch.allclose(c, c.T, atol=1e-6 * scale, rtol=0):
                raise StateMismatch(tensor_entry("covariance"), f"task {j + 1}'s covariance is not symmetric")
            if float(torch.linalg.eigvalsh(c).min()) < -1e-6 * scale:
                raise StateMismatch(tensor_entry("covariance"),
                                    f"task {j + 1}'s covariance is not positive semi-definite")
        expect_keys(extra, (), entry=extra_entry)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._install()
        device = self.model.device
        for site in self.sites():
            for kind, table in (("key", self.keys), ("value", self.values)):
                stacked = state.pop(f"{kind}/{site.name}")
                table[site.name] = [nn.Parameter(p.to(device).clone(), requires_grad=False) for p in stacked]
        means, covs = state.pop("mean"), state.pop("covariance")
        self.gaussians = [Gaussian(m.to(device).clone(), c.to(device).clone()) for m, c in zip(means, covs,
                                                                                            strict=True)]
        if state:
            raise ValueError(f"{self.name}: unexpected state entries {sorted(state)[:3]}")

    def state_bytes(self) -> dict[str, int]:
        prompts = sum(p.numel() * p.element_size() for table in (self.keys, self.values)
                      for entries in table.values() for p in entries)
        gaussians = sum(g.mean.numel() * g.mean.element_size() + g.covariance.numel() * g.covariance.element_size()
                        for g in self.gaussians)
        return {"prompts": prompts, "gaussians": gaussians}


# ---- recipe card (provenance under --preset paper; the values live in presets/paper.json and the defaults) ----------
_YAML = "configs/MTIL.yaml (and MTIL-order-II.yaml)"
RECIPES = {
    "diki": RecipeCard(
        "DIKI (Tang et al., ECCV 2024), official code lloongx/DIKI@8ef89e7, configs/MTIL.yaml",
        {"train.optimizer": code(f"SGD without momentum ({_YAML}: optim.name SGD; torch's default momentum 0)"),
         "train.lr": code(f"{_YAML}: optim.lr 5.0"),
         "train.weight_decay": code(f"{_YAML}: weight_decay 0"),
         "train.schedule": adapted("the code's per-step cosine decays to 1e-3·lr, the harness's cosine to 0"),
         "train.warmup_steps": code(f"{_YAML}: warmup_epoch 0"),
         "train.epochs": code(f"{_YAML}: max_epoch 10 on every dataset, both orders; the code keeps the best "
                              "epoch on a validation split, which clbench's MTIL (ZSCL's splits) does not have"),
         "train.max_steps": harness("no step cap: the epochs decide"),
         "train.batch_size": code(f"{_YAML}: optim.batch_size 128"),
         "prompt_length": code(f"{_YAML}: n_ctx_vision = n_ctx_text = 8"),
         "depth_vision": code(f"{_YAML}: prompt_depth_vision 8 (the first 8 blocks)"),
         "depth_text": code(f"{_YAML}: prompt_depth_text 8 (the first 8 blocks)"),
         "key_init": code("clip/attention.py: key prompts uniform(-1, 1), value prompts zero"),
         "calibrate": code("DIKI.py CustomCLIP.forward: the weight scales the residual branch at test"),
         "calib_dim": code("DIKI.py: topk/512 - 1.0; 512 = ViT-B/16's embedding width (0 = the model's width)"),
         "calib_shift": code("DIKI.py: topk/512 - 1.0"),
         "cov_eps": code("DIKI.py train_one_task: covar += 1e-7·I")}),
}
