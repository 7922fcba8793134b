"""A tiny fake X-TAIL tree in the CoOp layout of the LADA README, for all 10 domains.

Each CoOp domain gets a few classes of tiny JPEGs and a real ``split_zhou_*.json`` (``train``/``val``/``test``
lists of ``[relative_image_path, label, classname]``); Aircraft gets ``variants.txt`` and the
``images_variant_{train,val,test}.txt`` lists; MNIST gets the four idx files under ``MNIST/MNIST/raw``.

Built in for the tests: ``lotus`` in caltech101 and flowers, ``pizza`` in caltech101 and food101, and
``sunflower``/``Sunflower`` (case differs) in caltech101 and flowers; dtd's first class has 18 training
images (a 16-shot draw without replacement), every other class fewer than 16 (a draw with replacement).

``build_fake_xtail(root)`` returns a :class:`FakeXTail` with what each domain should show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fake_mtil import MNIST_CLASSES, _image, _write, write_aircraft_lists, write_mnist_raw


@dataclass
class FakeDomain:
    """What was written for one domain: split sizes, the names the reader should produce, per-class train counts."""

    folder: str
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    classnames: list[str] = field(default_factory=list)
    train_per_class: list[int] = field(default_factory=list)
    image_files: list[Path] = field(default_factory=list)


@dataclass
class FakeXTail:
    root: Path
    domains: dict[str, FakeDomain]


# (folder, image dir under the folder, split file, JSON class names, train images per class)
COOP = {
    "caltech101": ("Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   ["lotus", "pizza", "sunflower"], [3, 2, 2]),
    "dtd": ("DTD", "images", "split_zhou_DescribableTextures.json", ["banded", "blotchy", "zigzagged"], [18, 2, 1]),
    "eurosat": ("EuroSAT", "2750", "split_zhou_EuroSAT.json", ["Annual Crop Land", "Forest", "Sea or Lake"],
                [2, 2, 2]),
    "flowers": ("Flowers", "jpg", "split_zhou_OxfordFlowers.json", ["pink primrose", "lotus", "Sunflower"], [2, 3, 2]),
    "food101": ("Food", "images", "split_zhou_Food101.json", ["apple_pie", "pizza", "waffles"], [2, 2, 3]),
    "oxford_pets": ("Pets", "images", "split_zhou_OxfordPets.json", ["abyssinian", "american_bulldog", "bengal"],
                    [2, 2, 2]),
    "stanford_cars": ("StanfordCars", "", "split_zhou_StanfordCars.json",
                      ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"],
                      [2, 2, 2]),
    "sun397": ("Sun397", "SUN397", "split_zhou_SUN397.json", ["abbey", "apartment_building/outdoor", "bakery/shop"],
               [2, 3, 2]),
}
EUROSAT_FOLDERS = {"Annual Crop Land": "AnnualCrop", "Forest": "Forest", "Sea or Lake": "SeaLake"}


def _expected_name(domain: str, name: str) -> str:
    return (name + " satellite location" if domain == "eurosat" else name).replace("_", " ")


def fake_coop(root: Path, domain: str, seed: int) -> FakeDomain:
    """One CoOp domain: images in class folders and its split file (val and test: one image per class)."""
    folder, image_dir, split_file, names, per_class = COOP[domain]
    top = root / folder
    images = top / image_dir if image_dir else top
    out = FakeDomain(folder, classnames=[_expected_name(domain, c) for c in names], train_per_class=list(per_class))
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    k = 0
    for part in ("train", "val", "test"):
        for label, name in enumerate(names):
            count = per_class[label] if part == "train" else 1
            cars = "cars_test" if part == "test" else "cars_train"  # CoOp's Cars paths: cars_{train,test}/NAME
            sub = {"eurosat": EUROSAT_FOLDERS.get(name, name), "stanford_cars": cars}
            class_dir = sub.get(domain, name.replace("/", "_"))
            for _ in range(count):
                k += 1
                rel = f"{class_dir}/{domain}_{k:04d}.jpg"
                out.image_files.append(_image(images / rel, seed + k))
                split[part].append([rel, label, name])
    _write(top / split_file, json.dumps(split, indent=1))
    out.n_train, out.n_val, out.n_test = len(split["train"]), len(split["val"]), len(split["test"])
    return out


def fake_aircraft(root: Path) -> FakeDomain:
    variants = ["707-320", "Cessna 172", "F-16A/B"]
    files = write_aircraft_lists(root / "Aircraft", variants, {"train": 2, "val": 1, "test": 1})
    return FakeDomain("Aircraft", n_train=2 * len(variants), n_val=len(variants), n_test=len(variants),
                      classnames=list(variants), train_per_class=[2, 2, 2], image_files=files)


def fake_mnist(root: Path) -> FakeDomain:
    """torchvision's MNIST(root/MNIST) reads root/MNIST/MNIST/raw: two training and one test image per digit."""
    write_mnist_raw(root / "MNIST" / "MNIST" / "raw")
    return FakeDomain("MNIST", n_train=20, n_test=10, classnames=[f'number: "{c}"' for c in MNIST_CLASSES],
                      train_per_class=[2] * 10)


def build_fake_xtail(root: Path) -> FakeXTail:
    """Write all 10 fake domains under ``root`` (about 150 tiny images)."""
    root.mkdir(parents=True, exist_ok=True)
    domains = {"aircraft": fake_aircraft(root)}
    for i, domain in enumerate(COOP):
        domains[domain] = fake_coop(root, domain, 10000 * (i + 1))
    domains["mnist"] = fake_mnist(root)
    return FakeXTail(root, domains)
