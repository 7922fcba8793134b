"""The real MTIL benchmark: 11 torchvision datasets over the ZSCL/KeepLoRA on-disk layout (spec §1, §2, §3.4).

Where the data is: ``cfg.data_root`` (``--data-root`` or ``--set data_root=DIR``); when that is empty, the
environment variable ``CLBENCH_DATA_ROOT``, then the user's config file (:mod:`clbench.userconfig`). Nothing is
downloaded (every torchvision class gets ``download=False``).

Splits (recorded in ``Benchmark.info``): Aircraft ``train``/``test`` (not trainval), Flowers ``train`` (1,020
images, not train+val)/``test``, OxfordPet ``trainval``/``test``, DTD partition 1 ``train``/``test``, the
official train/test of CIFAR100, Food, MNIST and StanfordCars; Caltech101, EuroSAT and SUN397 have no split
and are cut 80/20 by ``torch.utils.data.random_split`` with a seed-42 generator, first part = train.
Deviation from ZSCL/KeepLoRA: SUN397's file list (``Path.rglob``, filesystem order there) is sorted by path
before the split, so the split is the same on every machine. torchvision's md5 checks of CIFAR100 and
Flowers102 meta files are replaced by existence checks (the files are otherwise read by torchvision's code).

Images stay on disk until a sample is read (MNIST and CIFAR100 are arrays that torchvision loads whole).
Each sample is preprocessed as CLIP does: Resize(bicubic) → CenterCrop → RGB → ToTensor → Normalize; with
``data.train_augment`` training images use ZSCL's RandomResizedCrop(scale 0.9–1, bicubic) instead.

Few-shot (``data.shots`` = K > 0, spec §3.4): the first K training images of each class in the seed-42
permutation of the training split (``torch.randperm``); MoE-Adapters walks its shuffled loader instead and
freezes the augmented tensors, so the picks are the same rule, not the same images. Test sets stay full.

Unreadable images stop the run with the file named, unless ``data.skip_bad_images``: then every image that
will be used is decoded once up front (in threads), and the unreadable or missing ones are dropped after the
split (so the other images keep their split) and counted in ``Benchmark.info["bad_images"]``.

``data.num_tasks`` cuts the sequence to its first tasks; ``data.train_per_class``/``test_per_class`` are for the
synthetic benchmark only (MTIL uses the full splits).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from clbench.config import DataConfig, RunConfig
from clbench.datasets.base import Benchmark, ImageSpec, Task
from clbench.datasets.mtil_names import (
    CALTECH101_FOLDERS,
    EUROSAT_FOLDERS,
    EXPECTED_CLASSES,
    ORDERS,
    handwritten_classnames,
    process_label,
    templates_for,
)
from clbench.errors import UserError

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"
SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
SUN397_ORDER_NOTE = ("SUN397 file list sorted by path before the split (ZSCL/KeepLoRA split torchvision's "
                     "Path.rglob order, which depends on the filesystem)")
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------------
# Layouts: what torchvision reads under the root, per dataset (spec §1.1).


@dataclass(frozen=True)
class Layout:
    """Where one dataset lives under the data root and which split each part of the task uses."""

    name: str
    folder: str
    required: tuple[str, ...]  # paths under the root that torchvision reads; a trailing "/" marks a folder
    train_split: str
    test_split: str

    def path(self, root: Path) -> Path:
        return root / self.folder


_RANDOM = f"{int(TRAIN_FRACTION * 100)}% of a seed-{SPLIT_SEED} random_split"
_RANDOM_TEST = f"{100 - int(TRAIN_FRACTION * 100)}% of a seed-{SPLIT_SEED} random_split"
LAYOUTS = {layout.name: layout for layout in (
    Layout("Aircraft", "fgvc-aircraft-2013b",
           ("fgvc-aircraft-2013b/data/images/", "fgvc-aircraft-2013b/data/variants.txt",
            "fgvc-aircraft-2013b/data/images_variant_train.txt", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
           "FGVCAircraft split='train' (not trainval)", "FGVCAircraft split='test'"),
    Layout("Caltech101", "caltech101", ("caltech101/101_ObjectCategories/",), f"Caltech101, {_RANDOM}",
           f"Caltech101, {_RANDOM_TEST}"),
    Layout("CIFAR100", "cifar-100-python",
           ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
           "CIFAR100 train=True", "CIFAR100 train=False"),
    Layout("DTD", "dtd", ("dtd/dtd/images/", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt"),
           "DTD split='train' partition=1", "DTD split='test' partition=1"),
    Layout("EuroSAT", "eurosat", ("eurosat/2750/",), f"EuroSAT, {_RANDOM}", f"EuroSAT, {_RANDOM_TEST}"),
    Layout("Flowers", "flowers-102", ("flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
           "Flowers102 split='train' (1,020 images; not train+val)", "Flowers102 split='test'"),
    Layout("Food", "food-101", ("food-101/images/", "food-101/meta/train.json", "food-101/meta/test.json"),
           "Food101 split='train'", "Food101 split='test'"),
    Layout("MNIST", "MNIST",
           tuple(f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
           "MNIST train=True", "MNIST train=False"),
    Layout("OxfordPet", "oxford-iiit-pet",
           ("oxford-iiit-pet/images/", "oxford-iiit-pet/annotations/trainval.txt",
            "oxford-iiit-pet/annotations/test.txt"),
           "OxfordIIITPet split='trainval'", "OxfordIIITPet split='test'"),
    Layout("StanfordCars", "stanford_cars",
           ("stanford_cars/cars_train/", "stanford_cars/cars_test/", "stanford_cars/devkit/cars_train_annos.mat",
            "stanford_cars/devkit/cars_meta.mat", "stanford_cars/cars_test_annos_withlabels.mat"),
           "StanfordCars split='train'", "StanfordCars split='test'"),
    Layout("SUN397", "SUN397", ("SUN397/ClassName.txt",), f"SUN397, {_RANDOM} (file list sorted)",
           f"SUN397, {_RANDOM_TEST} (file list sorted)"),
)}


_ROOT_HINT = {"mtil": "the folder holding fgvc-aircraft-2013b, caltech101, ...; see 'clbench data check'",
              "xtail": "the folder holding the X-TAIL datasets in the CoOp layout"}
_ROOT_CONTENTS = {"mtil": "the folder holding the 11 MTIL datasets",
                  "xtail": "the folder holding the X-TAIL datasets (CoOp layout)"}


def resolve_data_root(data_root: str, benchmark: str = "mtil") -> Path:
    """The data root of ``benchmark``; it must be an existing folder.

    Precedence: ``data_root`` (``--data-root``), else ``$CLBENCH_DATA_ROOT``, else the user's config file
    (:mod:`clbench.userconfig`: ``[data_root_by_benchmark] <benchmark>``, then ``data_root``). Errors name the
    source that gave a bad path, so a stale config file is not mistaken for a bad flag.
    """
    from clbench.userconfig import config_path, load_user_config

    if data_root:
        raw, source = Path(data_root), "--data-root"
    elif os.environ.get(DATA_ROOT_ENV, ""):
        raw, source = Path(os.environ[DATA_ROOT_ENV]), DATA_ROOT_ENV
    else:
        found = load_user_config().data_root_for(benchmark)
        if found is None:
            raise UserError(f"--benchmark {benchmark} needs its datasets: pass --data-root DIR or set "
                            f"{DATA_ROOT_ENV}=DIR, or write data_root = \"DIR\" in {config_path()} "
                            f"({_ROOT_HINT.get(benchmark, 'the folder holding its datasets')})")
        raw, source = found
    root = raw.expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"data root {root} (from {source}) does not exist or is not a folder; point it at "
                        f"{_ROOT_CONTENTS.get(benchmark, 'the folder holding its datasets')}")
    return root


def first_missing(root: Path, name: str) -> Path | None:
    """The dataset's folder if it is absent, else the first required file/folder that is absent, else None."""
    layout = LAYOUTS[name]
    if not layout.path(root).is_dir():
        return layout.path(root)
    for rel in layout.required:
        path = root / rel
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            return path
    return None


