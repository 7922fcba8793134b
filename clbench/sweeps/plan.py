"""Sweeps: the cross product of methods, orders, seeds and grid values as runs with deterministic ids.

A sweep is planned here and executed by a launcher (:mod:`clbench.sweeps.launchers`); the launcher only decides
*where* :func:`execute_run` is called, so the results do not depend on it. Each setting plans its sweep
(:meth:`clbench.settings.base.Setting.plan_sweep`) into the same :class:`RunSpec` (its result ``layout``, its
``runner``) and shares everything below the plan: ids checked in the worker, folders, skipping, staging, failures
and resume. This module never imports a setting: a spec carries the function that runs it.

- **Grid axes.** ``--grid key=v1,v2`` is one axis. A key under a method (``keeplora.rank``,
  ``keeplora.train.lr``) applies to that method's runs only; any other key (``train.lr``,
  ``data.train_per_class``) to every run. Each run is one (method, order, seed, grid point).
- **Ids.** A run's id is :func:`clbench.config.run_id` of :func:`clbench.config.method_run_config`, the
  same resolved configuration ``clbench run`` writes to ``config.json``.
- **Folders.** The results contract ``<out>/<benchmark>-order<k>/<method>/seed<s>/`` with the grid point
  in the method folder's name: ``keeplora,rank=8,eps_f=0.9`` (method, then ``key=value`` of every grid
  axis that applies to the run, comma-separated; ``@`` is not allowed by
  :func:`clbench.storage.results.safe_component`, a comma is, and no method name or key contains one). A point
  that is not a safe name, or is too long, is named by a hash: ``keeplora,grid-<8 hex>``. A run without
  grid axes uses the plain method name, the folder ``clbench run`` writes.
- **Skipping.** A folder whose ``manifest.json`` says ``complete`` and whose ``config.json`` has this
  run's id is done and skipped; anything else (missing, failed, interrupted, other settings) is run
  again and replaced.
- **Staging.** A run executes under ``<out>/.sweep/runs/<id>/`` (a fixed place per id) and its folder is
  moved to its final place when it ends, so a final folder always holds a finished attempt (and a report of
  ``<out>`` never reads a half-written run as final). ``sweep.json`` there records the grid point, and
  ``sweep.log`` the run's output when a launcher runs it in a process of its own.
- **Failures** never stop the sweep: the folder gets ``manifest.json`` with status ``failed`` and
  ``error.txt`` (message and traceback). A run that failed after completing a task (a crash, a kill, an
  interrupt) keeps its resume checkpoint in the staging folder, and the next sweep resumes it there
  (``clbench run --resume`` semantics, :mod:`clbench.storage.checkpoint`); its final folder holds the failure record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import time
import traceback
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench.errors import UserError
from clbench.storage.layout import CLIP_LAYOUT, ResultLayout

SEP = ","  # between the method and the grid settings in a run folder name, and between settings
STAGING = Path(".sweep") / "runs"
STARTED = "started.json"  # written by the worker when a run starts (the live view polls it)
ERROR_FILE = "error.txt"
SWEEP_FILE = "sweep.json"
LOG_FILE = "sweep.log"
CHECKPOINT = "resume.safetensors"  # clbench.storage.checkpoint.CHECKPOINT_NAME (not imported: it pulls in torch)
MAX_FOLDER_NAME = 120
RESERVED_KEYS = {"seed": "--seeds", "order": "--orders"}
METRIC_KEYS = ("transfer", "average", "last", "bwt", "mft", "mfn", "maa")  # a report's metrics (CLIP and MCIT)

# Status of a planned run.
DONE = "done"
NEW = "new"
RETRY = "retry (failed before)"
REPLACE = "replace (other settings)"
INCOMPLETE = "rerun (unfinished)"
RESUME = "resume (after a crash)"
INVALID = "invalid"


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid`` option: a key, its values as typed, and the method it is limited to (``None``: all)."""

    key: str
    values: tuple[str, ...]
    method: str | None
    label: str  # the key's name in folder names: ``rank`` for ``keeplora.rank``, ``train.lr`` for ``train.lr``


