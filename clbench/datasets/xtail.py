"""The X-TAIL benchmark's datasets: 10 domains (no CIFAR100) over the CoOp on-disk layout (RAIL, Xu et al. 2024, and
LADA's code: linghan1997/Regression-based-Analytic-Incremental-Learning, MaolinLuo/LADA).

Where the data is: ``cfg.data_root``, ``$CLBENCH_DATA_ROOT`` or the user config file
(``clbench.datasets.mtil.resolve_data_root(..., "xtail")``), holding the folders of the LADA README:
``Aircraft``, ``Caltech101``, ``DTD``, ``EuroSAT``, ``Flowers``, ``Food``, ``MNIST/MNIST/raw``, ``Pets``,
``StanfordCars``, ``Sun397`` (see ``xtail_names.XLAYOUTS``). Nothing is downloaded.

Splits: each CoOp ``split_zhou_*.json`` (read with ``json``) holds ``train``/``val``/``test`` lists of
``[relative_image_path, label, classname]``; training uses ``train``, testing the full ``test``, and ``val`` is
not used. Aircraft uses the official ``images_variant_{train,test}.txt`` with ``variants.txt`` (its ``val`` list
is not used either); MNIST is torchvision's train/test (test: 10,000 images). Class names are taken from the
split file ordered by label (rules in ``xtail_names``), and every task has the single template
``a photo of a {}.``.

Shots (``data.shots``): 0 = full-shot, the whole train split (LADA). K > 0 = K images per class drawn from the
train split (RAIL's 16-shot), without replacement, or with replacement where a class has fewer than K (as
RAIL/LADA's ``random.choices``). The draw of class ``c`` of domain ``d`` uses
``numpy.random.default_rng([cfg.seed, crc32(d), c])``: the run's seed (RAIL seeds 42, LADA 0, each with its
global seed; the picks here follow ``--seed`` the same way and are the same for every method, every order and
every rebuild). The chosen indices into the train split are stored in ``Benchmark.info["train_indices"]``
and so in the run's manifest.

Preprocessing, unreadable images (``data.skip_bad_images``), ``data.train_augment`` and ``data.num_tasks``
behave as for MTIL (the transform and lazy image view are the MTIL reader's; the layout checks, image scan and
position selection are shared through :mod:`clbench.datasets.datacheck` and :mod:`clbench.datasets.selection`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from clbench.datasets.base import Benchmark, ImageSpec, Task, duplicate_classnames
from clbench.datasets.datacheck import DatasetStatus, LayoutCheck
from clbench.datasets.mtil import clip_transform, resolve_data_root, task_from_selection
from clbench.datasets.selection import (
    Draw,
    Source,
    bad_images_summary,
    dataset_labels,
    select_task,
)
from clbench.datasets.sequence import task_sequence
from clbench.datasets.xtail_names import (
    EXPECTED_CLASSES,
    ORDER_I,
    ORDERS,
    TEMPLATE,
    XLAYOUTS,
    eurosat_name,
    mnist_name,
    prompt_name,
)
from clbench.errors import UserError

if TYPE_CHECKING:  # annotations only: the data layer never imports the configuration layer at run time
    from clbench.config import DataConfig, RunConfig

__all__ = ["build_xtail", "preflight", "duplicate_classnames", "inspect_xtail", "shot_positions", "read_xtail_source"]

SHOTS_RULE = ("K per class from the train split, numpy default_rng([seed, crc32(dataset), label]) per class; "
              "without replacement, with replacement where a class has fewer than K")


# ----------------------------------------------------------------------------------------------------------
# Layout checks (nothing is read).


class CoopLayoutCheck(LayoutCheck):
    """The layout checks, with a missing CoOp split file named together with where to get it."""

    def fix(self, root: Path, name: str, missing: Path) -> str:
        split_file = XLAYOUTS[name].split_file
        if split_file and missing == root / split_file:
            return f"put CoOp's {missing.name} (see CoOp's DATASETS.md) into {self.folder(root, name)}"
        return super().fix(root, name, missing)


# ----------------------------------------------------------------------------------------------------------
# Reading a domain.


class SplitDataset(Dataset):
    """``(PIL image, label)`` pairs from a list of image files; ``_image_files``/``_labels`` are the attributes
    the MTIL reader's ``dataset_files``/``dataset_labels`` read, so its image view and scan work unchanged."""

    def __init__(self, files: list[str], labels: list[int]) -> None:
        self._image_files, self._labels = files, labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.open(self._image_files[index])
        image.load()
        return image, self._labels[index]