def layout_problem(root: Path, name: str) -> str | None:
    """One line if dataset ``name`` is absent or half-present under ``root`` (nothing is read), else None."""
    layout = LAYOUTS[name]
    top = layout.path(root)
    missing = first_missing(root, name)
    if missing is None:
        return None
    if missing == top:
        return (f"{name}: not found: expected {top} (torchvision layout: {', '.join(layout.required)}); put the "
                "dataset there or fix --data-root")
    kind = "folder" if any(missing == root / r and r.endswith("/") for r in layout.required) else "file"
    return f"{name}: incomplete: {kind} {missing} is missing; re-extract the dataset into {top}"


# ----------------------------------------------------------------------------------------------------------
# Reading the torchvision classes.


class _CIFAR100(tvd.CIFAR100):
    """torchvision's CIFAR100 with existence checks in place of its md5 checks."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {"filename": "meta", "key": "fine_label_names", "md5": None}


class _Flowers102(tvd.Flowers102):
    """torchvision's Flowers102 with existence checks in place of its md5 checks of the two .mat files."""

    _file_dict = {"image": ("102flowers.tgz", None), "label": ("imagelabels.mat", None),
                  "setid": ("setid.mat", None)}


@dataclass
class Source:
    """One dataset as torchvision reads it (no transform): split positions into its train/test datasets."""

    name: str
    train: Dataset
    test: Dataset
    train_positions: list[int]
    test_positions: list[int]
    classnames: list[str]
    notes: list[str] = field(default_factory=list)


