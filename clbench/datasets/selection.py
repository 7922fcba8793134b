"""Which samples and which tasks a real-data benchmark uses; shared by the MTIL and X-TAIL readers.

A reader turns one dataset into a :class:`Source` (its train/test datasets and the candidate positions of each
split). :func:`select_task` then keeps the images the task uses: it stops on listed files that are not on disk
(unless ``data.skip_bad_images``), applies the reader's shots rule (a :data:`Draw`), decodes every image the task
will use once when asked to skip unreadable ones, re-draws around unreadable picks, and stops if a split ends up
empty. :func:`first_tasks` cuts a benchmark's order to ``data.num_tasks``. Nothing here decodes an image unless
``skip_bad_images`` asks for it; the per-sample index (:func:`dataset_labels`, :func:`dataset_files`) is read
from the dataset objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from clbench.datasets.base import Task
from clbench.errors import UserError

if TYPE_CHECKING:  # annotations only: the data layer never imports the configuration layer at run time
    from clbench.config import DataConfig

log = logging.getLogger(__name__)

READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
BAD_FILES_KEPT = 20  # unreadable files named in a task's info (all are counted)


@dataclass
class Source:
    """One dataset as read from disk (no transform): split positions into its train/test datasets."""

    name: str
    train: Dataset
    test: Dataset
    train_positions: list[int]
    test_positions: list[int]
    classnames: list[str]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Per-sample access without decoding: labels and file paths of a dataset.


def dataset_labels(ds: Dataset) -> list[int]:
    """The label of every sample, read from the dataset's index (no image is opened)."""
    if isinstance(ds, tvd.StanfordCars):
        return [int(t) for _, t in ds._samples]
    for attr in ("_labels", "y", "targets"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    raise TypeError(f"no label index on {type(ds).__name__}")


def dataset_files(ds: Dataset) -> list[str] | None:
    """The image file of every sample, or None for datasets held as arrays (CIFAR100, MNIST)."""
    if isinstance(ds, tvd.Caltech101):
        base = Path(ds.root) / "101_ObjectCategories"
        return [str(base / ds.categories[y] / f"image_{i:04d}.jpg") for i, y in zip(ds.index, ds.y, strict=True)]
    if isinstance(ds, tvd.StanfordCars):
        return [p for p, _ in ds._samples]
    if isinstance(ds, tvd.ImageFolder):
        return [p for p, _ in ds.samples]
    for attr in ("_image_files", "_images"):
        if hasattr(ds, attr):
            return [str(p) for p in getattr(ds, attr)]
    return None


def missing_files(source: Source) -> list[str]:
    """Listed image files that are not on disk (a half-extracted dataset)."""
    seen: set[int] = set()
    missing = []
    for ds in (source.train, source.test):
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        missing += [f for f in (dataset_files(ds) or []) if not os.path.isfile(f)]
    return missing


# ----------------------------------------------------------------------------------------------------------
# The unreadable-image scan.


def read_error_reason(exc: BaseException) -> str:
    """A read error as ``Type: first line`` (a short phrase for PIL's "cannot identify image file")."""
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image PIL can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded (missing, not an image, truncated), or None if it decodes."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; the whole stream is still read
            image.load()
    except READ_ERRORS as exc:
        return read_error_reason(exc)
    return None


def scan_images(files: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """Decode every file once (threads); returns ``{file: reason}`` for the unreadable ones."""
    if not files:
        return {}
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(image_problem, files, chunksize=64))
    return {f: r for f, r in zip(files, reasons, strict=True) if r is not None}


# ----------------------------------------------------------------------------------------------------------
# Choosing a task's positions.


@dataclass
class Selection:
    """The positions a task uses after the shots rule and bad-image skipping."""

    train: list[int]
    test: list[int]
    bad: dict[str, str] = field(default_factory=dict)  # file -> reason
    bad_train: int = 0
    bad_test: int = 0

    def bad_images_info(self) -> dict:
        """The task's ``info["bad_images"]``: counts per split and the first unreadable files with their reason."""
        return {"train": self.bad_train, "test": self.bad_test, "files": dict(list(self.bad.items())[:BAD_FILES_KEPT])}


Draw = Callable[[list[int], set[int]], list[int]]
"""A shots rule: ``(labels of the candidate training images, candidates to leave out)`` → the picked candidates
(indices into the candidates, in the order the task uses them)."""


def _drop_unreadable(positions: list[int], files: list[str], bad: dict[str, str]) -> list[int]:
    """``positions`` whose file decodes; newly found unreadable files are added to ``bad``."""
    bad.update(scan_images([files[p] for p in positions if files[p] not in bad]))
    return [p for p in positions if files[p] not in bad]


def _draw_readable(draw: Draw, labels: list[int], files: list[str] | None,
                   bad: dict[str, str]) -> tuple[list[int], int]:
    """``draw``'s picks and how many candidates were left out. With ``files``, every pick decodes: unreadable
    picks are added to ``bad`` and left out, and the draw is repeated (each round decodes only new picks)."""
    excluded: set[int] = set()
    checked: set[int] = set()
    while True:
        picks = draw(labels, excluded)
        if files is None:
            return picks, 0
        new = [i for i in dict.fromkeys(picks) if i not in checked]
        checked.update(new)
        found = scan_images([files[i] for i in new])
        if not found:
            return picks, len(excluded)
        bad.update(found)
        excluded.update(i for i in new if files[i] in found)


def select_positions(source: Source, draw: Draw | None, skip_bad: bool) -> Selection:
    """Apply ``draw`` to the training candidates (None: use them all) and, if ``skip_bad``, drop unreadable
    images from both splits (test first; a training pick that does not decode is replaced by a re-draw)."""
    train_files, test_files = dataset_files(source.train), dataset_files(source.test)
    sel = Selection(list(source.train_positions), list(source.test_positions))
    if skip_bad and test_files is not None:
        kept = _drop_unreadable(sel.test, test_files, sel.bad)
        sel.bad_test, sel.test = len(sel.test) - len(kept), kept
    if draw is None:
        if skip_bad and train_files is not None:
            kept = _drop_unreadable(sel.train, train_files, sel.bad)
            sel.bad_train, sel.train = len(sel.train) - len(kept), kept
        return sel
    all_labels = dataset_labels(source.train)
    labels = [all_labels[p] for p in sel.train]
    files = [train_files[p] for p in sel.train] if skip_bad and train_files is not None else None
    picks, sel.bad_train = _draw_readable(draw, labels, files, sel.bad)
    sel.train = [sel.train[i] for i in picks]
    return sel


def select_task(source: Source, top: Path, data: DataConfig, draw: Draw | None) -> Selection:
    """The positions task ``source.name`` uses (see :func:`select_positions`), with the checks every reader makes.

    Listed files that are not on disk stop the run unless ``data.skip_bad_images``; an empty split stops it
    always; skipped images are logged once. ``top`` is the dataset's folder, named in the errors.
    """
    name = source.name
    missing = missing_files(source)
    if missing and not data.skip_bad_images:
        raise UserError(f"{name}: incomplete: {len(missing)} listed image(s) are not on disk, e.g. {missing[0]}; "
                        f"re-extract the dataset into {top} (or --skip-bad-images)")
    sel = select_positions(source, draw, data.skip_bad_images)
    if not sel.train or not sel.test:
        split = "training" if not sel.train else "test"
        raise UserError(f"{name}: no usable {split} images under {top}; check the dataset")
    if sel.bad:
        log.warning("%s: skipped %d unreadable image(s) (train %d, test %d), e.g. %s", name, len(sel.bad),
                    sel.bad_train, sel.bad_test, next(iter(sel.bad)))
    return sel


def first_tasks(names: Sequence[str], num_tasks: int, benchmark: str) -> list[str]:
    """``names`` cut to the first ``num_tasks`` (0: all); ``benchmark`` names the benchmark in the error."""
    names = list(names)
    if num_tasks:
        if num_tasks > len(names):
            raise UserError(f"data.num_tasks={num_tasks}: {benchmark} has {len(names)} tasks; use 0 (all) or "
                            f"1..{len(names)}")
        names = names[:num_tasks]
    return names


def bad_images_summary(skip_bad: bool, tasks: Sequence[Task]) -> dict:
    """The benchmark's ``skip_bad_images``, ``bad_images`` (counts per task that skipped any) and
    ``bad_images_total`` entries."""
    bad = {t.name: {k: v for k, v in t.info["bad_images"].items() if k != "files"}
           for t in tasks if "bad_images" in t.info}
    return {"skip_bad_images": skip_bad, "bad_images": bad,
            "bad_images_total": sum(v["train"] + v["test"] for v in bad.values())}