Entry = tuple[str, int, str]


def _entries(name: str, path: Path, data: dict, split: str) -> list[Entry]:
    items = data.get(split, [])
    if not isinstance(items, list):
        raise UserError(f"{name}: split '{split}' of {path} is not a list; put CoOp's original file there")
    out = []
    for i, item in enumerate(items):
        ok = (isinstance(item, list | tuple) and len(item) == 3 and isinstance(item[0], str)
              and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0
              and isinstance(item[2], str))
        if not ok:
            raise UserError(f"{name}: entry {i} of split '{split}' in {path} is not [image_path, label, classname] "
                            f"({str(item)[:60]}); put CoOp's original file there")
        out.append((item[0], item[1], item[2]))
    return out


def read_split_file(name: str, path: Path) -> dict[str, list[Entry]]:
    """The ``train``/``val``/``test`` entries of a CoOp split file (parsed with ``json``; ``val`` may be absent)."""
    from clbench.storage.safeio import read_text

    fix = "put CoOp's original file there"
    try:
        data = json.loads(read_text(path, f"{name}: split file", fix))  # a regular file, size-capped
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{name}: cannot parse {path} ({type(exc).__name__}: {first}); put CoOp's original file "
                        "there") from None
    if not isinstance(data, dict) or not all(k in data for k in ("train", "test")):
        raise UserError(f"{name}: {path} has no 'train' and 'test' lists; put CoOp's original split file there")
    return {split: _entries(name, path, data, split) for split in ("train", "val", "test")}


def classnames_by_label(name: str, path: Path, entries: Sequence[Entry]) -> list[str]:
    """The class names ordered by label; labels must be 0..C-1 and each label must have one name."""
    names: dict[int, str] = {}
    for _, label, classname in entries:
        if names.setdefault(label, classname) != classname:
            raise UserError(f"{name}: label {label} is named both {names[label]!r} and {classname!r} in {path}; "
                            "put CoOp's original split file there")
    if not names:
        raise UserError(f"{name}: {path} lists no images; put CoOp's original split file there")
    absent = [y for y in range(max(names) + 1) if y not in names]
    if absent:
        raise UserError(f"{name}: labels in {path} skip {absent[0]} (labels must be 0..{max(names)}); put CoOp's "
                        "original split file there")
    return [names[y] for y in range(len(names))]


def _split_source(name: str, entries: dict[str, list[Entry]], image_dir: Path, classnames: list[str]) -> Source:
    def dataset(split: str) -> SplitDataset:
        return SplitDataset([str(image_dir / p) for p, _, _ in entries[split]], [y for _, y, _ in entries[split]])

    train, test = dataset("train"), dataset("test")
    return Source(name, train, test, list(range(len(train))), list(range(len(test))), classnames)


def _read_coop(root: Path, name: str) -> tuple[Source, int]:
    layout = XLAYOUTS[name]
    path = root / layout.split_file
    entries = read_split_file(name, path)
    raw = classnames_by_label(name, path, entries["train"] + entries["val"] + entries["test"])
    names = [eurosat_name(c) for c in raw] if name == "eurosat" else raw
    return _split_source(name, entries, root / layout.image_dir, [prompt_name(c) for c in names]), len(entries["val"])


