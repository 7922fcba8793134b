"""Procedural image rendering for the embedded benchmark and the tiny backbone's pretraining corpus.

Everything is drawn with vectorised tensor operations from a seeded ``torch.Generator``, so a corpus is
a pure function of its seed. Images are ``[N, 3, S, S]`` floats in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = ("plain", "noise", "gradient", "stripes")


def _grid(size: int) -> tuple[Tensor, Tensor]:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def shape_mask(shape_ids: Tensor, cx: Tensor, cy: Tensor, scale: Tensor, size: int) -> Tensor:
    """Soft masks ``[N, S, S]`` of the given shapes (indices into :data:`SHAPES`) at centre/scale."""
    yy, xx = _grid(size)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    s = scale[:, None, None]
    r = torch.sqrt(dx**2 + dy**2)
    theta = torch.atan2(dy, dx)
    masks = torch.stack(
        [
            r < s,
            torch.maximum(dx.abs(), dy.abs()) < s * 0.85,
            (dy < s * 0.6) & (dy > -s + 1.8 * dx.abs()),
            dx.abs() + dy.abs() < s,
            ((dx.abs() < s / 3) & (dy.abs() < s)) | ((dy.abs() < s / 3) & (dx.abs() < s)),
            (r < s) & (r > s * 0.55),
            r < s * (0.55 + 0.45 * torch.cos(5 * theta + math.pi / 2)),
            (dx.abs() < s) & (dy.abs() < s * 0.3),
        ],
        dim=1,
    ).float()
    return masks[torch.arange(len(shape_ids)), shape_ids]


def background(kind: str, n: int, size: int, gen: torch.Generator) -> Tensor:
    """Backgrounds ``[N, 3, S, S]``: each domain of the benchmark has its own look."""
    if kind == "plain":
        base = 0.05 + 0.1 * torch.rand(n, 3, 1, 1, generator=gen)
        return base.expand(n, 3, size, size).clone()
    if kind == "noise":
        level = 0.25 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
        return (level + 0.18 * torch.randn(n, 1, size, size, generator=gen)).expand(n, 3, size, size).clamp(0, 1)
    if kind == "gradient":
        yy, xx = _grid(size)
        angle = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
        ramp = (torch.cos(angle) * xx + torch.sin(angle) * yy + 1.5) / 3
        tint = 0.2 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
        return (ramp[:, None] * tint).clamp(0, 1)
    if kind == "stripes":
        yy, xx = _grid(size)
        freq = 4 + 4 * torch.rand(n, 1, 1, generator=gen)
        bands = 0.5 + 0.5 * torch.sin(freq * math.pi * (xx + yy))
        return (0.15 + 0.25 * bands)[:, None].expand(n, 3, size, size).clone()
    raise ValueError(f"unknown background {kind!r}")


def paint(canvas: Tensor, mask: Tensor, rgb: Tensor) -> Tensor:
    """Alpha-blend ``rgb`` ``[N, 3]`` through ``mask`` ``[N, S, S]`` onto ``canvas``."""
    m = mask[:, None]
    return canvas * (1 - m) + rgb[:, :, None, None] * m


def colour_table() -> Tensor:
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32)


def jittered_colours(colour_ids: Tensor, gen: torch.Generator, amount: float = 0.06) -> Tensor:
    rgb = colour_table()[colour_ids]
    return (rgb + amount * torch.randn(rgb.shape, generator=gen)).clamp(0, 1)


def draw_objects(
    shape_ids: Tensor,
    colour_ids: Tensor,
    bg: str,
    size: int,
    gen: torch.Generator,
    centre_jitter: float = 0.25,
    scale_range: tuple[float, float] = (0.35, 0.6),
) -> Tensor:
    """One coloured shape per image on a background of kind ``bg``."""
    n = len(shape_ids)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * centre_jitter
    cy = (torch.rand(n, generator=gen) * 2 - 1) * centre_jitter
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(n, generator=gen)
    canvas = background(bg, n, size, gen)
    return paint(canvas, shape_mask(shape_ids, cx, cy, scale, size), jittered_colours(colour_ids, gen))


# A 3x5 pixel font for the digits 0-9 (rows top to bottom, three columns each).
DIGIT_FONT = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
              "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111")
# Centres of the five named regions (x, y in [-1, 1], y down).
REGION_CENTRES = ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5), (0.0, 0.0))
# Nine slots of a 3x3 grid where counted objects go.
SLOTS = tuple((x, y) for y in (-0.6, 0.0, 0.6) for x in (-0.6, 0.0, 0.6))


def digit_masks(digits: Tensor, size: int, gen: torch.Generator, height: tuple[float, float] = (0.55, 0.75),
                slant: float = 0.0, jitter: float = 0.2) -> Tensor:
    """Masks ``[N, S, S]`` of pixel-font digits: glyph height (fraction of the image), a random slant up to
    ``slant`` (shear), and a random shift up to ``jitter``."""
    import torch.nn.functional as F

    n = len(digits)
    font = torch.tensor([[int(b) for b in glyph] for glyph in DIGIT_FONT], dtype=torch.float32).view(10, 1, 5, 3)
    glyphs = F.pad(font[digits], (1, 1, 1, 1))  # a blank border so sampling outside stays empty
    h = height[0] + (height[1] - height[0]) * torch.rand(n, generator=gen)
    shear = slant * (torch.rand(n, generator=gen) * 2 - 1)
    shift = jitter * (torch.rand(n, 2, generator=gen) * 2 - 1)
    # output -> glyph coordinates: the 5 glyph rows (5/7 of the padded glyph) span `h` of the image height and
    # the 3 columns (3/5 of the padded width) span 3/5 of that, so the strokes keep their square pixels
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / h
    theta[:, 0, 1] = shear / h
    theta[:, 1, 1] = 5 / 7 / h
    theta[:, 0, 2] = -(shift[:, 0] + shear * shift[:, 1]) / h
    theta[:, 1, 2] = -5 / 7 * shift[:, 1] / h
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    return F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def place_objects(shape_ids: Tensor, counts: Tensor, centres: Tensor | None, scale: Tensor, size: int,
                  gen: torch.Generator) -> Tensor:
    """Masks ``[N, S, S]`` of ``counts[i]`` copies of shape ``shape_ids[i]``: one object at ``centres[i]`` when
    ``centres`` is given (counts must be 1), else ``counts[i]`` objects in distinct slots of a 3x3 grid."""
    n = len(shape_ids)
    if centres is not None:
        return shape_mask(shape_ids, centres[:, 0], centres[:, 1], scale, size)
    slots = torch.tensor(SLOTS)
    order = torch.argsort(torch.rand(n, len(SLOTS), generator=gen), dim=1)
    wobble = 0.08 * (torch.rand(n, len(SLOTS), 2, generator=gen) * 2 - 1)
    mask = torch.zeros(n, size, size)
    for k in range(int(counts.max())):
        at = slots[order[:, k]] + wobble[:, k]
        present = (counts > k).float()[:, None, None]
        mask = torch.maximum(mask, shape_mask(shape_ids, at[:, 0], at[:, 1], scale, size) * present)
    return mask
