"""A thin wrapper around an open_clip ``CLIP`` whose attention is LoRA-capable.

Every method works on :class:`ClipModel`: it encodes images and prompts, exposes the attention sites
(one :class:`~clbench.models.attention.LoRAAttention` per block of each encoder) where low-rank deltas go
and where projection inputs are observed, and keeps the logit scale.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clbench.datasets.base import ImageSpec
from clbench.models.attention import LoRAAttention, replace_attention

try:  # open_clip's pooling of the text tower's output (argmax / eos), reused by the context cut
    from open_clip.transformer import text_global_pool
except ImportError:  # pragma: no cover - older open_clip: the cut is then never used
    text_global_pool = None

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
        self.weights = "embedded"  # the weight file the model was loaded from (set by load_backbone)
        self._blocks = {"vision": clip.visual.transformer.resblocks, "text": clip.transformer.resblocks}
        for blocks in self._blocks.values():
            for block in blocks:
                if not isinstance(block.attn, LoRAAttention) and replace_attention(block) != 1:
                    raise ValueError(f"backbone {backbone!r}: a block without a packed self-attention")

    def __deepcopy__(self, memo: dict) -> ClipModel:
        """Copy the weights, share the tokenizer: it holds no per-model state, and copying open_clip's BPE
        tables (hundreds of thousands of objects) made every model copy cost about a second."""
        memo[id(self.tokenizer)] = self.tokenizer
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

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
        """L2-normalised text embeddings of tokenised prompts.

        The context is cut after the last end-of-text token of the batch (:meth:`text_context_length`): CLIP's
        text transformer is causal, so the pooled end-of-text output never depends on later (padding)
        positions, and prompts are usually far shorter than the context (e.g. 15 of 77 tokens). Same result
        (up to float rounding of the smaller products), a fraction of the cost, forward and backward.
        """
        length = self.text_context_length(tokens)
        if length is None:
            return nn.functional.normalize(self.clip.encode_text(tokens), dim=-1)
        return nn.functional.normalize(self._encode_text_cut(tokens, length), dim=-1)

    def text_context_length(self, tokens: Tensor) -> int | None:
        """Positions the text tower needs for ``tokens`` (up to the last end-of-text token), or None when the
        full context must run: an observer watches the text attention inputs (feature statistics cover every
        position, padding included; KeepLoRA spec D8), the tower is not open_clip's causal ``CLIP`` text tower
        with argmax/eos pooling, or nothing would be cut."""
        clip = self.clip
        pool = getattr(clip, "text_pool_type", None)
        if text_global_pool is None or pool not in ("argmax", "eos") or tokens.ndim != 2:
            return None
        if any(b.attn._observers for b in self._blocks["text"]) or not self._causal_text_mask():
            return None
        context = clip.positional_embedding.shape[0]
        if tokens.shape[1] != context or tokens.shape[0] == 0:
            return None
        if pool == "argmax":
            last = tokens.argmax(dim=-1)
        else:
            eos = getattr(clip, "text_eos_id", None)
            if eos is None:
                return None
            last = (tokens == eos).int().argmax(dim=-1)
        length = int(last.max()) + 1
        return length if length < context else None

    def _causal_text_mask(self) -> bool:
        """Whether the text tower's attention mask is the causal one (-inf strictly above the diagonal)."""
        cached = getattr(self, "_causal_mask_checked", None)
        mask = getattr(self.clip, "attn_mask", None)
        if cached is not None and cached[0] is mask:
            return cached[1]
        ok = False
        required = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if isinstance(mask, Tensor) and mask.ndim == 2 and all(hasattr(self.clip, a) for a in required):
            above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
            ok = bool(torch.equal(torch.isneginf(mask), above)) and bool((mask[~above] == 0).all())
        self._causal_mask_checked = (mask, ok)
        return ok

    def _encode_text_cut(self, tokens: Tensor, length: int) -> Tensor:
        """open_clip ``CLIP.encode_text`` on the first ``length`` positions (causal mask and positional
        embedding cut to match); unnormalised features."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        tokens = tokens[:, :length]
        x = clip.token_embedding(tokens).to(cast_dtype)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x

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
