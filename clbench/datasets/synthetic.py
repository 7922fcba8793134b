"""The embedded benchmark ``synthetic``: eight small visual domains, drawn procedurally, that behave like MTIL.

MTIL measures three things: CLIP already knows most of its datasets in part (zero-shot), each dataset is learnable
to high accuracy, and fine-tuning on one narrow dataset with its own prompts erodes the shared image-text alignment
the others rely on (zero-shot Transfer falls, earlier tasks are forgotten). The embedded world is built to show the
same: the tiny backbone is pretrained (:mod:`clbench.models.pretrain`) on captioned scenes of one to six coloured
shapes, placed in a named region or on a coloured backdrop, plus pixel-font digits. Each domain asks about one
attribute of such scenes, in its own look (background kind, scale, style) and with its own prompt wording, so the
pretraining knows it partly, not perfectly:

=============  =======  ===================================================  ===================================
domain         classes  what the pretraining knows of it                     why it is there
=============  =======  ===================================================  ===================================
Shapes         8        shape words, on plain/noise/gradient; never stripes  known concept, shifted look
Colours        8        colour words on every kind of scene                  the best-known domain
Digits         10       upright digits on plain backgrounds; here slightly   partly known, like MNIST for CLIP
                        slanted, larger, coloured ink on noise
Compositions   10       colours and shapes, never these ten combinations     compositional zero-shot transfer
Patterns       8        nothing (no textures, no stripes)                    learnable only by training
Counts         6        "three red circles"; here "three dots"               shared number words with Digits
Positions      5        "a red square in the top left"                       shared layout words, small classes
Backdrops      8        "on a blue background"; here plain grey shapes       colour words with a second meaning
=============  =======  ===================================================  ===================================

Words are shared across domains on purpose, as on MTIL: colour words name the object in Colours and the
background in Backdrops, number words are digits in Digits and counts in Counts, so fine-tuning one domain's
prompts moves what the others' prompts mean. Chance is at most 20 % everywhere.

All images (train and test) are a pure function of the data seed (``data.seed``), never of the training seed, so
a run's test set is the same for every ``--seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from clbench.datasets.base import Benchmark, ImageSpec, Task
from clbench.datasets.render import (
    COLOURS,
    REGION_CENTRES,
    SHAPES,
    _grid,
    background,
    digit_masks,
    jittered_colours,
    paint,
    place_objects,
    shape_mask,
)

COLOUR_NAMES = tuple(COLOURS)
# Colour-shape combinations never shown in pretraining: the "Compositions" task tests zero-shot
# compositional transfer on them.
HELD_OUT_COMBOS = tuple(
    (SHAPES[s], COLOUR_NAMES[c]) for s, c in [(0, 1), (1, 3), (2, 5), (3, 7), (4, 0), (5, 2), (6, 4), (7, 6),
                                             (0, 6), (2, 0)]
)
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "grid",
            "waves", "rings")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "middle")

Generator = Callable[[Tensor, int, torch.Generator], Tensor]  # (labels, size, gen) -> images [N,3,S,S]


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _centre_jitter(n: int, amount: float, gen: torch.Generator) -> Tensor:
    return amount * (torch.rand(n, 2, generator=gen) * 2 - 1)


def _single(shapes: Tensor, colours: Tensor, canvas: Tensor, gen: torch.Generator, jitter: float = 0.25,
            scale: tuple[float, float] = (0.35, 0.6)) -> Tensor:
    n, size = len(shapes), canvas.shape[-1]
    mask = place_objects(shapes, torch.ones(n, dtype=torch.long), _centre_jitter(n, jitter, gen),
                         _uniform(n, *scale, gen), size, gen)
    return paint(canvas, mask, jittered_colours(colours, gen))


def _shapes(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    colours = torch.randint(len(COLOURS), (len(labels),), generator=gen)
    return _single(labels, colours, background("stripes", len(labels), size, gen), gen, scale=(0.5, 0.7), jitter=0.15)


def _colours(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    shapes = torch.randint(len(SHAPES), (len(labels),), generator=gen)
    return _single(shapes, labels, background("gradient", len(labels), size, gen), gen)


def _compositions(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    shape_ids = torch.tensor([SHAPES.index(HELD_OUT_COMBOS[i][0]) for i in labels])
    colour_ids = torch.tensor([COLOUR_NAMES.index(HELD_OUT_COMBOS[i][1]) for i in labels])
    return _single(shape_ids, colour_ids, background("noise", len(labels), size, gen), gen)


def _digits(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    n = len(labels)
    mask = digit_masks(labels, size, gen, height=(0.7, 0.85), slant=0.15, jitter=0.1)
    ink = jittered_colours(torch.randint(len(COLOURS), (n,), generator=gen), gen, amount=0.1)
    return paint(background("noise", n, size, gen) * 0.5, mask.clamp(0, 1), ink)


def _counts(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    n = len(labels)
    canvas = (background("plain", n, size, gen) + 0.25).clamp(0, 1)
    circles = torch.zeros(n, dtype=torch.long)
    mask = place_objects(circles, labels + 1, None, _uniform(n, 0.2, 0.24, gen), size, gen)
    return paint(canvas, mask, jittered_colours(torch.randint(len(COLOURS), (n,), generator=gen), gen))


def _patterns(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    n = len(labels)
    yy, xx = _grid(size)
    freq = (3 + 2 * torch.rand(n, 1, 1, generator=gen)) * math.pi
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    x, y = xx[None], yy[None]
    r = torch.sqrt(x**2 + y**2)
    fields = [
        torch.sin(freq * y + phase),
        torch.sin(freq * x + phase),
        torch.sin(freq * (x + y) / 1.4 + phase),
        torch.sin(freq * x + phase) * torch.sin(freq * y + phase),
        torch.cos(freq * x + phase) * torch.cos(freq * y + phase) - 0.6,
        torch.maximum(torch.sin(freq * x + phase), torch.sin(freq * y + phase)) - 0.8,
        torch.sin(freq * y + 2 * torch.sin(freq * x / 2) + phase),
        torch.sin(freq * r + phase),
    ]
    stacked = torch.stack(fields, 1)[torch.arange(n), labels]
    mask = (stacked > 0).float()
    colours = torch.randint(len(COLOURS), (n,), generator=gen)
    canvas = background("plain", n, size, gen)
    return paint(canvas, mask, jittered_colours(colours, gen))


def _positions(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    n = len(labels)
    centres = torch.tensor(REGION_CENTRES)[labels] + _centre_jitter(n, 0.12, gen)
    shapes = torch.randint(len(SHAPES), (n,), generator=gen)
    mask = place_objects(shapes, torch.ones(n, dtype=torch.long), centres, _uniform(n, 0.25, 0.35, gen), size, gen)
    colours = torch.randint(len(COLOURS), (n,), generator=gen)
    return paint(background("gradient", n, size, gen), mask, jittered_colours(colours, gen))


def _backdrops(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    n = len(labels)
    canvas = jittered_colours(labels, gen)[:, :, None, None].expand(n, 3, size, size) * 0.8
    shapes = torch.randint(len(SHAPES), (n,), generator=gen)
    mask = shape_mask(shapes, torch.zeros(n), torch.zeros(n), torch.full((n,), 0.35), size)
    grey = torch.full((n, 3), 0.5) + 0.1 * torch.randn(n, 1, generator=gen)
    return paint(canvas.clone(), mask, grey.clamp(0, 1))


# name -> (classnames, templates, generator)
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Generator]] = {
    "Shapes": (SHAPES, ("a photo of a {}.", "a drawing of a {}."), _shapes),
    "Colours": (COLOUR_NAMES, ("a photo of a {} shape.", "something {}."), _colours),
    "Digits": (DIGIT_WORDS, ("a photo of the number {}.",), _digits),
    "Compositions": (tuple(f"{c} {s}" for s, c in HELD_OUT_COMBOS), ("a photo of a {}.",), _compositions),
    "Patterns": (PATTERNS, ("a {} pattern.",), _patterns),
    "Counts": (NUMBER_WORDS, ("a photo of {} dots.",), _counts),
    "Positions": (POSITIONS, ("a shape in the {}.",), _positions),
    "Backdrops": (COLOUR_NAMES, ("a photo with a {} background.",), _backdrops),
}
ORDERS = {
    1: ["Shapes", "Digits", "Colours", "Patterns", "Compositions", "Counts", "Positions", "Backdrops"],
    2: ["Backdrops", "Counts", "Compositions", "Shapes", "Positions", "Digits", "Patterns", "Colours"],
}


def _normalise(images: Tensor, spec: ImageSpec) -> Tensor:
    if images.shape[-1] != spec.size:
        images = F.interpolate(images, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    return (images - mean) / std


def build_domain(
    name: str, spec: ImageSpec, train_per_class: int, test_per_class: int, seed: int, render_size: int = 32
) -> Task:
    """Draw one domain's train and test split (disjoint seeds) as in-memory tensors."""
    classnames, templates, generate = DOMAINS[name]
    splits = []
    for split_index, per_class in enumerate((train_per_class, test_per_class)):
        gen = torch.Generator().manual_seed(hash_seed(seed, name, split_index))
        labels = torch.arange(len(classnames)).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=gen)]
        images = _normalise(generate(labels, render_size, gen), spec)
        splits.append(TensorDataset(images, labels))
    return Task(name, list(classnames), list(templates), splits[0], splits[1], info={"source": "synthetic"})


def hash_seed(seed: int, name: str, split: int) -> int:
    """A stable per-(seed, domain, split) seed (Python's ``hash`` of str is salted per process)."""
    value = seed * 1_000_003 + split
    for ch in name:
        value = (value * 131 + ord(ch)) % (2**61 - 1)
    return value


def build_synthetic(
    order: int, spec: ImageSpec, train_per_class: int = 64, test_per_class: int = 32, seed: int = 0,
    num_tasks: int | None = None,
) -> Benchmark:
    """The embedded task sequence in order 1 or 2; ``num_tasks`` cuts or cycles it (long-sequence tests)."""
    names = ORDERS[order]
    tasks = []
    count = num_tasks or len(names)
    for i in range(count):
        base = names[i % len(names)]
        task = build_domain(base, spec, train_per_class, test_per_class, seed + 7919 * (i // len(names)))
        if i >= len(names):
            task.name = f"{base}-{i // len(names) + 1}"
        tasks.append(task)
    return Benchmark("synthetic", order, tasks, info={"data": "embedded synthetic sequence"})
