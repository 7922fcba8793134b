"""Reference implementations of the official codes' approaches, for side-by-side cost comparisons only.

Written from the behaviour of KeepLoRA's official MTIL code (MaolinLuo/KeepLoRA ``MTIL/``), not
from the official sources; clbench itself never uses them.

- :func:`official_mean_gradients` (D3): every encoder parameter requires grad; after each batch's backward,
  every parameter's gradient is copied to the host and added into a host dictionary; the mean is taken at the
  end. On a CPU-only run the copy is still made (``.to("cpu", copy=True)``), standing in for the
  device-to-host transfer of a GPU run (on CPU the official ``.cpu()`` would alias instead; the memory held
  is the same, one dictionary of all gradients plus the live gradients). float32 here: the official fp16
  autocast without loss scaling is a GPU-only detail that does not change what is held or copied.
- :class:`RunningMeanFeatures` (D2): the running mean ``F ← n/(n+m)·F + X_bᵀ/(n+m)`` of each batch's
  ``d × (L·B)`` token matrix (LND order), kept in float32, one per adapted matrix: four per block (q, k and v
  hold three identical copies of the same input's statistic, o its own).
- :func:`official_accuracy`: evaluation that re-encodes the class prompts for every test batch (the text head
  is built on every forward pass, as in that code), full 77-token context.
- :func:`official_principal_basis` (S0, as the official code does it): one full float32 ``torch.linalg.svd`` per
weight, the cut
  taken on its σ².
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from clbench.datasets.base import Task
from clbench.linalg import BASIS_DTYPE, Rule, Side, energy_rank
from clbench.methods.keeplora import AdaptedMatrix
from clbench.models.clip import ClipModel

OFFICIAL_FEATURE_SLOTS = ("q", "k", "v", "o")  # one accumulator per adapted matrix


def official_encode_text(model: ClipModel, tokens: Tensor) -> Tensor:
    """L2-normalised text features over the full context (open_clip's ``encode_text``, as the official code)."""
    return F.normalize(model.clip.encode_text(tokens), dim=-1)


def clip_ce_loss(model: ClipModel, images: Tensor, labels: Tensor, tokens: Tensor) -> Tensor:
    """CE over the task's classes on ``logit_scale · cos(image, text)``, text features encoded with grad."""
    text = official_encode_text(model, tokens)
    image = model.encode_image(images)
    return F.cross_entropy(model.logit_scale() * image @ text.T, labels)


def official_mean_gradients(model: ClipModel, batches: Iterable[tuple[Tensor, Tensor]],
                            tokens: Tensor) -> dict[str, Tensor]:
    """Mean gradient of every encoder parameter (by name), official style: all parameters require grad,
    each batch's gradients are copied to the host and added there. Restores ``requires_grad`` and mode."""
    named = [(n, p) for n, p in model.clip.named_parameters() if n != "logit_scale"]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    host: dict[str, Tensor] = {}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(True)
        model.train()
        for images, labels in batches:
            model.zero_grad(set_to_none=True)
            clip_ce_loss(model, images, labels, tokens).backward()
            for name, p in named:
                if p.grad is None:
                    continue
                grad = p.grad.detach().to("cpu", copy=True)  # the per-batch device-to-host copy
                if name in host:
                    host[name].add_(grad)
                else:
                    host[name] = grad
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("no batches to estimate the gradient on")
    return {name: g / count for name, g in host.items()}


def matrix_gradients(model: ClipModel, grads: dict[str, Tensor], matrices: list[AdaptedMatrix]) -> dict[str, Tensor]:
    """The q/k/v/o weight gradients (PyTorch layout) of ``matrices`` out of a by-parameter-name dictionary."""
    names = {id(p): n for n, p in model.clip.named_parameters()}
    out = {}
    for m in matrices:
        module = m.site.module
        if m.proj == "o":
            out[m.name] = grads[names[id(module.out_proj.weight)]]
        else:
            d, index = module.embed_dim, "qkv".index(m.proj)
            out[m.name] = grads[names[id(module.in_proj_weight)]][index * d : (index + 1) * d]
    return out


class RunningMeanFeatures:
    """The official statistic of one adapted matrix's input: the running mean of ``X_bᵀ`` (``d × L·B``)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix: Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """``x``: batch-first tokens ``[B, L, d]``; stacked in LND order (row ``l·B + n``) and transposed."""
        Xt = x.detach().transpose(0, 1).reshape(-1, self.dim).T.float()
        m = Xt.shape[1]
        if self.matrix is None:
            self.matrix = torch.zeros_like(Xt)
        n = self.count
        self.matrix.mul_(n / (n + m)).add_(Xt, alpha=1.0 / (n + m))  # in place: the frugal way to keep it
        self.count = n + m

    def nbytes(self) -> int:
        return 0 if self.matrix is None else self.matrix.numel() * self.matrix.element_size()


@torch.no_grad()
def official_accuracy(model: ClipModel, task: Task, batch_size: int, device: torch.device | str) -> float:
    """Top-1 accuracy (percent) on ``task.test`` with the first template, prompts re-encoded every batch."""
    model.eval()
    correct = total = 0
    prompts = task.prompts(0)
    for images, labels in DataLoader(task.test, batch_size=batch_size, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        text = official_encode_text(model, model.tokenize(prompts))
        logits = model.logit_scale() * model.encode_image(images) @ text.T
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def official_principal_basis(W: Tensor, threshold: float, side: Side = "input", rule: Rule = "paper") -> Tensor:
    """S0 the official way: a full float32 ``torch.linalg.svd`` of the weight (the official code: 96 full fp32 SVDs),
    the kept singular vectors of ``side`` cut by ``rule`` at ``threshold`` on σ²; float32 basis."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    vectors = Vh.T if side == "input" else U
    return vectors[:, : energy_rank(S**2, threshold, rule)].to(BASIS_DTYPE).contiguous()