@dataclass(frozen=True)
class SweepRequest:
    """What the user asked for; :func:`expand` turns it into runs."""

    methods: tuple[str, ...]
    orders: tuple[int, ...]
    seeds: tuple[int, ...]
    grid: tuple[GridAxis, ...]
    preset: str
    options: tuple[tuple[str, Any], ...]  # ``clbench run`` options other than order and seed
    sets: tuple[str, ...]  # ``--set key=value``
    out: str
    threads: int = 1


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: everything a worker process needs to rebuild its configuration and run it."""

    id: str
    method: str
    order: int
    seed: int
    point: tuple[tuple[str, str], ...]  # (label, value) of each grid axis applying to this run
    preset: str
    options: tuple[tuple[str, Any], ...]  # including order and seed
    sets: tuple[str, ...]  # this run's --set entries, grid values last
    benchmark: str
    out: str
    folder: str  # the final results folder (absolute)
    threads: int = 1
    error: str | None = None  # the configuration is invalid: the run fails without starting
    eval_rule: str = ""  # the resolved --eval rule (part of the folder name when not the benchmark's own)
    # What a complete run folder holds, declared by the setting that planned the spec (clbench.settings)
    layout: ResultLayout = CLIP_LAYOUT
    # How a worker runs this spec under its staging folder (``runner(spec, out)``; pickled by reference to the
    # worker): set by the setting that planned it, so this engine never imports a setting. None: the CLIP runner.
    runner: Callable[[RunSpec, Path], Any] | None = None
    datasets: str = ""  # the resolved dataset selection (--datasets; part of the folder name when set)

    @property
    def name(self) -> str:
        """``keeplora,rank=8 order1 seed0``: the run as the user reads it."""
        return f"{Path(self.folder).parent.name} order{self.order} seed{self.seed}"

    @property
    def grid_text(self) -> str:
        return SEP.join(f"{k}={v}" for k, v in self.point) or "-"

    @property
    def staging(self) -> Path:
        return Path(self.out) / STAGING / self.id


@dataclass
class RunReport:
    """How one run ended."""

    id: str
    status: str  # complete, failed
    folder: str
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# ---- planning ------------------------------------------------------------------------------------------
def split_list(value: str, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is a UserError naming the option."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise UserError(f"{what} is empty; give a comma-separated list, e.g. {what} 0,1,2")
    return items


def int_list(value: str, what: str) -> tuple[int, ...]:
    """A comma list of distinct integers (``--seeds 0,1,2``)."""
    items = split_list(value, what)
    try:
        numbers = tuple(int(v) for v in items)
    except ValueError:
        raise UserError(f"{what} {value!r}: give comma-separated integers, e.g. {what} 0,1,2") from None
    if len(set(numbers)) != len(numbers):
        raise UserError(f"{what} {value!r} repeats a value; give each once")
    return numbers


def _field_path_exists(cls: type, keys: list[str]) -> bool:
    """Whether ``cls.<keys>`` names a settable field of a (nested) config dataclass."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("methods", "method_train")}
    if not keys or keys[0] not in fields:
        return False
    if len(keys) == 1:
        return True
    hint = typing.get_type_hints(cls)[keys[0]]
    return dataclasses.is_dataclass(hint) and _field_path_exists(hint, keys[1:])


