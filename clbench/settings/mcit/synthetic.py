"""The embedded instruction sequence ``synthetic-mcit``: five tasks shaped like UCIT's, on 32 px procedural images.

Each task has its own question template and its own answer vocabulary, so learning one task does not teach the
next, and forgetting shows in the scores:

1. ``shape-qa``   classification QA (ImageNet-R-like): "what shape is this ?" -> shape name; exact match.
2. ``colour-mc``  multiple choice with letters (ArxivQA-like): four colour options -> ``A``..``D``; exact match.
3. ``caption``    captioning (VizWiz / Flickr30k-like): "a big red circle at the top"; caption average.
4. ``count-math`` counting + arithmetic (CLEVR-Math-like): "count the objects and add two ." -> digit; exact.
5. ``side-qa``    diagram QA (IconQA-like): two shapes, "where is the star ?" -> ``west`` / ``east``; exact.

The base model's instruction pre-training uses a sixth template, colour naming ("what colour is this ?"), whose
knowledge the sequence should keep (``BASE_TASK``). Every split is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clbench.datasets.render import COLOURS, SHAPES, background, jittered_colours, paint, shape_mask

SIZE = 32
COLOUR_NAMES = tuple(COLOURS)
LETTERS = ("A", "B", "C", "D")
NUMBERS = ("one", "two", "three")
TASKS = ("shape-qa", "colour-mc", "caption", "count-math", "side-qa")
SCORERS = {"shape-qa": "exact", "colour-mc": "exact", "caption": "caption", "count-math": "exact",
           "side-qa": "exact", "colour-name": "exact"}
BASE_TASK = "colour-name"
SEEDS = {name: 1000 * (k + 1) for k, name in enumerate((*TASKS, BASE_TASK))}


@dataclass
class Split:
    """Questions, answers (first reference), all references per item, and images: a tensor ``[N, 3, S, S]`` in
    [0, 1] or a list of image files (real benchmarks); ``ids`` and ``image_names`` where the scorer needs them."""

    questions: list[str]
    answers: list[str]
    references: list[list[str]]
    images: Tensor | list
    ids: list[str] | None = None
    image_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.answers)


def _objects(n: int, gen: torch.Generator, shapes: Tensor, colours: Tensor, cx: Tensor, cy: Tensor,
             scale: Tensor, canvas: Tensor | None = None) -> Tensor:
    canvas = background("plain", n, SIZE, gen) if canvas is None else canvas
    return paint(canvas, shape_mask(shapes, cx, cy, scale, SIZE), jittered_colours(colours, gen))


def _randint(high: int, n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(high, (n,), generator=gen)


def _single(n: int, gen: torch.Generator, jitter: float = 0.2):
    shapes, colours = _randint(len(SHAPES), n, gen), _randint(len(COLOURS), n, gen)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * jitter
    cy = (torch.rand(n, generator=gen) * 2 - 1) * jitter
    scale = 0.4 + 0.2 * torch.rand(n, generator=gen)
    return shapes, colours, _objects(n, gen, shapes, colours, cx, cy, scale)


def make_split(task: str, n: int, seed: int) -> Split:
    """``n`` items of ``task`` drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if task in ("shape-qa", BASE_TASK):
        shapes, colours, images = _single(n, gen)
        if task == "shape-qa":
            answers = [SHAPES[i] for i in shapes.tolist()]
            return Split(["what shape is this ?"] * n, answers, [[a] for a in answers], images)
        answers = [COLOUR_NAMES[i] for i in colours.tolist()]
        return Split(["what colour is this ?"] * n, answers, [[a] for a in answers], images)
    if task == "colour-mc":
        shapes, colours, images = _single(n, gen)
        questions, answers = [], []
        for c in colours.tolist():
            others = [i for i in torch.randperm(len(COLOURS), generator=gen).tolist() if i != c][:3]
            slot = int(_randint(4, 1, gen))
            options = others[:slot] + [c] + others[slot:]
            questions.append("which colour ? " + " ".join(f"{LETTERS[k]} {COLOUR_NAMES[o]}"
                                                           for k, o in enumerate(options)))
            answers.append(LETTERS[slot])
        return Split(questions, answers, [[a] for a in answers], images)
    if task == "caption":
        shapes, colours = _randint(len(SHAPES), n, gen), _randint(len(COLOURS), n, gen)
        where = _randint(4, n, gen)
        offsets = torch.tensor([[0.0, -0.45], [0.0, 0.45], [-0.45, 0.0], [0.45, 0.0]])[where]
        big = _randint(2, n, gen)
        scale = torch.where(big.bool(), torch.full((n,), 0.45), torch.full((n,), 0.25))
        images = _objects(n, gen, shapes, colours, offsets[:, 0], offsets[:, 1], scale)
        places = ("top", "bottom", "left", "right")
        refs = []
        for s, c, w, b in zip(shapes.tolist(), colours.tolist(), where.tolist(), big.tolist(), strict=True):
            size = "big" if b else "small"
            refs.append([f"a {size} {COLOUR_NAMES[c]} {SHAPES[s]} at the {places[w]}",
                         f"the {COLOUR_NAMES[c]} {SHAPES[s]} is {size} and at the {places[w]}"])
        return Split(["describe the image ."] * n, [r[0] for r in refs], refs, images)
    if task == "count-math":
        counts = 1 + _randint(4, n, gen)
        add = 1 + _randint(len(NUMBERS), n, gen)
        canvas = background("plain", n, SIZE, gen)
        corners = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
        for slot in range(4):
            present = counts > slot
            order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
            where = corners[order[:, slot]]
            shapes = torch.zeros(n, dtype=torch.long)  # circles
            colours = _randint(len(COLOURS), n, gen)
            drawn = _objects(n, gen, shapes, colours, where[:, 0], where[:, 1], torch.full((n,), 0.3), canvas)
            canvas = torch.where(present[:, None, None, None], drawn, canvas)
        questions = [f"count the objects and add {NUMBERS[a - 1]} ." for a in add.tolist()]
        answers = [str(c + a) for c, a in zip(counts.tolist(), add.tolist(), strict=True)]
        return Split(questions, answers, [[a] for a in answers], canvas)
    if task == "side-qa":
        first = _randint(len(SHAPES), n, gen)
        second = (first + 1 + _randint(len(SHAPES) - 1, n, gen)) % len(SHAPES)
        colours = _randint(len(COLOURS), n, gen)
        scale = torch.full((n,), 0.35)
        canvas = _objects(n, gen, first, colours, torch.full((n,), -0.5), torch.zeros(n), scale)
        images = _objects(n, gen, second, colours, torch.full((n,), 0.5), torch.zeros(n), scale, canvas)
        ask_left = _randint(2, n, gen).bool().tolist()
        questions = [f"where is the {SHAPES[f if left else s]} ?"
                     for f, s, left in zip(first.tolist(), second.tolist(), ask_left, strict=True)]
        answers = ["west" if left else "east" for left in ask_left]
        return Split(questions, answers, [[a] for a in answers], images)
    raise ValueError(f"unknown synthetic-mcit task {task!r}")


def side_shapes(n: int, seed: int) -> list[tuple[str, str]]:
    """The (left, right) shape names of ``make_split("side-qa", n, seed)``'s images (same draws)."""
    gen = torch.Generator().manual_seed(seed)
    first = _randint(len(SHAPES), n, gen)
    second = (first + 1 + _randint(len(SHAPES) - 1, n, gen)) % len(SHAPES)
    return [(SHAPES[f], SHAPES[s]) for f, s in zip(first.tolist(), second.tolist(), strict=True)]


def task_splits(task: str, n_train: int, n_test: int) -> tuple[Split, Split]:
    """Disjoint train and test splits of ``task`` (different seeds)."""
    return make_split(task, n_train, SEEDS[task]), make_split(task, n_test, SEEDS[task] + 7)


def vocabulary() -> list[str]:
    """Every word any synthetic question or answer can use (sorted), for the tiny tokenizer."""
    words = {"what", "shape", "is", "this", "?", "colour", "which", "describe", "the", "image", ".", "a", "at",
             "and", "big", "small", "top", "bottom", "left", "right", "count", "objects", "add", "where",
             "west", "east", *SHAPES, *COLOUR_NAMES, *LETTERS, *NUMBERS, *(str(d) for d in range(10))}
    return sorted(words)