def _random_split_positions(n: int) -> tuple[list[int], list[int]]:
    """ZSCL's ``split_dataset``: ``random_split`` into int(0.8 n) / rest with a seed-42 generator."""
    n_train = int(TRAIN_FRACTION * n)
    parts = torch.utils.data.random_split(range(n), [n_train, n - n_train],
                                          generator=torch.Generator().manual_seed(SPLIT_SEED))
    return list(parts[0].indices), list(parts[1].indices)


def _official(name: str, train: Dataset, test: Dataset, classnames: list[str]) -> Source:
    return Source(name, train, test, list(range(len(train))), list(range(len(test))), classnames)


def _split(name: str, ds: Dataset, classnames: list[str]) -> Source:
    train, test = _random_split_positions(len(ds))
    return Source(name, ds, ds, train, test, classnames)


def _torchvision_names(classes: Sequence[str]) -> list[str]:
    return [process_label(c) for c in classes]


def _read_aircraft(root: Path) -> Source:
    train = tvd.FGVCAircraft(root, split="train", annotation_level="variant", download=False)
    test = tvd.FGVCAircraft(root, split="test", annotation_level="variant", download=False)
    return _official("Aircraft", train, test, _torchvision_names(train.classes))


def _read_caltech101(root: Path) -> Source:
    folder = root / "caltech101" / "101_ObjectCategories"
    if not (folder / "BACKGROUND_Google").is_dir():
        raise UserError(f"Caltech101: incomplete: folder {folder / 'BACKGROUND_Google'} is missing (torchvision "
                        f"removes it from the categories and fails without it); re-extract the dataset into "
                        f"{root / 'caltech101'}")
    ds = tvd.Caltech101(root, target_type="category", download=False)
    _check_folders("Caltech101", folder, ds.categories, CALTECH101_FOLDERS)
    return _split("Caltech101", ds, handwritten_classnames("Caltech101"))


def _read_cifar100(root: Path) -> Source:
    train, test = _CIFAR100(root, train=True, download=False), _CIFAR100(root, train=False, download=False)
    return _official("CIFAR100", train, test, _torchvision_names(train.classes))


def _read_dtd(root: Path) -> Source:
    train = tvd.DTD(root, split="train", partition=1, download=False)
    test = tvd.DTD(root, split="test", partition=1, download=False)
    _check_same_classes("DTD", root / "dtd", train.classes, test.classes)
    return _official("DTD", train, test, _torchvision_names(train.classes))


