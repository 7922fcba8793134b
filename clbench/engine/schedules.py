"""Learning-rate schedules of the shared training loop, one per ``train.schedule`` value.

- ``onecycle``: PyTorch's OneCycleLR (KeepLoRA, LoRA): each parameter group peaks at its own ``lr``.
- ``constant``: no scheduler; every group keeps its ``lr``.
- ``cosine``: ZSCL's rule (Thunderbeee/ZSCL ``mtil/src/models/utils.py``, ``cosine_lr``). Before optimiser
  step ``s`` (0-based) a group with base rate ``lr`` uses ``lr·(s+1)/W`` while ``s < W`` (linear warm-up over
  ``W = train.warmup_steps`` steps), then ``0.5·(1 + cos(π·(s−W)/(T−W)))·lr`` with ``T`` = the task's steps.
  The rate reaches 0 at ``s = T``: ZSCL runs ``T + 1`` iterations and its last one has rate 0 (a no-op for
  AdamW), so the ``T`` steps here follow the same parameter trajectory. When ``W >= T`` the warm-up is cut
  short, as in ZSCL's formula (the rate never reaches its peak).

- ``coda_cosine``: the ``CosineSchedule`` of CODA-Prompt that InfLoRA's code uses with Adam
  (``utils/schedulers.py``): ``lr·cos(99π·e/(200·(K−1)))`` at epoch ``e`` of ``K``, a quarter cosine from ``lr``
  down to ``lr·cos(0.495π) ≈ 0.016·lr`` at the last epoch. Here it is applied per step (``e → s``, ``K → T``)
  like the other schedules [adapted]; one step (``T = 1``) keeps ``lr``.

Every group is scheduled from its own ``lr``, so per-dataset rates (ZSCL's ``lr_overrides``) are that group's peak.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from clbench.config import TrainConfig


def warmup_cosine_lr(base_lr: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """ZSCL's learning rate before optimiser step ``step`` (0-based) of ``total_steps``; 0 from ``total_steps`` on."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    elapsed, span = step - warmup_steps, total_steps - warmup_steps
    return 0.5 * (1 + math.cos(math.pi * elapsed / span)) * base_lr


def coda_cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """CODA-Prompt's quarter cosine before optimiser step ``step`` of ``total_steps`` (InfLoRA with Adam)."""
    if total_steps <= 1:
        return base_lr
    return base_lr * math.cos(99 * math.pi * step / (200 * (total_steps - 1)))


class WarmupCosine(LRScheduler):
    """Linear warm-up then cosine decay to 0 (:func:`warmup_cosine_lr`), per parameter group, stepped per batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [warmup_cosine_lr(base, self.last_epoch, self.warmup_steps, self.total_steps) for base in self.base_lrs]


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> LRScheduler | None:
    """The scheduler of ``train.schedule`` over ``total_steps`` optimiser steps (``None`` for a constant rate).

    Each parameter group's current ``lr`` is its peak (a group's own rate, e.g. ZSCL's per-dataset ones, or
    ``train.lr``). Call ``step()`` once after every optimiser step.
    """
    if train.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps)
    if train.schedule == "cosine":
        return WarmupCosine(optimizer, train.warmup_steps, total_steps)
    if train.schedule == "coda_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: coda_cosine_lr(1.0, step, total_steps))
    if train.schedule == "constant":
        return None
    raise ValueError(f"unknown schedule {train.schedule!r}")
