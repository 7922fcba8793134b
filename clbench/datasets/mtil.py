"""The real MTIL benchmark: 11 torchvision datasets over the ZSCL/KeepLoRA on-disk layout
(Thunderbeee/ZSCL ``mtil/src/datasets``, MaolinLuo/KeepLoRA ``MTIL/MTIL_datasets``).

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
Each sample is preprocessed as open_clip does for the backbone's pretrained tag (:func:`clip_transform`: mean/std,
interpolation and resize mode from the tag's config; OpenAI's Resize(bicubic) → CenterCrop → RGB → ToTensor →
Normalize by default); with
``data.train_augment`` training images use ZSCL's RandomResizedCrop(scale 0.9–1, bicubic) instead.

Few-shot (``data.shots`` = K > 0, as in MoE-Adapters4CL, JiazuoYu/MoE-Adapters4CL): the first K training images of
each class in the seed-42 permutation of the training split (``torch.randperm``); MoE-Adapters walks its shuffled
loader instead and freezes the augmented tensors, so the picks are the same rule, not the same images. Test sets
stay full.

Unreadable images stop the run with the file named, unless ``data.skip_bad_images``: then every image that
will be used is decoded once up front (in threads), and the unreadable or missing ones are dropped after the
split (so the other images keep their split) and counted in ``Benchmark.info["bad_images"]``.

``data.num_tasks`` cuts the sequence to its first tasks, or ``data.datasets`` (``--datasets mnist,eurosat``) picks
datasets in an order of the user's (:mod:`clbench.datasets.sequence`). A dataset whose class count differs from
the protocol's (:data:`EXPECTED_CLASSES`) is refused unless ``data.allow_incomplete`` (``--allow-incomplete``);
``Benchmark.info["splits"]`` records both counts. ``data.train_per_class``/``test_per_class`` are for the
synthetic benchmark only (MTIL uses the full splits).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from clbench.datasets.base import Benchmark, ImageSpec, Task
from clbench.datasets.datacheck import DATA_ROOT_ENV, DatasetStatus, LayoutCheck
from clbench.datasets.mtil_names import (
    CALTECH101_FOLDERS,
    EUROSAT_FOLDERS,
    EXPECTED_CLASSES,
    ORDERS,
    handwritten_classnames,
    process_label,
    templates_for,
)
from clbench.datasets.selection import (
    READ_ERRORS,
    Draw,
    Selection,
    Source,
    bad_images_summary,
    dataset_files,
    dataset_labels,
    read_error_reason,
    select_task,
)
from clbench.datasets.sequence import task_sequence
from clbench.errors import UserError

if TYPE_CHECKING:  # annotations only: the data layer never imports the configuration layer at run time
    from clbench.config import DataConfig, RunConfig

SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
SUN397_ORDER_NOTE = ("SUN397 file list sorted by path before the split (ZSCL/KeepLoRA split torchvision's "
                     "Path.rglob order, which depends on the filesystem)")


# ----------------------------------------------------------------------------------------------------------
# Layouts: what torchvision reads under the root, per dataset (torchvision's dataset classes).


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
    from clbench.storage.safeio import check_path
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
    root = check_path(raw.expanduser().absolute(), f"data root (from {source})")
    if not root.is_dir():
        raise UserError(f"data root {root} (from {source}) does not exist or is not a folder; point it at "
                        f"{_ROOT_CONTENTS.get(benchmark, 'the folder holding its datasets')}")
    return root


# ----------------------------------------------------------------------------------------------------------
# Reading the torchvision classes.


class _CIFAR100(tvd.CIFAR100):
    """torchvision's CIFAR100 with existence checks in place of its md5 checks, reading its pickled files with
    a restricted unpickler (:mod:`clbench.datasets.safe_pickle`): a planted file cannot run code."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {"filename": "meta", "key": "fine_label_names", "md5": None}

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None,
                 download: bool = False) -> None:  # torchvision's own __init__ calls pickle.load
        import numpy as np

        from clbench.datasets import safe_pickle

        if download:
            raise ValueError("clbench never downloads datasets")
        tvd.VisionDataset.__init__(self, str(root), transform=transform)
        self.train = train
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted")
        data, self.targets = [], []
        for file_name, _ in self.train_list if train else self.test_list:
            entry = safe_pickle.load(os.path.join(self.root, self.base_folder, file_name))
            data.append(entry["data"])
            self.targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision
        meta = safe_pickle.load(os.path.join(self.root, self.base_folder, self.meta["filename"]))
        self.classes = meta[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _Flowers102(tvd.Flowers102):
    """torchvision's Flowers102 with existence checks in place of its md5 checks of the two .mat files."""

    _file_dict = {"image": ("102flowers.tgz", None), "label": ("imagelabels.mat", None),
                  "setid": ("setid.mat", None)}


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
    problem = CHECK.problem(root, name)
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
        raise UserError(f"{name}: torchvision could not read {top} ({read_error_reason(exc)}); re-extract the dataset "
                        f"there") from None
    if not source.classnames:
        raise UserError(f"{name}: no classes found under {top}; re-extract the dataset there")
    return source


CHECK = LayoutCheck("MTIL", "torchvision", "clbench data check --data-root DIR", LAYOUTS, EXPECTED_CLASSES,
                    read_source)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and lazy image access.


class BadImageError(UserError):
    """An unreadable image. A DataLoader worker re-raises an error as ``type(exc)("Caught ... Original Traceback
    ...")``; this class keeps only the original one-line message then, so the CLI still prints one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


SKIP_HINT = "replace it with a good copy, or run with --skip-bad-images to skip unreadable images"


def bad_image_message(name: str, file: str | None, exc: BaseException, fix: str = SKIP_HINT) -> str:
    """The one-line error for an unreadable image (every image reader of clbench uses it)."""
    return f"{name}: cannot read image {file or '(in-memory sample)'} ({read_error_reason(exc)}); {fix}"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transform(spec: ImageSpec, augment: bool = False) -> T.Compose:
    """The backbone's preprocessing for ``spec``, as open_clip's evaluation transform (``image_transform`` with
    ``is_train=False``): resize by ``spec.resize_mode`` with ``spec.interpolation``, RGB, tensor, normalise.

    ``augment`` = ZSCL's training crop (``RandomResizedCrop`` scale 0.9–1, bicubic, no flip), in place of the
    resize; bicubic whatever the tag says, as open_clip's own training transform."""
    size = spec.size
    interpolation = T.InterpolationMode.BILINEAR if spec.interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    if augment:
        crop = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    elif spec.resize_mode == "squash":
        crop = [T.Resize((size, size), interpolation=interpolation)]
    elif spec.resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        crop = [ResizeKeepRatio(size, interpolation=interpolation, longest=1),
                CenterCropOrPad(size, fill=spec.fill_color)]
    elif spec.resize_mode == "shortest":
        crop = [T.Resize(size, interpolation=interpolation), T.CenterCrop(size)]
    else:
        raise UserError(f"resize mode {spec.resize_mode!r} is not one of shortest, squash, longest; fix the "
                        "preprocess_cfg of the backbone's open_clip config")
    return T.Compose([*crop, _to_rgb, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class ImageView(Dataset):
    """Lazy ``(image_tensor, label)`` pairs: chosen positions of a torchvision dataset, read on access."""

    def __init__(self, name: str, source: Dataset, positions: list[int], transform: Callable,
                 fix: str = SKIP_HINT) -> None:
        self.name, self.source, self.positions, self.transform = name, source, list(positions), transform
        self.fix = fix  # what the error tells the user to do about an unreadable image

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
            raise BadImageError(bad_image_message(self.name, files[position] if files else None, exc,
                                                  self.fix)) from None
        return self.transform(image), int(label)

    def labels(self) -> list[int]:
        all_labels = dataset_labels(self.source)
        return [all_labels[p] for p in self.positions]

    def files(self) -> list[str] | None:
        all_files = dataset_files(self.source)
        return None if all_files is None else [all_files[p] for p in self.positions]


def task_from_selection(source: Source, sel: Selection, templates: list[str], info: dict, train_transform: Callable,
                        test_transform: Callable) -> Task:
    """The task over ``sel``'s positions of ``source`` (lazy image views); skipped images are added to ``info``."""
    if sel.bad:
        info["bad_images"] = sel.bad_images_info()
    train = ImageView(source.name, source.train, sel.train, train_transform)
    test = ImageView(source.name, source.test, sel.test, test_transform)
    return Task(source.name, list(source.classnames), templates, train, test, info)


# ----------------------------------------------------------------------------------------------------------
# Few-shot picks.


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


def few_shot_draw(shots: int) -> Draw | None:
    """The few-shot rule as a :data:`~clbench.datasets.selection.Draw` (None for 0: the whole training split)."""
    if shots <= 0:
        return None
    return lambda labels, excluded: few_shot_positions(labels, shots, exclude=excluded)


# ----------------------------------------------------------------------------------------------------------
# The benchmark.


def _task_names(cfg: RunConfig) -> list[str]:
    return task_sequence(ORDERS[cfg.order], cfg.data.datasets, cfg.data.num_tasks, "mtil")


ALLOW_INCOMPLETE_FLAG = "--allow-incomplete"


def class_count_problem(name: str, found: int, expected: int) -> str | None:
    """One line when dataset ``name`` has another number of classes than the protocol's (a partial copy): its
    numbers would not be MTIL's, so it is refused unless the user accepts it; None when the counts agree."""
    if found == expected:
        return None
    return (f"{name}: {found} classes found, the protocol has {expected}; complete the dataset, or pass "
            f"{ALLOW_INCOMPLETE_FLAG} to use it as it is (both counts are recorded in the run's manifest)")


def unusable_line(root: Path, bad: Sequence[tuple[str, Path | None, str]], total: int) -> str:
    """One line for the unusable datasets, each given as (name, the absent path or None, its problem line)."""
    return CHECK.unusable_line(root, bad, total)


def load_task(root: Path, name: str, data: DataConfig, train_transform: Callable, test_transform: Callable) -> Task:
    """One MTIL task: its splits (few-shot, bad images skipped if asked), class names and templates."""
    source, layout = read_source(root, name), LAYOUTS[name]
    problem = class_count_problem(name, len(source.classnames), EXPECTED_CLASSES[name])
    if problem and not data.allow_incomplete:
        raise UserError(problem)
    sel = select_task(source, layout.path(root), data, few_shot_draw(data.shots))
    info = {"source": "mtil", "path": str(layout.path(root)), "train_split": layout.train_split,
            "test_split": layout.test_split, "n_train": len(sel.train), "n_test": len(sel.test),
            "n_classes": len(source.classnames), "expected_classes": EXPECTED_CLASSES[name], "notes": source.notes}
    if data.shots:
        info["shots"] = data.shots
        info["n_train_full"] = len(source.train_positions)
    return task_from_selection(source, sel, templates_for(name, data.prompt), info, train_transform, test_transform)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any model is loaded, if the data root or a dataset's files are absent (nothing is read)."""
    CHECK.check_all_present(resolve_data_root(cfg.data_root), _task_names(cfg))


def build_mtil(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The MTIL task sequence in ``cfg.order`` from the datasets under the data root (see module docstring)."""
    root = resolve_data_root(cfg.data_root)
    names = _task_names(cfg)
    CHECK.check_all_present(root, names)
    test_transform = clip_transform(spec)
    train_transform = clip_transform(spec, augment=cfg.data.train_augment)
    tasks = [load_task(root, name, cfg.data, train_transform, test_transform) for name in names]
    info = {
        "data_root": str(root),
        "order": names,
        "prompt_policy": cfg.data.prompt,
        "templates": "KeepLoRA order (first template everywhere)" if cfg.data.prompt == "first"
                     else "ZSCL order (train on the first, evaluate the ensemble)",
        "split_seed": SPLIT_SEED,
        "splits": {t.name: {"train": t.info["train_split"], "test": t.info["test_split"],
                            "n_train": t.info["n_train"], "n_test": t.info["n_test"],
                            "n_classes": t.info["n_classes"], "expected_classes": t.info["expected_classes"]}
                   for t in tasks},
        "selection": cfg.data.datasets.split(",") if cfg.data.datasets else "the order's sequence",
        "allow_incomplete": cfg.data.allow_incomplete,
        "sun397_order": SUN397_ORDER_NOTE,
        "integrity": "CIFAR100/Flowers102 md5 checks replaced by existence checks",
        "train_augment": "ZSCL RandomResizedCrop(scale=(0.9, 1.0), bicubic)" if cfg.data.train_augment else "none",
        "shots": cfg.data.shots,
        "few_shot": (f"first {cfg.data.shots} per class in the seed-{SPLIT_SEED} randperm of the training split; "
                     "full test sets") if cfg.data.shots else "off (full training sets)",
        **bad_images_summary(cfg.data.skip_bad_images, tasks),
    }
    return Benchmark("mtil", cfg.order, tasks, info)


# ----------------------------------------------------------------------------------------------------------
# ``clbench data check``.


def inspect_mtil(root: Path, names: Sequence[str] = tuple(ORDERS[1]),
                 allow_incomplete: bool = False) -> list[DatasetStatus]:
    """The status of every MTIL dataset under ``root`` (indexes only; images are checked for existence). A
    dataset with another class count than the protocol's is not usable unless ``allow_incomplete``."""
    statuses = CHECK.inspect_all(root, names)
    for status in statuses:
        if status.usable and status.n_classes is not None and not allow_incomplete:
            problem = class_count_problem(status.name, status.n_classes, status.expected_classes)
            if problem:
                status.usable, status.problem = False, problem
    return statuses
