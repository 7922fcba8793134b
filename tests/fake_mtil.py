"""Tiny fake MTIL trees in the exact on-disk layouts that torchvision's dataset classes read.

As torchvision's own dataset tests do, each dataset gets a handful of small images plus the meta files its
class parses (.txt lists, .json, pickles, idx files, .mat files written with scipy). Class counts are kept
small where the loader allows; Caltech101 and EuroSAT need all their folders, because the hand-written
class names are aligned with them by position.

``build_fake_mtil(root)`` returns a :class:`FakeTree` with the numbers each dataset should show.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clbench.datasets.mtil_names import CALTECH101_FOLDERS, EUROSAT_FOLDERS


@dataclass
class FakeDataset:
    """What was written for one dataset: split sizes (or the total of an unsplit one) and class names."""

    n_train: int = 0
    n_test: int = 0
    n_total: int = 0  # unsplit datasets (Caltech101, EuroSAT, SUN397): cut 80/20 by the loader
    classnames: list[str] = field(default_factory=list)  # the names the loader should produce
    image_files: list[Path] = field(default_factory=list)


@dataclass
class FakeTree:
    root: Path
    datasets: dict[str, FakeDataset]


def _image(path: Path, seed: int, size: tuple[int, int] = (10, 8)) -> Path:
    """A tiny JPEG whose colour depends on ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _mat(path: Path, contents: dict) -> None:
    """A MATLAB file (scipy writes the format torchvision reads with ``scipy.io.loadmat``)."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, contents)


def write_aircraft_lists(data: Path, variants: list[str], per_class: dict[str, int]) -> list[Path]:
    """FGVC-Aircraft's files under ``data``: ``variants.txt``, and per split ``per_class[split]`` images of each
    variant (``images/<id>.jpg``) listed in ``images_variant_<split>.txt``; returns the images in order."""
    _write(data / "variants.txt", "".join(v + "\n" for v in variants))
    files = []
    image_id = 1000000
    for split, count in per_class.items():
        lines = []
        for v in variants:
            for _ in range(count):
                image_id += 1
                files.append(_image(data / "images" / f"{image_id}.jpg", image_id))
                lines.append(f"{image_id} {v}\n")
        _write(data / f"images_variant_{split}.txt", "".join(lines))
    return files


def fake_aircraft(root: Path) -> FakeDataset:
    variants = ["707-320", "A300B4", "F-16A/B"]
    files = write_aircraft_lists(root / "fgvc-aircraft-2013b" / "data", variants, {"train": 2, "test": 1})
    return FakeDataset(n_train=2 * len(variants), n_test=len(variants), classnames=list(variants), image_files=files)


def fake_caltech101(root: Path, names: list[str]) -> FakeDataset:
    base = root / "caltech101" / "101_ObjectCategories"
    _image(base / "BACKGROUND_Google" / "image_0001.jpg", 1)
    out = FakeDataset(classnames=list(names))
    for i, folder in enumerate(CALTECH101_FOLDERS):
        count = 3 if i < 3 else 1
        for k in range(1, count + 1):
            out.image_files.append(_image(base / folder / f"image_{k:04d}.jpg", 100 * i + k))
        out.n_total += count
    return out


def fake_cifar100(root: Path) -> FakeDataset:
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    fine = ["apple", "aquarium_fish", "maple_tree", "baby"]
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": ["fruit"]}, f)
    out = FakeDataset(classnames=[c.replace("_", " ") for c in fine])
    for split, per_class in (("train", 3), ("test", 2)):
        labels = [c for c in range(len(fine)) for _ in range(per_class)]
        # every image one flat colour (value 10*i+label) so a test can check the normalisation exactly
        data = np.stack([np.full(3072, (10 * i + lab) % 256, dtype=np.uint8) for i, lab in enumerate(labels)])
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    out.n_train, out.n_test = 3 * len(fine), 2 * len(fine)
    return out


def fake_dtd(root: Path) -> FakeDataset:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    out = FakeDataset(classnames=list(classes))
    (base / "imdb").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for c in classes:
            for _ in range(per_class):
                k += 1
                out.image_files.append(_image(base / "images" / c / f"{c}_{k:04d}.jpg", 7000 + k))
                lines.append(f"{c}/{c}_{k:04d}.jpg\n")
        _write(base / "labels" / f"{split}1.txt", "".join(lines))
    out.n_train, out.n_test = 2 * len(classes), len(classes)
    return out


def fake_eurosat(root: Path, names: list[str]) -> FakeDataset:
    base = root / "eurosat" / "2750"
    out = FakeDataset(classnames=list(names))
    for i, folder in enumerate(EUROSAT_FOLDERS):
        for k in range(1, 3):
            out.image_files.append(_image(base / folder / f"{folder}_{k}.jpg", 5000 + 10 * i + k))
            out.n_total += 1
    return out


def fake_flowers(root: Path, names: list[str]) -> FakeDataset:
    base = root / "flowers-102"
    labels = [1, 1, 2, 2, 3, 3, 1, 2, 3, 1, 2, 3]  # 1-based, three of the 102 classes
    for i in range(1, len(labels) + 1):
        _image(base / "jpg" / f"image_{i:05d}.jpg", 9000 + i)
    _mat(base / "imagelabels.mat", {"labels": np.array([labels])})
    _mat(base / "setid.mat", {"trnid": np.array([[1, 3, 5]]), "valid": np.array([[2, 4, 6]]),
                                 "tstid": np.array([[7, 8, 9, 10, 11, 12]])})
    return FakeDataset(n_train=3, n_test=6, classnames=list(names),
                       image_files=[base / "jpg" / f"image_{i:05d}.jpg" for i in range(1, len(labels) + 1)])


def fake_food(root: Path) -> FakeDataset:
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "waffles"]
    out = FakeDataset(classnames=[c.replace("_", " ") for c in classes])
    k = 0
    for split, per_class in (("train", 2), ("test", 1)):
        meta = {}
        for c in classes:
            ids = []
            for _ in range(per_class):
                k += 1
                out.image_files.append(_image(base / "images" / c / f"{100000 + k}.jpg", 3000 + k))
                ids.append(f"{c}/{100000 + k}")
            meta[c] = ids
        _write(base / "meta" / f"{split}.json", json.dumps(meta))
    out.n_train, out.n_test = 2 * len(classes), len(classes)
    return out


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, uint8 type 8, ndim), big-endian dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine"]


def write_mnist_raw(raw: Path) -> None:
    """The four MNIST idx files under ``raw``: two random training images and one test image per digit."""
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 2), ("t10k", 1)):
        labels = np.repeat(np.arange(10), per_class)
        _idx(raw / f"{prefix}-images-idx3-ubyte", (rng.random((len(labels), 28, 28)) * 255).astype(np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def fake_mnist(root: Path) -> FakeDataset:
    write_mnist_raw(root / "MNIST" / "raw")
    return FakeDataset(n_train=20, n_test=10, classnames=list(MNIST_CLASSES))


def fake_pet(root: Path) -> FakeDataset:
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]  # (image prefix, class id, species)
    out = FakeDataset(classnames=["Abyssinian", "American Bulldog", "Bengal"])
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, per_class in (("trainval", 2), ("test", 1)):
        lines = []
        for prefix, cls, species in breeds:
            for _ in range(per_class):
                k += 1
                out.image_files.append(_image(base / "images" / f"{prefix}_{k}.jpg", 4000 + k))
                lines.append(f"{prefix}_{k} {cls} {species} 1\n")
        _write(base / "annotations" / f"{split}.txt", "".join(lines))
    out.n_train, out.n_test = 2 * len(breeds), len(breeds)
    return out


def fake_cars(root: Path) -> FakeDataset:
    base = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
    _mat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    out = FakeDataset(classnames=list(names))
    for split, per_class, mat in (("train", 2, base / "devkit" / "cars_train_annos.mat"),
                                  ("test", 1, base / "cars_test_annos_withlabels.mat")):
        rows = []
        for cls in range(1, len(names) + 1):
            for _ in range(per_class):
                fname = f"{len(rows) + 1:05d}.jpg"
                out.image_files.append(_image(base / f"cars_{split}" / fname, 6000 + 10 * cls + len(rows)))
                rows.append((1, 1, 8, 6, cls, fname))
        fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
        annos = np.array([rows], dtype=[(f, object) for f in fields])
        _mat(mat, {"annotations": annos})
    out.n_train, out.n_test = 2 * len(names), len(names)
    return out


def fake_sun397(root: Path) -> FakeDataset:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    _write(base / "ClassName.txt", "".join(c + "\n" for c in classes))
    out = FakeDataset(classnames=["abbey", "apartment building/outdoor", "bakery/shop"])
    for i, c in enumerate(classes):
        for k in range(4):
            out.image_files.append(_image(base / c.lstrip("/") / f"sun_{chr(97 + k)}{i}x.jpg", 8000 + 10 * i + k))
            out.n_total += 1
    return out


def build_fake_mtil(root: Path) -> FakeTree:
    """Write all 11 fake datasets under ``root`` (about 250 tiny images)."""
    from clbench.datasets.mtil_names import handwritten_classnames

    root.mkdir(parents=True, exist_ok=True)
    datasets = {
        "Aircraft": fake_aircraft(root),
        "Caltech101": fake_caltech101(root, handwritten_classnames("Caltech101")),
        "CIFAR100": fake_cifar100(root),
        "DTD": fake_dtd(root),
        "EuroSAT": fake_eurosat(root, handwritten_classnames("EuroSAT")),
        "Flowers": fake_flowers(root, handwritten_classnames("Flowers")),
        "Food": fake_food(root),
        "MNIST": fake_mnist(root),
        "OxfordPet": fake_pet(root),
        "StanfordCars": fake_cars(root),
        "SUN397": fake_sun397(root),
    }
    return FakeTree(root, datasets)
