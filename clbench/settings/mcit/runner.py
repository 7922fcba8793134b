"""``clbench run`` on an MCIT benchmark: backbone, tasks, methods, the loop, and one results folder per method.

A results folder holds ``accuracy.csv`` (the full T x T matrix, rows = after task, columns = task), ``base.csv``
(the base model's scores), ``metrics.json`` (MFT / MFN / MAA / BWT / Transfer, caption details, losses),
``profile.csv`` (cost sections per task), and ``manifest.json`` (resolved config, run id, status, seeds, data-file
SHA-256, backbone, package versions, git revision, device); ``resume.safetensors`` while the run is unfinished
(:mod:`clbench.settings.mcit.resume`), ``run.lock`` while it runs. The run itself (locks, fresh or resumed start, the
checkpoint after every task, interruption, the manifest's records) is the engine's, written once for every setting
(:mod:`clbench.engine.session`); this module supplies its :class:`McitRunJob`: the backbone, the tasks, the loop and
this setting's result files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from clbench.config import list_presets, load_preset, run_id, set_field
from clbench.costs.profiler import Profiler
from clbench.engine.loop import Hooks
from clbench.engine.rundir import RunPlan, check_something_to_resume, read_run_json
from clbench.engine.session import RunJob, RunOutcome, run_jobs
from clbench.engine.tracking import Tracker
from clbench.errors import UserError
from clbench.settings.mcit.bench import MCIT_BENCHMARKS, real_tasks, synthetic_tasks
from clbench.settings.mcit.codec import VICUNA_SYSTEM, Codec
from clbench.settings.mcit.loop import LoopConfig, McitTask, run_sequence
from clbench.settings.mcit.methods import get_mcit_method
from clbench.settings.mcit.metrics import mcit_metrics
from clbench.settings.mcit.resume import SCORE_BOUND, capture, plan_run, restore
from clbench.storage.checkpoint import CHECKPOINT_NAME
from clbench.storage.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    git_revision,
    run_dir,
)

# The presets of this setting: clbench/presets/mcit/*.json, read by the loader of the CLIP presets.
PRESETS = {name: load_preset(name, "mcit") for name in list_presets("mcit")}
SETTING = "MCIT setting"  # how the one-line errors name it


@dataclass
class DataSizes:
    """The size of each synthetic-mcit task (``--set data.n_train=...``); the real benchmarks use their files."""

    n_train: int = field(default=192, metadata={"min": 1})
    n_test: int = field(default=48, metadata={"min": 1})


def apply_sets(sets: list[str], loop: LoopConfig, hparams: dict[str, object], data_sizes: dict) -> None:
    """``loop.<field>=v``, ``data.n_train=v`` / ``data.n_test=v`` and ``<method>.<field>=v`` overrides, each typed
    and range-checked by the configuration layer's parser (:func:`clbench.config.set_field`, the fields' metadata)."""
    for item in sets:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        scope, _, name = key.partition(".")
        data = DataSizes(**data_sizes) if scope == "data" else None
        target = loop if scope == "loop" else data if scope == "data" else hparams.get(scope)
        if not sep or target is None or name not in {f.name for f in dataclasses.fields(target)}:
            raise UserError(f"--set {item!r}: the MCIT setting knows loop.<field>, data.n_train, data.n_test and "
                            f"<method>.<field> for the methods run ({', '.join(hparams)})")
        set_field(target, [name], raw, key)
        if data is not None:
            data_sizes.update(dataclasses.asdict(data))


def _backbone(backbone: str, steps: int, notify: Callable[[str], None]):
    from clbench.settings.mcit.backbone import load_llava_checkpoint

    if backbone == "tiny":
        from clbench.settings.mcit.pretrain import ensure_tiny_llava, is_ready

        if not is_ready(steps):
            notify(f"pre-training the tiny LLaVA ({steps} steps, cached afterwards)")
        path = ensure_tiny_llava(steps=steps)
        model, processor = load_llava_checkpoint(path)
        return model, Codec(processor), str(path)
    model, processor = load_llava_checkpoint(backbone)
    return model, Codec(processor, system=VICUNA_SYSTEM), str(Path(backbone).expanduser().absolute())


def _transformers_version() -> str:
    from clbench.settings.mcit.backbone import _transformers

    return _transformers().__version__


def data_identity(benchmark: str, sizes: dict, data_root: str) -> tuple[list[str], dict]:
    """The task names and the data part of a run's identity: the synthetic sizes, or the data root and the
    SHA-256 of every data file (a missing root or file is a UserError)."""
    if benchmark == "synthetic-mcit":
        from clbench.settings.mcit import synthetic

        return list(synthetic.TASKS), {"synthetic": dict(sizes)}
    from clbench.datasets.mtil import resolve_data_root
    from clbench.settings.mcit.data import BENCHMARKS, file_hashes

    root = resolve_data_root(data_root, benchmark)
    return [t.name for t in BENCHMARKS[benchmark]], {"root": str(root), "sha256": file_hashes(root, benchmark)}


def resolved_config(benchmark: str, method: str, seed: int, preset: str, backbone: str, hparams, loop: LoopConfig,
                    data_info: dict, names: list[str]) -> dict:
    """One method's resolved configuration (``config.json``); its :func:`~clbench.config.run_id` is the run id."""
    base_id = backbone if backbone == "tiny" else str(Path(backbone).expanduser().absolute())
    return {"setting": "mcit", "benchmark": benchmark, "method": method, "seed": seed, "preset": preset,
            "hparams": dataclasses.asdict(hparams), "loop": dataclasses.asdict(loop), "backbone": base_id,
            "pretrain_steps": PRESETS[preset]["pretrain_steps"] if backbone == "tiny" else None,
            "data": {k: v for k, v in data_info.items() if k != "root"}, "tasks": list(names)}


