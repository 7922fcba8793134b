"""Optional experiment tracking (``clbench run --track tensorboard,wandb``; the ``tracking`` extra), for every
setting: per task the score on every dataset or task, at the end the setting's metrics (CLIP: Transfer / Average /
Last / BWT; LLaVA: MFT / MFN / MAA / BWT / Transfer), the score matrix and the cost of each profiled section. Off by
default; Weights & Biases runs offline unless ``WANDB_MODE`` says otherwise.

Everything is read from what the run itself records (the per-task rows through :class:`~clbench.engine.loop.Hooks`,
then ``metrics.json``, ``accuracy.csv`` and ``profile.csv``), so a tracker never changes a result. Logs go under
``<out>/tracking/``: TensorBoard event files in ``tensorboard/<run folder>``, W&B's offline runs in ``wandb/``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from clbench.engine.loop import Hooks
from clbench.errors import UserError
from clbench.extras import missing, require

BACKENDS = ("tensorboard", "wandb")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_backends(value: str) -> list[str]:
    """``tensorboard,wandb`` -> the backends, each checked to be known and installed (one-line errors)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"--track {name!r} is not one of {', '.join(BACKENDS)}")
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise missing(_MODULES[name], f"--track {name}")
    return list(dict.fromkeys(names))


class Backend:
    """One run's logger: scalars per step, text tables, closed at the end."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def table(self, name: str, frame: pd.DataFrame, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardBackend(Backend):
    def __init__(self, logdir: Path, config: dict) -> None:
        require("tensorboard", "--track tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def table(self, name: str, frame: pd.DataFrame, step: int) -> None:
        text = frame.to_markdown(index=False) if _has_tabulate() else frame.to_csv(index=False)
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbBackend(Backend):
    def __init__(self, folder: Path, name: str, config: dict) -> None:
        wandb = require("wandb", "--track wandb")
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "clbench"), name=name, config=config,
                              dir=str(folder), mode=os.environ.get("WANDB_MODE", "offline"),
                              reinit="create_new")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, frame: pd.DataFrame, step: int) -> None:
        self.run.log({name: self.wandb.Table(dataframe=frame.reset_index(drop=True))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _has_tabulate() -> bool:
    return importlib.util.find_spec("tabulate") is not None


class Tracker:
    """Logs each method's run to the chosen backends: rows as tasks finish, summary when the run is done."""

    def __init__(self, backends: list[str], out: Path, run_path: Callable[[str], Path], config: dict) -> None:
        self.backends = backends
        self.out = Path(out)
        self.run_path = run_path
        self.config = config
        self._open: tuple[str, list[Backend]] | None = None
        self._last_step = 0
        self._pending: list[tuple[int, list[float]]] = []

    def hooks_for(self, method: str, inner: Hooks) -> Hooks:
        """``inner`` (the progress display) plus logging of ``method``'s rows; starts its tracked run."""
        self.finish()
        path = self.run_path(method)
        name = str(path.relative_to(self.out)) if path.is_relative_to(self.out) else path.name
        config = {**self.config, "method": method}
        opened: list[Backend] = []
        for backend in self.backends:
            if backend == "tensorboard":
                opened.append(TensorBoardBackend(self.out / "tracking" / "tensorboard" / name, config))
            else:
                opened.append(WandbBackend(self.out / "tracking", name.replace(os.sep, "/"), config))
        self._open = (method, opened)

        self._pending = []

        def on_row(index: int, row: list[float]) -> None:
            inner.on_row(index, row)
            self._pending.append((index, list(row)))
            self._flush(path, opened)

        return Hooks(on_phase=inner.on_phase, on_advance=inner.on_advance, on_row=on_row)

    def _flush(self, path: Path, opened: list[Backend], force: bool = False) -> None:
        """Log the rows seen so far, named by the run's datasets (its ``config.json``, written when its first task
        ends, just after the first row arrives: until then rows wait; ``force`` logs them by position)."""
        names = _datasets(path)
        if names is None and not force:
            return
        for index, row in self._pending:
            labels = names if names and len(names) == len(row) else [f"task{d + 1}" for d in range(len(row))]
            values = {f"accuracy/{d}": float(v) for d, v in zip(labels, row, strict=True)}
            values["accuracy/mean_over_datasets"] = float(sum(row) / len(row))
            values["accuracy/mean_over_trained"] = float(sum(row[: index + 1]) / (index + 1))
            self._last_step = index + 1
            for b in opened:
                b.scalars(values, index + 1)
        self._pending = []

    def finish(self) -> None:
        """Log the summary of the open run from its files (if it completed), then close its backends."""
        if self._open is None:
            return
        method, opened = self._open
        self._open = None
        path = self.run_path(method)
        try:
            self._flush(path, opened, force=True)
            summary = run_summary(path)
            for b in opened:
                if summary["metrics"]:
                    b.scalars(summary["metrics"], self._last_step)
                for name in ("accuracy_matrix", "costs"):
                    if summary[name] is not None:
                        b.table(name, summary[name], self._last_step)
        finally:
            for b in opened:
                b.close()


def _datasets(path: Path) -> list[str] | None:
    """The run's column names: its ``config.json``'s ``datasets`` (CLIP) or ``tasks`` (LLaVA)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    names = config.get("datasets", config.get("tasks"))
    return [str(n) for n in names] if isinstance(names, list) else None


def run_summary(path: Path) -> dict:
    """What a finished run adds to its log: ``metrics/*`` scalars, the accuracy matrix, the total seconds and the
    peak memory per profiled section. Missing files (a run that failed) give empty parts."""
    metrics = {}
    if (path / "metrics.json").is_file():
        data = json.loads((path / "metrics.json").read_text())
        # every number at the top of metrics.json: CLIP's Transfer / Average / Last / BWT, MCITlib's MFT / MFN / MAA /
        # BWT / Transfer; a one-task run's Transfer is null or NaN (undefined) and left out
        metrics = {f"metrics/{k}": float(v) for k, v in data.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    matrix = pd.read_csv(path / "accuracy.csv") if (path / "accuracy.csv").is_file() else None
    costs = None
    if (path / "profile.csv").is_file():
        profile = pd.read_csv(path / "profile.csv")
        costs = profile.groupby("section", sort=False).agg(seconds_total=("seconds", "sum"),
                                                           peak_bytes=("peak_bytes", "max")).reset_index()
    return {"metrics": metrics, "accuracy_matrix": matrix, "costs": costs}
