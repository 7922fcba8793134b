"""MTIL task names, orders, class names and prompt templates as ZSCL's
and KeepLoRA's MTIL code define them (Thunderbeee/ZSCL ``mtil/src/datasets``, ``mtil/src/templates``;
MaolinLuo/KeepLoRA ``MTIL/``).

The class-name lists written by hand in the ZSCL/KeepLoRA loaders (Caltech101, EuroSAT, Flowers) and the
templates in KeepLoRA's order come from ``clbench/data/mtil_classnames_templates.json`` (a copy of the
shared facts file). The other datasets take their class names from the torchvision class, with ``_``
replaced by a space (the loaders' ``process_labels``).

Prompt policies:

- ``first`` (KeepLoRA): one template, KeepLoRA's first, for training and evaluation.
- ``ensemble`` (ZSCL): templates in ZSCL's order, so that training uses ZSCL's first template and
  evaluation averages all of them. ZSCL's order differs from KeepLoRA's for DTD, StanfordCars and
  SUN397 (KeepLoRA's first Cars template, ``a photo of the {}, a type of car.``, is not in ZSCL's list).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

NAMES_FILE = Path(__file__).resolve().parent.parent / "data" / "mtil_classnames_templates.json"

# Order I is alphabetical; Order II is ZSCL's permutation [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2] of it.
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]
ORDERS = {1: ORDER_I, 2: ORDER_II}

# Classes per dataset in the full datasets (torchvision's loaders); 1,201 in total.
EXPECTED_CLASSES = {"Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10, "Flowers": 102,
                    "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196, "SUN397": 397}

# torchvision's Caltech101 categories (sorted folder names without BACKGROUND_Google); the hand-written
# names are aligned to this order by position, so a tree with other folders would mislabel every class.
CALTECH101_FOLDERS = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant", "barrel", "bass",
    "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car_side",
    "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face", "crab", "crayfish",
    "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar",
    "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk",
    "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline_skate",
    "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly",
    "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion",
    "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus", "stop_sign", "strawberry",
    "sunflower", "tick", "trilobite", "umbrella", "watch", "water_lilly", "wheelchair", "wild_cat", "windsor_chair",
    "wrench", "yin_yang",
)

# torchvision's EuroSAT classes (sorted ImageFolder folders), aligned with the hand-written names.
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")

# ZSCL's template order where it differs from KeepLoRA's (ZSCL's ``mtil/src/datasets/collections.py``).
ZSCL_TEMPLATES = {
    "DTD": [f"a photo of {a} {{}} {kind}." for a in ("a", "the") for kind in ("texture", "pattern", "thing", "object")],
    "StanfordCars": ["a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.", "a photo of my {}.",
                     "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                     "a photo of my old {}."],
    "SUN397": ["a photo of a {}.", "a photo of the {}."],
}


@cache
def _facts() -> dict:
    return json.loads(NAMES_FILE.read_text())


def templates_for(name: str, policy: str = "first") -> list[str]:
    """Templates of dataset ``name``: KeepLoRA's order for ``first``, ZSCL's order for ``ensemble``."""
    if policy == "ensemble" and name in ZSCL_TEMPLATES:
        return list(ZSCL_TEMPLATES[name])
    return list(_facts()[name]["templates"])


def handwritten_classnames(name: str) -> list[str] | None:
    """The hand-written class names of the ZSCL/KeepLoRA loader, or ``None`` where torchvision's are used."""
    names = _facts()[name].get("classnames")
    return list(names) if names else None


def process_label(label: str) -> str:
    """The loaders' ``process_labels``: underscores become spaces (e.g. ``aquarium_fish``)."""
    return label.replace("_", " ")