def key_target(key: str) -> tuple[str | None, str]:
    """The method a setting belongs to (``None``: the run) and its path in a run's ``config.json``.

    ``keeplora.eps_f`` -> ``("keeplora", "hparams.eps_f")``; ``keeplora.train.lr`` -> ``("keeplora",
    "train.lr")``; ``train.lr`` -> ``(None, "train.lr")``. Unknown keys are UserErrors.
    """
    from clbench.config import RunConfig, TrainConfig
    from clbench.methods import get_method, list_methods

    head, _, rest = key.partition(".")
    if head in list_methods():
        if not rest:
            raise UserError(f"{key!r}: name a hyperparameter of {head}, e.g. {head}.rank")
        if rest.startswith("train."):
            if not _field_path_exists(TrainConfig, rest.split(".")[1:]):
                raise UserError(f"{key!r}: train has no setting {rest.removeprefix('train.')!r}; known: "
                                f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
            return head, rest
        hparams = get_method(head).Hparams
        if not _field_path_exists(hparams, rest.split(".")):
            known = ", ".join(f.name for f in dataclasses.fields(hparams)) or "none"
            raise UserError(f"{key!r}: {head} has no hyperparameter {rest!r}; known: {known}")
        return head, f"hparams.{rest}"
    if not _field_path_exists(RunConfig, key.split(".")):
        known = ", ".join(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("methods", "method_train"))
        raise UserError(f"{key!r} is neither a method's hyperparameter (method.key) nor a run setting ({known})")
    return None, key


def parse_grid(items: list[str], methods: list[str]) -> tuple[GridAxis, ...]:
    """``--grid key=v1,v2`` options as axes, checked: known keys, methods in ``--methods``, no repeats."""
    from clbench.methods import list_methods

    axes: list[GridAxis] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid keeplora.rank=8,16")
        key, _, raw = (s.strip() for s in item.partition("="))
        if key in RESERVED_KEYS:
            raise UserError(f"--grid {key}: use {RESERVED_KEYS[key]} for a list of {key}s")
        head = key.partition(".")[0]
        if head not in methods and head in list_methods():
            raise UserError(f"--grid {key}: method {head!r} is not in --methods; add it or drop the axis")
        method, _ = key_target(key)
        values = tuple(split_list(raw, f"--grid {key}="))
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r} repeats a value; give each once")
        label = key.split(".", 1)[1] if method is not None else key
        axes.append(GridAxis(key, values, method, label))
    for a, b in itertools.combinations(axes, 2):
        if a.key == b.key:
            raise UserError(f"--grid {a.key} is given twice; give all its values in one --grid")
        if {a.method, b.method} & {None} and a.label == b.label:
            raise UserError(f"--grid {a.key} and --grid {b.key} both set {a.label} of the same runs; keep one")
    return tuple(axes)


def check_sets(sets: list[str], methods: list[str], grid: tuple[GridAxis, ...]) -> None:
    """``--set`` entries may not name methods outside ``--methods`` nor keys that a grid axis sweeps."""
    from clbench.config import parse_assignments
    from clbench.methods import list_methods

    registered = set(list_methods())
    swept = {a.key for a in grid}
    for key, _ in parse_assignments(sets):
        head = key.partition(".")[0]
        if head in registered and head not in methods:
            raise UserError(f"--set {key}: method {head!r} is not in --methods; add it or drop the setting")
        if key in swept:
            raise UserError(f"{key} is both in --set and --grid; keep it in one of them")


def sets_for(method: str, sets: tuple[str, ...]) -> list[str]:
    """The ``--set`` entries that concern a run of ``method`` (other methods' settings are dropped)."""
    from clbench.config import parse_assignments
    from clbench.methods import list_methods

    others = set(list_methods()) - {method}
    return [f"{k}={v}" for k, v in parse_assignments(list(sets)) if k.partition(".")[0] not in others]


def folder_name(method: str, point: tuple[tuple[str, str], ...]) -> str:
    """The method folder of a grid point: ``keeplora,rank=8``; a hash where the text is not a safe name."""
    from clbench.storage.results import safe_component

    if not point:
        return method
    name = SEP.join([method, *(f"{k}={v}" for k, v in point)])
    try:
        if len(name) <= MAX_FOLDER_NAME:
            return safe_component(name, "grid point")
    except UserError:
        pass
    digest = hashlib.sha256(json.dumps(point).encode()).hexdigest()[:8]
    return f"{method}{SEP}grid-{digest}"


def expand(request: SweepRequest) -> list[RunSpec]:
    """Every run of the sweep, in order (order, seed, method, grid point), each with its id and folder.

    A grid point whose configuration is invalid (e.g. ``lora.rank=0``) becomes a run with ``error`` set;
    two runs with the same resolved configuration are a UserError.
    """
    from clbench.config import build_config, method_run_config, run_id
    from clbench.storage.results import run_dir

    options = dict(request.options)
    benchmark = str(options.get("benchmark") or "synthetic")
    specs: list[RunSpec] = []
    for order, seed, method in itertools.product(request.orders, request.seeds, request.methods):
        axes = [a for a in request.grid if a.method in (None, method)]
        for values in itertools.product(*(a.values for a in axes)):
            point = tuple((a.label, v) for a, v in zip(axes, values, strict=True))
            run_options = (*request.options, ("order", order), ("seed", seed))
            sets = (*sets_for(method, request.sets), *(f"{a.key}={v}" for a, v in zip(axes, values, strict=True)))
            error, eval_rule, selection = None, "", ""
            try:
                cfg = build_config(request.preset, dict(run_options), list(sets), [method])
                rid, eval_rule, selection = run_id(method_run_config(cfg, method)), cfg.eval, cfg.data.datasets
            except UserError as exc:
                error = str(exc)
                rid = run_id({"invalid": True, "method": method, "preset": request.preset,
                              "options": [list(o) for o in run_options], "sets": list(sets)})
            folder = run_dir(Path(request.out), benchmark, order, folder_name(method, point), seed, eval_rule,
                             datasets=selection)
            specs.append(RunSpec(rid, method, order, seed, point, request.preset, run_options, sets, benchmark,
                                 request.out, str(folder), request.threads, error, eval_rule, datasets=selection))
    _check_distinct(specs)
    return specs


