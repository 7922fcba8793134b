"""Reference points: zero-shot CLIP and continual full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, code
from clbench.methods.registry import register_method
from clbench.methods.zscl import ZSCL_TRAINING


@register_method("zeroshot")
class ZeroShot(Method):
    """Pretrained CLIP, never trained: every row of its matrix is the zero-shot row."""

    summary = "pretrained CLIP, no training (the zero-shot reference)"


@dataclass
class FineTuneHparams:
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})


@register_method("finetune")
class FineTune(Method):
    """Sequential full fine-tuning of both encoders (ZSCL's 'Continual FT' baseline: CE with label smoothing 0.2
    on CLIP's logits over the current task's classes, ZSCL's ``finetune.sh``)."""

    summary = "full fine-tuning of both encoders, task after task"
    Hparams = FineTuneHparams

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters()

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        text = self.model.encode_text(self.model.tokenize(task.prompts))
        logits = self.train_logits(self.model.encode_image(images), text, task)
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json) -------------------------
RECIPES = {
    "zeroshot": RecipeCard("pretrained CLIP (Radford et al., 2021), ZSCL's MTIL zero-shot row", {}, trains=False),
    "finetune": RecipeCard(
        "ZSCL's continual full fine-tuning baseline (Zheng et al., ICCV 2023), Thunderbeee/ZSCL mtil/scripts/"
        "finetune.sh",
        {"train.lr": code("finetune.sh, the same for every dataset"),
         **ZSCL_TRAINING,
         "label_smoothing": code("finetune.sh --ls")}),
}
