"""``clbench run`` on an MCIT benchmark: backbone, tasks, methods, the loop, and one results folder per method.

A results folder holds ``accuracy.csv`` (the full T x T matrix, rows = after task, columns = task), ``base.csv``
(the base model's scores), ``metrics.json`` (MFT / MFN / MAA / BWT / Transfer, caption details, losses),
``profile.csv`` (cost sections per task), and ``manifest.json`` (resolved config, run id, status, seeds, data-file
SHA-256, backbone, package versions, git revision, device); ``resume.safetensors`` while the run is unfinished
(:mod:`clbench.mcit.resume`), ``run.lock`` while it runs.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from clbench.config import run_id
from clbench.costs.profiler import Profiler
from clbench.engine.interrupt import RunInterrupted, critical, mark_interrupted
from clbench.errors import UserError
from clbench.mcit.bench import MCIT_BENCHMARKS, real_tasks, synthetic_tasks
from clbench.mcit.codec import VICUNA_SYSTEM, Codec
from clbench.mcit.loop import LoopConfig, McitTask, run_sequence
from clbench.mcit.methods import get_mcit_method
from clbench.mcit.metrics import mcit_metrics
from clbench.mcit.pretrain import STEPS
from clbench.mcit.resume import McitPlan, capture, has_run, plan_run, restore
from clbench.storage.checkpoint import CHECKPOINT_NAME, save_checkpoint
from clbench.storage.lock import RunLock
from clbench.storage.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    git_revision,
    run_dir,
)

PRESETS = {
    "smoke": {"n_train": 32, "n_test": 8, "pretrain_steps": 20, "loop": {"epochs": [1], "batch_size": 16}},
    "default": {"n_train": 192, "n_test": 48, "pretrain_steps": STEPS, "loop": {"epochs": [12], "batch_size": 16}},
}


@dataclass
class McitOutcome:
    method: str
    path: Path
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _convert(raw: str, like):
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(like, list):
        return [int(x) for x in raw.split(",")]
    if like is None:
        return None if raw.lower() == "none" else int(raw)
    return type(like)(raw)


def apply_sets(sets: list[str], loop: LoopConfig, hparams: dict[str, object], data_sizes: dict) -> None:
    """``loop.<field>=v``, ``data.n_train=v`` / ``data.n_test=v`` and ``<method>.<field>=v`` overrides."""
    for item in sets:
        key, sep, raw = item.partition("=")
        scope, _, name = key.partition(".")
        target = loop if scope == "loop" else hparams.get(scope)
        if scope == "data" and name in data_sizes and sep:
            data_sizes[name] = int(raw)
            continue
        if not sep or target is None or not hasattr(target, name):
            raise UserError(f"--set {item!r}: the MCIT setting knows loop.<field>, data.n_train, data.n_test and "
                            f"<method>.<field> for the methods run ({', '.join(hparams)})")
        try:
            setattr(target, name, _convert(raw, getattr(target, name)))
        except ValueError:
            raise UserError(f"--set {item!r}: {raw!r} is not a valid value for {key}") from None


def _backbone(backbone: str, steps: int, notify: Callable[[str], None]):
    from clbench.mcit.backbone import load_llava_checkpoint

    if backbone == "tiny":
        from clbench.mcit.pretrain import ensure_tiny_llava, is_ready

        if not is_ready(steps):
            notify(f"pre-training the tiny LLaVA ({steps} steps, cached afterwards)")
        path = ensure_tiny_llava(steps=steps)
        model, processor = load_llava_checkpoint(path)
        return model, Codec(processor), str(path)
    model, processor = load_llava_checkpoint(backbone)
    return model, Codec(processor, system=VICUNA_SYSTEM), str(Path(backbone).expanduser().absolute())


def _transformers_version() -> str:
    from clbench.mcit.backbone import _transformers

    return _transformers().__version__


def data_identity(benchmark: str, sizes: dict, data_root: str) -> tuple[list[str], dict]:
    """The task names and the data part of a run's identity: the synthetic sizes, or the data root and the
    SHA-256 of every data file (a missing root or file is a UserError)."""
    if benchmark == "synthetic-mcit":
        from clbench.mcit import synthetic

        return list(synthetic.TASKS), {"synthetic": dict(sizes)}
    from clbench.datasets.mtil import resolve_data_root
    from clbench.mcit.data import BENCHMARKS, file_hashes

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
             resume: bool | str = False, folder: str | None = None) -> list[McitOutcome]:
    """Run every method over the benchmark's sequence from the same base model; one results folder each.

    Every run folder is locked while it runs and checkpointed after every task; ``resume`` continues each run
    after its last completed task (a complete run is left as it is; ``"auto"``: see
    :func:`~clbench.mcit.resume.plan_run`). ``folder`` names the method folder of a single method's run (a sweep's
    grid point, ``keeplora,rank=4``)."""
    if benchmark not in MCIT_BENCHMARKS:
        raise UserError(f"--benchmark {benchmark!r} is not an MCIT benchmark ({', '.join(MCIT_BENCHMARKS)})")
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown for the MCIT setting; use {' or '.join(PRESETS)}")
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
        plans.append(McitPlan(name, run_dir(out, benchmark, 1, folder or name, seed), run_id(resolved), names,
                              config=resolved))
    if folder is not None and len(plans) != 1:
        raise ValueError("a folder name is for one method's run")
    if resume is True and not any(has_run(plan.path) for plan in plans):
        raise UserError(f"--resume: no run to resume in {plans[0].path.parent.parent} (no run of "
                        f"{', '.join(classes)} there); check --out/--seed, or drop --resume to start the run")
    plans = [plan_run(plan, resume, notify) for plan in plans]
    locks = []
    try:
        for plan in plans:  # every folder locked before any work: a live run elsewhere stops this one now
            lock = RunLock(plan.path)
            lock.acquire(notify)
            locks.append(lock)
        settings = {"benchmark": benchmark, "preset": preset, "loop": loop, "backbone": backbone,
                    "steps": p["pretrain_steps"], "seed": seed, "data": data_info, "device": dev}
        return [_run_one(plan, classes[plan.name], hparams[plan.name], tasks, settings, notify, on_task)
                for plan in plans]
    finally:
        for lock in locks:
            lock.release()


def _read_json(path: Path) -> dict:
    from clbench.storage.safeio import json_object, read_json

    fix = "delete that run folder, or drop --resume"
    return json_object(read_json(path, "run file", fix), path, "run file", fix)


def _read_manifest(path: Path) -> dict:
    return _read_json(path / "manifest.json") if (path / "manifest.json").exists() else {}


STALE = ("accuracy.csv", "base.csv", "profile.csv", "metrics.json", CHECKPOINT_NAME)


def _write_results(path: Path, state: dict, names: list[str], profiler: Profiler) -> dict:
    metrics = mcit_metrics(state["matrix"], names)
    metrics.update(details=state["details"], losses=state["losses"], setting="mcit")
    atomic_write_csv(path / "accuracy.csv", accuracy_frame(state["matrix"], names, names))
    atomic_write_csv(path / "base.csv", pd.DataFrame([state["base"]], columns=names))
    atomic_write_csv(path / "profile.csv", profiler.frame())
    atomic_write_json(path / "metrics.json", metrics)
    return metrics


def _run_one(plan: McitPlan, cls, hparams, tasks: list[McitTask], settings: dict, notify: Callable[[str], None],
             on_task: Callable[[str, int, str, list[float]], None] | None) -> McitOutcome:
    """One method's run in its locked folder: fresh or resumed, checkpointed after every task."""
    path, name, names = plan.path, plan.name, plan.tasks
    if plan.mode == "done":
        seconds = _read_manifest(path).get("seconds", 0.0)
        return McitOutcome(name, path, _read_json(path / "metrics.json"), float(seconds))
    dev, seed = settings["device"], settings["seed"]
    started = time.time()
    model, codec, backbone_id = _backbone(settings["backbone"], settings["steps"], notify)
    model.to(dev)
    profiler = Profiler(device=dev)
    method = cls(model, hparams, profiler, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    manifest = {"setting": "mcit", "benchmark": settings["benchmark"], "method": name, "seed": seed,
                "preset": settings["preset"], "run_id": plan.run_id,
                "hparams": dataclasses.asdict(hparams), "loop": dataclasses.asdict(settings["loop"]),
                "backbone": backbone_id, "data": settings["data"], "tasks": names, "status": "running",
                "started": started,
                "environment": {**environment_info(dev), "transformers": _transformers_version()},
                "git": git_revision()}
    start = None
    ckpt_path = path / CHECKPOINT_NAME
    if plan.mode == "resume":
        start = restore(plan, model, method, profiler)
        stored = _read_manifest(path)
        manifest["resumed"] = [*stored.get("resumed", []), {"after_task": plan.completed, "at": started}]
        manifest["started"] = stored.get("started", started)
    with critical():
        atomic_write_json(path / "manifest.json", manifest)  # says running before old results go
        if plan.mode != "resume":
            for stale in STALE:
                (path / stale).unlink(missing_ok=True)
        atomic_write_json(path / "config.json", plan.config)

    def on_task_end(state: dict) -> None:
        with critical():
            save_checkpoint(ckpt_path, capture(plan.run_id, state, names, model, method, profiler))
            manifest["completed_tasks"] = len(state["matrix"])
            atomic_write_json(path / "manifest.json", manifest)

    try:
        result = run_sequence(model, codec, tasks, method, settings["loop"], profiler, dev, seed,
                              on_task=(lambda t, n, row: on_task(name, t, n, row)) if on_task else None,
                              start=start, on_task_end=on_task_end)
        with critical():
            metrics = _write_results(path, result, names, profiler)
            seconds = time.time() - manifest["started"]
            manifest.update(status="complete", finished=time.time(), seconds=seconds)
            atomic_write_json(path / "manifest.json", manifest)
            ckpt_path.unlink(missing_ok=True)  # every result is on disk: the checkpoint is not needed
        return McitOutcome(name, path, metrics, seconds)
    except RunInterrupted as exc:
        mark_interrupted(exc, manifest, path, name, len(names), plan.completed)
        raise
    except BaseException as exc:
        manifest.update(status="failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                        finished=time.time(), traceback=traceback.format_exc())
        atomic_write_json(path / "manifest.json", manifest)
        raise
