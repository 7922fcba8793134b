"""Plain re-derivations for end-to-end method tests: tasks whose input statistics differ from task to task,
an unshuffled task context, and the token covariance of every attention input computed with plain torch
(an observer and ``XᵀX/N``), independent of the methods' own accumulators."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from clbench.datasets.base import Task
from clbench.methods.base import TaskContext
from clbench.models.clip import AttentionSite, ClipModel

D64 = torch.float64


def styled_task(name: str, seed: int, classes: int = 4, per_class: int = 6, size: int = 32) -> Task:
    """A task whose images carry a task-specific random pattern and contrast, so the input covariance of
    one task differs clearly from another's (class ``c`` adds ``c`` to every pixel)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    pattern = torch.randn(3, size, size, generator=gen) * (1 + seed)
    noise = torch.randn(len(labels), 3, size, size, generator=gen) * (0.5 + 0.5 * seed)
    images = noise + pattern + labels[:, None, None, None].float()
    data = TensorDataset(images, labels)
    return Task(name, [f"{name} thing{i}" for i in range(classes)], ["a photo of a {}."], data, data)


def ordered_ctx(task: Task, index: int, num_tasks: int, steps: int, batch_size: int = 1024) -> TaskContext:
    """A context whose loaders do not shuffle (by default one batch holds the whole task)."""

    def make(dataset, batch_size: int | None = None, shuffle: bool = True, drop_last: bool = False):
        return DataLoader(dataset, batch_size=batch_size or default, shuffle=False, drop_last=drop_last)

    default = batch_size
    return TaskContext(index, task, num_tasks, torch.device("cpu"), make, steps, prompts=task.prompts())


@torch.no_grad()
def plain_covariances(model: ClipModel, sites: list[AttentionSite], task: Task) -> dict[str, torch.Tensor]:
    """``(1/N) Σ x xᵀ`` (float64) over every token entering each site's q/k/v: all training images for vision
    sites, the task's class prompts (padding included) for text sites."""
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def observer(name: str):
        return lambda kind, x: rows[name].append(x.detach().reshape(-1, x.shape[-1])) if kind == "qkv" else None

    removers = [s.module.add_observer(observer(s.name)) for s in sites]
    was_training = model.training
    model.eval()
    try:
        if any(s.encoder == "vision" for s in sites):
            model.encode_image(torch.stack([task.train[i][0] for i in range(len(task.train))]))
        if any(s.encoder == "text" for s in sites):
            model.encode_text(model.tokenize(task.prompts()))
    finally:
        for remove in removers:
            remove()
        model.train(was_training)
    out = {}
    for name, chunks in rows.items():
        X = torch.cat(chunks).to(D64)
        out[name] = X.T @ X / X.shape[0]
    return out


@torch.no_grad()
def randomise_norms(model: ClipModel, seed: int = 0) -> None:
    """Random LayerNorm gains and biases: with the initial ones (1, 0) every attention input is mean-free, so
    its covariance is singular along the all-ones direction and generalized eigenproblems are ill-posed."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))


def span_projector(rows: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row span of ``rows``."""
    Q, _ = torch.linalg.qr(rows.T.to(D64))
    return Q @ Q.T


def top_eigvecs(C: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading eigenvectors (columns) of a symmetric matrix."""
    _, vecs = torch.linalg.eigh(C.to(D64))
    return vecs.flip(1)[:, :r]