def _read_eurosat(root: Path) -> Source:
    ds = tvd.EuroSAT(root, download=False)
    _check_folders("EuroSAT", root / "eurosat" / "2750", ds.classes, EUROSAT_FOLDERS)
    return _split("EuroSAT", ds, handwritten_classnames("EuroSAT"))


def _read_flowers(root: Path) -> Source:
    train, test = _Flowers102(root, split="train", download=False), _Flowers102(root, split="test", download=False)
    names = handwritten_classnames("Flowers")
    for ds in (train, test):
        bad = [label for label in ds._labels if not 0 <= label < len(names)]
        if bad:
            raise UserError(f"Flowers: {root / 'flowers-102' / 'imagelabels.mat'} has label {bad[0] + 1}, outside "
                            f"1..{len(names)}; replace it with the original file")
    return _official("Flowers", train, test, names)


def _read_food(root: Path) -> Source:
    train, test = tvd.Food101(root, split="train", download=False), tvd.Food101(root, split="test", download=False)
    _check_same_classes("Food", root / "food-101", train.classes, test.classes)
    return _official("Food", train, test, _torchvision_names(train.classes))


def _read_mnist(root: Path) -> Source:
    train, test = tvd.MNIST(root, train=True, download=False), tvd.MNIST(root, train=False, download=False)
    return _official("MNIST", train, test, list(train.classes))


def _read_pet(root: Path) -> Source:
    train = tvd.OxfordIIITPet(root, split="trainval", target_types="category", download=False)
    test = tvd.OxfordIIITPet(root, split="test", target_types="category", download=False)
    _check_same_classes("OxfordPet", root / "oxford-iiit-pet", train.classes, test.classes)
    return _official("OxfordPet", train, test, _torchvision_names(train.classes))


def _read_cars(root: Path) -> Source:
    train = tvd.StanfordCars(root, split="train", download=False)
    test = tvd.StanfordCars(root, split="test", download=False)
    return _official("StanfordCars", train, test, _torchvision_names(train.classes))


def _read_sun397(root: Path) -> Source:
    ds = tvd.SUN397(root, download=False)
    pairs = sorted(zip((str(p) for p in ds._image_files), ds._labels, strict=True))
    ds._image_files = [Path(p) for p, _ in pairs]
    ds._labels = [label for _, label in pairs]
    source = _split("SUN397", ds, _torchvision_names(ds.classes))
    source.notes.append(SUN397_ORDER_NOTE)
    return source


READERS: dict[str, Callable[[Path], Source]] = {
    "Aircraft": _read_aircraft, "Caltech101": _read_caltech101, "CIFAR100": _read_cifar100, "DTD": _read_dtd,
    "EuroSAT": _read_eurosat, "Flowers": _read_flowers, "Food": _read_food, "MNIST": _read_mnist,
    "OxfordPet": _read_pet, "StanfordCars": _read_cars, "SUN397": _read_sun397,
}


def _check_folders(name: str, folder: Path, found: Sequence[str], expected: Sequence[str]) -> None:
    """The hand-written class names are aligned by position with these folders: they must be exactly those."""
    if list(found) == list(expected):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    what = f"missing class folder {folder / missing[0]}" if missing else f"unexpected folder {folder / extra[0]}"
    raise UserError(f"{name}: {what} ({len(missing)} missing, {len(extra)} unexpected of the {len(expected)} "
                    f"expected); the class names are aligned with torchvision's folder order, so the tree must "
                    f"hold exactly those folders")


def _check_same_classes(name: str, top: Path, train: Sequence[str], test: Sequence[str]) -> None:
    """torchvision derives these classes per split; a label is only meaningful if both splits agree."""
    if list(train) != list(test):
        raise UserError(f"{name}: the train and test splits list different classes ({len(train)} vs {len(test)}); "
                        f"the annotation files under {top} are incomplete, re-extract the dataset there")


