"""The X-TAIL benchmark's datasets: 10 domains (no CIFAR100) over the CoOp on-disk layout (spec ``xtail.md`` §A2).

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
behave as for MTIL (the transform, lazy image view and image scan are the MTIL reader's).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from clbench.config import DataConfig, RunConfig
from clbench.datasets.base import Benchmark, ImageSpec, Task, duplicate_classnames
from clbench.datasets.mtil import (
    DATA_ROOT_ENV,
    DatasetStatus,
    ImageView,
    Selection,
    Source,
    clip_transform,
    dataset_files,
    dataset_labels,
    missing_files,
    resolve_data_root,
    scan_images,
)
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

__all__ = ["build_xtail", "preflight", "duplicate_classnames", "inspect_xtail", "shot_positions", "read_xtail_source"]

log = logging.getLogger(__name__)

SHOTS_RULE = ("K per class from the train split, numpy default_rng([seed, crc32(dataset), label]) per class; "
              "without replacement, with replacement where a class has fewer than K")


# ----------------------------------------------------------------------------------------------------------
# Layout checks (nothing is read).


def first_missing(root: Path, name: str) -> Path | None:
    """The domain's folder if it is absent, else the first required file/folder that is absent, else None."""
    layout = XLAYOUTS[name]
    top = root / layout.folder
    if not top.is_dir():
        return top
    for rel in layout.required:
        path = root / rel
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            return path
    return None


def layout_problem(root: Path, name: str) -> str | None:
    """One line if domain ``name`` is absent or half-present under ``root``, else None."""
    layout = XLAYOUTS[name]
    top = root / layout.folder
    missing = first_missing(root, name)
    if missing is None:
        return None
    if missing == top:
        return (f"{name}: not found: expected {top} (CoOp layout: {', '.join(layout.required)}); put the dataset "
                "there or fix --data-root")
    kind = "folder" if any(missing == root / r and r.endswith("/") for r in layout.required) else "file"
    if layout.split_file and missing == root / layout.split_file:
        fix = f"put CoOp's {missing.name} (see CoOp's DATASETS.md) into {top}"
    else:
        fix = f"re-extract the dataset into {top}"
    return f"{name}: incomplete: {kind} {missing} is missing; {fix}"


def unusable_line(root: Path, bad: Sequence[tuple[str, Path | None, str]], total: int) -> str:
    """One line for the unusable domains, each given as (name, the absent path or None, its problem line)."""
    if len(bad) == 1:
        return bad[0][2]
    if len(bad) == total and all(path == root / XLAYOUTS[name].folder for name, path, _ in bad):
        return (f"none of the {total} X-TAIL datasets is under {root} (e.g. expected {bad[0][1]}); check --data-root "
                f"or {DATA_ROOT_ENV} ('clbench data check --benchmark xtail --data-root DIR' lists every expected "
                "path)")
    parts = [f"{name} ({'missing ' + str(path) if path else problem})" for name, path, problem in bad]
    return f"{len(bad)} of the {total} X-TAIL datasets are not usable under {root}: {'; '.join(parts)}"


