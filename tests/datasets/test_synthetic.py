"""The embedded benchmark: the images are what their labels say (checked against hand-derived geometry, not
against the drawing code), the pretraining corpus never shows what it must hold out, every domain's chance level
is at most 20 %, and the data are a pure function of the data seed, never of the training seed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.cli.app import main
from clbench.datasets.base import ImageSpec
from clbench.datasets.render import DIGIT_FONT, REGION_CENTRES, SHAPES, digit_masks, place_objects
from clbench.datasets.synthetic import DOMAINS, HELD_OUT_COMBOS, ORDERS, build_domain, build_synthetic
from clbench.models.pretrain import sample_corpus

SPEC = ImageSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_every_domain_has_chance_at_most_20_percent_and_both_orders_use_all() -> None:
    for name, (classes, templates, _) in DOMAINS.items():
        assert len(classes) >= 5, name
        assert len(set(classes)) == len(classes) and templates
    for order in ORDERS.values():
        assert sorted(order) == sorted(DOMAINS)


def test_digit_glyph_cells_follow_the_font() -> None:
    """Upright, unshifted glyphs of height h: cell (r, c) of the 3x5 font is centred at
    (S/2 + (c - 1) h S / 5, S/2 + (r - 2) h S / 5) pixels; the mask there is the font bit."""
    size, h = 64, 0.6
    masks = digit_masks(torch.arange(10), size, torch.Generator().manual_seed(0), height=(h, h), jitter=0.0)
    cell = h * size / 5
    for digit, glyph in enumerate(DIGIT_FONT):
        for r in range(5):
            for c in range(3):
                y = int(size / 2 + (r - 2) * cell)
                x = int(size / 2 + (c - 1) * cell)
                value = float(masks[digit, y, x])
                assert (value > 0.5) == (glyph[3 * r + c] == "1"), (digit, r, c, value)
    # the glyph of 8 fills its box: h S pixels tall, 3/5 of that wide, centred
    rows = (masks[8] > 0.5).any(1).nonzero().flatten()
    cols = (masks[8] > 0.5).any(0).nonzero().flatten()
    assert abs(len(rows) - h * size) <= 1.5 and abs(len(cols) - 0.6 * h * size) <= 1.5
    assert abs((rows[0] + rows[-1]) / 2 - (size - 1) / 2) <= 1 and abs((cols[0] + cols[-1]) / 2 - (size - 1) / 2) <= 1


def _components(mask: torch.Tensor) -> int:
    """Connected components of a binary mask (4-neighbourhood), by flood fill."""
    seen = torch.zeros_like(mask, dtype=torch.bool)
    grid = mask.bool()
    count = 0
    h, w = grid.shape
    for y0 in range(h):
        for x0 in range(w):
            if grid[y0, x0] and not seen[y0, x0]:
                count += 1
                stack = [(y0, x0)]
                seen[y0, x0] = True
                while stack:
                    y, x = stack.pop()
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and grid[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
    return count


def test_counted_objects_are_separate_and_as_many_as_the_label() -> None:
    counts = torch.arange(1, 7).repeat(3)
    circles = torch.zeros(len(counts), dtype=torch.long)
    masks = place_objects(circles, counts, None, torch.full((len(counts),), 0.2), 48, torch.Generator().manual_seed(3))
    for mask, count in zip(masks, counts.tolist(), strict=True):
        assert _components(mask > 0.5) == count


def test_positioned_objects_sit_in_their_region() -> None:
    labels = torch.arange(len(REGION_CENTRES)).repeat(4)
    centres = torch.tensor(REGION_CENTRES)[labels]
    masks = place_objects(torch.randint(len(SHAPES), (len(labels),)), torch.ones(len(labels), dtype=torch.long),
                          centres, torch.full((len(labels),), 0.3), 32, torch.Generator().manual_seed(0))
    coords = (torch.arange(32) + 0.5) / 32 * 2 - 1
    for mask, (cx, cy) in zip(masks, centres.tolist(), strict=True):
        weight = mask.sum()
        x = float((mask.sum(0) * coords).sum() / weight)
        y = float((mask.sum(1) * coords).sum() / weight)
        assert abs(x - cx) < 0.2 and abs(y - cy) < 0.2


def test_pretraining_corpus_never_shows_held_out_compositions_or_patterns() -> None:
    _, captions = sample_corpus(3000, 32, torch.Generator().manual_seed(0))
    text = " ".join(captions)
    for shape, colour in HELD_OUT_COMBOS:
        assert f"{colour} {shape}" not in text
        assert f"{colour} {shape}s" not in text and f"{colour} {shape}es" not in text
    for word in ("pattern", "stripes", "checkerboard", "waves", "grid"):
        assert word not in text, word
    # what the corpus does teach: every other domain's vocabulary occurs in it
    for word in ("top left", "bottom right", "middle", "background", "the number seven", "three", "six"):
        assert word in text, word


def test_domains_are_a_function_of_the_data_seed() -> None:
    a = build_domain("Counts", SPEC, 4, 3, seed=0)
    b = build_domain("Counts", SPEC, 4, 3, seed=0)
    c = build_domain("Counts", SPEC, 4, 3, seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    assert not torch.equal(a.train.tensors[0][:3], a.test.tensors[0][:3])
    bench = build_synthetic(2, SPEC, 2, 1, seed=0)
    assert [t.name for t in bench.tasks] == ORDERS[2]


def _test_images_of_run(tmp_path: Path, seed: int, data_seed: int) -> tuple[pd.DataFrame, dict]:
    out = tmp_path / f"s{seed}-d{data_seed}"
    assert main(["run", "--methods", "zeroshot", "--seed", str(seed), "--out", str(out), "--preset", "smoke",
                 "--pretrained", "none", "--quiet", "--set", f"data.seed={data_seed}",
                 "--set", "data.num_tasks=2"]) == 0
    run = out / "synthetic-order1" / "zeroshot" / f"seed{seed}"
    return pd.read_csv(run / "zeroshot.csv"), json.loads((run / "config.json").read_text())


def test_training_seed_does_not_redraw_the_test_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner builds the benchmark from ``data.seed``; ``--seed`` only reaches training."""
    import clbench.datasets.synthetic as synthetic

    seen: list[int] = []
    original = synthetic.build_synthetic

    def spy(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "build_synthetic", spy)
    _, cfg0 = _test_images_of_run(tmp_path, seed=0, data_seed=0)
    _, cfg5 = _test_images_of_run(tmp_path, seed=5, data_seed=0)
    _, cfg_d = _test_images_of_run(tmp_path, seed=5, data_seed=3)
    assert seen == [0, 0, 3]
    assert (cfg0["seed"], cfg0["data"]["seed"]) == (0, 0)
    assert (cfg5["seed"], cfg5["data"]["seed"]) == (5, 0)
    assert cfg_d["data"]["seed"] == 3