def run_mcit(benchmark: str, methods: list[str], out: Path, seed: int = 0, preset: str = "default",
             backbone: str = "tiny", data_root: str = "", device: str = "cpu", sets: list[str] | None = None,
             notify: Callable[[str], None] = print,
             on_task: Callable[[str, int, str, list[float]], None] | None = None,
             resume: bool | str = False, folder: str | None = None, tracker: Tracker | None = None
             ) -> list[RunOutcome]:
    """Run every method over the benchmark's sequence from the same base model; one results folder each.

    Every run folder is locked while it runs and checkpointed after every task; ``resume`` continues each run
    after its last completed task (a complete run is left as it is; ``"auto"``: see
    :func:`~clbench.settings.mcit.resume.plan_run`). ``folder`` names the method folder of a single method's run (a
    sweep's grid point, ``keeplora,rank=4``). ``tracker`` (``--track``) logs each method's rows and summary, as in
    the CLIP setting (:mod:`clbench.engine.tracking`)."""
    if benchmark not in MCIT_BENCHMARKS:
        raise UserError(f"--benchmark {benchmark!r} is not an MCIT benchmark ({', '.join(MCIT_BENCHMARKS)})")
    load_preset(preset, "mcit", SETTING)  # an unknown preset: one line
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise UserError(f"--methods lists {', '.join(twice)} more than once; name each method once")
    classes = {m: get_mcit_method(m) for m in methods}  # refuses CLIP-only methods before any work
    p = PRESETS[preset]
    loop = LoopConfig(**p["loop"])
    hparams = {m: cls.Hparams() for m, cls in classes.items()}
    sizes = {"n_train": p["n_train"], "n_test": p["n_test"]}
    apply_sets(sets or [], loop, hparams, sizes)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    _, data_info = data_identity(benchmark, sizes, data_root)  # names: from the tasks below
    if benchmark == "synthetic-mcit":
        tasks = synthetic_tasks(**sizes)
    else:
        tasks = real_tasks(Path(data_info["root"]), benchmark)
    names = [t.name for t in tasks]
    plans = []
    for name in classes:
        resolved = resolved_config(benchmark, name, seed, preset, backbone, hparams[name], loop, data_info, names)
        plans.append(RunPlan(name, run_dir(out, benchmark, 1, folder or name, seed), resolved, run_id(resolved),
                             names))
    if folder is not None and len(plans) != 1:
        raise ValueError("a folder name is for one method's run")
    if resume is True:
        check_something_to_resume({plan.name: plan.path for plan in plans}, "--out/--seed")
    notes: list[str] = []  # said once everything is checked and locked, so an error stays the only line
    plans = [plan_run(plan, resume, notes.append) for plan in plans]
    settings = {"benchmark": benchmark, "preset": preset, "loop": loop, "backbone": backbone,
                "steps": p["pretrain_steps"], "seed": seed, "data": data_info, "device": dev}
    jobs = [McitRunJob(plan, classes[plan.name], hparams[plan.name], tasks, settings, notify, on_task, tracker)
            for plan in plans]
    return run_jobs(jobs, notify, notes)