def read_source(root: Path, name: str) -> Source:
    """Read dataset ``name`` through its torchvision class; any failure is one line naming it and its path."""
    problem = layout_problem(root, name)
    if problem:
        raise UserError(problem)
    top = LAYOUTS[name].path(root)
    try:
        source = READERS[name](root)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"{name}: torchvision needs the package {exc.name or '?'} to read {top}; install it "
                        f"(pip install {exc.name or 'scipy'})") from None
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, EOFError, AssertionError,
            UnicodeDecodeError, pickle.UnpicklingError) as exc:
        raise UserError(f"{name}: torchvision could not read {top} ({_reason(exc)}); re-extract the dataset "
                        f"there") from None
    if not source.classnames:
        raise UserError(f"{name}: no classes found under {top}; re-extract the dataset there")
    return source


# ----------------------------------------------------------------------------------------------------------
# Per-sample access without decoding: labels and file paths of a torchvision dataset.


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


class BadImageError(UserError):
    """An unreadable image. A DataLoader worker re-raises an error as ``type(exc)("Caught ... Original Traceback
    ...")``; this class keeps only the original one-line message then, so the CLI still prints one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image PIL can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def bad_image_message(name: str, file: str | None, exc: BaseException) -> str:
    """The one-line error for an unreadable image."""
    return (f"{name}: cannot read image {file or '(in-memory sample)'} ({_reason(exc)}); replace it with a good "
            "copy, or run with --set data.skip_bad_images=true to skip unreadable images")


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transform(spec: ImageSpec, augment: bool = False) -> T.Compose:
    """CLIP's preprocessing for ``spec``; ``augment`` = ZSCL's training crop (scale 0.9–1, no flip)."""
    bicubic = T.InterpolationMode.BICUBIC
    crop = ([T.RandomResizedCrop(spec.size, scale=(0.9, 1.0), interpolation=bicubic)] if augment
            else [T.Resize(spec.size, interpolation=bicubic), T.CenterCrop(spec.size)])
    return T.Compose([*crop, _to_rgb, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class ImageView(Dataset):
    """Lazy ``(image_tensor, label)`` pairs: chosen positions of a torchvision dataset, read on access."""

    def __init__(self, name: str, source: Dataset, positions: list[int], transform: Callable) -> None:
        self.name, self.source, self.positions, self.transform = name, source, list(positions), transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        position = self.positions[index]
        try:
            image, label = self.source[position]
            if isinstance(image, Image.Image):
                image.load()
        except READ_ERRORS as exc:
            files = dataset_files(self.source)
            raise BadImageError(bad_image_message(self.name, files[position] if files else None, exc)) from None
        return self.transform(image), int(label)

    def labels(self) -> list[int]:
        all_labels = dataset_labels(self.source)
        return [all_labels[p] for p in self.positions]

    def files(self) -> list[str] | None:
        all_files = dataset_files(self.source)
        return None if all_files is None else [all_files[p] for p in self.positions]


# ----------------------------------------------------------------------------------------------------------
# Few-shot picks and the bad-image scan.


def few_shot_positions(labels: Sequence[int], shots: int, seed: int = SPLIT_SEED,
                       exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The first ``shots`` indices of each label along ``torch.randperm(len(labels))`` seeded with ``seed``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    picks = []
    for i in order:
        if i in exclude or taken.get(labels[i], 0) >= shots:
            continue
        taken[labels[i]] = taken.get(labels[i], 0) + 1
        picks.append(i)
    return picks


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded (missing, not an image, truncated), or None if it decodes."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; the whole stream is still read
            image.load()
    except READ_ERRORS as exc:
        return _reason(exc)
    return None


def scan_images(files: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """Decode every file once (threads); returns ``{file: reason}`` for the unreadable ones."""
    if not files:
        return {}
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(image_problem, files, chunksize=64))
    return {f: r for f, r in zip(files, reasons, strict=True) if r is not None}


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


@dataclass
class Selection:
    """The positions a task uses after few-shot picking and bad-image skipping."""

    train: list[int]
    test: list[int]
    bad: dict[str, str] = field(default_factory=dict)  # file -> reason
    bad_train: int = 0
    bad_test: int = 0


def select_positions(source: Source, shots: int, skip_bad: bool) -> Selection:
    """Apply few-shot picking (train) and, if ``skip_bad``, drop unreadable images from both splits."""
    train_files, test_files = dataset_files(source.train), dataset_files(source.test)
    sel = Selection(list(source.train_positions), list(source.test_positions))
    if skip_bad and test_files is not None:
        bad = scan_images([test_files[p] for p in sel.test])
        sel.bad.update(bad)
        kept = [p for p in sel.test if test_files[p] not in bad]
        sel.bad_test, sel.test = len(sel.test) - len(kept), kept
    if shots <= 0:
        if skip_bad and train_files is not None:
            bad = scan_images([train_files[p] for p in sel.train if train_files[p] not in sel.bad])
            sel.bad.update(bad)
            kept = [p for p in sel.train if train_files[p] not in sel.bad]
            sel.bad_train, sel.train = len(sel.train) - len(kept), kept
        return sel
    all_labels = dataset_labels(source.train)
    labels = [all_labels[p] for p in sel.train]
    excluded: set[int] = set()
    checked: set[int] = set()
    while True:
        picks = few_shot_positions(labels, shots, exclude=excluded)
        if not (skip_bad and train_files is not None):
            break
        new = [i for i in picks if i not in checked]
        checked.update(new)
        bad = scan_images([train_files[sel.train[i]] for i in new])
        if not bad:
            break
        sel.bad.update(bad)
        excluded.update(i for i in new if train_files[sel.train[i]] in bad)
    sel.bad_train = len(excluded)
    sel.train = [sel.train[i] for i in picks]
    return sel


# ----------------------------------------------------------------------------------------------------------
# The benchmark.


def _task_names(cfg: RunConfig) -> list[str]:
    names = list(ORDERS[cfg.order])
    if cfg.data.num_tasks:
        if cfg.data.num_tasks > len(names):
            raise UserError(f"data.num_tasks={cfg.data.num_tasks}: MTIL has {len(names)} tasks; use 0 (all) or "
                            f"1..{len(names)}")
        names = names[: cfg.data.num_tasks]
    return names


def unusable_line(root: Path, bad: Sequence[tuple[str, Path | None, str]], total: int) -> str:
    """One line for the unusable datasets, each given as (name, the absent path or None, its problem line)."""
    if len(bad) == 1:
        return bad[0][2]
    if len(bad) == total and all(path == LAYOUTS[name].path(root) for name, path, _ in bad):
        return (f"none of the {total} MTIL datasets is under {root} (e.g. expected {bad[0][1]}); check --data-root "
                f"or {DATA_ROOT_ENV} ('clbench data check --data-root DIR' lists every expected path)")
    parts = [f"{name} ({'missing ' + str(path) if path else problem})" for name, path, problem in bad]
    return f"{len(bad)} of the {total} MTIL datasets are not usable under {root}: {'; '.join(parts)}"


def check_all_present(root: Path, names: Sequence[str]) -> None:
    """Raise one line for all absent or half-present datasets (nothing is read)."""
    bad = [(n, first_missing(root, n), layout_problem(root, n)) for n in names if layout_problem(root, n)]
    if bad:
        raise UserError(unusable_line(root, bad, len(names)))


def load_task(root: Path, name: str, data: DataConfig, train_transform: Callable, test_transform: Callable) -> Task:
    """One MTIL task: its splits (few-shot, bad images skipped if asked), class names and templates."""
    source = read_source(root, name)
    missing = missing_files(source)
    if missing and not data.skip_bad_images:
        raise UserError(f"{name}: incomplete: {len(missing)} listed image(s) are not on disk, e.g. {missing[0]}; "
                        f"re-extract the dataset into {LAYOUTS[name].path(root)} (or --set data.skip_bad_images=true)")
    sel = select_positions(source, data.shots, data.skip_bad_images)
    if not sel.train or not sel.test:
        split = "training" if not sel.train else "test"
        raise UserError(f"{name}: no usable {split} images under {LAYOUTS[name].path(root)}; check the dataset")
    if sel.bad:
        log.warning("%s: skipped %d unreadable image(s) (train %d, test %d), e.g. %s", name, len(sel.bad),
                    sel.bad_train, sel.bad_test, next(iter(sel.bad)))
    layout = LAYOUTS[name]
    info = {"source": "mtil", "path": str(layout.path(root)), "train_split": layout.train_split,
            "test_split": layout.test_split, "n_train": len(sel.train), "n_test": len(sel.test),
            "n_classes": len(source.classnames), "expected_classes": EXPECTED_CLASSES[name], "notes": source.notes}
    if data.shots:
        info["shots"] = data.shots
        info["n_train_full"] = len(source.train_positions)
    if sel.bad:
        info["bad_images"] = {"train": sel.bad_train, "test": sel.bad_test, "files": dict(list(sel.bad.items())[:20])}
    templates = templates_for(name, data.prompt)
    train = ImageView(name, source.train, sel.train, train_transform)
    test = ImageView(name, source.test, sel.test, test_transform)
    return Task(name, list(source.classnames), templates, train, test, info)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any model is loaded, if the data root or a dataset's files are absent (nothing is read)."""
    check_all_present(resolve_data_root(cfg.data_root), _task_names(cfg))