def _check_distinct(specs: list[RunSpec]) -> None:
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.id, spec)
        if other is not spec:
            raise UserError(f"grid points {other.grid_text} and {spec.grid_text} of {spec.method} give the same "
                            "configuration (one run); drop one of the values")


# ---- status of existing results -------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    """A run's JSON file as a dict, or None when it is absent, not a regular file, too big or not an object."""
    from clbench.storage.safeio import read_json

    try:
        data = read_json(path, "run file", "")
    except UserError:
        return None
    return data if isinstance(data, dict) else None


def folder_run_id(folder: Path) -> str | None:
    """The id of the configuration in ``folder/config.json`` (the task list the runner adds left out)."""
    from clbench.config import run_id

    config = _read_json(Path(folder) / "config.json")
    if config is None:
        return None
    return run_id({k: v for k, v in config.items() if k != "datasets"})


def run_status(spec: RunSpec) -> str:
    """What a sweep does with ``spec``: ``done`` (skipped), or why it runs (new, retry, replace, ...)."""
    from clbench.storage.results import missing_results

    if spec.error is not None:
        return INVALID
    folder = Path(spec.folder)
    manifest = _read_json(folder / "manifest.json")
    status = manifest.get("status") if manifest else None
    if status == "complete" and folder_run_id(folder) == spec.id \
            and missing_results(folder, layout=spec.layout) is None:
        return DONE  # the files back the status (a kill while rewriting them would not)
    if (staged_folder(spec) / CHECKPOINT).exists():
        return RESUME
    if manifest is None:
        return NEW
    if status == "complete":
        return REPLACE
    return RETRY if status == "failed" else INCOMPLETE


# ---- executing one run (in a worker process) -----------------------------------------------------------
def execute_run(spec: RunSpec, capture: bool = False) -> RunReport:
    """Run ``spec`` and move its folder to ``spec.folder``; failures are recorded there, never raised.

    ``capture`` sends the process's stdout/stderr to ``sweep.log`` (for launchers that run each run in a
    process of its own). Called by every launcher, so the launcher cannot change the results.
    """
    import torch

    started = time.time()
    staging = spec.staging
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STARTED).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": started}))
    log = staging / LOG_FILE
    threads = torch.get_num_threads()
    outcome, error, trace = None, None, None
    with _redirect_output(log) if capture else contextlib.nullcontext():
        try:
            torch.set_num_threads(max(1, spec.threads))
            outcome = _run(spec)
            if outcome.status != "complete":
                error = outcome.error or f"run ended with status {outcome.status}"
        except (Exception, KeyboardInterrupt) as exc:  # recorded in the run's folder, then reported
            error, trace = _describe(exc), traceback.format_exc()
            if isinstance(exc, KeyboardInterrupt):
                _publish(spec, error, trace, started)
                raise
        finally:
            torch.set_num_threads(threads)
    folder = _publish(spec, error, trace, started)
    metrics = {k: float(v) for k, v in ((outcome.metrics or {}) if outcome else {}).items()
               if k in METRIC_KEYS}
    return RunReport(spec.id, "failed" if error else "complete", str(folder), time.time() - started, metrics, error)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def _run(spec: RunSpec):
    """Rebuild the run's configuration, check its id, run it under the staging folder."""
    from clbench.config import build_config, method_run_config, run_id
    from clbench.engine.runner import run_methods

    if spec.error is not None:
        raise UserError(spec.error)
    if spec.runner is not None:  # another setting's run (clbench.settings.mcit.sweep.run_spec)
        return spec.runner(spec, spec.staging / "out")
    cfg = build_config(spec.preset, dict(spec.options), list(spec.sets), [spec.method])
    rid = run_id(method_run_config(cfg, spec.method))
    if rid != spec.id:
        raise UserError(f"run id {rid} differs from the planned {spec.id}: this worker resolves the configuration "
                        "differently (another clbench version?); install the same version everywhere")
    staged = staged_folder(spec)
    resume = (staged / CHECKPOINT).exists()  # an earlier attempt got past a task: continue after it
    (outcome,) = run_methods(cfg, [spec.method], spec.staging / "out", resume=resume)
    return outcome


