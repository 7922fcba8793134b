"""What a benchmark is: an ordered sequence of classification tasks, each with prompts and splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset


@dataclass
class ImageSpec:
    """How the backbone wants its images: side length and normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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
