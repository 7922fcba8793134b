"""A thin wrapper around an open_clip ``CLIP`` whose attention is LoRA-capable.

Every method works on :class:`ClipModel`: it encodes images and prompts, exposes the attention sites
(one :class:`~clbench.models.attention.LoRAAttention` per block of each encoder) where low-rank deltas go
and where projection inputs are observed, and keeps the logit scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clbench.datasets.base import ImageSpec
from clbench.models.attention import LoRAAttention, replace_attention

ENCODERS = ("vision", "text")


@dataclass
class AttentionSite:
    """One block's attention: where adapters are added and inputs observed."""

    encoder: str
    layer: int
    num_layers: int
    module: LoRAAttention

    @property
    def name(self) -> str:
        return f"{self.encoder}.{self.layer}"

    @property
    def width(self) -> int:
        return self.module.embed_dim


class ClipModel(nn.Module):
    """open_clip CLIP with :class:`LoRAAttention` in every residual block of both encoders."""

    def __init__(self, clip: nn.Module, tokenizer: Callable, image_spec: ImageSpec, backbone: str) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.backbone = backbone
        self._blocks = {"vision": clip.visual.transformer.resblocks, "text": clip.transformer.resblocks}
        for blocks in self._blocks.values():
            for block in blocks:
                if not isinstance(block.attn, LoRAAttention) and replace_attention(block) != 1:
                    raise ValueError(f"backbone {backbone!r}: a block without a packed self-attention")

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def attention_sites(self, encoders: Sequence[str] = ENCODERS) -> list[AttentionSite]:
        sites = []
        for encoder in encoders:
            blocks = self._blocks[encoder]
            sites += [AttentionSite(encoder, i, len(blocks), b.attn) for i, b in enumerate(blocks)]
        return sites

    def encoder_parameters(self) -> list[nn.Parameter]:
        """All weights of both encoders (everything but the logit scale)."""
        return [p for name, p in self.clip.named_parameters() if name != "logit_scale"]

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings."""
        return nn.functional.normalize(self.clip.encode_image(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """L2-normalised text embeddings of tokenised prompts."""
        return nn.functional.normalize(self.clip.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def class_text_features(self, prompt_sets: Sequence[Sequence[str]], batch_size: int = 256) -> Tensor:
        """Class embeddings ``[C, D]``: each class's prompts encoded, averaged, re-normalised.

        ``prompt_sets[c]`` holds the prompts of class ``c`` (one prompt = the single-template policy;
        several = ZSCL's template ensemble).
        """
        flat = [p for prompts in prompt_sets for p in prompts]
        feats = torch.cat([self.encode_text(self.tokenize(flat[i : i + batch_size]))
                           for i in range(0, len(flat), batch_size)])
        out, start = [], 0
        for prompts in prompt_sets:
            mean = feats[start : start + len(prompts)].mean(0)
            out.append(nn.functional.normalize(mean, dim=-1))
            start += len(prompts)
        return torch.stack(out)

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp().clamp(max=100)
