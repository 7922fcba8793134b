"""``clbench sweep`` on an MCIT benchmark: every (method, seed, grid point) as a one-method ``clbench run``.

Folders as in CLIP sweeps: ``<out>/<benchmark>-order1/<method>[,key=value...]/seed<s>`` (the grid point in the method
folder's name, :func:`clbench.sweep.folder_name`). The run id decides what happens to a folder, as for CLIP: a
complete run of the same configuration is skipped, an unfinished one (interrupted, or failed after a task) resumes
after its last completed task (:mod:`clbench.mcit.resume`), a run of other settings is replaced. A failed run is
recorded in its manifest and the sweep goes on. Runs execute one after the other in this process; the Ray and
SLURM launchers of CLIP sweeps are not ported to this setting.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clbench.errors import UserError


@dataclass(frozen=True)
class McitAxis:
    key: str
    values: tuple[str, ...]
    method: str | None  # None: every run (loop.* / data.*)
    label: str


@dataclass(frozen=True)
class McitSweepRun:
    method: str
    seed: int
    point: tuple[tuple[str, str], ...]
    sets: tuple[str, ...]
    folder: str  # the method folder's name

    @property
    def name(self) -> str:
        return f"{self.folder} seed{self.seed}"


@dataclass
class McitSweepResult:
    run: McitSweepRun
    status: str  # complete, failed
    metrics: dict
    path: str
    error: str = ""


def parse_grid(items: list[str], methods: list[str]) -> tuple[McitAxis, ...]:
    """``--grid key=v1,v2``: ``<method>.<hyperparameter>`` of a method in ``--methods``, ``loop.<field>`` or
    ``data.n_train`` / ``data.n_test``; each key once, each value once."""
    from clbench.mcit.loop import LoopConfig
    from clbench.mcit.methods import get_mcit_method
    from clbench.sweep import split_list

    axes: list[McitAxis] = []
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        head, _, rest = key.partition(".")
        if not sep:
            raise UserError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid keeplora.rank=4,8")
        if head in ("loop", "data"):
            known = ("n_train", "n_test") if head == "data" else tuple(f.name for f in dataclasses.fields(LoopConfig))
            if rest not in known:
                raise UserError(f"--grid {key}: {head} has no setting {rest!r}; known: {', '.join(known)}")
            method, label = None, key
        else:
            if head not in methods:
                raise UserError(f"--grid {key}: {head!r} is not in --methods (nor loop / data); add it or drop the "
                                "axis")
            fields = [f.name for f in dataclasses.fields(get_mcit_method(head).Hparams)]
            if rest not in fields:
                raise UserError(f"--grid {key}: {head} (LLaVA form) has no hyperparameter {rest!r}; known: "
                                f"{', '.join(fields)}")
            method, label = head, rest
        values = tuple(split_list(raw, f"--grid {key}="))
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r} repeats a value; give each once")
        if any(a.key == key for a in axes):
            raise UserError(f"--grid {key} is given twice; give all its values in one --grid")
        axes.append(McitAxis(key, values, method, label))
    return tuple(axes)


def expand(methods: list[str], seeds: tuple[int, ...], axes: tuple[McitAxis, ...], sets: list[str],
           preset: str) -> list[McitSweepRun]:
    """Every run, in order (seed, method, grid point); every run's settings are checked before any runs."""
    from clbench.mcit.loop import LoopConfig
    from clbench.mcit.methods import get_mcit_method
    from clbench.mcit.runner import PRESETS, apply_sets
    from clbench.sweep import folder_name

    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown for the MCIT setting; use {' or '.join(PRESETS)}")
    swept = {a.key for a in axes}
    for item in sets:
        if item.partition("=")[0].strip() in swept:
            raise UserError(f"{item.partition('=')[0]} is both in --set and --grid; keep it in one of them")
    runs = []
    for seed, method in itertools.product(seeds, methods):
        mine = [a for a in axes if a.method in (None, method)]
        others = {m for m in methods if m != method}
        base_sets = [s for s in sets if s.partition(".")[0] not in others]
        for values in itertools.product(*(a.values for a in mine)):
            run_sets = (*base_sets, *(f"{a.key}={v}" for a, v in zip(mine, values, strict=True)))
            p = PRESETS[preset]
            apply_sets(list(run_sets), LoopConfig(**p["loop"]), {method: get_mcit_method(method).Hparams()},
                       {"n_train": p["n_train"], "n_test": p["n_test"]})  # a bad value fails now, not mid-sweep
            point = tuple((a.label, v) for a, v in zip(mine, values, strict=True))
            runs.append(McitSweepRun(method, seed, point, run_sets, folder_name(method, point)))
    return runs


def run_sweep(benchmark: str, runs: list[McitSweepRun], out: Path, preset: str, backbone: str, data_root: str,
              device: str, notify: Callable[[str], None]) -> list[McitSweepResult]:
    """Run (or skip, or resume) every run in turn; a failure is recorded and the next run starts."""
    from clbench.interrupt import RunInterrupted
    from clbench.mcit.runner import run_mcit

    results = []
    for run in runs:
        notes: list[str] = []
        try:
            (outcome,) = run_mcit(benchmark, [run.method], out, run.seed, preset, backbone, data_root, device,
                                  list(run.sets), notify=lambda m, notes=notes: (notes.append(m), notify(m)),
                                  resume="auto", folder=run.folder)
            results.append(McitSweepResult(run, "skipped" if any("already complete" in n for n in notes)
                                           else "complete", outcome.metrics, str(outcome.path)))
        except RunInterrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded (the run's manifest says failed) and the sweep goes on
            text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            results.append(McitSweepResult(run, "failed", {}, "", " ".join(text.split())))
            notify(f"{run.name} failed: {' '.join(text.split())}")
    return results