def build_mtil(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The MTIL task sequence in ``cfg.order`` from the datasets under the data root (see module docstring)."""
    root = resolve_data_root(cfg.data_root)
    names = _task_names(cfg)
    check_all_present(root, names)
    test_transform = clip_transform(spec)
    train_transform = clip_transform(spec, augment=cfg.data.train_augment)
    tasks = [load_task(root, name, cfg.data, train_transform, test_transform) for name in names]
    bad = {t.name: {k: v for k, v in t.info["bad_images"].items() if k != "files"}
           for t in tasks if "bad_images" in t.info}
    info = {
        "data_root": str(root),
        "order": names,
        "prompt_policy": cfg.data.prompt,
        "templates": "KeepLoRA order (first template everywhere)" if cfg.data.prompt == "first"
                     else "ZSCL order (train on the first, evaluate the ensemble)",
        "split_seed": SPLIT_SEED,
        "splits": {t.name: {"train": t.info["train_split"], "test": t.info["test_split"],
                            "n_train": t.info["n_train"], "n_test": t.info["n_test"],
                            "n_classes": t.info["n_classes"]} for t in tasks},
        "sun397_order": SUN397_ORDER_NOTE,
        "integrity": "CIFAR100/Flowers102 md5 checks replaced by existence checks",
        "train_augment": "ZSCL RandomResizedCrop(scale=(0.9, 1.0), bicubic)" if cfg.data.train_augment else "none",
        "shots": cfg.data.shots,
        "few_shot": (f"first {cfg.data.shots} per class in the seed-{SPLIT_SEED} randperm of the training split; "
                     "full test sets") if cfg.data.shots else "off (full training sets)",
        "skip_bad_images": cfg.data.skip_bad_images,
        "bad_images": bad,
        "bad_images_total": sum(v["train"] + v["test"] for v in bad.values()),
    }
    return Benchmark("mtil", cfg.order, tasks, info)


# ----------------------------------------------------------------------------------------------------------
# ``clbench data check``.


@dataclass
class DatasetStatus:
    """What ``clbench data check`` reports for one dataset."""

    name: str
    path: Path
    usable: bool
    problem: str = ""
    n_train: int | None = None
    n_test: int | None = None
    n_classes: int | None = None
    expected_classes: int = 0
    missing: Path | None = None  # the exact path that is absent, if that is the problem


def inspect_dataset(root: Path, name: str) -> DatasetStatus:
    """Read dataset ``name`` (indexes only; images are checked for existence, not decoded)."""
    status = DatasetStatus(name, LAYOUTS[name].path(root), False, expected_classes=EXPECTED_CLASSES[name],
                           missing=first_missing(root, name))
    try:
        source = read_source(root, name)
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


def inspect_mtil(root: Path, names: Sequence[str] = tuple(ORDERS[1])) -> list[DatasetStatus]:
    return [inspect_dataset(root, name) for name in names]
