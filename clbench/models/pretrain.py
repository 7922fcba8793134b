"""Offline pretraining of the embedded ``tiny`` backbone with the CLIP contrastive loss.

The corpus is procedurally drawn coloured shapes with captions ("a photo of a red circle."); a few
colour-shape combinations are held out so that the benchmark can test compositional zero-shot transfer.
The weights are cached (safetensors) under the user's cache directory, keyed by a hash of the model and
pretraining configs, and are a deterministic function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.datasets.render import BACKGROUNDS, COLOURS, SHAPES, draw_objects
from clbench.datasets.synthetic import HELD_OUT_COMBOS

COLOUR_NAMES = tuple(COLOURS)
BOTH_TEMPLATES = ("a photo of a {c} {s}.", "a {c} {s}.", "a drawing of a {c} {s}.", "a {s} that is {c}.")
SHAPE_TEMPLATES = ("a photo of a {s}.", "a drawing of a {s}.")
COLOUR_TEMPLATES = ("a photo of a {c} shape.", "something {c}.")


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0


def cache_dir() -> Path:
    """``$CLBENCH_CACHE``, else ``$XDG_CACHE_HOME/clbench``, else ``~/.cache/clbench``."""
    if os.environ.get("CLBENCH_CACHE"):
        return Path(os.environ["CLBENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clbench"


def config_key(model_cfg: dict, cfg: PretrainConfig) -> str:
    blob = json.dumps({"model": model_cfg, "pretrain": asdict(cfg), "corpus": 1, "seeded_init": True}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_corpus(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, list[str]]:
    """``n`` captioned images; held-out colour-shape combinations never appear."""
    held = {(SHAPES.index(s), COLOUR_NAMES.index(c)) for s, c in HELD_OUT_COMBOS}
    shapes = torch.randint(len(SHAPES), (n,), generator=gen)
    colours = torch.randint(len(COLOURS), (n,), generator=gen)
    for i in range(n):
        while (int(shapes[i]), int(colours[i])) in held:
            colours[i] = torch.randint(len(COLOURS), (1,), generator=gen)
    kinds = torch.randint(len(BACKGROUNDS), (n,), generator=gen)
    images = torch.empty(n, 3, size, size)
    for k, bg in enumerate(BACKGROUNDS):
        idx = (kinds == k).nonzero().flatten()
        if len(idx):
            images[idx] = draw_objects(shapes[idx], colours[idx], bg, size, gen)
    style = torch.rand(n, generator=gen)
    pick = torch.randint(1_000_000, (n,), generator=gen)
    captions = []
    for i in range(n):
        s, c = SHAPES[int(shapes[i])], COLOUR_NAMES[int(colours[i])]
        pool = BOTH_TEMPLATES if style[i] < 0.6 else SHAPE_TEMPLATES if style[i] < 0.8 else COLOUR_TEMPLATES
        captions.append(pool[int(pick[i]) % len(pool)].format(s=s, c=c))
    return images, captions


def pretrain(
    clip: torch.nn.Module,
    tokenizer: Callable,
    normalise: Callable[[Tensor], Tensor],
    cfg: PretrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Tensor]:
    """Train ``clip`` in place with the symmetric contrastive loss; returns its state dict."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.steps * 3.14159)))
    )
    clip.train()
    for step in range(cfg.steps):
        images, captions = sample_corpus(cfg.batch_size, size, gen)
        img = F.normalize(clip.encode_image(normalise(images)), dim=-1)
        txt = F.normalize(clip.encode_text(tokenizer(captions)), dim=-1)
        logits = clip.logit_scale.exp() * img @ txt.T
        # identical captions in a batch are positives of each other
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, 4.6052)
        if on_step is not None:
            on_step(step, float(loss.detach()))
    clip.eval()
    return {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
