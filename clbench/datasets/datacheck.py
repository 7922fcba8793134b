"""Is a real-data benchmark's data there: the layout checks before a run and the rows of ``clbench data check``.

Shared by the MTIL and X-TAIL readers. A layout names a dataset's folder under the data root and the paths its
reader needs (a trailing ``/`` marks a folder). The layout checks only look for paths; :meth:`LayoutCheck.inspect`
also reads the dataset's index (images are checked for existence, not decoded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clbench.datasets.selection import Source, missing_files
from clbench.errors import UserError

DATA_ROOT_ENV = "CLBENCH_DATA_ROOT"


class DiskLayout(Protocol):
    """Where one dataset lives under the data root."""

    @property
    def folder(self) -> str: ...

    @property
    def required(self) -> tuple[str, ...]: ...


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


@dataclass(frozen=True)
class LayoutCheck:
    """A benchmark's layouts and how its one-line problems name them.

    ``benchmark`` is its name in messages (``MTIL``), ``style`` the layout's (``torchvision``), ``check_command``
    the ``clbench data check`` call that lists every expected path, ``read`` its reader of one dataset.
    """

    benchmark: str
    style: str
    check_command: str
    layouts: Mapping[str, DiskLayout]
    expected_classes: Mapping[str, int]
    read: Callable[[Path, str], Source]

    def folder(self, root: Path, name: str) -> Path:
        """Dataset ``name``'s folder under ``root``."""
        return root / self.layouts[name].folder

    def first_missing(self, root: Path, name: str) -> Path | None:
        """The dataset's folder if it is absent, else the first required file/folder that is absent, else None."""
        top = self.folder(root, name)
        if not top.is_dir():
            return top
        for rel in self.layouts[name].required:
            path = root / rel
            if not (path.is_dir() if rel.endswith("/") else path.is_file()):
                return path
        return None

    def fix(self, root: Path, name: str, missing: Path) -> str:
        """How to repair a half-present dataset whose ``missing`` path is absent (a subclass may be specific)."""
        return f"re-extract the dataset into {self.folder(root, name)}"

    def problem(self, root: Path, name: str) -> str | None:
        """One line if dataset ``name`` is absent or half-present under ``root`` (nothing is read), else None."""
        layout, top = self.layouts[name], self.folder(root, name)
        missing = self.first_missing(root, name)
        if missing is None:
            return None
        if missing == top:
            return (f"{name}: not found: expected {top} ({self.style} layout: {', '.join(layout.required)}); put "
                    "the dataset there or fix --data-root")
        kind = "folder" if any(missing == root / r and r.endswith("/") for r in layout.required) else "file"
        return f"{name}: incomplete: {kind} {missing} is missing; {self.fix(root, name, missing)}"

    def unusable_line(self, root: Path, bad: Sequence[tuple[str, Path | None, str]], total: int) -> str:
        """One line for the unusable datasets, each given as (name, the absent path or None, its problem line)."""
        if len(bad) == 1:
            return bad[0][2]
        if len(bad) == total and all(path == self.folder(root, name) for name, path, _ in bad):
            return (f"none of the {total} {self.benchmark} datasets is under {root} (e.g. expected {bad[0][1]}); "
                    f"check --data-root or {DATA_ROOT_ENV} ('{self.check_command}' lists every expected path)")
        parts = [f"{name} ({'missing ' + str(path) if path else problem})" for name, path, problem in bad]
        return f"{len(bad)} of the {total} {self.benchmark} datasets are not usable under {root}: {'; '.join(parts)}"

    def check_all_present(self, root: Path, names: Sequence[str]) -> None:
        """Raise one line for all absent or half-present datasets (nothing is read)."""
        bad = [(n, self.first_missing(root, n), p) for n in names if (p := self.problem(root, n))]
        if bad:
            raise UserError(self.unusable_line(root, bad, len(names)))

    def inspect(self, root: Path, name: str) -> DatasetStatus:
        """Read dataset ``name``'s index (images are checked for existence, not decoded)."""
        status = DatasetStatus(name, self.folder(root, name), False, expected_classes=self.expected_classes[name],
                               missing=self.first_missing(root, name))
        try:
            source = self.read(root, name)
        except UserError as exc:
            status.problem = str(exc)
            return status
        status.n_train, status.n_test = len(source.train_positions), len(source.test_positions)
        status.n_classes = len(source.classnames)
        missing = missing_files(source)
        if missing:
            status.missing = Path(missing[0])
            status.problem = (f"{name}: incomplete: {len(missing)} listed image(s) are not on disk, e.g. "
                              f"{missing[0]}; re-extract the dataset into {status.path}")
        elif not status.n_train or not status.n_test:
            status.problem = f"{name}: empty {'train' if not status.n_train else 'test'} split under {status.path}"
        status.usable = not status.problem
        return status

    def inspect_all(self, root: Path, names: Sequence[str]) -> list[DatasetStatus]:
        """The status of every dataset in ``names`` under ``root``."""
        return [self.inspect(root, name) for name in names]
