"""Recipe cards: where each setting of a method's run comes from.

Each method family's file ends with a ``RECIPES`` dict (method name → :class:`RecipeCard`). A card declares,
for every training setting in :data:`TRAIN_KEYS` and every hyperparameter of the method, its provenance under
the preset that holds the authors' recipe (``paper``): the paper, the official code, adapted to CLIP/MTIL (with
the reason), an assumption where the sources are silent, or a harness setting that no recipe fixes (data paths,
chunk sizes). A card never holds a value: values are read from the resolved preset configuration, so each
number is written once (in a preset JSON file or as a hyperparameter default).

:func:`clbench.config.recipe_rows` resolves a run's settings against its method's card (the configuration layer
does it: methods never import it). A value equal to the authors' preset keeps the card's provenance; a value that
differs says where it came from instead (the run's preset, or ``--set``) and what the authors' preset has.
``config.json`` records these rows (:func:`clbench.config.recipe_record`), ``clbench methods NAME`` prints them.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

SOURCES = ("paper", "official code", "adapted", "assumption", "harness")
# Training settings every training method's card must declare.
TRAIN_KEYS = ("optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "epochs", "max_steps", "batch_size")
# The value of a training setting that a configuration does not have (the harness then always uses this one).
TRAIN_FALLBACK = {"optimizer": "adamw", "momentum": None}


@dataclass(frozen=True)
class Source:
    """Provenance of one setting: ``kind`` is one of :data:`SOURCES`; ``note`` says where exactly, or why."""

    kind: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise ValueError(f"unknown provenance {self.kind!r}; expected one of {SOURCES}")
        if self.kind in ("adapted", "assumption", "harness") and not self.note:
            raise ValueError(f"a setting marked {self.kind!r} must say why")


def paper(note: str = "") -> Source:
    return Source("paper", note)


def code(note: str = "") -> Source:
    return Source("official code", note)


def adapted(why: str) -> Source:
    return Source("adapted", why)


def assumption(why: str) -> Source:
    return Source("assumption", why)


def harness(note: str) -> Source:
    return Source("harness", note)


@dataclass(frozen=True)
class RecipeCard:
    """The authors' recipe of one method: what it follows (``reference``) and the provenance of each setting
    (``settings``: ``train.<key>`` for training settings, the bare name for a hyperparameter) under ``preset``.
    ``trains=False`` for methods without training (no training settings apply)."""

    reference: str
    settings: dict[str, Source]
    preset: str = "paper"
    trains: bool = True


@dataclass(frozen=True)
class RecipeRow:
    """One resolved setting of a run: its value and where that value comes from."""

    key: str
    value: Any
    source: str
    note: str


def card_for(method: str) -> RecipeCard | None:
    """The card declared in the file of ``method``'s class (its ``RECIPES``), or None."""
    from clbench.methods.registry import get_method

    cls = get_method(method)
    return getattr(importlib.import_module(cls.__module__), "RECIPES", {}).get(method)


def describe_range(meta: dict) -> str:
    """A hyperparameter's allowed values, from its field metadata, in words."""
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    if "subset_of" in meta:
        parts.append("comma-separated subset of " + ", ".join(meta["subset_of"]))
    if "choices_of" in meta:
        parts.append(f"distinct letters of {meta['choices_of']}")
    if "min" in meta:
        parts.append(f"{'>' if meta.get('exclusive_min') else '>='} {meta['min']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    if meta.get("max_width"):
        parts.append("<= the adapted layers' width")
    return ", ".join(parts) or "any"


def hparam_rows(method: str) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, range)`` of every hyperparameter of ``method``."""
    from clbench.methods.registry import get_method

    cls = get_method(method)
    defaults = cls.Hparams()
    rows = []
    for f in dataclasses.fields(defaults):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, kind, repr(getattr(defaults, f.name)), describe_range(dict(f.metadata))))
    return rows


SAME_ADAPTER_BUDGET = "MTIL's per-dataset epochs and batch 64, the same data budget as every adapter method"
