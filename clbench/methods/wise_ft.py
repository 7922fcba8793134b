"""WiSE-FT on MTIL, as ZSCL's official code runs it (weight-space ensembles: Wortsman et al., CVPR 2022; the
continual baseline: Zheng et al., ICCV 2023, Thunderbeee/ZSCL ``mtil/scripts/WiSE_finetune.sh``).

The script is continual fine-tuning (``--method finetune --ls 0.2 --iterations 1000``, no distillation, no
weight constraint) with ``--wise_merge --wise_ft_model n --wise_ft_alpha 0.8``. After training each task,
``src/models/finetune.py`` interpolates every weight between the fine-tuned model θ and ``model_fix``, the model
the task started from (``--load ckpt/<previous task>.pth``; the pretrained CLIP for the first task)::

    θ ← α·θ + (1 − α)·θ_start,   α = 0.8 on the fine-tuned side

and saves the interpolated model, which is evaluated and which the next task starts from [code]. Here
:meth:`WiSEFT.before_task` keeps θ_start and :meth:`WiSEFT.after_task` interpolates the trained weights (the
logit scale, untrained, is equal on both sides; leaving it out avoids rounding it).

``anchor`` chooses θ_start's side of the interpolation: ``previous`` (default; the code's ``--wise_ft_model n``
that produced ZSCL's published WiSE-FT row) or ``zeroshot`` (``--wise_ft_model zeroshot``: the pretrained
weights, the WiSE-FT paper's own anchor, in which the fine-tuned model is ensembled with the zero-shot one). The
WiSE-FT paper defines the ensemble for one fine-tuning run only; on a task sequence the code's per-task
interpolation with the previous model is the only definition behind the MTIL numbers, hence the default.

Per-dataset learning rates: the script trains Aircraft and MNIST at 5e-5 and the others at 1e-5
(``lr_overrides``, ``--preset paper``); the schedule and budget are ZSCL's.

State and resume: none beyond the weights. θ_start with ``anchor=previous`` is the model restored after the
previous task, copied again by ``before_task`` on resume; with ``anchor=zeroshot`` the pretrained weights are
copied by :meth:`WiSEFT.setup`, which the runner calls on the pretrained model before restoring a checkpoint.
``state_bytes``: the anchor copy. Cost centre: ``merge`` (the interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clbench.methods.base import TaskContext
from clbench.methods.baselines import FineTune
from clbench.methods.recipes import RecipeCard, code
from clbench.methods.registry import register_method
from clbench.methods.zscl import ZSCL_TRAINING, parse_lr_overrides
from clbench.models.clip import ClipModel

ANCHORS = ("previous", "zeroshot")


@dataclass
class WiSEFTHparams:
    alpha: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0})
    anchor: str = field(default="previous", metadata={"choices": ANCHORS})
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    lr_overrides: str = ""


def interpolate(params: list[Tensor], anchor: list[Tensor], alpha: float) -> None:
    """In place ``θ ← α·θ + (1 − α)·θ_anchor`` (``α`` weighs the fine-tuned weights ``params``)."""
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            p.copy_(p * alpha + a * (1 - alpha))


@register_method("wise-ft")
class WiSEFT(FineTune):
    """WiSE-FT: continual fine-tuning, each task's weights interpolated with the task's starting weights."""

    summary = "full fine-tuning, then weights interpolated 0.8/0.2 with the task's starting model (ZSCL's WiSE-FT)"
    Hparams = WiSEFTHparams

    def __init__(self, model: ClipModel, hparams: WiSEFTHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.zeroshot: list[Tensor] = []
        self.anchor: list[Tensor] = []
        self.task_name = ""

    def validate(self) -> None:
        parse_lr_overrides(self.hparams.lr_overrides, self.name)

    def setup(self) -> None:
        """With ``anchor=zeroshot``, keep the pretrained weights (setup runs on them, also before a resume)."""
        self.validate()
        if self.hparams.anchor == "zeroshot":
            self.zeroshot = [p.detach().clone() for p in self.model.encoder_parameters()]

    def before_task(self, task: TaskContext) -> None:
        """θ_start: the weights the task starts from (or the pretrained ones)."""
        self.task_name = task.name
        if self.hparams.anchor == "zeroshot":
            if not self.zeroshot:
                raise RuntimeError("wise-ft: setup() must run before the first task (it keeps the pretrained weights)")
            self.anchor = self.zeroshot
        else:
            self.anchor = [p.detach().clone() for p in self.model.encoder_parameters()]

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        lr = parse_lr_overrides(self.hparams.lr_overrides, self.name).get(self.task_name)
        params = self.model.encoder_parameters()
        return [{"params": params, "lr": lr}] if lr is not None else params

    def after_task(self, task: TaskContext) -> None:
        """``θ ← α·θ + (1 − α)·θ_start``: evaluated, and the next task's start."""
        if not self.anchor:
            raise RuntimeError("wise-ft: before_task() must run before after_task() (it keeps the anchor)")
        with self.profiler.section("merge"):
            interpolate(self.model.encoder_parameters(), self.anchor, self.hparams.alpha)

    def state_bytes(self) -> dict[str, int]:
        return {"anchor": sum(t.numel() * t.element_size() for t in self.anchor)} if self.anchor else {}


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
RECIPES = {
    "wise-ft": RecipeCard(
        "WiSE-FT (Wortsman et al., CVPR 2022) as ZSCL's MTIL baseline (Zheng et al., ICCV 2023), official code "
        "Thunderbeee/ZSCL mtil/scripts/WiSE_finetune.sh (--wise_merge, src/models/finetune.py)",
        {"train.lr": code("WiSE_finetune.sh: 1e-5, with the two exceptions in lr_overrides"),
         **ZSCL_TRAINING,
         "alpha": code("--wise_ft_alpha, the weight of the fine-tuned model"),
         "anchor": code("--wise_ft_model n: the model loaded at the start of the task"),
         "label_smoothing": code("--ls"),
         "lr_overrides": code("Aircraft and MNIST at 5e-5 in the script's lr list")}),
}