def check_all_present(root: Path, names: Sequence[str]) -> None:
    """Raise one line for all absent or half-present domains (nothing is read)."""
    bad = [(n, first_missing(root, n), p) for n in names if (p := layout_problem(root, n))]
    if bad:
        raise UserError(unusable_line(root, bad, len(names)))


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    variants = [line.strip() for line in (top / "variants.txt").read_text().splitlines() if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    entries: dict[str, list[Entry]] = {}
    for split in ("train", "val", "test"):
        file = top / f"images_variant_{split}.txt"
        if split == "val" and not file.is_file():
            entries[split] = []
            continue
        rows = []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
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
    problem = layout_problem(root, name)
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


# ----------------------------------------------------------------------------------------------------------
# Shots and the bad-image scan.


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


def select_xtail(source: Source, shots: int, seed: int, skip_bad: bool) -> Selection:
    """Apply the shots rule (train) and, if ``skip_bad``, drop unreadable images from both splits."""
    train_files, test_files = dataset_files(source.train), dataset_files(source.test)
    sel = Selection(list(source.train_positions), list(source.test_positions))
    if skip_bad and test_files is not None:
        bad = scan_images([test_files[p] for p in sel.test])
        sel.bad.update(bad)
        kept = [p for p in sel.test if test_files[p] not in bad]
        sel.bad_test, sel.test = len(sel.test) - len(kept), kept
    if shots <= 0:
        if skip_bad and train_files is not None:
            sel.bad.update(scan_images([train_files[p] for p in sel.train if train_files[p] not in sel.bad]))
            kept = [p for p in sel.train if train_files[p] not in sel.bad]
            sel.bad_train, sel.train = len(sel.train) - len(kept), kept
        return sel
    labels = dataset_labels(source.train)
    excluded: set[int] = set()
    checked: set[int] = set()
    while True:
        picks = shot_positions(labels, shots, seed, source.name, exclude=excluded)
        if not (skip_bad and train_files is not None):
            break
        new = sorted(set(picks) - checked)
        checked.update(new)
        bad = scan_images([train_files[i] for i in new])
        if not bad:
            break
        sel.bad.update(bad)
        excluded.update(i for i in new if train_files[i] in bad)
    sel.bad_train, sel.train = len(excluded), picks
    return sel


# ----------------------------------------------------------------------------------------------------------
# The benchmark.


def task_names(cfg: RunConfig) -> list[str]:
    """The domains of ``cfg.order``, cut to ``data.num_tasks`` if set."""
    names = list(ORDERS[cfg.order])
    if cfg.data.num_tasks:
        if cfg.data.num_tasks > len(names):
            raise UserError(f"data.num_tasks={cfg.data.num_tasks}: X-TAIL has {len(names)} tasks; use 0 (all) or "
                            f"1..{len(names)}")
        names = names[: cfg.data.num_tasks]
    return names


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
    top = root / XLAYOUTS[name].folder
    missing = missing_files(source)
    if missing and not data.skip_bad_images:
        raise UserError(f"{name}: incomplete: {len(missing)} listed image(s) are not on disk, e.g. {missing[0]}; "
                        f"re-extract the dataset into {top} (or --set data.skip_bad_images=true)")
    sel = select_xtail(source, data.shots, seed, data.skip_bad_images)
    if not sel.train or not sel.test:
        split = "training" if not sel.train else "test"
        raise UserError(f"{name}: no usable {split} images under {top}; check the dataset")
    if sel.bad:
        log.warning("%s: skipped %d unreadable image(s) (train %d, test %d), e.g. %s", name, len(sel.bad),
                    sel.bad_train, sel.bad_test, next(iter(sel.bad)))
    train_split, test_split = _split_names(name)
    info = {"source": "xtail", "path": str(top), "train_split": train_split, "test_split": test_split,
            "val_split": f"not used ({n_val} images)" if n_val else "not used", "n_train": len(sel.train),
            "n_test": len(sel.test), "n_train_full": len(source.train_positions), "n_classes": len(source.classnames),
            "expected_classes": EXPECTED_CLASSES[name]}
    if data.shots:
        info["shots"] = data.shots
        info["train_indices"] = list(sel.train)
    if sel.bad:
        info["bad_images"] = {"train": sel.bad_train, "test": sel.bad_test, "files": dict(list(sel.bad.items())[:20])}
    train = ImageView(name, source.train, sel.train, train_transform)
    test = ImageView(name, source.test, sel.test, test_transform)
    return Task(name, list(source.classnames), [TEMPLATE], train, test, info)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any model is loaded, if the data root or a domain's files are absent (nothing is read)."""
    check_all_present(resolve_data_root(cfg.data_root, "xtail"), task_names(cfg))


def build_xtail(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The X-TAIL task sequence in ``cfg.order`` from the CoOp-layout datasets under the data root."""
    root = resolve_data_root(cfg.data_root, "xtail")
    names = task_names(cfg)
    check_all_present(root, names)
    test_transform = clip_transform(spec)
    train_transform = clip_transform(spec, augment=cfg.data.train_augment)
    tasks = [load_task(root, name, cfg.data, cfg.seed, train_transform, test_transform) for name in names]
    bad = {t.name: {k: v for k, v in t.info["bad_images"].items() if k != "files"}
           for t in tasks if "bad_images" in t.info}
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
        "skip_bad_images": cfg.data.skip_bad_images,
        "bad_images": bad,
        "bad_images_total": sum(v["train"] + v["test"] for v in bad.values()),
        "duplicate_classnames": duplicate_classnames(tasks),
    }
    if shots:
        info["train_indices"] = {t.name: list(t.info["train_indices"]) for t in tasks}
    return Benchmark("xtail", cfg.order, tasks, info)


# ----------------------------------------------------------------------------------------------------------
# ``clbench data check --benchmark xtail``.


def inspect_domain(root: Path, name: str) -> DatasetStatus:
    """Read domain ``name``'s index (images are checked for existence, not decoded)."""
    status = DatasetStatus(name, root / XLAYOUTS[name].folder, False, expected_classes=EXPECTED_CLASSES[name],
                           missing=first_missing(root, name))
    try:
        source, _ = read_xtail_source(root, name)
    except UserError as exc:
        status.problem = str(exc)
        return status
    status.n_train, status.n_test = len(source.train_positions), len(source.test_positions)
    status.n_classes = len(source.classnames)
    missing = missing_files(source)
    if missing:
        status.missing = Path(missing[0])
        status.problem = (f"{name}: incomplete: {len(missing)} listed image(s) are not on disk, e.g. {missing[0]}; "
                          f"re-extract the dataset into {status.path}")
    elif not status.n_train or not status.n_test:
        status.problem = f"{name}: empty {'train' if not status.n_train else 'test'} split under {status.path}"
    status.usable = not status.problem
    return status


def inspect_xtail(root: Path, names: Sequence[str] = tuple(ORDER_I)) -> list[DatasetStatus]:
    """The status of every X-TAIL domain under ``root``, in Order I."""
    return [inspect_domain(root, name) for name in names]
