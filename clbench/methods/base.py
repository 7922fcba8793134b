"""The CLIP setting's method base: the shared contract (:mod:`clbench.methods.contract`) and the CLIP hooks.

The harness owns data, batching, optimiser and schedule, evaluation, metrics and storage. A method sees
the model, its own typed hyperparameters and the current task, and supplies:

- ``setup()``                     once before the first task (e.g. SVD of the pretrained weights);
- ``before_task(task)``           e.g. estimate a gradient, design and add adapters;
- ``trainable_parameters()``      what the optimiser updates (empty = no training);
- ``loss(images, labels, task)``  the training objective (default: CE over CLIP logits);
- ``losses(images, labels, task)`` the objectives of one batch, one optimiser step after each (default: one,
                                  ``loss``; LoDA's GAO yields two, its code after a yield runs after that step);
- ``after_step(task, step)``      e.g. weight ensembling;
- ``after_task(task)``            e.g. merge the adapters, update a stored subspace;
- ``eval_image_features(images, dataset)`` / ``eval_text_features(prompts, dataset)``
                                  the features evaluation scores (default: the model's encoders); methods whose
                                  encoder depends on the input (MoE-Adapters' and DIKI's routing) override them;
- ``logits(...)``                 evaluation logits within one dataset (default: scaled cosine similarity);
- ``logits_union(...)``           evaluation logits over every dataset's classes (``--eval union``, X-TAIL);
                                  a method overriding ``logits`` must override this too and document its
                                  routing rule;
- ``state_dict()``/``load_state_dict()`` tensors + JSON for resume (no pickles);
- ``check_state(state, extra, tasks)`` refuses restored state that does not fit the model (before it is loaded;
                                  default: the keys, shapes and dtypes of the method's own state after ``setup``);
- ``state_bytes()``               what it holds between tasks, for the cost profile.

A method writes no results and no files (the harness stores its ``state_dict`` and rows). It may read the
inputs its own hyperparameters name, and only those: ZSCL reads its reference images and captions
(``zscl.ref_images``, ``zscl.ref_captions``) in ``setup``. Its costly steps go in ``self.profiler.section(name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from clbench.datasets.base import ClassSpan, Task
from clbench.methods.contract import MethodContract
from clbench.methods.state_checks import check_like_fresh
from clbench.models.clip import ClipModel


@dataclass
class NoHparams:
    """For methods without hyperparameters."""


@dataclass
class TaskContext:
    """What a method may know about the current task."""

    index: int
    task: Task
    num_tasks: int
    device: torch.device
    make_loader: Callable[..., DataLoader]
    train_steps: int
    prompts: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def name(self) -> str:
        return self.task.name

    def loader(self, batch_size: int | None = None, shuffle: bool = True, drop_last: bool = False) -> DataLoader:
        """A fresh loader over this task's training split (the harness's batch size by default)."""
        return self.make_loader(self.task.train, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)

    def batches(self, fraction: float = 1.0, drop_last: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches moved to the device; ``fraction`` < 1 keeps only the first share of them."""
        loader = self.loader(shuffle=True, drop_last=drop_last)
        total = len(loader)
        keep = max(1, round(total * fraction)) if total else 0
        for i, (images, labels) in enumerate(loader):
            if i >= keep:
                break
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class Method(MethodContract):
    """Base of the CLIP setting's methods (the shared :class:`~clbench.methods.contract.MethodContract` plus the
    CLIP hooks): zero-shot behaviour (no training) with the default loss and logits."""

    Hparams: ClassVar[type] = NoHparams
    # True for methods whose trained modules stay beside the frozen CLIP at inference instead of being merged into
    # its weights (MoE-Adapters' experts and routers, DIKI's prompts); every other method evaluates a plain CLIP.
    keeps_modules: ClassVar[bool] = False
    # Name of the benchmark being run ("synthetic", "mtil", ...); the runner and the harness set it before
    # validate()/setup(), for methods whose inputs depend on it (ZSCL's reference data).
    benchmark: str = "synthetic"

    model: ClipModel

    # ---- lifecycle (setup, before_task, trainable_parameters, after_task: the shared contract's) -------------
    def train_modules(self) -> None:
        """Put modules into train mode for the training steps (CLIP has no dropout; kept explicit)."""
        self.model.train()

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        """Cross-entropy over the current task's classes on CLIP logits, text features with grad."""
        text = self.model.encode_text(self.model.tokenize(task.prompts))
        image = self.model.encode_image(images)
        return F.cross_entropy(self.train_logits(image, text, task), labels)

    def losses(self, images: Tensor, labels: Tensor, task: TaskContext) -> Iterator[Tensor]:
        """The objectives of one batch; the harness takes one optimiser step after each before resuming."""
        yield self.loss(images, labels, task)

    def train_logits(self, image_features: Tensor, text_features: Tensor, task: TaskContext) -> Tensor:
        return self.model.logit_scale() * image_features @ text_features.T

    def after_step(self, task: TaskContext, step: int) -> None:
        """After every batch's optimiser step(s)."""

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_image_features(self, images: Tensor, dataset: str | None) -> Tensor:
        """Image features that evaluation scores; ``dataset`` names the test set under ``--eval task`` (the task
        identity is known) and is ``None`` under ``--eval union``. Default: the model's image encoder."""
        return self.model.encode_image(images)

    def eval_text_features(self, prompts: list[list[str]], dataset: str) -> Tensor:
        """Class text features of ``dataset`` that evaluation scores (one list of prompts per class, averaged);
        classes lie along the second-to-last axis, so a method may return several variants stacked in front.
        Default: the model's text encoder."""
        return self.model.class_text_features(prompts)

    def logits(self, image_features: Tensor, text_features: Tensor, dataset: str, trained: bool) -> Tensor:
        """Evaluation logits for ``dataset``; ``trained`` says whether it was trained on already."""
        return self.model.logit_scale() * image_features @ text_features.T

    def logits_union(self, image_features: Tensor, text_features: Tensor, spans: list[ClassSpan],
                     trained: int) -> Tensor:
        """Evaluation logits over the union label space (all datasets' classes, in sequence order).

        ``text_features`` has one row per class of every dataset, encoded by the current model; ``spans`` say
        which columns belong to which dataset; the first ``trained`` datasets have been trained on. Default:
        the scaled cosine similarity to every class (X-TAIL's rule for methods that adapt the encoders).
        """
        return self.model.logit_scale() * image_features @ text_features.T

    # ---- state ----------------------------------------------------------------------------------
    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """Refuse restored state (``state_dict()`` tensors and ``extra_state()`` JSON, saved after ``tasks``) that
        does not fit this method on this model, with a :class:`~clbench.methods.state_checks.StateMismatch`
        naming the entry. Called after :meth:`setup` and before :meth:`load_state_dict`.

        Default, for state of fixed shapes: exactly the tensor names, shapes and dtypes of the method's own state
        now (finite where floating), and JSON shaped like its own ``extra_state()``. A method whose state grows
        over tasks (bases, memories, per-task heads) overrides this with its own rules."""
        check_like_fresh(state, extra, self.state_dict(), self.extra_state())