def staged_folder(spec: RunSpec) -> Path:
    """Where the runner writes ``spec`` while it runs (inside the staging folder)."""
    from clbench.storage.results import run_dir

    return run_dir(spec.staging / "out", spec.benchmark, spec.order, spec.method, spec.seed, spec.eval_rule,
                   datasets=spec.datasets)


@contextlib.contextmanager
def _redirect_output(path: Path) -> Iterator[None]:
    """Send file descriptors 1 and 2 (Python and C output alike) to ``path`` for the duration."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _publish(spec: RunSpec, error: str | None, trace: str | None, started: float) -> Path:
    """Put the attempt in ``spec.folder`` (replacing an older one), with ``sweep.json``, the log, the error.

    A complete run's folder is moved there. A failed run whose staged folder holds a resume checkpoint (it
    got past a task) stays staged so the next sweep resumes it, and a copy without the checkpoint records
    the failure; any other failed run is moved.
    """
    from clbench.storage.results import atomic_write_json, atomic_write_text

    staged = staged_folder(spec)
    # A lock left in the staged folder belongs to another process (the runner releases its own): a live run of
    # the same id in another sweep, or a killed one the next attempt takes over. Leave that folder alone.
    locked = (staged / "run.lock").exists()
    has_run = (staged / "manifest.json").exists() and not locked
    resumable = error is not None and has_run and (staged / CHECKPOINT).exists()
    record = spec.staging / "record"
    shutil.rmtree(record, ignore_errors=True)
    if resumable:
        shutil.copytree(staged, record, ignore=shutil.ignore_patterns(CHECKPOINT, "run.lock", ".*"))
    elif has_run:
        os.replace(staged, record)
    record.mkdir(parents=True, exist_ok=True)
    if error is not None:
        manifest = _read_json(record / "manifest.json") or {}
        if manifest.get("status") != "failed" or "error" not in manifest:
            manifest.update(status="failed", error=error, run_id=manifest.get("run_id", spec.id), method=spec.method,
                            seed=spec.seed, order=spec.order, benchmark=spec.benchmark, finished=time.time())
            manifest.setdefault("started", started)
            atomic_write_json(record / "manifest.json", manifest)
        atomic_write_text(record / ERROR_FILE, error + "\n\n" + (trace or manifest.get("traceback") or ""))
    atomic_write_json(record / SWEEP_FILE, {"run_id": spec.id, "method": spec.method, "order": spec.order,
                                            "seed": spec.seed, "grid": dict(spec.point), "sets": list(spec.sets),
                                            "preset": spec.preset, "seconds": time.time() - started,
                                            "resumable": resumable})
    log = spec.staging / LOG_FILE
    if log.exists():
        shutil.copyfile(log, record / LOG_FILE)
    final = Path(spec.folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = spec.staging / "replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(record, final)
    if resumable or locked:
        for name in (STARTED, LOG_FILE):
            (spec.staging / name).unlink(missing_ok=True)
    else:
        shutil.rmtree(spec.staging, ignore_errors=True)
    return final


def remove_empty_staging(out: Path) -> None:
    """Remove ``<out>/.sweep/runs`` and ``<out>/.sweep`` when nothing is left in them (after a sweep)."""
    for folder in (Path(out) / STAGING, Path(out) / STAGING.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()


def record_failure(spec: RunSpec, error: str, trace: str | None = None) -> RunReport:
    """Record a run that could not execute or whose process died (invalid configuration, crashed or lost
    worker) in its folder; a resume checkpoint it left stays for the next sweep."""
    folder = _publish(spec, error, trace, time.time())
    return RunReport(spec.id, "failed", str(folder), 0.0, {}, error)


def is_started(spec: RunSpec) -> bool:
    """Whether a worker has started ``spec`` (its staging folder holds the start marker)."""
    return (spec.staging / STARTED).exists()
