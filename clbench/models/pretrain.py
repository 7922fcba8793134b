"""Offline pretraining of the embedded ``tiny`` backbone with the CLIP contrastive loss.

The corpus (:func:`sample_corpus`) is the tiny model's "web": captioned scenes of one coloured shape (anywhere,
or in a named region: "a red square in the top left."), of two to six identical shapes ("three blue circles."),
on neutral or coloured backgrounds ("... on a green background."), and pixel-font digits ("the number seven.").
Captions mention a random subset of what the image shows, as web captions do. Ten colour-shape combinations
(:data:`clbench.datasets.synthetic.HELD_OUT_COMBOS`), textures and striped backgrounds never occur, so the
benchmark's domains are known to different degrees (see :mod:`clbench.datasets.synthetic`).
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

from clbench.datasets.render import (
    COLOURS,
    REGION_CENTRES,
    SHAPES,
    background,
    digit_masks,
    jittered_colours,
    paint,
    place_objects,
)
from clbench.datasets.synthetic import DIGIT_WORDS, HELD_OUT_COMBOS, NUMBER_WORDS, POSITIONS

COLOUR_NAMES = tuple(COLOURS)
PLURALS = {"cross": "crosses"}
NEUTRAL_BACKGROUNDS = ("plain", "noise", "gradient")  # stripes never occur in pretraining (the Shapes domain's look)

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
    blob = json.dumps({"model": model_cfg, "pretrain": asdict(cfg), "corpus": 2, "seeded_init": True}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _object_caption(shape: str, colour: str, count: int, region: str | None, backdrop: str | None,
                    r: list[float]) -> str:
    """One caption of an object scene; ``r`` are four uniform draws choosing what the caption mentions."""
    if count == 1:
        phrase = ("a {c} {s}", "a {s}", "a {c} shape")[0 if r[0] < 0.6 else 1 if r[0] < 0.8 else 2]
    else:
        phrase = ("{n} {c} {ss}", "{n} {ss}", "{n} {c} shapes")[0 if r[0] < 0.6 else 1 if r[0] < 0.8 else 2]
    text = phrase.format(c=colour, s=shape, ss=_plural(shape), n=NUMBER_WORDS[count - 1])
    if r[1] < 0.5:
        text = "a photo of " + text
    if region is not None and r[2] < 0.8:
        text += f" in the {region}"
    elif backdrop is not None and r[3] < 0.8:
        text += f" on a {backdrop} background"
    return text + "."


def sample_corpus(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, list[str]]:
    """``n`` captioned images of the pretraining world (see the module docstring); held-out colour-shape
    combinations never appear, nor do patterns or striped backgrounds."""
    held = {(SHAPES.index(s), COLOUR_NAMES.index(c)) for s, c in HELD_OUT_COMBOS}
    kind = torch.rand(n, generator=gen)
    shapes = torch.randint(len(SHAPES), (n,), generator=gen)
    colours = torch.randint(len(COLOURS), (n,), generator=gen)
    for i in range(n):
        while (int(shapes[i]), int(colours[i])) in held:
            colours[i] = torch.randint(len(COLOURS), (1,), generator=gen)
    many = torch.rand(n, generator=gen) < 0.4
    counts = torch.where(many, torch.randint(2, len(NUMBER_WORDS) + 1, (n,), generator=gen), 1)
    placed = ~many & (torch.rand(n, generator=gen) < 0.5)
    regions = torch.randint(len(POSITIONS), (n,), generator=gen)
    backdrops = (colours + torch.randint(1, len(COLOURS), (n,), generator=gen)) % len(COLOURS)
    coloured_bg = torch.rand(n, generator=gen) < 0.35
    bg_kinds = torch.randint(len(NEUTRAL_BACKGROUNDS), (n,), generator=gen)
    draws = torch.rand(n, 4, generator=gen).tolist()

    canvas = torch.empty(n, 3, size, size)
    for k, bg in enumerate(NEUTRAL_BACKGROUNDS):
        idx = (bg_kinds == k).nonzero().flatten()
        canvas[idx] = background(bg, len(idx), size, gen)
    tint = jittered_colours(backdrops, gen)[:, :, None, None] * 0.7
    canvas = torch.where(coloured_bg[:, None, None, None], tint.expand_as(canvas), canvas)

    images = canvas.clone()
    digit = kind < 0.12
    scenes = {"single": ~digit & ~many & ~placed, "placed": ~digit & placed, "many": ~digit & many}
    ink = jittered_colours(colours, gen)
    for name, sel in scenes.items():
        idx = sel.nonzero().flatten()
        if not len(idx):
            continue
        m = len(idx)
        if name == "single":
            centres = 0.25 * (torch.rand(m, 2, generator=gen) * 2 - 1)
            scale = 0.35 + 0.25 * torch.rand(m, generator=gen)
        elif name == "placed":
            centres = torch.tensor(REGION_CENTRES)[regions[idx]] + 0.12 * (torch.rand(m, 2, generator=gen) * 2 - 1)
            scale = 0.25 + 0.1 * torch.rand(m, generator=gen)
        else:
            centres, scale = None, 0.16 + 0.06 * torch.rand(m, generator=gen)
        mask = place_objects(shapes[idx], counts[idx], centres, scale, size, gen)
        images[idx] = paint(canvas[idx], mask, ink[idx])
    digits = torch.randint(10, (n,), generator=gen)
    idx = digit.nonzero().flatten()
    if len(idx):
        mask = digit_masks(digits[idx], size, gen)
        images[idx] = paint(background("plain", len(idx), size, gen), mask, ink[idx])
    captions = []
    for i in range(n):
        if digit[i]:
            word = DIGIT_WORDS[int(digits[i])]
            captions.append(f"the number {word}." if draws[i][0] < 0.5 else f"a photo of the number {word}.")
            continue
        region = POSITIONS[int(regions[i])] if placed[i] else None
        backdrop = COLOUR_NAMES[int(backdrops[i])] if coloured_bg[i] else None
        captions.append(_object_caption(SHAPES[int(shapes[i])], COLOUR_NAMES[int(colours[i])], int(counts[i]),
                                        region, backdrop, draws[i]))
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
