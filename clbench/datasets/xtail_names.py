"""X-TAIL domain names, orders, on-disk folders and class-name rules, as RAIL's and LADA's code define them
(linghan1997/Regression-based-Analytic-Incremental-Learning ``scenario_datasets/``, MaolinLuo/LADA ``configs/data``).

Names in code are RAIL's and LADA's ``dataset_list`` keys. Folders are those of the CoOp layout in the
LADA README (``Aircraft``, ``Caltech101``, ``DTD``, ``EuroSAT``, ``Flowers``, ``Food``, ``MNIST/MNIST/raw``,
``Pets``, ``StanfordCars``, ``Sun397``). Class names come from the split files, except:

- aircraft: ``variants.txt``, one name a line, in file order (the official FGVC split, not a CoOp JSON);
- eurosat: CoOp's new names (``AnnualCrop`` → ``Annual Crop Land``; CoOp's split file already holds them, a
  folder-style name is remapped here too), then `` satellite location`` appended, as both RAIL's and LADA's
  EuroSAT loaders do before the names reach the text encoder;
- mnist: torchvision's ``MNIST.classes`` written ``number: "0 - zero"`` (LADA's MNIST loader).

Every name then has ``_`` replaced by a space, as LADA does when it builds the prompts (CoOp's Food101 split
file holds e.g. ``apple_pie``).
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE = "a photo of a {}."  # the one template of every domain at training and test (RAIL/LADA code)

# Order I is alphabetical (RAIL's yaml, LADA's TAIL.yaml); Order II is LADA's TAIL_order2.yaml.
ORDER_I = ["aircraft", "caltech101", "dtd", "eurosat", "flowers", "food101", "mnist", "oxford_pets",
           "stanford_cars", "sun397"]
ORDER_II = ["stanford_cars", "aircraft", "oxford_pets", "food101", "sun397", "mnist", "flowers", "dtd",
            "caltech101", "eurosat"]
ORDERS = {1: ORDER_I, 2: ORDER_II}

# Classes per domain on the full data (RAIL/LADA split files); 1,100 in total.
EXPECTED_CLASSES = {"aircraft": 100, "caltech101": 100, "dtd": 47, "eurosat": 10, "flowers": 102, "food101": 101,
                    "mnist": 10, "oxford_pets": 37, "stanford_cars": 196, "sun397": 397}

# CoOp's EuroSAT class names (its ``NEW_CNAMES``), keyed by the EuroSAT folder name.
EUROSAT_NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
EUROSAT_SUFFIX = " satellite location"


@dataclass(frozen=True)
class XLayout:
    """Where one X-TAIL domain lives under the data root.

    ``required`` are paths under the root (a trailing ``/`` marks a folder); ``split_file`` is the CoOp JSON
    (empty for aircraft and mnist); JSON image paths are relative to ``image_dir``.
    """

    name: str
    folder: str
    required: tuple[str, ...]
    split_file: str = ""
    image_dir: str = ""


def _coop(name: str, folder: str, image_dir: str, split: str, extra: tuple[str, ...] = ()) -> XLayout:
    images = f"{folder}/{image_dir}/" if image_dir else ""
    required = tuple(p for p in (images, *extra, f"{folder}/{split}") if p)
    return XLayout(name, folder, required, f"{folder}/{split}", f"{folder}/{image_dir}" if image_dir else folder)


MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

XLAYOUTS: dict[str, XLayout] = {layout.name: layout for layout in (
    XLayout("aircraft", "Aircraft", ("Aircraft/images/", "Aircraft/variants.txt", "Aircraft/images_variant_train.txt",
                                     "Aircraft/images_variant_test.txt"), image_dir="Aircraft/images"),
    _coop("caltech101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    _coop("dtd", "DTD", "images", "split_zhou_DescribableTextures.json"),
    _coop("eurosat", "EuroSAT", "2750", "split_zhou_EuroSAT.json"),
    _coop("flowers", "Flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    _coop("food101", "Food", "images", "split_zhou_Food101.json"),
    XLayout("mnist", "MNIST", tuple(f"MNIST/MNIST/raw/{f}" for f in MNIST_RAW)),
    _coop("oxford_pets", "Pets", "images", "split_zhou_OxfordPets.json"),
    # CoOp's StanfordCars paths are relative to the dataset folder (``cars_train/00001.jpg``)
    _coop("stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json",
          ("StanfordCars/cars_train/", "StanfordCars/cars_test/")),
    _coop("sun397", "Sun397", "SUN397", "split_zhou_SUN397.json"),
)}


def eurosat_name(name: str) -> str:
    """CoOp's EuroSAT name (folder names remapped, new names kept) with RAIL/LADA's `` satellite location``."""
    return EUROSAT_NEW_CNAMES.get(name, name) + EUROSAT_SUFFIX


def mnist_name(torchvision_class: str) -> str:
    """LADA's MNIST class name: ``0 - zero`` → ``number: "0 - zero"``."""
    return f'number: "{torchvision_class}"'


def prompt_name(name: str) -> str:
    """The name as the text encoder sees it: underscores become spaces (LADA's ``init_prompts``)."""
    return name.replace("_", " ")
