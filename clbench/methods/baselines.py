"""Reference points: zero-shot CLIP and continual full fine-tuning."""

from __future__ import annotations

from torch import nn

from clbench.methods.base import Method
from clbench.methods.registry import register_method


@register_method("zeroshot")
class ZeroShot(Method):
    """Pretrained CLIP, never trained: every row of its matrix is the zero-shot row."""

    summary = "pretrained CLIP, no training (the zero-shot reference)"


@register_method("finetune")
class FineTune(Method):
    """Sequential full fine-tuning of both encoders (ZSCL's 'Continual FT' baseline)."""

    summary = "full fine-tuning of both encoders, task after task"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters()