STALE = ("accuracy.csv", "base.csv", "profile.csv", "metrics.json", CHECKPOINT_NAME)


def _write_results(path: Path, state: dict, names: list[str], profiler: Profiler) -> dict:
    metrics = mcit_metrics(state["matrix"], names)
    metrics.update(details=state["details"], losses=state["losses"], setting="mcit")
    atomic_write_csv(path / "accuracy.csv", accuracy_frame(state["matrix"], names, names))
    atomic_write_csv(path / "base.csv", pd.DataFrame([state["base"]], columns=names))
    atomic_write_csv(path / "profile.csv", profiler.frame())
    atomic_write_json(path / "metrics.json", metrics)
    return metrics


class McitRunJob(RunJob):
    """One LLaVA method's run over the MCIT tasks (the shared control flow is :func:`clbench.engine.session.execute`):
    the backbone, the method, the MCIT loop, and this setting's result files and checkpoint part
    (:mod:`clbench.settings.mcit.resume`)."""

    stale = STALE

    def __init__(self, plan: RunPlan, cls, hparams, tasks: list[McitTask], settings: dict,
                 notify: Callable[[str], None],
                 on_task: Callable[[str, int, str, list[float]], None] | None,
                 tracker: Tracker | None = None) -> None:
        super().__init__(plan)
        self.cls, self.hparams, self.tasks, self.settings = cls, hparams, tasks, settings
        self.notify, self.on_task, self.tracker = notify, on_task, tracker
        self.hooks = Hooks()
        self.start_state: dict | None = None
        self.state: dict = {}

    def checkpoint_checks(self) -> dict:
        return {"upper": SCORE_BOUND}

    def start(self, started: float) -> dict:
        settings, dev, seed = self.settings, self.settings["device"], self.settings["seed"]
        self.model, self.codec, backbone_id = _backbone(settings["backbone"], settings["steps"], self.notify)
        self.model.to(dev)
        self.profiler = Profiler(device=dev)
        self.method = self.cls(self.model, self.hparams, self.profiler, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        name, names, on_task = self.plan.name, self.plan.tasks, self.on_task
        # the row printer and, with --track, the method's log (opened now, when this method's run starts)
        self.hooks = Hooks(on_row=lambda t, row: on_task(name, t, names[t], row)) if on_task else Hooks()
        if self.tracker is not None:
            self.hooks = self.tracker.hooks_for(name, self.hooks)
        return {"setting": "mcit", "benchmark": settings["benchmark"], "method": self.plan.name, "seed": seed,
                "preset": settings["preset"], "run_id": self.plan.run_id,
                "hparams": dataclasses.asdict(self.hparams), "loop": dataclasses.asdict(settings["loop"]),
                "backbone": backbone_id, "data": settings["data"], "tasks": self.plan.tasks, "status": "running",
                "started": started,
                "environment": {**environment_info(dev), "transformers": _transformers_version()},
                "git": git_revision()}

    def resume(self, ckpt) -> None:
        self.start_state = restore(self.plan, ckpt, self.model, self.method, self.profiler)

    def run(self, on_task_end: Callable[[int], None]) -> None:
        def task_end(state: dict) -> None:
            self.state = state
            on_task_end(len(state["matrix"]))

        self.state = run_sequence(self.model, self.codec, self.tasks, self.method, self.settings["loop"],
                                  self.profiler, self.settings["device"], self.settings["seed"],
                                  start=self.start_state, on_task_end=task_end, hooks=self.hooks)

    def capture(self):
        return capture(self.plan.run_id, self.state, self.plan.tasks, self.model, self.method, self.profiler)

    def write_results(self) -> dict:
        return _write_results(self.plan.path, self.state, self.plan.tasks, self.profiler)

    def done_metrics(self) -> dict | None:
        return read_run_json(self.plan.path / "metrics.json")
