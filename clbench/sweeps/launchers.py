"""Where the runs of a sweep execute: this machine, a Ray cluster, or SLURM through submitit.

Every launcher calls the same :func:`clbench.sweeps.plan.execute_run` on each
:class:`~clbench.sweeps.plan.RunSpec`, in a process of the run's own (so a crash, a leak or global state of one
run cannot touch another), and reports each :class:`~clbench.sweeps.plan.RunReport` to a monitor as the run
ends. Ray and submitit are optional extras, imported only when their launcher is used. Workers write to the
sweep's ``--out`` and import clbench, so a cluster needs the same clbench version on every node (a run checks
its id) and a file system shared with
the machine that launches the sweep.

- ``local``: a bounded number of runs at a time (``--jobs``), each in a fresh ``spawn`` process through a
  one-worker :class:`concurrent.futures.ProcessPoolExecutor` (fresh per run, on every Python version);
- ``ray``: each run a Ray task with ``num_cpus`` / ``num_gpus`` (fractional GPUs pack runs on a GPU) and
  ``max_calls=1`` (a fresh worker process per run), on the cluster at ``--ray-address`` or a local instance;
- ``slurm``: one submitit job array (``map_array``), ``--jobs`` capping how many run at once;
- ``inline``: in this process, one run after another (debugging; a crash stops the sweep).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clbench.errors import UserError
from clbench.extras import missing
from clbench.sweeps.plan import RunReport, RunSpec, execute_run, record_failure

POLL_SECONDS = 0.5
EXTRAS = {"ray": ("ray", "clbench[ray]"), "slurm": ("submitit", "clbench[slurm]")}


class Monitor(Protocol):
    """What a launcher tells while it works: each finished run, and a tick at least every poll interval."""

    def finished(self, report: RunReport) -> None: ...

    def tick(self) -> None: ...


class Launcher(Protocol):
    name: str

    def run(self, specs: list[RunSpec], monitor: Monitor) -> list[RunReport]: ...


def require(launcher: str) -> Any:
    """Import the optional package a launcher needs, or a UserError naming the install command."""
    module, _ = EXTRAS[launcher]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module, f"--launcher {launcher}") from None


def _failure(spec: RunSpec, exc: BaseException, where: str) -> RunReport:
    """A run whose process died or could not start: recorded in its folder like any failed run."""
    message = f"{where}: {type(exc).__name__}: {exc}".strip()
    return record_failure(spec, message, "".join(traceback.format_exception(exc)))


@dataclass
class InlineLauncher:
    """Runs in this process, one after another."""

    name: str = "inline"

    def run(self, specs: list[RunSpec], monitor: Monitor) -> list[RunReport]:
        reports = []
        for spec in specs:
            monitor.tick()
            report = execute_run(spec, capture=False)
            reports.append(report)
            monitor.finished(report)
        return reports


@dataclass
class LocalLauncher:
    """At most ``jobs`` runs at a time on this machine, each in a fresh process."""

    jobs: int
    name: str = "local"

    def run(self, specs: list[RunSpec], monitor: Monitor) -> list[RunReport]:
        context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
        queue = list(specs)
        running: dict[cf.Future, tuple[RunSpec, cf.ProcessPoolExecutor]] = {}
        reports: list[RunReport] = []
        try:
            while queue or running:
                while queue and len(running) < max(1, self.jobs):
                    spec = queue.pop(0)
                    executor = cf.ProcessPoolExecutor(max_workers=1, mp_context=context)
                    running[executor.submit(execute_run, spec, True)] = (spec, executor)
                done, _ = cf.wait(running, timeout=POLL_SECONDS, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    spec, executor = running.pop(future)
                    try:
                        report = future.result()
                    except Exception as exc:  # the process died (killed, out of memory, segfault)
                        report = _failure(spec, exc, "the run's process ended abnormally")
                    executor.shutdown(wait=False)
                    reports.append(report)
                    monitor.finished(report)
                monitor.tick()
        finally:
            for _, executor in running.values():
                executor.shutdown(wait=False, cancel_futures=True)
        return reports


@dataclass
class RayLauncher:
    """Each run a Ray task on the cluster at ``address`` (``None``: a local instance started here)."""

    address: str | None
    cpus: float
    gpus: float
    jobs: int = 0  # most runs submitted at once (0: all; Ray's resources decide what runs)
    name: str = "ray"
    ray: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ray = require("ray")

    def run(self, specs: list[RunSpec], monitor: Monitor) -> list[RunReport]:
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"at {self.address}" if self.address else "locally"
                raise UserError(f"cannot start or reach a Ray cluster {where} ({exc}); check --ray-address "
                                "(e.g. ray://head:10001 or auto)") from None
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_calls=1)(execute_run)
        queue = list(specs)
        pending: dict[Any, RunSpec] = {}
        reports: list[RunReport] = []
        try:
            while queue or pending:
                while queue and (self.jobs <= 0 or len(pending) < self.jobs):
                    spec = queue.pop(0)
                    pending[task.remote(spec, True)] = spec
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    spec = pending.pop(ref)
                    try:
                        report = ray.get(ref)
                    except Exception as exc:  # the worker died or the task was lost
                        report = _failure(spec, exc, "the Ray task failed")
                    reports.append(report)
                    monitor.finished(report)
                monitor.tick()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
        return reports


def parse_time(text: str) -> int:
    """SLURM's time formats as minutes: ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not text or not match:
        raise UserError(f"--time {text!r}: give minutes or SLURM's [D-]HH:MM:SS, e.g. --time 12:00:00")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # minutes
        seconds = int(a) * 60
    if seconds <= 0:
        raise UserError(f"--time {text!r} is zero; give the time limit of one run")
    return -(-seconds // 60)


def slurm_params(items: list[str]) -> dict[str, str]:
    """``--slurm-param account=abc`` entries as submitit's ``slurm_<key>`` parameters (checked by name)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise UserError(f"--slurm-param {item!r}: expected key=value, e.g. --slurm-param account=myproject")
        out[key.removeprefix("slurm_").replace("-", "_")] = value
    return out


@dataclass
class SlurmLauncher:
    """One submitit job array; ``cluster="local"`` runs the array as local processes (tests)."""

    folder: Path
    time_min: int
    partition: str | None = None
    cpus: int = 1
    gpus: int = 0
    jobs: int = 0  # slurm_array_parallelism (0: submitit's default, 256)
    params: dict[str, str] = field(default_factory=dict)
    cluster: str = "slurm"
    name: str = "slurm"
    submitit: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.submitit = require("slurm")
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--launcher slurm: no sbatch on PATH; run the sweep on a SLURM login node "
                            "(or use --launcher local / ray)")
        valid = self.submitit.SlurmExecutor._valid_parameters()
        unknown = sorted(k for k in self.params if k not in valid)
        if unknown:
            raise UserError(f"--slurm-param {', '.join(unknown)}: not a SLURM option submitit knows; known: "
                            f"{', '.join(sorted(valid))}")

    def executor(self) -> Any:
        """The configured ``submitit.AutoExecutor`` (logs and pickles under ``folder/%j``)."""
        executor = self.submitit.AutoExecutor(folder=str(Path(self.folder) / "%j"), cluster=self.cluster)
        parameters: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus,
                                      "gpus_per_node": self.gpus, "tasks_per_node": 1, "nodes": 1,
                                      "name": "clbench-sweep"}
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.jobs > 0:
            parameters["slurm_array_parallelism"] = self.jobs
        parameters.update({f"slurm_{k}": _number_or_text(v) for k, v in self.params.items()})
        executor.update_parameters(**parameters)
        return executor

    def run(self, specs: list[RunSpec], monitor: Monitor) -> list[RunReport]:
        executor = self.executor()
        try:
            jobs = executor.map_array(execute_run, specs, [True] * len(specs))
        except Exception as exc:  # sbatch refused the array (partition, account, time limit, ...)
            raise UserError(f"submitting the job array failed: {str(exc).strip().splitlines()[-1]}") from None
        pending = dict(zip(jobs, specs, strict=True))
        reports: list[RunReport] = []
        poll = POLL_SECONDS if self.cluster == "local" else 5.0
        try:
            while pending:
                for job in [j for j in pending if j.done()]:
                    spec = pending.pop(job)
                    try:
                        report = job.result()
                    except Exception as exc:  # the job failed outside execute_run (timeout, node failure)
                        report = _failure(spec, exc, f"SLURM job {job.job_id} failed (logs in {job.paths.folder})")
                    reports.append(report)
                    monitor.finished(report)
                monitor.tick()
                if pending:
                    time.sleep(poll)
        except KeyboardInterrupt:
            for job in pending:
                job.cancel(check=False)
            raise
        return reports


def _number_or_text(value: str) -> Any:
    return int(value) if value.isdigit() else value


def make_launcher(name: str, *, jobs: int, cpus: float, gpus: float, ray_address: str | None,
                  slurm_folder: Path, time_limit: str | None, partition: str | None, params: list[str],
                  cluster: str = "slurm") -> Launcher:
    """The launcher ``--launcher name`` asks for, with its options checked (missing extras included)."""
    builders: dict[str, Callable[[], Launcher]] = {
        "local": lambda: LocalLauncher(jobs),
        "inline": lambda: InlineLauncher(),
        "ray": lambda: RayLauncher(ray_address or None, cpus, gpus, jobs),
        "slurm": lambda: _slurm(slurm_folder, time_limit, partition, cpus, gpus, jobs, params, cluster),
    }
    if name not in builders:
        raise UserError(f"--launcher {name!r} is not one of {', '.join(builders)}")
    if name in ("local", "inline") and gpus:
        raise UserError(f"--gpus-per-job is for --launcher ray or slurm; --launcher {name} runs on --device")
    if name != "ray" and ray_address:
        raise UserError("--ray-address needs --launcher ray")
    if name != "slurm" and (time_limit or partition or params):
        raise UserError("--time, --partition and --slurm-param need --launcher slurm")
    return builders[name]()


def _slurm(folder: Path, time_limit: str | None, partition: str | None, cpus: float, gpus: float, jobs: int,
           params: list[str], cluster: str) -> SlurmLauncher:
    if not time_limit:
        raise UserError("--launcher slurm needs --time, the time limit of one run (e.g. --time 12:00:00)")
    if cpus != int(cpus) or gpus != int(gpus):
        raise UserError("--launcher slurm needs whole numbers for --cpus-per-job and --gpus-per-job")
    return SlurmLauncher(folder, parse_time(time_limit), partition or None, int(cpus), int(gpus), jobs,
                         slurm_params(params), cluster)