def _read_aircraft(root: Path) -> tuple[Source, int]:
    top = root / XLAYOUTS["aircraft"].folder
    from clbench.storage.safeio import read_text

    fix = f"re-extract the dataset into {top}"
    variants = [line.strip() for line in read_text(top / "variants.txt", "aircraft: list", fix).splitlines()
                if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    entries: dict[str, list[Entry]] = {}
    for split in ("train", "val", "test"):
        file = top / f"images_variant_{split}.txt"
        if split == "val" and not file.is_file():
            entries[split] = []
            continue
        rows = []
        for number, line in enumerate(read_text(file, "aircraft: list", fix).splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise UserError(f"aircraft: line {number} of {file} names variant {variant!r}, which is not in "
                                f"{top / 'variants.txt'}; re-extract the dataset into {top}")
            rows.append((f"{image_id}.jpg", label_of[variant], variant))
        entries[split] = rows
    return _split_source("aircraft", entries, top / "images", [prompt_name(v) for v in variants]), len(entries["val"])


def _read_mnist(root: Path) -> tuple[Source, int]:
    base = root / XLAYOUTS["mnist"].folder
    train, test = tvd.MNIST(base, train=True, download=False), tvd.MNIST(base, train=False, download=False)
    names = [prompt_name(mnist_name(c)) for c in tvd.MNIST.classes]
    return Source("mnist", train, test, list(range(len(train))), list(range(len(test))), names), 0


def read_xtail_source(root: Path, name: str) -> tuple[Source, int]:
    """Domain ``name`` and the size of its unused ``val`` split; any failure is one line naming it and its path."""
    problem = CHECK.problem(root, name)
    if problem:
        raise UserError(problem)
    top = root / XLAYOUTS[name].folder
    try:
        if name == "aircraft":
            source, n_val = _read_aircraft(root)
        elif name == "mnist":
            source, n_val = _read_mnist(root)
        else:
            source, n_val = _read_coop(root, name)
    except UserError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, EOFError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{name}: could not read {top} ({type(exc).__name__}: {first}); re-extract the dataset "
                        "there") from None
    labels = dataset_labels(source.train) + dataset_labels(source.test)
    bad = [y for y in labels if not 0 <= y < len(source.classnames)]
    if bad:
        raise UserError(f"{name}: label {bad[0]} under {top} is outside 0..{len(source.classnames) - 1}; "
                        "re-extract the dataset there")
    return source, n_val


CHECK = CoopLayoutCheck("X-TAIL", "CoOp", "clbench data check --benchmark xtail --data-root DIR", XLAYOUTS,
                        EXPECTED_CLASSES, lambda root, name: read_xtail_source(root, name)[0])


# ----------------------------------------------------------------------------------------------------------
# Shots.


def shot_positions(labels: Sequence[int], shots: int, seed: int, dataset: str,
                   exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``shots`` indices per label (ascending labels, draw order within a label), see the module docstring.

    Each label has its own generator, so excluding an unreadable image changes only that label's picks.
    """
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if i not in exclude:
            by_label.setdefault(int(y), []).append(i)
    key = zlib.crc32(dataset.encode())
    picks: list[int] = []
    for y in sorted(by_label):
        pool = by_label[y]
        rng = np.random.default_rng([seed, key, y])
        picks += [pool[j] for j in rng.choice(len(pool), size=shots, replace=len(pool) < shots).tolist()]
    return picks


def shot_draw(shots: int, seed: int, dataset: str) -> Draw | None:
    """The shots rule as a :data:`~clbench.datasets.selection.Draw` (None for 0: full-shot)."""
    if shots <= 0:
        return None
    return lambda labels, excluded: shot_positions(labels, shots, seed, dataset, exclude=excluded)


# ----------------------------------------------------------------------------------------------------------
# The benchmark.


def task_names(cfg: RunConfig) -> list[str]:
    """The domains of ``cfg.order``, cut to ``data.num_tasks`` if set, or the ``data.datasets`` selection."""
    return task_sequence(ORDERS[cfg.order], cfg.data.datasets, cfg.data.num_tasks, "xtail")


def unusable_line(root: Path, bad: Sequence[tuple[str, Path | None, str]], total: int) -> str:
    """One line for the unusable domains, each given as (name, the absent path or None, its problem line)."""
    return CHECK.unusable_line(root, bad, total)


def _split_names(name: str) -> tuple[str, str]:
    layout = XLAYOUTS[name]
    if name == "aircraft":
        return "images_variant_train.txt (official FGVC)", "images_variant_test.txt (official FGVC)"
    if name == "mnist":
        return "torchvision MNIST train=True", "torchvision MNIST train=False"
    file = Path(layout.split_file).name
    return f"{file} 'train'", f"{file} 'test'"


def load_task(root: Path, name: str, data: DataConfig, seed: int, train_transform: Callable,
              test_transform: Callable) -> Task:
    """One X-TAIL task: its splits (shots applied, bad images skipped if asked), class names and the template."""
    source, n_val = read_xtail_source(root, name)
    top = CHECK.folder(root, name)
    sel = select_task(source, top, data, shot_draw(data.shots, seed, name))
    train_split, test_split = _split_names(name)
    info = {"source": "xtail", "path": str(top), "train_split": train_split, "test_split": test_split,
            "val_split": f"not used ({n_val} images)" if n_val else "not used", "n_train": len(sel.train),
            "n_test": len(sel.test), "n_train_full": len(source.train_positions), "n_classes": len(source.classnames),
            "expected_classes": EXPECTED_CLASSES[name]}
    if data.shots:
        info["shots"] = data.shots
        info["train_indices"] = list(sel.train)
    return task_from_selection(source, sel, [TEMPLATE], info, train_transform, test_transform)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any model is loaded, if the data root or a domain's files are absent (nothing is read)."""
    CHECK.check_all_present(resolve_data_root(cfg.data_root, "xtail"), task_names(cfg))


def build_xtail(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The X-TAIL task sequence in ``cfg.order`` from the CoOp-layout datasets under the data root."""
    root = resolve_data_root(cfg.data_root, "xtail")
    names = task_names(cfg)
    CHECK.check_all_present(root, names)
    test_transform = clip_transform(spec)
    train_transform = clip_transform(spec, augment=cfg.data.train_augment)
    tasks = [load_task(root, name, cfg.data, cfg.seed, train_transform, test_transform) for name in names]
    shots = cfg.data.shots
    info = {
        "protocol": "xtail",
        "data_root": str(root),
        "order": names,
        "templates": f"one template everywhere: {TEMPLATE!r}",
        "classnames": ("CoOp split files ordered by label ('_' -> ' '); aircraft variants.txt; eurosat CoOp names + "
                       "' satellite location'; mnist 'number: \"0 - zero\"'"),
        "splits": {t.name: {"train": t.info["train_split"], "test": t.info["test_split"], "val": t.info["val_split"],
                            "n_train": t.info["n_train"], "n_test": t.info["n_test"],
                            "n_train_full": t.info["n_train_full"], "n_classes": t.info["n_classes"]} for t in tasks},
        "class_counts": {t.name: len(t.classnames) for t in tasks},
        "n_classes_total": sum(len(t.classnames) for t in tasks),
        "shots": shots,
        "shots_rule": SHOTS_RULE if shots else "full-shot: the whole train split",
        "shot_seed": cfg.seed if shots else None,
        "train_augment": "ZSCL RandomResizedCrop(scale=(0.9, 1.0), bicubic)" if cfg.data.train_augment else "none",
        **bad_images_summary(cfg.data.skip_bad_images, tasks),
        "duplicate_classnames": duplicate_classnames(tasks),
    }
    if shots:
        info["train_indices"] = {t.name: list(t.info["train_indices"]) for t in tasks}
    return Benchmark("xtail", cfg.order, tasks, info)


# ----------------------------------------------------------------------------------------------------------
# ``clbench data check --benchmark xtail``.


def inspect_xtail(root: Path, names: Sequence[str] = tuple(ORDER_I)) -> list[DatasetStatus]:
    """The status of every X-TAIL domain under ``root``, in Order I."""
    return CHECK.inspect_all(root, names)
