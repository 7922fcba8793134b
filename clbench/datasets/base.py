"""What a benchmark is: an ordered sequence of classification tasks, each with prompts and splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset


@dataclass
class ImageSpec:
    """How the backbone wants its images: side length, normalisation and resizing, as open_clip's
    ``PreprocessCfg`` gives them for the backbone's pretrained tag (``clbench.models.backbones.preprocess_config``).

    ``interpolation`` is ``bicubic`` or ``bilinear``; ``resize_mode`` is ``shortest`` (shorter side to ``size``,
    then centre crop), ``squash`` (both sides to ``size``, aspect ratio not kept) or ``longest`` (longer side to
    ``size``, then centre pad with ``fill_color``); ``source`` says where the values came from."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    source: str = ""


@dataclass
class Task:
    """One dataset of the sequence. ``train``/``test`` yield ``(image_tensor, label)`` pairs."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    test: Dataset
    info: dict = field(default_factory=dict)

    def prompts(self, template_index: int = 0) -> list[str]:
        """The prompt of every class with one template (KeepLoRA's policy uses the first)."""
        template = self.templates[template_index]
        return [template.format(c) for c in self.classnames]


@dataclass
class Benchmark:
    """An ordered task sequence; ``tasks`` are in training order."""

    name: str
    order: int
    tasks: list[Task]
    info: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


@dataclass(frozen=True)
class ClassSpan:
    """Where one dataset's classes sit in the union label space: columns ``start`` to ``stop - 1``."""

    dataset: str
    start: int
    stop: int


def union_spans(benchmark: Benchmark) -> list[ClassSpan]:
    """Each dataset's column range in the union label space, in sequence order."""
    spans, start = [], 0
    for task in benchmark.tasks:
        spans.append(ClassSpan(task.name, start, start + len(task.classnames)))
        start += len(task.classnames)
    return spans


def duplicate_classnames(tasks: list[Task]) -> list[dict]:
    """Class names that occur in more than one dataset (compared case-insensitively, stripped), e.g. X-TAIL's
    ``lotus`` in Caltech101 and Flowers. Under the union label space such classes get near-identical text
    features and argmax picks the earlier dataset's column, so runs report them rather than merge them."""
    seen: dict[str, list[str]] = {}
    for task in tasks:
        for name in dict.fromkeys(c.strip().lower() for c in task.classnames):
            seen.setdefault(name, []).append(task.name)
    return [{"name": name, "datasets": where} for name, where in sorted(seen.items()) if len(where) > 1]
