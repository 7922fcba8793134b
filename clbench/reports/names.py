"""Display names: dataset abbreviations as in the MTIL papers and method names as the papers spell them.

Only the rendered tables and figures use these; every frame inside the report keeps the names the runs
wrote, so matching (runs, external matrices, literature rows) never depends on a display choice.
"""

from __future__ import annotations

import re

# Abbreviations of ZSCL's and KeepLoRA's MTIL tables, keyed by a normalised dataset name
# (lower case, letters and digits only) so that common spellings of the same dataset all match.
DATASET_ABBREVIATIONS: dict[str, str] = {
    "aircraft": "Aircraft",
    "fgvcaircraft": "Aircraft",
    "caltech101": "Caltech",
    "caltech": "Caltech",
    "cifar100": "CIFAR",
    "cifar": "CIFAR",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "flowers": "Flowers",
    "flowers102": "Flowers",
    "oxfordflowers": "Flowers",
    "food": "Food",
    "food101": "Food",
    "mnist": "MNIST",
    "oxfordpet": "Pets",
    "oxfordpets": "Pets",
    "oxfordiiitpet": "Pets",
    "pet": "Pets",
    "pets": "Pets",
    "stanfordcars": "Cars",
    "cars": "Cars",
    "sun397": "SUN",
    "sun": "SUN",
}

# Registered method names (``clbench methods``) as the papers write them; unknown names are kept.
METHOD_NAMES: dict[str, str] = {
    "lora": "LoRA",
    "keeplora": "KeepLoRA",
    "keeplora+": "KeepLoRA+",
    "keeplora++": "KeepLoRA++",
    "inflora": "InfLoRA",
    "zscl": "ZSCL",
    "loda": "LoDA",
    "zeroshot": "Zero-shot",
    "finetune": "Fine-tune",
    # the standard rows of the MTIL tables, spelled as clbench/data/literature.csv (so a run row and the published
    # row of the same method share a name and sit side by side under --with-literature)
    "lwf": "LwF",
    "lwf-vr": "LwF-VR",
    "icarl": "iCaRL",
    "wise-ft": "WiSE-FT",
    "moe-adapters": "MoE-Adapters",
    "diki": "DIKI",
}

# The fixed order of rows in every table and legend: the zero-shot reference, the baselines in the MTIL tables'
# order (fine-tuning, LwF, iCaRL, LwF-VR, WiSE-FT), LoRA, then the methods roughly by publication (ZSCL 2023,
# MoE-Adapters, DIKI and InfLoRA 2024, LoDA and KeepLoRA 2026); unknown names follow alphabetically.
METHOD_ORDER: tuple[str, ...] = ("zeroshot", "finetune", "lwf", "icarl", "lwf-vr", "wise-ft", "lora", "zscl",
                                 "moe-adapters", "diki", "inflora", "loda", "keeplora", "keeplora+", "keeplora++")


def method_order_key(name: str) -> tuple[int, str]:
    """Sort key putting ``name`` (a registered name) in :data:`METHOD_ORDER`, unknown names after, by name."""
    return (METHOD_ORDER.index(name), "") if name in METHOD_ORDER else (len(METHOD_ORDER), name)


# Profiled sections (clbench.costs.profiler) as figure labels; unknown names are shown with spaces for underscores.
SECTION_NAMES: dict[str, str] = {
    "setup": "setup",
    "eval": "evaluation",
    "train": "training steps",
    "merge": "merge",
    "pretrained_svd": "SVD of pretrained weights",
    "grad_estimation": "gradient estimation",
    "grad_svd": "gradient SVD",
    "feature_stats": "feature statistics",
    "feature_svd": "feature-subspace SVD",
    "memory_update": "memory update",
    "reference_forward": "reference-model forward",
    "recalibration": "recalibration",
    "head_init": "head initialisation",
}


def section_display(name: str) -> str:
    """``pretrained_svd`` -> ``SVD of pretrained weights``."""
    return SECTION_NAMES.get(name, name.replace("_", " "))


BENCHMARK_NAMES: dict[str, str] = {"mtil": "MTIL", "synthetic": "Synthetic", "xtail": "X-TAIL"}
ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV"}


def benchmark_display(benchmark: str, order: int | None) -> str:
    """``("mtil", 1)`` -> ``MTIL Order I`` as the papers write it."""
    name = BENCHMARK_NAMES.get(benchmark, benchmark)
    return name if order is None else f"{name} Order {ROMAN.get(order, order)}"


def normalise(name: str) -> str:
    """Lower case, letters and digits only: the key dataset names are matched by."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def abbreviate_dataset(name: str) -> str:
    """The paper's short column name for ``name`` (``OxfordPet`` -> ``Pets``); unknown names unchanged."""
    return DATASET_ABBREVIATIONS.get(normalise(name), name)


def abbreviate_datasets(names: list[str]) -> list[str]:
    """Abbreviate a column list; where two names would collide, both keep their full names."""
    short = [abbreviate_dataset(n) for n in names]
    return [s if short.count(s) == 1 else n for n, s in zip(names, short, strict=True)]


def method_display(name: str) -> str:
    """``keeplora`` -> ``KeepLoRA``; names not in :data:`METHOD_NAMES` are returned unchanged."""
    return METHOD_NAMES.get(name, name)
